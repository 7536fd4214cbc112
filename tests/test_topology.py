"""Mixing matrices, MATCHA schedules, topology files, neighbour tables and gossip."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.errors import UserError
from fedkd.fl import topology as topo
from fedkd.fl.aggregate import mix


def _stacked(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(n, 3, 4)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
    "step": jnp.arange(n, dtype=jnp.int32),
  }


def _all_mixing_matrices():
  gaia = topo.gaia_adjacency()
  mats = {
    "star": topo.star(11),
    "complete": topo.complete(11),
    "ring": topo.ring(11),
    "ring_directed": topo.ring(11, directed=True),
    "ring2": topo.ring(2),
    "gaia_ring": topo.gaia_ring(),
    "mh_gaia": topo.metropolis_hastings(gaia),
    "mh_gaia_ring": topo.metropolis_hastings(topo.gaia_ring(directed=False)),
  }
  rng = np.random.default_rng(7)
  random_graph = np.triu(rng.random((11, 11)) < 0.3, 1)
  mats["mh_random"] = topo.metropolis_hastings(random_graph | random_graph.T)
  for r in range(5):
    mats[f"matcha_gaia_{r}"] = topo.matcha(gaia, 0.4, 3, r)
    mats[f"matcha_random_{r}"] = topo.matcha(random_graph, 0.5, 3, r)
  return mats


def test_doubly_stochastic_and_gossip_preserves_mean():
  params = _stacked(11)
  jmix = jax.jit(mix)
  for name, w in _all_mixing_matrices().items():
    n = w.shape[0]
    assert w.dtype == np.float32 and topo.is_doubly_stochastic(w), name
    p = params if n == 11 else _stacked(n)
    out = jmix(w, p)
    for k in ("w", "b"):
      np.testing.assert_allclose(np.asarray(out[k]).mean(0), np.asarray(p[k]).mean(0), atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(out["step"]), np.asarray(p["step"]))


def test_ring_round_equals_python_loop():
  params = _stacked(11, seed=1)
  out = jax.jit(mix)(topo.ring(11), params)
  for k in ("w", "b"):
    x = np.asarray(params[k])
    want = np.stack([(x[(i - 1) % 11] + x[i] + x[(i + 1) % 11]) / 3.0 for i in range(11)])
    np.testing.assert_allclose(np.asarray(out[k]), want, atol=1e-6)
  # directed ring: keep half, take half from the predecessor
  out = mix(topo.ring(11, directed=True), params)
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
  out = mix(topo.star(5), params)
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
  p.write_text("# a comment\n\n0 1\n1 2 1   # trailing comment\n  # indented comment\n3 0\n")
  a = topo.from_file(str(p))
  want = np.zeros((4, 4), np.float32)
  for i, j in [(0, 1), (1, 2), (3, 0)]:
    want[i, j] = want[j, i] = 1.0
  np.testing.assert_array_equal(a, want)
  assert a.dtype == np.float32
  with pytest.raises(topo.TopologyError, match=r"node\(s\) \[4, 5\] have no link"):
    topo.from_file(str(p), num_nodes=6)  # nodes 4 and 5 would be cut off
  d = topo.from_file(str(p), directed=True)
  assert d[1, 0] == 1.0 and d[0, 1] == 0.0 and d[0, 3] == 1.0  # "i j" = i sends to j
  j1 = tmp_path / "adj.json"
  j1.write_text(json.dumps(want.tolist()))
  np.testing.assert_array_equal(topo.from_file(str(j1)), want)
  j1b = tmp_path / "adj_obj.json"
  j1b.write_text(json.dumps({"adjacency": want.astype(int).tolist()}))
  np.testing.assert_array_equal(topo.from_file(str(j1b)), want)
  j2 = tmp_path / "edges.json"
  j2.write_text(json.dumps({"edges": [[0, 1], [1, 2, 1], [3, 0], [4, 2]], "num_nodes": 5}))
  a2 = topo.from_file(str(j2))
  assert a2.shape == (5, 5)
  np.testing.assert_array_equal(a2[:4, :4], want)
  assert a2[4, 2] == a2[2, 4] == 1.0 and a2[4].sum() == 1.0


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


_MATRIX_3 = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
# (file name, contents, regex the one-line message must match after the path)
_BAD_FILES = {
  "malformed_line": ("g.txt", "0 1\n1 2 1 7\n", r":2: expected 'i j'"),
  "matrix_as_text": ("g.txt", "0 1 1 0\n1 0 1 1\n", r":1: expected 'i j'"),
  "non_integer_id": ("g.txt", "0 1\n1 x\n", r":2: node id 'x' is not an integer"),
  "float_id": ("g.txt", "0 1\n1 2.0\n", r":2: node id '2.0' is not an integer"),
  "negative_id": ("g.txt", "0 1\n-1 0\n", r":2: negative node id -1"),
  "negative_weight": ("g.txt", "0 1\n1 2 -1\n", r":2: negative weight"),
  "nan_weight": ("g.txt", "0 1 nan\n1 2\n", r":1: weight nan is not finite"),
  "inf_weight": ("g.txt", "0 1\n1 2 inf\n", r":2: weight inf is not finite"),
  "weight_not_one": ("g.txt", "0 1 0.5\n1 2\n", r":1: weight 0.5: only the graph's support"),
  "weight_not_number": ("g.txt", "0 1 heavy\n1 2\n", r":1: weight 'heavy' is not a number"),
  "isolated_node": ("g.txt", "0 1\n1 3\n", r"node\(s\) \[2\] have no link to any other node"),
  "self_loop_only": ("g.txt", "0 1\n2 2\n", r"node\(s\) \[2\] have no link"),
  "two_pieces": ("g.txt", "0 1\n2 3\n", r"not connected: node\(s\) \[2, 3\] cannot reach node 0"),
  "empty": ("g.txt", "# nothing\n", r"no edges"),
  "invalid_json": ("g.json", "[[0, 1], [1, 0]", r"invalid JSON"),
  "ragged": ("g.json", json.dumps([[0, 1, 1], [1, 0], [1, 1, 0]]), r"ragged adjacency matrix: row 1 has 2"),
  "non_square": ("g.json", json.dumps([[0, 1, 1], [1, 0, 1]]), r"2x3, not square"),
  "non_numeric": (
    "g.json",
    json.dumps([[0, "1", 1], [1, 0, 1], [1, 1, 0]]),
    r"adjacency\[0\]\[1\]: '1' is not a number",
  ),
  "null_entry": (
    "g.json",
    json.dumps([[0, None, 1], [1, 0, 1], [1, 1, 0]]),
    r"adjacency\[0\]\[1\]: None is not a number",
  ),
  "matrix_negative": (
    "g.json",
    json.dumps([[0, -1, 1], [1, 0, 1], [1, 1, 0]]),
    r"adjacency\[0\]\[1\]: negative weight -1",
  ),
  "matrix_nan": ("g.json", "[[0, NaN, 1], [1, 0, 1], [1, 1, 0]]", r"weight nan is not finite"),
  "matrix_inf": ("g.json", "[[0, 1, Infinity], [1, 0, 1], [1, 1, 0]]", r"weight inf is not finite"),
  "mixing_matrix": (
    "g.json",
    json.dumps([[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]]),
    r"adjacency\[0\]\[0\]: weight 0.5: only the graph's support .*Metropolis-Hastings",
  ),
  "matrix_isolated": ("g.json", json.dumps([[0, 1, 0], [1, 0, 0], [0, 0, 1]]), r"node\(s\) \[2\] have no link"),
  "edges_negative_id": ("g.json", json.dumps({"edges": [[0, 1], [1, -2]]}), r"edges\[1\]: negative node id -2"),
  "edges_bad_shape": ("g.json", json.dumps({"edges": [[0, 1], [1]]}), r"edges\[1\]: expected \[i, j\]"),
  "edges_out_of_range": (
    "g.json",
    json.dumps({"edges": [[0, 1], [1, 5]], "num_nodes": 3}),
    r"edge \(1, 5\) names a node >= num_nodes=3",
  ),
  "edges_bad_num_nodes": (
    "g.json",
    json.dumps({"edges": [[0, 1]], "num_nodes": -3}),
    r"'num_nodes'=-3 must be a positive integer",
  ),
  "unknown_key": ("g.json", json.dumps({"edge": [[0, 1]]}), r"expected 'edges'"),
  "binary": ("g.txt", None, r"cannot read it as text"),
}


@pytest.mark.parametrize("case", sorted(_BAD_FILES))
def test_from_file_refuses_bad_files(tmp_path, case):
  name, text, pattern = _BAD_FILES[case]
  path = tmp_path / name
  if text is None:
    path.write_bytes(b"\xff\xfe\x00\x81 binary")
  else:
    path.write_text(text)
  with pytest.raises(topo.TopologyError) as err:
    topo.from_file(str(path))
  msg = str(err.value)
  assert msg.startswith(f"{path}") and "\n" not in msg, msg
  assert re.search(pattern, msg), (pattern, msg)
  assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_from_file_missing_file_and_directory(tmp_path):
  with pytest.raises(topo.TopologyError, match=r"nope\.txt: topology file not found"):
    topo.from_file(str(tmp_path / "nope.txt"))
  with pytest.raises(topo.TopologyError, match=r"is a directory, not a topology file"):
    topo.from_file(str(tmp_path))


def test_from_file_support_feeds_metropolis_hastings(tmp_path):
  """The 3-node path 0 - 1 - 2 from a file gives the hand-computed Metropolis-Hastings matrix (the
  weights come from the degrees 1, 2, 1, not from the file)."""
  for text, name in [
    ("0 1\n1 2\n", "p.txt"),
    (json.dumps([[0, 1, 0], [1, 0, 1], [0, 1, 0]]), "p.json"),
    (json.dumps([[1, 1, 0], [1, 1, 1], [0, 1, 1]]), "p_diag.json"),
  ]:
    w = topo.metropolis_hastings(topo.from_file(_write(tmp_path, name, text)))
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]], atol=1e-6)
  np.testing.assert_array_equal(topo.from_file(_write(tmp_path, "one.json", "[[0]]")), [[0.0]])  # one silo


def test_gaia_file_from_package_data(tmp_path, monkeypatch):
  """gaia_adjacency reads topologies/gaia.txt of the package fedkd.configs when it is importable (a
  stand-in package holding a 3-node path here), else the source tree's configs/topologies/gaia.txt."""
  import importlib.util
  import sys

  pkg = tmp_path / "configs_pkg"
  (pkg / "topologies").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "topologies" / "gaia.txt").write_text("0 1\n1 2\n")
  spec = importlib.util.spec_from_file_location(
    "fedkd.configs", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setitem(sys.modules, "fedkd.configs", module)
  np.testing.assert_array_equal(topo.gaia_adjacency(), [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
  monkeypatch.delitem(sys.modules, "fedkd.configs")
  monkeypatch.setattr(topo, "_gaia_resource", lambda: None)
  assert topo.gaia_adjacency().shape == (11, 11)  # the source-tree copy
  monkeypatch.setattr(topo, "GAIA_PATH", str(tmp_path / "missing" / "gaia.txt"))
  with pytest.raises(topo.TopologyError, match="Gaia topology file is missing"):
    topo.gaia_adjacency()


def test_metropolis_hastings_values():
  # path 0 - 1 - 2: degrees 1, 2, 1
  a = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
  w = topo.metropolis_hastings(a)
  np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]], atol=1e-6)


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
  assert not np.array_equal(w1, topo.matcha(gaia, 0.3, 12, 4)) or not np.array_equal(
    topo.matcha(gaia, 0.3, 11, 5), topo.matcha(gaia, 0.3, 12, 5)
  )
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


