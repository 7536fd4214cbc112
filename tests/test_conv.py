"""Tests for fedkd.models.conv: im2col + GEMM convolutions against XLA's convolutions."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax import lax

import fedkd.models.transunet as transunet_mod
import fedkd.models.unet as unet_mod
from fedkd.models import remat
from fedkd.models import build_model, init_params
from fedkd.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")
UNET = dict(name="unet", width=8, depth=2, groups=8, num_classes=3)
TRANSUNET = dict(
  name="transunet",
  num_classes=3,
  image_size=32,
  patch_size=4,
  stem_width=4,
  hidden=16,
  num_layers=2,
  num_heads=2,
  mlp_dim=32,
  decoder_width=16,
  skips=True,
)


def _flax_dn(lhs, rhs):
  """The ConvDimensionNumbers nnx.Conv passes (channels-last)."""
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)


def _eqns(jaxpr):
  """All equations of a (closed) jaxpr, sub-jaxprs (jit, custom_jvp, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def _prims(fn, *args):
  """The equations of ``fn``'s traced program (no compilation)."""
  return list(_eqns(jax.make_jaxpr(fn)(*args).jaxpr))


def _run0(fn, *args):
  """jit ``fn`` compiled at XLA backend optimisation level 0 (both sides of every comparison
  alike): several times faster to compile, and compiling is what these small tests spend on."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _randn(seed, shape, dtype=jnp.float32):
  """Host-side normal samples (numpy: no per-shape compilation of a PRNG kernel)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


# ---------------------------------------------------------------------------- the convolution


@pytest.mark.parametrize(
  "padding,recompute", [("SAME", False), ("VALID", False), (((1, 0), (2, 1)), False), ("SAME", True)]
)
def test_gemm_conv_matches_lax(padding, recompute):
  """Values and gradients wrt input and kernel for 1x1 / 3x3 kernels, strides 1 / 2, odd and even
  spatial sizes (all cases in one program); with the patch matrix kept from the forward pass and
  rebuilt in the backward pass (jax.checkpoint around im2col + matmul, the accelerator default)."""
  cases = [(k, stride, size) for k in (1, 3) for stride in (1, 2) for size in (7, 8)]
  xs = [_randn(i, (2, size, size - 1, 3)) for i, (_, _, size) in enumerate(cases)]
  ws = [_randn(50 + i, (k, k, 3, 5)) for i, (k, _, _) in enumerate(cases)]

  def ref(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)

  def gemm(x, w, stride):
    with conv.gemm_convs(recompute_patches=recompute):
      return conv.conv_general_dilated(
        x,
        w,
        (stride, stride),
        padding,
        lhs_dilation=(1, 1),
        rhs_dilation=(1, 1),
        dimension_numbers=_flax_dn(x, w),
        out_sharding=None,
      )

  cts = [
    _randn(100 + i, jax.eval_shape(functools.partial(ref, stride=c[1]), x, w).shape)
    for i, (x, w, c) in enumerate(zip(xs, ws, cases))
  ]

  def values_and_vjps(xs, ws, cts):
    out = []
    for x, w, ct, (_, stride, _) in zip(xs, ws, cts, cases):
      y_ref, vjp_ref = jax.vjp(lambda x, w: ref(x, w, stride), x, w)
      y, vjp = jax.vjp(lambda x, w: gemm(x, w, stride), x, w)
      out.append((y, y_ref, vjp(ct), vjp_ref(ct)))
    return out

  for case, (y, y_ref, grads, grads_ref) in zip(cases, _run0(values_and_vjps, xs, ws, cts)):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, case
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=str(case))
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=str(case))
  eqns = _prims(lambda xs, ws: [gemm(x, w, c[1]) for x, w, c in zip(xs, ws, cases)], xs, ws)
  assert not any(e.primitive is lax.conv_general_dilated_p for e in eqns)
  # one checkpoint per 3x3 conv when recomputing (1x1 patches are the input itself), none otherwise
  n_ckpt = sum(e.primitive.name in ("checkpoint", "remat2") for e in eqns)
  assert n_ckpt == (sum(k == 3 for k, _, _ in cases) if recompute else 0)


