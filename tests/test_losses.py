"""Losses against numpy closed forms, behaviour of soft clDice, config selection and gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedkd import losses as L
from fedkd import metrics as M


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_terms(logits, labels):
  k = logits.shape[-1]
  p = _np_softmax(logits.astype(np.float64))
  g = np.eye(k)[labels]
  return p, g


def _np_dice_ce(logits, labels, ce_w, dice_w, eps=1.0):
  p, g = _np_terms(logits, labels)
  ce = -np.mean(np.log(np.sum(p * g, -1)))
  pf, gf = p[..., 1:], g[..., 1:]
  dice = (2 * (pf * gf).sum((1, 2)) + eps) / (pf.sum((1, 2)) + gf.sum((1, 2)) + eps)
  return ce_w * ce + dice_w * (1 - dice.mean())


def _np_focal_tversky(logits, labels, alpha, beta, gamma, eps=1.0):
  p, g = _np_terms(logits, labels)
  p, g = p[..., 1:], g[..., 1:]
  tp = (p * g).sum((1, 2))
  fn = ((1 - p) * g).sum((1, 2))
  fp = (p * (1 - g)).sum((1, 2))
  ti = (tp + eps) / (tp + alpha * fn + beta * fp + eps)
  return np.mean((1 - ti) ** (1 / gamma))


def _random(seed, b=2, h=6, w=7, k=3):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, h, w, k)).astype(np.float32) * 2, rng.integers(0, k, (b, h, w))


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def test_dice_ce_unchanged_vs_numpy():
  logits, labels = _random(0)
  for cfg in (
    _cfg(ce_weight=0.5, dice_weight=0.5),  # an old config without a name
    _cfg(name="dice_ce", ce_weight=0.3, dice_weight=0.7),
  ):
    got = float(L.make_segmentation_loss(cfg)(logits, labels))
    assert got == pytest.approx(_np_dice_ce(logits, labels, cfg.ce_weight, cfg.dice_weight), rel=1e-5)


def test_focal_tversky_vs_numpy():
  logits, labels = _random(1)
  for a, b, g in ((0.7, 0.3, 4 / 3), (0.3, 0.7, 1.0), (0.5, 0.5, 2.0)):
    got = float(L.focal_tversky_loss(logits, labels, a, b, g))
    assert got == pytest.approx(_np_focal_tversky(logits, labels, a, b, g), rel=1e-5)
  cfg = _cfg(name="focal_tversky", tversky_alpha=0.7, tversky_beta=0.3, tversky_gamma=4 / 3)
  got = float(L.make_segmentation_loss(cfg)(logits, labels))
  assert got == pytest.approx(_np_focal_tversky(logits, labels, 0.7, 0.3, 4 / 3), rel=1e-5)


def test_focal_tversky_alpha_weights_false_negatives():
  # prediction misses half of the class-1 pixels (FN only): a larger alpha must cost more
  labels = np.zeros((1, 8, 8), np.int32)
  labels[0, 2:6, 2:6] = 1
  pred = labels.copy()
  pred[0, 2:4, 2:6] = 0
  logits = 10.0 * jax.nn.one_hot(pred, 2)
  hi = float(L.focal_tversky_loss(logits, labels, alpha=0.7, beta=0.3))
  lo = float(L.focal_tversky_loss(logits, labels, alpha=0.3, beta=0.7))
  assert hi > lo


def _line_labels(row, h=24, w=24):
  lab = np.zeros((1, h, w), np.int32)
  lab[0, row, 3:21] = 1
  lab[0, 4:row, 20] = 2  # a second, thin foreground class
  return lab


def test_soft_cldice_loss_matches_thin_line():
  labels = _line_labels(12)
  good = 12.0 * jax.nn.one_hot(labels, 3)
  shifted = 12.0 * jax.nn.one_hot(np.roll(labels, 3, axis=(1, 2)), 3)
  lg = float(L.soft_cldice_loss(good, labels, iters=3))
  ls = float(L.soft_cldice_loss(shifted, labels, iters=3))
  assert lg < 0.01
  assert ls > 0.5
  # an all-background prediction misses the line: loss near 1 for both classes
  assert float(L.soft_cldice_loss(12.0 * jax.nn.one_hot(np.zeros_like(labels), 3), labels, 3)) > 0.8


def test_soft_skeleton_is_binary_skeleton_inside_the_image():
  # shapes away from the border: the loss's soft skeleton of a binary mask is the metric's skeleton
  m = np.zeros((2, 20, 20), np.float32)
  m[0, 4:9, 3:17] = 1
  m[1, 5:15, 5:8] = 1
  m[1, 12:15, 5:16] = 1
  soft = np.asarray(L.soft_skeleton(jnp.asarray(m)[..., None], iters=5))[..., 0]
  np.testing.assert_array_equal(soft, np.asarray(M.binary_skeleton(m, iters=5)))
  assert soft.sum() > 0 and np.all(soft <= m)


def test_cldice_config_adds_to_dice_ce():
  logits, labels = _random(2, h=10, w=10)
  base = _cfg(ce_weight=0.5, dice_weight=0.5)
  cl = _cfg(name="cldice", ce_weight=0.5, dice_weight=0.5, cldice_weight=0.25, cldice_iters=2)
  got = float(L.make_segmentation_loss(cl)(logits, labels))
  ref = float(L.make_segmentation_loss(base)(logits, labels)) + 0.25 * float(L.soft_cldice_loss(logits, labels, 2))
  assert got == pytest.approx(ref, rel=1e-6)
  with pytest.raises(ValueError):
    L.make_segmentation_loss(_cfg(name="nope"))


@pytest.mark.parametrize("name", ["dice_ce", "cldice", "focal_tversky"])
def test_gradients_finite(name):
  logits, labels = _random(3, h=12, w=12)
  cfg = _cfg(
    name=name,
    ce_weight=0.5,
    dice_weight=0.5,
    cldice_weight=0.5,
    cldice_iters=3,
    tversky_alpha=0.7,
    tversky_beta=0.3,
    tversky_gamma=4 / 3,
  )
  loss_fn = L.make_segmentation_loss(cfg)
  val, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(logits), labels)
  assert val.dtype == jnp.float32 and np.isfinite(float(val))
  assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0
  # also at a (near-)perfect prediction, where the focal power and the skeleton saturate
  perfect = 30.0 * jax.nn.one_hot(labels, 3)
  grad = jax.grad(loss_fn)(perfect, labels)
  assert np.all(np.isfinite(np.asarray(grad)))
