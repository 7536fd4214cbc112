"""FedEFM's pre-registered endpoints and controls: the paired contrasts of endpoints.md against scipy,
push-sum mixing on a directed graph inside the engine, the FedProx control against a hand-written
update, the partial-label foundation Dice against numpy, the per-round transfer count, and the source-
classification track end to end."""

import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedkd.config import ConfigError

from fedkd.distill.fedefm import FedEFMOptions, FedEFMSilo, stack
from fedkd.fl import engine, topology
from fedkd.fl.algorithm import ClientContext
from fedkd.losses import cross_entropy
from fedkd.sharding import client_mesh, shard_clients

import test_fedefm as tf


def _holm(ps):
  """Holm-Bonferroni written out: sorted ascending, p_(k) * (m - k), running max, capped at 1."""
  m = len(ps)
  order = np.argsort(ps)
  out, running = np.empty(m), 0.0
  for k, i in enumerate(order):
    running = max(running, min(1.0, ps[i] * (m - k)))
    out[i] = running
  return out


def test_endpoint_contrasts_are_paired_t_tests_with_holm(tmp_path):
  from fedkd.tasks.fedefm import write_endpoints

  rng = np.random.default_rng(3)
  methods = ["scratch", "centralized", "fedavg", "matcha", "fedefm", "fedefm_dfl", "fedefm_uniform"]
  seeds = range(6)
  base = {s: rng.normal(0.6, 0.05) for s in seeds}  # a per-seed effect shared by every method
  rows = []
  for m_i, m in enumerate(methods):
    for s in seeds:
      rows.append(
        {
          "unseen_percent": 100.0,
          "method": m,
          "teacher_kd": False,
          "seed": s,
          "foundation": None if m == "scratch" else base[s] + 0.01 * m_i + rng.normal(0, 0.01),
          "dice/catheter": rng.uniform(),
          "dice/guidewire": rng.uniform(),
        }
      )
  lines = write_endpoints(str(tmp_path), rows, 100.0, "segmentation")
  assert (tmp_path / "endpoints.md").read_text() == "\n".join(lines) + "\n"

  def vals(m):
    return np.array([r["foundation"] for r in rows if r["method"] == m])

  pairs = {"P1": ("fedefm", "fedavg"), "P2": ("fedefm_dfl", "matcha"), "P3": ("fedefm", "centralized")}
  ps = {k: stats.ttest_rel(vals(a), vals(b)).pvalue for k, (a, b) in pairs.items()}
  adj = dict(zip(ps, _holm(np.array(list(ps.values())))))
  for k, (a, b) in pairs.items():
    line = next(ln for ln in lines if ln.startswith(f"| {k} |"))
    d = vals(a) - vals(b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]" in line, line
    assert f"p={ps[k]:.3g}" in line and f"(Holm {adj[k]:.3g})" in line, line
    assert line.endswith("significant |") == (adj[k] <= 0.05) or "n.s." in line
  # the per-method row: mean ± sample std and the t-interval of the mean
  v = vals("fedefm")
  row = next(ln for ln in lines if ln.startswith("| fedefm |"))
  half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
  assert f"{v.mean():.3f} ± {v.std(ddof=1):.3f} | [{v.mean() - half:.3f}, {v.mean() + half:.3f}]" in row
  # one control present (C1): its own family of one, no Holm adjustment
  c1 = next(ln for ln in lines if ln.startswith("| C1 |"))
  assert "Holm" not in c1 and f"p={stats.ttest_rel(vals('fedefm'), vals('fedefm_uniform')).pvalue:.3g}" in c1
  assert not any(ln.startswith("| C2 |") for ln in lines)  # fedefm_e0 did not run
  # an unseen-% ablation row set: its foundation table and its own P1 family (one contrast: no Holm)
  abl = [dict(r, unseen_percent=50.0, foundation=r["foundation"] and r["foundation"] - 0.1) for r in rows]
  abl = [r for r in abl if r["method"] in ("fedavg", "fedefm")]
  lines = write_endpoints(str(tmp_path), rows + abl, 100.0, "segmentation")
  at = lines[
    lines.index(
      "**Contrasts at 50% unseen** (paired by seed; 95% t-interval; Holm over the 1 contrasts of this family)"
    ) :
  ]
  p1 = stats.ttest_rel(vals("fedefm") - 0.1, vals("fedavg") - 0.1).pvalue
  assert at[4].startswith("| P1 | fedefm - fedavg | 6 |") and f"p={p1:.3g}" in at[4] and "Holm" not in at[4]
  v = vals("fedefm") - 0.1
  assert f"| 50 | fedefm | 6 | {v.mean():.3f} ± {v.std(ddof=1):.3f} |" in lines


