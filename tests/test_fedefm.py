"""The FedEFM silo round against a per-silo Python reference on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedkd.distill import emd as emd_lib
from fedkd.distill.fedefm import FedEFMOptions, FedEFMSilo, mean_model, stack
from fedkd.distill.losses import kd_kl
from fedkd.fl import engine, topology
from fedkd.fl.algorithm import ClientContext
from fedkd.losses import cross_entropy
from fedkd.sharding import client_mesh, shard_clients

N, S, B, H, C, K = 4, 2, 2, 8, 4, 3
LR_E, LR_L = 0.1, 0.05


def apply_wf(p, x):
  f = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  f = jax.nn.relu(f + p["b1"])
  logits = jnp.einsum("bhwc,ck->bhwk", f, p["w2"]) + p["b2"]
  return logits, f[:, ::2, ::2]  # dense features on a coarser grid


def init(seed):
  k = jax.random.split(jax.random.key(seed), 2)
  return {
    "w1": 0.5 * jax.random.normal(k[0], (3, 3, 1, C)),
    "b1": jnp.zeros(C),
    "w2": 0.5 * jax.random.normal(k[1], (C, K)),
    "b2": jnp.zeros(K),
  }


def data(seed):
  kx, ky = jax.random.split(jax.random.key(seed))
  return (
    np.asarray(jax.random.normal(kx, (N, S, B, H, H, 1))),
    np.asarray(jax.random.randint(ky, (N, S, B, H, H), 0, K)),
  )


OPTS = dict(
  beta=0.5,
  temperature=2.0,
  expert_steps=1,
  emd_epsilon=0.1,
  emd_iters=30,
  emd_debias=False,
  weight_mode="softmax",
  weight_temperature=0.5,
)


# one jitted segmentation gradient for every reference (a new jit per call would trace it again)
_seg_grad = jax.jit(jax.grad(lambda p, x, y: cross_entropy(apply_wf(p, x)[0], y)))


def reference_round(params, xs, ys, adjacency, W, mixing, distill=True, lr_e=LR_E, lr_l=LR_L, **opts):
  """Each silo on its own: experts trained at neighbours, then the student, then mixing. ``opts``:
  FedEFMOptions fields other than OPTS's (e.g. beta, temperature)."""
  o = FedEFMOptions(**{**OPTS, **opts})
  nbrs = topology.neighbours(adjacency)

  def loss(q, experts, x, y):  # the experts are an argument: one compiled gradient for every silo
    logits, feats = apply_wf(q, x)
    seg = cross_entropy(logits, y)
    if not distill:
      return seg
    sims, kds = [], []
    for e in experts:
      el, ef = apply_wf(e, x)
      sims.append(
        jnp.mean(
          jnp.stack(
            [
              emd_lib.emd_similarity(
                feats[b].reshape(-1, C), ef[b].reshape(-1, C), epsilon=o.emd_epsilon, num_iters=o.emd_iters
              )
              for b in range(B)
            ]
          )
        )
      )
      kds.append(kd_kl(logits, el, o.temperature))
    s = jax.lax.stop_gradient(jnp.stack(sims)) / o.weight_temperature
    w = jnp.exp(s - s.max()) / jnp.sum(jnp.exp(s - s.max()))
    return o.beta * jnp.sum(w * jnp.stack(kds)) + (1 - o.beta) * seg

  g_fn = jax.jit(jax.grad(loss))
  new = []
  for i in range(N):
    p_i = jax.tree.map(lambda a: a[i], params)
    experts = []
    if distill:
      for j in nbrs[i]:
        e = p_i
        for s in range(o.expert_steps):
          g = _seg_grad(e, xs[j, s], ys[j, s])
          e = jax.tree.map(lambda a, b: a - lr_e * b, e, g)
        experts.append(e)
    q = p_i
    for s in range(S):
      g = g_fn(q, experts, xs[i, s], ys[i, s])
      q = jax.tree.map(lambda a, b: a - lr_l * b, q, g)
    new.append(jax.tree.map(np.asarray, q))
  stacked = jax.tree.map(lambda *a: np.stack(a), *new)
  if mixing == "cfl":
    return jax.tree.map(lambda a: np.broadcast_to(a.mean(0), a.shape), stacked)
  return jax.tree.map(lambda a: np.tensordot(W, a, axes=(1, 0)), stacked)


