"""Checkpoints: orbax CheckpointManager over the train state, data position and config.

Each checkpoint step holds three items:
  state  - the TrainState (params, optimiser state, step, non-finite marker), sharded;
  data   - the input pipeline's position (JSON), so a resumed run sees the same batches;
  config - the run's config (JSON), for inspection and for `launch/eval.py`.
Randomness needs no item of its own: every key derives from `config.seed` and the step.

Saves are asynchronous; orbax writes into a temporary directory and renames it only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest one.
Retention keeps the last `checkpoint.keep` steps plus the best by validation RSUM.
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cookie_jax import files
from cookie_jax import stop as stop_lib
from cookie_jax.errors import CheckpointMismatchError
from cookie_jax.tree_paths import path_name


# Top-level modules that a model may add on top of the checkpoint it is fine-tuned from:
# the temporal transformer of a video model initialised from an image-text run. Missing
# from the checkpoint as a whole, they keep their initial values (see `load_params`).
NEW_MODULES = ('video',)


def check_compatible(stored, target, what: str) -> None:
  """Raises naming the first parameter whose presence or shape differs."""
  stored_flat = {path_name(p): tuple(getattr(v, 'shape', ()))
                 for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  target_flat = {path_name(p): tuple(v.shape)
                 for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  for key in sorted(set(stored_flat) | set(target_flat)):
    if key not in stored_flat:
      raise CheckpointMismatchError(
          f'{what} has no parameter {key!r} (shape {target_flat[key]} in the configured '
          'model); it was written by a different model. Use a matching config.model, or '
          'a checkpoint of this model.')
    if key not in target_flat:
      raise CheckpointMismatchError(
          f'{what} has a parameter {key!r} (shape {stored_flat[key]}) that the configured '
          'model lacks; it was written by a different model. Use a matching config.model.')
    if stored_flat[key] != target_flat[key]:
      raise CheckpointMismatchError(
          f'{what}: parameter {key!r} has shape {stored_flat[key]} in the checkpoint but '
          f'{target_flat[key]} in the configured model. Use the config.model the '
          'checkpoint was trained with.')


def _handlers():
  # Registered up front so that a fresh process can read metadata before restoring.
  return {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
          'config': ocp.JsonCheckpointHandler()}


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class _Manager(ocp.CheckpointManager):
  """orbax's manager, told about a stop by the loop (cookie_jax/stop.py).

  orbax asks `reached_preemption(step)` on every save, also from the thread that
  finishes an async save, with that save's older step; asked of JAX, it would move JAX's
  preemption counter back and could put the processes' agreed stop behind them.
  """

  stop = None  # the run's StopSignals

  def reached_preemption(self, step: int) -> bool:
    return self.stop is not None and self.stop.stop_step == step


class Checkpointer:
  """Saving, retention, resume and preemption for one workdir."""

  def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
    self.directory = os.fspath(directory)
    self.every = cfg.every
    policy = [policies.LatestN(n=cfg.keep)]
    if cfg.keep_best:
      policy.append(policies.BestN(get_metric_fn=lambda m: m['rsum'], reverse=False, n=1,
                                   keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(policy),
        enable_async_checkpointing=cfg.async_save,
        create=True)
    self.manager = _Manager(self.directory, item_handlers=_handlers(), options=options)
    self._stop = self.manager.stop = stop_lib.StopSignals()

  # Preemption and Ctrl-C ----------------------------------------------------------------
  def install_stop_handlers(self, start_step: int):
    """SIGTERM (how schedulers preempt) and Ctrl-C ask the loop to save and stop; with
    several processes, at a step they agree on (cookie_jax/stop.py)."""
    self._stop.install(self.directory, start_step)

  def restore_stop_handlers(self):
    self._stop.restore()

  @property
  def stop_signal(self) -> int | None:
    """The signal that asked the run to stop (SIGTERM or SIGINT), if one did."""
    return self._stop.signal

  def preempted(self, step: int) -> bool:
    """Whether to save `step` and stop; asked after every step of the loop, in order."""
    return self._stop.requested(step)

  # Save / restore -----------------------------------------------------------------------
  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json())))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """(state in the target shardings, data position, config dict) of `step`."""
    stored = self.manager.item_metadata(step)['state']
    target = abstract_state
    if hasattr(abstract_state, 'params') and 'params' in stored:
      # A TrainState: the parameters name a mismatch better than optimiser slots do.
      stored, target = stored['params'], abstract_state.params
    check_compatible(stored, target, f'The checkpoint at {self.directory}/{step}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'] or {}), dict(restored['config'] or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# Reading a run's checkpoints (evaluation, export, fine-tuning, tests) -----------------


CHECKPOINTS = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints: WORKDIR/checkpoints."""
  return files.join(workdir, CHECKPOINTS)


