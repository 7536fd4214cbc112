"""Topologies as a demanding user meets them: awkward files, huge graphs, MATCHA's schedule, push-sum
against numpy references, and a bad file through the FedEFM command line."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from fedkd.fl import topology as topo


def _edges(adjacency):
  a = np.asarray(adjacency) != 0
  a = a | a.T
  return {(i, j) for i in range(len(a)) for j in range(i + 1, len(a)) if a[i, j]}


def _graph(n, edges):
  a = np.zeros((n, n), bool)
  for i, j in edges:
    a[i, j] = a[j, i] = True
  return a


def _cycle(n):
  return _graph(n, [(i, (i + 1) % n) for i in range(n)])


def _petersen():
  outer = [(i, (i + 1) % 5) for i in range(5)]
  spokes = [(i, i + 5) for i in range(5)]
  inner = [(5 + i, 5 + (i + 2) % 5) for i in range(5)]
  return _graph(10, outer + spokes + inner)


def _greedy_reference(adjacency):
  """Greedy edge colouring by hand: edges (i < j) in lexicographic order, each the smallest colour free
  at both ends."""
  edges = sorted(_edges(adjacency))
  used = {}
  out = []
  for i, j in edges:
    c = 0
    while c in used.get(i, set()) or c in used.get(j, set()):
      c += 1
    used.setdefault(i, set()).add(c)
    used.setdefault(j, set()).add(c)
    while len(out) <= c:
      out.append([])
    out[c].append((i, j))
  return out


def _complete(n):
  return ~np.eye(n, dtype=bool)


def _random_graph(n, p, seed):
  rng = np.random.default_rng(seed)
  g = np.triu(rng.random((n, n)) < p, 1)
  return g | g.T


# (graph, lower bound on the number of matchings: the chromatic index is at least the max degree, and
# 3 for odd cycles, 4 for the Petersen graph, n for the complete graph on an odd number n of nodes)
_GRAPHS = {
  "triangle": (_cycle(3), 3),
  "c5": (_cycle(5), 3),
  "c9": (_cycle(9), 3),
  "c8": (_cycle(8), 2),
  "k5": (_graph(5, [(i, j) for i in range(5) for j in range(i + 1, 5)]), 5),
  "k11": (_complete(11), 11),
  "petersen": (_petersen(), 4),
  "star": (_graph(6, [(0, k) for k in range(1, 6)]), 5),
  "random": (_random_graph(25, 0.3, 4), 1),
  "two_nodes": (_graph(2, [(0, 1)]), 1),
  "one_node": (np.zeros((1, 1), bool), 0),
  "no_edges": (np.zeros((4, 4), bool), 0),
}


@pytest.mark.parametrize("name", sorted(_GRAPHS))
def test_matching_decomposition_is_a_valid_edge_colouring(name):
  g, lower = _GRAPHS[name]
  ms = topo.matching_decomposition(g)
  want = _edges(g)
  flat = [e for m in ms for e in m]
  assert sorted(flat) == sorted(want)  # every edge exactly once, as (i < j)
  for m in ms:
    assert m  # no empty matching
    ends = [x for e in m for x in e]
    assert len(ends) == len(set(ends)), m  # no two edges share a node
  deg = int(g.sum(1).max()) if g.size else 0
  assert lower <= len(ms) <= max(0, 2 * deg - 1)
  assert ms == _greedy_reference(g)


def test_matching_decomposition_reads_only_the_support():
  """Self loops, weights, one-way entries and duplicates do not change the matchings of the
  symmetrised graph."""
  g = _cycle(7)
  messy = g.astype(np.float64) * 3.5
  messy[np.triu_indices(7, 1)] = 0  # keep only one direction of every link
  np.fill_diagonal(messy, 1.0)
  assert topo.matching_decomposition(messy) == topo.matching_decomposition(g) == _greedy_reference(g)
  np.testing.assert_array_equal(topo.matcha(messy, 0.5, 3, 2), topo.matcha(g, 0.5, 3, 2))


def test_matcha_schedule_follows_the_paper():
  """MATCHA (Wang et al. 2019): each matching is activated by an independent Bernoulli draw with its
  probability (here every matching the budget) and W = I - alpha sum_j B_j L_j, so E[W] = I - alpha p L
  with L the base graph's Laplacian. Checked on an odd cycle and on the complete graph of the task."""
  for g in (_cycle(5), _complete(11), _petersen()):
    n = len(g)
    ms = topo.matching_decomposition(g)
    deg = g.sum(1)
    alpha = 1.0 / (1.0 + deg.max())
    lap = np.diag(deg).astype(np.float64) - g
    p, rounds = 0.3, 3000
    on = np.array([topo.matcha_activation(len(ms), p, 5, r) for r in range(rounds)])
    freq = on.mean(0)
    sd = np.sqrt(p * (1 - p) / rounds)
    assert np.all(np.abs(freq - p) < 4.5 * sd), freq
    both = (on[:, :, None] & on[:, None, :]).mean(0)[~np.eye(len(ms), dtype=bool)]  # independent draws
    assert np.all(np.abs(both - p * p) < 4.5 * np.sqrt(p * p * (1 - p * p) / rounds)), both
    mean_w = np.zeros((n, n))
    for r in range(400):
      w = topo.matcha(g, p, 5, r).astype(np.float64)
      assert np.allclose(w, w.T) and topo.is_doubly_stochastic(w) and (w >= 0).all()
      active = on[r]
      want = np.eye(n)
      for m, a in zip(ms, active):  # W from the activated matchings, edge by edge
        for i, j in m:
          if a:
            want[i, j] = want[j, i] = alpha
            want[i, i] -= alpha
            want[j, j] -= alpha
      np.testing.assert_allclose(w, want, atol=1e-6)
      mean_w += w / 400
    np.testing.assert_allclose(mean_w, np.eye(n) - alpha * p * lap, atol=0.05)