def engine_round(
  params,
  xs,
  ys,
  adjacency,
  W,
  mixing,
  n_dev,
  distill=True,
  layout="vmap",
  lowering="xla",
  chunk=8,
  model=None,
  hparams=None,
  unroll=False,
  prev=None,
  **silo,
):
  """One FedEFM round through the shared engine; ``model`` = (apply_wf, seg loss) (default: the toy);
  ``unroll``: local steps unrolled (the CPU default) instead of a scan.
  ``hparams`` {beta, temperature, lr_e, lr_l}: those enter the compiled round as traced inputs (the
  FedEFM task's way; fedkd.tasks.fedefm.ROUND_HPARAMS). ``prev``: the silos' models after their previous
  round (MOON's negatives; default ``params``, as in a first round); ``silo``: FedEFMOptions fields."""
  wf, seg = model or (apply_wf, cross_entropy)
  mesh = client_mesh(n_dev)
  opts = FedEFMOptions(distill=distill, mixing=mixing, **{**OPTS, **silo})

  def rebuild(hp):
    silo = dataclasses.replace(opts, beta=hp["beta"], temperature=hp["temperature"])
    ctx = ClientContext(lambda p, x: wf(p, x)[0], seg, optax.sgd(hp["lr_l"]), apply_wf=wf)
    return FedEFMSilo(silo, optax.sgd(hp["lr_e"])), ctx

  alg, ctx = rebuild(dict(beta=opts.beta, temperature=opts.temperature, lr_e=LR_E, lr_l=LR_L))
  eopts = engine.EngineOptions(layout, lowering, chunk, unroll_local_steps=unroll)
  fn = engine.make_round_fn(alg, ctx, mesh, eopts, rebuild=None if hparams is None else rebuild)
  idx, mask = topology.neighbour_table(adjacency)
  n = jax.tree.leaves(params)[0].shape[0]
  rows, batch, weights = shard_clients(
    (
      {"params": params, "prev": params if prev is None else prev},
      {"x": jnp.asarray(xs), "y": jnp.asarray(ys), "nbr": jnp.asarray(idx), "nbr_mask": jnp.asarray(mask)},
      jnp.ones(n),
    ),
    mesh,
  )
  hp = None if hparams is None else {k: jnp.float32(v) for k, v in hparams.items()}
  _, rows, metrics = fn(alg.init(None, None), rows, batch, weights, jnp.asarray(W), hp)
  return jax.tree.map(np.asarray, rows["params"]), metrics


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=tol, rtol=0)


@pytest.mark.parametrize("mixing,n_dev", [("dfl", 2), ("cfl", 4)])
def test_overseas_expert_round_equals_per_silo_reference(mixing, n_dev):
  adjacency = topology.ring(N) > 0
  W = topology.ring(N)
  params = stack(init(0), N)
  params = jax.tree.map(
    lambda a: a + 0.01 * jnp.arange(N, dtype=a.dtype).reshape((N,) + (1,) * (a.ndim - 1)), params
  )  # silos differ
  xs, ys = data(1)
  ref = reference_round(params, xs, ys, adjacency, W, mixing)
  got, metrics = engine_round(params, xs, ys, adjacency, W, mixing, n_dev)
  _close(ref, got)
  assert metrics["w"].shape == (N, 2)
  np.testing.assert_allclose(np.asarray(metrics["w"]).sum(1), 1.0, atol=1e-5)
  # distillation changes the result (the KD term is not a no-op)
  plain = reference_round(params, xs, ys, adjacency, W, mixing, distill=False)
  assert max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(got))) > 1e-5


