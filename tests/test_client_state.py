"""Per-client state (fedkd.fl.client_state) for both placements against a plain numpy dict, and
SCAFFOLD task runs: crash-and-resume is bitwise identical for both placements, host == device, the
stored rows obey SCAFFOLD's invariant c = mean_i c_i, and old FedAvg checkpoints still restore."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedkd.checkpoint import CheckpointError, Checkpointer
from fedkd.evaluate import load_run
from fedkd.fl import algorithms, engine
from fedkd.fl.client_state import ClientStateError, make_client_state
from fedkd.models import init_params
from fedkd.sharding import client_mesh, client_sharding, shard_clients
from fedkd.tasks import fedavg
from test_training import Interrupt, tiny_config

PLACEMENTS = ("host", "device")


def _row():
  """A params-like row: nested dicts (integer keys as in the UNet's params), several shapes."""
  return {
    "enc": {0: {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros((2,), np.float32)}},
    "head": np.zeros((4,), np.float32),
  }


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Rounds of sampled client ids: clients come back (0, 2, 3, 7) and some are never sampled (1, 4, 6).
ROUNDS = [[0, 2, 3, 5], [7, 2, 9, 0], [3, 8, 2, 7], [0, 7, 9, 3]]
NUM_CLIENTS = 10


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gather_scatter_match_a_numpy_dict(placement):
  mesh = client_mesh(4)
  store = make_client_state(placement, _row(), NUM_CLIENTS, mesh)
  ref = {}  # client id -> row (numpy), the reference store; missing = never sampled = zeros
  rng = np.random.default_rng(0)
  for r, ids in enumerate(ROUNDS):
    got = store.gather(np.array(ids))
    want = jax.tree.map(lambda *rs: np.stack(rs), *[ref.get(c, _row()) for c in ids])
    _assert_tree_equal(_np(got), want)
    for leaf in jax.tree.leaves(got):  # placed like the round's data: split over 'clients'
      assert leaf.sharding.is_equivalent_to(client_sharding(mesh), leaf.ndim)
    # the round's "update": old rows plus fresh noise, computed on device like the engine's output
    noise = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), want)
    new = jax.jit(lambda g, n: jax.tree.map(jnp.add, g, n))(got, shard_clients(noise, mesh))
    store.scatter(np.array(ids), new)
    for i, c in enumerate(ids):
      ref[c] = jax.tree.map(lambda a, n: a[i] + n[i], want, noise)
  # every client reads its last written row, never-sampled clients read zeros
  _assert_tree_equal(
    _np(store.gather(np.arange(8))), jax.tree.map(lambda *rs: np.stack(rs), *[ref.get(c, _row()) for c in range(8)])
  )
  sd = store.state_dict()
  assert sd["ids"].tolist() == sorted(ref)
  _assert_tree_equal(sd["rows"], jax.tree.map(lambda *rs: np.stack(rs), *[ref[c] for c in sorted(ref)]))
  row_bytes = sum(a.nbytes for a in jax.tree.leaves(_row()))
  if placement == "host":  # memory: only the clients ever sampled
    assert store.rows_held == len(ref) == 7 and store.nbytes == 7 * row_bytes
  else:
    assert store.nbytes == NUM_CLIENTS * row_bytes