def test_matcha_budgets_and_determinism():
  g = _petersen()
  ms = topo.matching_decomposition(g)
  alpha = 1.0 / 4.0
  for r in range(5):
    np.testing.assert_array_equal(topo.matcha(g, 0.0, 1, r), np.eye(10, dtype=np.float32))  # budget 0: no link
    full = topo.matcha(g, 1.0, 1, r)  # budget 1: every link, every round
    np.testing.assert_allclose(full, np.eye(10) - alpha * (np.diag(g.sum(1)) - g), atol=1e-7)
  for bad in (1.01, -0.1, float("nan"), 2):
    with pytest.raises(ValueError, match="budget must be in"):
      topo.matcha(g, bad, 0, 0)
  # a function of (seed, round): the same draw in every call and process (numpy's PCG64 stream, MATCHA's stream
  # named by spawn key 3, fedkd.streams)
  for seed, r in ((0, 0), (3, 7), (2**32 - 1, 1000)):
    want = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, r))).random(len(ms)) < 0.4
    np.testing.assert_array_equal(topo.matcha_activation(len(ms), 0.4, seed, r), want)
    np.testing.assert_array_equal(topo.matcha(g, 0.4, seed, r), topo.matcha(g.astype(float), 0.4, seed, r))
  draws = {topo.matcha_activation(30, 0.5, 0, r).tobytes() for r in range(50)}
  assert len(draws) > 40  # rounds draw differently


def test_matcha_on_a_thousand_node_graph_is_fast():
  """The task asks for MATCHA's matrix every round: on the complete graph of 1,000 silos a round's
  matrix took 34 s (the greedy colouring alone 22 s); the colouring is now computed once."""
  g = topo.complete(1000) > 0
  t0 = time.perf_counter()
  ws = [topo.matcha(g, 0.5, 0, r) for r in (1, 2, 3)]
  took = time.perf_counter() - t0
  assert took < 15, took
  sizes = np.array([len(m) for m in topo.matching_decomposition(g)])
  assert sizes.sum() == 1000 * 999 // 2
  for r, w in zip((1, 2, 3), ws):
    assert w.shape == (1000, 1000) and topo.is_doubly_stochastic(w, atol=1e-4)
    off = w[~np.eye(1000, dtype=bool)]
    assert set(np.unique(off).tolist()) == {0.0, np.float32(1 / 1000)}
    active = topo.matcha_activation(len(sizes), 0.5, 0, r)
    assert (off > 0).sum() == 2 * sizes[active].sum()  # the links of the active matchings


# ----------------------------------------------------------------------------- push-sum


