"""Weights & Biases mirror of `metrics.jsonl` (optional: `pip install cookie_jax[wandb]`).

Switched on by `train.wandb_project`. Only process 0 logs. The run's config is attached;
the W&B run id is kept in `WORKDIR/wandb_run.json` with the last step sent, so a resumed
run continues the same W&B run. W&B keeps a run's history in step order and refuses a
step below the last one it has; after a crash the steps between the restored checkpoint
and the crash are already there (a resumed run is exact, so their training values are
the ones it would log again), and the mirror does not send them a second time. Each step
therefore appears once.

W&B keeps its own local files (the `wandb/` folder) in the workdir, or, for a `gs://`
workdir, which it cannot write, in $WANDB_DIR or a temporary folder (kept: an offline
run is synced from there).
"""

import json
import os
import tempfile
from typing import Mapping

from absl import logging
import jax
import ml_collections

from cookie_jax import files
from cookie_jax.config import ConfigError

RUN_FILE = 'wandb_run.json'


def _import_wandb():
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(
        'config.train.wandb_project is set, but the wandb package is not installed; '
        "install the extra with `pip install -e '.[wandb]'` (or `pip install wandb`), or "
        "leave train.wandb_project='' to log to metrics.jsonl and TensorBoard only."
    ) from None
  return wandb


def _local_dir(workdir: str) -> str:
  if not files.is_remote(workdir):
    return workdir
  return os.environ.get('WANDB_DIR') or tempfile.mkdtemp(prefix='cookie_jax-wandb-')


class WandbMirror:
  """Sends what MetricWriter writes to one W&B run; a no-op on processes other than 0.

  WORKDIR/wandb_run.json goes through `run_files` (`files.RunFiles`) when given, which
  uploads it to a remote workdir with the metrics; else it is written in place.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict,
               run_files: files.RunFiles | None = None):
    self.enabled = jax.process_index() == 0
    self._run = None
    if not self.enabled:
      return
    wandb = _import_wandb()
    self._path = (run_files.fetch(RUN_FILE) if run_files is not None
                  else files.join(workdir, RUN_FILE))
    stored = self._stored()
    cfg = config.train
    self._run = wandb.init(
        project=cfg.wandb_project, entity=cfg.wandb_entity or None,
        name=cfg.wandb_run or None, id=stored.get('id'), resume='allow',
        dir=_local_dir(workdir), config=json.loads(config.to_json()))
    # W&B already has every step up to this one (from an earlier start of the run).
    self._resumed_after = self._sent = int(stored.get('last_step', -1))
    self._save()
    logging.info('W&B run %s (project %s)%s.', self._run.id, cfg.wandb_project,
                 f', resumed after step {self._sent}' if stored else '')

  def _stored(self) -> dict:
    try:
      return json.loads(files.read_text(self._path))
    except (OSError, ValueError):
      return {}

  def _save(self) -> None:
    files.write_text(self._path, json.dumps({'id': self._run.id, 'last_step': self._sent}))

  @property
  def run_id(self) -> str | None:
    return None if self._run is None else self._run.id

  def log(self, step: int, values: Mapping[str, float]) -> None:
    """One record of metrics.jsonl; steps W&B already holds are not sent again."""
    if self._run is None or step <= self._resumed_after:
      return
    self._run.log(dict(values), step=int(step))
    if step > self._sent:
      self._sent = int(step)
      self._save()

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None
