"""fedkd.models under the shapes and settings a user tries: every conv lowering (engine.conv_lowering) against
lax.conv_general_dilated for strided / padded / grouped / 1x1 / transposed convs, odd sizes, batch 1, f32 and
bf16; UNet / TransUNet inputs they cannot take (a clear ValueError, not a concatenate error or silently
resized logits); accepted non-power-of-two sizes training with input-sized masks; remat; encoder transfer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from fedkd.models import conv, init_params, make_predictor, remat
from fedkd.models.transfer import load_encoder

NHWC = ("NHWC", "HWIO", "NHWC")
MODES = ("gemm", "wgrad", "matmul")  # engine.conv_lowering other than xla (= lax itself)


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _run0(fn, *args):
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _rel(a, b):
  """max |a - b| over max |b| (b the f32 reference)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# (name, input shape, kernel shape, strides, padding, kernel dilation, feature groups)
CONVS = [
  ("3x3 stride 2 SAME, odd sizes", (2, 9, 7, 3), (3, 3, 3, 5), (2, 2), "SAME", (1, 1), 1),
  ("3x3 stride 2 VALID, batch 1", (1, 9, 7, 3), (3, 3, 3, 5), (2, 2), "VALID", (1, 1), 1),
  ("explicit asymmetric padding", (2, 6, 5, 4), (3, 3, 4, 3), (1, 1), ((2, 0), (1, 1)), (1, 1), 1),
  ("grouped (falls back to lax)", (2, 8, 8, 4), (3, 3, 2, 6), (1, 1), "SAME", (1, 1), 2),
  ("1x1", (1, 5, 5, 4), (1, 1, 4, 3), (1, 1), "SAME", (1, 1), 1),
  ("1x1 stride 2, odd", (2, 5, 5, 4), (1, 1, 4, 3), (2, 2), "SAME", (1, 1), 1),
  ("3-channel output head, batch 1", (1, 11, 13, 8), (3, 3, 8, 3), (1, 1), "SAME", (1, 1), 1),
  ("kernel dilation 2", (2, 9, 9, 2), (3, 3, 2, 3), (1, 1), "SAME", (2, 2), 1),
  ("5x5 stride 3", (1, 10, 10, 2), (5, 5, 2, 3), (3, 3), "SAME", (1, 1), 1),
  ("4x4 output (matmul-mode GEMM)", (2, 4, 4, 4), (3, 3, 4, 4), (1, 1), "SAME", (1, 1), 1),
  ("1x1 image, 3x3 kernel", (1, 1, 1, 4), (3, 3, 4, 2), (1, 1), "SAME", (1, 1), 1),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conv_lowerings_match_lax_values_and_gradients(dtype):
  """Every lowering's values and input / kernel gradients against lax.conv_general_dilated at HIGHEST
  precision on the same (dtype-rounded) operands. Measured: f32 <= 3.2e-7, bf16 <= 8.6e-3 of max |ref|."""
  dt = jnp.dtype(dtype)
  tol = 2e-6 if dt == jnp.float32 else 2.5e-2
  args = [(_randn(i, xs).astype(dt), _randn(50 + i, ws).astype(dt)) for i, (_, xs, ws, *_) in enumerate(CONVS)]

  def program(args):
    out = []
    for (x, w), (_, _, _, st, pad, dil, g) in zip(args, CONVS):
      kw = dict(rhs_dilation=dil, feature_group_count=g)
      x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
      ref, vjp_ref = jax.vjp(
        lambda x, w: lax.conv_general_dilated(
          x, w, st, pad, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST, **kw
        ),
        x32,
        w32,
      )
      ct = jnp.cos(jnp.arange(ref.size, dtype=jnp.float32)).reshape(ref.shape)
      per_mode = []
      for mode in MODES:

        def f(x, w, mode=mode):
          with conv.gemm_convs(mode=mode):  # (what flax's nnx.Conv passes: ConvDimensionNumbers)
            return conv.conv_general_dilated(
              x, w, st, pad, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC), **kw
            )

        y, vjp = jax.vjp(f, x, w)
        per_mode.append((y, *vjp(ct.astype(y.dtype))))
      out.append(((ref, *vjp_ref(ct)), per_mode))
    return out

  for (name, *_), (want, per_mode) in zip(CONVS, _run0(program, args)):
    for mode, got in zip(MODES, per_mode):
      assert all(g.dtype == dt for g in got), (name, mode)
      for what, g, r in zip(("values", "input grad", "kernel grad"), got, want):
        assert _rel(g, r) <= tol, (name, mode, what, _rel(g, r))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transposed_conv_lowerings_match_lhs_dilated_conv(dtype):
  """UNet's stride == kernel transposed conv (conv.ConvTranspose) in every lowering, odd input sizes, batch
  1, 3 output channels, a non-square kernel: values and gradients (input, kernel, bias) against its
  definition, a conv of the input dilated by the strides, padded kernel - 1 on both sides."""
  dt = jnp.dtype(dtype)
  tol = 2e-6 if dt == jnp.float32 else 2.5e-2
  cases = [((1, 5, 3, 4), (2, 2)), ((2, 3, 7, 4), (3, 2))]
  mods = [
    nnx.split(conv.ConvTranspose(4, 3, k, strides=k, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)), nnx.Param)
    for _, k in cases
  ]
  params = [jax.tree.map(lambda a, i=i: (_randn(i, a.shape) + 0.5).astype(dt), p) for i, (_, p) in enumerate(mods)]
  xs = [_randn(10 + i, s).astype(dt) for i, (s, _) in enumerate(cases)]

  def program(params, xs):
    out = []
    for (graphdef, _), p, x, (_, k) in zip(mods, params, xs, cases):

      def ref(p, x, k=k):
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        y = lax.conv_general_dilated(
          x.astype(jnp.float32),
          p32["kernel"][...],
          (1, 1),
          [(k[0] - 1, k[0] - 1), (k[1] - 1, k[1] - 1)],
          lhs_dilation=k,
          dimension_numbers=NHWC,
          precision=lax.Precision.HIGHEST,
        )
        return y + p32["bias"][...]

      y_ref, vjp_ref = jax.vjp(ref, p, x)
      ct = jnp.sin(jnp.arange(y_ref.size, dtype=jnp.float32)).reshape(y_ref.shape)
      per_mode = []
      for mode in MODES:

        def f(p, x, graphdef=graphdef, mode=mode):
          with conv.gemm_convs(mode=mode):
            return nnx.merge(graphdef, p)(x)

        y, vjp = jax.vjp(f, p, x)
        per_mode.append((y, vjp(ct.astype(y.dtype))))
      out.append(((y_ref, vjp_ref(ct)), per_mode))
    return out

  for case, ((y_ref, g_ref), per_mode) in zip(cases, _run0(program, params, xs)):
    for mode, (y, g) in zip(MODES, per_mode):
      assert y.dtype == dt and y.shape == y_ref.shape, (case, mode)
      assert _rel(y, y_ref) <= tol, (case, mode, "values")
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel(a, b) <= tol, (case, mode, "grad", _rel(a, b))