def test_expert_similarity_is_the_batch_mean_of_each_images_emd():
  """S_j = the mean over the batch of each image's EMD similarity to expert j's features on that image (three
  distinct images, two experts), as the per-silo reference computes it, with and without the debiasing."""
  from fedkd.distill.fedefm import expert_similarities

  k = jax.random.split(jax.random.key(3), 2)
  student = jax.random.normal(k[0], (3, 4, 4, C))
  experts = student[None] + 0.7 * jax.random.normal(k[1], (2, 3, 4, 4, C))
  for debias in (False, True):
    o = FedEFMOptions(emd_epsilon=0.1, emd_iters=30, emd_debias=debias)
    got, _ = expert_similarities(student, experts, o)
    per = [
      [
        float(
          emd_lib.emd_similarity(
            student[b].reshape(-1, C), experts[j, b].reshape(-1, C), epsilon=0.1, num_iters=30, debias=debias
          )
        )
        for b in range(3)
      ]
      for j in range(2)
    ]
    np.testing.assert_allclose(np.asarray(got), np.mean(per, axis=1), atol=1e-6)
    assert np.ptp(per, axis=1).min() > 1e-3  # the images differ, so a max or a first image would not do


def test_uniform_control_gives_each_in_neighbour_one_over_the_in_degree():
  """fedefm_uniform on a star (silo 0 receives from 1, 2, 3; each leaf only from 0): w = 1 / in-degree on the
  silo's real neighbours and 0 on its padded slots, so every silo's weights sum to 1."""
  adjacency = np.zeros((N, N), bool)
  adjacency[0, 1:] = adjacency[1:, 0] = True
  params = stack(init(0), N)
  xs, ys = data(1)
  _, metrics = engine_round(params, xs, ys, adjacency, np.full((N, N), 1 / N), "cfl", 2, weight_mode="uniform")
  w = np.asarray(metrics["w"])
  degree = adjacency.sum(1)
  want = np.stack([np.r_[np.full(d, 1 / d), np.zeros(w.shape[1] - d)] for d in degree])
  np.testing.assert_allclose(np.sort(w, axis=1)[:, ::-1], want, atol=1e-7)


def test_moon_term_pulls_towards_the_global_model_and_away_from_the_previous_one():
  """The MOON baseline's silo step when its previous model differs from the round's model (every round after
  the first): SGD on CE + mu * -log(e^{pos} / (e^{pos} + e^{neg})), pos / neg the cosine of the silo's pooled
  features to the round's model's / its previous model's over tau, written out per silo; CFL mean after."""
  mu, tau = 1.0, 0.5
  params = stack(init(0), N)
  prev = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), params)
  xs, ys = data(1)

  def pooled(f):
    z = jnp.mean(f, axis=(1, 2))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def loss(q, glob, old, x, y):
    logits, f = apply_wf(q, x)
    z, zg, zp = pooled(f), pooled(apply_wf(glob, x)[1]), pooled(apply_wf(old, x)[1])
    pos, neg = jnp.sum(z * zg, -1) / tau, jnp.sum(z * zp, -1) / tau
    con = -jnp.log(jnp.exp(pos) / (jnp.exp(pos) + jnp.exp(neg)))
    return cross_entropy(logits, y) + mu * jnp.mean(con)

  grad = jax.jit(jax.grad(loss))
  new = []
  for i in range(N):
    p_i, old = jax.tree.map(lambda a: a[i], params), jax.tree.map(lambda a: a[i], prev)
    q = p_i
    for s in range(S):
      q = jax.tree.map(lambda a, b: a - LR_L * b, q, grad(q, p_i, old, xs[i, s], ys[i, s]))
    new.append(q)
  ref = jax.tree.map(lambda *a: np.broadcast_to(np.mean(a, 0), (N,) + a[0].shape), *new)
  adjacency, W = topology.ring(N) > 0, topology.ring(N)
  got, _ = engine_round(params, xs, ys, adjacency, W, "cfl", 2, distill=False, prev=prev, moon_mu=mu, moon_tau=tau)
  _close(ref, got)
  first, _ = engine_round(params, xs, ys, adjacency, W, "cfl", 2, distill=False, moon_mu=mu, moon_tau=tau)
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(got))) > 1e-4


