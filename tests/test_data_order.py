"""The data order (cookie_jax/data/order.py): permutations, mixtures, per-row randomness."""

import numpy as np
import pytest

from cookie_jax.data import defaults, order

N = 10_007  # a prime: no power-of-two structure for the permutation to lean on


def test_every_record_once_per_epoch_and_epochs_differ():
  for seed in (0, 1):
    records = order.record(seed, 0, np.arange(3 * N), N)
    epochs = records.reshape(3, N)
    for e in epochs:
      np.testing.assert_array_equal(np.sort(e), np.arange(N))
    # Epochs are different orders, and far from the identity.
    assert (epochs[0] != epochs[1]).mean() > 0.99 and (epochs[1] != epochs[2]).mean() > 0.99
    assert (epochs[0] == np.arange(N)).mean() < 0.01
  assert (order.record(0, 0, np.arange(N), N) != order.record(1, 0, np.arange(N), N)).mean() > 0.99


def test_global_batches_span_epochs_and_are_a_function_of_the_position():
  batch = 4096  # does not divide N: batch 2 holds the end of epoch 0 and the start of 1
  rows = lambda k: order.record(7, 0, np.arange(k * batch, (k + 1) * batch), N)
  whole = np.concatenate([rows(k) for k in range(5)])
  np.testing.assert_array_equal(np.sort(whole[:N]), np.arange(N))
  np.testing.assert_array_equal(np.sort(whole[N:2 * N]), np.arange(N))
  # Any subset of positions, in any order, gives the same records (no state).
  pick = np.array([20_000, 3, 12_345, 3])
  np.testing.assert_array_equal(order.record(7, 0, pick, N), whole[pick])
  # The permutation of a far epoch costs the same as the first: it is computed directly.
  far = order.record(7, 0, np.arange(10**8 * N, (10**8 + 1) * N), N)  # epoch 10^8
  assert len(set(far.tolist())) == N


@pytest.mark.parametrize('n', [1, 2, 3, 5, 64, 65, 1000])
def test_small_and_power_of_two_sizes_are_permutations(n):
  np.testing.assert_array_equal(np.sort(order.record(3, 2, np.arange(n), n)), np.arange(n))


def test_stand_ins_for_a_bad_record_are_the_next_of_its_epoch():
  visits = np.arange(N)
  first = order.record(0, 0, visits, N)
  nxt = order.record(0, 0, visits, N, attempt=1)
  np.testing.assert_array_equal(nxt[:-1], first[1:])
  assert nxt[-1] == first[0]  # wraps within the epoch


def test_mixture_proportions_over_10000_samples_are_within_1_percent():
  for weights in ([0.5, 0.3, 0.2], [3, 1], [0.05, 0.9, 0.05], [1, 1, 1, 1, 1, 1, 1]):
    for seed in (0, 1):
      mixture = order.Mixture(weights, seed)
      for start in (0, 123_457):  # from step 0 and from anywhere
        parts, _ = mixture.locate(np.arange(start, start + 10_000))
        share = np.bincount(parts, minlength=len(weights)) / 10_000
        np.testing.assert_allclose(share, np.asarray(weights) / np.sum(weights), atol=0.01)


def test_mixture_visits_each_dataset_in_order_without_gaps_or_repeats():
  mixture = order.Mixture([0.6, 0.4], seed=3)
  parts, visits = mixture.locate(np.arange(3 * order.BLOCK))  # whole blocks
  for j, count in enumerate(mixture.counts):
    np.testing.assert_array_equal(np.sort(visits[parts == j]), np.arange(3 * count))
  # A pure function of the position: a later window is what it was in the long run.
  p2, v2 = mixture.locate(np.arange(5000, 6000))
  np.testing.assert_array_equal(p2, parts[5000:6000])
  np.testing.assert_array_equal(v2, visits[5000:6000])
  # Not a fixed pattern: another seed interleaves differently.
  assert (order.Mixture([0.6, 0.4], seed=4).locate(np.arange(1000))[0] != parts[:1000]).any()


def test_one_dataset_is_the_plain_order():
  parts, visits = order.Mixture([2.0], seed=0).locate(np.arange(10))
  assert not parts.any() and visits.tolist() == list(range(10))


@pytest.mark.parametrize('weights, message', [
    ([0, 0], 'sum to a positive number'), ([1, -1], 'sum to a positive number'),
    ([1, float('nan')], 'finite'), (['a', 1], 'not numbers'),
    ([1, 1e-6], r'\[1\]: weight 1e-06 is below')])