def _unbalanced(n, seed, chords=3):
  """Directed ring 0 -> 1 -> ... -> 0 plus a few one-way chords (rows = receivers)."""
  rng = np.random.default_rng(seed)
  a = np.zeros((n, n), bool)
  a[(np.arange(n) + 1) % n, np.arange(n)] = True
  for _ in range(chords):
    i, j = rng.choice(n, 2, replace=False)
    if not a[j, i]:
      a[i, j] = True
  assert not topo.is_balanced(a) and topo.is_strongly_connected(a)
  return a


def test_push_sum_weights_against_power_iteration():
  """w_r = A^r 1 (numpy matrix powers) for any order of calls and matrices, and w_r -> N pi with pi
  the stationary vector of A (numpy's eigenvector for eigenvalue 1)."""
  a = topo.push_sum_matrix(_unbalanced(30, 1, chords=12)).astype(np.float64)
  b = topo.push_sum_matrix(_unbalanced(12, 2)).astype(np.float64)
  for m, r in ((a, 0), (a, 5), (a, 3), (a, 200), (b, 4), (a, 201), (a, 201), (b, 0), (a, 7)):
    np.testing.assert_allclose(topo.push_sum_weights(m, r), np.linalg.matrix_power(m, r) @ np.ones(len(m)), rtol=1e-9)
  w = topo.push_sum_weights(a, 9)
  w[:] = -1.0  # the caller's copy
  np.testing.assert_allclose(topo.push_sum_weights(a, 9), np.linalg.matrix_power(a, 9).sum(1), rtol=1e-9)
  vals, vecs = np.linalg.eig(a)
  pi = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
  pi /= pi.sum()
  w = topo.push_sum_weights(a, 3000)  # float32 columns sum to 1 within ~1e-7: w.sum() drifts from N as slowly
  np.testing.assert_allclose(w / w.sum(), pi, rtol=1e-6)
  assert abs(w.sum() - 30) < 1e-2
  assert np.ptp(pi) > 0.01  # unbalanced: the weights really differ


def test_push_sum_keeps_the_weighted_sum_and_reaches_the_average():
  """Between mixings the silos change their models (local training): push_sum_round keeps
  sum_i w_i z_i (w the push-sum weights, not the plain mean), and plain push-sum reaches the true
  average of the starting values on a 200-node unbalanced digraph (numpy loop x <- A x, w <- A w)."""
  adj = _unbalanced(9, 3, chords=5)
  a = topo.push_sum_matrix(adj)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(9, 4))
  mean_moved = 0.0
  for r in range(40):
    z = z + 0.1 * rng.normal(size=z.shape)  # local training
    w, w_next = topo.push_sum_weights(a, r), topo.push_sum_weights(a, r + 1)
    mixed = topo.push_sum_round(a, r).astype(np.float64) @ z
    np.testing.assert_allclose(w_next @ mixed, w @ z, rtol=1e-5, atol=1e-5)
    mean_moved = max(mean_moved, np.abs(mixed.mean(0) - z.mean(0)).max())
    z = mixed
  assert mean_moved > 1e-2  # what is kept is the weighted sum, not the plain mean
  big = _unbalanced(200, 4, chords=60)
  a = topo.push_sum_matrix(big).astype(np.float64)
  x0 = rng.normal(size=200)
  x, w = x0.copy(), np.ones(200)
  for _ in range(3000):
    x, w = a @ x, a @ w
  np.testing.assert_allclose(x / w, np.full(200, x0.mean()), atol=1e-6)
  z = x0.copy()
  for r in range(3000):
    z = topo.push_sum_round(a, r).astype(np.float64) @ z
  np.testing.assert_allclose(z, np.full(200, x0.mean()), atol=1e-3)  # float32 round matrices


def test_push_sum_rounds_in_sequence_cost_one_step_each():
  """The task asks for round r's matrix every round: recomputing A^r 1 from scratch made round r cost r
  matrix-vector products (1,000 silos, round 500: 4.8 s for that round alone, growing). The next round now
  costs one more step."""
  a = topo.push_sum_matrix(_unbalanced(400, 5, chords=40))
  t0 = time.perf_counter()
  first = topo.push_sum_round(a, 1500)
  t_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  nxt = topo.push_sum_round(a, 1501)
  t_next = time.perf_counter() - t0
  assert t_next < t_first / 4, (t_first, t_next)
  a64 = a.astype(np.float64)
  w = np.linalg.matrix_power(a64, 1501) @ np.ones(400)
  np.testing.assert_allclose(nxt, a64 * w[None, :] / (a64 @ w)[:, None], rtol=1e-4, atol=1e-9)
  assert np.allclose(first.sum(1), 1.0, atol=1e-5)


