"""Byzantine attacks on the clients' uploads inside the round (for robust-aggregation experiments).

Each attack transforms the stacked uploads of a group of clients (a pytree with leading axis n: a
device's clients, or one chunk of them) and changes only the rows of the *attacker* clients, named by
their index among the round's clients (0..C-1). ``ids`` [n] are the global indices of the rows at
hand: inside the engine's ``shard_map`` :func:`device_client_ids` gives them for a device's rows
(add the chunk's offset for the chunked layout); outside it, ``jnp.arange(n)``. Non-floating leaves
are returned unchanged.

``sign_flip``  u -> -u;
``scale``      u -> factor u (factor -10 by default: a large update in the opposite direction);
``gaussian``   u -> std * N(0, I) (Blanchard et al. 2017's Gaussian Byzantine clients) or, with
               ``additive=True``, u + std * N(0, I). The noise of client i, leaf l (in
               ``jax.tree.leaves`` order) is ``jax.random.normal(fold_in(fold_in(key, i), l), shape)``,
               so it does not depend on how the clients are split over devices or chunks.

:func:`make_attack` builds one by name: ``attack = make_attack("scale", attackers=(0, 3), factor=-10.0)``,
then ``uploads = attack(uploads, ids, key)``. :class:`Attacked` wraps an algorithm so that the clients that
``batch["attacker"]`` flags attack inside the round (``config.attack.*``, built by
``fedkd.tasks.fedavg.build_algorithm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fedkd.fl import leafrand
from fedkd.sharding import CLIENTS


def device_client_ids(n: int) -> jax.Array:
  """Inside the engine's ``shard_map``: the round indices [n] of this device's n clients (rows are split
  over the 'clients' axis in device order)."""
  return jax.lax.axis_index(CLIENTS) * n + jnp.arange(n)


def attacker_mask(ids, attackers: Sequence[int]) -> jax.Array:
  """[n] bool: which of the rows ``ids`` belong to an attacker (``attackers``: round indices)."""
  att = jnp.asarray(tuple(int(a) for a in attackers), jnp.int32).reshape(-1)
  return jnp.any(jnp.asarray(ids, jnp.int32)[:, None] == att[None, :], axis=1)


def _floating(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _rows(mask, new, old):
  return jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old).astype(old.dtype)


def sign_flip(uploads, mask):
  """The attackers' rows (``mask`` [n] bool) negated."""
  return jax.tree.map(lambda u: _rows(mask, -u, u) if _floating(u) else u, uploads)


def scale(uploads, mask, factor: float = -10.0):
  """The attackers' rows multiplied by ``factor``."""
  return jax.tree.map(lambda u: _rows(mask, u * jnp.asarray(factor, u.dtype), u) if _floating(u) else u, uploads)


def gaussian(uploads, mask, key, ids, std: float = 1.0, additive: bool = False):
  """The attackers' rows replaced by std * N(0, I) noise (``additive``: that noise added to them); the
  noise of client ``ids[r]``, leaf l is normal(fold_in(fold_in(key, ids[r]), l))."""
  leaves, treedef = jax.tree.flatten(uploads)
  ids = jnp.asarray(ids, jnp.int32)
  shapes = {index: u.shape[1:] for index, u in enumerate(leaves) if _floating(u)}

  def noise_of(i):  # every floating leaf's noise of client i, leaf by leaf as documented (leafrand: fewer loops)
    return leafrand.per_leaf(lambda k, s: jax.random.normal(k, s, jnp.float32), jax.random.fold_in(key, i), shapes)

  noise = jax.vmap(noise_of)(ids)
  out = []
  for index, u in enumerate(leaves):
    if index not in shapes:
      out.append(u)
      continue
    new = u.astype(jnp.float32) + std * noise[index] if additive else std * noise[index]
    out.append(_rows(mask, new, u))
  return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class Attack:
  """``name`` applied to the rows of the clients ``attackers`` (round indices) with ``params``."""

  name: str
  attackers: tuple[int, ...]
  params: tuple[tuple[str, float | bool], ...] = ()

  def __call__(self, uploads, ids, key=None):
    mask = attacker_mask(ids, self.attackers)
    params = dict(self.params)
    if self.name == "sign_flip":
      return sign_flip(uploads, mask)
    if self.name == "scale":
      return scale(uploads, mask, **params)
    if key is None:
      raise ValueError("the gaussian attack needs a key")
    return gaussian(uploads, mask, key, ids, **params)


ATTACKS = ("sign_flip", "scale", "gaussian")
_PARAMS = {"sign_flip": (), "scale": ("factor",), "gaussian": ("std", "additive")}


def make_attack(name: str, attackers: Sequence[int], **params) -> Attack:
  """The attack ``name`` (one of :data:`ATTACKS`) on the clients ``attackers`` with its parameters
  (``scale``: factor; ``gaussian``: std, additive)."""
  if name not in ATTACKS:
    raise ValueError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
  unknown = set(params) - set(_PARAMS[name])
  if unknown:
    raise TypeError(f"attack {name!r} takes {', '.join(_PARAMS[name]) or 'no parameters'}, got {sorted(unknown)}")
  if name == "gaussian" and not float(params.get("std", 1.0)) >= 0:
    raise ValueError(f"gaussian attack needs std >= 0, got {params['std']}")
  return Attack(name, tuple(int(a) for a in attackers), tuple(sorted(params.items())))


class Attacked:
  """An algorithm whose attacker clients send ``attack``-ed uploads (``fedkd.fl.algorithm`` interface).

  Wraps ``inner`` (an algorithm whose upload is a model delta): every client runs ``inner.client``; a
  client whose ``batch["attacker"]`` is set then has its upload replaced by the attack's. The Gaussian
  noise of a client comes from the server's round key folded with ``batch["client_id"]`` (its global
  id), so it is the same on any device split and on resume. Everything else is ``inner``'s, including
  its aggregator."""

  def __init__(self, inner, attack: Attack):
    self.inner, self.attack = inner, attack
    self.name = f"{inner.name}+{attack.name}"

  def __getattr__(self, attr):  # aggregator, init, init_row, gather, server, ...: the inner algorithm's
    if attr == "inner":  # not set yet (copy / unpickling): no recursion
      raise AttributeError(attr)
    return getattr(self.inner, attr)

  def client(self, ctx, server, row, batch, gathered):
    out = self.inner.client(ctx, server, row, batch, gathered)
    mask = jnp.reshape(batch["attacker"], (1,)).astype(bool)
    ids = jnp.reshape(batch["client_id"], (1,)).astype(jnp.int32)
    one = jax.tree.map(lambda u: u[None], out.upload)
    params = dict(self.attack.params)
    if self.attack.name == "sign_flip":
      hit = sign_flip(one, mask)
    elif self.attack.name == "scale":
      hit = scale(one, mask, **params)
    else:
      key = jax.random.fold_in(jax.random.wrap_key_data(server["rng"]), server["round"])
      hit = gaussian(one, mask, key, ids, **params)
    return out._replace(upload=jax.tree.map(lambda u: u[0], hit))