def test_push_sum_on_an_unbalanced_digraph_reaches_the_true_average():
  """DFL on a directed graph through the engine (silos frozen: learning rate 0): mixing with push-sum's
  round matrices (``topology.push_sum_round`` of a column-stochastic A, as the task does) drives every
  silo to the plain average of the initial models; the row-normalised averaging a symmetric recipe would
  use on the same digraph ends at a weighted average instead."""
  n = tf.N
  # 0 -> 1 -> 2 -> 3 -> 0 and 0 -> 2: node 0 has out-degree 2, node 2 in-degree 2 (unbalanced)
  edges = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]
  A, R = np.eye(n), np.eye(n)
  for i, j in edges:  # row = receiver
    A[j, i] = R[j, i] = 1.0
  A = A / A.sum(0, keepdims=True)  # column-stochastic: each node splits its mass over itself + out-nbrs
  R = R / R.sum(1, keepdims=True)  # row-stochastic: each node averages itself + its in-neighbours
  adj = (A > 0) & ~np.eye(n, dtype=bool)
  np.testing.assert_allclose(topology.push_sum_matrix(adj), A)
  p0 = jax.tree.map(
    lambda a: a + jnp.arange(n, dtype=a.dtype).reshape((n,) + (1,) * (a.ndim - 1)), stack(tf.init(0), n)
  )
  target = jax.tree.map(lambda a: np.asarray(a).mean(0), p0)
  xs, ys = tf.data(1)
  mesh = client_mesh(2)
  alg = FedEFMSilo(FedEFMOptions(distill=False, mixing="dfl"), optax.sgd(0.0))
  ctx = ClientContext(lambda p, x: tf.apply_wf(p, x)[0], cross_entropy, optax.sgd(0.0), apply_wf=tf.apply_wf)
  fn = engine.make_round_fn(alg, ctx, mesh, engine.EngineOptions("vmap", "xla", 8, unroll_local_steps=False))
  idx, mask = topology.neighbour_table(adj)
  batch = {"x": jnp.asarray(xs), "y": jnp.asarray(ys), "nbr": jnp.asarray(idx), "nbr_mask": jnp.asarray(mask)}
  batch, weights = shard_clients(batch, mesh), shard_clients(jnp.ones(n), mesh)  # the same every round
  out = {}
  for name in ("push", "rows"):
    rows = shard_clients({"params": p0, "prev": p0}, mesh)
    server = alg.init(None, None)
    for r in range(200):
      W = topology.push_sum_round(A, r) if name == "push" else R
      server, rows, _ = fn(server, rows, batch, weights, jnp.asarray(W, jnp.float32))
    out[name] = jax.tree.map(np.asarray, rows["params"])
  for a, t in zip(jax.tree.leaves(out["push"]), jax.tree.leaves(target)):
    np.testing.assert_allclose(a, np.broadcast_to(t, a.shape), atol=1e-4)
  # plain averaging on the digraph converges to the weighted average of R's left Perron vector pi
  vals, vecs = np.linalg.eig(R.T)
  pi = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
  pi = pi / pi.sum()
  assert np.abs(pi - 1 / n).max() > 0.02
  for a, a0 in zip(jax.tree.leaves(out["rows"]), jax.tree.leaves(p0)):
    want = np.tensordot(pi, np.asarray(a0, np.float64), axes=1)
    np.testing.assert_allclose(a, np.broadcast_to(want, a.shape), atol=1e-4)
  gap = max(float(np.abs(a - t).max()) for a, t in zip(jax.tree.leaves(out["rows"]), jax.tree.leaves(target)))
  assert gap > 0.02