def test_kd_weight_temperature_and_learning_rates_as_traced_inputs_equal_the_reference():
  """The FedEFM task's pretraining round takes beta, T and the learning rates as traced inputs (one compiled
  round for a KD-weight grid): equal to the per-silo reference with those values as constants."""
  adjacency, W = topology.ring(N) > 0, topology.ring(N)
  params = stack(init(7), N)
  params = jax.tree.map(lambda a: a + 0.01 * jnp.arange(N, dtype=a.dtype).reshape((N,) + (1,) * (a.ndim - 1)), params)
  xs, ys = data(8)
  for beta, temperature, lr_e, lr_l in ((0.3, 3.0, 0.2, 0.02), (0.8, 1.5, 0.05, 0.08)):
    hp = dict(beta=beta, temperature=temperature, lr_e=lr_e, lr_l=lr_l)
    got, _ = engine_round(params, xs, ys, adjacency, W, "dfl", 2, hparams=hp)
    ref = reference_round(params, xs, ys, adjacency, W, "dfl", lr_e=lr_e, lr_l=lr_l, beta=beta, temperature=temperature)
    _close(ref, got)


def test_plain_round_is_fedavg_and_gossip_preserves_mean():
  params = stack(init(2), N)
  xs, ys = data(3)
  W = topology.ring(N)
  ref = reference_round(params, xs, ys, topology.ring(N) > 0, W, "dfl", distill=False)
  got, _ = engine_round(params, xs, ys, topology.ring(N) > 0, W, "dfl", 4, distill=False)
  _close(ref, got)
  cfl, _ = engine_round(params, xs, ys, topology.ring(N) > 0, W, "cfl", 1, distill=False)
  # gossip with a doubly-stochastic W keeps the silo mean = the CFL (FedAvg) model
  _close(mean_model(got), jax.tree.map(lambda a: a[0], cfl), tol=1e-5)


# (chunked: test_unet_fedefm_round_same_under_chunked_and_gemm_lowering, against vmap = this reference)
@pytest.mark.parametrize("mixing,layout,n_dev", [("dfl", "unroll", 2)])
def test_every_layout_equals_the_per_silo_reference(mixing, layout, n_dev):
  adjacency, W = topology.ring(N) > 0, topology.ring(N)
  params = stack(init(4), N)
  params = jax.tree.map(lambda a: a + 0.02 * jnp.arange(N, dtype=a.dtype).reshape((N,) + (1,) * (a.ndim - 1)), params)
  xs, ys = data(5)
  got, _ = engine_round(params, xs, ys, adjacency, W, mixing, n_dev, layout=layout, chunk=1, unroll=True)
  _close(reference_round(params, xs, ys, adjacency, W, mixing), got)


def test_unet_fedefm_round_same_under_chunked_and_gemm_lowering():
  """A real conv model (UNet through fedkd's conv layers): the DFL distillation round under chunked
  layout with gemm lowering, and vmap with wgrad, equals vmap with XLA convs."""
  import ml_collections

  from fedkd.models import init_model

  cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=1, groups=2, num_classes=K))
  _, wf, p0 = init_model(cfg, 0)
  params = jax.tree.map(
    lambda a: a + 0.01 * jnp.arange(N, dtype=a.dtype).reshape((N,) + (1,) * (a.ndim - 1)), stack(p0, N)
  )
  xs, ys = data(6)
  adjacency, W = topology.ring(N) > 0, topology.ring(N)
  base, m = engine_round(params, xs, ys, adjacency, W, "dfl", 2, model=(wf, cross_entropy))
  assert float(np.abs(np.asarray(m["kd"])).max()) > 0
  for layout, lowering in (("chunked", "gemm"), ("vmap", "wgrad")):
    got, _ = engine_round(
      params, xs, ys, adjacency, W, "dfl", 2, layout=layout, lowering=lowering, chunk=1, model=(wf, cross_entropy)
    )
    _close(base, got, tol=1e-5)
  assert (
    max(
      float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(params))
    )
    > 1e-4
  )