def find_checkpoints(workdir: str, *, action: str = 'evaluate',
                     accept_checkpoint_dir: bool = False) -> str:
  """WORKDIR/checkpoints of an existing run, checked here (orbax would report a missing
  folder in its own terms). With `accept_checkpoint_dir`, a folder without checkpoints/
  is taken to be a checkpoint directory itself (`resolve_step` checks what it holds)."""
  workdir = os.fspath(workdir)
  if not epath.Path(workdir).is_dir():
    raise FileNotFoundError(f'--workdir={workdir!r} does not exist; give the workdir of a '
                            'training run (the folder holding checkpoints/).')
  directory = checkpoint_dir(workdir)
  if epath.Path(directory).is_dir():
    return directory
  if accept_checkpoint_dir:
    return workdir
  raise FileNotFoundError(f'{workdir} holds no checkpoints/ folder, so no checkpoint to '
                          f'{action}; train first with launch/train.py --workdir=' + workdir)


def _reader(directory: str):
  """A manager that knows every item (orbax warns of items it has no handler for), reads
  a subset of the state (the parameters), and never creates or deletes anything."""
  handlers = dict(_handlers(), state=ocp.PyTreeCheckpointHandler())
  return ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(create=False))


def resolve_step(directory: str, step: int | None = None) -> int:
  """`step`, checked to be a finished checkpoint in `directory`; None = the latest."""
  manager = _reader(directory)
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(f'{directory} holds no finished checkpoint; train first, or '
                            'give the workdir of a run that saved one.')
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f'--step={step}: {directory} has checkpoints at steps '
                            f'{steps} only.')
  return step


def saved_config(directory: str, step: int) -> dict:
  """The config (a dict) saved with `step`; {} for a checkpoint without one."""
  manager = _reader(directory)
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return dict(saved['config'] or {})


def restore_latest(workdir: str, abstract_state, cfg: ml_collections.ConfigDict
                   ) -> tuple[Any, dict, dict]:
  """(state, data position, config dict) of the latest checkpoint of the run in `workdir`
  (`Checkpointer.restore` on WORKDIR/checkpoints, then closed)."""
  ckpt = Checkpointer(checkpoint_dir(workdir), cfg)
  try:
    return ckpt.restore(ckpt.latest_step(), abstract_state)
  finally:
    ckpt.close()


def load_params(path: str, abstract_params, step: int | None = None, *, fallback=None):
  """Parameters only, from another run's workdir or checkpoint directory (fine-tuning).

  `path` may be a run's checkpoint directory (`WORKDIR/checkpoints`), a workdir, or one
  step's directory. Restored in the shardings of `abstract_params`.

  With `fallback` (the freshly initialised parameters), a module of `NEW_MODULES` that the
  checkpoint lacks entirely keeps its values from `fallback`, with a logged note; every
  other difference is still a CheckpointMismatchError.
  """
  path = os.fspath(path)
  if not files.exists(path):
    raise FileNotFoundError(f'config.train.init_from={path!r} does not exist; give a '
                            'workdir or checkpoint directory of a previous run.')
  base, leaf = os.path.split(path.rstrip('/'))
  if leaf.isdigit() and step is None:
    path, step = base, int(leaf)
  if epath.Path(checkpoint_dir(path)).is_dir():
    path = checkpoint_dir(path)
  manager = _reader(path)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'config.train.init_from={path!r} holds no finished '
                              'checkpoint.')
    stored = manager.item_metadata(step)['state']['params']
    new = [k for k in NEW_MODULES
           if fallback is not None and k in abstract_params and k not in stored]
    wanted = {k: v for k, v in abstract_params.items() if k not in new}
    check_compatible(stored, wanted, f'The checkpoint {path}/{step}')
    target = {'params': wanted}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
  finally:
    manager.close()
  params = dict(restored['state']['params'])
  for k in new:
    params[k] = fallback[k]
    logging.info('%s/%d has no %r parameters (%d arrays): new in this model, they keep '
                 'their initial values.', path, step, k, len(jax.tree.leaves(fallback[k])))
  return params, step