def test_push_sum_training_on_an_unbalanced_digraph_finds_the_plain_averages_optimum():
  """Silos training between push-sum mixings on the unbalanced digraph above: silo i minimises
  |z - c_i|^2 / 2, so the federation's optimum is mean(c). With each silo's steps scaled by 1 / w_i
  (``step_scale``, what the task passes: stochastic gradient-push) the silos' mean settles at mean(c);
  unscaled, every silo's update would count w_i times and the run settles at the w-weighted mean. (One
  local step: more add local SGD's O(lr) client drift to both.)"""
  n, d, lr, rounds = tf.N, 3, 0.1, 150
  A = np.eye(n)
  for i, j in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]:
    A[j, i] = 1.0
  A = A / A.sum(0, keepdims=True)
  adj = (A > 0) & ~np.eye(n, dtype=bool)
  centres = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)

  def apply_wf(p, x):  # a constant "prediction" z per image: the loss below is |z - c_i|^2 / 2
    z = jnp.broadcast_to(p["z"], x.shape[:1] + p["z"].shape)
    return z, z[:, None, None, :]

  def loss_fn(z, c):
    return 0.5 * jnp.mean(jnp.sum((z - c) ** 2, axis=-1))

  S, B = 1, 2
  xs = jnp.zeros((n, S, B, 1, 1, 1))
  ys = jnp.broadcast_to(jnp.asarray(centres)[:, None, None, :], (n, S, B, d))
  mesh = client_mesh(2)
  alg = FedEFMSilo(FedEFMOptions(distill=False, mixing="dfl"), optax.sgd(0.0))
  ctx = ClientContext(lambda p, x: apply_wf(p, x)[0], loss_fn, optax.sgd(lr), apply_wf=apply_wf)
  fn = engine.make_round_fn(alg, ctx, mesh, engine.EngineOptions("vmap", "xla", 8, unroll_local_steps=False))
  idx, mask = topology.neighbour_table(adj)
  p0 = {"z": jnp.zeros((n, d))}
  z = {}
  for scaled in (True, False):
    rows, server = shard_clients({"params": p0, "prev": p0}, mesh), alg.init(None, None)
    for r in range(rounds):
      batch = {"x": xs, "y": ys, "nbr": jnp.asarray(idx), "nbr_mask": jnp.asarray(mask)}
      if scaled:
        batch["step_scale"] = jnp.asarray(1.0 / topology.push_sum_weights(A, r), jnp.float32)
      W = jnp.asarray(topology.push_sum_round(A, r), jnp.float32)
      server, rows, _ = fn(server, rows, shard_clients(batch, mesh), shard_clients(jnp.ones(n), mesh), W)
    z[scaled] = np.asarray(rows["params"]["z"], np.float64)
  # the fixed point: the raw updates lr (c_i - z_i) sum to 0 in push-sum's numerator, so mean(z) = mean(c)
  np.testing.assert_allclose(z[True].mean(0), centres.mean(0), atol=1e-5)
  # unscaled they enter as w_i lr (c_i - z_i): the w-weighted mean of z is that of c, and mean(z) is off
  w = topology.push_sum_weights(A, rounds)[:, None]
  np.testing.assert_allclose((w * z[False]).sum(0), (w * centres).sum(0), atol=1e-5)
  assert np.abs(z[False].mean(0) - centres.mean(0)).max() > 0.03


# a random digraph on 10 silos (networkx gnp_random_graph(10, 0.35, seed=274, directed=True)): its push-sum
# weights dip before they settle, so the largest step scale is not the last round's
DIP = [(0, 1), (0, 3), (0, 4), (0, 6), (0, 9), (1, 3), (2, 4), (2, 6), (3, 8), (4, 7), (5, 0), (5, 1), (5, 4)]
DIP += [(5, 8), (5, 9), (6, 7), (6, 8), (7, 4), (7, 5), (7, 8), (8, 2), (9, 1), (9, 3), (9, 7), (9, 8)]


