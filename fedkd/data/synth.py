"""Synthetic X-ray fluoroscopy frames with device / vessel masks, rendered in JAX (generator v2).

Forward model, composed in the line-integral domain (``L``) and exponentiated once:

  geometry   pincushion distortion maps every detector pixel to object coordinates; all anatomy,
             vessels and devices are evaluated there, so masks and image stay consistent.
  anatomy    soft tissue (Gaussian blobs + gradient), spine (column of vertebral blocks), ribs
             (curved bands), heart / diaphragm edge (smooth step), contrast-filled vessel tree
             (trunk Bezier + 2..4 narrower child branches, tapered tubes).
  devices    catheter 5-7 F with the hollow tram-line chord 2(sqrt(R^2-x^2) - sqrt(r^2-x^2)),
             optionally contrast-filled lumen; guidewire 0.014-0.035" with a dense radiopaque tip
             coil (last 2-3 cm) and a J tip; optional second wire. With some probability devices run
             inside the vessel tree (catheter along the trunk, wire into a branch).
  detector   counts = dose * vignetting * exp(-L) + scatter (SPR * broad blur of the primary)
             + Poisson (Gaussian approximation) and electronic noise, Gaussian PSF blur,
             -log, display window from the noise-free field, gamma, polarity flip,
             burned-in text, 8x8 block-DCT JPEG quantization, 8-bit output.
  shutters   collimator blades (dark, detector space); masks are cleared under them.

Sizes are physical: ``pixel_spacing`` is mm/px of the acquisition field (``field_size`` px; by default
the output itself, so at any output size the catheter is 3-12 px and the wire 0.8-3 px; with
``field_size=512`` a smaller output is a downsampled view of a 512 x 512 field and device widths shrink
with the image size). Widths are clamped to catheter 3-12 px and wire 0.8-3 px of the field. Devices are supersampled (``supersample`` x ``supersample``
samples per output pixel, static) with an area-conserving minimum radius of one sample spacing, and
mean-pooled, so sub-pixel wires keep the right partial volume. The distance to the nearest polyline
segment is computed once per output pixel (running minimum over segments, as in v1); each sub-sample
re-evaluates the distance to that segment's line analytically, which also integrates device motion
during the pulse (motion blur). Anatomy and vessels are rendered at output resolution.

Masks (0 background, 1 catheter, 2 guidewire, 3 vessel) come from the same geometry at output
resolution: a pixel belongs to a structure when its distance to the centreline is <= max(radius, 0.5 px),
so thin wires never vanish from the mask. Which structures are present and labeled depends on the
site's data type (see ``fedkd.data.sites``), applied with traced flags.

Everything is a pure function of a PRNG key derived from (seed, split, site, index), so an example is
identical regardless of which batch it is generated in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedkd.data.sites import (
  BACKGROUND,
  CATHETER,
  CATHETER_WIDTH_BOUNDS,
  DATA_TYPE_FLAGS,
  GUIDEWIRE,
  GUIDEWIRE_WIDTH_BOUNDS,
  KNOBS,
  VESSEL,
)

__all__ = ["BACKGROUND", "CATHETER", "GUIDEWIRE", "VESSEL", "SUPERSAMPLE", "example_key", "render", "generate"]

SUPERSAMPLE = 2  # default device supersampling factor per axis (static)
# Versions of the forward model (``physics``, static; config.data.synthetic_physics). 1: as the published
# tables were made. 2: four departures of 1 from the physics it models corrected: (a) a device's attenuation
# coefficient is its material's, so its peak line integral grows with its diameter (1 drew the peak whatever
# the size: a 0.035" wire was as dark as a 0.014" one); (b) the detector averages transmitted intensity over a
# pixel and the pulse, mean exp(-L) (1 averaged L, which darkens partly covered pixels: a coil edge at L = 2
# over half a pixel read 0.37 instead of 0.57); (c) electronic (read-out) noise is added after the detector's
# blur, white at its stated sigma (1 blurred it with the quantum noise); (d) the second guidewire is drawn at
# the site's guidewire size (1 drew it from 0.014-0.035" whatever the site).
# 3: 2 and two departures of the device geometry corrected: (e) a device that leaves the field is not clipped
# to 2 % inside its edge (1 and 2 folded what lay beyond onto a run along the edge, in image and mask: a wire ran
# >= 8 px along it in 10-26 % of frames at 64-128 px); (f) the catheter enters from outside the field (1 and 2
# started it 0.4-0.5 field sides from the centre, inside the field: a free proximal end in mid-image).
PHYSICS = (1, 2, 3)
DEVICE_REF_WIRE_INCH = 0.025  # physics 2: the wire diameter at which a wire's peak line integral is 1's draw
DEVICE_REF_FRENCH = 6.0  # physics 2: the catheter size at which its wall's peak line integral is 1's draw
MAX_SUPERSAMPLE = 4
N_BODY = 16  # polyline points of a device body
N_TIP = 5  # extra points of a device tip curve (J tip / catheter tip shape)
N_TRUNK = 12  # polyline points of the vessel trunk
N_CHILD = 8  # polyline points of a vessel branch
MAX_CHILDREN = 4
MIN_CHILDREN = 2
N_BLOBS = 5  # Gaussian blobs of the soft-tissue field
BLUR_RADIUS = 4  # PSF taps = 2 * radius + 1 (sigma <= 1.5 px fits well; 2.5 is truncated)
SCATTER_DOWN = 4  # scatter is blurred on a 4x coarser grid
SHUTTER_L = 6.0  # line integral of a collimator blade
WINDOW_MIN_SPAN = 0.8  # narrowest display window (line-integral units)
WINDOW_LEVEL = 0.4  # mean of the open field sits at 1 - WINDOW_LEVEL before gamma
MIN_COUNTS = 0.5
FAR = 1e4  # offset that moves inactive curves out of the field
TEXT_LINES, TEXT_CHARS = 2, 6
N_UNIFORMS = 160  # scalar random numbers drawn per example

_JPEG_LUMA = np.array(
  [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
  ],
  dtype=np.float32,
)


def _dct_matrix(n: int = 8) -> np.ndarray:
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


_DCT8 = _dct_matrix()


def example_key(seed, site, index, split) -> jax.Array:
  """PRNG key for one example: fold_in chain of (seed, split, site, index); traceable."""
  key = jax.random.PRNGKey(seed)
  key = jax.random.fold_in(key, split)
  key = jax.random.fold_in(key, site)
  return jax.random.fold_in(key, index)


class _Uniforms:
  """All scalar randomness of one example comes from one uniform draw (few threefry instances keep
  the compile time low); each call hands out the next slice, mapped to [lo, hi)."""

  def __init__(self, key, n: int = N_UNIFORMS):
    self._u = jax.random.uniform(key, (n,))
    self._n = n
    self._i = 0

  def __call__(self, shape=(), lo=0.0, hi=1.0):
    shape = tuple(shape)
    k = int(np.prod(shape, dtype=np.int64))
    if self._i + k > self._n:
      raise RuntimeError(f"N_UNIFORMS={self._n} is too small")
    v = self._u[self._i : self._i + k].reshape(shape)
    self._i += k
    return lo + (hi - lo) * v


# ------------------------------------------------------------------------------------ curves


def _bezier_at(ctrl: jax.Array, t: jax.Array) -> jax.Array:
  """Cubic Bezier [4, 2] control points evaluated at parameters t [n] -> [n, 2]."""
  t = t[:, None]
  s = 1.0 - t
  # explicit multiply-add (no matmul): bitwise reproducible under any vmap batch size
  return s * s * s * ctrl[0] + 3.0 * s * s * t * ctrl[1] + 3.0 * s * t * t * ctrl[2] + t * t * t * ctrl[3]


def _bezier_tangent(ctrl: jax.Array, t) -> jax.Array:
  s = 1.0 - t
  return 3.0 * s * s * (ctrl[1] - ctrl[0]) + 6.0 * s * t * (ctrl[2] - ctrl[1]) + 3.0 * t * t * (ctrl[3] - ctrl[2])


def _unit(v):
  return v / jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)), 1e-6)


def _rotate(v, angle):
  c, s = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def _tip_curve(pts: jax.Array, length, turn) -> jax.Array:
  """Append N_TIP points continuing the polyline ``pts`` [n, 2] along an arc of the given arc
  length (px) that turns by ``turn`` radians in total (J tip for |turn| ~ pi)."""
  direction = _unit(pts[-1] - pts[-2])
  k = jnp.arange(N_TIP, dtype=jnp.float32)
  headings = _rotate(jnp.broadcast_to(direction, (N_TIP, 2)), turn * (k + 0.5) / N_TIP)
  steps = headings * (length / N_TIP)
  return jnp.concatenate([pts, pts[-1] + jnp.cumsum(steps, axis=0)], axis=0)


def _segments(pts: jax.Array):
  """Polyline [n, 2] -> segment starts [n-1, 2], vectors [n-1, 2], 1/|ab|^2 [n-1]."""
  a = pts[:-1]
  ab = pts[1:] - a
  inv = 1.0 / jnp.maximum(jnp.sum(ab * ab, axis=-1), 1e-6)
  return a, ab, inv


def _nearest_segment(py, px, a, ab, inv, scale=None, attrs=None):
  """Running minimum over segments of the squared distance from pixels (py, px) [H, W].

  Returns (best d^2 [* scale[i]], [attrs[i, k] of the nearest segment for each k]). An elementwise
  loop over the few segments instead of a fused reduction: fast on CPU and bitwise stable whatever
  the batch size. Attributes are carried with selects: a gather fused into the pixel loop makes
  XLA CPU emit slow scalar code.
  """
  # materialize the segment table so the curve construction is not fused into the pixel loop
  a, ab, inv, scale, attrs = jax.lax.optimization_barrier((a, ab, inv, scale, attrs))
  n_attr = 0 if attrs is None else attrs.shape[1]
  best = None
  tracked = []
  for i in range(a.shape[0]):
    apy = py - a[i, 0]
    apx = px - a[i, 1]
    t = jnp.clip((apy * ab[i, 0] + apx * ab[i, 1]) * inv[i], 0.0, 1.0)
    dy = apy - t * ab[i, 0]
    dx = apx - t * ab[i, 1]
    d2 = dy * dy + dx * dx
    if scale is not None:
      d2 = d2 * scale[i]
    if best is None:
      best = d2
      tracked = [jnp.full(d2.shape, attrs[0, k]) for k in range(n_attr)]
    else:
      better = d2 < best
      tracked = [jnp.where(better, attrs[i, k], tracked[k]) for k in range(n_attr)]
      best = jnp.minimum(best, d2)
  return best, tracked


def _local_frame(py, px, seg):
  """Offset from the closest point of the gathered segment and its (interior-only) unit direction.

  seg: per-pixel attributes of the nearest segment [a_y, a_x, ab_y, ab_x, 1/|ab|^2, ...]. For sub-sample offsets delta the squared
  distance to the segment's line is |v + delta|^2 - (w . delta)^2 (w = 0 at segment ends, where the
  distance is to the end point)."""
  apy = py - seg[0]
  apx = px - seg[1]
  t = (apy * seg[2] + apx * seg[3]) * seg[4]
  tc = jnp.clip(t, 0.0, 1.0)
  vy = apy - tc * seg[2]
  vx = apx - tc * seg[3]
  interior = ((t > 0.0) & (t < 1.0)).astype(jnp.float32)
  norm = interior * jnp.sqrt(seg[4])
  return vy, vx, seg[2] * norm, seg[3] * norm


def _catheter_curve(u, size, rnd_tip, follow_pts, follow, physics: int = 1):
  """Catheter polyline [N_BODY + N_TIP, 2]: enters near the field edge (physics 3: from outside the field, past
  its corners) and ends near the centre (v1 layout), or (follow=1) runs along the vessel trunk given as
  ``follow_pts``."""
  c = 0.5 * size
  th0 = u((), 0.0, 2 * jnp.pi)
  r0 = u((), 0.4, 0.5) * size
  if physics >= 3:  # (f) the same draw mapped from 0.4-0.5 to 0.72-0.80 field sides from the centre
    r0 = (0.72 + 0.8 * (r0 / size - 0.4)) * size
  p0 = c + r0 * jnp.stack([jnp.cos(th0), jnp.sin(th0)])
  th3 = th0 + jnp.pi + u((), -0.9, 0.9)
  r3 = u((), 0.0, 0.12) * size
  p3 = c + r3 * jnp.stack([jnp.cos(th3), jnp.sin(th3)])
  mid = u((2, 2), 0.15, 0.85) * size
  body = _bezier_at(jnp.concatenate([p0[None], mid, p3[None]], axis=0), jnp.linspace(0.0, 1.0, N_BODY))
  body = follow * follow_pts + (1.0 - follow) * body
  return _tip_curve(body, *rnd_tip)


def _wire_curve(u, size, start, rnd_tip, follow_pts, follow):
  """Guidewire polyline [N_BODY + N_TIP, 2] leaving ``start`` (the catheter tip) towards the
  opposite side of the field, or (follow=1) the given vessel path; ends in a tip curve."""
  c = 0.5 * size
  away = start - c
  th = jnp.arctan2(away[1], away[0]) + jnp.pi + u((), -1.2, 1.2)
  r = u((), 0.25, 0.38) * size
  end = c + r * jnp.stack([jnp.cos(th), jnp.sin(th)])
  mid = u((2, 2), 0.15, 0.85) * size
  q1 = 0.5 * mid[0] + 0.5 * (start + 0.33 * (end - start))
  body = _bezier_at(jnp.stack([start, q1, mid[1], end]), jnp.linspace(0.0, 1.0, N_BODY))
  body = follow * follow_pts + (1.0 - follow) * body
  return _tip_curve(body, *rnd_tip)


def _vessel_trunk(u, size, physics: int = 1):
  """Trunk Bezier control points [4, 2]: enters from outside the field (physics 1, 2: 0.62 field sides from the
  centre, inside the field towards its corners; 3: 0.75, past them), crosses near the centre."""
  c = 0.5 * size
  th0 = u((), 0.0, 2 * jnp.pi)
  p0 = c + (0.75 if physics >= 3 else 0.62) * size * jnp.stack([jnp.cos(th0), jnp.sin(th0)])
  th3 = th0 + jnp.pi + u((), -0.8, 0.8)
  p3 = c + u((), 0.3, 0.62) * size * jnp.stack([jnp.cos(th3), jnp.sin(th3)])
  mid = u((2, 2), 0.3, 0.7) * size
  return jnp.concatenate([p0[None], mid, p3[None]], axis=0)


def _vessel_tree(u, size, trunk, s, r_trunk_px, n_children):
  """Branches leaving the trunk at parameters ``s`` [MAX_CHILDREN] (the first n_children active,
  narrower, tapering) and the segment table of the whole tree with inactive branches moved out of
  the field. Returns branch control points [MAX_CHILDREN, 4, 2] and (starts, vectors, 1/|ab|^2,
  radius) per segment."""
  base = _bezier_at(trunk, s)  # [M, 2]
  tangent = _unit(jax.vmap(lambda t: _bezier_tangent(trunk, t))(s))
  side = jnp.where(u((MAX_CHILDREN,)) < 0.5, 1.0, -1.0)
  ang = u((MAX_CHILDREN, 3))
  a1 = side * (0.35 + 0.85 * ang[:, 0])
  length = (0.2 + 0.25 * ang[:, 1]) * size
  bend = side * (ang[:, 2] - 0.5) * 1.2
  d1 = _rotate(tangent, a1)
  d2 = _rotate(tangent, a1 + 0.5 * bend)
  d3 = _rotate(tangent, a1 + bend)
  children = jnp.stack(
    [base, base + d1 * length[:, None] / 3.0, base + d2 * length[:, None] * (2.0 / 3.0), base + d3 * length[:, None]],
    axis=1,
  )  # [M, 4, 2]
  active = jnp.arange(MAX_CHILDREN) < n_children

  t_trunk = jnp.linspace(0.0, 1.0, N_TRUNK)
  t_child = jnp.linspace(0.0, 1.0, N_CHILD)
  trunk_pts = _bezier_at(trunk, t_trunk)
  child_pts = jax.vmap(lambda cc: _bezier_at(cc, t_child))(children)
  child_pts = child_pts + jnp.where(active, 0.0, FAR)[:, None, None]
  ratio = u((MAX_CHILDREN,), 0.5, 0.75)
  r_trunk_seg = r_trunk_px * (1.0 - 0.35 * 0.5 * (t_trunk[1:] + t_trunk[:-1]))
  r_child_seg = (r_trunk_px * (1.0 - 0.35 * s) * ratio)[:, None] * (1.0 - 0.4 * 0.5 * (t_child[1:] + t_child[:-1]))[
    None
  ]
  segs = [_segments(trunk_pts)] + [_segments(child_pts[m]) for m in range(MAX_CHILDREN)]
  a = jnp.concatenate([sg[0] for sg in segs])
  ab = jnp.concatenate([sg[1] for sg in segs])
  inv = jnp.concatenate([sg[2] for sg in segs])
  radius = jnp.concatenate([r_trunk_seg, r_child_seg.reshape(-1)])
  return children, (a, ab, inv, radius)


def _arc_from_end(pts: jax.Array) -> jax.Array:
  """Arc length from the far end of the polyline to the middle of each segment [n-1]."""
  seg = jnp.sqrt(jnp.sum((pts[1:] - pts[:-1]) ** 2, axis=-1))
  after = jnp.cumsum(seg[::-1])[::-1] - seg
  return after + 0.5 * seg


# ------------------------------------------------------------------------------------ anatomy


def _soft_tissue(u, qy, qx, size, mm, strength):
  """Low-frequency soft tissue: Gaussian blobs (sigma 20-80 mm) and a gentle gradient."""
  centres = u((N_BLOBS, 2), -0.1, 1.1) * size
  sig = u((N_BLOBS,), 20.0, 80.0) * mm
  amp = u((N_BLOBS,), 0.2, 1.0)
  blobs = 0.0
  for i in range(N_BLOBS):
    d2 = (qy - centres[i, 0]) ** 2 + (qx - centres[i, 1]) ** 2
    blobs = blobs + amp[i] * jnp.exp(d2 * (-0.5 / (sig[i] * sig[i])))
  blobs = blobs / (1.0 + blobs)
  g = u((2,), -0.3, 0.3)
  grad = 0.5 + g[0] * (qy / size - 0.5) + g[1] * (qx / size - 0.5)
  return strength * (0.7 * blobs + 0.3 * grad)


def _bones(u, qy, qx, size, mm, spine_strength, rib_strength):
  """Spine (column of vertebral blocks separated by discs) and ribs (curved bands either side)."""
  k = u((9,))
  alpha = (k[0] - 0.5) * 0.3  # spine tilt from vertical
  oy = 0.5 * size
  ox = (0.3 + 0.4 * k[1]) * size
  ca, sa = jnp.cos(alpha), jnp.sin(alpha)
  along = (qy - oy) * ca + (qx - ox) * sa
  across = -(qy - oy) * sa + (qx - ox) * ca
  half_w = (20.0 + 8.0 * k[2]) * mm  # vertebral body half width
  period = (25.0 + 7.0 * k[3]) * mm  # vertebra + disc
  body = jnp.sqrt(jnp.maximum(1.0 - (across / half_w) ** 2, 0.0))
  frac = jnp.mod(along / period + k[4], 1.0)
  edge = jnp.minimum(frac, 1.0 - frac) * period  # distance to the nearest disc centre
  block = jnp.clip((edge - 0.08 * period) / (0.12 * period + 1e-3), 0.0, 1.0)
  spine = spine_strength * body * (0.5 + 0.5 * block)

  rib_period = (25.0 + 10.0 * k[5]) * mm
  rib_half = (4.0 + 3.5 * k[6]) * mm  # ribs 8-15 mm wide
  curve = (0.4 + 0.8 * k[7]) / size  # downward curvature away from the spine
  rc = along + curve * across * across
  rfrac = jnp.mod(rc / rib_period + k[8], 1.0) - 0.5
  band = jnp.sqrt(jnp.maximum(1.0 - (rfrac * rib_period / rib_half) ** 2, 0.0))
  lateral = jnp.clip((jnp.abs(across) - 0.8 * half_w) / (10.0 * mm + 1e-3), 0.0, 1.0)
  ribs = rib_strength * band * lateral
  return spine + ribs


def _organ_edge(u, qy, qx, size, mm, strength):
  """Heart / diaphragm edge: a smooth large-scale step along a gently curved boundary."""
  k = u((5,))
  th = 2 * jnp.pi * k[0]
  ny, nx = jnp.cos(th), jnp.sin(th)
  oy, ox = (0.2 + 0.6 * k[1]) * size, (0.2 + 0.6 * k[2]) * size
  u = (qy - oy) * ny + (qx - ox) * nx
  v = -(qy - oy) * nx + (qx - ox) * ny
  bend = (k[3] - 0.5) * 3.0 / size
  soft = (5.0 + 10.0 * k[4]) * mm
  return strength * jax.nn.sigmoid((u + bend * v * v) / soft)


# ------------------------------------------------------------------------------------ detector


def _gaussian_blur(x: jax.Array, sigma) -> jax.Array:
  """Separable Gaussian blur of [H, W] with a fixed-size kernel and traced sigma (edge pad);
  sigma -> 0 gives the identity."""
  taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
  w = w / jnp.sum(w)
  h, wd = x.shape
  n = 2 * BLUR_RADIUS + 1
  xp = jnp.pad(x, ((BLUR_RADIUS, BLUR_RADIUS), (0, 0)), mode="edge")
  x = sum(w[k] * xp[k : k + h] for k in range(n))
  xp = jnp.pad(x, ((0, 0), (BLUR_RADIUS, BLUR_RADIUS)), mode="edge")
  return sum(w[k] * xp[:, k : k + wd] for k in range(n))


@functools.cache
def _resample_matrices(size: int):
  """Area-downsampling [n, size] and bilinear upsampling [size, n] matrices, n = ceil(size / 4)."""
  n = -(-size // SCATTER_DOWN)
  down = np.zeros((n, size), np.float32)
  for j in range(size):
    down[j // SCATTER_DOWN, j] = 1.0
  down /= down.sum(axis=1, keepdims=True)
  up = np.zeros((size, n), np.float32)
  centres = (np.arange(n) + 0.5) * SCATTER_DOWN
  for i in range(size):
    pos = np.clip((i + 0.5 - centres[0]) / SCATTER_DOWN, 0.0, n - 1.0)
    j0 = min(int(np.floor(pos)), n - 1)
    j1 = min(j0 + 1, n - 1)
    f = pos - j0
    up[i, j0] += 1.0 - f
    up[i, j1] += f
  return down, up


def _broad_blur(x: jax.Array, sigma_px) -> jax.Array:
  """Cheap very broad blur: area-downsample 4x, Gaussian (matrix, traced sigma), bilinear upsample."""
  down, up = _resample_matrices(x.shape[0])
  n = down.shape[0]
  small = down @ x @ down.T
  idx = jnp.arange(n, dtype=jnp.float32)
  s = jnp.maximum(sigma_px / SCATTER_DOWN, 0.3)
  g = jnp.exp(-0.5 * ((idx[:, None] - idx[None, :]) / s) ** 2)
  g = g / jnp.sum(g, axis=1, keepdims=True)
  return up @ (g @ small @ g.T) @ up.T


def _jpeg(img: jax.Array, quality) -> jax.Array:
  """8x8 block DCT quantization with the JPEG luminance table scaled for ``quality``
  (>= ~99.5 leaves the image unchanged). img in [0, 1]; a side that is not a multiple of 8 is padded
  by repeating the last row / column (as JPEG encoders do) and cropped back."""
  h0, w0 = img.shape
  img = jnp.pad(img, ((0, -h0 % 8), (0, -w0 % 8)), mode="edge")
  h, w = img.shape
  scale = jnp.where(quality < 50.0, 5000.0 / jnp.maximum(quality, 1.0), 200.0 - 2.0 * quality) / 100.0
  step = jnp.asarray(_JPEG_LUMA) * scale  # in 0..255 units
  d = jnp.asarray(_DCT8)
  blocks = (img * 255.0 - 128.0).reshape(h // 8, 8, w // 8, 8)
  coef = jnp.einsum("ij,ajbk,lk->aibl", d, blocks, d)
  step = step[None, :, None, :]
  q = jnp.where(step > 0.5, jnp.round(coef / jnp.maximum(step, 1e-3)) * step, coef)
  out = jnp.einsum("ji,ajbk,kl->aibl", d, q, d).reshape(h, w)
  return (out[:h0, :w0] + 128.0) / 255.0


def _text_overlay(key, u, yy, xx, size):
  """Burned-in text: TEXT_LINES lines of TEXT_CHARS 3x5 block characters near a random corner.
  Returns a {0, 1} map."""
  cell = max(size / 256.0, 0.5)
  cols, rows = 4 * TEXT_CHARS, 5
  bits = jax.random.bernoulli(key, 0.55, (TEXT_LINES, rows, cols))
  bits = bits & (jnp.arange(cols) % 4 != 3)[None, None, :]
  corner = (u((2,)) < 0.5).astype(jnp.float32)
  margin = u((2,), 0.02, 0.05) * size
  width, height = cols * cell, (TEXT_LINES * 7 - 2) * cell
  y0 = margin[0] + corner[0] * (size - 2 * margin[0] - height)
  x0 = margin[1] + corner[1] * (size - 2 * margin[1] - width)
  col = jnp.floor((xx - x0) / cell).astype(jnp.int32)
  r = jnp.floor((yy - y0) / cell).astype(jnp.int32)
  line, row = r // 7, r % 7
  inside = (col >= 0) & (col < cols) & (r >= 0) & (line < TEXT_LINES) & (row < rows)
  flat = bits.reshape(-1)
  gidx = jnp.clip((line * rows + row) * cols + col, 0, flat.shape[0] - 1)
  return (inside & flat[gidx]).astype(jnp.float32)


# ------------------------------------------------------------------------------------ render


def _sample_params(key, site_params):
  missing = [k for k in KNOBS if k not in site_params]
  if missing:
    raise ValueError(f"site_params lacks knobs {missing} (build it with sites.site_table)")
  u = jax.random.uniform(key, (len(KNOBS),))
  return {k: site_params[k][0] + (site_params[k][1] - site_params[k][0]) * u[i] for i, k in enumerate(KNOBS)}


def _subsample_offsets(ss: int) -> np.ndarray:
  """Regular ss x ss sub-pixel offsets [ss^2, 2] and a time fraction in [-0.5, 0.5] for each,
  ordered so neighbouring sub-samples are far apart in time."""
  g = (np.arange(ss) + 0.5) / ss - 0.5
  oy, ox = np.meshgrid(g, g, indexing="ij")
  n = ss * ss
  m = n // 2 + 1
  while np.gcd(m, n) != 1:
    m += 1
  order = (np.arange(n) * m) % n  # a permutation of 0..n-1
  tau = (order + 0.5) / n - 0.5
  return np.stack([oy.ravel(), ox.ravel(), tau], axis=-1).astype(np.float32)


def _check_physics(physics) -> None:
  if physics not in PHYSICS:
    raise ValueError(f"physics must be one of {PHYSICS}, got {physics!r}")


def _detected(clean: jax.Array, key, enoise, blur_sigma, physics: int) -> jax.Array:
  """Detector counts of the expected counts ``clean`` [H, W]: quantum noise (Gaussian approximation of
  Poisson, variance = counts) and the detector's Gaussian PSF blur; electronic noise of sigma ``enoise``
  counts is added after the blur (physics 2: read-out noise is white), or with the quantum noise before it
  (physics 1)."""
  noise = jax.random.normal(key, clean.shape, dtype=jnp.float32)
  if physics >= 2:  # (c)
    counts = _gaussian_blur(jnp.maximum(clean + jnp.sqrt(jnp.maximum(clean, 0.0)) * noise, MIN_COUNTS), blur_sigma)
    return counts + enoise * jax.random.normal(jax.random.fold_in(key, 1), clean.shape, dtype=jnp.float32)
  counts = clean + jnp.sqrt(jnp.maximum(clean, 0.0) + enoise * enoise) * noise
  return _gaussian_blur(jnp.maximum(counts, MIN_COUNTS), blur_sigma)


def render(
  key, site_params, image_size: int, supersample: int = SUPERSAMPLE, field_size: int | None = None, physics: int = 1
):
  """Render one example.

  Args:
    key: PRNG key (see ``example_key``).
    site_params: dict knob -> [2] (lo, hi) float array (one row of ``sites.site_table``), plus an
      optional scalar ``"data_type"`` index into ``sites.DATA_TYPES`` (default 0, catheter_guidewire).
    image_size: static output side length.
    supersample: static device supersampling factor per axis (1..4).
    field_size: static side (px) of the acquisition that ``pixel_spacing`` refers to. None (default):
      the output itself, i.e. a native-resolution field (catheter 3-12 px, wire 0.8-3 px at any output
      size); 512: the output is a downsampled view of a 512 x 512 acquisition (devices shrink with it).
    physics: static forward-model version (``PHYSICS``): 1 as the published tables were made, 2 corrected,
      3 also the device geometry corrected.
  Returns:
    image [H, W, 1] float32 in [0, 1] (8-bit levels; devices dark unless the polarity is flipped),
    mask [H, W] int32 (0 background, 1 catheter, 2 guidewire, 3 vessel).
  """
  if not 1 <= int(supersample) <= MAX_SUPERSAMPLE:
    raise ValueError(f"supersample must be in 1..{MAX_SUPERSAMPLE}, got {supersample}")
  _check_physics(physics)
  size = float(image_size)
  ks = jax.random.split(key, 4)
  p = _sample_params(ks[0], site_params)
  u = _Uniforms(ks[1])
  dtype_idx = jnp.asarray(site_params.get("data_type", 0), jnp.int32)
  flags = jnp.asarray(DATA_TYPE_FLAGS)[dtype_idx]
  has_cath, has_wire, vessel_gain, vessel_labeled = flags[0], flags[1], flags[2], flags[3]
  coin = u((8,))

  ref = float(field_size or image_size) / size
  eff = p["pixel_spacing"] * ref  # mm per output pixel
  mm = 1.0 / eff  # output pixels per mm
  amm = mm * p["anatomy_scale"]  # pixels per anatomical mm

  # --- detector grid and pincushion: detector pixel -> object coordinates
  coords = jnp.arange(image_size, dtype=jnp.float32) + 0.5
  yy, xx = jnp.meshgrid(coords, coords, indexing="ij")
  c = 0.5 * size
  rho2 = ((yy - c) ** 2 + (xx - c) ** 2) / (c * c)
  jac = 1.0 / (1.0 + p["pincushion"] * rho2)  # local object/detector scale
  qy = c + (yy - c) * jac
  qx = c + (xx - c) * jac

  # --- vessel tree (output resolution, union of tapered tubes) and device paths inside it
  n_children = jnp.floor(u((), MIN_CHILDREN, MAX_CHILDREN + 1 - 1e-3)).astype(jnp.int32)
  r_trunk = u((), 1.5, 3.0) * amm
  trunk = _vessel_trunk(u, size, physics)
  trunk_pts = _bezier_at(trunk, jnp.linspace(0.0, 1.0, N_TRUNK))
  dist_c = jnp.sqrt(jnp.sum((trunk_pts - c) ** 2, axis=-1))
  i_c = jnp.argmin(jnp.where(jnp.arange(N_TRUNK) < N_TRUNK - 3, dist_c, jnp.inf))
  t_c = i_c.astype(jnp.float32) / (N_TRUNK - 1)  # catheter tip: trunk point nearest the centre
  s0 = t_c + (0.97 - t_c) * u((), 0.15, 0.6)
  s_child = jnp.concatenate([s0[None], u((MAX_CHILDREN - 1,), 0.2, 0.85)])
  children, (va, vab, vinv, vrad) = _vessel_tree(u, size, trunk, s_child, r_trunk, n_children)
  vr_mask = jnp.maximum(vrad, 0.5)
  v_best, (v_r,) = _nearest_segment(qy, qx, va, vab, vinv, 1.0 / (vr_mask * vr_mask), vrad[:, None])
  v_d2 = v_best * jnp.maximum(v_r, 0.5) ** 2
  v_rr = jnp.maximum(v_r, 0.7)  # area-conserving minimum render radius
  v_mu = p["vessel_contrast"] * vessel_gain / (2.0 * r_trunk) * (v_r / v_rr) ** 2
  L_vessel = v_mu * 2.0 * jnp.sqrt(jnp.maximum(v_rr * v_rr - v_d2, 0.0))

  # --- devices: shapes (random, or inside the vessel tree)
  follow = ((coin[0] < p["vessel_follow"]) & (dist_c[i_c] < 0.2 * size)).astype(jnp.float32)
  offset = u((2,), -0.3, 0.3) * r_trunk
  cath_follow = _bezier_at(trunk, t_c * jnp.linspace(0.0, 1.0, N_BODY)) + offset
  # wire inside: rest of the trunk up to branch 0, then into branch 0
  n_a = N_BODY // 3
  wire_follow = (
    jnp.concatenate(
      [
        _bezier_at(trunk, t_c + (s0 - t_c) * jnp.linspace(0.0, 1.0, n_a + 1)[:-1]),
        _bezier_at(children[0], jnp.linspace(0.0, u((), 0.6, 1.0), N_BODY - n_a)),
      ],
      axis=0,
    )
    + offset
  )

  def tip(lo_mm, hi_mm, lo_turn, hi_turn):
    length = u((), lo_mm, hi_mm) * mm
    turn = u((), lo_turn, hi_turn)
    return length, jnp.where(u(()) < 0.5, turn, -turn)

  j_tip = (u(()) < 0.75).astype(jnp.float32)
  cath_pts = _catheter_curve(u, size, tip(5.0, 12.0, 0.0, 1.5), cath_follow, follow, physics)

  # (e) physics 3: a device that leaves the field leaves it (1, 2: its points were clipped to 2 % inside the edge,
  # so what lay beyond ran along the edge, in the image and the mask); a wire still starts inside the field
  def inside(pts):
    return jnp.clip(pts, 0.02 * size, 0.98 * size)

  if physics < 3:
    cath_pts = inside(cath_pts)
  wtip = tip(6.0, 12.0, 2.5, 3.6)
  wtip = (wtip[0], wtip[1] * j_tip)
  wire_pts = _wire_curve(u, size, inside(cath_pts[-1]), wtip, wire_follow, follow)
  wire2_pts = _wire_curve(u, size, inside(cath_pts[-1]), tip(6.0, 12.0, 0.0, 3.6), wire_follow, 0.0)
  if physics < 3:
    wire_pts, wire2_pts = inside(wire_pts), inside(wire2_pts)
  wire2_on = (coin[1] < p["second_wire"]).astype(jnp.float32)
  wire2_pts = wire2_pts + (1.0 - wire2_on) * FAR

  # --- device sizes (px), clamped at the 512 reference then scaled to the output
  cath_R = 0.5 * jnp.clip(
    p["catheter_french"] / 3.0 * mm, CATHETER_WIDTH_BOUNDS[0] / ref, CATHETER_WIDTH_BOUNDS[1] / ref
  )
  wire_lim = (GUIDEWIRE_WIDTH_BOUNDS[0] / ref, GUIDEWIRE_WIDTH_BOUNDS[1] / ref)
  wire_r = 0.5 * jnp.clip(p["guidewire_inch"] * 25.4 * mm, *wire_lim)
  # (d) physics 2: the second wire is drawn from the site's guidewire range (1: from 0.014-0.035")
  lo_g, hi_g = (0.014, 0.035) if physics < 2 else (site_params["guidewire_inch"][0], site_params["guidewire_inch"][1])
  g2 = u((), lo_g, hi_g)
  wire2_r = 0.5 * jnp.clip(g2 * 25.4 * mm, *wire_lim)
  dc = p["device_contrast"]
  ka = u((8,))
  cath_r_in = cath_R * (0.55 + 0.25 * ka[0])
  cath_peak = dc * (0.25 + 0.3 * ka[1])  # max line integral of the wall
  if physics >= 2:  # (a) the wall material's coefficient: its peak line integral scales with the catheter's size
    cath_peak = cath_peak * p["catheter_french"] / DEVICE_REF_FRENCH
  mu_wall = cath_peak / (2.0 * jnp.sqrt(cath_R * cath_R - cath_r_in * cath_r_in))
  mu_lumen = jnp.where(coin[2] < 0.3, (0.3 + 0.5 * ka[2]) * p["vessel_contrast"] / (2.0 * r_trunk), 0.0)
  mu_lumen = mu_lumen + 0.05 * mu_wall  # lumen is never empty of attenuation
  wire_peak = dc * (0.25 + 0.15 * ka[3])
  coil_peak = dc * (1.0 + 1.0 * ka[4])
  coil_len = (20.0 + 10.0 * ka[5]) * mm

  def wire_segments(pts, radius, on, inch):
    a, ab, inv = _segments(pts)
    coil = (_arc_from_end(pts) <= coil_len).astype(jnp.float32)
    peak = wire_peak + (coil_peak - wire_peak) * coil
    if physics >= 2:  # (a) the wire's and its coil's coefficients: peak line integrals scale with the diameter
      peak = peak * inch / DEVICE_REF_WIRE_INCH
    n = a.shape[0]
    r = jnp.full((n,), radius)
    return jnp.concatenate([a, ab, inv[:, None], r[:, None], (peak * on)[:, None]], axis=-1)

  wire_tab = jnp.concatenate(
    [wire_segments(wire_pts, wire_r, 1.0, p["guidewire_inch"]), wire_segments(wire2_pts, wire2_r, wire2_on, g2)],
    axis=0,
  )
  ca, cab, cinv = _segments(cath_pts)

  c_tab = jnp.concatenate([ca, cab, cinv[:, None]], axis=-1)
  _, c_seg = _nearest_segment(qy, qx, ca, cab, cinv, attrs=c_tab)
  _, w_seg = _nearest_segment(qy, qx, wire_tab[:, 0:2], wire_tab[:, 2:4], wire_tab[:, 4], attrs=wire_tab)
  cvy, cvx, cwy, cwx = _local_frame(qy, qx, c_seg)
  wvy, wvx, wwy, wwx = _local_frame(qy, qx, w_seg)
  c_d2 = cvy * cvy + cvx * cvx
  w_d2 = wvy * wvy + wvx * wvx

  # supersampled, motion-integrated device line integral; min radius one sub-sample spacing
  ss = int(supersample)
  r_floor = 1.0 / ss
  motion = u((), 0.0, 2 * jnp.pi)
  mvec = p["motion_blur"] * jnp.stack([jnp.cos(motion), jnp.sin(motion)])
  c_scale = jnp.maximum(1.0, r_floor / cath_R)
  cR, cr = cath_R * c_scale, cath_r_in * c_scale
  cm_wall, cm_lumen = mu_wall / c_scale**2, mu_lumen / c_scale**2
  w_r = w_seg[5]
  w_scale = jnp.maximum(1.0, r_floor / w_r)
  wR2 = (w_r * w_scale) ** 2
  w_mu = w_seg[6] / (2.0 * w_r) / (w_scale * w_scale)
  L_dev = 0.0  # physics 1: the mean line integral; 2: the mean transmission exp(-L) (b)
  for oy, ox, tau in _subsample_offsets(ss):
    dy = oy * jac + tau * mvec[0]
    dx = ox * jac + tau * mvec[1]
    d2 = (cvy + dy) ** 2 + (cvx + dx) ** 2 - (cwy * dy + cwx * dx) ** 2
    c_out = jnp.sqrt(jnp.maximum(cR * cR - d2, 0.0))
    c_in = jnp.sqrt(jnp.maximum(cr * cr - d2, 0.0))
    L_c = 2.0 * (cm_wall * (c_out - c_in) + cm_lumen * c_in)
    d2w = (wvy + dy) ** 2 + (wvx + dx) ** 2 - (wwy * dy + wwx * dx) ** 2
    L_w = 2.0 * w_mu * jnp.sqrt(jnp.maximum(wR2 - d2w, 0.0))
    if physics >= 2:
      L_dev = L_dev + jnp.exp(-(has_cath * L_c + has_wire * L_w))
    else:
      L_dev = L_dev + has_cath * L_c + has_wire * L_w
  L_dev = L_dev / (ss * ss)
  if physics >= 2:
    L_dev = -jnp.log(L_dev)  # the mean transmission lies in (0, 1]

  # --- anatomy (object coordinates)
  L_anat = (
    _soft_tissue(u, qy, qx, size, amm, p["tissue_strength"])
    + _bones(u, qy, qx, size, amm, p["spine_strength"], p["rib_strength"])
    + _organ_edge(u, qy, qx, size, amm, p["organ_edge"])
  )

  # --- collimator shutters (detector space)
  # every side draws its own depth from the site's range
  lo_sh, hi_sh = site_params["shutter"][0], site_params["shutter"][1]
  frac = lo_sh + (hi_sh - lo_sh) * u((4,))
  blade = jnp.maximum(
    jnp.maximum(jnp.clip(frac[0] * size - yy + 0.5, 0.0, 1.0), jnp.clip(yy - (1.0 - frac[1]) * size + 0.5, 0.0, 1.0)),
    jnp.maximum(jnp.clip(frac[2] * size - xx + 0.5, 0.0, 1.0), jnp.clip(xx - (1.0 - frac[3]) * size + 0.5, 0.0, 1.0)),
  )
  open_field = 1.0 - blade

  # --- detector
  L = L_anat + L_vessel + L_dev + SHUTTER_L * blade
  gain = 1.0 - p["vignetting"] * jnp.minimum(rho2, 2.0) * 0.5
  dose = p["dose"]
  primary = dose * gain * jnp.exp(-L)
  scatter_sigma = (20.0 + 40.0 * coin[3]) * mm
  clean = primary + p["scatter"] * _broad_blur(primary, scatter_sigma)
  counts = _detected(clean, ks[2], p["electronic_noise"], p["blur_sigma"], physics)
  L_obs = -jnp.log(jnp.maximum(counts, MIN_COUNTS) / dose)

  # --- display: window from the noise-free open field, gamma, polarity, text, JPEG, 8 bit
  L_ref = -jnp.log(jnp.maximum(clean, MIN_COUNTS) / dose)
  wsum = jnp.maximum(jnp.sum(open_field), 1.0)
  mean = jnp.sum(open_field * L_ref) / wsum
  std = jnp.sqrt(jnp.sum(open_field * (L_ref - mean) ** 2) / wsum)
  span = jnp.maximum(p["window_width"] * std, WINDOW_MIN_SPAN)
  lo = mean - WINDOW_LEVEL * span
  disp = jnp.clip(1.0 - (L_obs - lo) / span, 0.0, 1.0)
  disp = jnp.power(jnp.maximum(disp, 1e-6), p["gamma"])
  flip = coin[4] < p["polarity_flip"]
  disp = jnp.where(flip, 1.0 - disp, disp)
  text_on = (coin[5] < p["text_overlay"]).astype(jnp.float32)
  disp = jnp.maximum(disp, text_on * _text_overlay(ks[3], u, yy, xx, size))
  disp = _jpeg(disp, p["jpeg_quality"])
  image = jnp.clip(jnp.round(disp * 255.0) / 255.0, 0.0, 1.0).astype(jnp.float32)

  # --- masks at output resolution; wire over catheter over vessel; nothing under the blades
  visible = open_field > 0.5
  wire_in = w_d2 <= jnp.maximum(w_seg[5], 0.5) ** 2
  cath_in = c_d2 <= jnp.maximum(cath_R, 0.5) ** 2
  mask = jnp.where((v_best <= 1.0) & (vessel_labeled > 0.5), VESSEL, BACKGROUND)
  mask = jnp.where(cath_in & (has_cath > 0.5), CATHETER, mask)
  mask = jnp.where(wire_in & (has_wire > 0.5), GUIDEWIRE, mask)
  mask = jnp.where(visible, mask, BACKGROUND).astype(jnp.int32)
  return image[..., None], mask


# Examples rendered per compiled call of the default (sequential) path: the program depends on the image
# size only, not on how many examples a caller asks for, so a run (and the test suite) compiles the
# renderer once per image size instead of once per batch shape (each compile: ~4 s on 2 CPU cores).
RENDER_CHUNK = 16


@functools.partial(jax.jit, static_argnames=("image_size", "supersample", "field_size", "physics"))
def _render_chunk(
  seed, params, sites, indices, split, image_size: int, supersample: int, field_size: int | None, physics: int
):
  """RENDER_CHUNK examples one after another (``lax.map``): example j is ``indices[j]`` of the site keyed
  ``sites[j]``, with that site's profile row ``params[.][j]``."""

  def one(args):
    row, site, index = args
    return render(example_key(seed, site, index, split), row, image_size, supersample, field_size, physics)

  return jax.lax.map(one, (params, sites, indices))


