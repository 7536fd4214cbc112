"""Segmentation losses on logits [B, H, W, K] and integer labels [B, H, W].

All losses are computed in float32, are jit- and grad-able, and treat class 0 as background:
the region terms (soft Dice, soft clDice, focal Tversky) are computed per image and per foreground
class (1..K-1) and then averaged over both.

Labels outside 0..K-1 (e.g. the value 255 that many datasets use for "ignore", or -1) mark ignored
pixels: no term sees them. Cross-entropy is the mean over the labelled pixels (0 when there is none),
and the region terms use the prediction on labelled pixels only (an image with no labelled pixel
scores like a correctly empty one). fedkd's data pipeline refuses masks with a label >= the model's
``num_classes``; this rule is for callers that pass such masks on purpose.

``make_segmentation_loss(loss_cfg)`` picks the loss from ``loss_cfg.name``:

* ``"dice_ce"`` (default): ``ce_weight * CE + dice_weight * softDice``.
* ``"cldice"``: the dice_ce loss plus ``cldice_weight * (1 - soft clDice)`` with a soft skeleton of
  ``cldice_iters`` iterations (Shit et al., CVPR 2021).
* ``"focal_tversky"``: ``(1 - TI) ** (1 / tversky_gamma)`` with
  ``TI = TP / (TP + alpha * FN + beta * FP)``; following Abraham & Khan (2019), ``tversky_alpha``
  weights false negatives (default 0.7) and ``tversky_beta`` false positives (default 0.3), so
  alpha > beta favours recall, which is what thin devices need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ("dice_ce", "cldice", "focal_tversky")


def _labelled(labels, k: int):
  """Boolean [B, H, W]: the pixels whose label is a class 0..k-1 (the others are ignored)."""
  return (labels >= 0) & (labels < k)


def cross_entropy(logits, labels):
  """Mean over the labelled pixels of -log softmax(logits)[label] (0 if no pixel is labelled)."""
  k = logits.shape[-1]
  valid = _labelled(labels, k)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  count = jnp.sum(valid, dtype=jnp.int32).astype(jnp.float32)
  return jnp.sum(ce * valid.astype(jnp.float32)) / jnp.maximum(count, 1.0)


def _fg_probs_onehot(logits, labels):
  """Softmax probabilities (0 on ignored pixels) and one-hot labels of the foreground classes: both
  [B, H, W, K-1]."""
  k = logits.shape[-1]
  valid = _labelled(labels, k).astype(jnp.float32)[..., None]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:] * valid
  onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)[..., 1:]
  return probs, onehot


def soft_dice_loss(logits, labels, eps: float = 1.0):
  """1 - mean over foreground classes (1..K-1) of the soft Dice computed per image, then averaged.

  eps smooths empty classes (an image without a class and a prediction without it scores ~1).
  """
  probs, onehot = _fg_probs_onehot(logits, labels)
  inter = jnp.sum(probs * onehot, axis=(1, 2))
  denom = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  return 1.0 - jnp.mean((2.0 * inter + eps) / (denom + eps))


# ------------------------------------------------------------------ soft morphology (clDice)
# Arrays are [B, H, W, C] (channels last); pooling runs over H and W with 'SAME' padding, padded
# cells never win (-inf for max pooling), so the image border neither erodes nor dilates a mask.


def _max_pool(x, wh: int, ww: int):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, wh, ww, 1), (1, 1, 1, 1), "SAME")


def soft_erode(x):
  """Soft erosion with the 4-neighbour cross: min(-maxpool_3x1(-x), -maxpool_1x3(-x))."""
  return jnp.minimum(-_max_pool(-x, 3, 1), -_max_pool(-x, 1, 3))


def soft_dilate(x):
  """Soft dilation with the 3x3 square: maxpool_3x3(x)."""
  return _max_pool(x, 3, 3)


def soft_open(x):
  return soft_dilate(soft_erode(x))


def soft_skeleton(probs, iters: int):
  """Soft skeleton of Shit et al. (clDice, CVPR 2021) of ``probs`` shaped [B, H, W, C] in [0, 1].

  skel = relu(x - open(x)); then ``iters`` times: x = erode(x); delta = relu(x - open(x));
  skel += relu(delta - skel * delta). On a binary mask this is the Lantuejoul morphological
  skeleton (union over k of erode^k(X) minus its opening), truncated after ``iters`` erosions, so
  ``iters`` should be at least the largest structure half-width in pixels.
  """
  x = probs.astype(jnp.float32)
  skel = jax.nn.relu(x - soft_open(x))
  for _ in range(int(iters)):
    x = soft_erode(x)
    delta = jax.nn.relu(x - soft_open(x))
    skel = skel + jax.nn.relu(delta - skel * delta)
  return skel


def soft_cldice_loss(logits, labels, iters: int = 3, eps: float = 1.0):
  """1 - soft clDice, averaged over images and foreground classes.

  Tprec = (|S(P) * G| + eps) / (|S(P)| + eps), Tsens = (|S(G) * P| + eps) / (|S(G)| + eps),
  clDice = 2 Tprec Tsens / (Tprec + Tsens), with P the softmax probabilities, G the one-hot labels
  and S the soft skeleton of ``iters`` iterations; eps = 1 as in the reference implementation makes
  a class absent from both the labels and the prediction score ~1.
  """
  probs, onehot = _fg_probs_onehot(logits, labels)
  skel_p = soft_skeleton(probs, iters)
  skel_g = soft_skeleton(onehot, iters)
  tprec = (jnp.sum(skel_p * onehot, axis=(1, 2)) + eps) / (jnp.sum(skel_p, axis=(1, 2)) + eps)
  tsens = (jnp.sum(skel_g * probs, axis=(1, 2)) + eps) / (jnp.sum(skel_g, axis=(1, 2)) + eps)
  cl = 2.0 * tprec * tsens / (tprec + tsens)
  return 1.0 - jnp.mean(cl)


def focal_tversky_loss(
  logits, labels, alpha: float = 0.7, beta: float = 0.3, gamma: float = 4.0 / 3.0, eps: float = 1.0
):
  """Focal Tversky loss (Abraham & Khan, 2019), mean over images and foreground classes.

  Per image and class: TP = sum p g, FN = sum (1 - p) g, FP = sum p (1 - g),
  TI = (TP + eps) / (TP + alpha FN + beta FP + eps) and loss = (1 - TI) ** (1 / gamma).
  ``alpha`` weights false negatives and ``beta`` false positives. 1 - TI is floored at 1e-6 so
  that the gradient of the fractional power stays finite at a perfect prediction.
  """
  probs, onehot = _fg_probs_onehot(logits, labels)
  tp = jnp.sum(probs * onehot, axis=(1, 2))
  fn = jnp.sum((1.0 - probs) * onehot, axis=(1, 2))
  fp = jnp.sum(probs * (1.0 - onehot), axis=(1, 2))
  ti = (tp + eps) / (tp + alpha * fn + beta * fp + eps)
  return jnp.mean(jnp.maximum(1.0 - ti, 1e-6) ** (1.0 / gamma))


def make_segmentation_loss(loss_cfg):
  """Returns ``loss(logits [B, H, W, K], labels [B, H, W]) -> scalar`` for ``loss_cfg.name``."""
  name = loss_cfg.get("name", "dice_ce")
  ce_w = float(loss_cfg.get("ce_weight", 0.5))
  dice_w = float(loss_cfg.get("dice_weight", 0.5))

  def dice_ce(logits, labels):
    return ce_w * cross_entropy(logits, labels) + dice_w * soft_dice_loss(logits, labels)

  if name == "dice_ce":
    return dice_ce
  if name == "cldice":
    cl_w = float(loss_cfg.get("cldice_weight", 0.5))
    iters = int(loss_cfg.get("cldice_iters", 3))

    def cldice_loss(logits, labels):
      return dice_ce(logits, labels) + cl_w * soft_cldice_loss(logits, labels, iters)

    return cldice_loss
  if name == "focal_tversky":
    alpha = float(loss_cfg.get("tversky_alpha", 0.7))
    beta = float(loss_cfg.get("tversky_beta", 0.3))
    gamma = float(loss_cfg.get("tversky_gamma", 4.0 / 3.0))

    def ft_loss(logits, labels):
      return focal_tversky_loss(logits, labels, alpha, beta, gamma)

    return ft_loss
  raise ValueError(f"unknown loss name {name!r}; use one of {', '.join(LOSSES)}")