def test_gemm_conv_dilation_rectangular_kernel_and_cropping():
  x, w = _randn(0, (2, 9, 8, 4)), _randn(1, (3, 2, 4, 6))
  # (negative padding = cropping only at stride 1: XLA:CPU's own conv is wrong for negative
  # padding with strides > 1, where the GEMM path agrees with a numpy loop instead)
  for strides, padding, dil in [
    ((2, 1), "SAME", (2, 1)),
    ((1, 2), ((2, 1), (0, 3)), (1, 3)),
    ((1, 1), ((-1, 2), (1, -1)), (1, 1)),
    ((1, 1), "SAME_LOWER", (2, 2)),
  ]:

    def both(x, w):
      with conv.gemm_convs():
        y = conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil, dimension_numbers=NHWC)
      return y, lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil, dimension_numbers=NHWC)

    y, ref = _run0(both, x, w)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=str((strides, padding, dil)))


def test_default_is_lax_and_unsupported_falls_back():
  x, w = _randn(0, (2, 8, 8, 4)), _randn(1, (3, 3, 4, 6))
  ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  assert not conv.gemm_convs_active()
  np.testing.assert_array_equal(conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC), ref)
  with conv.gemm_convs():
    assert conv.gemm_convs_active()
    with conv.gemm_convs(False):
      assert not conv.gemm_convs_active()
    assert conv.gemm_convs_active()
  assert not conv.gemm_convs_active()
  # grouped conv, input dilation, NCHW layout: lax
  wg = _randn(1, (3, 3, 2, 6))
  fallbacks = [
    (lambda c: c(x, wg, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)),
    (lambda c: c(x, w, (1, 1), ((1, 1), (2, 1)), lhs_dilation=(2, 2), dimension_numbers=NHWC)),
    (lambda c: c(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), "SAME")),
  ]
  for f in fallbacks:
    with conv.gemm_convs():
      y = f(conv.conv_general_dilated)
      assert any(e.primitive is lax.conv_general_dilated_p for e in _prims(lambda: f(conv.conv_general_dilated)))
    np.testing.assert_array_equal(y, f(lax.conv_general_dilated))