@pytest.mark.parametrize("edges", [[(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)], DIP])
def test_an_unbalanced_digraph_says_how_much_push_sum_scales_the_silos_steps(edges, tmp_path):
  """The note at the start of such a run names the largest 1 / w_i over the run's rounds (round r mixes with the
  weights of r - 1 earlier mixings), against a numpy power iteration of the column-stochastic push-sum matrix;
  on DIP that peak (about 12.4x, round 6) is above the last round's 8.93x, which the note named before."""
  n = max(max(e) for e in edges) + 1
  path = tmp_path / "g.txt"
  path.write_text("".join(f"{i} {j}\n" for i, j in edges))
  over = {"fedefm.topology": f"file:{path}", "fedefm.directed": True, "fedefm.mixing": "dfl"}
  _, exp = _experiment(tmp_path / "w", **over, **{"pretrain.num_silos": n, "pretrain.num_rounds": 60})
  A = np.eye(n)
  for i, j in edges:
    A[j, i] = 1.0
  A = A / A.sum(0, keepdims=True)
  w, scales = np.ones(n), []
  for r in range(1, 61):
    scales.append((1 / w.min(), int(np.argmin(w)), r))
    w = A @ w
  peak = max(scales)
  assert peak[0] >= scales[-1][0] and (n == 4 or peak[0] > 1.3 * scales[-1][0])
  notes = [n for n in exp.plan_notes() if "push-sum" in n]
  assert len(notes) == 1 and f"up to {peak[0]:.3g}x (silo {peak[1]}, round {peak[2]})" in notes[0], notes


def test_a_digraph_whose_push_sum_weight_vanishes_is_refused_under_gradient_push(tmp_path):
  """A chain 0 -> 1 -> ... -> 29 where every silo also sends to 0: silo 29's push-sum weight falls like 2**-n, so
  by round 100 gradient-push would scale its steps by about 2e7 (inf in float32 from about 140 silos): refused before anything
  is written, naming the fix; unscaled push-sum (gradient_push=False) runs."""
  n = 30
  path = tmp_path / "chain.txt"
  path.write_text("".join(f"{k} {k + 1}\n" for k in range(n - 1)) + "".join(f"{k} 0\n" for k in range(1, n)))
  over = {"fedefm.topology": f"file:{path}", "fedefm.directed": True, "fedefm.mixing": "dfl"}
  over.update({"pretrain.num_silos": n, "pretrain.num_rounds": 100})
  with pytest.raises(
    ConfigError, match=r"silo 29's push-sum weight falls to .* or set config.fedefm.gradient_push=False"
  ):
    _experiment(tmp_path / "w", **over)
  assert not (tmp_path / "w").exists()
  _, exp = _experiment(tmp_path / "w", **over, **{"fedefm.gradient_push": False})
  assert exp.step_scale_peak is None


def test_fedprox_control_equals_hand_written_proximal_sgd():
  """The fedprox control: local SGD on L_seg + mu/2 |q - q_start|^2 (CFL), against a per-silo loop."""
  n, mu, lr = tf.N, 0.7, 0.05
  p0 = jax.tree.map(
    lambda a: a + 0.01 * jnp.arange(n, dtype=a.dtype).reshape((n,) + (1,) * (a.ndim - 1)), stack(tf.init(2), n)
  )
  xs, ys = tf.data(4)
  mesh = client_mesh(2)
  alg = FedEFMSilo(FedEFMOptions(distill=False, mixing="cfl", prox_mu=mu), optax.sgd(0.1))
  ctx = ClientContext(lambda p, x: tf.apply_wf(p, x)[0], cross_entropy, optax.sgd(lr), apply_wf=tf.apply_wf)
  fn = engine.make_round_fn(alg, ctx, mesh, engine.EngineOptions("vmap", "xla", 8, unroll_local_steps=False))
  idx, mask = topology.neighbour_table(topology.ring(n) > 0)
  rows = shard_clients({"params": p0, "prev": p0}, mesh)
  batch = shard_clients(
    {"x": jnp.asarray(xs), "y": jnp.asarray(ys), "nbr": jnp.asarray(idx), "nbr_mask": jnp.asarray(mask)}, mesh
  )
  _, rows, _ = fn(alg.init(None, None), rows, batch, shard_clients(jnp.ones(n), mesh), None)
  seg_grad = jax.jit(jax.grad(lambda p, x, y: cross_entropy(tf.apply_wf(p, x)[0], y)))
  trained = []
  for i in range(n):
    start = jax.tree.map(lambda a: np.asarray(a[i], np.float64), p0)
    q = start
    for s in range(xs.shape[1]):
      g = seg_grad(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), q), xs[i, s], ys[i, s])
      q = jax.tree.map(lambda a, b, a0: a - lr * (np.asarray(b, np.float64) + mu * (a - a0)), q, g, start)
    trained.append(q)
  mean = jax.tree.map(lambda *a: np.mean(a, axis=0), *trained)
  for got, want in zip(jax.tree.leaves(rows["params"]), jax.tree.leaves(mean)):
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(want, got.shape), atol=2e-5)