def test_small_and_degenerate_graphs():
  """One silo and two silos, undirected and directed; digraphs that are only weakly connected."""
  for w in (topo.ring(1), topo.ring(1, directed=True), topo.metropolis_hastings(np.zeros((1, 1)))):
    np.testing.assert_array_equal(w, [[1.0]])
  np.testing.assert_array_equal(topo.directed_mixing(np.zeros((1, 1)))[0], [[1.0]])
  half = np.full((2, 2), 0.5)
  for w in (
    topo.metropolis_hastings(_graph(2, [(0, 1)])),
    topo.ring(2, directed=True),
    topo.matcha(_graph(2, [(0, 1)]), 1, 0, 0),
  ):
    np.testing.assert_allclose(w, half)
  np.testing.assert_allclose(topo.ring(2), [[1 / 3, 2 / 3], [2 / 3, 1 / 3]], atol=1e-7)
  one_way = np.array([[0, 0], [1, 0]])  # 0 -> 1 only
  assert not topo.is_strongly_connected(one_way)
  with pytest.raises(topo.TopologyError, match=r"node 0 never receives the model of node\(s\) \[1\]"):
    topo.directed_mixing(one_way)
  weak = np.zeros((4, 4))  # 0 <-> 1 -> 2 <-> 3: every node has an in-neighbour, 0 never hears from 2, 3
  for i, j in ((0, 1), (1, 0), (1, 2), (2, 3), (3, 2)):
    weak[j, i] = 1
  with pytest.raises(topo.TopologyError, match=r"node\(s\) \[2, 3\]"):
    topo.push_sum_matrix(weak)


# ----------------------------------------------------------------------------- files


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text, encoding="utf-8")
  return str(p)


def test_mistyped_huge_node_id_is_refused_without_memory(tmp_path):
  """'2 1000000' for '2 3' in an edge list: the file names node 1,000,000, so nodes 3..999,999 have no
  link. Refused as such before an [N, N] matrix (4 TB) is asked for."""
  txt = _write(tmp_path, "typo.txt", "0 1\n1 2\n2 1000000\n")
  js = _write(tmp_path, "typo.json", json.dumps({"edges": [[0, 1], [1, 2], [2, 0]], "num_nodes": 10**9}))
  cases = [
    (txt, {}, r"node\(s\) \[3, 4, 5, 6, 7, 8, 9, 10, 11, 12\] ... have no link .* the file has 1000001 nodes"),
    (js, {}, r"node\(s\) \[3, 4, .*\] ... have no link .* the file has 1000000000 nodes"),
    (_write(tmp_path, "ok.txt", "0 1\n1 2\n2 0\n"), {"num_nodes": 10**7}, r"node\(s\) \[3, .*has 10000000 nodes"),
  ]
  for path, kw, pattern in cases:
    tracemalloc.start()
    try:
      with pytest.raises(topo.TopologyError, match=pattern) as e:
        topo.from_file(path, **kw)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < 32 * 2**20, peak
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_a_file_with_more_nodes_than_a_dense_matrix_should_hold(tmp_path):
  """A path over 16,385 nodes: a connected graph, but its dense float32 matrix alone would take 1 GiB (and
  the symmetrised copies of the checks more)."""
  n = 16385
  path = _write(tmp_path, "path.txt", "".join(f"{i} {i + 1}\n" for i in range(n - 1)))
  with pytest.raises(topo.TopologyError, match=rf"{n} nodes; topologies are dense N x N matrices \(1.0 GiB"):
    topo.from_file(path)
  assert topo.MAX_FILE_NODES == n - 1


def test_a_thousand_node_file_loads(tmp_path):
  g = _random_graph(1000, 0.02, 6)
  g[np.arange(999), np.arange(1, 1000)] = True  # a path keeps it connected
  g = g | g.T
  ij = np.argwhere(np.triu(g, 1))
  path = _write(tmp_path, "big.txt", "".join(f"{i} {j}\n" for i, j in ij))
  t0 = time.perf_counter()
  a = topo.from_file(path)
  w, push = topo.directed_mixing(a)
  assert time.perf_counter() - t0 < 10
  np.testing.assert_array_equal(a != 0, g)
  assert not push and topo.is_doubly_stochastic(w)