@functools.partial(jax.jit, static_argnames=("image_size", "split", "supersample", "field_size", "physics"))
def _generate_vectorized(
  seed, table, site_ids, key_ids, indices, image_size: int, split: int, supersample: int, field_size, physics: int
):
  def one(site, key_id, index):
    params = jax.tree_util.tree_map(lambda a: a[site], table)
    return render(example_key(seed, key_id, index, split), params, image_size, supersample, field_size, physics)

  return jax.vmap(lambda s, k, row: jax.vmap(lambda i: one(s, k, i))(row))(site_ids, key_ids, indices)


def generate(
  seed: int,
  table,
  site_ids,
  indices,
  image_size: int,
  split: int = 0,
  vectorized: bool = False,
  supersample: int = SUPERSAMPLE,
  field_size: int | None = None,
  key_ids=None,
  physics: int = 1,
):
  """Render a [C, N] grid of examples: client c gets examples ``indices[c]`` of site
  ``site_ids[c]`` (``table`` from ``sites.site_table``).

  ``key_ids[c]`` (default ``site_ids[c]``) is the site number in the examples' PRNG keys: the row of
  ``table`` says how a site images, the key which images it draws. The unseen site of a run is keyed
  ``sites.UNSEEN_KEY`` whatever its row, so its images do not depend on the number of clients.

  Returns images [C, N, H, W, 1] float32 and masks [C, N, H, W] int32.

  By default examples are rendered one after another (``lax.map``) by a single compiled
  per-example body, RENDER_CHUNK examples per call, so an example is bitwise identical whatever batch
  it is generated in and one program serves every batch shape of an image size.
  ``vectorized=True`` vmaps over sites and indices instead (faster on CPU), but XLA then fuses
  differently per batch shape and images can differ slightly between batches.
  """
  site_ids, indices = np.asarray(site_ids), np.asarray(indices)
  key_ids = site_ids if key_ids is None else np.asarray(key_ids)
  for name, a in (("site_ids", site_ids), ("key_ids", key_ids), ("indices", indices)):
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > np.iinfo(np.int32).max):
      raise ValueError(
        f"{name} must be integers in 0..2**31-1 (they seed int32 example keys), got {a.min()}..{a.max()}"
      )
  site_ids, key_ids, indices = site_ids.astype(np.int32), key_ids.astype(np.int32), indices.astype(np.int32)
  if (
    site_ids.ndim != 1 or indices.ndim != 2 or indices.shape[0] != site_ids.shape[0] or key_ids.shape != site_ids.shape
  ):
    raise ValueError(
      f"expected site_ids [C], key_ids [C] and indices [C, N], got {site_ids.shape}, {key_ids.shape}, {indices.shape}"
    )
  _check_physics(physics)
  seed = jnp.asarray(seed, dtype=jnp.uint32)
  image_size, supersample = int(image_size), int(supersample)
  field_size = int(field_size) if field_size else None
  if vectorized:
    return _generate_vectorized(
      seed,
      table,
      jnp.asarray(site_ids),
      jnp.asarray(key_ids),
      jnp.asarray(indices),
      image_size=image_size,
      split=int(split),
      supersample=supersample,
      field_size=field_size,
      physics=physics,
    )
  c, n = indices.shape
  if c * n == 0:
    return jnp.zeros((c, n, image_size, image_size, 1), jnp.float32), jnp.zeros(
      (c, n, image_size, image_size), jnp.int32
    )
  sites, keys = np.repeat(site_ids, n), np.repeat(key_ids, n)
  flat = indices.reshape(-1)
  pad = -len(flat) % RENDER_CHUNK  # the last chunk is filled with repeats of the last example, then dropped
  sites, keys, flat = (np.pad(a, (0, pad), mode="edge") for a in (sites, keys, flat))
  rows = {k: np.asarray(v)[sites] for k, v in table.items()}  # host gather (site_table holds numpy)
  split = jnp.asarray(split, jnp.int32)
  images, masks = [], []
  for lo in range(0, len(flat), RENDER_CHUNK):
    part = slice(lo, lo + RENDER_CHUNK)
    im, m = _render_chunk(
      seed,
      {k: v[part] for k, v in rows.items()},
      keys[part],
      flat[part],
      split,
      image_size=image_size,
      supersample=supersample,
      field_size=field_size,
      physics=physics,
    )
    images.append(im)
    masks.append(m)
  images = images[0] if len(images) == 1 else jnp.concatenate(images)
  masks = masks[0] if len(masks) == 1 else jnp.concatenate(masks)
  return (
    images[: c * n].reshape(c, n, image_size, image_size, 1),
    masks[: c * n].reshape(c, n, image_size, image_size),
  )