def _unet(width=8, depth=3, groups=4, num_classes=3):
  return ml_collections.ConfigDict(dict(name="unet", num_classes=num_classes, width=width, depth=depth, groups=groups))


def _transunet(**kw):
  from test_conv import TRANSUNET

  return ml_collections.ConfigDict(TRANSUNET | dict(num_layers=1, mlp_dim=16, skips=False) | kw)


@pytest.mark.parametrize("shape", [(1, 4, 4, 1), (2, 33, 33, 1), (1, 100, 100, 1), (1, 48, 36, 1)])
def test_unet_rejects_sizes_it_cannot_downsample(shape):
  """A depth-3 UNet on sides not divisible by 8: one ValueError naming the rule. (Was: a concatenate
  TypeError from inside the decoder, or for 4 x 4 silently logits whose bottleneck was an empty
  1/8-resolution map.)"""
  apply, params = init_params(_unet(), 0)
  with pytest.raises(ValueError, match=r"divisible by 2\*\*depth=8, got shape"):
    jax.eval_shape(apply, params, jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("hw", [(31, 31), (29, 30), (36, 36), (32, 40)])
def test_transunet_rejects_inputs_of_another_size(hw):
  """A TransUNet built for image_size 32 (patch 4) given another size: one ValueError naming image_size.
  (Was: 29..31 px inputs give the same 8 x 8 token grid and silently came back as 32 x 32 logits.)"""
  for skips in (False, True):
    apply, params = init_params(_transunet(skips=skips), 0)
    with pytest.raises(ValueError, match=r"built for image_size=32 takes \[batch, 32, 32, channels\]"):
      jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1, *hw, 1), jnp.float32))


ACCEPTED = [  # (config, image side, conv lowering, compute dtype): sizes a user picks that the models take
  (_unet(width=4, depth=3, groups=2), 40, "matmul", "float32"),
  (_unet(width=6, depth=1, groups=3, num_classes=4), 34, "gemm", "bfloat16"),
  (
    _transunet(patch_size=2, image_size=20, hidden=24, num_heads=3, stem_width=3, decoder_width=4),
    20,
    "wgrad",
    "float32",
  ),
]


