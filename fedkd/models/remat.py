"""Per-block rematerialisation, switched on at trace time.

``remat_blocks()`` is a context manager (a ``jax.make_user_context`` value: part of the ``jax.jit``
cache key, thread-local). While it is active, every model method decorated with :func:`block`
(UNet conv blocks, TransUNet stem / transformer / decoder blocks) runs under ``nnx.remat``
(``jax.checkpoint``): the forward pass keeps only each block's inputs and the backward pass
recomputes one block's activations right before that block's gradient — activation memory of the
block inputs plus one block instead of every intermediate of the network. Numerics are unchanged.
The engine enables it for ``engine.remat=True`` (``fedkd.fl.algorithm.ClientContext.forward``).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

_REMAT = jax.make_user_context(default_value=False)


def remat_blocks(enabled: bool = True):
  """Context manager: model blocks traced inside it are rematerialised in the backward pass."""
  return _REMAT(bool(enabled))


def remat_active() -> bool:
  return bool(_REMAT.value)


def block(method):
  """Decorator for a module's ``__call__``: under ``remat_blocks()`` the call is ``nnx.remat``-ed."""

  @functools.wraps(method)
  def wrapper(self, *args):
    if remat_active():
      return nnx.remat(method)(self, *args)
    return method(self, *args)

  return wrapper