def test_context_is_part_of_the_jit_cache_key():
  traces = []

  @jax.jit
  def f(x, w):
    traces.append(conv.gemm_convs_active())
    return conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

  x, w = _randn(0, (1, 6, 6, 2)), _randn(1, (3, 3, 2, 3))
  a = f(x, w)
  with conv.gemm_convs():
    b = f(x, w)
  f(x, w)
  assert traces == [False, True]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_vmap_over_clients_is_a_batched_gemm():
  c = 3
  x, w = _randn(0, (c, 2, 9, 8, 4)), _randn(1, (c, 3, 3, 4, 6))

  def loss(conv_fn, x, w):
    y = jax.vmap(lambda x, w: conv_fn(x, w, (2, 2), "SAME", dimension_numbers=_flax_dn(x, w)))(x, w)
    return jnp.sum(y * jnp.cos(y)), y

  def run(gemm, x, w):
    with conv.gemm_convs(gemm):
      return jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(conv.conv_general_dilated, x, w)

  ((_, y_ref), g_ref), ((_, y), g) = _run0(lambda x, w: (run(False, x, w), run(True, x, w)), x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  gemm_eqns = _prims(lambda x, w: run(True, x, w), x, w)
  lax_eqns = _prims(lambda x, w: run(False, x, w), x, w)
  assert not any(e.primitive is lax.conv_general_dilated_p for e in gemm_eqns)
  batched = [e for e in gemm_eqns if e.primitive is lax.dot_general_p and e.params["dimension_numbers"][1][0]]
  assert len(batched) >= 3  # forward + both gradients are batched (over clients) GEMMs
  groups = [e.params["feature_group_count"] for e in lax_eqns if e.primitive is lax.conv_general_dilated_p]
  assert groups and max(groups) == c  # what vmap makes of XLA's conv: a grouped convolution


C3 = 3  # clients in the vmapped mode tests


def _mode_matches_xla(mode, k, stride=1, padding="SAME", hw=(9, 8)):
  """Under vmap over C3 clients, gemm_convs(mode=mode) gives XLA's conv values and gradients (x, w)
  for a k x k conv of hw images; returns (equations of the mode's program, of XLA's) for structural checks."""
  x, w = _randn(0, (C3, 2, *hw, 4)), _randn(1, (C3, k, k, 4, 6))

  def run(mode, x, w):
    def loss(x, w):
      y = jax.vmap(
        lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_flax_dn(x, w))
      )(x, w)
      return jnp.sum(y * jnp.cos(y)), y

    with conv.gemm_convs(mode is not None, mode=mode or "gemm"):
      return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)

  ((_, y_ref), g_ref), ((_, y), g) = _run0(lambda x, w: (run(None, x, w), run(mode, x, w)), x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  return _prims(lambda x, w: run(mode, x, w), x, w), _prims(lambda x, w: run(None, x, w), x, w)


def _convs_of(eqns):
  return [e for e in eqns if e.primitive is lax.conv_general_dilated_p]


@pytest.mark.parametrize("k,stride,padding", [(3, 1, "SAME"), (3, 2, "VALID"), (1, 1, "SAME")])
def test_wgrad_mode_keeps_xla_convs_and_gemms_the_kernel_gradient(k, stride, padding):
  """gemm_convs(mode="wgrad"), vmapped over clients: XLA's values and gradients; forward and input
  gradient stay convolutions (grouped, as vmap makes them), while the kernel gradient is a
  client-batched GEMM instead of vmap's batch_group_count convolution (1x1: matmuls)."""
  eqns, ref_eqns = _mode_matches_xla("wgrad", k, stride, padding)
  convs = _convs_of(eqns)
  assert any(e.params["batch_group_count"] == C3 for e in _convs_of(ref_eqns))  # vmap's kernel gradient
  assert all(e.params["batch_group_count"] == 1 for e in convs)
  if k == 1:
    assert not convs
  else:  # forward + input gradient (each also listed inside the custom_vjp), grouped over the clients
    assert len(convs) >= 2 and all(e.params["feature_group_count"] == C3 for e in convs)
  # the kernel gradient: a dot_general batched over the clients
  assert any(e.primitive is lax.dot_general_p and e.params["dimension_numbers"][1][0] for e in eqns)
  with pytest.raises(ValueError, match="unknown mode"):
    with conv.gemm_convs(mode="direct"):
      pass


@pytest.mark.parametrize("k,hw", [(3, (9, 8)), (1, (9, 8)), (3, (5, 4)), (3, (4, 4)), (3, (4, 2))])
def test_matmul_mode_keeps_kxk_convs_and_makes_1x1_matmuls(k, hw):
  """gemm_convs(mode="matmul") under vmap: XLA's values and gradients; a 3x3 conv with more than
  MATMUL_MAX_POSITIONS (16) output positions per image (9 x 8, 5 x 4) stays XLA's (grouped forward/input
  gradient, batch-grouped kernel gradient); a 1x1 conv, or a 3x3 conv with at most 16 positions
  (4 x 4, 4 x 2), becomes client-batched matmuls with no convolution left."""
  assert conv.MATMUL_MAX_POSITIONS == 16
  eqns, _ = _mode_matches_xla("matmul", k, hw=hw)
  if k == 3 and hw[0] * hw[1] > 16:
    assert {e.params["batch_group_count"] for e in _convs_of(eqns)} == {1, C3}
  else:
    assert not _convs_of(eqns) and any(e.primitive is lax.dot_general_p for e in eqns)


def _module(cls, *args, **kw):
  """(graphdef, params) of a flax module built abstractly, params drawn on the host (nonzero
  bias)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kw)), nnx.Param)
  params = jax.tree.map(lambda a: _randn(a.size, a.shape) / np.sqrt(a.shape[0]), abstract)
  return graphdef, params


def test_bf16():
  x, w = _randn(0, (2, 8, 7, 4)), _randn(1, (3, 3, 4, 6))
  up_f32 = _module(conv.ConvTranspose, 4, 3, (2, 2), strides=(2, 2))
  up_bf16 = (_module(conv.ConvTranspose, 4, 3, (2, 2), strides=(2, 2), dtype=jnp.bfloat16)[0], up_f32[1])

  def run(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    ref = lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=NHWC)
    with conv.gemm_convs():
      y = conv.conv_general_dilated(xb, wb, (2, 2), "SAME", dimension_numbers=NHWC)
      y32 = conv.conv_general_dilated(
        xb, wb, (2, 2), "SAME", dimension_numbers=NHWC, preferred_element_type=jnp.float32
      )
      up, up_b = nnx.merge(*up_f32)(x), nnx.merge(*up_bf16)(xb)
    return ref, y, y32, up, up_b

  ref, y, y32, up, up_b = _run0(run, x, w)
  assert y.dtype == jnp.bfloat16 and y32.dtype == jnp.float32 and up_b.dtype == jnp.bfloat16
  scale = np.abs(np.asarray(ref)).max()
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.03 * scale)
  np.testing.assert_allclose(y32, ref, atol=0.03 * scale)
  np.testing.assert_allclose(np.asarray(up_b, np.float32), up, atol=0.03 * np.abs(np.asarray(up)).max())


# ---------------------------------------------------------------------------- transposed conv


@pytest.mark.parametrize("shape,kernel", [((2, 5, 3, 4), (2, 2)), ((3, 2, 4, 6, 4), (3, 2))])
def test_conv_transpose_matches_nnx(shape, kernel):
  """Pixel-shuffle einsum == nnx.ConvTranspose (values, grads wrt input, kernel, bias); also with
  extra batch dims and a non-square kernel."""
  graphdef, params = _module(conv.ConvTranspose, 4, 3, kernel, strides=kernel)
  pgraph, pparams = _module(nnx.ConvTranspose, 4, 3, kernel, strides=kernel)
  assert jax.tree.structure(params) == jax.tree.structure(pparams)
  x = _randn(3, shape)
  ct = _randn(4, shape[:-3] + (shape[-3] * kernel[0], shape[-2] * kernel[1], 3))

  def f(g, p, x):
    return jnp.sum(nnx.merge(g, p)(x) * ct)

  def gemm(p, x):
    with conv.gemm_convs():
      return jax.value_and_grad(f, argnums=(1, 2))(graphdef, p, x)

  def run(p, x):
    return (
      gemm(p, x),
      jax.value_and_grad(f, argnums=(1, 2))(pgraph, p, x),
      nnx.merge(graphdef, p)(x),
      nnx.merge(pgraph, p)(x),
    )

  (val, grads), (val_ref, grads_ref), y, y_plain = _run0(run, params, x)
  assert not any(e.primitive is lax.conv_general_dilated_p for e in _prims(gemm, params, x))
  np.testing.assert_allclose(val, val_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y, y_plain)  # outside the context: flax's own call


def test_conv_transpose_unsupported_falls_back():
  x = _randn(0, (2, 5, 5, 4))
  for kw in [dict(kernel_size=(3, 3), strides=(2, 2)), dict(kernel_size=(2, 2), strides=(2, 2), padding="CIRCULAR")]:
    graphdef, params = _module(conv.ConvTranspose, 4, 3, **kw)

    def gemm(p, x):
      with conv.gemm_convs():
        return nnx.merge(graphdef, p)(x)

    assert any(e.primitive is lax.conv_general_dilated_p for e in _prims(gemm, params, x))
    plain = _module(nnx.ConvTranspose, 4, 3, **kw)[0]
    y, y_ref = _run0(lambda p, x: (gemm(p, x), nnx.merge(plain, p)(x)), params, x)
    np.testing.assert_array_equal(y, y_ref)


# ---------------------------------------------------------------------------- models


def _build(cfg, seed, plain=False):
  """The model; with ``plain`` as built from flax's own nnx.Conv / nnx.ConvTranspose (the
  pre-GEMM modules, lax convolutions)."""
  if not plain:
    return build_model(cfg, seed)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(unet_mod, "Conv", nnx.Conv)
    m.setattr(unet_mod, "ConvTranspose", nnx.ConvTranspose)
    m.setattr(transunet_mod, "Conv", nnx.Conv)
    return build_model(cfg, seed)


def _graphdef(cfg, plain=False):
  return nnx.split(nnx.eval_shape(lambda: _build(cfg, 0, plain)), nnx.Param)[0]


def _params(cfg, seed, plain=False):
  return nnx.to_pure_dict(nnx.split(_build(cfg, seed, plain), nnx.Param)[1])


def _apply(graphdef):
  return lambda p, x: nnx.merge(graphdef, nnx.State(p))(x)


def _key_paths(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


CFGS = {"unet": ml_collections.ConfigDict(UNET), "transunet": ml_collections.ConfigDict(TRANSUNET)}


def _random_params(name, n, seed=0):
  """``n`` clients' parameters (stacked on a leading axis), drawn independently on the host with
  init-like scales: kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), everything else
  N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  structure = jax.eval_shape(lambda: _params(CFGS[name], 0))

  def draw(path, leaf):
    shape = (n,) + leaf.shape
    key = getattr(path[-1], "key", None)
    z = rng.standard_normal(shape, np.float32)
    if key == "kernel":
      return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))
    return jnp.asarray((1.0 if key == "scale" else 0.0) + 0.1 * z)

  return jax.tree_util.tree_map_with_path(draw, structure)


