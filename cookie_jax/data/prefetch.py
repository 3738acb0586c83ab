"""Device prefetch: the next global batches are built and put on the devices by a
background thread while the current step runs.

`TrainIterator.__next__` runs the host side of the input (the tf.data iterator's next
batch, then `jax.make_array_from_process_local_data`, which copies it to the devices). In
the loop's thread that time adds to every step unless the host is far ahead; here a
thread keeps up to `size` batches ready, so the loop only takes one from a queue.

The data position stays exact: `get_state()` is the position after the last batch the
*loop* took, not after the last one the thread made, so a checkpoint resumes with the
first batch that was never trained on. Imports neither TensorFlow nor JAX.
"""

import queue
import threading

_DONE = object()


class DevicePrefetcher:
  """Wraps an iterator with `get_state()` / `set_state()`; same batches, same order."""

  def __init__(self, iterator, size: int = 2):
    if size < 1:
      raise ValueError(f'DevicePrefetcher size={size}: use >= 1 (or no prefetcher).')
    self.iterator = iterator
    self.size = size
    self._state = iterator.get_state()
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._thread: threading.Thread | None = None

  def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        item = (next(self.iterator), self.iterator.get_state())
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      # Handed to the loop's thread, which raises it at its next `next()`.
      q.put((_DONE, e))

  def _start(self) -> None:
    if self.iterator.get_state() != self._state:  # after close(): back to our position
      self.iterator.set_state(self._state)
    self._queue = queue.Queue(maxsize=self.size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                    name='device_prefetch', daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      self._start()
    batch, state = self._queue.get()
    if batch is _DONE:
      self.close()
      raise state
    self._state = state
    return batch

  def get_state(self) -> dict:
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    """Moves to `state`; batches made ahead of it are dropped."""
    self.close()
    self.iterator.set_state(state)
    self._state = self.iterator.get_state()

  def close(self) -> None:
    """Stops the thread; a later `next()` starts a new one at `get_state()`."""
    if self._thread is None:
      return
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=60)
    self._thread = self._queue = self._stop = None
