"""Device prefetch: same batches in the same order, and the loop's position, not the
thread's, is what a checkpoint saves."""

import threading
import time

import pytest

from cookie_jax.data.prefetch import DevicePrefetcher


class Counter:
  """Batch k is k; the state is the index of the next batch, like TrainIterator's."""

  def __init__(self, fail_at=None, delay=0.0):
    self.step, self.fail_at, self.delay, self.threads = 0, fail_at, delay, set()

  def __next__(self):
    self.threads.add(threading.current_thread().name)
    time.sleep(self.delay)
    if self.step == self.fail_at:
      raise ValueError(f'bad record at {self.step}')
    self.step += 1
    return self.step - 1

  def get_state(self):
    return {'step': self.step}

  def set_state(self, state):
    self.step = state['step']


def test_same_batches_and_the_loops_position():
  it = Counter()
  pf = DevicePrefetcher(it, size=3)
  assert [next(pf) for _ in range(5)] == [0, 1, 2, 3, 4]
  time.sleep(0.2)  # the thread fills its queue
  # 3 queued, and one made that waits for room.
  assert it.step == 9 and pf.get_state() == {'step': 5}
  assert it.threads == {'device_prefetch'}
  # Resume where the loop was: the batches made ahead are dropped, none is skipped.
  pf.set_state(pf.get_state())
  assert [next(pf) for _ in range(3)] == [5, 6, 7]
  pf.set_state({'step': 2})
  assert next(pf) == 2 and pf.get_state() == {'step': 3}
  pf.close()
  assert next(pf) == 3  # a new thread starts at the loop's position
  pf.close()


def test_errors_reach_the_loop_in_order():
  pf = DevicePrefetcher(Counter(fail_at=2), size=2)
  assert [next(pf), next(pf)] == [0, 1]
  with pytest.raises(ValueError, match='bad record at 2'):
    next(pf)
  assert pf.get_state() == {'step': 2}


def test_close_does_not_hang_on_a_full_queue():
  pf = DevicePrefetcher(Counter(delay=0.01), size=1)
  next(pf)
  time.sleep(0.1)
  t0 = time.perf_counter()
  pf.close()
  assert time.perf_counter() - t0 < 2.0
  with pytest.raises(ValueError, match='size=0'):
    DevicePrefetcher(Counter(), size=0)