@pytest.mark.parametrize("src,dst", [("host", "device"), ("device", "host"), ("host", "host")])
def test_state_dict_round_trip_across_placements(src, dst):
  mesh = client_mesh(2)
  a = make_client_state(src, _row(), NUM_CLIENTS, mesh)
  rng = np.random.default_rng(1)
  for ids in ([4, 1], [1, 6]):
    rows = jax.tree.map(lambda z: rng.standard_normal((2,) + z.shape).astype(np.float32), _row())
    a.scatter(np.array(ids), shard_clients(rows, mesh))
  b = make_client_state(dst, _row(), NUM_CLIENTS, mesh)
  b.gather(np.array([0, 1]))  # a used store is overwritten by the load, not merged
  b.scatter(np.array([0, 1]), shard_clients(jax.tree.map(lambda z: np.ones((2,) + z.shape, z.dtype), _row()), mesh))
  b.load_state_dict(a.state_dict())
  everyone = np.arange(NUM_CLIENTS)
  _assert_tree_equal(_np(b.gather(everyone)), _np(a.gather(everyone)))
  assert b.state_dict()["ids"].tolist() == [1, 4, 6]
  assert float(np.abs(np.asarray(jax.tree.leaves(b.gather(np.array([0, 2])))[0])).max()) == 0.0


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_client_whose_row_the_round_kept_is_not_counted_as_sampled(placement):
  """A Ditto client sampled but dropped (did not report, or non-finite) keeps its initial row; it was counted as
  sampled all the same, so its site was scored with that untrained row. With ``trained`` False it is not, until a
  round trains it; a client once trained stays counted when a later round keeps its row."""
  mesh = client_mesh(2)
  store = make_client_state(placement, _row(), NUM_CLIENTS, mesh)
  rng = np.random.default_rng(4)

  def rows(n):
    return shard_clients(jax.tree.map(lambda z: rng.standard_normal((n,) + z.shape).astype(np.float32), _row()), mesh)

  store.scatter(np.array([3, 5]), rows(2), trained=np.array([True, False]))
  assert [store.was_sampled(c) for c in (3, 5, 0)] == [True, False, False]
  assert store.state_dict()["ids"].tolist() == [3]
  store.scatter(np.array([3, 7]), rows(2), trained=np.array([False, True]))
  assert [store.was_sampled(c) for c in (3, 5, 7)] == [True, False, True]
  assert store.state_dict()["ids"].tolist() == [3, 7]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bad_ids_and_rows_are_clear_errors(placement):
  mesh = client_mesh(2)
  store = make_client_state(placement, _row(), NUM_CLIENTS, mesh)
  with pytest.raises(ClientStateError, match="client id 10 is out of range"):
    store.gather(np.array([3, 10]))
  with pytest.raises(ClientStateError, match="client id -1 is out of range"):
    store.gather(np.array([-1, 2]))
  with pytest.raises(ClientStateError, match="client id 3 appears twice"):
    store.gather(np.array([3, 3]))
  with pytest.raises(ClientStateError, match="integers"):
    store.gather(np.array([0.0, 1.0]))
  with pytest.raises(ClientStateError, match="cannot be split over the 2 devices"):
    store.gather(np.array([0, 1, 2]))
  with pytest.raises(ClientStateError, match="1-D"):
    store.gather(np.array([[0, 1]]))
  rows = store.gather(np.array([0, 1]))
  with pytest.raises(ClientStateError, match="do not match 4 ids"):
    store.scatter(np.array([0, 1, 2, 3]), rows)
  with pytest.raises(ClientStateError, match="out of range"):
    store.load_state_dict({"ids": np.array([0, 12]), "rows": rows})
  with pytest.raises(ClientStateError, match="unknown client-state placement"):
    make_client_state("disk", _row(), NUM_CLIENTS, mesh)


def test_device_scatter_updates_in_place_and_host_memory_follows_sampled_clients():
  mesh = client_mesh(2)
  dev = make_client_state("device", _row(), 10_000, mesh)
  old = dev.table
  rows = dev.gather(np.array([17, 9_999]))
  dev.scatter(np.array([17, 9_999]), jax.tree.map(lambda a: a + 1.0, rows))
  assert all(a.is_deleted() for a in jax.tree.leaves(old))  # the table was donated: no second copy
  assert float(jax.tree.leaves(dev.table)[0][9_999].sum()) == float(np.prod(jax.tree.leaves(_row())[0].shape))
  host = make_client_state("host", _row(), 10_000, mesh)
  rng = np.random.default_rng(2)
  seen = set()
  for _ in range(5):
    ids = rng.choice(10_000, 8, replace=False)
    seen |= set(ids.tolist())
    host.scatter(ids, jax.tree.map(lambda a: a + 1.0, host.gather(ids)))
  assert host.rows_held == len(seen) and host.nbytes == len(seen) * host.row_nbytes


