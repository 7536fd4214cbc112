"""Random draws for the leaves of a pytree, leaf l keyed ``fold_in(key, l)``, in few random-bit computations.

fedkd's per-leaf draws (the Gaussian attackers' noise, int8 stochastic rounding) are defined leaf by leaf as
``draw(fold_in(key, l), shape_l)``, so that they do not depend on how the clients are split over devices.
Drawn one leaf at a time, each is its own threefry computation, which JAX lowers on CPU to a rolled while
loop: a round whose clients are unrolled (the CPU layout) holds clients x leaves of them, and XLA:CPU's compile
time grows faster than their number (``bench/leafrand_compile.py``). :func:`per_leaf` draws the same random
bits from one ``fold_in`` over the vector of leaf indices and one draw per distinct leaf size, vmapped over the
keys of that size's leaves: threefry works elementwise on its counters, so a batch of keys draws what each key
draws alone, and a draw of shape s is the draw of shape (prod s,) reshaped. Bits and uniforms are bitwise
equal; a normal's float transform of those bits may round its last bit differently in another program
(``tests/test_leafrand.py`` checks both against ``jax.random`` leaf by leaf).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def per_leaf(
  draw: Callable[[jax.Array, tuple[int, ...]], jax.Array], key: jax.Array, shapes: Mapping[int, tuple[int, ...]]
) -> dict[int, jax.Array]:
  """``{l: draw(fold_in(key, l), shapes[l])}`` for the leaf indices ``l`` of ``shapes``.

  ``draw(key, shape)`` is a ``jax.random`` sampler with its dtype and range bound, e.g.
  ``lambda k, s: jax.random.normal(k, s, jnp.float32)``. ``key``: a typed key array of shape ()."""
  if not shapes:
    return {}
  index = sorted(shapes)
  keys = jax.vmap(lambda l: jax.random.fold_in(key, l))(jnp.asarray(index, jnp.uint32))
  by_size: dict[int, list[int]] = {}  # leaf size -> rows of ``keys`` (positions in ``index``)
  for row, l in enumerate(index):
    by_size.setdefault(math.prod(shapes[l]), []).append(row)
  out = {}
  for size, rows in by_size.items():
    drawn = jax.vmap(lambda k, size=size: draw(k, (size,)))(keys[np.asarray(rows)])
    for j, row in enumerate(rows):
      out[index[row]] = drawn[j].reshape(shapes[index[row]])
  return out
