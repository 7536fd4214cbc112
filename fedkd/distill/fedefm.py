"""FedEFM silo update (Do et al., ICRA 2025): multishot distillation from overseas experts, weighted
by a differentiable EMD, then CFL or DFL mixing — written against the federated-algorithm interface
(:class:`FedEFMSilo`), so all silos run in the engine's one jitted round (``fedkd.fl.engine``) with
the same client layouts and conv lowerings as FedAvg.

Silo models live stacked on a leading axis [N, ...] (the engine's rows), split over the 'clients'
mesh axis. One round, for every silo i in parallel:

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

import jax
import jax.numpy as jnp
import optax

from fedkd.distill import emd as emd_lib
from fedkd.distill.losses import multishot_distill_loss
from fedkd.fl.algorithm import Algorithm, ClientOutput, local_sgd
from fedkd.fl.algorithms import moon


@dataclasses.dataclass(frozen=True)
class FedEFMOptions:
  """The silo update's settings; the defaults are ``config.fedefm``'s (``fedkd/config.py``)."""

  distill: bool = True
  beta: float = 0.5
  temperature: float = 2.0
  expert_steps: int = 1
  emd_epsilon: float = 0.05
  emd_marginals: str = "uniform"  # uniform | cross_reference
  emd_iters: int = 0  # 0: sized to emd_epsilon so the plan converges
  emd_debias: bool = True  # Sinkhorn-divergence-style debiased similarity (S(u,u) = 1)
  weight_mode: str = "softmax"  # softmax | sum | raw | uniform (control: EMD not used)
  weight_temperature: float = 0.1
  detach_weights: bool = True
  mixing: str = "cfl"  # cfl | dfl
  moon_mu: float = 0.0  # > 0: MOON model-contrastive term (baseline)
  moon_tau: float = 0.5
  prox_mu: float = 0.0  # > 0: FedProx proximal term (mu / 2) |q - start|^2 (control)


def expert_similarities(student_feats, expert_feats, opts: FedEFMOptions):
  """student_feats [B, h, w, C], expert_feats [J, B, h, w, C] -> (S [J] (batch-mean EMD similarity), the
  largest L1 marginal error of each expert's plans [J])."""
  u = emd_lib.dense_features_to_nodes(student_feats)  # [B, n, C]
  v = emd_lib.dense_features_to_nodes(expert_feats)  # [J, B, n, C]
  kw = dict(epsilon=opts.emd_epsilon, marginals=opts.emd_marginals, num_iters=opts.emd_iters or None)
  if opts.emd_debias:
    kw["debias"] = True

  def sim(a, b):
    s, err = emd_lib.emd_similarity(a, b, return_error=True, **kw)
    return s, err

  per, err = jax.vmap(lambda vj: jax.vmap(sim)(u, vj))(v)  # [J, B] each
  return jnp.mean(per, axis=1), jnp.max(err, axis=1)


class FedEFMSilo(Algorithm):
  """The FedEFM silo update against :mod:`fedkd.fl.algorithm`'s interface (and, with ``distill=False``,
  the FedAvg / RING / MATCHA / MOON baselines of the paper's Table I).

  Every silo keeps its own model: the rows are ``{"params": the model the silo starts the round from,
  "prev": its model after the previous round's local training}`` (MOON's negative); the server state
  holds only the round counter. A silo uploads its trained model; the aggregator is ``mean`` (CFL:
  every silo continues from the weighted mean) or ``gossip`` (DFL: W-mixing). ``batch`` holds the
  silo's ``x``, ``y`` and its padded in-neighbour table ``nbr`` [J] / ``nbr_mask`` [J], and with push-sum
  gossip ``step_scale`` (1 / the silo's push-sum weight: its own training enters the push-sum numerator
  unweighted, so the consensus is the plain average's optimum); the first ``expert_steps`` batches of
  every silo are gathered for the overseas experts.
  """

  name = "fedefm"

  def __init__(self, opts: FedEFMOptions, expert_tx: optax.GradientTransformation):
    if opts.mixing not in ("cfl", "dfl"):
      raise ValueError(f"unknown mixing {opts.mixing!r}; use cfl or dfl")
    self.opts, self.expert_tx = opts, expert_tx
    self.aggregator = "mean" if opts.mixing == "cfl" else "gossip"

  def init(self, params, rng):
    return {"round": jnp.zeros((), jnp.int32)}

  def init_row(self, params):
    return {"params": params, "prev": params}

  def gather(self, batch):
    if not self.opts.distill or self.opts.expert_steps == 0:
      return None
    k = self.opts.expert_steps
    return {"x": batch["x"][:, :k], "y": batch["y"][:, :k]}

  def client(self, ctx, server, row, batch, gathered):
    o = self.opts
    p, prev, x_own, y_own = row["params"], row["prev"], batch["x"], batch["y"]
    glob = p  # the model the silo received this round (MOON's positive, FedProx's anchor)
    experts = None
    if o.distill:
      if o.expert_steps == 0:  # control: the "experts" are the silo's own start model (KD to it)
        experts = jax.tree.map(lambda a: jnp.broadcast_to(a, batch["nbr"].shape + a.shape), p)
      else:

        def make_expert(j):
          local, _, _ = local_sgd(
            ctx.seg_loss, self.expert_tx, p, gathered["x"][j], gathered["y"][j], unroll=ctx.unroll
          )
          return local

        experts = jax.vmap(make_expert)(batch["nbr"])
        # a padded slot's expert (weight 0, trained on the silo's own data) is replaced by the silo's model: a
        # non-finite expert there would otherwise reach the loss as 0 * NaN and stop the run
        experts = jax.tree.map(
          lambda e, a: jnp.where(batch["nbr_mask"].reshape((-1,) + (1,) * a.ndim), e, a), experts, p
        )

    def silo_loss(q, x, y):
      logits, feats = ctx.forward(q, x, features=True)
      seg = ctx.loss_fn(logits, y)
      aux = {"seg": seg}
      total = seg
      if o.distill:
        e_logits, e_feats = jax.vmap(lambda e: ctx.forward(e, x, features=True))(experts)
        mask = batch["nbr_mask"]
        if o.weight_mode == "uniform":  # control: every neighbour the same weight, no EMD
          w = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1)
          sims, err = jnp.zeros(mask.shape, jnp.float32), jnp.zeros((), jnp.float32)
        else:
          sims, err = expert_similarities(feats, e_feats, o)
          err = jnp.max(jnp.where(mask, err, 0.0))  # padded neighbour slots are solved but never used
          w = emd_lib.emd_weights(sims, o.weight_mode, o.weight_temperature, o.detach_weights, mask)
        total, kd = multishot_distill_loss(logits, e_logits, w, seg, o.beta, o.temperature, return_kd=True)
        aux.update(kd=jax.lax.stop_gradient(kd), sims=sims, w=w, emd_error=err)
      if o.moon_mu > 0:
        zg, zp = ctx.forward(glob, x, features=True)[1], ctx.forward(prev, x, features=True)[1]
        con = moon.contrastive(moon.pooled(feats), moon.pooled(zg), moon.pooled(zp), o.moon_tau)
        total = total + o.moon_mu * con
        aux["moon"] = con
      if o.prox_mu > 0:
        sq = sum(
          jnp.sum((a - jax.lax.stop_gradient(b)) ** 2) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(glob))
        )
        total = total + 0.5 * o.prox_mu * sq
      return total, aux

    # push-sum on an unbalanced digraph: the silo's steps scaled by 1 / w_i (stochastic gradient-push)
    scale = batch.get("step_scale")
    q, loss, aux = local_sgd(silo_loss, ctx.tx, p, x_own, y_own, unroll=ctx.unroll, has_aux=True, step_scale=scale)
    metrics = {"seg": jnp.mean(aux["seg"])}
    if o.distill:
      metrics.update(
        kd=jnp.mean(aux["kd"]),
        sims=jnp.mean(aux["sims"], 0),
        w=jnp.mean(aux["w"], 0),
        emd_error=jnp.max(aux["emd_error"]),
      )
    return ClientOutput(upload=q, loss=loss, row={"params": q, "prev": q}, metrics=metrics)

  def server(self, server, aggregate, sums, rows):
    if self.aggregator == "mean":  # CFL: every silo continues from the weighted mean
      mixed = jax.tree.map(lambda m, a: jnp.broadcast_to(m, a.shape), aggregate, rows["params"])
    else:  # DFL: this silo's row of the gossip (directed graphs: push-sum's round matrix, see the task)
      mixed = aggregate
    return dict(server, round=server["round"] + 1), {"params": mixed, "prev": rows["prev"]}


def stack(tree, n: int):
  """Replicates a single model's pytree n times on a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape).copy(), tree)


def mean_model(stacked, weights=None):
  """The foundation: (weighted) mean of the stacked silo models."""
  if weights is None:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), stacked)
  w = jnp.asarray(weights, jnp.float32) / jnp.sum(jnp.asarray(weights, jnp.float32))
  return jax.tree.map(lambda a: jnp.tensordot(w, a, axes=1), stacked)