def test_self_loops_duplicates_and_both_directions_of_a_link(tmp_path):
  clean = topo.from_file(_write(tmp_path, "c.txt", "0 1\n1 2\n2 3\n"))
  messy = topo.from_file(_write(tmp_path, "m.txt", "0 1\n1 0\n1 1\n1 2\n1 2 1\n2 3\n3 3\n"))
  off = ~np.eye(4, dtype=bool)
  np.testing.assert_array_equal(messy[off], clean[off])  # self loops only on the diagonal
  np.testing.assert_array_equal(topo.metropolis_hastings(messy), topo.metropolis_hastings(clean))
  js = topo.from_file(_write(tmp_path, "m.json", json.dumps({"edges": [[0, 1], [0, 1], [1, 2], [2, 2], [3, 2]]})))
  np.testing.assert_array_equal(js[off], clean[off])


def test_asymmetric_matrix_read_as_undirected_is_refused(tmp_path):
  """A matrix with a one-way entry (a directed 3-cycle here, or a typo in an undirected one) read as
  undirected used to come back as is, and the task then mixed it as a directed graph although
  config.fedefm.directed was False."""
  m = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
  for name, text in (("m.json", json.dumps(m)), ("o.json", json.dumps({"adjacency": m}))):
    path = _write(tmp_path, name, text)
    with pytest.raises(
      topo.TopologyError, match=r"not symmetric \(adjacency\[0\]\[1\]=1 but adjacency\[1\]\[0\]=0\).*directed=True"
    ) as e:
      topo.from_file(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)
    d = topo.from_file(path, directed=True)  # read as directed: kept, rows = receivers
    np.testing.assert_array_equal(d, m)
    w, push = topo.directed_mixing(d)
    assert not push and topo.is_doubly_stochastic(w)
  typo = [[0, 1, 1], [1, 0, 1], [1, 0, 0]]  # adjacency[2][1] missing
  with pytest.raises(topo.TopologyError, match=r"adjacency\[1\]\[2\]=1 but adjacency\[2\]\[1\]=0"):
    topo.from_file(_write(tmp_path, "t.json", json.dumps(typo)))
  diag = [[1, 1], [1, 0]]  # a self loop on one side only is not a one-way link
  np.testing.assert_array_equal(topo.from_file(_write(tmp_path, "d.json", json.dumps(diag))), diag)


def test_byte_order_mark_files(tmp_path):
  """Windows editors write a byte-order mark; it is not a node id or JSON."""
  for name, text in (("b.txt", "\ufeff0 1\n1 2\n"), ("b.json", "\ufeff" + json.dumps({"edges": [[0, 1], [1, 2]]}))):
    a = topo.from_file(_write(tmp_path, name, text))
    np.testing.assert_array_equal(a, _graph(3, [(0, 1), (1, 2)]))


def test_num_nodes_of_the_file_and_of_the_caller_must_agree(tmp_path):
  path = _write(tmp_path, "e.json", json.dumps({"edges": [[0, 1], [1, 2], [2, 0]], "num_nodes": 3}))
  assert topo.from_file(path, num_nodes=3).shape == (3, 3)
  with pytest.raises(topo.TopologyError, match=r"the file says 'num_nodes'=3 but num_nodes=4 was asked for"):
    topo.from_file(path, num_nodes=4)
  m = _write(tmp_path, "m.json", json.dumps(_cycle(3).astype(int).tolist()))
  with pytest.raises(topo.TopologyError, match=r"3 nodes but num_nodes=4"):
    topo.from_file(m, num_nodes=4)


# ----------------------------------------------------------------------------- through the command line


def test_asymmetric_matrix_on_the_command_line(cli, tmp_path):
  path = _write(tmp_path, "ring.json", json.dumps([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]))
  work = tmp_path / "w"
  r = cli.run(
    "fedkd.main",
    ["--config=configs/fedefm.py:tiny", f"--workdir={work}", f"--config.fedefm.topology=file:{path}"],
    timeout=240,
  )
  assert r.code == 2 and not r.traceback, (r.code, r.stderr[-2000:])
  lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and "config.fedefm.topology=" in lines[0] and "not symmetric" in lines[0], r.stderr
  assert not work.exists() or not any(work.rglob("*.ckpt*"))
