"""Where a run's wall time goes: start-up, restore, compile, input wait, device step,
checkpoint save, evaluation (goodput accounting, as MaxText reports it).

`Clock` attributes every second of the loop's thread to exactly one bucket: it is always
*in* one bucket, and `switch` closes the current one and opens the next, so the buckets
add up to the wall time by construction. It reads `time.perf_counter` only and never
touches the devices, so it adds no synchronisation to the loop:

* `startup` is everything before the loop (mesh, input pipeline, initialisation) and the
  wait for the first batch, while the pipeline starts;
* `input_wait` is the time the loop spends in `next(train_iter)` after that;
* `compile` is the first call of the jitted step (trace, compile, first dispatch);
* `step` is the rest of the loop: dispatching steps and waiting for the devices where the
  loop already waits for them (the one-step-late metric fetch, the state read before a
  save), plus the host's logging;
* `checkpoint` is the blocking part of a save (orbax copies the state to the host, then
  writes in the background) and the final wait for the background write;
* `eval` is validation and the test at the end; `restore` reading the checkpoint.

`GoodputRecord` keeps one segment per start of a run in `WORKDIR/goodput.json`; a resumed
run appends its segment to the same record. A resume from step R after a crash at step
S > R redoes steps R+1..S: the earlier segment is cut back to R, and the device time of
the redone steps (its step time x redone / its steps) is reported as `recomputed`, which
`goodput` (productive step time / wall time) does not count. In a `gs://` workdir the
record is rewritten locally and uploaded with metrics.jsonl (`files.RunFiles`).
"""

import json
import time

from cookie_jax import files, metric_writer

GOODPUT = 'goodput.json'

BUCKETS = ('startup', 'restore', 'compile', 'input_wait', 'step', 'checkpoint', 'eval')


class Clock:
  """Host wall time split into BUCKETS; exactly one bucket is open at a time."""

  def __init__(self, bucket: str = 'startup', start: float | None = None):
    self.seconds = dict.fromkeys(BUCKETS, 0.0)
    self.bucket = bucket
    self.start = time.perf_counter() if start is None else start
    self._since = self.start

  def switch(self, bucket: str) -> str:
    """Closes the open bucket, opens `bucket`; returns the one that was open."""
    now = time.perf_counter()
    self.seconds[self.bucket] += now - self._since
    self._since, previous, self.bucket = now, self.bucket, bucket
    return previous

  def call(self, bucket: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with its time in `bucket`, then back to the open bucket."""
    previous = self.switch(bucket)
    try:
      return fn(*args, **kwargs)
    finally:
      self.switch(previous)

  def totals(self) -> dict[str, float]:
    """Seconds per bucket so far, the open one included."""
    out = dict(self.seconds)
    out[self.bucket] += time.perf_counter() - self._since
    return out


def _ratio(part: float, whole: float) -> float:
  return part / whole if whole > 0 else 0.0


class GoodputRecord:
  """The goodput of a run over all its starts, in `WORKDIR/goodput.json` (process 0).

  `run_files` is the loop's `files.RunFiles`, which uploads the record to a remote
  workdir; without one the record is written straight to `workdir` at every `write`.
  """

  def __init__(self, workdir: str, clock: Clock, start_step: int,
               run_files: files.RunFiles | None = None):
    self.path = (run_files.fetch(GOODPUT) if run_files is not None
                 else files.join(workdir, GOODPUT))
    self.clock = clock
    self.segments = self._earlier_segments(start_step)
    self.current = {'start_step': int(start_step), 'end_step': int(start_step)}

  def _earlier_segments(self, start_step: int) -> list[dict]:
    """Earlier starts of this run, cut back to `start_step` (what the checkpoint holds)."""
    try:
      segments = json.loads(files.read_text(self.path)).get('segments', [])
    except (OSError, ValueError):
      return []
    kept = []
    for seg in segments:
      start, end = seg['start_step'], seg['end_step']
      if end > start_step:
        redone = end - max(start, start_step)
        seg = dict(seg, end_step=max(start, start_step), recomputed=seg.get(
            'recomputed', 0.0) + seg['seconds'].get('step', 0.0) * redone / (end - start))
      kept.append(seg)
    return kept

  def advance(self, step: int) -> None:
    self.current['end_step'] = int(step)

  def summary(self) -> dict:
    """Totals over all segments, this one as of now."""
    now = dict(self.current, seconds=self.clock.totals(), recomputed=0.0)
    now['wall'] = sum(now['seconds'].values())
    segments = self.segments + [now]
    seconds = {b: sum(s['seconds'].get(b, 0.0) for s in segments) for b in BUCKETS}
    wall = sum(s['wall'] for s in segments)
    recomputed = sum(s.get('recomputed', 0.0) for s in segments)
    return {'segments': segments, 'seconds': seconds, 'wall': wall,
            'recomputed': recomputed,
            'goodput': _ratio(seconds['step'] - recomputed, wall),
            'steps': sum(s['end_step'] - s['start_step'] for s in segments)}

  def metrics(self) -> dict[str, float]:
    """`time/*` for metrics.jsonl and TensorBoard: cumulative seconds over all starts."""
    s = self.summary()
    out = {f'time/{b}': v for b, v in s['seconds'].items()}
    out.update({'time/total': s['wall'], 'time/recomputed': s['recomputed'],
                'time/goodput': s['goodput']})
    return out

  def write(self) -> dict:
    s = self.summary()
    metric_writer.write_json(self.path, s)
    return s

  @staticmethod
  def line(s: dict) -> str:
    """The one-line summary printed at the end of a run."""
    wall = s['wall']
    parts = ', '.join(f'{b} {s["seconds"][b]:.1f} s ({_ratio(s["seconds"][b], wall):.0%})'
                      for b in BUCKETS if s['seconds'][b] > 0)
    redone = (f'; {s["recomputed"]:.1f} s of steps redone after a restart'
              if s['recomputed'] > 0 else '')
    starts = len(s['segments'])
    return (f'Goodput {s["goodput"]:.1%} of {wall:.1f} s wall time over {starts} '
            f'start{"s" if starts > 1 else ""}: {parts}{redone}.')