def test_experiment_config_errors():
  from fedkd.config import ConfigError, fedefm_base_config
  from fedkd.tasks.fedefm import validate

  c = fedefm_base_config()
  c.experiment.methods = "fedavg,fedfoo"
  with pytest.raises(ConfigError, match="unknown method 'fedfoo'"):
    validate(c)
  c = fedefm_base_config()
  c.pretrain.num_silos = 5
  c.fedefm.topology = "gaia_ring"  # the directed Gaia ring has 11 silos
  with pytest.raises(ConfigError, match="has 11 nodes but config.pretrain.num_silos=5"):
    validate(c)
  # every encoder shape of the student must be the teacher's (heads, mlp_dim and stem_width used to fail
  # after pretraining, or in stem_width's case load a foundation into a student with a random stem)
  for key, value in (("hidden", 16), ("num_heads", 4), ("mlp_dim", 32), ("stem_width", 4)):
    c = fedefm_base_config()
    c.student[key] = value
    with pytest.raises(ConfigError, match=rf"config.student.{key}={value} must equal config.teacher.{key}="):
      validate(c)
  c = fedefm_base_config()
  c.student.num_layers = c.teacher.num_layers + 1
  with pytest.raises(ConfigError, match="the foundation has that many encoder layers to load"):
    validate(c)
  # config.image_size alone: the message named neither the models' own size nor the flags to give
  c = fedefm_base_config()
  old = c.teacher.image_size
  c.image_size = 2 * old
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert str(e.value) == (
    f"config.teacher.image_size={old} must equal config.image_size={2 * old} (it does not follow it): give "
    f"--config.teacher.image_size={2 * old} --config.student.image_size={2 * old} with --config.image_size"
  )
  c.teacher.image_size = c.student.image_size = c.image_size = c.teacher.patch_size * 3 + 1
  with pytest.raises(ConfigError, match=rf"config.image_size={c.image_size} must be a multiple of config.teacher."):
    validate(c)
  # a repeated seed / method / % ran once and then counted as two seeds (n=2, std 0) in results.csv
  for key, value, shown in (
    ("seeds", "0,1,0", "0"),
    ("methods", "fedavg,scratch,fedavg", "fedavg"),
    ("kd_methods", "fedefm,fedefm", "fedefm"),
    ("ablation_percents", "10,50,10.0", "10"),
  ):
    c = fedefm_base_config()
    setattr(c.experiment, key, value)
    with pytest.raises(ConfigError, match=f"config.experiment.{key}=.* lists {shown} more than once"):
      validate(c)


