"""Client-batched convolutions: convolutions as im2col patches x weights matrix multiplies.

Under ``jax.vmap`` over per-client kernels, ``lax.conv_general_dilated`` lowers to a *grouped*
convolution (``feature_group_count`` = number of clients), which GPUs run far below their matmul
throughput. Written as "gather the kernel taps into a patch matrix, then one ``dot_general``", the
same convolution vmaps into a *batched* GEMM (``dot_general`` with a batch dimension), which runs on
tensor cores.

The formulation is chosen at trace time:

* ``gemm_convs()`` — context manager; while it is active, the model convolutions
  (``conv_general_dilated`` below, passed to ``nnx.Conv(conv_general_dilated=...)``, and
  ``conv_transpose`` for UNet's stride == kernel transposed convs) use the GEMM formulation.
  It is a ``jax.make_user_context`` value, so it is part of the ``jax.jit`` cache key: a jitted
  function called inside and outside the context is traced once for each. It is thread-local.
* ``gemm_convs(mode="wgrad")`` keeps XLA's convolution for the forward pass and the input gradient
  (vmapped: grouped convolutions, which cuDNN runs directly) and computes only the kernel gradient
  as patches^T x output-gradient batched GEMMs (vmapped, XLA's own kernel gradient is a
  ``batch_group_count`` convolution, the slowest of the three: ``python -m bench.conv``).
  ``gemm_convs(mode="matmul")`` makes only the convs that are matmuls anyway GEMMs (1x1 kernels,
  UNet's stride == kernel transposed convs) and the convs whose output has at most
  ``MATMUL_MAX_POSITIONS`` positions per image (a UNet's deepest level, where the patch matrix is
  small: the width-32 CPU round ran 1.07x faster with it, ``docs/engine.md``), and leaves every other
  conv, its gradients included, to XLA (vmapped: cuDNN's grouped convolutions). 1x1 convs and UNet's
  transposed convs are matmuls in all modes.
* Outside it (the default) they call ``lax.conv_general_dilated`` / ``nnx.ConvTranspose`` exactly
  as flax does (bit-identical to plain ``nnx.Conv`` / ``nnx.ConvTranspose``).

Parameters are untouched: the GEMM path reads the same HWIO kernels (``kernel.reshape(kh*kw*cin,
cout)``), so parameter names, shapes and initial values are those of the plain flax modules.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding
from jax import lax

__all__ = ["gemm_convs", "gemm_convs_active", "conv_general_dilated", "conv_transpose", "Conv", "ConvTranspose"]

_GEMM = jax.make_user_context(default_value=False)
# Rebuild the im2col patches in the backward pass (jax.checkpoint) instead of keeping them from the
# forward pass: None = on accelerators, off on CPU (XLA:CPU ignores the recompute boundary, so
# there it only costs time); True / False force it (``gemm_convs(recompute_patches=...)``).
_RECOMPUTE = jax.make_user_context(default_value=None)


GEMM_MODES = ("gemm", "wgrad", "matmul")
# mode "matmul": a conv whose output has at most this many positions per image (4 x 4) is one GEMM
MATMUL_MAX_POSITIONS = 16


@contextlib.contextmanager
def gemm_convs(enabled: bool = True, recompute_patches: bool | None = None, mode: str = "gemm"):
  """Context manager: while active (and ``enabled``), model convolutions traced in this thread use
  the im2col + GEMM formulation: for the forward pass and both gradients (``mode="gemm"``), for
  the kernel gradient only (``mode="wgrad"``), or only where the conv is a matmul (1x1 kernels,
  stride == kernel transposed convs) or has a small output (``MATMUL_MAX_POSITIONS``; ``mode="matmul"``).
  ``gemm_convs(False)`` switches it off inside an outer one. ``recompute_patches`` ("gemm" mode): rebuild
  the patch matrix (kh*kw times the conv input) in the backward pass rather than keep it alive from the
  forward pass; None (default) = on for GPU/TPU, off on CPU."""
  if mode not in GEMM_MODES:
    raise ValueError(f"gemm_convs: unknown mode {mode!r}; choose from {GEMM_MODES}")
  with _GEMM(mode if enabled else False), _RECOMPUTE(recompute_patches):
    yield


def _recompute_patches() -> bool:
  r = _RECOMPUTE.value
  return jax.default_backend() != "cpu" if r is None else bool(r)


def gemm_convs_active() -> bool:
  return bool(_GEMM.value)


def gemm_convs_mode() -> str | None:
  """The active ``gemm_convs`` mode ("gemm" / "wgrad" / "matmul"), or None outside it."""
  return _GEMM.value or None


def _channels_last_dn(ndim: int) -> lax.ConvDimensionNumbers:
  """Dimension numbers of N(spatial...)C inputs/outputs and (spatial...)IO kernels (NHWC/HWIO)."""
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _conv_gemm(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation,
  rhs_dilation,
  dimension_numbers,
  feature_group_count,
  precision,
  kwargs,
):  # kwargs: a dict this consumes
  """im2col + dot_general, or None where this formulation does not apply (caller falls back)."""
  preferred = kwargs.pop("preferred_element_type", None)
  if kwargs.pop("out_sharding", None) is not None:  # explicit-sharding outputs: leave to XLA's conv
    return None
  if kwargs.pop("batch_group_count", 1) != 1 or kwargs:
    return None
  nd = lhs.ndim
  if nd < 3 or rhs.ndim != nd or feature_group_count != 1 or lhs.dtype != rhs.dtype:
    return None
  if dimension_numbers is None:  # lax's default is NCHW/OIHW, not ours
    return None
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if tuple(map(tuple, dn)) != tuple(map(tuple, _channels_last_dn(nd))):
    return None
  nsp = nd - 2
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return None
  strides = tuple(int(s) for s in window_strides)
  dil = (1,) * nsp if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  if len(strides) != nsp or len(dil) != nsp:
    return None
  ksize = rhs.shape[:nsp]
  cin, cout = rhs.shape[nsp], rhs.shape[nsp + 1]
  if lhs.shape[-1] != cin:
    return None
  eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, dil))
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:-1], eff, strides, padding)
  else:
    pads = [tuple(int(v) for v in p) for p in padding]
  if len(pads) != nsp or any(len(p) != 2 for p in pads):
    return None

  # zero padding (lax.pad also takes negative amounts, i.e. cropping, like the conv does)
  zero = jnp.zeros((), lhs.dtype)
  xp = lax.pad(lhs, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
  out_sp = tuple((p - e) // s + 1 for p, e, s in zip(xp.shape[1:-1], eff, strides))
  if any(o <= 0 for o in out_sp):
    return None
  w_shape = (math.prod(ksize) * cin, cout)

  def im2col_matmul(xp, rhs):
    n = xp.shape[0]
    # one strided slice of the padded input per kernel tap, (dy, dx, ...) row-major, then cin
    taps = []
    for idx in itertools.product(*(range(k) for k in ksize)):
      start = (0,) + tuple(i * d for i, d in zip(idx, dil)) + (0,)
      limit = (n,) + tuple(st + (o - 1) * s + 1 for st, o, s in zip(start[1:-1], out_sp, strides)) + (cin,)
      taps.append(lax.slice(xp, start, limit, (1,) + strides + (1,)))
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return lax.dot_general(
      patches,
      rhs.reshape(w_shape),
      (((nd - 1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=preferred,
    )

  # The patch matrix is kh*kw times the input: under jax.checkpoint the backward pass rebuilds it
  # from the (padded) input instead of keeping it alive from the forward pass (on an H200,
  # workload A's bgemm round asked for a 62.7 GiB buffer without this).
  if math.prod(ksize) > 1 and _recompute_patches():
    return jax.checkpoint(im2col_matmul)(xp, rhs)
  return im2col_matmul(xp, rhs)


def _wgrad_gemm_conv(xla_conv, gemm_conv):
  """f(lhs, rhs) = xla_conv(lhs, rhs) whose kernel gradient is gemm_conv's (patches^T x cotangent,
  the patch matrix built in the backward pass) and whose input gradient is xla_conv's."""

  @jax.custom_vjp
  def f(lhs, rhs):
    return xla_conv(lhs, rhs)

  def fwd(lhs, rhs):
    return xla_conv(lhs, rhs), (lhs, rhs)

  def bwd(res, ct):
    lhs, rhs = res
    # vjp also traces each primal; its result is unused, and XLA drops it as dead code
    d_lhs = jax.vjp(lambda l: xla_conv(l, rhs), lhs)[1](ct)[0]
    d_rhs = jax.vjp(lambda r: gemm_conv(lhs, r), rhs)[1](ct)[0]
    return d_lhs, d_rhs

  f.defvjp(fwd, bwd)
  return f


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """Drop-in for ``jax.lax.conv_general_dilated`` (the call ``nnx.Conv`` makes).

  Outside ``gemm_convs()``: exactly ``lax.conv_general_dilated``. Inside: channels-last convs
  (NHWC/HWIO as flax passes them, any number of spatial dims) with ``feature_group_count == 1``,
  ``batch_group_count == 1``, no input (lhs) dilation, equal lhs/rhs dtypes and no
  ``out_sharding`` are computed as im2col patches — one strided slice of the padded input per
  kernel tap, concatenated in (dy, dx, cin) order so they line up with
  ``rhs.reshape(kh*kw*cin, cout)`` (a 1x1 kernel is just the strided input) — times the reshaped
  kernel in one ``lax.dot_general``. Padding 'SAME' / 'VALID' / 'SAME_LOWER' or explicit (lo, hi)
  pairs (negative = cropping), window strides and kernel (rhs) dilation are supported;
  ``precision`` and ``preferred_element_type`` are passed to the matmul (so bf16 x bf16 -> bf16 as
  with the conv). Anything else falls back to
  ``lax.conv_general_dilated``.
  """
  mode = gemm_convs_mode()
  if mode is not None:

    def gemm(l, r):  # None where the GEMM formulation does not apply
      return _conv_gemm(
        l,
        r,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision,
        dict(kwargs),
      )

    def small_output():  # mode "matmul": at most MATMUL_MAX_POSITIONS output positions per image
      shape = jax.eval_shape(gemm, lhs, rhs)
      return shape is not None and math.prod(shape.shape[1:-1]) <= MATMUL_MAX_POSITIONS

    if mode == "gemm" or math.prod(rhs.shape[: lhs.ndim - 2]) == 1 or (mode == "matmul" and small_output()):
      out = gemm(lhs, rhs)
      if out is not None:
        return out
    elif mode == "wgrad" and jax.eval_shape(gemm, lhs, rhs) is not None:
      xla_conv = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
      )
      return _wgrad_gemm_conv(xla_conv, gemm)(lhs, rhs)
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
    **kwargs,
  )


