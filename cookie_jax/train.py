"""`train_and_evaluate(config, workdir)`: mesh, input, model and optimiser, shard, restore,
loop, evaluate, save.

The loop keeps the host ahead of the devices, so that they never wait for it:

* the metrics of a logging step are fetched only after the next step has been
  dispatched, while the devices run it (and the non-finite guard reads them there);
* a background thread builds the next global batches and puts them on the devices
  (`data.device_prefetch`);
* only a save reads the state itself.

Where the wall time goes (start-up, restore, compile, input wait, device step, checkpoint,
evaluation) is kept by a `goodput.Clock` that only reads the host's clock, logged as
`time/*` and written to WORKDIR/goodput.json (cookie_jax/goodput.py).
"""

import os
import signal
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import flops as flops_lib
from cookie_jax import goodput as goodput_lib
from cookie_jax import metrics as metrics_lib
from cookie_jax import objectives
from cookie_jax import profiler as profiler_lib
from cookie_jax import sharding, step as step_lib
from cookie_jax.config import ConfigError, validate_config
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.defaults import eval_data_config


class NonFiniteError(RuntimeError):
  """Training produced a NaN or Inf loss or gradient."""


class PreemptedError(RuntimeError):
  """Not an error of the run: it was asked to stop (SIGTERM, Ctrl-C) and saved its state.

  `exit_code` is what the launcher exits with: 0 for SIGTERM or a preemption notice (the
  scheduler's request, done), 130 for Ctrl-C (the shell's code for an interrupt).
  """

  def __init__(self, message: str, exit_code: int = 0):
    super().__init__(message)
    self.exit_code = exit_code


def _stopped(step: int, ckpt) -> PreemptedError:
  where = f'{ckpt.directory}/{step}'
  if ckpt.stop_signal == signal.SIGINT:
    return PreemptedError(f'Interrupted (Ctrl-C) at step {step}; saved {where}. Re-run the '
                          'same command to resume.', exit_code=130)
  return PreemptedError(f'Preempted at step {step}; checkpoint saved in {ckpt.directory}. '
                        'Re-run the same command to resume.')


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


def _announce_compile(train_step):
  """The first call compiles the step (tens of seconds on a CPU): say so, and how long."""
  first = True

  def call(state, batch):
    nonlocal first
    if not first:
      return train_step(state, batch)
    first = False
    logging.info('compiling the train step...')
    start = time.perf_counter()
    out = train_step(state, batch)  # returns once compiled and dispatched
    logging.info('compiled the train step in %.1f s', time.perf_counter() - start)
    return out
  return call


def _eval_data(pipeline, config, setup, split):
  return pipeline.eval_data(eval_data_config(config.data, config.eval.data), split,
                            image_size=config.model.vision.image_size,
                            batch_size=config.eval.batch_size, mesh=setup.mesh)


def _evaluate(pipeline, config, setup, params, split, data=None):
  from cookie_jax import evaluate  # pylint: disable=g-import-not-at-top
  data = data or _eval_data(pipeline, config, setup, split)
  return evaluate.evaluate_retrieval(setup.graphdef, params, data, mesh=setup.mesh,
                                     progress=False)


def _test_summary(data, result, workdir) -> str:
  """The test figures beside chance and the split's ceiling, and where to look next."""
  from cookie_jax import evaluate_run  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import ceiling  # pylint: disable=g-import-not-at-top
  pictures = evaluate_run.output_paths(workdir, 'test', result['step'])
  return ceiling.summary(
      result, ceiling.chance_of(data), ceiling.retrieval_ceiling_of(data),
      split=data.split, files=[
          ('figures', os.path.join(workdir, 'test_retrieval.json')),
          ('pictures (python launch/eval.py --workdir=' + workdir + ')',
           pictures['examples'] + ', ' + pictures['recall'])])


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
    logging.info('resuming from %s/%d', ckpt.directory, latest)
    state, data_state, _ = ckpt.restore(latest, abstract)
    return state, data_state
  logging.info('no checkpoint in %s: starting at step 0', ckpt.directory)
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