def _tiny():
  import importlib.util
  import os

  spec = importlib.util.spec_from_file_location(
    "fedefm_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "fedefm.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


BAD_SETTINGS = [
  ("fedefm.weight_mode", "bogus", r"config.fedefm.weight_mode='bogus' is unknown; use one of softmax, sum, raw"),
  ("fedefm.emd_marginals", "dense", r"config.fedefm.emd_marginals='dense' is unknown"),
  ("fedefm.mixing", "p2p", r"config.fedefm.mixing='p2p' is unknown; use one of cfl, dfl"),
  ("fedefm.temperature", 0.0, r"config.fedefm.temperature=0.0 must be a number > 0; set --config.fedefm.temperature"),
  ("fedefm.emd_epsilon", -0.1, r"config.fedefm.emd_epsilon=-0.1 must be a number in \[0.0001, 10000\]"),
  ("fedefm.emd_iters", -1, r"config.fedefm.emd_iters=-1 must be an integer >= 0"),
  ("fedefm.prox_mu", -0.1, r"config.fedefm.prox_mu=-0.1 must be a number >= 0"),
  ("fedefm.matched_steps_factor", -1, r"config.fedefm.matched_steps_factor=-1 must be an integer >= 0"),
  ("pretrain.objective", "depth", r"config.pretrain.objective='depth' is unknown; use one of segmentation, source"),
  ("eval.foundation_every", 0, r"config.eval.foundation_every=0 must be an integer >= 1"),
  ("eval.heldout_per_source", 0, r"config.eval.heldout_per_source=0 must be an integer >= 1"),
  ("fedefm.weight_temperature", 0.0, r"config.fedefm.weight_temperature=0.0 must be a number >= 1e-06"),
  ("fedefm.beta", 1.5, r"config.fedefm.beta=1.5 must be a number in \[0, 1\]"),
  ("fedefm.beta", -0.1, r"config.fedefm.beta=-0.1 must be a number in \[0, 1\]"),
  ("fedefm.matcha_budget", 2.0, r"config.fedefm.matcha_budget=2.0 must be a number in \[0, 1\]"),
  ("fedefm.moon_tau", 0.0, r"config.fedefm.moon_tau=0.0 must be a number > 0"),
  ("fedefm.moon_mu", -1.0, r"config.fedefm.moon_mu=-1.0 must be a number >= 0"),
  ("fedefm.warmup_rounds", -1, r"config.fedefm.warmup_rounds=-1 must be an integer >= 0"),
  ("fedefm.expert_steps", 0, r"config.fedefm.expert_steps=0 must be an integer >= 1"),
  ("fedefm.topology", "star", r"config.fedefm.topology='star': use ring, complete, gaia, gaia_ring or file:<path>"),
  (
    "fedefm.topology",
    "file:/no/such/graph.txt",
    r"config.fedefm.topology='file:/no/such/graph.txt' does not "
    r"load: .*not found",
  ),
  ("pretrain.learning_rate", 0.0, r"config.pretrain.learning_rate=0.0 must be a number > 0"),
  ("pretrain.expert_learning_rate", -1e-3, r"config.pretrain.expert_learning_rate=-0.001 must be a number > 0"),
  ("downstream.learning_rate", 0.0, r"config.downstream.learning_rate=0.0 must be a number > 0"),
  ("downstream.kd_temperature", 0.0, r"config.downstream.kd_temperature=0.0 must be a number > 0"),
  ("downstream.kd_pixel_weight", -1.0, r"config.downstream.kd_pixel_weight=-1.0 must be a number >= 0"),
  ("downstream.kd_feature_weight", -0.5, r"config.downstream.kd_feature_weight=-0.5 must be a number >= 0"),
  ("downstream.kd_confidence", 1.5, r"config.downstream.kd_confidence=1.5 must be a number in \[0, 1\]"),
  ("downstream.teacher_adapt_steps", -1, r"config.downstream.teacher_adapt_steps=-1 must be an integer >= 0"),
  ("downstream.val_examples", 0, r"config.downstream.val_examples=0 must be an integer >= 1"),
  ("downstream.scarce_examples", "8,x", r"config.downstream.scarce_examples='8,x' must be a comma list of image"),
  ("downstream.scarce_examples", "0", r"config.downstream.scarce_examples='0' must be a comma list of image"),
  ("downstream.kd_scales", "", r"config.downstream.kd_scales='' must be a comma list of KD loss scales"),
  ("downstream.kd_scales", "1,-1", r"config.downstream.kd_scales='1,-1' must be a comma list of KD loss scales"),
  ("log_every", 0, r"config.log_every=0 must be an integer >= 1"),
  ("checkpoint.every", 0, r"config.checkpoint.every=0 must be an integer >= 1"),
  ("checkpoint.max_to_keep", -2, r"config.checkpoint.max_to_keep=-2 must be an integer >= 1"),
  ("pretrain.learning_rate", float("nan"), r"config.pretrain.learning_rate=nan is not a finite number"),
  ("fedefm.emd_epsilon", float("inf"), r"config.fedefm.emd_epsilon=inf is not a finite number"),
  ("pretrain.num_rounds", 0, r"config.pretrain.num_rounds=0 must be an integer >= 1"),
  ("eval.batch_size", 0, r"config.eval.batch_size=0 must be an integer >= 1"),
  ("experiment.seeds", "0,-1", r"seeds must be integers in 0\.\.4294967295"),
  ("experiment.seeds", "0,4294967296", r"seeds must be integers in 0\.\.4294967295"),
  ("experiment.methods", "", r"config.experiment.methods is empty"),
  ("teacher.num_heads", 3, r"config.teacher.hidden=8 must be divisible by config.teacher.num_heads=3"),
  ("teacher.num_classes", 2, r"config.teacher.num_classes=2 must be >= config.student.num_classes=3"),
]


@pytest.mark.parametrize("key,value,match", BAD_SETTINGS, ids=[f"{k}={v}" for k, v, _ in BAD_SETTINGS])
def test_every_bad_setting_is_a_config_error_before_training(key, value, match, tmp_path):
  from fedkd.config import ConfigError
  from fedkd.tasks import fedefm as task

  c = _tiny().get_config("tiny")
  group, _, name = key.rpartition(".")
  (c[group] if group else c)[name] = value
  # a baseline's own key is range-checked where that baseline runs (elsewhere it is noted unused)
  owner = {"moon_mu": "moon", "moon_tau": "moon", "prox_mu": "fedprox", "matcha_budget": "matcha"}.get(name)
  owner = "fedavg_matched" if name == "matched_steps_factor" else owner
  if owner:
    c.experiment.methods += f",{owner}"
  with pytest.raises(ConfigError, match=match) as e:
    task.Experiment(c, str(tmp_path / "fe"))  # before any model is built or anything trains
  assert "\n" not in str(e.value)
  assert not (tmp_path / "fe").exists()


def test_unreadable_topology_file_and_unknown_variant(tmp_path):
  from fedkd.config import ConfigError
  from fedkd.tasks.fedefm import validate

  mod = _tiny()
  bad = tmp_path / "graph.txt"
  bad.write_text("0 1\n1 two\n")
  c = mod.get_config("tiny")
  c.fedefm.topology = f"file:{bad}"
  with pytest.raises(ConfigError, match=r"config.fedefm.topology='file:.*graph.txt' does not load: .*graph.txt:2"):
    validate(c)
  bad.write_text("0 1\n1 2\n2 3\n3 4\n4 0\n")  # 5 nodes for 4 silos
  with pytest.raises(ConfigError, match=r"has 5 nodes but config.pretrain.num_silos=4"):
    validate(c)
  bad.write_text("0 1\n1 2\n2 3\n3 0\n")
  assert validate(c)["adjacency"].sum() == 8  # a 4-ring loads
  for arg in ("nonsense", "tiny,bogus=1"):
    with pytest.raises(ConfigError, match="unknown config argument"):
      mod.get_config(arg)
  for arg, match in (
    ("seeds=0", "give a number of seeds 1..1000"),
    ("seeds", "bad seeds="),
    ("seeds=two", "bad seeds="),
  ):
    with pytest.raises(ConfigError, match=match):
      mod.get_config(arg)
  assert mod.get_config("tiny,seeds=2").experiment.seeds == "0,1"


def test_unet_foundation_loads_exactly_the_encoder():
  import ml_collections
  from fedkd.models import init_model
  from fedkd.tasks.fedefm import transfer_encoder

  t = ml_collections.ConfigDict(dict(name="unet", num_classes=4, width=4, depth=2, groups=2))
  s = ml_collections.ConfigDict(dict(name="unet", num_classes=3, width=4, depth=2, groups=2))
  _, _, teacher = init_model(t, 0)
  _, _, student = init_model(s, 1)
  new = transfer_encoder(student, teacher, "unet")
  for top in new:
    for a, b, c in zip(jax.tree.leaves(new[top]), jax.tree.leaves(teacher[top]), jax.tree.leaves(student[top])):
      if top in ("enc", "mid"):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_frozen_probe_trains_only_the_decoder(tmp_path):
  """The frozen-encoder probe's step leaves every encoder leaf bitwise unchanged and moves the decoder;
  the plain fine-tuning step moves both."""
  from fedkd.models import init_model
  from fedkd.tasks import fedefm as task

  c = _tiny().get_config("tiny")
  exp = task.Experiment(c, str(tmp_path), log=lambda _: None)
  exp.build_models()
  _, _, p0 = init_model(c.student, 0)
  x, y = exp.data.target(0, 0, 2)
  for frozen in (True, False):
    step, tx = exp._finetune_fn(False, frozen)
    p1, _, _ = step(p0, tx.init(p0), None, x, y, np.float32(0))
    for top in p0:
      moved = any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(p0[top]), jax.tree.leaves(p1[top]))
      )
      assert moved == (not frozen or top not in task.ENCODER["transunet"]), (frozen, top)