def _tuple(x, n):
  if x is None:
    return (1,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def _pixel_shuffle_applies(module: nnx.ConvTranspose, x) -> bool:
  ks = module.kernel_size
  ks = (ks,) if isinstance(ks, int) else tuple(ks)
  return (
    len(ks) == 2
    and x.ndim >= 4
    and _tuple(module.strides, 2) == ks
    and _tuple(module.kernel_dilation, 2) == (1, 1)
    and module.mask is None
    and not module.transpose_kernel
    and canonicalize_padding(module.padding, 2) in ("SAME", "VALID")
  )


def conv_transpose(module: nnx.ConvTranspose, x):
  """``module(x)`` for an ``nnx.ConvTranspose`` (as UNet's 2x2 stride-2 upsampling).

  Inside ``gemm_convs()``, a 2-D transposed conv whose strides equal its kernel size (taps do not
  overlap; padding 'SAME' or 'VALID' give the same H*kh x W*kw output there), no kernel dilation,
  no mask and ``transpose_kernel=False`` is one einsum + reshape (pixel shuffle):
  ``y[n, kh*h + a, kw*w + b, o] = sum_c x[n, h, w, c] * kernel[kh-1-a, kw-1-b, c, o] + bias[o]``
  (lax.conv_transpose correlates the zero-dilated input with the unflipped kernel, so output
  sub-position ``a`` of a block meets kernel tap ``kh-1-a``). Otherwise (or outside the context)
  it runs ``nnx.ConvTranspose.__call__``.
  """
  if not (gemm_convs_active() and _pixel_shuffle_applies(module, x)):
    return nnx.ConvTranspose.__call__(module, x)
  kernel = module.kernel[...]
  bias = module.bias[...] if module.bias is not None else None
  x, kernel, bias = module.promote_dtype((x, kernel, bias), dtype=module.dtype)
  kh, kw, _, cout = kernel.shape
  y = jnp.einsum(
    "...hwc,abco->...hawbo",
    x,
    kernel[::-1, ::-1],
    precision=module.precision,
    preferred_element_type=module.preferred_element_type,
  )
  *batch, h, _, w, _, _ = y.shape
  y = y.reshape(*batch, h * kh, w * kw, cout)
  if module.use_bias:
    y = y + bias
  return y


class ConvTranspose(nnx.ConvTranspose):
  """``nnx.ConvTranspose`` (same constructor, parameters and init) whose call goes through
  ``conv_transpose``: einsum + pixel shuffle under ``gemm_convs()``, flax's own call otherwise."""

  def __call__(self, inputs):
    return conv_transpose(self, inputs)


# ``nnx.Conv`` whose convolution is ``conv_general_dilated`` above: the same module class,
# parameters and init as a plain ``nnx.Conv``; only the call switches under ``gemm_convs()``.
Conv = functools.partial(nnx.Conv, conv_general_dilated=conv_general_dilated)
