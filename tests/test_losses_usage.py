"""Segmentation and distillation losses at the inputs users hit: ignored labels (255, -1, K), empty and
one-pixel foregrounds, 1x1 / 2x2 images, extreme, equal and bf16 logits, temperatures from 1e-3 to 1e6,
zero and cancelling expert weights. Values are checked against float64 numpy / scipy references written
here, gradients against central finite differences of those references."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from fedkd import losses as L
from fedkd.distill import losses as D

CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)[None, :, :, None]  # [B, H, W, C] footprint
SQUARE = np.ones((1, 3, 3, 1), bool)


# ------------------------------------------------------------------ float64 references
def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _softmax(z):
  return np.exp(_log_softmax(z))


def _terms(logits, labels):
  """(valid [B,H,W], probs, fg probs on valid pixels, fg one-hot) in float64."""
  k = logits.shape[-1]
  valid = (labels >= 0) & (labels < k)
  p = _softmax(logits)
  g = np.zeros(labels.shape + (k,))
  for c in range(k):
    g[..., c] = labels == c
  return valid, p, p[..., 1:] * valid[..., None], g[..., 1:]


def ref_ce(logits, labels):
  valid = (labels >= 0) & (labels < logits.shape[-1])
  if not valid.any():
    return 0.0
  logp = np.take_along_axis(_log_softmax(logits), np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return float(-(logp * valid).sum() / valid.sum())


def ref_dice(logits, labels, eps=1.0):
  _, _, p, g = _terms(logits, labels)
  d = (2 * (p * g).sum((1, 2)) + eps) / (p.sum((1, 2)) + g.sum((1, 2)) + eps)
  return float(1 - d.mean())


def ref_tversky(logits, labels, a=0.7, b=0.3, gamma=4 / 3, eps=1.0):
  _, _, p, g = _terms(logits, labels)
  tp, fn, fp = (p * g).sum((1, 2)), ((1 - p) * g).sum((1, 2)), (p * (1 - g)).sum((1, 2))
  ti = (tp + eps) / (tp + a * fn + b * fp + eps)
  return float(np.mean(np.maximum(1 - ti, 1e-6) ** (1 / gamma)))


def _erode(x):  # min over the 4-neighbour cross; outside the image never wins
  return ndimage.minimum_filter(x, footprint=CROSS, mode="constant", cval=np.inf)


def _dilate(x):
  return ndimage.maximum_filter(x, footprint=SQUARE, mode="constant", cval=-np.inf)


def ref_skeleton(x, iters):
  relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
  skel = relu(x - _dilate(_erode(x)))
  for _ in range(iters):
    x = _erode(x)
    delta = relu(x - _dilate(_erode(x)))
    skel = skel + relu(delta - skel * delta)
  return skel


def ref_cldice(logits, labels, iters=3, eps=1.0):
  _, _, p, g = _terms(logits, labels)
  sp, sg = ref_skeleton(p, iters), ref_skeleton(g, iters)
  tprec = ((sp * g).sum((1, 2)) + eps) / (sp.sum((1, 2)) + eps)
  tsens = ((sg * p).sum((1, 2)) + eps) / (sg.sum((1, 2)) + eps)
  return float(1 - np.mean(2 * tprec * tsens / (tprec + tsens)))


REFS = {
  "dice_ce": lambda z, y: 0.5 * ref_ce(z, y) + 0.5 * ref_dice(z, y),
  "cldice": lambda z, y: 0.5 * ref_ce(z, y) + 0.5 * ref_dice(z, y) + 0.5 * ref_cldice(z, y, 3),
  "focal_tversky": lambda z, y: ref_tversky(z, y),
}


def _loss(name):
  return L.make_segmentation_loss(ml_collections.ConfigDict(dict(name=name)))


def _fd_grad(f, z, h=1e-5):
  z = np.asarray(z, np.float64)
  g = np.zeros_like(z)
  for i in np.ndindex(z.shape):
    zp, zm = z.copy(), z.copy()
    zp[i] += h
    zm[i] -= h
    g[i] = (f(zp) - f(zm)) / (2 * h)
  return g


@functools.cache
def _value_and_grad(name):
  """The loss's jitted value and gradient (as training calls it): one compiled program per input shape,
  where op-by-op execution compiled every operation for every shape (~500 small programs)."""
  return jax.jit(jax.value_and_grad(_loss(name)))


def _check(name, logits, labels, fd=True, rtol=2e-5):
  """Value against the float64 reference; gradient finite, against finite differences (fd), and 0 at
  ignored pixels."""
  val, grad = _value_and_grad(name)(jnp.asarray(logits), jnp.asarray(labels))
  ref = REFS[name](np.asarray(logits, np.float64), labels)
  assert float(val) == pytest.approx(ref, rel=rtol, abs=1e-6), (name, float(val), ref)
  grad = np.asarray(grad, np.float64)
  assert np.all(np.isfinite(grad))
  k = logits.shape[-1]
  ignored = (labels < 0) | (labels >= k)
  assert np.all(grad[ignored] == 0.0)
  if fd:
    want = _fd_grad(lambda z: REFS[name](z, labels), logits)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5 * max(1.0, np.abs(want).max()))


# ------------------------------------------------------------------ segmentation losses
@pytest.mark.parametrize("name", L.LOSSES)
@pytest.mark.parametrize("bad", [255, -1, "k"])
def test_out_of_range_labels_are_ignored_by_every_term(name, bad):
  """A mask with 255 ('ignore' in many datasets), -1, or K in a K-class model: those pixels are left out of
  every term (the reference drops them), the loss and its gradient are finite, the gradient there is 0."""
  rng = np.random.default_rng(0)
  k = 3
  logits = rng.normal(size=(2, 4, 5, k)).astype(np.float32) * 2
  labels = rng.integers(0, k, (2, 4, 5))
  labels[0, 1:3, 1:4] = k if bad == "k" else bad
  labels[1, 0, :] = k if bad == "k" else bad
  _check(name, logits, labels, fd=name != "cldice")
  # the labelled pixels alone: the same cross-entropy as a batch of just those pixels
  if name == "dice_ce":
    valid = labels != labels[0, 1, 1]
    got = float(L.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    want = float(L.cross_entropy(jnp.asarray(logits[valid][None, None]), jnp.asarray(labels[valid][None, None])))
    assert got == pytest.approx(want, rel=1e-6)


def test_a_batch_with_no_labelled_pixel():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 3, 3)), jnp.float32)
  labels = np.full((1, 3, 3), 255)
  assert float(L.cross_entropy(logits, labels)) == 0.0
  for name in L.LOSSES:
    val, grad = jax.value_and_grad(_loss(name))(logits, labels)
    assert np.isfinite(float(val)) and np.all(np.asarray(grad) == 0.0)
    assert float(val) == pytest.approx(REFS[name](np.asarray(logits, np.float64), labels), abs=1e-6)


def _edge_cases():
  rng = np.random.default_rng(2)
  cases = []
  for k in (3, 4):
    z = rng.normal(size=(2, 5, 5, k)).astype(np.float32) * 2
    cases.append((f"all_background_k{k}", z, np.zeros((2, 5, 5), np.int64)))
    one = np.zeros((2, 5, 5), np.int64)
    one[0, 2, 3] = 1
    cases.append((f"one_fg_pixel_k{k}", z, one))
    absent = rng.integers(0, 2, (2, 5, 5))  # classes >= 2 are absent
    cases.append((f"class_absent_k{k}", z, absent))
  for h, w in ((1, 1), (2, 2), (1, 4)):
    cases.append((f"image_{h}x{w}", rng.normal(size=(1, h, w, 3)).astype(np.float32), rng.integers(0, 3, (1, h, w))))
  cases.append(("full_foreground_2x2", rng.normal(size=(1, 2, 2, 3)).astype(np.float32), np.ones((1, 2, 2), np.int64)))
  cases.append(("equal_logits", np.zeros((1, 4, 4, 3), np.float32), rng.integers(0, 3, (1, 4, 4))))
  return cases


@pytest.mark.parametrize("name", L.LOSSES)
@pytest.mark.parametrize("case", _edge_cases(), ids=lambda c: c[0])
def test_edge_inputs_match_float64_reference_with_finite_difference_gradients(name, case):
  _, logits, labels = case
  # clDice's soft skeleton is piecewise linear with kinks where relu / max / min tie (a 1x1 image, equal
  # logits); its gradient there is one of the one-sided ones, so finite differences only off the ties
  fd = name != "cldice"
  _check(name, logits, labels, fd=fd)


@pytest.mark.parametrize("name", L.LOSSES)
def test_extreme_and_bf16_logits(name):
  """Logits of +-1e4 (a saturated, partly wrong prediction) are exact and finite; bf16 logits compute in
  float32 from their bf16 values."""
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, (2, 4, 4))
  pred = np.where(rng.random((2, 4, 4)) < 0.3, (labels + 1) % 3, labels)
  for scale in (1e4, -1e4):
    logits = (scale * np.eye(3)[pred]).astype(np.float32)
    _check(name, logits, labels, fd=False, rtol=1e-6)
  if name == "dice_ce":  # each wrong pixel costs 1e4 nats of cross-entropy
    logits = (1e4 * np.eye(3)[pred]).astype(np.float32)
    assert float(L.cross_entropy(jnp.asarray(logits), labels)) == pytest.approx(1e4 * np.mean(pred != labels), 1e-6)
  z16 = jnp.asarray(rng.normal(size=(2, 4, 4, 3)) * 3, jnp.bfloat16)
  val, grad = jax.value_and_grad(_loss(name))(z16, labels)
  assert val.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  assert float(val) == pytest.approx(REFS[name](np.asarray(z16, np.float64), labels), rel=2e-5)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_cldice_gradient_against_finite_differences_off_ties():
  """Random logits on a thin-structure mask: no two neighbours tie, so the soft skeleton is differentiable
  there and the gradient of the cldice loss matches finite differences of the float64 reference."""
  rng = np.random.default_rng(4)
  labels = np.zeros((1, 7, 7), np.int64)
  labels[0, 3, 1:6] = 1
  labels[0, 1:3, 5] = 2
  logits = (rng.normal(size=(1, 7, 7, 3)) + 3 * np.eye(3)[labels]).astype(np.float32)
  _check("cldice", logits, labels, fd=True)


def test_soft_skeleton_matches_scipy_morphology():
  rng = np.random.default_rng(5)
  for shape in ((2, 1, 1, 2), (1, 2, 2, 1), (1, 3, 7, 2), (2, 9, 8, 3)):
    x = rng.random(shape).astype(np.float32)
    for iters in (0, 1, 4):
      got = np.asarray(L.soft_skeleton(jnp.asarray(x), iters))
      np.testing.assert_allclose(got, ref_skeleton(x.astype(np.float64), iters), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ distillation losses
def ref_kd(student, teacher, T):
  """T^2 * mean over pixels of KL(softmax(teacher / T) || softmax(student / T)), float64."""
  log_pt = _log_softmax(np.asarray(teacher, np.float64) / T)
  log_ps = _log_softmax(np.asarray(student, np.float64) / T)
  return float(T * T * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)))


def ref_kd_large_t(student, teacher):
  """The T -> infinity limit of T^2 KL: half the variance over the K classes of (s - t), i.e. the squared
  centred logit difference averaged over classes, halved (Hinton et al. 2015, Sec. 2.1)."""
  d = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
  d = d - d.mean(-1, keepdims=True)
  return float(np.mean(0.5 * np.mean(d * d, -1)))


def _logit_pairs():
  rng = np.random.default_rng(6)
  t = (rng.normal(size=(2, 3, 4, 4)) * 3).astype(np.float32)
  far = (rng.normal(size=t.shape) * 3).astype(np.float32)
  near = (t + 1e-2 * rng.normal(size=t.shape)).astype(np.float32)  # a student close to its teacher
  return t, far, near


@pytest.mark.parametrize("T", [1e-3, 0.5, 2.0, 30.0, 1e3])
def test_kd_kl_values_and_gradients_against_float64(T):
  t, far, near = _logit_pairs()
  for s in (far, near):
    got = float(D.kd_kl(jnp.asarray(s), jnp.asarray(t), T))
    want = ref_kd(s, t, T)
    assert got == pytest.approx(want, rel=2e-5, abs=1e-12), (T, got, want)
    got_m = float(D.masked_kd_kl(jnp.asarray(s), jnp.asarray(t), T))
    assert got_m == pytest.approx(want, rel=2e-5, abs=1e-12)
  s = far[:1, :1, :2]  # 8 logits: the finite-difference gradient of the float64 reference
  grad = np.asarray(jax.grad(D.kd_kl)(jnp.asarray(s), jnp.asarray(t[:1, :1, :2]), T), np.float64)
  want = _fd_grad(lambda z: ref_kd(z, t[:1, :1, :2], T), s, h=1e-6 * max(T, 1.0))
  np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-6 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("T", [1e4, 1e6])
def test_kd_kl_at_a_huge_temperature_reaches_its_limit(T):
  """T^2 KL approaches its closed-form limit (the O(1/T) correction is < 1e-3 here); a difference of two
  float32 log-softmaxes errs by ~10 % at T = 1e4 and turns negative at T = 1e6."""
  t, far, near = _logit_pairs()
  for s in (far, near):
    want = ref_kd_large_t(s, t)
    assert float(D.kd_kl(jnp.asarray(s), jnp.asarray(t), T)) == pytest.approx(want, rel=2e-3)
    assert float(D.masked_kd_kl(jnp.asarray(s), jnp.asarray(t), T)) == pytest.approx(want, rel=2e-3)
    grad = np.asarray(jax.grad(D.kd_kl)(jnp.asarray(s), jnp.asarray(t), T), np.float64)
    d = s.astype(np.float64) - t
    limit = (d - d.mean(-1, keepdims=True)) / d.shape[-1] / np.prod(d.shape[:-1])  # d/ds of the limit
    np.testing.assert_allclose(grad, limit, rtol=2e-3, atol=2e-3 * np.abs(limit).max())


def test_kd_kl_close_student_keeps_relative_precision():
  """A student within 1e-2 of its teacher at T = 2: KL ~ 1e-5; the float64 reference to 1e-5 relative."""
  t, _, near = _logit_pairs()
  want = ref_kd(near, t, 2.0)
  assert 0 < want < 1e-3
  assert float(D.kd_kl(jnp.asarray(near), jnp.asarray(t), 2.0)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("T", [1e-6, 1.0, 1e6])
def test_kd_gradients_finite_at_extreme_logits(T):
  rng = np.random.default_rng(7)
  cases = [
    (1e4 * rng.normal(size=(2, 2, 3)), 1e4 * rng.normal(size=(2, 2, 3))),
    (np.zeros((2, 2, 3)), np.zeros((2, 2, 3))),  # all-equal logits
    (np.full((2, 2, 3), 5.0), rng.normal(size=(2, 2, 3))),
  ]
  for s, t in cases:
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
      val, (gs, gt) = jax.value_and_grad(lambda a, b: D.kd_kl(a, b, T, detach_teacher=False), argnums=(0, 1))(
        s.astype(dtype), t.astype(dtype)
      )
      assert np.isfinite(float(val)) and float(val) >= -1e-6 * max(1.0, T * T)
      assert np.all(np.isfinite(np.asarray(gs, np.float32))) and np.all(np.isfinite(np.asarray(gt, np.float32)))
      val, g = jax.value_and_grad(lambda a, b: D.masked_kd_kl(a, b, T, 0.5, True))(s.astype(dtype), t.astype(dtype))
      assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g, np.float32)))
  assert float(D.kd_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3)), T)) == 0.0


@pytest.mark.parametrize("T", [0.0, -1.0, float("inf"), float("nan")])
def test_kd_rejects_a_temperature_that_is_not_positive_and_finite(T):
  s = jnp.zeros((2, 3))
  for fn in (lambda: D.kd_kl(s, s, T), lambda: D.masked_kd_kl(s, s, T)):
    with pytest.raises(ValueError, match="temperature"):
      fn()


def test_multishot_with_zero_cancelling_and_no_experts():
  rng = np.random.default_rng(8)
  s = rng.normal(size=(1, 3, 3, 3)).astype(np.float32)
  e = rng.normal(size=(2, 1, 3, 3, 3)).astype(np.float32)
  seg, beta, T = 0.4, 0.5, 2.0
  loss, kd = D.multishot_distill_loss(jnp.asarray(s), jnp.asarray(e), jnp.zeros(2), seg, beta, T, return_kd=True)
  assert float(kd) == 0.0 and float(loss) == pytest.approx((1 - beta) * seg, rel=1e-7)
  # weights summing to 0 ('raw' EMD similarities can): the signed sum, as the formula says
  w = np.array([1.0, -1.0], np.float32)
  _, kd = D.multishot_distill_loss(jnp.asarray(s), jnp.asarray(e), jnp.asarray(w), seg, beta, T, return_kd=True)
  assert float(kd) == pytest.approx(ref_kd(s, e[0], T) - ref_kd(s, e[1], T), rel=1e-5, abs=1e-6)
  # the same expert twice with cancelling weights: exactly nothing
  same = np.stack([e[0], e[0]])
  _, kd = D.multishot_distill_loss(jnp.asarray(s), jnp.asarray(same), jnp.asarray(w), seg, beta, T, return_kd=True)
  assert abs(float(kd)) < 1e-6
  none = D.multishot_distill_loss(jnp.asarray(s), jnp.zeros((0,) + s.shape), jnp.zeros(0), seg, beta, T)
  assert float(none) == pytest.approx((1 - beta) * seg, rel=1e-7)
  # the KD direction: KL(expert || student) (fedefm.md), not KL(student || expert)
  got = float(D.multishot_distill_loss(jnp.asarray(s), jnp.asarray(e[:1]), jnp.ones(1), 0.0, 1.0, T))
  assert got == pytest.approx(ref_kd(s, e[0], T), rel=1e-5)
  assert got != pytest.approx(ref_kd(e[0], s, T), rel=1e-2)