def _experiment(tmp_path, **over):
  from fedkd.tasks import fedefm as task

  c = tf._tiny().get_config("tiny")
  for k, v in over.items():
    obj = c
    *path, last = k.split(".")
    for p in path:
      obj = obj[p]
    obj[last] = v
  return task, task.Experiment(c, str(tmp_path), log=lambda _: None)


def test_foundation_dice_is_the_mean_over_source_and_labelled_class(tmp_path):
  """The segmentation endpoint, against a numpy loop: Dice pooled over each source's held-out images,
  for the classes that source labels only, averaged over the (source, class) pairs."""
  task, exp = _experiment(tmp_path)
  exp.build_models()
  rng = np.random.default_rng(0)
  src = np.repeat(np.arange(exp.data.num_sources), 3)
  y = rng.integers(0, 4, (len(src), 8, 8))
  pred = np.where(rng.uniform(size=y.shape) < 0.7, y, rng.integers(0, 4, y.shape))
  exp.f_predict = lambda params, x: pred
  got = exp.foundation_score(None, (np.zeros((len(src), 8, 8, 1)), y, src))
  scores = []
  for s in range(exp.data.num_sources):
    for k in exp.data.labelled_classes(s):
      tp = fp = fn_ = 0
      for b in np.flatnonzero(src == s):
        for u in range(8):
          for v in range(8):
            tp += pred[b, u, v] == k and y[b, u, v] == k
            fp += pred[b, u, v] == k and y[b, u, v] != k
            fn_ += pred[b, u, v] != k and y[b, u, v] == k
      scores.append(2 * tp / (2 * tp + fp + fn_))
  assert got == pytest.approx(np.mean(scores), abs=1e-12)


def test_transfers_per_silo_round(tmp_path):
  """Models moved per silo and round: CFL 2; ring gossip 4 (2 out, 2 in); overseas experts 2 per
  neighbour on top; centralized 0."""
  _, exp = _experiment(tmp_path, **{"pretrain.num_silos": 4, "fedefm.topology": "ring"})
  n = 4
  W = topology.metropolis_hastings(topology.ring(n) > 0)
  _, mask = topology.neighbour_table(topology.ring(n) > 0)
  assert exp._round_transfers("fedavg", False, W, mask) == 2.0
  assert exp._round_transfers("fedefm", True, W, mask) == 2.0 + 4.0
  assert exp._round_transfers("ring", False, W, mask) == 4.0
  assert exp._round_transfers("fedefm_dfl", True, W, mask) == 8.0
  assert exp._round_transfers("centralized", False, np.ones((1, 1)), np.zeros((1, 1), bool)) == 0.0