@pytest.mark.parametrize("name", list(CFGS))
def test_params_unchanged_and_default_path_identical(name):
  cfg = CFGS[name]
  plain = nnx.eval_shape(lambda: _build(cfg, 0, plain=True))
  convs = [m for _, m in nnx.iter_graph(plain) if isinstance(m, nnx.Conv)]
  assert convs and all(c.conv_general_dilated is lax.conv_general_dilated for c in convs)
  model = nnx.eval_shape(lambda: build_model(cfg, 0))
  convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
  assert convs and all(c.conv_general_dilated is conv.conv_general_dilated for c in convs)
  # same keys / shapes / dtypes as fedkd.models.init_params and as the plain flax model ...
  structure = _key_paths(jax.eval_shape(lambda: init_params(cfg, 0)[1]))
  new = _key_paths(jax.eval_shape(lambda: _params(cfg, 0)))
  ref = _key_paths(jax.eval_shape(lambda: _params(cfg, 0, plain=True)))
  assert set(new) == set(ref) == set(structure)
  for k, v in ref.items():
    assert new[k].shape == v.shape == structure[k].shape
    assert new[k].dtype == v.dtype == structure[k].dtype
  # ... and the same init values: the initialisation programs (random bits, seed, every op and
  # literal) are identical, so their values are (a different seed does change the program).
  init_program = str(jax.make_jaxpr(lambda: _params(cfg, 0))())
  assert init_program == str(jax.make_jaxpr(lambda: _params(cfg, 0, plain=True))())
  assert init_program != str(jax.make_jaxpr(lambda: _params(cfg, 1, plain=True))())
  # outside gemm_convs the forward is bit-identical to the plain flax model's
  params = jax.tree.map(lambda a: a[0], _random_params(name, 1))
  x = _randn(0, (2, 32, 32, 1))
  out = _run0(_apply(_graphdef(cfg)), params, x)
  out_ref = _run0(_apply(_graphdef(cfg, plain=True)), params, x)
  np.testing.assert_array_equal(out, out_ref)


