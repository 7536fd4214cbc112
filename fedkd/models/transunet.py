"""TransUNet segmenter in Flax NNX: hybrid CNN stem + ViT encoder + cascaded upsampling decoder.

A small-scale version of the FedEFM backbone (TransUNet "R50-ViT" with the ResNet root replaced by
a light stride-2 conv stem; see /work/shared/reference/fedefm.md section 2).  Only GroupNorm and
LayerNorm, no dropout, so ``apply`` is deterministic and batch-independent (right for non-IID
clients) and vmaps over stacked per-client params.

Parameter tree (``nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])``), top-level keys exactly
``{"encoder", "decoder", "head"}``::

  encoder/
    stem/{0..n-1}/{conv1, norm1, conv2, norm2}   n = log2(patch_size) stride-2 conv stages
    patch_proj/{kernel, bias}                    1x1 conv, last stem channels -> hidden
    pos_embed                                    [1, (image_size/patch_size)**2, hidden]
    layers/{0..num_layers-1}/
      ln1/{scale, bias}
      attn/{query, key, value}/{kernel [hidden, heads, head_dim], bias [heads, head_dim]}
      attn/out/{kernel [heads, head_dim, hidden], bias [hidden]}
      ln2/{scale, bias}
      mlp/{fc1, fc2}/{kernel, bias}
    norm/{scale, bias}                           final LayerNorm
  decoder/
    conv_more/{conv, norm}                       3x3 conv hidden -> decoder_width
    blocks/{0..n-1}/{conv1, norm1, conv2, norm2} x2 bilinear upsample (+ skip concat) + 2 convs
  head/{kernel, bias}                            3x3 conv -> num_classes

Everything that a pretrained "foundation" encoder provides lives under ``encoder``, so
``fedkd.models.transfer.load_encoder`` can move it between models of different depth/decoder.

All convolutions (stem, 1x1 patch projection, decoder, head) are ``fedkd.models.conv.Conv``:
im2col + GEMM under ``fedkd.models.conv.gemm_convs()`` (batched GEMMs, not grouped convs, under a
vmap over clients), plain XLA convs otherwise, with plain ``nnx.Conv`` parameters. Stem stages,
transformer layers and decoder blocks are remat units (``fedkd.models.remat``). (The bilinear x2 upsampling is a resize, i.e. matmuls, not a convolution.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fedkd.models import remat
from fedkd.models.conv import Conv


def _groups(channels: int, max_groups: int = 8) -> int:
  return math.gcd(max_groups, channels)


class ConvNormAct(nnx.Module):
  """3x3 conv (optionally stride 2) -> GroupNorm -> ReLU/GELU."""

  def __init__(self, cin: int, cout: int, *, stride: int = 1, act=jax.nn.relu, rngs: nnx.Rngs):
    self.conv = Conv(cin, cout, (3, 3), strides=(stride, stride), rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.act(self.norm(self.conv(x)))


class StemStage(nnx.Module):
  """Stride-2 3x3 conv -> GN -> GELU -> 3x3 conv -> GN -> GELU (halves the resolution)."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.conv1 = Conv(cin, cout, (3, 3), strides=(2, 2), rngs=rngs)
    self.norm1 = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)
    self.conv2 = Conv(cout, cout, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)

  @remat.block
  def __call__(self, x):
    x = jax.nn.gelu(self.norm1(self.conv1(x)))
    return jax.nn.gelu(self.norm2(self.conv2(x)))


