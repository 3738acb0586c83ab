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

Every file goes through `cookie_jax.files`, so a `gs://` workdir keeps all of them: the
files the loop appends to or rewrites are uploaded by `files.RunFiles`, before each
checkpoint save and at the end at least.
"""

import os
import signal
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import compiled_step
from cookie_jax import files
from cookie_jax import flops as flops_lib
from cookie_jax import goodput as goodput_lib
from cookie_jax import metric_writer
from cookie_jax import objectives
from cookie_jax import profiler as profiler_lib
from cookie_jax import sharding, step as step_lib
from cookie_jax.config import validate_config
from cookie_jax.errors import ConfigError, NonFiniteError, PreemptedError  # pylint: disable=unused-import
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.defaults import eval_data_config

TEST_RESULTS = 'test_retrieval.json'


def _stopped(step: int, ckpt) -> PreemptedError:
  where = f'{ckpt.directory}/{step}'
  if ckpt.stop_signal == signal.SIGINT:
    return PreemptedError(f'Interrupted (Ctrl-C) at step {step}; saved {where}. Re-run the '
                          'same command to resume.', exit_code=130)
  return PreemptedError(f'Preempted at step {step}; checkpoint saved in {ckpt.directory}. '
                        'Re-run the same command to resume.')


def _check_workdir(workdir: str) -> None:
  """Writes and removes a probe file, so that a workdir (local or gs://) that cannot be
  written fails now, in one line, not at the first save."""
  try:
    files.makedirs(workdir)
    # One probe per process: processes of a multi-host run may share the workdir.
    probe = files.join(workdir, f'.write_test.{os.getpid()}.{jax.process_index()}')
    files.write_text(probe, 'ok')
    files.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir!r} cannot be written ({e.strerror or e}); '
                      'choose a directory you can write to.') from None


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


def _loss_constants(config):
  """The tables some objectives need, mined from the training captions here (the data
  room reads the files) and handed to the step; None when no option needs them."""
  if not objectives.needs_constants(config.loss):
    return None
  from cookie_jax.data import concepts  # pylint: disable=g-import-not-at-top  # TF here
  return objectives.loss_constants(config.loss, concepts.mine_tables(config.data,
                                                                     config.loss))


class _AnnounceCompile:
  """The first call compiles the step (tens of seconds on a CPU): say so, and how long."""

  def __init__(self, train_step):
    self._train_step, self._first = train_step, True

  def __call__(self, state, batch):
    if not self._first:
      return self._train_step(state, batch)
    self._first = False
    logging.info('compiling the train step...')
    start = time.perf_counter()
    out = self._train_step(state, batch)  # returns once compiled and dispatched
    logging.info('compiled the train step in %.1f s', time.perf_counter() - start)
    return out


def _eval_data(pipeline, config, setup, split):
  return pipeline.eval_data(eval_data_config(config.data, config.eval.data), split,
                            image_size=config.model.vision.image_size,
                            batch_size=config.eval.batch_size, mesh=setup.mesh)


def _evaluate(pipeline, config, setup, params, split, data=None):
  from cookie_jax.eval import protocol  # pylint: disable=g-import-not-at-top
  data = data or _eval_data(pipeline, config, setup, split)
  return protocol.evaluate_retrieval(setup.graphdef, params, data, mesh=setup.mesh,
                                     progress=False)


def _test_summary(data, result, workdir) -> str:
  """The test figures beside chance and the split's ceiling, and where to look next."""
  from cookie_jax.eval import ceiling, run  # pylint: disable=g-import-not-at-top
  pictures = run.output_paths(workdir, 'test', result['step'])
  return ceiling.summary(
      result, ceiling.chance_of(data), ceiling.retrieval_ceiling_of(data),
      split=data.split, files=[
          ('figures', files.join(workdir, TEST_RESULTS)),
          ('pictures', f'run python launch/eval.py --workdir={workdir} to draw them: '
                       f"{pictures['examples']}, {pictures['recall']}")])


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
  """Resume from this run's latest checkpoint, else initialise from `train.init_from`.

  `state` is the initial state, or, when a checkpoint exists, only its abstract shape (so
  that a resume never holds two states)."""
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


def restored_state(config: ml_collections.ConfigDict, workdir: str):
  """(train state, data state) of the latest checkpoint in `workdir`, restored onto
  `config`'s mesh and fetched to host memory: a finished or interrupted run, for a
  notebook or a test to inspect. Allocates no initial parameters."""
  _, abstract, setup = step_lib.train_state_setup(config, sharding.make_mesh(config.mesh))
  restored, data_state, _ = ckpt_lib.restore_latest(
      workdir, ckpt_lib.abstract_with_shardings(abstract, setup.state_shardings),
      config.checkpoint)
  return jax.device_get(restored), data_state


def _wandb_mirror(config, workdir, run_files):
  if not config.train.wandb_project:
    return None
  from cookie_jax import wandb_log  # pylint: disable=g-import-not-at-top
  return wandb_log.WandbMirror(workdir, config, run_files)


def check_finite(nonfinite_step: int, last_good: str, metrics=None) -> None:
  """Raises NonFiniteError if the step's guard recorded a non-finite step (>= 0).

  `last_good` names the last checkpoint saved before it; `metrics`, the fetched metrics
  of the step that found it, are quoted.
  """
  if nonfinite_step < 0:
    return
  shown = '' if metrics is None else ' (' + ', '.join(
      f'{k}={float(v):.4g}' for k, v in metrics.items() if k.startswith(('loss', 'grad'))
  ) + ')'
  raise NonFiniteError(
      f'The loss or gradient became NaN/Inf at step {nonfinite_step}{shown}. Training '
      f'stopped and nothing from step {nonfinite_step} on was saved. Last good checkpoint: '
      f'{last_good}. Lower optim.lr, keep optim.clip_norm on, or check the input data, '
      'then resume.')


class _Loop:
  """What the loop carries from step to step (the train state, the metrics awaiting
  their fetch, the last saved step), and what it does between steps: log, validate,
  save, stop."""

  def __init__(self, config, workdir, *, clock, ckpt, pipeline, train_iter, setup, state,
               mirror, run_files):
    self.config, self.workdir, self.clock, self.ckpt = config, workdir, clock, ckpt
    self.pipeline, self.train_iter, self.setup = pipeline, train_iter, setup
    self.state, self.step = state, int(state.step)
    self.files = run_files
    self.record = goodput_lib.GoodputRecord(workdir, clock, start_step=self.step,
                                            run_files=run_files)
    self.writer = metric_writer.MetricWriter(workdir, config.train.steps,
                                             start_step=self.step,
                                             progress=config.train.progress_bar,
                                             mirror=mirror, run_files=run_files)
    self.profiler = profiler_lib.StepProfiler(config.train.profile_steps, workdir)
    ckpt.install_stop_handlers(self.step)
    self.last_saved = ckpt.latest_step()
    # Model FLOPs per step, for train/tflops_per_device and train/mfu (flops.py).
    self.flops_per_step = flops_lib.train_step_flops(config)['total']
    self.peak = flops_lib.peak_flops_per_device(config.model.dtype,
                                                override=config.train.peak_flops)
    self.fetch = metric_writer.DelayedFetch(self.step)
    self.bad = _BadRecords()
    self.logged, self.result, self.summary = {}, {}, ''
    self.val_data = None  # read and tokenised at the first validation, then reused

  def run(self, train_step, validate: bool, test: bool) -> dict:
    # The first batch waits for the pipeline to start (start-up); the first call of the
    # step traces and compiles it.
    input_bucket, step_bucket = 'startup', 'compile'
    self.clock.switch('step')
    try:
      while self.step < self.config.train.steps:
        self.profiler.before(self.step + 1)
        batch = self.clock.call(input_bucket, next, self.train_iter)
        self.bad.add(batch.pop('bad_records', None))
        self.state, metrics = self.clock.call(step_bucket, train_step, self.state, batch)
        input_bucket, step_bucket = 'input_wait', 'step'
        self.step += 1
        self._after_step(metrics, validate)
      self._finish(test)
    finally:
      self._close()
    if self.summary:  # last, so that it is what the console ends with
      logging.info('%s', self.summary)
    return {'step': self.step, 'train': self.logged, 'test': self.result}

  def _after_step(self, metrics, validate: bool) -> None:
    step, cfg = self.step, self.config
    self.profiler.after(step, self.state)
    self._flush()
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      self.fetch.hold(step, {**metrics, **self.bad.take()})
    val = None
    if validate and step % cfg.eval.every == 0:
      val = self._validate()
    if val is not None or self.ckpt.should_save(step):
      self._save(metrics={'rsum': val['rsum']} if val is not None else None)
    if self.ckpt.preempted(step):
      self._save(force=True)
      self.clock.call('checkpoint', self.ckpt.wait)
      raise _stopped(step, self.ckpt)

  def _last_good(self) -> str:
    return (f'{self.ckpt.directory}/{self.last_saved}' if self.last_saved is not None
            else 'none (no checkpoint was saved before it)')

  def _flush(self) -> None:
    """Logs the held metrics of the last logging step, if any."""
    fetched = self.fetch.fetch()
    if fetched is None:
      return
    log_step, metrics = fetched
    check_finite(int(metrics['nonfinite_step']), self._last_good(), metrics)
    del metrics['nonfinite_step']
    steps_per_sec = self.fetch.steps_per_sec(log_step)
    metrics['pairs_per_sec'] = steps_per_sec * self.config.train.batch_size
    metrics.update(flops_lib.utilisation(self.flops_per_step, steps_per_sec,
                                         jax.device_count(), self.peak))
    self.record.advance(log_step)
    self.writer.write(log_step, {**{f'train/{k}': v for k, v in metrics.items()},
                                 **self.record.metrics()})
    self.record.write()
    self.files.sync()  # a remote workdir: uploads when due (files.RunFiles)
    self.writer.progress(log_step, metrics)
    self.logged = {k: float(v) for k, v in metrics.items()}

  def _save(self, metrics=None, force: bool = False) -> None:
    self._flush()
    # The records up to this step reach a remote workdir before its checkpoint does.
    self.clock.call('checkpoint', self.files.sync, force=True)
    check_finite(int(self.state.nonfinite_step), self._last_good())
    if self.clock.call('checkpoint', self.ckpt.save, self.step, self.state,
                       self.train_iter.get_state(), self.config, metrics=metrics,
                       force=force):
      self.last_saved = self.step

  def _evaluate(self, split: str, data=None) -> dict:
    return self.clock.call('eval', _evaluate, self.pipeline, self.config, self.setup,
                           self.state.params, split, data)

  def _validate(self) -> dict:
    self._flush()
    split = self.config.data.val_split
    if self.val_data is None:
      self.val_data = self.clock.call('eval', _eval_data, self.pipeline, self.config,
                                      self.setup, split)
    val = self._evaluate(split, self.val_data)
    self.writer.write(self.step, val, prefix='val/')
    logging.info('Validation at step %d: RSUM %.2f', self.step, val['rsum'])
    self.fetch.restart_clock()  # evaluation time is not training throughput
    return val

  def _finish(self, test: bool) -> None:
    self._save(force=True)
    self.clock.call('checkpoint', self.ckpt.wait)
    if self.ckpt.preempted(self.step):  # asked to stop in the last step: no test
      raise _stopped(self.step, self.ckpt)
    if not test:
      return
    split = self.config.data.test_split
    data = self.clock.call('eval', _eval_data, self.pipeline, self.config, self.setup, split)
    self.result = self._evaluate(split, data)
    self.result['step'] = self.step
    self.writer.write(self.step, self.result, prefix='test/')
    metric_writer.write_json(files.join(self.workdir, TEST_RESULTS), self.result)
    logging.info('Test retrieval at step %d: %s', self.step,
                 ', '.join(f'{k}={v:.2f}' for k, v in self.result.items()))
    self.summary = _test_summary(data, self.result, self.workdir)

  def _close(self) -> None:
    self.profiler.close()
    if hasattr(self.train_iter, 'close'):
      self.train_iter.close()
    self.ckpt.restore_stop_handlers()
    self.clock.call('checkpoint', self.ckpt.close)
    self.record.advance(self.step)
    summary = self.record.write()
    self.writer.write(self.step, self.record.metrics())
    self.writer.close()
    logging.info('%s', goodput_lib.GoodputRecord.line(summary))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns the final metrics."""
  clock = goodput_lib.Clock('startup')
  if config.model.text_init or config.model.image_init:
    from cookie_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
    hf_import.configure_pretrained_towers(config)  # tower sizes from the HF checkpoints
  validate_config(config, num_devices=jax.device_count())
  _check_workdir(workdir)
  # The files the loop appends to or rewrites; a gs:// workdir gets them on close too.
  run_files = files.RunFiles(workdir, writer=jax.process_index() == 0)
  try:
    return _train(config, workdir, clock, run_files)
  finally:
    run_files.close()


def _train(config, workdir: str, clock, run_files) -> dict:
  """`train_and_evaluate` from the mesh on: input, model, restore, loop."""
  mirror = _wandb_mirror(config, workdir, run_files)  # first: a missing package fails fast
  mesh = sharding.make_mesh(config.mesh)
  logging.info('Mesh: %s', dict(mesh.shape))
  # A saved step (train.compiled) is checked first: one that is not this run's program
  # fails before any data is read.
  loaded = (clock.call('compile', compiled_step.load_train_step, config.train.compiled,
                       config, mesh) if config.train.compiled else None)
  pipeline, train_iter = _input(config, mesh)
  validate, test = _eval_splits(pipeline, config)

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), config.checkpoint)
  tok_lib.keep_run_tokenizer(workdir, pipeline.load_tokenizer(config.data),
                             resuming=ckpt.latest_step() is not None,
                             init_from=config.train.init_from, write=jax.process_index() == 0)
  if ckpt.latest_step() is None:
    state, setup = step_lib.create_train_state(config, mesh)
  else:  # restored straight into the abstract state: no initial state is made
    _, state, setup = step_lib.train_state_setup(config, mesh)
  if config.train.freeze:
    from cookie_jax import freeze as freeze_lib  # pylint: disable=g-import-not-at-top
    logging.info('%s', freeze_lib.summary(state.params, config.train.freeze))
  state, data_state = clock.call('restore', restore_or_initialise, config, ckpt, state,
                                 setup)
  if data_state is not None:
    train_iter.set_state(data_state)
  logging.info('Objectives: %s', objectives.config_summary(config.loss))
  train_step = loaded or _AnnounceCompile(
      step_lib.make_train_step(config, setup, _loss_constants(config)))
  loop = _Loop(config, workdir, clock=clock, ckpt=ckpt, pipeline=pipeline,
               train_iter=train_iter, setup=setup, state=state, mirror=mirror,
               run_files=run_files)
  return loop.run(train_step, validate, test)