@pytest.mark.parametrize("name", list(CFGS))
def test_vmapped_model_gemm_equals_lax(name):
  """Logits and parameter gradients of 3 clients (different params) with and without gemm_convs;
  the GEMM program has no convolution left."""
  apply = _apply(_graphdef(CFGS[name]))
  params = _random_params(name, 3)
  x = _randn(1, (3, 2, 32, 32, 1))
  target = _randn(2, (3, 2, 32, 32, 3))

  def loss(p, x):
    logits = jax.vmap(apply)(p, x)
    return jnp.mean((logits - target) ** 2), logits

  def run(p, x, gemm):
    with conv.gemm_convs(gemm):
      return jax.value_and_grad(loss, has_aux=True)(p, x)

  ((l_ref, logits_ref), g_ref), ((l, logits), g) = _run0(lambda p, x: (run(p, x, False), run(p, x, True)), params, x)
  assert not np.allclose(logits_ref[0], logits_ref[1])  # the clients differ
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(l, l_ref, rtol=1e-4)
  ref = {k: np.asarray(v) for k, v in _key_paths(g_ref).items()}  # (host side: no per-shape
  for k, v in _key_paths(g).items():  # compiles of eager ops)
    # (conv biases in front of a GroupNorm have a zero gradient: float noise, hence the atol floor)
    np.testing.assert_allclose(v, ref[k], rtol=1e-4, atol=1e-4 * np.abs(ref[k]).max() + 1e-6, err_msg=k)
  assert not any(e.primitive is lax.conv_general_dilated_p for e in _prims(lambda p, x: run(p, x, True), params, x))


