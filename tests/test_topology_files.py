"""Topology files named from the home directory, JSON matrices that say whether they are directed, and
the MATCHA mixing numbers that docs/fedefm.md quotes."""

import json
import os
import re

import numpy as np
import pytest

from fedkd.config import fedefm_base_config
from fedkd.fl import topology as topo
from fedkd.tasks.fedefm import load_adjacency

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "fedefm.md")


def test_a_topology_file_under_the_home_directory(tmp_path, monkeypatch):
  """``--config.fedefm.topology=file:~/graphs/c4.txt`` reaches Python with the ``~`` unexpanded (the shell
  expands it only at the start of a word); every other path of fedkd (workdirs, data dirs) expands it."""
  home = tmp_path / "home"
  (home / "graphs").mkdir(parents=True)
  (home / "graphs" / "c4.txt").write_text("0 1\n1 2\n2 3\n3 0\n")
  monkeypatch.setenv("HOME", str(home))
  want = np.zeros((4, 4), bool)
  for i in range(4):
    want[i, (i + 1) % 4] = want[(i + 1) % 4, i] = True
  np.testing.assert_array_equal(topo.from_file("~/graphs/c4.txt") != 0, want)
  c = fedefm_base_config()
  c.pretrain.num_silos = 4
  c.fedefm.topology = "file:~/graphs/c4.txt"
  np.testing.assert_array_equal(load_adjacency(c), want)
  with pytest.raises(topo.TopologyError, match=re.escape(f"{home}/graphs/nope.txt: topology file not found")):
    topo.from_file("~/graphs/nope.txt")  # the message names the file that was looked for


def test_a_json_matrix_says_whether_it_is_directed(tmp_path):
  """``{"adjacency": ..., "directed": true}`` is read like the edge form's ``"directed"`` (the file's word
  wins); it used to be refused as an unexpected key with no way out named. A true / false matrix (numpy
  bool arrays dump so) is refused with the fix named."""
  cycle = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]  # a directed 3-cycle, rows = receivers
  path = tmp_path / "d.json"
  path.write_text(json.dumps({"adjacency": cycle, "directed": True}))
  for caller in (False, True):
    a = topo.from_file(str(path), directed=caller)
    np.testing.assert_array_equal(a, cycle)
    w, push = topo.directed_mixing(a)
    np.testing.assert_allclose(w, [[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]])  # keep half, half from the sender
    assert not push
  undirected = tmp_path / "u.json"
  undirected.write_text(json.dumps({"adjacency": cycle, "directed": False}))
  with pytest.raises(topo.TopologyError, match=r'not symmetric .*write "directed": true in the file') as e:
    topo.from_file(str(undirected), directed=True)  # the file's false wins, and the fix says where to change it
  assert str(e.value).startswith(str(undirected)) and "\n" not in str(e.value)
  sym = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
  undirected.write_text(json.dumps({"adjacency": sym, "directed": False}))
  np.testing.assert_array_equal(topo.from_file(str(undirected), directed=True), sym)
  bad = {
    "v.json": ({"adjacency": sym, "directed": "yes"}, r"'directed' must be true or false, got 'yes'"),
    "k.json": ({"adjacency": sym, "weights": 1}, r"unexpected key\(s\) \['weights'\] next to 'adjacency'"),
    "b.json": ([[False, True], [True, False]], r"adjacency\[0\]\[0\]: False is not a number; write 1 for a link"),
    "e.json": ({"edges": [[0, 1, True]]}, r"edges\[0\]: True is not a number; drop the weight or write 1"),
  }
  for name, (obj, pattern) in bad.items():
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    with pytest.raises(topo.TopologyError, match=pattern) as e:
      topo.from_file(str(p))
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def _laplacian(n, edges):
  lap = np.zeros((n, n))
  for i, j in edges:
    lap[i, i] += 1
    lap[j, j] += 1
    lap[i, j] -= 1
    lap[j, i] -= 1
  return lap


def test_matcha_mixing_numbers_quoted_in_the_docs():
  """docs/fedefm.md: on 11 silos (MATCHA over the complete graph) the spectral norm of E[W^T W] - J is
  0.295 at budget 0.5 and 0.826 at 0.1 with alpha = 1 / (1 + max degree), and 0.154 / 0.621 at the
  alpha that minimises it (0.154 / 0.345). With B_k ~ Bernoulli(p) independent and W = I - alpha sum_k
  B_k L_k: E[W^T W] = I - 2 alpha p L + alpha^2 (p^2 (L^2 - sum_k L_k^2) + p sum_k L_k^2), L = sum_k L_k.
  The L_k are the Laplacians of the matchings, checked against matcha's own matrices with every
  matching active and with none; the expectation is checked against matcha's draws."""
  n = 11
  base = ~np.eye(n, dtype=bool)
  ms = topo.matching_decomposition(base)
  laps = [_laplacian(n, m) for m in ms]
  lap = sum(laps)
  np.testing.assert_allclose(lap, n * np.eye(n) - 1.0)  # every edge of K11 in exactly one matching
  np.testing.assert_allclose(topo.matcha(base, 1.0, 0, 0), np.eye(n) - lap / n, atol=1e-7)
  np.testing.assert_array_equal(topo.matcha(base, 0.0, 0, 0), np.eye(n))
  sq = sum(lk @ lk for lk in laps)
  j = np.full((n, n), 1.0 / n)

  def norm(alpha, p):
    e = np.eye(n) - 2 * alpha * p * lap + alpha**2 * (p * p * (lap @ lap - sq) + p * sq)
    return np.linalg.norm(e - j, 2)

  alphas = np.linspace(0.01, 0.6, 5901)
  quoted = {0.5: (0.295, 0.154, 0.154), 0.1: (0.826, 0.621, 0.345)}
  for p, (at_safe, best, best_alpha) in quoted.items():
    assert norm(1.0 / n, p) == pytest.approx(at_safe, abs=6e-4)
    vals = [norm(a, p) for a in alphas]
    k = int(np.argmin(vals))
    assert vals[k] == pytest.approx(best, abs=6e-4) and alphas[k] == pytest.approx(best_alpha, abs=6e-4)
  text = " ".join(open(DOCS, encoding="utf-8").read().split())
  assert "0.295 at budget 0.5 and 0.826 at 0.1, against 0.154 and 0.621" in text
  assert "(alpha = 0.154 and 0.345 there)" in text
  # the closed form is matcha's: E[W^T W] over its seeded draws (budget 0.5, 4,000 rounds)
  draws = [topo.matcha(base, 0.5, 5, r).astype(np.float64) for r in range(4000)]
  emp = np.mean([w.T @ w for w in draws], axis=0)
  want = np.eye(n) - lap / n + (0.25 * (lap @ lap - sq) + 0.5 * sq) / n**2
  np.testing.assert_allclose(emp, want, atol=0.01)
