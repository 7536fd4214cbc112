"""Models and the split into (graphdef, params) that the FL core works on.

``build_model(model_cfg, seed)`` builds the NNX module for ``model_cfg.name`` in {"unet",
"transunet"}; ``init_params`` returns ``(apply, params)`` and ``init_model`` additionally a
``apply_with_features(params, x) -> (logits, features [B, h, w, C])`` for feature distillation /
EMD: the bottleneck output for the UNet, the ViT encoder tokens on the patch grid for TransUNet.
"""

from __future__ import annotations

import functools

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fedkd.models.transunet import TransUNet
from fedkd.models.unet import UNet

# TransUNet defaults, used for keys a config does not set.
TRANSUNET_DEFAULTS = dict(
  patch_size=8,
  stem_width=16,
  hidden=64,
  num_layers=4,
  num_heads=4,
  mlp_dim=128,
  decoder_width=32,
  skips=False,
  image_size=64,
)


def build_model(model_cfg, seed: int) -> nnx.Module:
  if model_cfg.name == "unet":
    return UNet(
      in_channels=1,
      num_classes=model_cfg.num_classes,
      width=model_cfg.width,
      depth=model_cfg.depth,
      groups=model_cfg.groups,
      rngs=nnx.Rngs(seed),
    )
  if model_cfg.name == "transunet":
    kw = {k: model_cfg.get(k, v) for k, v in TRANSUNET_DEFAULTS.items()}
    return TransUNet(in_channels=1, num_classes=model_cfg.num_classes, rngs=nnx.Rngs(seed), **kw)
  raise ValueError(f"unknown model {model_cfg.name!r}")


def init_model(model_cfg, seed: int):
  """Returns ``(apply, apply_with_features, params)``: pure ``apply(params, x) -> logits``,
  ``apply_with_features(params, x) -> (logits, features [B, h, w, C])`` and the parameter pytree
  (a plain nested dict from ``nnx.to_pure_dict``; list levels have int keys)."""
  graphdef, params = nnx.split(build_model(model_cfg, seed), nnx.Param)
  params = jax.tree.map(lambda p: p, nnx.to_pure_dict(params))

  def apply(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)

  def apply_with_features(p, x):
    return nnx.merge(graphdef, nnx.State(p)).forward_with_features(x)

  return apply, apply_with_features, params


def init_params(model_cfg, seed: int) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """Returns ``(apply, params)``: a pure ``apply(params, x) -> logits`` and the parameter pytree."""
  apply, _, params = init_model(model_cfg, seed)
  return apply, params


@functools.lru_cache(maxsize=16)
def _label_map(apply):
  """One jitted argmax predictor per apply function: evaluators of the same model (a run's replicas)
  share its compiled programs."""

  def label_map(p, x):
    logits = apply(p, x)  # -1 where a pixel's logits are not all finite: argmax would read NaN as class 0
    return jnp.where(jnp.isfinite(logits).all(axis=-1), jnp.argmax(logits, axis=-1), -1)

  return jax.jit(label_map)


def make_predictor(apply, batch_size: int):
  """``predict(params, images [N, H, W, 1]) -> label maps [N, H, W]`` (argmax), jitted once per
  ``apply`` and run in batches of ``batch_size``; shared by training-time evaluation, fedkd.eval and
  FedEFM fine-tuning."""
  label_map = _label_map(apply)

  def predict(params, images):
    labels = jnp.concatenate(
      [label_map(params, images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    )
    bad = int(jnp.sum(jnp.any(labels < 0, axis=tuple(range(1, labels.ndim)))))  # images (a classifier: [N])
    if bad:
      from fedkd.errors import NonFiniteOutput

      raise NonFiniteOutput(
        f"the model's outputs are not finite (NaN/Inf) on {bad} of {labels.shape[0]} held-out images: a diverged "
        "model, which has no scores"
      )
    return labels

  return predict
