"""Where training metrics go: a console progress line, `metrics.jsonl` and TensorBoard
(and W&B through a mirror, see cookie_jax/wandb_log.py).

Only process 0 writes. TensorBoard event files are written with tensorboard's own event
writer, which needs no TensorFlow.

Each step is recorded once, also across a crash: a run that starts at step R (the
checkpoint it restored, 0 for a fresh start) first drops what metrics.jsonl holds past R,
the records of steps it is about to redo, and marks a restart at R + 1 in TensorBoard
(a `SessionLog.START` event, after which TensorBoard discards older events from step
R + 1 on).

The files go through `files.RunFiles`: in a local workdir they are appended in place; in
a `gs://` one, which cannot append, they are kept locally and uploaded whole by its
`sync` (see there for when, and why no record that a checkpoint covers is ever lost).
"""

import json
import math
import sys
import time
from typing import Mapping

from absl import logging
import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
import tqdm

from cookie_jax import files

METRICS, TENSORBOARD = 'metrics.jsonl', 'tensorboard'


class _AboveTheBar:
  """Log lines written above a tqdm progress bar (`tqdm.write`), not through it."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    if text.strip():
      tqdm.tqdm.write(text.rstrip('\n'), file=self.stream)

  def flush(self) -> None:
    self.stream.flush()


def _logs_above_bar(enable: bool) -> None:
  """While a bar is shown, absl's console lines (ours and the libraries') go above it."""
  handler = logging.get_absl_handler().python_handler
  if enable and handler.stream is sys.stderr:
    handler.stream = _AboveTheBar(sys.stderr)
  elif not enable and isinstance(handler.stream, _AboveTheBar):
    handler.stream = handler.stream.stream


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

  `run_files` (a `files.RunFiles` of `workdir`) is shared with the other files the loop
  keeps, and its owner syncs and closes it; without one the writer keeps its own, which
  `close` uploads to a remote workdir.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               progress: bool = True, mirror=None, run_files: files.RunFiles | None = None):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._bar = None
    self._mirror = mirror
    if not self.enabled:
      return
    self._own_files = run_files is None
    self._files = run_files or files.RunFiles(workdir)
    drop_records_after(self._files.fetch(METRICS), start_step)
    self._jsonl = self._files.open(METRICS, 'a')
    self._tb = EventFileWriter(self._files.local(TENSORBOARD))
    self._tb.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(start_step) + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                            dynamic_ncols=True, mininterval=1.0)
      _logs_above_bar(True)

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = '') -> None:
    if not self.enabled:
      return
    values = {f'{prefix}{k}': _scalar(v) for k, v in metrics.items()}
    record = {'step': int(step), 'time': time.time()}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary))
    self._tb.flush()
    if self._mirror is not None:
      self._mirror.log(step, values)
    if not self._bar:
      logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in values.items()))

  def progress(self, step: int, metrics: Mapping[str, float]) -> None:
    """Moves the progress bar to `step` and shows the headline numbers."""
    if not self.enabled or self._bar is None:
      return
    keys = ('loss', 'loss/cross_modal', 'loss/visual', 'loss/textual', 'pairs_per_sec',
            'learning_rate')
    shown = {k.replace('loss/', ''): f'{_scalar(metrics[k]):.4g}' for k in keys
             if k in metrics}
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      _logs_above_bar(False)
    self._jsonl.close()
    self._tb.close()
    if self._mirror is not None:
      self._mirror.close()
    if self._own_files:
      self._files.close()


class DelayedFetch:
  """The device metrics of the last logging step, held until the step after it is queued
  on the devices and only then fetched, so that fetching them never leaves the devices
  idle; and the throughput clock between two fetches."""

  def __init__(self, start_step: int):
    self._pending = None
    self._tick, self._tick_step = time.perf_counter(), start_step

  def hold(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    for value in metrics.values():
      value.copy_to_host_async()
    self._pending = (step, metrics)

  def fetch(self) -> tuple[int, dict] | None:
    """(step, metrics on the host) of what `hold` kept, or None; waits for that step
    only."""
    if self._pending is None:
      return None
    step, metrics = self._pending
    self._pending = None
    return step, jax.device_get(metrics)

  def steps_per_sec(self, step: int) -> float:
    """Steps per second since the previous call (or the start, or `restart_clock`)."""
    now = time.perf_counter()
    rate = (step - self._tick_step) / (now - self._tick)
    self._tick, self._tick_step = now, step
    return rate

  def restart_clock(self) -> None:
    """After an evaluation: its time is not training throughput."""
    self._tick = time.perf_counter()


def drop_records_after(path: str, step: int) -> int:
  """Rewrites the metrics.jsonl at `path` (local or gs://) without the records a run
  starting at `step` will write again: those past `step`, and at `step` the test results
  and the closing `time/*` record (a run writes them after its last save, so a restart
  writes them again). A line cut short by a crash is dropped too.
  Returns the number of records dropped."""
  if not files.exists(path):
    return 0
  kept, dropped = [], 0
  for line in files.read_text(path).split('\n'):
    if not line:
      continue
    try:
      record = json.loads(line)
      redo = record['step'] > step or (
          record['step'] == step and all(k.startswith(('test/', 'time/'))
                                         for k in record if k not in ('step', 'time')))
    except (ValueError, KeyError, TypeError):
      redo = True
    if redo:
      dropped += 1
    else:
      kept.append(line + '\n')
  if dropped:
    files.write_text(path, ''.join(kept))
    logging.info('%s: dropped %d records past step %d, which this run redoes.', path,
                 dropped, step)
  return dropped


def write_json(path: str, payload: Mapping) -> None:
  """`payload` as the JSON file `path` (local or gs://), written whole; process 0 only."""
  if jax.process_index() != 0:
    return
  files.write_text(path, json.dumps(payload, indent=2, sort_keys=True))