def test_source_track_end_to_end_learns_and_writes_the_endpoints(tmp_path, monkeypatch):
  """Objective source: a foundation classifies which source an image comes from; a few rounds of
  FedAvg beat the untrained model's held-out accuracy; KD fine-tunes are skipped; endpoints.md and
  environment.json are written, with the commit read when the experiment started (git made unreachable
  during the run changes nothing)."""
  from fedkd import report

  report.code_version.cache_clear()
  task, exp = _experiment(
    tmp_path,
    **{
      "pretrain.objective": "source",
      "pretrain.num_rounds": 20,
      "pretrain.local_steps": 2,
      "pretrain.batch_size": 6,
      "pretrain.unseen_percent": 0.0,
      "pretrain.learning_rate": 1e-2,
      "experiment.methods": "fedavg,fedefm",
      "experiment.seeds": "0",
      "eval.foundation_every": 10,
      "eval.heldout_per_source": 24,
    },
  )
  # the commit the tables come from, as git itself reports it for this checkout when the experiment started
  # (None outside one; read now, as the experiment did: a commit made while the test runs moves HEAD)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # (only when this folder is the checkout itself, not a folder inside some other repository)
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD", "--show-toplevel"], capture_output=True, text=True)
    lines = head.stdout.splitlines()
    ours = head.returncode == 0 and len(lines) == 2 and os.path.samefile(lines[1], root)
    want = lines[0] if ours else None
  except FileNotFoundError:  # no git on this machine
    want = None
  if want is not None:
    dirty = subprocess.run(["git", "-C", root, "diff", "HEAD", "--quiet"]).returncode != 0
  exp.build_models()
  types = exp.data.silo_types(0.0, 0)
  held = exp.heldout(types, 0)
  before = exp.foundation_score(exp.init_foundation(0), held)

  def no_git(*args, **kwargs):
    raise OSError("git is not reachable during the run")

  monkeypatch.setattr(subprocess, "run", no_git)
  rows = exp.run()
  monkeypatch.undo()
  assert all(not r["teacher_kd"] for r in rows) and len(rows) == 2
  for r in rows:
    assert [pt["round"] for pt in r["foundation_curve"]] == [10, 20]
    assert 0.0 <= r["foundation"] <= 1.0
    assert r["cost"]["gflops_per_silo_round"] > 0
  fedavg0 = next(r for r in rows if r["method"] == "fedavg" and r["seed"] == 0)
  assert fedavg0["foundation"] > max(before, 1 / 6) + 0.1, (before, fedavg0["foundation"])
  # FLOPs per silo round count every local step: k times the steps, k times the FLOPs (a cost analysis
  # that counted a loop body once would not see the difference)
  k = exp._matched_factor()
  assert k >= 2
  assert exp.client_flops("fedavg_matched", False) == pytest.approx(k * exp.client_flops("fedavg", False), rel=0.02)
  fedefm = [r for r in rows if r["method"] == "fedefm"]
  assert all(r["cost"]["gflops_per_silo_round"] > fedavg0["cost"]["gflops_per_silo_round"] for r in fedefm)
  text = (tmp_path / "endpoints.md").read_text()
  assert "source-classification accuracy" in text and re.search(r"^\| P1 \| fedefm - fedavg \| 1 \|", text, re.M)
  env = json.loads((tmp_path / "environment.json").read_text())
  assert env["jax"] == jax.__version__ and env["cpu_count"] == os.cpu_count()
  assert env["fedkd_commit"] == want
  if want is not None:
    assert env["fedkd_dirty"] is dirty


