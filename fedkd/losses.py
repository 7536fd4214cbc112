"""Segmentation losses on logits [B, H, W, K] and integer labels [B, H, W]."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def soft_dice_loss(logits, labels, eps: float = 1.0):
  """1 - mean over foreground classes (1..K-1) of the soft Dice computed per image, then averaged.

  eps smooths empty classes (an image without a class and a prediction without it scores ~1).
  """
  k = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
  onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)[..., 1:]
  inter = jnp.sum(probs * onehot, axis=(1, 2))
  denom = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  return 1.0 - jnp.mean((2.0 * inter + eps) / (denom + eps))


def make_segmentation_loss(loss_cfg):
  ce_w, dice_w = float(loss_cfg.ce_weight), float(loss_cfg.dice_weight)

  def loss(logits, labels):
    return ce_w * cross_entropy(logits, labels) + dice_w * soft_dice_loss(logits, labels)

  return loss