# ----------------------------------------------------------------------------- directed graphs


def _push_sum(a, x0, iters=500):
  """Push-sum by hand (numpy, float64): x <- A x, w <- A w, estimate x / w."""
  a = np.asarray(a, np.float64)
  x, w = np.asarray(x0, np.float64).copy(), np.ones(len(x0))
  for _ in range(iters):
    x, w = a @ x, a @ w
  return x / w


def _unbalanced_digraph(n=9, seed=3):
  """A directed ring 0 -> 1 -> ... -> n-1 -> 0 (strongly connected) plus random one-way chords;
  rows = receivers (a[i, j] = 1: j -> i). Unbalanced by construction (checked)."""
  rng = np.random.default_rng(seed)
  a = np.zeros((n, n), bool)
  for i in range(n):
    a[(i + 1) % n, i] = True
  chords = (rng.random((n, n)) < 0.3) & ~a.T  # one-way only
  np.fill_diagonal(chords, False)
  a |= chords
  assert not topo.is_balanced(a) and not topo.is_symmetric(a)
  return a


def _mh_loop(adjacency):
  """Metropolis-Hastings by definition, entry by entry (the undirected support)."""
  s = (np.asarray(adjacency) != 0) | (np.asarray(adjacency) != 0).T
  n = len(s)
  deg = [sum(1 for j in range(n) if j != i and s[i, j]) for i in range(n)]
  w = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      if i != j and s[i, j]:
        w[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
    w[i, i] = 1.0 - w[i].sum()
  return w


def test_push_sum_on_the_directed_gaia_ring_reaches_the_average():
  adj = topo.gaia_ring_adjacency()
  order = topo.GAIA_RING_ORDER
  for k in range(11):  # order[k + 1] receives from order[k]; neighbour_table gives in-neighbours
    assert adj[order[(k + 1) % 11], order[k]] and not adj[order[k], order[(k + 1) % 11]]
  idx, mask = topo.neighbour_table(adj)
  assert mask.all() and idx.shape == (11, 1)
  assert [int(idx[order[(k + 1) % 11], 0]) for k in range(11)] == list(order)
  a = topo.push_sum_matrix(adj)
  assert topo.is_column_stochastic(a) and a.dtype == np.float32
  np.testing.assert_array_equal(a, topo.gaia_ring())  # out-degree 1: keep half, send half
  x0 = np.random.default_rng(0).normal(size=11)
  np.testing.assert_allclose(_push_sum(a, x0), np.full(11, x0.mean()), atol=1e-6)
  # balanced: directed_mixing gives the doubly stochastic ring, no push-sum weights needed
  assert topo.is_balanced(adj)
  w, push = topo.directed_mixing(adj)
  assert not push and topo.is_doubly_stochastic(w)
  np.testing.assert_array_equal(w, topo.gaia_ring())


def test_push_sum_on_an_unbalanced_digraph_and_why_it_is_needed():
  adj = _unbalanced_digraph()
  n = len(adj)
  a = topo.push_sum_matrix(adj)
  assert topo.is_column_stochastic(a) and not topo.is_doubly_stochastic(a)
  for j in range(n):  # sender j splits equally over itself and its out-neighbours
    outs = [i for i in range(n) if adj[i, j]]
    np.testing.assert_allclose(a[[j] + outs, j], 1.0 / (1 + len(outs)), rtol=1e-6)
    assert np.count_nonzero(a[:, j]) == 1 + len(outs)
  x0 = np.random.default_rng(1).normal(size=n) * 3
  np.testing.assert_allclose(_push_sum(a, x0), np.full(n, x0.mean()), atol=1e-6)
  # plain averaging over in-neighbours (row-normalised) reaches consensus on a WRONG, weighted value
  row = (adj | np.eye(n, dtype=bool)).astype(np.float64)
  row /= row.sum(1, keepdims=True)
  x = x0.copy()
  for _ in range(500):
    x = row @ x
  assert np.ptp(x) < 1e-9  # consensus ...
  assert abs(x[0] - x0.mean()) > 1e-2  # ... but not on the average
  w, push = topo.directed_mixing(adj)
  assert push
  np.testing.assert_array_equal(w, a)


def test_push_sum_round_is_push_sum_on_debiased_models():
  """Mixing z = x / w with push_sum_round(A, r) row-stochastic matrices, round after round, is exactly
  push-sum (and what aggregate.mix does with it)."""
  a = topo.push_sum_matrix(_unbalanced_digraph(7, seed=5))
  x0 = np.random.default_rng(2).normal(size=(7, 3))
  x, w = x0.copy(), np.ones(7)
  z = x0.copy()
  for r in range(60):
    m = topo.push_sum_round(a, r)
    assert m.dtype == np.float32 and np.allclose(m.sum(1), 1.0, atol=1e-6) and (m >= 0).all()
    np.testing.assert_allclose(topo.push_sum_weights(a, r), w, rtol=1e-6)
    x, w = a.astype(np.float64) @ x, a.astype(np.float64) @ w
    z = np.asarray(mix(m, {"z": jnp.asarray(z, jnp.float32)})["z"], np.float64)
    np.testing.assert_allclose(z, x / w[:, None], atol=1e-5)
  for _ in range(400):
    z = topo.push_sum_round(a, 500).astype(np.float64) @ z
  np.testing.assert_allclose(z, np.broadcast_to(x0.mean(0), z.shape), atol=1e-4)
  np.testing.assert_array_equal(topo.push_sum_round(topo.gaia_ring(), 7), topo.gaia_ring())  # doubly stochastic
  with pytest.raises(ValueError, match="column-stochastic"):
    topo.push_sum_round(np.array([[0.5, 0.5], [0.0, 0.0]]), 0)


def test_balanced_digraph_gets_a_doubly_stochastic_matrix():
  """Two directed cycles through node 0 (0->1->2->0, 0->3->0): balanced but not regular. The uniform
  in-neighbour average is not doubly stochastic there; balanced_mixing is, and keeps the average."""
  adj = np.zeros((4, 4), bool)
  for i, j in [(0, 1), (1, 2), (2, 0), (0, 3), (3, 0)]:
    adj[j, i] = True  # i -> j
  assert topo.is_balanced(adj) and not topo.is_symmetric(adj) and topo.is_strongly_connected(adj)
  uniform = (adj | np.eye(4, dtype=bool)) / (1.0 + adj.sum(1, keepdims=True))
  assert not topo.is_doubly_stochastic(uniform)
  w, push = topo.directed_mixing(adj)
  assert not push and topo.is_doubly_stochastic(w) and (np.diag(w) > 0).all()
  assert ((w > 0) == (adj | np.eye(4, dtype=bool))).all()
  x0 = np.array([1.0, -2.0, 5.0, 0.5])
  x = x0.copy()
  for _ in range(200):
    x = w.astype(np.float64) @ x
  np.testing.assert_allclose(x, np.full(4, x0.mean()), atol=3e-5)  # float32 weights (1/3): ~1e-7 per round
  with pytest.raises(topo.TopologyError, match="in-degree == out-degree"):
    topo.balanced_mixing(_unbalanced_digraph())


def test_not_strongly_connected_digraphs_are_refused():
  chain = np.zeros((3, 3), bool)
  chain[1, 0] = chain[2, 1] = chain[1, 2] = True  # 0 -> 1 <-> 2: nothing reaches 0
  assert not topo.is_strongly_connected(chain) and topo.is_strongly_connected(topo.gaia_ring_adjacency())
  for call in (topo.push_sum_matrix, topo.directed_mixing, topo.check_strongly_connected):
    with pytest.raises(topo.TopologyError, match=r"not strongly connected .*node 0 never receives .*\[1, 2\]") as e:
      call(chain)
    assert "add links" in str(e.value) and isinstance(e.value, UserError)
  with pytest.raises(topo.TopologyError, match=r"node\(s\) \[2\] never receive node 0's model"):
    topo.check_strongly_connected(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]]))  # undirected, node 2 cut off
  topo.check_strongly_connected(np.zeros((1, 1)))  # one silo is fine


