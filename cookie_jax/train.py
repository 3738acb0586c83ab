"""`train_and_evaluate(config, workdir)`: mesh, input, model and optimiser, shard, restore,
loop, evaluate, save.

The loop keeps the host ahead of the devices, so that they never wait for it:

* the metrics of a logging step are fetched only after the next step has been
  dispatched, while the devices run it (and the non-finite guard reads them there);
* a background thread builds the next global batches and puts them on the devices
  (`data.device_prefetch`);
* only a save reads the state itself.
"""

import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import flops as flops_lib
from cookie_jax import metrics as metrics_lib
from cookie_jax import objectives
from cookie_jax import sharding, step as step_lib
from cookie_jax.config import ConfigError, validate_config
from cookie_jax.data.defaults import eval_data_config


class NonFiniteError(RuntimeError):
  """Training produced a NaN or Inf loss or gradient."""


class PreemptedError(RuntimeError):
  """Not an error of the run: it was asked to stop (SIGTERM) and saved its state."""


def _check_workdir(workdir: str) -> None:
  if '://' in workdir:
    return  # Remote (gs://...) paths are checked by orbax and tfds when first written.
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: processes of a multi-host run may share the workdir.
    probe = os.path.join(workdir, f'.write_test.{os.getpid()}.{jax.process_index()}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir!r} cannot be written ({e.strerror}); choose a '
                      'directory you can write to.') from None


def _input(config, mesh):
  from cookie_jax.data import pipeline  # TensorFlow loads here, not at import time.
  vocab = pipeline.tokenizer_vocab_size(config.data)
  if vocab > config.model.text.vocab_size:
    raise ConfigError(
        f'config.model.text.vocab_size={config.model.text.vocab_size}: the tokenizer has '
        f'{vocab} tokens; set model.text.vocab_size >= {vocab}.')
  second_view = config.loss.visual.weight > 0 and config.loss.visual.partner == 'augmented'
  train_iter = pipeline.TrainIterator(
      config.data, image_size=config.model.vision.image_size,
      global_batch_size=config.train.batch_size, seed=config.seed, mesh=mesh,
      second_view=second_view)
  if config.data.device_prefetch:
    from cookie_jax.data.prefetch import DevicePrefetcher  # pylint: disable=g-import-not-at-top
    train_iter = DevicePrefetcher(train_iter, config.data.device_prefetch)
  return pipeline, train_iter


def _evaluate(pipeline, config, setup, params, split):
  from cookie_jax import evaluate  # pylint: disable=g-import-not-at-top
  data = pipeline.eval_data(eval_data_config(config.data, config.eval.data), split,
                            image_size=config.model.vision.image_size,
                            batch_size=config.eval.batch_size, mesh=setup.mesh)
  return evaluate.evaluate_retrieval(setup.graphdef, params, data, mesh=setup.mesh,
                                     progress=False)


def _eval_splits(pipeline, config) -> tuple[bool, bool]:
  """(validate, test): off, said once in the log, when the evaluation dataset lacks the
  split; with config.eval.data given, a missing split is an error."""
  wanted = [(config.eval.every > 0, 'val'), (config.eval.test_at_end, 'test')]
  if not any(on for on, _ in wanted):
    return False, False
  data_cfg = eval_data_config(config.data, config.eval.data)
  out = []
  for on, split in wanted:
    if on and not pipeline.has_split(data_cfg, split):
      name = data_cfg[f'{split}_split']
      if config.eval.data:
        raise ConfigError(f'config.eval.data: {data_cfg.builder} has no split {name!r} '
                          f'(config.data.{split}_split); name one it has, or set '
                          f'eval.{"every=0" if split == "val" else "test_at_end=False"}.')
      logging.warning('%s is off: builder %r has no split %r and config.eval.data is {}; '
                      "set config.eval.data to a dataset that has one (e.g. {'builder': "
                      "'karpathy', 'manual_dir': COCO_FOLDER}).",
                      'Validation' if split == 'val' else 'The test at the end',
                      data_cfg.builder, name)
      on = False
    out.append(on)
  return tuple(out)


class _BadRecords:
  """Records replaced since the last log row (train/bad_records), summed on the devices
  so that counting them never waits for the step."""

  def __init__(self):
    self._add = jax.jit(lambda total, rows: total + jnp.sum(rows))
    self._total = None

  def add(self, rows):
    if rows is not None:
      self._total = jnp.sum(rows) if self._total is None else self._add(self._total, rows)

  def take(self):
    total, self._total = self._total, None
    return {} if total is None else {'bad_records': total}


