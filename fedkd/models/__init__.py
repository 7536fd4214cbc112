"""Models and the split into (graphdef, params) that the FL core works on."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from fedkd.models.unet import UNet


def build_model(model_cfg, seed: int) -> nnx.Module:
  if model_cfg.name == "unet":
    return UNet(in_channels=1, num_classes=model_cfg.num_classes, width=model_cfg.width,
                depth=model_cfg.depth, groups=model_cfg.groups, rngs=nnx.Rngs(seed))
  raise ValueError(f"unknown model {model_cfg.name!r}")


def init_params(model_cfg, seed: int) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """Returns ``(apply, params)``: a pure ``apply(params, x) -> logits`` and the parameter pytree."""
  graphdef, params = nnx.split(build_model(model_cfg, seed), nnx.Param)
  params = jax.tree.map(lambda p: p, nnx.to_pure_dict(params))

  def apply(p, x):
    state = nnx.State(p)
    return nnx.merge(graphdef, state)(x)

  return apply, params
