"""Random streams drawn for one purpose (client sizes, silo sources, MATCHA activations, downstream batches) are
apart from the per-round sampling streams ``default_rng([seed, round, client])``. numpy's SeedSequence pads a seed
of up to four words with zeros, so ``[seed, r]`` was ``[seed, r, 0]``: MATCHA's activations of round r were silo
0's batch draws of round r, and the silos' sources were their round-11 draws. References: numpy's own
SeedSequence (spawn keys) and the seed lists the draws had before (``config.rng_streams = 1``)."""

import numpy as np
import pytest

from fedkd import config as fc
from fedkd import streams
from fedkd.config import ConfigError
from fedkd.data.silos import NUM_SOURCES, SiloData
from fedkd.fl import topology

SEED = 3


def _first(g):
  return tuple(g.integers(0, 2**63, 8).tolist())


NAMED = [
  ("client_sizes", ()),
  ("silo_sources", (0,)),
  ("silo_sources", (5,)),
  ("matcha", (0,)),
  ("matcha", (11,)),
  ("finetune", (8,)),
  ("teacher_adapt", (8,)),
  ("probe", ()),
]


def test_named_streams_are_apart_from_every_round_stream_and_from_each_other():
  rounds = {_first(np.random.default_rng([SEED, r, c])) for r in range(128) for c in range(16)}
  named = {}
  for purpose, ids in NAMED:
    draws = _first(streams.rng(purpose, SEED, *ids))
    tag = streams.PURPOSES.index(purpose) + 1
    assert draws == _first(np.random.default_rng(np.random.SeedSequence(SEED, spawn_key=(tag, *ids))))
    assert draws not in rounds, (purpose, ids)
    named[(purpose, ids)] = draws
  assert len(set(named.values())) == len(named)
  # rng_streams 1: the seeds these draws had, each one of the round streams above
  for purpose, ids, legacy in [
    ("client_sizes", (), [SEED, 7, 0]),
    ("silo_sources", (5,), [SEED, 11, 5]),
    ("matcha", (11,), [SEED, 11, 0]),
    ("finetune", (8,), [SEED, 99, 8]),
    ("teacher_adapt", (8,), [SEED, 98, 8]),
    ("probe", (), [SEED, 97, 0]),
  ]:
    assert _first(streams.rng(purpose, SEED, *ids, version=1)) == _first(np.random.default_rng(legacy))
  with pytest.raises(ValueError, match="unknown"):
    streams.rng("matcha", 0, 1, version=3)


def test_matcha_activations_are_no_longer_silo_zeros_batch_draws():
  """Over 400 rounds, whether matching k is active (budget 0.5) against whether silo 0's k-th uniform draw of
  the round is below 0.5: always the same with the old seeds, about half the time with the named stream."""
  m, agree = 7, {1: [], 2: []}
  for r in range(400):
    silo0 = np.random.default_rng([SEED, r, 0]).random(m) < 0.5
    for v in agree:
      active = topology.matcha_activation(m, 0.5, streams.rng("matcha", SEED, r, version=v), r)
      agree[v].append(active == silo0)
  assert np.mean(agree[1]) == 1.0
  assert 0.45 < np.mean(agree[2]) < 0.55, np.mean(agree[2])


@pytest.mark.parametrize("version", [1, 2])
def test_silo_sources_follow_config_rng_streams(version):
  c = fc.fedefm_base_config()
  c.rng_streams = version
  c.pretrain.unseen_percent = 0.0  # every silo draws from all six sources
  got = SiloData(c).silo_types(0.0, SEED)
  for i in range(c.pretrain.num_silos):
    seed = [SEED, 11, i] if version == 1 else np.random.SeedSequence(SEED, spawn_key=(2, i))
    want = np.random.default_rng(seed).choice(NUM_SOURCES, c.pretrain.examples_per_silo, p=np.full(6, 1 / 6))
    np.testing.assert_array_equal(got[i], want)


def test_rng_streams_key_is_checked_and_older_runs_keep_their_seeds():
  for make, check in ((fc.base_config, lambda c: fc.validate(c, 8)), (fc.fedefm_base_config, None)):
    for bad in (3, 0, True):  # (a float cannot be set on the int key)
      c = make()
      c.rng_streams = bad
      if make is fc.base_config:
        c.quantity_skew = 0.5  # where a FedAvg run reads the key (else it is noted unused, not range-checked)
      with pytest.raises(ConfigError, match=r"config\.rng_streams=\S+ is (unknown; use 2|a bool)"):
        (check or (lambda c: fc.validate_fedefm(c, 8)))(c)
  # a saved config from before the key ran with the old seeds where it drew such a stream
  current = fc.flat_dict(fc.base_config().to_dict())
  old = {k: v for k, v in current.items() if k != "rng_streams"}
  assert fc.ran_as(old, current) == {}  # equal client sizes: no such stream was drawn
  assert fc.ran_as(dict(old, quantity_skew=0.5), current) == {"rng_streams": 1}
  current = fc.flat_dict(fc.fedefm_base_config().to_dict())
  assert fc.ran_as({k: v for k, v in current.items() if k != "rng_streams"}, current)["rng_streams"] == 1


def test_a_key_a_run_does_not_depend_on_may_differ_and_pooled_workdirs_compare_in_either_order():
  """A sweep's runs of quantity_skew 0 and 0.5 saved before rng_streams existed: the skewed ones ran the old
  streams (1); the others drew none, so either value of the key continues them (one --extra for the whole sweep
  was refused for one group or the other). FedEFM workdirs pooled for a contrast: a workdir from before the key
  and one of rng_streams=1 are the same config in either order (they were in one order only)."""
  from launch.sweep import config_difference
  from fedkd.tasks.fedefm import config_difference as fedefm_difference

  def saved_without_key(c):
    d = c.to_dict()
    del d["rng_streams"]
    return d

  for skew, accepted in ((0.0, (1, 2)), (0.5, (1,))):
    c = fc.base_config()
    c.quantity_skew = skew
    old = saved_without_key(c)
    for v in (1, 2):
      c.rng_streams = v
      got = config_difference(old, c.to_dict(), finished=True)
      assert got == ([] if v in accepted else [("rng_streams", None, v)]), (skew, v, got)
  c = fc.fedefm_base_config()
  old = saved_without_key(c)
  for v, same in ((1, True), (2, False)):
    c.rng_streams = v
    for a, b in ((old, c.to_dict()), (c.to_dict(), old)):
      assert (fedefm_difference(a, b, pooled=True) is None) is same, (v, fedefm_difference(a, b, pooled=True))
