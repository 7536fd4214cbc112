"""The UNet against an independent float64 numpy UNet (conv, GroupNorm, max pool, transposed-conv
upsampling, skip concatenation, 1x1 head): logits and bottleneck features in every conv lowering at
boundary sizes (depth 1, a 1 x 1 bottleneck, width 1, one GroupNorm channel per group, 1 / 2 / 4 / 5
classes, batch 1, non-square images); parameter gradients against float64 central differences with remat
on and off; bf16 compute against float64; the parameter count by hand; UNet encoder transfer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedkd.models import conv, init_model, init_params, remat
from fedkd.models.transfer import load_encoder
from test_transunet_usage import _np_groupnorm

LOWERINGS = (None, "gemm", "wgrad", "matmul")  # engine.conv_lowering: None = plain XLA convs


def _cfg(width, depth, groups, num_classes):
  return ml_collections.ConfigDict(dict(name="unet", width=width, depth=depth, groups=groups, num_classes=num_classes))


def _lowering(mode):
  return conv.gemm_convs(mode is not None, mode=mode or "gemm")


def _every_lowering(apply):
  """A program returning ``apply(p, x)`` traced under each of :data:`LOWERINGS`."""

  def program(p, x):
    out = []
    for mode in LOWERINGS:
      with _lowering(mode):
        out.append(apply(p, x))
    return out

  return program


def _run0(fn, *args):
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


# --- an independent float64 numpy UNet ---------------------------------------------------------------


def _np_conv3x3(x, p):
  """3x3 cross-correlation, zero padding 1, stride 1, + bias; x [B, H, W, C], kernel HWIO."""
  k, b = p["kernel"], p["bias"]
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum("bhwc,co->bhwo", xp[:, dy : dy + h, dx : dx + w], k[dy, dx]) for dy in range(3) for dx in range(3))
  return y + b


def _np_maxpool(x):
  return np.maximum(np.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]), np.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _np_upsample(x, p):
  """2x2 stride-2 transposed conv (flax's, kernel not flipped): the input zero-dilated to 2H-1, padded by 1
  on each side and correlated with the 2x2 kernel, so output row 2h + a meets kernel row 1 - a."""
  n, h, w, _ = x.shape
  y = np.zeros((n, 2 * h, 2 * w, p["kernel"].shape[-1]))
  for a in range(2):
    for b in range(2):
      y[:, a::2, b::2] = np.einsum("bhwc,co->bhwo", x, p["kernel"][1 - a, 1 - b])
  return y + p["bias"]


def _np_block(p, x, groups):
  g = min(groups, p["conv1"]["kernel"].shape[-1])
  x = np.maximum(_np_groupnorm(_np_conv3x3(x, p["conv1"]), p["norm1"], g), 0)
  return np.maximum(_np_groupnorm(_np_conv3x3(x, p["conv2"]), p["norm2"], g), 0)


def _np_unet(p, x, depth, groups):
  """(logits, bottleneck output) of the UNet described in fedkd.models.unet.UNet's docstring."""
  skips = []
  for i in range(depth):
    x = _np_block(p["enc"][i], x, groups)
    skips.append(x)
    x = _np_maxpool(x)
  x = feats = _np_block(p["mid"], x, groups)
  for i in range(depth):
    x = _np_block(p["dec"][i], np.concatenate([_np_upsample(x, p["up"][i]), skips[depth - 1 - i]], -1), groups)
  return np.einsum("bhwc,co->bhwo", x, p["head"]["kernel"][0, 0]) + p["head"]["bias"], feats


def _perturbed(params, seed, scale=0.3):
  """float64 params moved off their init (GroupNorm scales != 1, biases != 0), and their f32 copy."""
  rng = np.random.default_rng(seed)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64) + scale * rng.standard_normal(a.shape), params)
  return p64, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / np.abs(b).max())


