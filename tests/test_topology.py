"""Mixing matrices, MATCHA schedules, topology files, neighbour tables and gossip."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.fl import topology as topo


def _stacked(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(n, 3, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
          "step": jnp.arange(n, dtype=jnp.int32)}


def _all_mixing_matrices():
  gaia = topo.gaia_adjacency()
  mats = {"star": topo.star(11), "complete": topo.complete(11), "ring": topo.ring(11),
          "ring_directed": topo.ring(11, directed=True), "ring2": topo.ring(2),
          "gaia_ring": topo.gaia_ring(), "mh_gaia": topo.metropolis_hastings(gaia),
          "mh_gaia_ring": topo.metropolis_hastings(topo.gaia_ring(directed=False))}
  rng = np.random.default_rng(7)
  random_graph = np.triu(rng.random((11, 11)) < 0.3, 1)
  mats["mh_random"] = topo.metropolis_hastings(random_graph | random_graph.T)
  for r in range(5):
    mats[f"matcha_gaia_{r}"] = topo.matcha(gaia, 0.4, 3, r)
    mats[f"matcha_random_{r}"] = topo.matcha(random_graph, 0.5, 3, r)
  return mats


def test_doubly_stochastic_and_gossip_preserves_mean():
  params = _stacked(11)
  mix = jax.jit(topo.gossip)
  for name, w in _all_mixing_matrices().items():
    n = w.shape[0]
    assert w.dtype == np.float32 and topo.is_doubly_stochastic(w), name
    p = params if n == 11 else _stacked(n)
    out = mix(p, w)
    for k in ("w", "b"):
      np.testing.assert_allclose(np.asarray(out[k]).mean(0), np.asarray(p[k]).mean(0), atol=1e-5,
                                 err_msg=name)
    np.testing.assert_array_equal(np.asarray(out["step"]), np.asarray(p["step"]))


def test_ring_round_equals_python_loop():
  params = _stacked(11, seed=1)
  out = jax.jit(topo.gossip)(params, topo.ring(11))
  for k in ("w", "b"):
    x = np.asarray(params[k])
    want = np.stack([(x[(i - 1) % 11] + x[i] + x[(i + 1) % 11]) / 3.0 for i in range(11)])
    np.testing.assert_allclose(np.asarray(out[k]), want, atol=1e-6)
  # directed ring: keep half, take half from the predecessor
  out = topo.gossip(params, topo.ring(11, directed=True))
  x = np.asarray(params["b"])
  want = np.stack([(x[i] + x[(i - 1) % 11]) / 2.0 for i in range(11)])
  np.testing.assert_allclose(np.asarray(out["b"]), want, atol=1e-6)


def test_gaia_ring_order():
  w = topo.gaia_ring()
  order = topo.GAIA_RING_ORDER
  for k in range(11):
    src, dst = order[k], order[(k + 1) % 11]
    assert w[dst, src] == 0.5 and w[dst, dst] == 0.5  # dst receives from src
  assert topo.neighbours(w)[10] == [0] and topo.neighbours(w)[0] == [1]


def test_star_is_fedavg():
  params = _stacked(5, seed=2)
  out = topo.gossip(params, topo.star(5))
  for k in ("w", "b"):
    mean = np.asarray(params[k]).mean(0)
    for i in range(5):
      np.testing.assert_allclose(np.asarray(out[k])[i], mean, atol=1e-6)


def test_gaia_file():
  a = topo.gaia_adjacency()
  assert a.shape == (11, 11) and len(topo.GAIA_NODES) == 11
  np.testing.assert_array_equal(a, a.T)
  assert np.all(np.diag(a) == 0) and int((a != 0).sum()) == 2 * 55  # the complete underlay
  np.testing.assert_allclose(topo.metropolis_hastings(a), np.full((11, 11), 1 / 11), atol=1e-6)


def test_from_file_text_and_json(tmp_path):
  p = tmp_path / "g.txt"
  p.write_text("# a comment\n\n0 1\n1 2 0.5   # trailing comment\n  # indented comment\n3 0 2\n")
  a = topo.from_file(str(p))
  want = np.zeros((4, 4), np.float32)
  for i, j, w in [(0, 1, 1.0), (1, 2, 0.5), (3, 0, 2.0)]:
    want[i, j] = want[j, i] = w
  np.testing.assert_array_equal(a, want)
  assert topo.from_file(str(p), num_nodes=6).shape == (6, 6)
  d = topo.from_file(str(p), directed=True)
  assert d[1, 0] == 1.0 and d[0, 1] == 0.0 and d[0, 3] == 2.0  # "i j" = i sends to j
  bad = tmp_path / "bad.txt"
  bad.write_text("0 1 2 3\n")
  with pytest.raises(ValueError):
    topo.from_file(str(bad))
  j1 = tmp_path / "adj.json"
  j1.write_text(json.dumps(want.tolist()))
  np.testing.assert_array_equal(topo.from_file(str(j1)), want)
  j2 = tmp_path / "edges.json"
  j2.write_text(json.dumps({"edges": [[0, 1], [1, 2, 0.5], [3, 0, 2]], "num_nodes": 5}))
  a2 = topo.from_file(str(j2))
  assert a2.shape == (5, 5)
  np.testing.assert_array_equal(a2[:4, :4], want)


def test_metropolis_hastings_values():
  # path 0 - 1 - 2: degrees 1, 2, 1
  a = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
  w = topo.metropolis_hastings(a)
  np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]],
                             atol=1e-6)


def test_matching_decomposition_covers_edges():
  gaia = topo.gaia_adjacency()
  ms = topo.matching_decomposition(gaia)
  edges = [e for m in ms for e in m]
  assert len(edges) == 55 and len(set(edges)) == 55
  for m in ms:
    nodes = [x for e in m for x in e]
    assert len(nodes) == len(set(nodes))  # a matching: no shared endpoint
  assert len(ms) <= 2 * 10 - 1


def test_matcha_deterministic_and_budget():
  gaia = topo.gaia_adjacency()
  w1 = topo.matcha(gaia, 0.3, 11, 4)
  np.testing.assert_array_equal(w1, topo.matcha(gaia, 0.3, 11, 4))
  assert any(not np.array_equal(w1, topo.matcha(gaia, 0.3, 11, r)) for r in range(5, 10))
  assert not np.array_equal(w1, topo.matcha(gaia, 0.3, 12, 4)) or \
      not np.array_equal(topo.matcha(gaia, 0.3, 11, 5), topo.matcha(gaia, 0.3, 12, 5))
  # W encodes exactly the active matchings, with alpha = 1 / (1 + max degree)
  ms = topo.matching_decomposition(gaia)
  alpha = 1.0 / 11.0
  active = topo.matcha_activation(len(ms), 0.3, 11, 4)
  for k, m in enumerate(ms):
    for i, j in m:
      assert w1[i, j] == pytest.approx(alpha if active[k] else 0.0)
  # over many rounds about `budget` of the matchings are active
  frac = np.mean([topo.matcha_activation(len(ms), 0.3, 0, r).mean() for r in range(400)])
  assert abs(frac - 0.3) < 0.03
  assert np.array_equal(topo.matcha(gaia, 0.0, 0, 0), np.eye(11, dtype=np.float32))
  full = topo.matcha(gaia, 1.0, 0, 0)
  assert np.all(full[~np.eye(11, dtype=bool)] == pytest.approx(alpha)) and topo.is_doubly_stochastic(full)


def test_neighbours_and_table():
  # 0-1, 0-2, 0-3, 2-3 plus an isolated node 4
  a = np.zeros((5, 5))
  for i, j in [(0, 1), (0, 2), (0, 3), (2, 3)]:
    a[i, j] = a[j, i] = 1
  nb = topo.neighbours(a)
  assert nb == [[1, 2, 3], [0], [0, 3], [0, 2], []]
  idx, mask = topo.neighbour_table(a)
  assert idx.dtype == np.int32 and mask.dtype == bool and idx.shape == mask.shape == (5, 3)
  np.testing.assert_array_equal(idx, [[1, 2, 3], [0, 1, 1], [0, 3, 2], [0, 2, 3], [4, 4, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]])
  # mixing matrices work too (diagonal ignored); a masked jit gather of neighbour values
  idx, mask = topo.neighbour_table(topo.ring(6))
  assert idx.shape == (6, 2) and mask.all()
  vals = jnp.arange(6.0) * 10
  total = jax.jit(lambda v: jnp.sum(jnp.where(mask, v[idx], 0.0), axis=1))(vals)
  np.testing.assert_allclose(np.asarray(total), [(((i - 1) % 6) + ((i + 1) % 6)) * 10 for i in range(6)])