def restore_or_initialise(config, ckpt, state, setup):
  """Resume from this run's latest checkpoint, else initialise from `train.init_from`."""
  abstract = ckpt_lib.abstract_with_shardings(state, setup.state_shardings)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info('Resuming from %s/%d.', ckpt.directory, latest)
    state, data_state, _ = ckpt.restore(latest, abstract)
    return state, data_state
  if config.train.init_from:
    step = None if config.train.init_step < 0 else config.train.init_step
    # A video model's temporal transformer is new on an image-text checkpoint: it keeps
    # its initial values (fallback); any other mismatch is an error.
    params, loaded = ckpt_lib.load_params(config.train.init_from, abstract.params, step,
                                          fallback=state.params)
    logging.info('Initialised parameters from %s (step %d).', config.train.init_from, loaded)
    state = step_lib.with_params(state, params)
  elif config.model.text_init or config.model.image_init:
    from cookie_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
    state = step_lib.with_params(
        state, hf_import.apply_pretrained_towers(config, state.params))
  return state, None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns the final metrics."""
  if config.model.text_init or config.model.image_init:
    from cookie_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
    hf_import.configure_pretrained_towers(config)  # tower sizes from the HF checkpoints
  validate_config(config, num_devices=jax.device_count())
  _check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  logging.info('Mesh: %s', dict(mesh.shape))
  pipeline, train_iter = _input(config, mesh)
  validate, test = _eval_splits(pipeline, config)

  state, setup = step_lib.create_train_state(config, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  state, data_state = restore_or_initialise(config, ckpt, state, setup)
  step = int(state.step)
  if data_state is not None:
    train_iter.set_state(data_state)
  logging.info('Objectives: %s', objectives.config_summary(config.loss))
  train_step = step_lib.make_train_step(config, setup, objectives.mine_constants(config))

  total = config.train.steps
  writer = metrics_lib.MetricWriter(workdir, total, start_step=step,
                                    progress=config.train.progress_bar)
  ckpt.install_sigterm_handler()
  last_saved = ckpt.latest_step()

  # Model FLOPs per step, for train/tflops_per_device and train/mfu (flops.py).
  flops_per_step = flops_lib.train_step_flops(config)['total']
  peak = flops_lib.peak_flops_per_device(config.model.dtype,
                                         override=config.train.peak_flops)

  def guard(metrics=None):
    bad = int(state.nonfinite_step) if metrics is None else int(metrics['nonfinite_step'])
    if bad >= 0:
      shown = '' if metrics is None else ' (' + ', '.join(
          f'{k}={float(v):.4g}' for k, v in metrics.items() if k.startswith(('loss', 'grad'))
      ) + ')'
      where = (f'{ckpt.directory}/{last_saved}' if last_saved is not None
               else 'none (no checkpoint was saved before it)')
      raise NonFiniteError(
          f'The loss or gradient became NaN/Inf at step {bad}{shown}. Training stopped and '
          f'nothing from step {bad} on was saved. Last good checkpoint: {where}. Lower '
          'optim.lr, keep optim.clip_norm on, or check the input data, then resume.')

  def save(step, metrics=None, force=False):
    nonlocal last_saved
    flush()
    guard()
    if ckpt.save(step, state, train_iter.get_state(), config, metrics=metrics, force=force):
      last_saved = step

  result, logged = {}, {}
  bad = _BadRecords()
  # The device metrics of the last logging step, fetched by `flush` once the step after
  # it is queued on the devices, so that fetching them never leaves the devices idle.
  pending = None
  tick, tick_step = time.perf_counter(), step

  def flush():
    nonlocal pending, tick, tick_step, logged
    if pending is None:
      return
    log_step, metrics = pending
    pending = None
    metrics = jax.device_get(metrics)  # waits for `log_step` only
    guard(metrics)
    del metrics['nonfinite_step']
    now = time.perf_counter()
    steps_per_sec = (log_step - tick_step) / (now - tick)
    tick, tick_step = now, log_step
    metrics['pairs_per_sec'] = steps_per_sec * config.train.batch_size
    metrics.update(flops_lib.utilisation(flops_per_step, steps_per_sec, jax.device_count(),
                                         peak))
    writer.write(log_step, metrics, prefix='train/')
    writer.progress(log_step, metrics)
    logged = {k: float(v) for k, v in metrics.items()}

  try:
    while step < total:
      batch = next(train_iter)
      bad.add(batch.pop('bad_records', None))
      state, metrics = train_step(state, batch)
      step += 1
      flush()
      if step % config.train.log_every == 0 or step == total:
        metrics = {**metrics, **bad.take()}
        for value in metrics.values():
          value.copy_to_host_async()
        pending = (step, metrics)
      val = None
      if validate and step % config.eval.every == 0:
        flush()
        val = _evaluate(pipeline, config, setup, state.params, config.data.val_split)
        writer.write(step, val, prefix='val/')
        logging.info('Validation at step %d: RSUM %.2f', step, val['rsum'])
        tick = time.perf_counter()  # evaluation time is not training throughput
      if val is not None or ckpt.should_save(step):
        save(step, metrics={'rsum': val['rsum']} if val is not None else None)
      if ckpt.preempted(step):
        save(step, force=True)
        ckpt.wait()
        raise PreemptedError(f'Preempted at step {step}; checkpoint saved in '
                             f'{ckpt.directory}. Re-run the same command to resume.')
    save(step, force=True)
    ckpt.wait()
    if test:
      result = _evaluate(pipeline, config, setup, state.params, config.data.test_split)
      result['step'] = step
      writer.write(step, result, prefix='test/')
      metrics_lib.write_json(os.path.join(workdir, 'test_retrieval.json'), result)
      logging.info('Test retrieval at step %d: %s', step,
                   ', '.join(f'{k}={v:.2f}' for k, v in result.items()))
  finally:
    if hasattr(train_iter, 'close'):
      train_iter.close()
    writer.close()
    ckpt.restore_sigterm_handler()
    ckpt.close()
  return {'step': step, 'train': logged, 'test': result}