def test_contrast_between_two_workdirs_against_scipy(cli, tmp_path):
  """python -m fedkd.tasks.fedefm_contrast (its ``__main__`` path, through the ``cli`` fork server): a - b paired
  over the seeds both workdirs hold, t-interval and p from scipy's paired t-test, Holm over the keys; a bad spec
  or a missing method is a one-line error."""
  rng = np.random.default_rng(3)
  va, vb = rng.uniform(size=6), rng.uniform(size=6)
  for name, vals, seeds in (("a", va, range(6)), ("b", vb, range(1, 6))):
    (tmp_path / name).mkdir()
    rows = [
      {"unseen_percent": 100.0, "method": "fedefm", "teacher_kd": False, "seed": s, "foundation": float(vals[s])}
      for s in seeds
    ]
    (tmp_path / name / "results_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = [f"--a={tmp_path}/a:fedefm", f"--b={tmp_path}/b:fedefm"]
  r = cli.run("fedkd.tasks.fedefm_contrast", args)
  assert r.code == 0, r.stderr
  out = r.stdout
  d = va[1:] - vb[1:]
  p = stats.ttest_rel(va[1:], vb[1:]).pvalue
  half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
  assert f"| foundation | 5 | {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] p={p:.3g}" in out, out
  bad = cli.run("fedkd.tasks.fedefm_contrast", [f"--a={tmp_path}/a:moon", args[1]])
  assert bad.code == 2 and "holds no finished 'moon' run" in bad.stderr and not bad.traceback


def test_contrast_pools_workdirs_of_other_seeds_against_scipy(cli, tmp_path):
  """fedefm_contrast with a comma list per side: the seeds of both workdirs pooled (as a replication on
  new seeds joins the first run), paired against scipy over all of them; a seed in two workdirs of one
  side, or workdirs of different configs, is a one-line error."""
  rng = np.random.default_rng(5)
  values = {}
  for name, method, seeds in (("first", "fedefm", range(5)), ("rep", "fedefm", range(5, 9))):
    (tmp_path / name).mkdir()
    rows = []
    for m in (method, "fedavg"):
      for s in seeds:
        values[m, s] = float(rng.uniform())
        rows.append({"unseen_percent": 100.0, "method": m, "teacher_kd": False, "seed": s, "foundation": values[m, s]})
    (tmp_path / name / "results_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": "fedefm", "image_size": 32, "experiment": {"seeds": ",".join(map(str, seeds))}}
    (tmp_path / name / "config.json").write_text(json.dumps(config))
  a = f"--a={tmp_path}/first:fedefm,{tmp_path}/rep:fedefm"
  b = f"--b={tmp_path}/first:fedavg,{tmp_path}/rep:fedavg"
  mod = "fedkd.tasks.fedefm_contrast"
  r = cli.run(mod, [a, b])
  assert r.code == 0, r.stderr
  out = r.stdout
  x = np.array([values["fedefm", s] for s in range(9)])
  y = np.array([values["fedavg", s] for s in range(9)])
  d = x - y
  half = stats.t.ppf(0.975, 8) * d.std(ddof=1) / np.sqrt(9)
  p = stats.ttest_rel(x, y).pvalue
  assert f"| foundation | 9 | {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] p={p:.3g}" in out, out
  twice = cli.run(mod, [f"--a={tmp_path}/first:fedefm,{tmp_path}/first:fedefm", b])
  assert twice.code == 2 and "seed 0 is in both" in twice.stderr and not twice.traceback
  other = {"task": "fedefm", "image_size": 64, "experiment": {"seeds": "5,6,7,8"}}
  (tmp_path / "rep" / "config.json").write_text(json.dumps(other))
  bad = cli.run(mod, [a, b])
  assert bad.code == 2 and "config.image_size differs" in bad.stderr and not bad.traceback


def test_holm_leaves_out_a_contrast_without_a_p_value():
  """A contrast of one seed has no p-value: it is no test, so the Holm family is the other contrasts (it once
  counted towards m as p = 0, inflating their adjusted p-values); the header says how many were left out."""
  from fedkd.tasks.fedefm import _family_lines

  def res(p, n):
    return {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2, "p": p, "n": n}

  fam = [("P1", "a - b", res(0.01, 5)), ("P2", "c - d", res(float("nan"), 1)), ("P3", "a - e", res(0.04, 5))]
  lines = _family_lines("Primary", fam)
  assert lines[0].endswith("Holm over the 2 contrasts of this family; 1 without a p (fewer than 2 seeds))")
  rows = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| P")}
  # Holm by hand over m = 2: p_(1) = 0.01 -> 2 x 0.01 = 0.02; p_(2) = 0.04 -> max(0.02, 1 x 0.04) = 0.04
  assert "(Holm 0.02)" in rows["P1"] and "(Holm 0.04)" in rows["P3"] and "Holm" not in rows["P2"]
