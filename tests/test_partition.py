"""Partitioners against direct counting."""

import math

import numpy as np
import pytest

from fedkd.data import partition
from fedkd.errors import UserError


def _is_exact_cover(parts, n):
  allidx = np.concatenate(parts)
  return len(allidx) == n and set(allidx.tolist()) == set(range(n))


def test_by_site_gives_each_client_one_site():
  sites = np.array([2, 0, 1, 2, 2, 0, 1, 1])
  parts = partition.by_site(sites)
  assert _is_exact_cover(parts, len(sites))
  for k, p in enumerate(parts):
    assert set(sites[p].tolist()) == {k}
  more = partition.by_site(sites, num_clients=6)
  assert _is_exact_cover(more, len(sites))
  assert set(sites[more[4]].tolist()) == {1}
  with pytest.raises(partition.PartitionError, match="at least one client per site"):
    partition.by_site(sites, num_clients=2)


def _by_site_loop(site_of_example, n):
  """The definition, client by client: client k takes every len(share)-th example of site
  sites[k % n_sites], starting at its position among the clients that share that site."""
  sites = sorted(set(site_of_example.tolist()))
  out = []
  for k in range(n):
    share = [c for c in range(n) if c % len(sites) == k % len(sites)]
    idx = [i for i, s in enumerate(site_of_example.tolist()) if s == sites[k % len(sites)]]
    out.append(np.array(idx[share.index(k) :: len(share)], np.int64))
  return out


@pytest.mark.parametrize(
  "n_examples,site_labels,n", [(300, (3, 9, 11, 20, 40, 41, 50), 60), (50, (0, 1, 2), 3), (500, (7, 2, 5, 1, 9), 13)]
)
def test_by_site_equals_the_client_loop(n_examples, site_labels, n):
  sites = np.random.default_rng(n).choice(np.array(site_labels), n_examples)
  got = partition.by_site(sites, n)
  for a, b in zip(got, _by_site_loop(sites, n), strict=True):
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)


def test_by_site_10000_clients():
  """Registered-client scale (10,000 clients over 5 sites): an exact cover, each client within one
  site, sizes within one of each other per site (linear time: the per-client loop is quadratic)."""
  sites = np.random.default_rng(0).integers(0, 5, 40_000)
  parts = partition.by_site(sites, 10_000)
  assert _is_exact_cover(parts, len(sites))
  for k in (0, 1, 4, 5, 9_999):
    assert set(sites[parts[k]].tolist()) == {k % 5}
  for j in range(5):
    sizes = [len(parts[k]) for k in range(j, 10_000, 5)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == (sites == j).sum()


def test_dirichlet_large_alpha_is_near_uniform_small_alpha_is_skewed():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=8000)
  parts = partition.dirichlet(labels, 8, alpha=1e4, seed=1)
  assert _is_exact_cover(parts, len(labels))
  global_mix = np.bincount(labels, minlength=4) / len(labels)
  for p in parts:
    mix = np.bincount(labels[p], minlength=4) / len(p)
    assert np.abs(mix - global_mix).max() < 0.03
    assert abs(len(p) - len(labels) / 8) < 0.05 * len(labels) / 8
  skewed = partition.dirichlet(labels, 8, alpha=0.05, seed=1)
  assert _is_exact_cover(skewed, len(labels))
  dominant = [np.bincount(labels[p], minlength=4).max() / max(len(p), 1) for p in skewed]
  assert np.mean(dominant) > 0.7  # most clients are dominated by one category


def test_quantity_skew_sizes():
  parts = partition.quantity_skew(1000, 10, sigma=1.0, seed=0, min_size=5)
  sizes = np.array([len(p) for p in parts])
  assert _is_exact_cover(parts, 1000) and sizes.min() >= 5 and sizes.max() > 2 * sizes.min()
  equal = partition.iid(1000, 10, seed=0)
  assert [len(p) for p in equal] == [100] * 10


