"""Segmentation metrics on integer label maps.

Every function takes ``pred`` and ``target`` integer label maps shaped [H, W] (one image) or
[B, H, W] (a batch) and a ``class_id``; it returns a scalar for one image or [B] for a batch.
Empty-mask convention: when neither the prediction nor the target contains the class, the image
scores 1.0 (nothing to find, nothing claimed); when only one of them contains it, 0.0.
"""
from __future__ import annotations

import jax.numpy as jnp

CLASS_NAMES = ("background", "catheter", "guidewire", "vessel")


def _counts(pred, target, class_id):
  p = pred == class_id
  t = target == class_id
  axes = (-2, -1)
  inter = jnp.sum(p & t, axis=axes).astype(jnp.float32)
  return inter, jnp.sum(p, axis=axes).astype(jnp.float32), jnp.sum(t, axis=axes).astype(jnp.float32)


def dice(pred, target, class_id: int):
  """2|P & T| / (|P| + |T|) per image."""
  inter, np_, nt = _counts(pred, target, class_id)
  denom = np_ + nt
  return jnp.where(denom > 0, 2.0 * inter / jnp.maximum(denom, 1.0), 1.0)


def iou(pred, target, class_id: int):
  """|P & T| / |P | T| per image."""
  inter, np_, nt = _counts(pred, target, class_id)
  union = np_ + nt - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