def test_directed_files_stay_directed(tmp_path):
  p = _write(tmp_path, "d.txt", "0 1\n1 2\n2 3\n3 0\n0 2\n")  # a directed 4-cycle plus the chord 0 -> 2
  d = topo.from_file(p, directed=True)
  want = np.zeros((4, 4), np.float32)
  for i, j in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]:
    want[j, i] = 1.0
  np.testing.assert_array_equal(d, want)
  assert topo.neighbours(d) == [[3], [0], [0, 1], [2]]  # in-neighbours
  w, push = topo.directed_mixing(d)
  assert push and topo.is_column_stochastic(w)
  j = _write(tmp_path, "d.json", json.dumps({"edges": [[0, 1], [1, 2], [2, 0]], "directed": True}))
  assert topo.directed_mixing(topo.from_file(j))[1] is False  # a directed 3-cycle is balanced
  np.testing.assert_array_equal(topo.directed_mixing(topo.from_file(j))[0], topo.ring(3, directed=True))
  # undirected files: Metropolis-Hastings as before
  u = topo.from_file(p)
  w, push = topo.directed_mixing(u)
  assert not push
  np.testing.assert_array_equal(w, topo.metropolis_hastings(u))


def test_metropolis_hastings_unchanged_for_undirected_graphs():
  rng = np.random.default_rng(11)
  for n in (2, 5, 11):
    g = np.triu(rng.random((n, n)) < 0.4, 1)
    g[np.arange(n - 1), np.arange(1, n)] = True  # a path keeps it connected
    g = g | g.T
    np.testing.assert_allclose(topo.metropolis_hastings(g), _mh_loop(g), atol=1e-6)
    w, push = topo.directed_mixing(g)
    assert not push
    np.testing.assert_array_equal(w, topo.metropolis_hastings(g))
  gaia = topo.gaia_adjacency()
  np.testing.assert_allclose(topo.directed_mixing(gaia)[0], np.full((11, 11), 1 / 11), atol=1e-6)