def test_bad_weights_name_the_key(weights, message):
  with pytest.raises(ValueError, match=r'config\.data\.mixture.*' + message):
    order.Mixture(weights, 0)
  cfg = defaults.data_config()
  cfg.mixture = tuple(({'synthetic': {'seed': i}}, w) for i, w in enumerate(weights))
  with pytest.raises(ValueError, match=r'config\.data\.mixture'):
    defaults.validate_data_config(cfg)


def test_mixture_entries_are_checked_against_the_data_keys():
  cfg = defaults.data_config()
  cfg.mixture = (({'max_len': 8}, 1.0),)
  with pytest.raises(ValueError, match=r"mixture\[0\]: 'max_len' is not a key it can set; "
                                       r"use one of .*'manual_dir'"):
    defaults.validate_data_config(cfg)
  cfg.mixture = (({'synthetic': {'sede': 1}}, 1.0),)
  with pytest.raises(ValueError, match=r"mixture\[0\]\.synthetic: 'sede'"):
    defaults.validate_data_config(cfg)
  cfg.mixture = (({'builder': 'karpathy'}, 1.0),)
  with pytest.raises(ValueError, match=r'mixture\[0\]: config\.data\.tokenizer'):
    defaults.validate_data_config(cfg)
  cfg.mixture = ((1.0,),)
  with pytest.raises(ValueError, match=r'mixture\[0\]=.*\(overrides, weight\)'):
    defaults.validate_data_config(cfg)
  cfg.mixture = (({'synthetic': {'seed': 1}}, 3), ({}, 1))
  (a, wa), (b, wb) = defaults.mixture_components(cfg)
  assert (a.synthetic.seed, b.synthetic.seed, wa, wb) == (1, 0, 3.0, 1.0)
  assert not a.mixture and cfg.synthetic.seed == 0  # the base section is untouched


def test_row_randomness_is_keyed_on_the_position_only():
  u = order.uniforms(5, np.arange(100), 1, 5)
  assert u.shape == (100, 5) and 0 <= u.min() and u.max() < 1
  np.testing.assert_array_equal(order.uniforms(5, np.arange(40, 60), 1, 5), u[40:60])
  assert not np.array_equal(order.uniforms(5, np.arange(100), 2, 5), u)
  assert not np.array_equal(order.uniforms(6, np.arange(100), 1, 5), u)
  # Uniform enough for crops: each decile holds about a tenth.
  hist = np.histogram(order.uniforms(0, np.arange(20_000), 0, 1), bins=10, range=(0, 1))[0]
  assert hist.min() > 1800 and hist.max() < 2200


@pytest.mark.parametrize('n, group', [(10_000, 2), (N, 2), (N, 3), (5, 4), (1, 2)])
def test_groups_of_consecutive_records_are_drawn_whole_and_every_record_each_epoch(n, group):
  groups = -(-n // group)
  visits = np.arange(3 * groups * group)
  records = order.record(5, 0, visits, n, group=group)
  for epoch in records.reshape(3, groups, group):
    # Each group of k visits reads one group of consecutive records, starting at a
    # multiple of k; a short last group is read round.
    first = epoch[:, 0]
    assert (first % group == 0).all()
    np.testing.assert_array_equal(np.sort(first), np.arange(0, n, group))
    members = np.arange(group)[None, :] % np.minimum(group, n - first)[:, None]
    np.testing.assert_array_equal(epoch, first[:, None] + members)
    assert set(epoch.ravel().tolist()) == set(range(n))
  if groups > 100:  # epochs are other orders of the groups
    assert (records[:groups * group] != records[groups * group:2 * groups * group]).mean() > 0.99


def test_a_stand_in_for_a_grouped_record_is_the_same_member_of_the_next_group():
  visits = np.arange(2 * 500)
  first = order.record(0, 0, visits, 1000, group=2)
  nxt = order.record(0, 0, visits, 1000, attempt=1, group=2)
  np.testing.assert_array_equal(nxt[:-2], first[2:])
  np.testing.assert_array_equal(nxt[-2:], first[:2])  # wraps within the epoch


def test_group_size_is_checked():
  cfg = defaults.data_config()
  cfg.group_size = 0
  with pytest.raises(ValueError, match=r'config.data.group_size=0: must be >= 1'):
    defaults.validate_data_config(cfg)
  cfg = defaults.data_config()
  cfg.group_size = 2
  cfg.mixture = (({}, 1.0), ({'synthetic': {'seed': 1}}, 1.0))
  with pytest.raises(ValueError, match=r'group_size=2: groups of records need one dataset'):
    defaults.validate_data_config(cfg)