def test_experiment_refuses_a_workdir_of_another_config(tmp_path):
  import json
  import os
  from fedkd.config import ConfigError, fedefm_base_config
  from fedkd.tasks import fedefm as task

  c = fedefm_base_config()
  work = tmp_path / "fe"
  os.makedirs(work)
  other = fedefm_base_config()
  other.downstream.steps = 7
  (work / "config.json").write_text(other.to_json())
  (work / "results_raw.jsonl").write_text(
    json.dumps({"unseen_percent": 100.0, "method": "scratch", "teacher_kd": False, "seed": 0}) + "\n"
  )
  with pytest.raises(ConfigError, match=r"\(config.downstream.steps differs\)"):
    task.run(c, str(work), log=lambda _: None)
  assert json.loads((work / "config.json").read_text())["downstream"]["steps"] == 7  # untouched


def test_results_tables_mean_and_sample_std_over_seeds(tmp_path):
  """results.csv / results.md of the experiment: mean and sample std (ddof=1) over seeds per (unseen %,
  method, teacher KD), against numpy; one seed: std nan (CSV) / n/a (Markdown)."""
  import csv
  import math
  from fedkd.tasks import fedefm as task

  keys = ["dice/catheter", "dice/guidewire", "iou/catheter", "iou/guidewire"]
  rng = np.random.default_rng(0)
  rows = [
    {"unseen_percent": 100.0, "method": "fedefm", "teacher_kd": kd, "seed": s, **dict(zip(keys, rng.uniform(size=4)))}
    for kd, seeds in ((False, (0, 1, 2)), (True, (0,)))
    for s in seeds
  ]
  exp = task.Experiment(_tiny().get_config("tiny"), str(tmp_path), log=lambda _: None)
  exp.write_tables(rows)
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["unseen_percent"], r["method"], r["teacher_kd"], r["seeds"]) for r in table] == [
    ("100", "fedefm", "no", "3"),
    ("100", "fedefm", "yes", "1"),
  ]
  for k in keys:
    vals = np.array([r[k] for r in rows[:3]])
    np.testing.assert_allclose(float(table[0][f"{k}_mean"]), vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(table[0][f"{k}_std"]), vals.std(ddof=1), rtol=1e-12)
    assert float(table[1][f"{k}_mean"]) == rows[3][k] and math.isnan(float(table[1][f"{k}_std"]))
  md = (tmp_path / "results.md").read_text()
  # no foundation endpoint in these rows: an empty cell
  assert "sample std (ddof=1)" in md and "| 100 | fedefm | yes | 1 |  | " + f"{rows[3][keys[0]]:.3f} ± n/a |" in md
  m0 = np.array([r[keys[0]] for r in rows[:3]])
  assert f"| 100 | fedefm | no | 3 |  | {m0.mean():.3f} ± {m0.std(ddof=1):.3f} |" in md
  # the weight heatmap of a method is drawn while its rows hold weights, and removed once they do not (a
  # re-run without that method); a picture the writer does not draw stays
  rows[0]["w_history"] = rng.uniform(size=(3, 2, 1)).tolist()
  exp.write_tables(rows)
  assert (tmp_path / "emd_weights_fedefm.png").stat().st_size > 0
  (tmp_path / "mine.png").write_text("mine")
  del rows[0]["w_history"]
  exp.write_tables(rows)
  assert not (tmp_path / "emd_weights_fedefm.png").exists() and (tmp_path / "mine.png").read_text() == "mine"


