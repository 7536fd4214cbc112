"""FedEFM silo round (Do et al., ICRA 2025): multishot distillation from overseas experts, weighted
by a differentiable EMD, then CFL or DFL mixing — all silos in ONE jitted program.

Silo models live stacked on a leading axis [N, ...], split over the 'clients' mesh axis with
``jax.shard_map`` (silos of a shard vmapped). One round, for every silo i in parallel:

1. (distill) For each in-neighbour j (padded table ``nbr_idx``/``nbr_mask``), theta_i is trained at j
   on j's first ``expert_steps`` batches -> the overseas expert theta_hat_{i->j}. j's data reach i's
   device through an ``all_gather`` over the silo axis.
2. theta_i takes ``local_steps`` steps on its own batches with
       L_MD = beta * T^2 * sum_j w_ij KL(softmax(z_j / T) || softmax(z_i / T)) + (1 - beta) * L_seg,
   where w_ij = emd_weights(S_ij) and S_ij = mean over the batch of emd_similarity(U_i, V_j) on dense
   features (``apply_wf`` returns (logits, features [B, h, w, C])). Without distillation the loss is
   L_seg (plus MOON's model-contrastive term when ``moon_mu`` > 0): the FedAvg / RING / MATCHA / MOON
   baselines run through the same code.
3. Mixing: CFL = weighted mean over silos (FedAvg), DFL = one gossip contraction with W [N, N].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fedkd.distill import emd as emd_lib
from fedkd.distill.losses import kd_kl
from fedkd.fl.engine import client_update
from fedkd.sharding import CLIENTS


@dataclasses.dataclass(frozen=True)
class FedEFMOptions:
  distill: bool = True
  beta: float = 0.5
  temperature: float = 2.0
  expert_steps: int = 1
  emd_epsilon: float = 0.05
  emd_marginals: str = "uniform"  # uniform | cross_reference
  emd_iters: int = 50
  weight_mode: str = "softmax"  # softmax | sum | raw
  weight_temperature: float = 0.1
  detach_weights: bool = True
  mixing: str = "cfl"  # cfl | dfl
  moon_mu: float = 0.0  # > 0: MOON model-contrastive term (baseline)
  moon_tau: float = 0.5
  unroll: bool = False


def _pooled(feats):
  """[B, h, w, C] -> L2-normalised [B, C] (MOON representation)."""
  z = jnp.mean(feats.astype(jnp.float32), axis=(1, 2))
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))


def expert_similarities(student_feats, expert_feats, opts: FedEFMOptions):
  """student_feats [B, h, w, C], expert_feats [J, B, h, w, C] -> S [J] (batch-mean EMD similarity)."""
  u = emd_lib.dense_features_to_nodes(student_feats)  # [B, n, C]
  v = emd_lib.dense_features_to_nodes(expert_feats)  # [J, B, n, C]
  sim = functools.partial(
    emd_lib.emd_similarity, epsilon=opts.emd_epsilon, marginals=opts.emd_marginals, num_iters=opts.emd_iters
  )
  per = jax.vmap(lambda vj: jax.vmap(sim)(u, vj))(v)  # [J, B]
  return jnp.mean(per, axis=1)


def make_silo_round(
  apply_wf: Callable,
  seg_loss: Callable,
  expert_tx: optax.GradientTransformation,
  local_tx: optax.GradientTransformation,
  mesh,
  opts: FedEFMOptions,
):
  """Returns jitted ``round_fn(params [N], prev [N], xs [N,S,B,H,W,1], ys [N,S,B,H,W], nbr_idx [N,J],
  nbr_mask [N,J], weights [N], W [N,N]) -> (params [N], metrics)``; ``prev`` = each silo's model after
  the previous round's local training (MOON's negative; ignored otherwise)."""
  unroll = True if opts.unroll else 1
  apply = lambda p, x: apply_wf(p, x)[0]  # noqa: E731
  expert_update = functools.partial(client_update, apply, seg_loss, expert_tx, unroll=unroll)

  def silo_loss(p, x, y, experts, mask, glob, prev):
    logits, feats = apply_wf(p, x)
    seg = seg_loss(logits, y)
    aux = {"seg": seg}
    total = seg
    if opts.distill:
      e_logits, e_feats = jax.vmap(lambda e: apply_wf(e, x))(experts)
      sims = expert_similarities(feats, e_feats, opts)
      w = emd_lib.emd_weights(sims, opts.weight_mode, opts.weight_temperature, opts.detach_weights, mask)
      kd = jnp.sum(w * jax.vmap(lambda z: kd_kl(logits, z, opts.temperature))(e_logits))
      total = opts.beta * kd + (1.0 - opts.beta) * seg
      aux.update(kd=kd, sims=sims, w=w)
    if opts.moon_mu > 0:
      z = _pooled(feats)
      zg = jax.lax.stop_gradient(_pooled(apply_wf(glob, x)[1]))
      zp = jax.lax.stop_gradient(_pooled(apply_wf(prev, x)[1]))
      pos = jnp.sum(z * zg, -1) / opts.moon_tau
      neg = jnp.sum(z * zp, -1) / opts.moon_tau
      con = jnp.mean(jnp.logaddexp(pos, neg) - pos)
      total = total + opts.moon_mu * con
      aux["moon"] = con
    return total, aux

  def one_silo(p, prev, xs, ys, nbr, mask, all_xs, all_ys):
    glob = p  # the model the silo received this round (MOON's positive)
    if opts.distill:

      def make_expert(j):
        delta, _ = expert_update(p, all_xs[j, : opts.expert_steps], all_ys[j, : opts.expert_steps])
        return jax.tree.map(jnp.add, p, delta)

      experts = jax.vmap(make_expert)(nbr)
    else:
      experts = None

    def step(carry, batch):
      q, o = carry
      x, y = batch
      (loss, aux), g = jax.value_and_grad(silo_loss, has_aux=True)(q, x, y, experts, mask, glob, prev)
      u, o = local_tx.update(g, o, q)
      return (optax.apply_updates(q, u), o), (loss, aux)

    (q, _), (losses, aux) = jax.lax.scan(step, (p, local_tx.init(p)), (xs, ys), unroll=unroll)
    metrics = {"loss": jnp.mean(losses), "seg": jnp.mean(aux["seg"])}
    if opts.distill:
      metrics.update(kd=jnp.mean(aux["kd"]), sims=jnp.mean(aux["sims"], 0), w=jnp.mean(aux["w"], 0))
    return q, metrics

  def shard_body(params, prev, xs, ys, nbr_idx, nbr_mask, weights, W):
    all_xs = jax.lax.all_gather(xs, CLIENTS, tiled=True)
    all_ys = jax.lax.all_gather(ys, CLIENTS, tiled=True)
    new, metrics = jax.vmap(one_silo, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
      params, prev, xs, ys, nbr_idx, nbr_mask, all_xs, all_ys
    )
    trained = new
    if opts.mixing == "cfl":
      tot = jax.lax.psum(jnp.sum(weights), CLIENTS)
      mean = jax.tree.map(lambda a: jax.lax.psum(jnp.tensordot(weights, a, axes=1), CLIENTS) / tot, new)
      mixed = jax.tree.map(lambda m, a: jnp.broadcast_to(m, a.shape), mean, new)
    elif opts.mixing == "dfl":
      everyone = jax.tree.map(lambda a: jax.lax.all_gather(a, CLIENTS, tiled=True), new)
      n_local = nbr_idx.shape[0]
      start = jax.lax.axis_index(CLIENTS) * n_local
      w_rows = jax.lax.dynamic_slice_in_dim(W, start, n_local, axis=0)
      mixed = jax.tree.map(
        lambda a: jnp.tensordot(w_rows, a.astype(jnp.float32), axes=(1, 0), precision=jax.lax.Precision.HIGHEST).astype(
          a.dtype
        ),
        everyone,
      )
    else:
      raise ValueError(f"unknown mixing {opts.mixing!r}; use cfl or dfl")
    return mixed, trained, metrics

  sharded = jax.shard_map(
    shard_body,
    mesh=mesh,
    in_specs=(P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P()),
    out_specs=(P(CLIENTS), P(CLIENTS), P(CLIENTS)),
    # ott-jax's Sinkhorn (lax.cond inside) is not varying-manual-axes aware; every value in this
    # body is per-silo or explicitly collective, so the check adds nothing here.
    check_vma=False,
  )

  @jax.jit
  def round_fn(params, prev, xs, ys, nbr_idx, nbr_mask, weights, W):
    mixed, trained, metrics = sharded(
      params, prev, xs, ys, nbr_idx, nbr_mask, weights.astype(jnp.float32), W.astype(jnp.float32)
    )
    return mixed, trained, metrics

  return round_fn


def stack(tree, n: int):
  """Replicates a single model's pytree n times on a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape).copy(), tree)


def mean_model(stacked, weights=None):
  """The foundation: (weighted) mean of the stacked silo models."""
  if weights is None:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), stacked)
  w = jnp.asarray(weights, jnp.float32) / jnp.sum(jnp.asarray(weights, jnp.float32))
  return jax.tree.map(lambda a: jnp.tensordot(w, a, axes=1), stacked)
