"""KD losses against closed-form numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.distill.losses import feature_kd, kd_kl, masked_kd_kl, multishot_distill_loss


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_kd(student, teacher, T):
  p_t = _np_softmax(np.asarray(teacher, np.float64) / T)
  p_s = _np_softmax(np.asarray(student, np.float64) / T)
  kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
  return T * T * kl.mean()


def test_kd_kl_closed_form():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 5, 6, 3)).astype(np.float32) * 3
  t = rng.normal(size=(2, 5, 6, 3)).astype(np.float32) * 3
  for T in (1.0, 2.0, 4.0):
    np.testing.assert_allclose(float(kd_kl(jnp.asarray(s), jnp.asarray(t), T)), _np_kd(s, t, T), rtol=1e-5, atol=1e-6)
  assert abs(float(kd_kl(jnp.asarray(s), jnp.asarray(s), 2.0))) < 1e-6
  # bf16 inputs are computed in float32
  assert kd_kl(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), 2.0).dtype == jnp.float32
  # gradient flows to the student only
  gs, gt = jax.grad(lambda a, b: kd_kl(a, b, 2.0), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert float(jnp.abs(gs).sum()) > 0 and float(jnp.abs(gt).sum()) == 0


def test_multishot_weighted_sum_and_beta():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  experts = rng.normal(size=(3, 2, 4, 4, 3)).astype(np.float32)
  w = np.array([0.5, 0.3, 0.2], np.float32)
  seg, beta, T = 0.7, 0.6, 3.0
  got = jax.jit(multishot_distill_loss)(jnp.asarray(s), jnp.asarray(experts), jnp.asarray(w), jnp.float32(seg), beta, T)
  want = beta * sum(w[j] * _np_kd(s, experts[j], T) for j in range(3)) + (1 - beta) * seg
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  loss, kd = multishot_distill_loss(jnp.asarray(s), jnp.asarray(experts), jnp.asarray(w), seg, beta, T, return_kd=True)
  np.testing.assert_allclose(float(kd), sum(w[j] * _np_kd(s, experts[j], T) for j in range(3)), rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  zero = multishot_distill_loss(jnp.asarray(s), jnp.asarray(experts), jnp.asarray(w), seg, 0.0, T)
  np.testing.assert_allclose(float(zero), seg, rtol=1e-6)
  one = multishot_distill_loss(jnp.asarray(s), jnp.asarray(experts), jnp.zeros(3), seg, 1.0, T)
  assert float(one) == 0.0


def test_feature_kd():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  t = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  sn = s / np.linalg.norm(s, axis=-1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
  want = np.mean(np.sum((sn - tn) ** 2, axis=-1))
  np.testing.assert_allclose(float(feature_kd(jnp.asarray(s), jnp.asarray(t))), want, rtol=1e-5)
  # scale invariant, zero for identical directions
  assert abs(float(feature_kd(jnp.asarray(s), jnp.asarray(3.0 * s)))) < 1e-6
  np.testing.assert_allclose(float(feature_kd(jnp.asarray(s), jnp.asarray(-s))), 4.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-18, 1e-13, 1e12, 1e19, 1e25, 1e30, 1e38])
def test_feature_kd_and_its_gradient_hold_past_the_float32_squared_norm(scale):
  """Features whose squared norm overflows float32 (entries past ~1.8e19) or underflows (norms below ~1e-12:
  they were read as shortened vectors, 1.07 against 1.89 at 1e-13), or whose rsqrt's gradient underflows
  (1e12), are still normalised: value and gradient against float64 numpy (dL/ds = 2 / P (I - u u^T) (u - v) / |s|
  per position)."""
  rng = np.random.default_rng(3)
  s = rng.normal(size=(3, 5, 6)).astype(np.float32)
  t = rng.normal(size=(3, 5, 6)).astype(np.float32)
  s64, t64 = s.astype(np.float64) * scale, t.astype(np.float64) * 1e-3
  u = s64 / np.linalg.norm(s64, axis=-1, keepdims=True)
  v = t64 / np.linalg.norm(t64, axis=-1, keepdims=True)
  want = np.mean(np.sum((u - v) ** 2, axis=-1))
  d = u - v
  want_grad = 2 / 15 * (d - u * np.sum(u * d, axis=-1, keepdims=True)) / np.linalg.norm(s64, axis=-1, keepdims=True)
  value, grad = jax.value_and_grad(feature_kd)(jnp.asarray(s64, jnp.float32), jnp.asarray(t64, jnp.float32))
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  if scale <= 1e30:  # past that the true gradient (~1 / |s|) is below float32's normal range
    np.testing.assert_allclose(np.asarray(grad, np.float64) * scale, want_grad * scale, rtol=1e-4, atol=1e-6)


def test_masked_class_balanced_kd_against_a_pixel_loop():
  """masked_kd_kl = a python loop over pixels: keep those whose teacher top probability >= confidence;
  balanced: each kept class (teacher argmax) gets total weight 1 / #classes kept, split evenly."""
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 6, 5, 3)).astype(np.float32) * 2
  t = rng.normal(size=(2, 6, 5, 3)).astype(np.float32) * 3
  t[..., 2] -= 4.0  # class 2 is rare, as a thin wire is
  T = 2.0
  p_t, p_s = _np_softmax(t.astype(np.float64) / T), _np_softmax(s.astype(np.float64) / T)
  kl = (T * T * np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)).ravel()
  top = _np_softmax(t.astype(np.float64)).reshape(-1, 3)
  for conf in (0.0, 0.7, 0.95):
    kept = [i for i in range(len(kl)) if top[i].max() >= conf]
    plain = sum(kl[i] for i in kept) / max(len(kept), 1)
    classes = {}
    for i in kept:
      classes.setdefault(int(top[i].argmax()), []).append(kl[i])
    balanced = sum(np.mean(v) for v in classes.values()) / max(len(classes), 1)
    assert conf > 0 or (len(classes) == 3 and len(classes[2]) < len(kl) / 10)  # a rare class is there
    got = float(masked_kd_kl(jnp.asarray(s), jnp.asarray(t), T, conf, False))
    got_b = float(masked_kd_kl(jnp.asarray(s), jnp.asarray(t), T, conf, True))
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_b, balanced, rtol=1e-5, atol=1e-7)
  assert len(classes) >= 1 and float(masked_kd_kl(jnp.asarray(s), jnp.asarray(t), T, 1.01, True)) == 0.0
  np.testing.assert_allclose(float(masked_kd_kl(jnp.asarray(s), jnp.asarray(t), T)), _np_kd(s, t, T), rtol=1e-5)
  gs, gt = jax.grad(lambda a, b: masked_kd_kl(a, b, T, 0.5, True), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert float(jnp.abs(gs).sum()) > 0 and float(jnp.abs(gt).sum()) == 0


def test_feature_kd_at_an_exact_zero_feature_vector_has_a_bounded_gradient():
  """A ReLU'd feature map can be zero in every channel at a pixel: feature_kd treats it as the zero vector
  (cos 0 with anything: loss 1 there) and its gradient is 0, as the limit of every direction has no single
  value; the floor on the squared norm gave it 1e12 x (0 - t)."""
  s = jnp.zeros((1, 4), jnp.float32)
  t = jnp.asarray([[1.0, 2.0, 2.0, 0.0]], jnp.float32)
  value, grad = jax.value_and_grad(feature_kd)(s, t)
  assert float(value) == pytest.approx(1.0) and float(jnp.max(jnp.abs(grad))) == 0.0
