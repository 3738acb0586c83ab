"""A Hugging Face Hub id where a folder is accepted (`model.image_init`, `model.text_init`,
`data.tokenizer`): `openai/clip-vit-base-patch16` becomes the folder of its snapshot in
huggingface_hub's cache, downloaded when online and missing. With HF_HUB_OFFLINE=1 only
the cache is read. HF_HUB_CACHE (or HF_HOME) is read at each call, not at import.

Anything that exists as a path, or does not look like `owner/name`, is returned as it is,
so local folders and gs:// paths behave as before.
"""

import os
import re

from etils import epath

from cookie_jax.errors import ConfigError

_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
# What a tower or tokenizer folder needs; the rest of a repository (other frameworks'
# weights, images) is not fetched. The weights: safetensors (one file or shards) where the
# repository has them, else PyTorch's pickles (one file or shards), never both.
PATTERNS = ('*.json', '*.txt', '*.model', '*.safetensors')
TORCH_PATTERNS = ('*.json', '*.txt', '*.model', 'pytorch_model*.bin')
_TRUE = ('1', 'true', 'yes', 'on')


def is_hub_id(path) -> bool:
  text = os.fspath(path)
  return bool(_HUB_ID.match(text)) and not epath.Path(text).expanduser().exists()


def _cache_dir() -> str | None:
  if os.environ.get('HF_HUB_CACHE'):
    return os.environ['HF_HUB_CACHE']
  if os.environ.get('HF_HOME'):
    return os.path.join(os.environ['HF_HOME'], 'hub')
  return None  # huggingface_hub's default


def resolve(path, where: str) -> str:
  """`path` itself, or the local snapshot folder of the Hub id `path`."""
  if not is_hub_id(path):
    return os.fspath(path)
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f'{where}: {path!r} is not a local folder and looks like a Hub id, '
                      'which needs huggingface_hub (pip install huggingface_hub).') from None
  offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in _TRUE
  def fetch(patterns):
    return huggingface_hub.snapshot_download(
        os.fspath(path), cache_dir=_cache_dir(), local_files_only=offline,
        allow_patterns=list(patterns))
  try:
    folder = fetch(PATTERNS)
    if not any(epath.Path(folder).glob('*.safetensors')):
      folder = fetch(TORCH_PATTERNS)  # a repository with PyTorch weights only
    return folder
  except Exception as e:  # pylint: disable=broad-except
    # Offline without the files, a private or missing repository, no network: one line.
    mode = 'HF_HUB_OFFLINE=1, and the cache lacks it' if offline else type(e).__name__
    raise ConfigError(f'{where}: {path!r} is neither a local folder nor a Hub id that '
                      f'could be fetched ({mode}: {str(e).splitlines()[0][:200]}). Give a '
                      'local folder, or run once online to fill the cache.') from None
