"""UNet segmenter in Flax NNX with GroupNorm (batch-independent, right for non-IID clients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedkd.models import remat
from fedkd.models.conv import Conv, ConvTranspose


def _window_taps(x):
  """The four taps of each 2x2 window of [B, H, W, C], row-major: 4 x [B, H/2, W/2, C]."""
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return [windows[:, :, i, :, j] for i in range(2) for j in range(2)]


@jax.custom_vjp
def max_pool_2x2(x):
  """2x2 stride-2 max pool of [B, H, W, C] (H, W even): ``nnx.max_pool(x, (2, 2), strides=(2, 2))``
  with the same values and, for finite inputs, the same gradient (the first maximum of each window in row-major
  order takes it, as XLA's select-and-scatter does; a window holding a NaN routes it elsewhere), written as a reshape + max whose gradient is routed by
  the index of that tap: XLA:CPU lowers the select-and-scatter gradient to a reduce-window over
  (value, index) pairs, 9x slower."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_fwd(x):
  # The winning tap is found in the forward pass, in one elementwise expression. Comparing x with y in
  # the backward pass instead is wrong under jit: XLA may fuse x's producer (GroupNorm, ReLU) into both
  # the max and the comparison, rounded differently (FMA contraction), and then no tap equals its max.
  # m stays inside this expression: returned as the pool's values too, XLA may compute the values and
  # the index in two fusions, the index comparing its own recomputed taps with the other's m.
  a, b, c, d = _window_taps(x)
  m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  first = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3))).astype(jnp.int8)
  return max_pool_2x2(x), first


def _pool_bwd(first, g):
  taps = [jnp.where(first == k, g, jnp.zeros_like(g)) for k in range(4)]
  n, h2, w2, c = g.shape
  rows = [jnp.stack(taps[2 * i : 2 * i + 2], axis=3) for i in range(2)]  # [B, H/2, W/2, 2 (j), C]
  return (jnp.stack(rows, axis=2).reshape(n, 2 * h2, 2 * w2, c),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


class ConvBlock(nnx.Module):
  """Two (3x3 conv -> GroupNorm -> ReLU) layers; one remat unit (``fedkd.models.remat``)."""

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
    g = min(groups, cout)
    self.conv1 = Conv(cin, cout, (3, 3), rngs=rngs)
    self.norm1 = nnx.GroupNorm(cout, num_groups=g, rngs=rngs)
    self.conv2 = Conv(cout, cout, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=g, rngs=rngs)

  @remat.block
  def __call__(self, x):
    x = jax.nn.relu(self.norm1(self.conv1(x)))
    return jax.nn.relu(self.norm2(self.conv2(x)))


class UNet(nnx.Module):
  """Encoder of ``depth`` blocks (width * 2**i channels, 2x2 max-pool between), a bottleneck,
  and a decoder of transposed-conv upsampling + skip concatenation; 1x1 conv to class logits.

  Input [B, H, W, in_channels] with H, W divisible by 2**depth; output logits [B, H, W, num_classes].
  Convolutions are ``fedkd.models.conv`` ones (im2col + GEMM under ``gemm_convs()``, plain XLA convs
  otherwise; parameters as plain ``nnx.Conv`` / ``nnx.ConvTranspose``). Every ConvBlock output
  (encoder, bottleneck, decoder) is one remat unit under ``fedkd.models.remat.remat_blocks()``.
  """

  def __init__(
    self,
    *,
    in_channels: int = 1,
    num_classes: int = 3,
    width: int = 16,
    depth: int = 3,
    groups: int = 8,
    rngs: nnx.Rngs,
  ):
    if depth < 1 or width < 1 or groups < 1:
      raise ValueError(f"UNet needs depth, width and groups >= 1, got depth={depth}, width={width}, groups={groups}")
    chans = [width * 2**i for i in range(depth)]
    self.depth = depth
    enc, cin = [], in_channels
    for c in chans:
      enc.append(ConvBlock(cin, c, groups, rngs=rngs))
      cin = c
    self.enc = nnx.List(enc)
    self.mid = ConvBlock(cin, 2 * cin, groups, rngs=rngs)
    up, dec, cin = [], [], 2 * cin
    for c in reversed(chans):
      up.append(ConvTranspose(cin, c, (2, 2), strides=(2, 2), rngs=rngs))
      dec.append(ConvBlock(2 * c, c, groups, rngs=rngs))
      cin = c
    self.up = nnx.List(up)
    self.dec = nnx.List(dec)
    self.head = Conv(chans[0], num_classes, (1, 1), rngs=rngs)

  def forward_with_features(self, x):
    """(logits [B, H, W, num_classes], bottleneck (``mid``) output [B, H/2**depth, W/2**depth, C])
    from one pass (the features for feature distillation / EMD)."""
    f = 2**self.depth
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(
        f"UNet(depth={self.depth}) takes [batch, height, width, channels] images with height and width "
        f"divisible by 2**depth={f}, got shape {tuple(x.shape)}; resize or pad the images (in a config: "
        "config.image_size must be a multiple of 2**config.model.depth)"
      )
    skips = []
    for block in self.enc:
      x = block(x)
      skips.append(x)
      x = max_pool_2x2(x)
    x = feats = self.mid(x)
    for up, block, skip in zip(self.up, self.dec, reversed(skips)):
      x = block(jnp.concatenate([up(x), skip], axis=-1))
    return self.head(x), feats

  def __call__(self, x):
    return self.forward_with_features(x)[0]