def test_checkpointer_keeps_client_state_and_reads_checkpoints_without_it(tmp_path):
  ck = Checkpointer(str(tmp_path / "ck"))
  state = {"params": jnp.arange(3.0)}
  rows = {"ids": np.array([2, 5]), "rows": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  ck.save(1, state, {"a": 1})
  ck.save(2, state, {"a": 1}, client_state=rows)
  ck.wait()
  assert ck.saved_client_rows(1) is None and ck.saved_client_rows(2) == 2
  got = ck.restore_client_state(2, {"ids": np.zeros(2, np.int64), "rows": {"w": np.zeros((2, 3), np.float32)}})
  _assert_tree_equal(got, rows)
  ck.close()


# --------------------------------------------------------------------------------------------
# Task runs
# --------------------------------------------------------------------------------------------


def _scaffold(placement, **overrides):
  c = tiny_config(**overrides)
  c.algorithm.name = "scaffold"
  c.algorithm.client_state = placement
  c.client_optimizer.name = "sgd"
  c.client_optimizer.learning_rate = 0.05
  return c


def _crash_in_round_3(line):
  if line.startswith("round    3/"):
    raise Interrupt  # after round 3, before its checkpoint (saved every 2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  work = str(tmp_path_factory.mktemp("full"))
  return work, fedavg.run(_scaffold("host"), work, log=lambda _: None)


def test_scaffold_run_keeps_every_sampled_clients_control_variate(full_run):
  _, out = full_run
  c = _scaffold("host")
  # replay the task's client sampling: clients of every round, some of them twice
  key, per_round = jax.random.key(c.seed), []
  for _ in range(c.num_rounds):
    key, sub = jax.random.split(key)
    per_round.append(fedavg.sample_clients(sub, c.num_clients, c.clients_per_round).tolist())
  sampled = sum(per_round, [])
  # a client of rounds 1-2 comes back in rounds 3-4: resuming from round 2 needs its stored row
  assert set(per_round[0] + per_round[1]) & set(per_round[2] + per_round[3])
  sd = out["client_state"]
  assert sd["ids"].tolist() == sorted(set(sampled))
  # SCAFFOLD: c starts at 0 and gains sum_i (c_i+ - c_i) / N each round, so c = (1/N) sum_i c_i over
  # the stored rows; a store that lost or mixed up a returning client's row breaks this.
  control = _np(out["state"]["control"])
  mean_rows = jax.tree.map(lambda r: r.astype(np.float64).sum(0) / c.num_clients, sd["rows"])
  for a, b in zip(jax.tree.leaves(control), jax.tree.leaves(mean_rows)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert max(float(np.abs(a).max()) for a in jax.tree.leaves(control)) > 1e-4
  # fedkd.eval reads the model of a SCAFFOLD checkpoint (the server control variate is skipped)
  _, _, params, r = load_run(full_run[0], None)
  assert r == c.num_rounds
  _assert_tree_equal(_np(params), _np(out["state"]["params"]))


def _assert_same_run(out, work, ref, ref_work):
  _assert_tree_equal(_np(out["state"]), _np(ref["state"]))
  _assert_tree_equal(out["client_state"], ref["client_state"])
  recs = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["round"] for r in recs] == [0, 2, 4]
  assert recs == [json.loads(l) for l in open(os.path.join(ref_work, "metrics.jsonl"))]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_scaffold_resume_is_bitwise_identical(tmp_path, full_run, placement):
  """Killed after round 3, resumed from round 2's checkpoint with the same placement and (from a copy
  of the killed run) with the other one: same server state, client rows and metrics as the
  uninterrupted run, which kept its client state on the host (so device == host as well)."""
  full_work, full = full_run
  other = "device" if placement == "host" else "host"
  work, work_other = str(tmp_path / placement), str(tmp_path / f"then_{other}")
  with pytest.raises(Interrupt):
    fedavg.run(_scaffold(placement), work, log=_crash_in_round_3)
  shutil.copytree(work, work_other)
  for where, w in ((placement, work), (other, work_other)):
    lines = []
    resumed = fedavg.run(_scaffold(where), w, log=lines.append)
    assert any("resuming from round 2" in ln for ln in lines)
    assert any(ln.startswith(f"fedkd scaffold (per-client state on {where}") for ln in lines)
    _assert_same_run(resumed, w, full, full_work)


def test_old_fedavg_checkpoint_without_client_state_still_restores(tmp_path):
  """A checkpoint written before per-client state existed (items state/config/data only; a config
  without the algorithm group and the later engine keys) is accepted by a FedAvg run and restored."""
  c = tiny_config(num_rounds=2)
  apply, params = init_params(c.model, c.seed)
  noisy = jax.tree.map(lambda p: p + 0.01 * np.arange(p.size, dtype=np.float32).reshape(p.shape), params)
  state = algorithms.FedAvg(engine.make_optimizer(c.server_optimizer)).init(noisy, jax.random.key(5))
  state["round"] = jnp.asarray(2, jnp.int32)
  old_cfg = json.loads(c.to_json())
  del old_cfg["algorithm"], old_cfg["engine"]["compute_dtype"], old_cfg["engine"]["remat"]
  work = str(tmp_path / "old")
  mngr = ocp.CheckpointManager(os.path.join(work, "checkpoints"), options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(old_cfg), data=ocp.args.JsonSave({})
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  lines = []
  restored = fedavg.run(c, work, log=lines.append)  # resumes at its last round: restore and evaluate
  assert any("resuming from round 2" in ln for ln in lines)
  _assert_tree_equal(_np(restored["state"]), _np(state))
  assert "client_state" not in restored
  # a SCAFFOLD run cannot silently start its control variates from such a checkpoint
  with pytest.raises(CheckpointError, match="algorithm.name"):
    fedavg.run(_scaffold("host", num_rounds=2), work, log=lambda _: None)
