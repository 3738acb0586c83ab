"""Where training metrics go: a console progress line, `metrics.jsonl` and TensorBoard.

Only process 0 writes. TensorBoard event files are written with tensorboard's own event
writer, which needs no TensorFlow.
"""

import json
import math
import os
import sys
import time
from typing import Mapping

from absl import logging
import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
import tqdm


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
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               progress: bool = True):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self._tb = EventFileWriter(os.path.join(workdir, 'tensorboard'))
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


def write_json(path: str, payload: Mapping) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