def test_foundation_of_silo_sharded_params_is_their_mean_on_one_device():
  """The foundation of parameters sharded over 2 devices (``--cpu_devices=2`` deadlocked in an eager
  all-reduce): the silos' mean, as numpy computes it, on one device."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from fedkd.tasks.fedefm import foundation_of

  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(4, 3, 5)).astype(np.float32), "b": rng.normal(size=(4, 7)).astype(np.float32)}
  mesh = Mesh(np.array(jax.devices()[:2]), ("silos",))
  sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("silos"))), host)
  assert len(sharded["w"].sharding.device_set) == 2
  out = foundation_of(sharded)
  for k in host:
    np.testing.assert_allclose(np.asarray(out[k]), host[k].mean(axis=0), rtol=1e-6, atol=1e-7)
    assert len(out[k].devices()) == 1


def test_the_silo_options_default_to_the_configs_fedefm_values():
  """FedEFMOptions() (what a user building the silo update by hand gets) and config.fedefm describe the
  same method: the dataclass once kept the pre-redesign 50 Sinkhorn iterations and the biased similarity."""
  import dataclasses

  from fedkd.config import fedefm_base_config

  f = fedefm_base_config().fedefm
  for field in dataclasses.fields(FedEFMOptions):
    if field.name in f and field.name not in ("moon_mu", "prox_mu"):  # those two are method switches
      assert getattr(FedEFMOptions(), field.name) == f[field.name], field.name
