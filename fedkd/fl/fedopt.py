"""FedAdagrad / FedYogi server optimizers exactly as Reddi et al. 2021 ("Adaptive Federated
Optimization", ICLR 2021), Algorithm 2.

With the round's mean client delta Delta_t (the server optimizer receives the pseudo-gradient
g = -Delta_t), m_{-1} = 0 and v_{-1} = ``initial_accumulator``:

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                     (adagrad)
    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)    (yogi)
    x_{t+1} = x_t + lr m_t / (sqrt(v_t) + eps)

No bias correction and eps outside the square root, as the paper states it. optax's own
``optax.yogi`` bias-corrects both moments and starts m at the accumulator value, and ``optax.adagrad``
has no first moment and puts eps inside the root, so neither is the paper's update.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

KINDS = ("yogi", "adagrad")


class FedOptState(NamedTuple):
  m: optax.Params
  v: optax.Params


def scale_by_fedopt(kind: str, b1: float, b2: float, eps: float, initial_accumulator: float):
  """The direction m_t / (sqrt(v_t) + eps) of Algorithm 2 (in the gradient's sign)."""
  if kind not in KINDS:
    raise ValueError(f"unknown FedOpt optimizer {kind!r}; use one of {', '.join(KINDS)}")

  def init(params):
    return FedOptState(
      jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator), params)
    )

  def update(grads, state, params=None):
    del params
    m = jax.tree.map(lambda g, mm: b1 * mm + (1 - b1) * g, grads, state.m)
    if kind == "adagrad":
      v = jax.tree.map(lambda g, vv: vv + g * g, grads, state.v)
    else:
      v = jax.tree.map(lambda g, vv: vv - (1 - b2) * g * g * jnp.sign(vv - g * g), grads, state.v)
    return jax.tree.map(lambda mm, vv: mm / (jnp.sqrt(vv) + eps), m, v), FedOptState(m, v)

  return optax.GradientTransformation(init, update)


def fedopt(kind: str, learning_rate: float, b1: float, b2: float, eps: float, initial_accumulator: float):
  """FedAdagrad / FedYogi as an optax transformation stepping on the pseudo-gradient."""
  return optax.chain(scale_by_fedopt(kind, b1, b2, eps, initial_accumulator), optax.scale(-learning_rate))