@pytest.mark.parametrize("cfg,size,lowering,dtype", ACCEPTED, ids=["unet40", "unet34-bf16", "transunet20"])
def test_accepted_sizes_train_with_input_sized_masks(cfg, size, lowering, dtype):
  """Five Adam steps on two images in the given lowering and compute dtype (params cast as the engine
  does): finite losses that go down, and label maps of the input size from make_predictor."""
  apply, params = init_params(cfg, 0)
  yy, xx = np.mgrid[:size, :size]
  labels = np.stack([(xx > size // 3).astype(np.int32), (np.abs(yy - xx) < 3).astype(np.int32) * 2])
  images = jnp.asarray(
    (labels > 0).astype(np.float32)[..., None] + 0.1 * np.asarray(_randn(0, labels.shape))[..., None]
  )
  tx = optax.adam(1e-2)
  dt = jnp.dtype(dtype)

  def loss_fn(p):
    q = jax.tree.map(lambda a: a.astype(dt), p)
    with conv.gemm_convs(mode=lowering):
      logits = apply(q, images.astype(dt)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

  def train(p):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, _), losses = lax.scan(step, (p, tx.init(p)), length=5)
    return p, losses

  params, losses = _run0(train, params)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  masks = make_predictor(apply, 1)(params, images)
  assert masks.shape == (2, size, size) and set(np.unique(masks)) <= set(range(cfg.num_classes))


@pytest.mark.parametrize("name", ["unet", "transunet"])
def test_remat_gives_the_same_gradients_in_every_lowering(name):
  """engine.remat: gradients with remat_blocks equal those without, in each lowering (CPU: bitwise so far;
  asserted to 1e-6 of the largest gradient), on an 8 px one-level UNet (its encoder, bottleneck and decoder
  blocks; the 4 x 4 bottleneck is small enough for matmul mode's GEMM, the 8 x 8 level is not) / a 24 px
  TransUNet with 3 heads."""
  if name == "unet":
    cfg, size = _unet(width=4, depth=1, groups=2), 8
  else:
    cfg, size = _transunet(image_size=24, hidden=24, num_heads=3, stem_width=3, decoder_width=8, skips=True), 24
  apply, params = init_params(cfg, 0)
  x, target = _randn(0, (1, size, size, 1)), _randn(1, (1, size, size, cfg.num_classes))

  def grads(p, x):
    out = {}
    for mode in (None, *MODES):
      for on in (False, True):
        with conv.gemm_convs(mode is not None, mode=mode or "gemm"), remat.remat_blocks(on):
          out[f"{mode}/{on}"] = jax.grad(lambda q: jnp.mean((apply(q, x) - target) ** 2))(p)
    return out

  out = _run0(grads, params, x)
  for mode in (None, *MODES):
    g, g_remat = jax.tree.leaves(out[f"{mode}/False"]), jax.tree.leaves(out[f"{mode}/True"])
    scale = max(float(np.abs(a).max()) for a in g)
    for a, b in zip(g_remat, g):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale, err_msg=str(mode))


def test_load_encoder_unet_width_mismatch_names_widths():
  """A UNet student of another width: the error names the UNet widths, not a ViT 'hidden ?' hint."""
  _, teacher = init_params(_unet(width=8, depth=2, groups=4), 0)
  _, student = init_params(_unet(width=16, depth=2, groups=4), 1)
  for group in ("enc", "mid"):
    with pytest.raises(ValueError, match=r"no encoder parameter.*same width and depth.*shape mismatches: \w+/") as e:
      load_encoder(student, teacher, prefix=(group,), require=())
    assert "hidden" not in str(e.value)


def test_bad_constructor_arguments_are_value_errors():
  """depth 0 / num_heads 0: a ValueError naming the argument (was: IndexError, ZeroDivisionError)."""
  with pytest.raises(ValueError, match="depth=0"):
    jax.eval_shape(lambda: init_params(_unet(depth=0), 0)[1])
  with pytest.raises(ValueError, match="num_heads=0"):
    jax.eval_shape(lambda: init_params(_transunet(num_heads=0), 0)[1])


def test_the_predictor_refuses_non_finite_outputs_and_counts_the_images():
  """argmax of NaN logits is class 0 (background), which scored a diverged model as Dice 0. Logits log(x): an
  image holding a 0 pixel has a -inf logit there; the predictor names how many images are affected, and labels
  finite outputs as numpy's argmax does."""
  from fedkd.errors import NonFiniteOutput

  def apply(p, x):
    return jnp.concatenate([x, jnp.log(x) * p, 1 - x], axis=-1)

  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 1.0, (5, 6, 6, 1)).astype(np.float32)
  predict = make_predictor(apply, batch_size=2)
  want = np.argmax(np.concatenate([images, np.log(images), 1 - images], -1), -1)
  np.testing.assert_array_equal(np.asarray(predict(1.0, images)), want)
  images[1, 2, 3, 0] = images[4, 0, 0, 0] = 0.0
  with pytest.raises(NonFiniteOutput, match=r"not finite \(NaN/Inf\) on 2 of 5 held-out images"):
    predict(1.0, images)
