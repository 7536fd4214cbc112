"""FedBN (Li, Jiang, Zhang, Kamp & Dou, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021), here for the models' normalisation layers (GroupNorm / LayerNorm).

The normalisation parameters (scale gamma and shift beta of every norm layer, :func:`is_norm`) stay with
the client and are never averaged; everything else is FedAvg. Client i keeps its norm leaves b_i (its
row; at first the initial model's). With w the server model and [w; b_i] w with its norm leaves replaced
by b_i, a round is

    y_i = local SGD from [w; b_i] on F_i (K steps, ``batch["steps"]`` when given),
    upload  d_i = (y_i - [w; b_i]) with the norm leaves zeroed,     b_i <- the norm leaves of y_i,
    server  w <- server_opt(w, -sum_i p_i d_i)    (FedAvg's ``server_step``, p_i the data-size weights).

The server's norm leaves never move (their mean delta is zero; they are also kept explicitly, so a
weight-decaying server optimizer does not shrink them). Client i's site is evaluated with
``personal(w, b_i) = [w; b_i]``. Rows are the params tree pruned to the norm leaves (:func:`norm_leaves`:
the same nested dicts and keys, only the branches that hold norm leaves).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd, local_steps
from fedkd.fl.algorithms.fedavg import FedAvg, server_step

# nnx module attribute names of the normalisation layers of fedkd.models: the UNet's and TransUNet's
# GroupNorms (norm1, norm2, conv_more's norm) and the ViT's LayerNorms (ln1, ln2, the encoder's final norm)
NORM_MODULE = re.compile(r"(norm|ln)\d*")
NORM_PARAMS = ("scale", "bias")


def _key(k) -> object:
  """A path entry as its plain key: jax's DictKey / SequenceKey / GetAttrKey, or a plain str / int."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def is_norm(path) -> bool:
  """Whether the param at ``path`` (a jax key path or a tuple of plain keys) is a normalisation layer's
  scale or bias: its last key is ``scale`` / ``bias`` and the one before names a norm module
  (``norm``, ``norm1``, ``norm2``, ``ln1``, ``ln2``, ...)."""
  keys = [_key(k) for k in path]
  return (
    len(keys) >= 2
    and keys[-1] in NORM_PARAMS
    and isinstance(keys[-2], str)
    and NORM_MODULE.fullmatch(keys[-2]) is not None
  )


def norm_leaves(params, _path=()):
  """The params tree pruned to its norm leaves (same nested dicts and keys), or None when it has none."""
  if isinstance(params, Mapping):
    kept = {k: norm_leaves(v, _path + (k,)) for k, v in params.items()}
    kept = {k: v for k, v in kept.items() if v is not None}
    return kept or None
  return params if is_norm(_path) else None


def with_norm(params, norms):
  """``params`` with the leaves that ``norms`` (a :func:`norm_leaves` tree) holds replaced by its."""
  if not isinstance(norms, Mapping):
    return norms
  return {k: with_norm(v, norms[k]) if k in norms else v for k, v in params.items()}


def zero_norm(tree):
  """``tree`` (params-shaped) with its norm leaves zeroed."""
  return jax.tree_util.tree_map_with_path(lambda p, a: jnp.zeros_like(a) if is_norm(p) else a, tree)


class FedBN(FedAvg):
  name = "fedbn"

  def init_row(self, params):
    row = norm_leaves(params)
    if row is None:
      raise ValueError("FedBN keeps the normalisation layers per client, but the model has none (is_norm)")
    return jax.tree.map(jnp.array, row)

  def client(self, ctx, server, row, batch, gathered):
    start = with_norm(server["params"], row)
    steps, _ = local_steps(batch, batch["x"])
    local, loss, _ = local_sgd(ctx.seg_loss, ctx.tx, start, batch["x"], batch["y"], unroll=ctx.unroll, steps=steps)
    return ClientOutput(upload=zero_norm(delta(local, start)), loss=loss, row=norm_leaves(local))

  def server(self, server, aggregate, sums, rows):
    new = server_step(self.server_tx, server, aggregate)
    new["params"] = with_norm(new["params"], norm_leaves(server["params"]))
    return new, rows

  def personal(self, params, row):
    return with_norm(params, row)