def test_remat_blocks_wrap_every_block_and_keep_gradients():
  x = _randn(0, (2, 32, 32, 1))

  def checkpoints(cfg, on):
    graphdef = _graphdef(cfg)
    params = jax.eval_shape(lambda: _params(cfg, 0))

    def fwd(p, x):
      with remat.remat_blocks(on):
        return _apply(graphdef)(p, x)

    return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in _prims(fwd, params, x))

  cfg, tcfg = CFGS["unet"], CFGS["transunet"]
  assert checkpoints(cfg, False) == 0 and checkpoints(tcfg, False) == 0
  assert checkpoints(cfg, True) == 2 * cfg.depth + 1  # encoder blocks, mid, decoder blocks
  n_stem = int(np.log2(tcfg.patch_size))  # stem stages, transformer layers, decoder blocks
  assert checkpoints(tcfg, True) == n_stem + tcfg.num_layers + n_stem

  graphdef = _graphdef(cfg)
  params = jax.tree.map(lambda a: a[0], _random_params("unet", 1))

  def grads(p, x):
    out = []
    for on in (False, True):
      with remat.remat_blocks(on):
        out.append(jax.grad(lambda q: jnp.mean(_apply(graphdef)(q, x) ** 2))(p))
    return out

  g_ref, g = _run0(grads, params, x)
  for k, v in _key_paths(g).items():
    ref = np.asarray(_key_paths(g_ref)[k])
    np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max() + 1e-7, err_msg=k)


def test_unet_features():
  x = _randn(0, (2, 32, 32, 1))
  cfg = CFGS["unet"]
  graphdef = _graphdef(cfg)
  params = jax.tree.map(lambda a: a[0], _random_params("unet", 1))

  def forwards(p, x):  # the feature forward gives the logits of the plain call
    model = nnx.merge(graphdef, nnx.State(p))
    with conv.gemm_convs():
      return model.forward_with_features(x), model(x)

  (logits, feats), logits3 = _run0(forwards, params, x)
  np.testing.assert_allclose(logits3, logits, rtol=1e-6, atol=1e-6)
  assert feats.shape == (2, 8, 8, 2 * cfg.width * 2 ** (cfg.depth - 1))