# (width, depth, groups, num_classes, (batch, H, W))
FORWARD_CASES = {
  "depth1-width1-1class-2x2": (1, 1, 1, 1, (1, 2, 2)),
  "depth2-8x12-batch2": (4, 2, 2, 3, (2, 8, 12)),
  "one-channel-per-group": (4, 2, 4, 2, (1, 4, 8)),
  "depth4-1x1-bottleneck-4class": (2, 4, 2, 4, (1, 16, 16)),
  "width3-depth3-5class": (3, 3, 3, 5, (2, 8, 16)),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_unet_forward_matches_float64_numpy(name):
  """Logits and bottleneck features of random (off-init) params in every conv lowering against the numpy
  UNet in float64. Measured: <= 7.3e-7 of max |ref| (f32 against float64)."""
  width, depth, groups, nc, (b, h, w) = FORWARD_CASES[name]
  _, apply_wf, params = init_model(_cfg(width, depth, groups, nc), 0)
  p64, p32 = _perturbed(params, 1)
  x = np.random.default_rng(2).standard_normal((b, h, w, 1))
  want_y, want_f = _np_unet(p64, x, depth, groups)
  assert want_y.shape == (b, h, w, nc) and want_f.shape == (b, h >> depth, w >> depth, width * 2**depth)

  for mode, (y, f) in zip(LOWERINGS, _run0(_every_lowering(apply_wf), p32, jnp.asarray(x, jnp.float32))):
    assert _rel(y, want_y) < 1e-5, (mode, _rel(y, want_y))
    assert _rel(f, want_f) < 1e-5, (mode, _rel(f, want_f))


def test_unet_gradients_match_float64_central_differences():
  """For each parameter group (enc, mid, up, dec, head), the directional derivative of a squared error
  along a random direction in that group: jax.grad (f32, every lowering, remat on and off) against a
  float64 central difference of the numpy UNet (step 1e-6; the ReLU / max-pool kinks make 1e-5 off by
  1%). A one-level UNet (every group; the 2 x 6 bottleneck is small enough for matmul mode's GEMM, the
  4 x 12 level is not): one program of 8 gradients, half the compile of depth 2. Measured: <= 2e-6 relative."""
  depth, groups = 1, 2
  apply, params = init_params(_cfg(4, depth, groups, 3), 0)
  p64, p32 = _perturbed(params, 3)
  rng = np.random.default_rng(4)
  x, target = rng.standard_normal((2, 4, 12, 1)), rng.standard_normal((2, 4, 12, 3))

  def np_loss(p):
    return np.mean((_np_unet(p, x, depth, groups)[0] - target) ** 2)

  def grads(p, x):
    out = []
    for mode in LOWERINGS:
      for on in (False, True):
        with _lowering(mode), remat.remat_blocks(on):
          out.append(jax.grad(lambda q: jnp.mean((apply(q, x) - target) ** 2))(p))
    return out

  got = _run0(grads, p32, jnp.asarray(x, jnp.float32))
  eps = 1e-6
  for group in ("enc", "mid", "up", "dec", "head"):
    v = {
      k: jax.tree.map(lambda a: rng.standard_normal(a.shape) if k == group else np.zeros(a.shape), sub)
      for k, sub in p64.items()
    }
    step = lambda s: jax.tree.map(lambda a, d: a + s * d, p64, v)  # noqa: E731
    fd = (np_loss(step(eps)) - np_loss(step(-eps))) / (2 * eps)
    assert abs(fd) > 1e-3, (group, fd)  # the direction moves the loss
    for i, g in enumerate(got):
      dd = sum(float(np.sum(np.asarray(a, np.float64) * d)) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
      assert abs(dd - fd) <= 1e-4 * abs(fd), (group, LOWERINGS[i // 2], "remat" if i % 2 else "", dd, fd)


def test_unet_bf16_compute_stays_close_to_float64():
  """bf16 params and images (as engine.compute_dtype=bfloat16 casts them) on a width-16, depth-3 64 px UNet
  and a width-1, depth-5 32 px one (1 x 1 bottleneck): finite logits within 5% of max |float64 ref| and
  the same argmax on >= 98% of pixels in every lowering. Measured: 1.3e-2 .. 2.0e-2, >= 99.5%."""
  for width, depth, groups, size in ((16, 3, 8, 64), (1, 5, 1, 32)):
    apply, params = init_params(_cfg(width, depth, groups, 3), 0)
    x = np.random.default_rng(5).uniform(size=(2, size, size, 1))
    want, _ = _np_unet(jax.tree.map(lambda a: np.asarray(a, np.float64), params), x, depth, groups)
    pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)

    for mode, y in zip(LOWERINGS, _run0(_every_lowering(apply), pb, jnp.asarray(x, jnp.bfloat16))):
      y = np.asarray(y.astype(jnp.float32))
      assert y.dtype == np.float32 and np.all(np.isfinite(y)), mode
      assert _rel(y, want) < 5e-2, (width, mode, _rel(y, want))
      assert np.mean(y.argmax(-1) == want.argmax(-1)) >= 0.98, (width, mode)


@pytest.mark.parametrize("width,depth,groups,nc", [(16, 3, 8, 3), (8, 2, 4, 4), (1, 1, 1, 1), (3, 5, 1, 2)])
def test_unet_parameter_count_by_hand(width, depth, groups, nc):
  """Every leaf's shape and the total against a hand count: a conv block cin -> c has two 3x3 convs
  (9 cin c + c, 9 c c + c) and two GroupNorms (2c each); the up conv cin -> c has 4 cin c + c; the head
  width x nc + nc. (Quickstart's width 8 / depth 3 / 3 classes: 121,403.)"""
  params = jax.eval_shape(lambda: init_params(_cfg(width, depth, groups, nc), 0)[1])

  def block(cin, c):
    return {
      "conv1": {"kernel": (3, 3, cin, c), "bias": (c,)},
      "norm1": {"scale": (c,), "bias": (c,)},
      "conv2": {"kernel": (3, 3, c, c), "bias": (c,)},
      "norm2": {"scale": (c,), "bias": (c,)},
    }

  chans = [width * 2**i for i in range(depth)]
  want = {"enc": {}, "up": {}, "dec": {}}
  cin = 1
  for i, c in enumerate(chans):
    want["enc"][i], cin = block(cin, c), c
  want["mid"] = block(cin, 2 * cin)
  cin = 2 * cin
  for i, c in enumerate(reversed(chans)):
    want["up"][i] = {"kernel": (2, 2, cin, c), "bias": (c,)}
    want["dec"][i], cin = block(2 * c, c), c
  want["head"] = {"kernel": (1, 1, width, nc), "bias": (nc,)}
  got = jax.tree.map(lambda a: a.shape, params)
  assert got == want
  total = sum(int(np.prod(s)) for s in jax.tree.leaves(want, is_leaf=lambda t: isinstance(t, tuple)))
  by_hand = sum(9 * ci * c + c + 9 * c * c + c + 4 * c for ci, c in zip([1] + chans[:-1], chans))  # encoder
  m = 2 * chans[-1]
  by_hand += 9 * chans[-1] * m + m + 9 * m * m + m + 4 * m
  by_hand += sum(4 * 2 * c * c + c + 9 * 2 * c * c + c + 9 * c * c + c + 4 * c for c in chans)
  by_hand += width * nc + nc
  assert total == by_hand == sum(a.size for a in jax.tree.leaves(params))
  if (width, depth, nc) == (8, 3, 3):
    assert total == 121_403


def test_unet_encoder_transfer_copies_enc_and_mid_only():
  """A UNet foundation's encoder (enc + mid) into a student of the same width and depth, group by group as
  FedEFM does: those leaves are the foundation's values, up / dec / head stay the student's own arrays;
  a student of another depth takes the shared encoder levels and refuses the bottleneck."""
  _, teacher = init_params(_cfg(8, 2, 4, 4), 0)
  _, student = init_params(_cfg(8, 2, 4, 3), 1)
  new = student
  for group in ("enc", "mid"):
    new, report = load_encoder(new, teacher, prefix=(group,), require=())
    assert not report["skipped_shape"] and not report["missing_in_foundation"] and report["loaded"]
  for group in ("enc", "mid"):
    for a, b in zip(jax.tree.leaves(new[group]), jax.tree.leaves(teacher[group])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for group in ("up", "dec", "head"):
    assert all(a is b for a, b in zip(jax.tree.leaves(new[group]), jax.tree.leaves(student[group])))
  assert not np.array_equal(
    np.asarray(student["enc"][0]["conv1"]["kernel"]), np.asarray(teacher["enc"][0]["conv1"]["kernel"])
  )

  _, shallow = init_params(_cfg(8, 1, 4, 3), 2)
  new, report = load_encoder(shallow, teacher, prefix=("enc",), require=())
  assert [p[:2] for p in report["loaded"]] == [("enc", 0)] * 8
  assert {p[:2] for p in report["unused_in_foundation"]} == {("enc", 1)}
  with pytest.raises(ValueError, match=r"no encoder parameter of the foundation matches.*same width and depth"):
    load_encoder(shallow, teacher, prefix=("mid",), require=())


def test_a_unet_student_with_other_groupnorm_groups_than_its_teacher_is_refused():
  """The UNet encoder's parameters have the same shapes whatever config.*.groups, so the foundation loaded
  into a student with other groups: GroupNorm then normalised over other channels (the student's bottleneck
  features 0.77 relative L2 from the foundation's at groups 4 vs 2, width 8, depth 2)."""
  from fedkd import config as fc

  c = fc.fedefm_base_config()
  c.image_size = 32
  for m in (c.teacher, c.student):
    m.name, m.width, m.depth, m.groups = "unet", 8, 2, 4
  fc.validate_fedefm(c, 1)
  c.student.groups = 2
  with pytest.raises(fc.ConfigError, match=r"config\.student\.groups=2 must equal config\.teacher\.groups=4"):
    fc.validate_fedefm(c, 1)
