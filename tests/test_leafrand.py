"""Per-leaf random draws made together equal jax.random's draws leaf by leaf, bit for bit, and make fewer
random-bit computations (the while loops XLA:CPU compiles)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.fl import attacks, compress, leafrand

# leaf shapes as a small UNet has them: several leaves of one size (biases, norms), scalars, an empty leaf
SHAPES = {0: (3, 3, 1, 4), 1: (4,), 2: (4,), 3: (3, 3, 4, 8), 4: (8,), 5: (), 7: (2, 2), 8: (0, 3), 9: (36,), 10: (4,)}
SAMPLERS = {
  "normal": lambda k, s: jax.random.normal(k, s, jnp.float32),
  "uniform": lambda k, s: jax.random.uniform(k, s, jnp.float32),
  "bits": lambda k, s: jax.random.bits(k, s, jnp.uint32),
}


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_equals_leaf_by_leaf_draws(name, partitionable):
  draw = SAMPLERS[name]
  with jax.threefry_partitionable(partitionable):
    key = jax.random.fold_in(jax.random.key(7), 3)
    got = jax.jit(lambda k: leafrand.per_leaf(draw, k, SHAPES))(key)
    want = {l: draw(jax.random.fold_in(key, l), s) for l, s in SHAPES.items()}
  assert sorted(got) == sorted(SHAPES)
  for l in SHAPES:
    assert got[l].shape == SHAPES[l] and got[l].dtype == want[l].dtype
    if name == "normal":  # the same bits (exact above); the float transform to a normal may round differently
      # in another program (XLA:CPU at the suite's optimisation level 0: up to 2.4e-7 here, bits equal)
      np.testing.assert_allclose(np.asarray(got[l]), np.asarray(want[l]), rtol=0, atol=1e-6, err_msg=f"leaf {l}")
    else:
      np.testing.assert_array_equal(np.asarray(got[l]), np.asarray(want[l]), err_msg=f"leaf {l}")
  assert leafrand.per_leaf(draw, key, {}) == {}


def _while_loops(fn, key) -> int:
  """While loops in the compiled CPU program: JAX lowers each threefry computation on CPU to one (rolled)."""
  return len(re.findall(r"\bwhile\(", jax.jit(fn).lower(key).compile().as_text()))


def test_one_fold_in_and_one_draw_per_leaf_size():
  """SHAPES holds 10 leaves of 5 nonempty sizes (36, 4, 288, 8, 1) and an empty one: together one fold_in and
  5 draws, leaf by leaf 10 fold_ins and 9 draws (on CPU, a while loop each; the empty draw has none, and one
  scalar leaf's needs none)."""
  key = jax.random.key(0)
  draw = SAMPLERS["normal"]
  assert _while_loops(lambda k: leafrand.per_leaf(draw, k, SHAPES), key) == 1 + 5
  assert _while_loops(lambda k: [draw(jax.random.fold_in(k, l), s) for l, s in SHAPES.items()], key) >= 10 + 8


def test_attack_and_int8_draws_are_the_documented_ones():
  """attacks.gaussian and compress.int8_tree (which draw through per_leaf) against the documented per-leaf
  formulas computed here leaf by leaf: noise normal(fold_in(fold_in(key, i), l)), stochastic rounding with
  uniform(fold_in(key, l))."""
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(3, 3, 2)).astype(np.float32), "b": np.arange(3, dtype=np.int32)}
  tree["c"] = rng.normal(size=(3, 4)).astype(np.float32)
  key = jax.random.key(11)
  ids = np.array([5, 9, 2], np.int32)
  mask = np.array([True, False, True])
  out = attacks.gaussian(tree, jnp.asarray(mask), key, ids, std=0.5)
  leaves = jax.tree.leaves(tree)
  for l, (u, o) in enumerate(zip(leaves, jax.tree.leaves(out))):
    if u.dtype.kind != "f":
      np.testing.assert_array_equal(np.asarray(o), u)
      continue
    for r, i in enumerate(ids):
      noise = 0.5 * np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), l), u.shape[1:]))
      np.testing.assert_allclose(np.asarray(o[r]), noise if mask[r] else u[r], rtol=0, atol=1e-6)
  one = {"a": tree["a"][0], "b": tree["b"], "c": tree["c"][0]}
  got = compress.int8_tree(one, key)
  for l, (u, g) in enumerate(zip(jax.tree.leaves(one), jax.tree.leaves(got))):
    if u.dtype.kind != "f":
      np.testing.assert_array_equal(np.asarray(g), u)
      continue
    noise = np.asarray(jax.random.uniform(jax.random.fold_in(key, l), u.shape), np.float32)
    lo, hi = np.float32(u.min()), np.float32(u.max())
    scale = np.float32((hi - lo) / np.float32(255.0))
    q = np.clip(np.floor((u - lo) / scale + noise), 0, 255)
    np.testing.assert_allclose(np.asarray(g), lo + q.astype(np.float32) * scale, rtol=0, atol=1e-6)