def _wandb_mirror(config, workdir):
  if not config.train.wandb_project:
    return None
  from cookie_jax import wandb_log  # pylint: disable=g-import-not-at-top
  return wandb_log.WandbMirror(workdir, config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns the final metrics."""
  clock = goodput_lib.Clock('startup')
  if config.model.text_init or config.model.image_init:
    from cookie_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
    hf_import.configure_pretrained_towers(config)  # tower sizes from the HF checkpoints
  validate_config(config, num_devices=jax.device_count())
  _check_workdir(workdir)
  mirror = _wandb_mirror(config, workdir)  # first, so that a missing package fails fast
  mesh = sharding.make_mesh(config.mesh)
  logging.info('Mesh: %s', dict(mesh.shape))
  pipeline, train_iter = _input(config, mesh)
  validate, test = _eval_splits(pipeline, config)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  tok_lib.keep_run_tokenizer(workdir, pipeline.load_tokenizer(config.data),
                             resuming=ckpt.latest_step() is not None,
                             init_from=config.train.init_from, write=jax.process_index() == 0)
  state, setup = step_lib.create_train_state(config, mesh)
  state, data_state = clock.call('restore', restore_or_initialise, config, ckpt, state,
                                 setup)
  step = int(state.step)
  if data_state is not None:
    train_iter.set_state(data_state)
  logging.info('Objectives: %s', objectives.config_summary(config.loss))
  train_step = _announce_compile(
      step_lib.make_train_step(config, setup, objectives.mine_constants(config)))

  total = config.train.steps
  record = goodput_lib.GoodputRecord(workdir, clock, start_step=step)
  writer = metrics_lib.MetricWriter(workdir, total, start_step=step,
                                    progress=config.train.progress_bar,
                                    mirror=mirror)
  profiler = profiler_lib.StepProfiler(config.train.profile_steps, workdir)
  ckpt.install_stop_handlers()
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
    if clock.call('checkpoint', ckpt.save, step, state, train_iter.get_state(), config,
                  metrics=metrics, force=force):
      last_saved = step

  result, logged, summary_text = {}, {}, ''
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
    record.advance(log_step)
    writer.write(log_step, {**{f'train/{k}': v for k, v in metrics.items()},
                            **record.metrics()})
    record.write()
    writer.progress(log_step, metrics)
    logged = {k: float(v) for k, v in metrics.items()}

  # The first batch waits for the pipeline to start (start-up); the first call of the
  # step traces and compiles it.
  input_bucket, step_bucket = 'startup', 'compile'
  clock.switch('step')
  try:
    while step < total:
      profiler.before(step + 1)
      batch = clock.call(input_bucket, next, train_iter)
      bad.add(batch.pop('bad_records', None))
      state, metrics = clock.call(step_bucket, train_step, state, batch)
      input_bucket, step_bucket = 'input_wait', 'step'
      step += 1
      profiler.after(step, state)
      flush()
      if step % config.train.log_every == 0 or step == total:
        metrics = {**metrics, **bad.take()}
        for value in metrics.values():
          value.copy_to_host_async()
        pending = (step, metrics)
      val = None
      if validate and step % config.eval.every == 0:
        flush()
        val = clock.call('eval', _evaluate, pipeline, config, setup, state.params,
                         config.data.val_split)
        writer.write(step, val, prefix='val/')
        logging.info('Validation at step %d: RSUM %.2f', step, val['rsum'])
        tick = time.perf_counter()  # evaluation time is not training throughput
      if val is not None or ckpt.should_save(step):
        save(step, metrics={'rsum': val['rsum']} if val is not None else None)
      if ckpt.preempted(step):
        save(step, force=True)
        clock.call('checkpoint', ckpt.wait)
        raise _stopped(step, ckpt)
    save(step, force=True)
    clock.call('checkpoint', ckpt.wait)
    if ckpt.preempted(step):  # asked to stop in the last step: the test waits for a re-run
      raise _stopped(step, ckpt)
    if test:
      test_data = clock.call('eval', _eval_data, pipeline, config, setup,
                             config.data.test_split)
      result = clock.call('eval', _evaluate, pipeline, config, setup, state.params,
                          config.data.test_split, test_data)
      result['step'] = step
      writer.write(step, result, prefix='test/')
      metrics_lib.write_json(os.path.join(workdir, 'test_retrieval.json'), result)
      logging.info('Test retrieval at step %d: %s', step,
                   ', '.join(f'{k}={v:.2f}' for k, v in result.items()))
      summary_text = _test_summary(test_data, result, workdir)
  finally:
    profiler.close()
    if hasattr(train_iter, 'close'):
      train_iter.close()
    ckpt.restore_stop_handlers()
    clock.call('checkpoint', ckpt.close)
    record.advance(step)
    summary = record.write()
    writer.write(step, record.metrics())
    writer.close()
    logging.info('%s', goodput_lib.GoodputRecord.line(summary))
  if summary_text:  # last, so that it is what the console ends with
    logging.info('%s', summary_text)
  return {'step': step, 'train': logged, 'test': result}