@pytest.mark.parametrize("sigma", [50.0, 1000.0, 1e300])
def test_quantity_skew_huge_sigma_keeps_min_size_or_is_refused(sigma):
  """A huge lognormal sigma overflows the client shares to inf; before, the NaN shares silently gave
  clients fewer than min_size examples ([0, 0, 3, 37] for sigma 1e300). Either every client keeps
  min_size and the parts cover the pool exactly, or the request is refused as too large."""
  for seed in range(12):  # seed 8 at 1e300: every share underflows to 0 (a finite sum of 0, NaN shares)
    try:
      parts = partition.quantity_skew(40, 4, sigma, seed=seed, min_size=1)
    except partition.PartitionError as e:
      assert "too large" in str(e)
      continue
    assert _is_exact_cover(parts, 40) and min(len(p) for p in parts) >= 1, (seed, [len(p) for p in parts])


def _unseen_sets_loop(num_silos, num_types, percent):
  """The definition, silo by silo: k = T - round_half_up(x / 100 * (T - 1)) types, consecutive
  (cyclically) from the home type i % T."""
  k = num_types - math.floor(percent * (num_types - 1) / 100 + 0.5)
  sets = []
  for i in range(num_silos):
    held = set()
    t = i % num_types
    while len(held) < k:
      held.add(t)
      t = (t + 1) % num_types
    sets.append(held)
  return sets


@pytest.mark.parametrize("num_silos", [4, 6, 11])
@pytest.mark.parametrize("num_types", [4, 6])
@pytest.mark.parametrize("percent", [0, 25, 50, 75, 100])
def test_unseen_label_corpus_equals_the_silo_loop(num_silos, num_types, percent):
  mix = partition.unseen_label_corpus(num_silos, num_types, percent)
  assert mix.shape == (num_silos, num_types)
  np.testing.assert_allclose(mix.sum(1), 1.0)
  want = _unseen_sets_loop(num_silos, num_types, percent)
  for i in range(num_silos):
    held = set(np.flatnonzero(mix[i]).tolist())
    assert held == want[i], (i, held, want[i])
    np.testing.assert_allclose(mix[i, sorted(held)], 1.0 / len(held))  # equal parts
    assert i % num_types in held  # the home type
    if percent == 100:
      assert held == {i % num_types}
    if percent == 0:
      assert held == set(range(num_types))
    if i >= num_types:  # silos i and i + T hold the same set
      np.testing.assert_array_equal(mix[i], mix[i - num_types])


@pytest.mark.parametrize("num_types", [4, 6])
def test_unseen_label_corpus_sets_shrink_with_percent(num_types):
  """k = T at 0 %, 1 at 100 %, never grows with x; each x's set is a subset of every lower x's set."""
  percents = [0, 10, 25, 33.3, 50, 66.7, 75, 90, 99, 100]
  sets = [[set(np.flatnonzero(r).tolist()) for r in partition.unseen_label_corpus(11, num_types, x)] for x in percents]
  ks = [partition.unseen_types(num_types, x) for x in percents]
  assert ks[0] == num_types and ks[-1] == 1 and ks == sorted(ks, reverse=True)
  for lower, higher, k in zip(sets, sets[1:], ks[1:]):
    for a, b in zip(lower, higher):
      assert b <= a and len(b) == k
  # the stated counts: T = 6 at 25/50/75 % -> 6 - round(1.25, 2.5, 3.75) = 5, 3, 2 (halves round up)
  if num_types == 6:
    assert [partition.unseen_types(6, x) for x in (25, 50, 75)] == [5, 3, 2]
  else:
    assert [partition.unseen_types(4, x) for x in (25, 50, 75)] == [3, 2, 2]


