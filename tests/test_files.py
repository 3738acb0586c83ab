"""Every file through one path API (cookie_jax/files.py): each writer of a run, an
evaluation, an index build and an export keeps its files in a `gs://` workdir as in a
local one, against a real Cloud Storage emulator (tests/gcs_emulator.py: fake-gcs-server),
and nothing makes a local folder named `gs:`."""

import dataclasses
import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from cookie_jax import files, goodput, metric_writer, train
from cookie_jax.config import default_config
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.eval import index as index_lib
from cookie_jax.eval import pictures

import gcs_emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fresh_clients():
  """epath decides once (cached) whether gs:// goes to TensorFlow, reading EPATH_USE_TF;
  fsspec keeps a GCS filesystem made with the endpoint of its day."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  emulator = gcs_emulator.Emulator(str(tmp_path_factory.mktemp('gcs') / 'server.log'))
  try:
    with pytest.MonkeyPatch.context() as mp:
      for key, value in emulator.env.items():
        mp.setenv(key, value)
      _fresh_clients()
      yield emulator
  finally:
    _fresh_clients()
    emulator.stop()


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  """An empty working directory, which must stay empty (no local `gs:` folder)."""
  here = tmp_path / 'cwd'
  here.mkdir()
  monkeypatch.chdir(here)
  yield here
  assert not os.listdir(here)


def _records(data: bytes) -> list[dict]:
  return [json.loads(line) for line in data.decode().splitlines()]


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of each scalar in a TensorBoard event file (TFRecord framing:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out, pos = [], 0
  while pos < len(event_file):
    (length,) = struct.unpack('<Q', event_file[pos:pos + 8])
    event = event_pb2.Event.FromString(event_file[pos + 12:pos + 12 + length])
    pos += 16 + length
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def test_run_files_upload_when_due_or_forced_and_only_what_changed(gcs, cwd, monkeypatch):
  uploads = []
  real_upload = files.upload
  monkeypatch.setattr(files, 'upload', lambda src, dst: (uploads.append(dst),
                                                         real_upload(src, dst)))
  files.write_text('gs://bucket/sync/old.txt', 'from an earlier start')
  run = files.RunFiles('gs://bucket/sync', every_s=3600)
  with open(run.fetch('old.txt'), 'a', encoding='utf-8') as f:
    f.write(', continued')
  with open(run.local('new.txt'), 'w', encoding='utf-8') as f:
    f.write('new')
  assert not run.sync() and not gcs.has('sync/new.txt')  # not due yet
  assert run.sync(force=True)
  assert sorted(uploads) == ['gs://bucket/sync/new.txt', 'gs://bucket/sync/old.txt']
  assert gcs.read('sync/old.txt') == b'from an earlier start, continued'
  run.sync(force=True)
  assert len(uploads) == 2  # nothing changed, nothing sent
  root = run.root
  run.close()
  assert not os.path.exists(root)
  local = files.RunFiles(str(cwd.parent / 'local'))
  assert local.root == str(cwd.parent / 'local') and local.sync()
