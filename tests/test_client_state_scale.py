"""The per-client state store (fedkd.fl.client_state) at its edges: rows whose leaves numpy makes 64-bit,
a device table larger than the devices' memory, and checkpoint save / restore of the device table a chunk
of rows at a time (the same numbers as a numpy dict, without a second table in memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.fl import client_state
from fedkd.fl.client_state import ClientStateError, make_client_state
from fedkd.sharding import client_mesh, shard_clients

PLACEMENTS = ("host", "device")


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _stack(rows):
  return jax.tree.map(lambda *r: np.stack(r), *rows)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_rows_with_numpy_64_bit_leaves_round_trip(placement):
  """An init row built with numpy defaults (float64, int64 leaves) holds the dtypes JAX computes in
  (float32, int32): a round's updated rows are stored, read back and checkpointed like a numpy dict."""
  mesh = client_mesh(2)
  init = {"c": np.zeros((3,), np.float64), "count": np.array(0), "flag": np.zeros((), bool)}
  assert init["count"].dtype == np.int64
  store = make_client_state(placement, init, 6, mesh)
  ref = {}  # client id -> row in JAX's dtypes (numpy), the reference store
  fresh = {"c": np.zeros((3,), np.float32), "count": np.array(0, np.int32), "flag": np.array(False)}
  step = jax.jit(lambda r: {"c": r["c"] + 0.5, "count": r["count"] + 1, "flag": ~r["flag"]})
  for ids in ([1, 4], [4, 2]):
    got = store.gather(np.array(ids))
    _assert_tree_equal(_np(got), _stack([ref.get(i, fresh) for i in ids]))
    store.scatter(np.array(ids), step(got))
    for i in ids:
      old = ref.get(i, fresh)
      ref[i] = {"c": old["c"] + np.float32(0.5), "count": old["count"] + np.int32(1), "flag": ~old["flag"]}
  assert ref[4]["count"] == 2 and ref[4]["c"][0] == 1.0
  _assert_tree_equal(_np(store.gather(np.arange(6))), _stack([ref.get(i, fresh) for i in range(6)]))
  sd = store.state_dict()
  assert sd["ids"].tolist() == [1, 2, 4]
  _assert_tree_equal(sd["rows"], _stack([ref[i] for i in (1, 2, 4)]))
  other = make_client_state("device" if placement == "host" else "host", init, 6, mesh)
  other.load_state_dict(sd)
  _assert_tree_equal(_np(other.gather(np.arange(6))), _stack([ref.get(i, fresh) for i in range(6)]))


def test_device_table_larger_than_memory_is_a_clear_error(monkeypatch):
  """A device table no device can hold (2**24 clients x 64 MiB rows = 1 PiB) is refused with one
  message naming the fix, before anything is allocated; so is an allocation the backend refuses."""
  mesh = client_mesh(1)
  row = {"w": np.zeros((2**24,), np.float32)}  # 64 MiB
  with pytest.raises(ClientStateError, match=r"1048576\.0 GiB per device .*client_state=host"):
    make_client_state("device", row, 2**24, mesh)
  monkeypatch.setattr(client_state, "_memory_per_device", lambda mesh: None)  # a backend that does not say
  with pytest.raises(ClientStateError, match="more than the devices have free; use --config.algorithm.client_state"):
    make_client_state("device", row, 2**24, mesh)
  assert make_client_state("host", row, 2**24, mesh).nbytes == 0  # the host placement holds sampled rows only


@pytest.mark.parametrize("n_dev", [1, 2])
def test_device_state_dict_and_load_in_chunks_equal_a_numpy_dict(monkeypatch, n_dev):
  """Save / restore a few rows at a time (chunks of 4 rows, the last one padded): the checkpoint holds
  exactly the sampled clients' rows, and a restore into a used table gives every client its row back
  (never-sampled clients their initial one)."""
  row_bytes = 6 * 4
  monkeypatch.setattr(client_state, "CHUNK_BYTES", 4 * row_bytes, raising=False)
  mesh = client_mesh(n_dev)
  init = {"a": np.full((2, 2), 7.0, np.float32), "b": np.full((2,), -1.0, np.float32)}
  store = make_client_state("device", init, 20, mesh)
  rng = np.random.default_rng(0)
  ref = {}
  for ids in ([3, 17], [0, 9], [12, 5], [19, 3], [8, 14], [11, 6]):  # 11 distinct clients
    rows = {k: rng.standard_normal((2,) + v.shape).astype(np.float32) for k, v in init.items()}
    store.scatter(np.array(ids), shard_clients(rows, mesh))
    for j, i in enumerate(ids):
      ref[i] = {k: v[j] for k, v in rows.items()}
  seen = sorted(ref)
  sd = store.state_dict()
  assert sd["ids"].tolist() == seen
  _assert_tree_equal(sd["rows"], _stack([ref[i] for i in seen]))
  other = make_client_state("device", init, 20, mesh)
  other.scatter(
    np.array([1, 3]), shard_clients({k: np.ones((2,) + v.shape, np.float32) for k, v in init.items()}, mesh)
  )
  other.load_state_dict(sd)
  _assert_tree_equal(_np(other.gather(np.arange(20))), _stack([ref.get(i, init) for i in range(20)]))
  assert other.state_dict()["ids"].tolist() == seen
  empty = make_client_state("device", init, 20, mesh).state_dict()
  assert empty["ids"].shape == (0,) and empty["rows"]["a"].shape == (0, 2, 2)


def _rss_and_peak():
  fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
  return (int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def _peak_bytes(fn):
  """Resident memory ``fn`` adds at its peak (Linux: the high-water mark reset through clear_refs)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  rss, _ = _rss_and_peak()
  out = fn()
  _, peak = _rss_and_peak()
  return out, peak - rss


def test_device_checkpoint_save_and_restore_need_no_second_table():
  """Every client sampled, a 256 MiB device table: the state dict costs its own host copy and no
  device copy of the rows besides, and a restore refills the table in place (the fresh run's memory)."""
  try:
    open("/proc/self/clear_refs", "w").close()
  except OSError:
    pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
  mesh = client_mesh(1)
  n, init = 1024, {"w": np.ones((64, 1024), np.float32)}  # 256 KiB rows
  store = make_client_state("device", init, n, mesh)
  add = jax.jit(lambda r, k: jax.tree.map(lambda a: a + k, r))
  for start in range(0, n, 256):
    ids = np.arange(start, start + 256)
    store.scatter(ids, add(store.gather(ids), jnp.float32(start)))
  warm = make_client_state("device", init, 8, mesh)  # compile the save / restore programs first
  warm.load_state_dict(warm.state_dict())
  table = store.nbytes
  sd, saved = _peak_bytes(store.state_dict)
  _, restored = _peak_bytes(lambda: store.load_state_dict(sd))
  assert saved < 1.5 * table, f"state_dict peaked at +{saved / 2**20:.0f} MiB for a {table / 2**20:.0f} MiB table"
  assert restored < 0.5 * table, f"load_state_dict peaked at +{restored / 2**20:.0f} MiB"
  for cid in (0, 300, 1023):  # client cid holds 1 + the start of its scatter chunk
    np.testing.assert_array_equal(store.host_row(cid)["w"], np.full((64, 1024), 1.0 + (cid // 256) * 256, np.float32))
    np.testing.assert_array_equal(sd["rows"]["w"][cid], np.full((64, 1024), 1.0 + (cid // 256) * 256, np.float32))