class MultiHeadSelfAttention(nnx.Module):
  """Multi-head self-attention by plain einsum + softmax (no dropout, no mask).

  q/k/v kernels are [hidden, heads, head_dim] (so a head-count mismatch is a shape mismatch),
  the output kernel is [heads, head_dim, hidden].
  """

  def __init__(self, hidden: int, num_heads: int, *, rngs: nnx.Rngs):
    if num_heads < 1 or hidden % num_heads:
      raise ValueError(f"num_heads={num_heads} must be >= 1 and divide hidden={hidden}")
    self.num_heads = num_heads
    self.head_dim = hd = hidden // num_heads
    init = nnx.initializers.lecun_normal()

    def proj(in_shape, out_shape, fan_in):
      shape = (*in_shape, *out_shape)
      k = init(rngs.params(), (fan_in, math.prod(shape) // fan_in)).reshape(shape)
      return nnx.Dict(kernel=nnx.Param(k), bias=nnx.Param(jnp.zeros(out_shape)))

    self.query = proj((hidden,), (num_heads, hd), hidden)
    self.key = proj((hidden,), (num_heads, hd), hidden)
    self.value = proj((hidden,), (num_heads, hd), hidden)
    self.out = proj((num_heads, hd), (hidden,), hidden)

  def __call__(self, x):  # x [B, N, D]
    q = jnp.einsum("bnd,dhk->bnhk", x, self.query["kernel"][...]) + self.query["bias"][...]
    k = jnp.einsum("bnd,dhk->bnhk", x, self.key["kernel"][...]) + self.key["bias"][...]
    v = jnp.einsum("bnd,dhk->bnhk", x, self.value["kernel"][...]) + self.value["bias"][...]
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(jnp.asarray(self.head_dim, x.dtype))
    weights = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bhqs,bshk->bqhk", weights, v)
    return jnp.einsum("bqhk,hkd->bqd", ctx, self.out["kernel"][...]) + self.out["bias"][...]


class Mlp(nnx.Module):
  def __init__(self, hidden: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(hidden, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, hidden, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class TransformerBlock(nnx.Module):
  """Pre-norm ViT block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, hidden: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(hidden, epsilon=1e-6, rngs=rngs)
    self.attn = MultiHeadSelfAttention(hidden, num_heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(hidden, epsilon=1e-6, rngs=rngs)
    self.mlp = Mlp(hidden, mlp_dim, rngs=rngs)

  @remat.block
  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class Encoder(nnx.Module):
  """CNN stem (downsample by patch_size) -> 1x1 patch projection + learned position embedding ->
  ViT layers -> final LayerNorm."""

  def __init__(
    self,
    *,
    in_channels: int,
    image_size: int,
    patch_size: int,
    stem_width: int,
    hidden: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
    rngs: nnx.Rngs,
  ):
    n_stages = int(round(math.log2(patch_size))) if patch_size > 0 else -1
    if patch_size < 2 or 2**n_stages != patch_size:
      raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size}")
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
    if image_size == patch_size:
      # the last stem stage and the decoder's first conv are GroupNormed over one position: a group of one or
      # two values normalises to a constant or to +-1 (the default widths), so the logits barely see the image
      raise ValueError(
        f"image_size={image_size} with patch_size={patch_size} gives a 1x1 token grid: attention over one "
        "token, and GroupNorms over one position that reduce the image to a few signs; use a patch_size of "
        f"at most image_size/2={image_size // 2}"
      )
    if hidden < 3:
      # LayerNorm over one feature returns its bias whatever the input, over two it returns +-1 (the sign of
      # their difference, zero gradient): the tokens, and so the logits, barely or not at all see the image
      raise ValueError(
        f"hidden={hidden}: the ViT's LayerNorms normalise each token over its hidden features, and over "
        "one or two features they output constants or signs, so the model would ignore the image; use hidden >= 3"
      )
    self.grid = image_size // patch_size
    self.stem_channels = tuple(stem_width * 2**i for i in range(n_stages))
    stages, cin = [], in_channels
    for c in self.stem_channels:
      stages.append(StemStage(cin, c, rngs=rngs))
      cin = c
    self.stem = nnx.List(stages)
    self.patch_proj = Conv(cin, hidden, (1, 1), rngs=rngs)
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, self.grid * self.grid, hidden)))
    self.layers = nnx.List([TransformerBlock(hidden, num_heads, mlp_dim, rngs=rngs) for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(hidden, epsilon=1e-6, rngs=rngs)

  def run_stem(self, x):
    """Returns the list of stem stage outputs (resolutions 1/2, 1/4, ..., 1/patch_size)."""
    size = self.grid * 2 ** len(self.stem)  # the image_size the model was built for
    if x.ndim != 4 or x.shape[1:3] != (size, size):
      # (an input a few pixels smaller still gives the token grid, and then logits of image_size, not its own)
      raise ValueError(
        f"TransUNet built for image_size={size} takes [batch, {size}, {size}, channels] images, got shape "
        f"{tuple(x.shape)}; resize the images or build the model with another image_size"
      )
    outs = []
    for stage in self.stem:
      x = stage(x)
      outs.append(x)
    return outs

  def embed(self, stem_out):
    """Last stem output [B, h, w, C] -> token sequence [B, h*w, hidden] with position embedding."""
    x = self.patch_proj(stem_out)
    b, h, w, d = x.shape
    if h != self.grid or w != self.grid:
      raise ValueError(
        f"token grid {h}x{w} does not match the position embedding "
        f"({self.grid}x{self.grid}); the model was built for another image_size"
      )
    return x.reshape(b, h * w, d) + self.pos_embed[...]

  def transform(self, tokens):
    for layer in self.layers:
      tokens = layer(tokens)
    return self.norm(tokens)

  def __call__(self, x):
    """x [B, H, W, C_in] -> (tokens [B, h, w, hidden], stem outputs)."""
    stem_outs = self.run_stem(x)
    tokens = self.transform(self.embed(stem_outs[-1]))
    b = tokens.shape[0]
    return tokens.reshape(b, self.grid, self.grid, tokens.shape[-1]), stem_outs


def _upsample2x(x):
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")


class DecoderBlock(nnx.Module):
  def __init__(self, cin: int, cskip: int, cout: int, *, rngs: nnx.Rngs):
    self.conv1 = Conv(cin + cskip, cout, (3, 3), rngs=rngs)
    self.norm1 = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)
    self.conv2 = Conv(cout, cout, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)

  @remat.block
  def __call__(self, x, skip=None):
    x = _upsample2x(x)
    if skip is not None:
      x = jnp.concatenate([x, skip], axis=-1)
    x = jax.nn.relu(self.norm1(self.conv1(x)))
    return jax.nn.relu(self.norm2(self.conv2(x)))


class Decoder(nnx.Module):
  """TransUNet "DecoderCup": 3x3 conv on the token grid, then log2(patch_size) x2-upsampling
  blocks with channels decoder_width/2, /4, ... (floor 8); with ``skips`` the stem stage outputs
  of matching resolution are concatenated (all but the last, full-resolution block)."""

  def __init__(self, *, hidden: int, decoder_width: int, stem_channels: tuple[int, ...], skips: bool, rngs: nnx.Rngs):
    n = len(stem_channels)
    self.skips = skips
    self.conv_more = ConvNormAct(hidden, decoder_width, rngs=rngs)
    blocks, cin = [], decoder_width
    out_channels = []
    for j in range(n):
      cout = max(decoder_width // 2 ** (j + 1), 8)
      skip_idx = n - 2 - j
      cskip = stem_channels[skip_idx] if (skips and skip_idx >= 0) else 0
      blocks.append(DecoderBlock(cin, cskip, cout, rngs=rngs))
      out_channels.append(cout)
      cin = cout
    self.blocks = nnx.List(blocks)
    self.out_channels = tuple(out_channels)

  def __call__(self, tokens, stem_outs):
    x = self.conv_more(tokens)
    n = len(self.blocks)
    for j, block in enumerate(self.blocks):
      skip_idx = n - 2 - j
      skip = stem_outs[skip_idx] if (self.skips and skip_idx >= 0) else None
      x = block(x, skip)
    return x


class TransUNet(nnx.Module):
  """TransUNet for [B, H, W, in_channels] inputs with H = W = image_size.

  ``patch_size`` is a power of two >= 2 dividing ``image_size`` with a token grid of at least 2 x 2
  (``image_size >= 2 * patch_size``); ``hidden >= 3`` and divisible by ``num_heads``; otherwise ValueError.

  ``__call__(x)`` -> logits [B, H, W, num_classes]; ``features(x)`` -> encoder tokens
  [B, H/p, W/p, hidden]; ``forward_with_features(x)`` -> both from one encoder pass.
  Param top-level keys: exactly {"encoder", "decoder", "head"} (layout: module docstring).
  """

  def __init__(
    self,
    *,
    in_channels: int = 1,
    num_classes: int = 3,
    image_size: int = 64,
    patch_size: int = 8,
    stem_width: int = 16,
    hidden: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    mlp_dim: int = 128,
    decoder_width: int = 32,
    skips: bool = False,
    rngs: nnx.Rngs,
  ):
    self.encoder = Encoder(
      in_channels=in_channels,
      image_size=image_size,
      patch_size=patch_size,
      stem_width=stem_width,
      hidden=hidden,
      num_layers=num_layers,
      num_heads=num_heads,
      mlp_dim=mlp_dim,
      rngs=rngs,
    )
    self.decoder = Decoder(
      hidden=hidden, decoder_width=decoder_width, stem_channels=self.encoder.stem_channels, skips=skips, rngs=rngs
    )
    self.head = Conv(self.decoder.out_channels[-1], num_classes, (3, 3), rngs=rngs)

  def forward_with_features(self, x):
    tokens, stem_outs = self.encoder(x)
    return self.head(self.decoder(tokens, stem_outs)), tokens

  def features(self, x):
    return self.encoder(x)[0]

  def __call__(self, x):
    return self.forward_with_features(x)[0]