@pytest.mark.parametrize("percent", [0, 50, 100])
def test_unseen_label_corpus_feeds_assign_by_mixture(percent):
  """11 silos over 6 types: every example goes to one silo, and a silo gets only its types."""
  mix = partition.unseen_label_corpus(11, 6, percent)
  types = np.repeat(np.arange(6), 330)
  parts = partition.assign_by_mixture(types, mix, seed=0)
  assert _is_exact_cover(parts, len(types))
  for i, p in enumerate(parts):
    assert set(types[p].tolist()) == set(np.flatnonzero(mix[i]).tolist())


@pytest.mark.parametrize(
  "call,pattern",
  [
    (lambda: partition.by_site(np.array([], np.int64), 3), "no examples"),
    (lambda: partition.by_site(np.array([0, 1]), 0), r"num_clients=0 must be an integer >= 1"),
    (lambda: partition.dirichlet(np.zeros(10), 2, float("nan"), 0), "alpha=nan must be > 0"),
    (lambda: partition.dirichlet(np.zeros(10), 2, float("inf"), 0), "alpha=inf must be > 0"),
    (lambda: partition.dirichlet(np.zeros(10), 2, 0.0, 0), "alpha=0.0 must be > 0"),
    (lambda: partition.dirichlet(np.zeros(10), 0, 1.0, 0), r"num_clients=0 must be an integer >= 1"),
    (lambda: partition.quantity_skew(10, 2, -0.5, 0), r"sigma=-0.5 must be a finite number >= 0"),
    (lambda: partition.quantity_skew(10, 2, float("nan"), 0), r"sigma=nan must be a finite number >= 0"),
    (lambda: partition.quantity_skew(10, 0, 0.0, 0), r"num_clients=0 must be an integer >= 1"),
    (lambda: partition.quantity_skew(10, 2, 0.0, 0, min_size=-1), r"min_size=-1 must be an integer >= 0"),
    (lambda: partition.unseen_label_corpus(3, 0, 50), r"num_types=0 must be an integer >= 1"),
    (lambda: partition.unseen_label_corpus(3, 4, float("nan")), r"percent=nan must be in \[0, 100\]"),
    (lambda: partition.unseen_label_corpus(3, 4, 100.5), r"percent=100.5 must be in \[0, 100\]"),
    (lambda: partition.unseen_label_corpus(3, 4, -1), r"percent=-1 must be in \[0, 100\]"),
    (lambda: partition.unseen_label_corpus(0, 4, 50), r"num_silos=0 must be an integer >= 1"),
    (
      lambda: partition.assign_by_mixture(np.array([0, 1, 4]), np.full((2, 3), 1 / 3), 0),
      r"types must be integers 0..2",
    ),
    (lambda: partition.assign_by_mixture(np.array([0, 1]), np.array([[0.5, -0.5], [0.5, 1.5]]), 0), "finite and >= 0"),
    (
      lambda: partition.assign_by_mixture(np.array([0, 1, 1]), np.array([[1.0, 0.0], [1.0, 0.0]]), 0),
      r"data type\(s\) \[1\] have examples but every silo's mixture share is 0",
    ),
    (lambda: partition.assign_by_mixture(np.array([0, 1]), np.array([0.5, 0.5]), 0), r"shape \(2,\)"),
  ],
)
def test_bad_requests_raise_partition_error(call, pattern):
  with pytest.raises(partition.PartitionError, match=pattern) as err:
    call()
  assert isinstance(err.value, UserError)


def test_zero_share_type_without_examples_is_fine():
  """A data type no silo holds is fine when the pool has no examples of it (100 % unseen labels with
  fewer silos than types): every example still goes to exactly one silo."""
  mix = partition.unseen_label_corpus(2, 4, 100)
  types = np.array([0, 1, 0, 1, 1])
  parts = partition.assign_by_mixture(types, mix, seed=0)
  assert _is_exact_cover(parts, len(types))
  assert set(types[parts[0]].tolist()) == {0} and set(types[parts[1]].tolist()) == {1}
