"""Synthetic X-ray fluoroscopy frames with catheter and guidewire masks, rendered in JAX.

Forward model (line-integral domain):
    L = tissue + vessels + catheter + guidewire (+ vignetting)
    counts = dose * exp(-L);  counts_noisy = counts + sqrt(counts) * N(0, 1)   (Poisson approx.)
    counts_blur = GaussianBlur(counts_noisy, sigma)
    image = 1 - (-log(counts_blur / dose) + OFFSET) / L_RANGE, clipped to [0, 1]
Devices are dark on a bright background. Each tube (vessel, catheter, wire) is a cubic Bezier
centreline sampled as a polyline; it contributes mu * chord(d) with chord = 2 sqrt(r^2 - d^2)
(hollow catheter: annulus chord).

Everything is a pure function of a PRNG key derived from (seed, split, site, index), so an
example is identical regardless of which batch it is generated in.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fedkd.data.sites import CATHETER_WIDTH_BOUNDS, GUIDEWIRE_WIDTH_BOUNDS, KNOBS

N_POINTS = 32          # polyline points per curve (31 segments)
MAX_VESSELS = 3
N_BLOBS = 8            # Gaussian blobs in the soft-tissue background
BLUR_RADIUS = 6        # blur kernel taps = 2 * radius + 1 (covers sigma <= 2)
L_OFFSET = 0.2         # fixed display mapping: image = 1 - (L + L_OFFSET) / L_RANGE
L_RANGE = 3.2
MIN_COUNTS = 0.5

BACKGROUND, CATHETER, GUIDEWIRE = 0, 1, 2


def example_key(seed, site, index, split) -> jax.Array:
    """PRNG key for one example: fold_in chain of (seed, split, site, index); traceable."""
    key = jax.random.PRNGKey(seed)
    key = jax.random.fold_in(key, split)
    key = jax.random.fold_in(key, site)
    return jax.random.fold_in(key, index)


def _bezier(ctrl: jax.Array) -> jax.Array:
    """Cubic Bezier [4, 2] control points -> [N_POINTS, 2] polyline."""
    t = jnp.linspace(0.0, 1.0, N_POINTS)[:, None]
    s = 1.0 - t
    # explicit multiply-add (no matmul): bitwise reproducible under any vmap batch size
    return (s * s * s * ctrl[0] + 3.0 * s * s * t * ctrl[1]
            + 3.0 * s * t * t * ctrl[2] + t * t * t * ctrl[3])


def _polyline_distance(pix: jax.Array, pts: jax.Array) -> jax.Array:
    """Distance from pixels [P, 2] to the polyline [N_POINTS, 2] -> [P].

    Running elementwise minimum over the (few) segments instead of a fused [P, S] reduction:
    faster on CPU and bitwise identical whatever the vmap batch size (a fused reduce was not).
    """
    a = pts[:-1]
    ab = pts[1:] - a
    inv = 1.0 / jnp.maximum(jnp.sum(ab * ab, axis=-1), 1e-6)
    py, px = pix[:, 0], pix[:, 1]
    best = None
    for i in range(a.shape[0]):
        apy = py - a[i, 0]
        apx = px - a[i, 1]
        t = jnp.clip((apy * ab[i, 0] + apx * ab[i, 1]) * inv[i], 0.0, 1.0)
        dy = apy - t * ab[i, 0]
        dx = apx - t * ab[i, 1]
        d2 = dy * dy + dx * dx
        best = d2 if best is None else jnp.minimum(best, d2)
    return jnp.sqrt(best)


def _chord(r, d):
    return 2.0 * jnp.sqrt(jnp.maximum(r * r - d * d, 0.0))


def _tube(d, radius, peak):
    """Solid tube with given peak line integral; radius floored at 1 px for rendering
    (attenuation area conserved) so thin wires do not alias into dotted lines."""
    mu = peak / (2.0 * radius)
    r_render = jnp.maximum(radius, 1.0)
    mu_render = mu * (radius / r_render) ** 2
    return mu_render * _chord(r_render, d)


def _gaussian_blur(x: jax.Array, sigma) -> jax.Array:
    """Separable Gaussian blur of [H, W] with a fixed-size kernel and traced sigma (edge pad)."""
    taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (taps / sigma) ** 2)
    w = w / jnp.sum(w)
    h, wd = x.shape
    n = 2 * BLUR_RADIUS + 1
    xp = jnp.pad(x, ((BLUR_RADIUS, BLUR_RADIUS), (0, 0)), mode="edge")
    x = sum(w[k] * xp[k:k + h] for k in range(n))
    xp = jnp.pad(x, ((0, 0), (BLUR_RADIUS, BLUR_RADIUS)), mode="edge")
    return sum(w[k] * xp[:, k:k + wd] for k in range(n))


def _sample_params(key, site_params):
    u = jax.random.uniform(key, (len(KNOBS),))
    return {k: site_params[k][0] + (site_params[k][1] - site_params[k][0]) * u[i]
            for i, k in enumerate(KNOBS)}


def _device_curves(key, size: float):
    """Catheter enters near the FOV edge and ends near the centre; the guidewire leaves the
    catheter tip towards the opposite side. Control points stay in [0.1, 0.9] * size, so the
    Bezier curves (inside their control hull) stay in the field of view."""
    k = jax.random.split(key, 8)
    c = 0.5 * size
    th0 = jax.random.uniform(k[0], (), minval=0.0, maxval=2 * jnp.pi)
    r0 = jax.random.uniform(k[1], (), minval=0.33, maxval=0.4) * size
    p0 = c + r0 * jnp.stack([jnp.cos(th0), jnp.sin(th0)])
    th3 = th0 + jnp.pi + jax.random.uniform(k[2], (), minval=-0.9, maxval=0.9)
    r3 = jax.random.uniform(k[3], (), minval=0.0, maxval=0.12) * size
    p3 = c + r3 * jnp.stack([jnp.cos(th3), jnp.sin(th3)])
    mid = jax.random.uniform(k[4], (2, 2), minval=0.15, maxval=0.85) * size
    cath = jnp.concatenate([p0[None], mid, p3[None]], axis=0)
    # guidewire: start at the catheter tip, leave roughly along the catheter direction
    thw = th3 + jax.random.uniform(k[5], (), minval=-0.8, maxval=0.8)
    rw = jax.random.uniform(k[6], (), minval=0.28, maxval=0.38) * size
    q3 = c + rw * jnp.stack([jnp.cos(thw), jnp.sin(thw)])
    qmid = jax.random.uniform(k[7], (2, 2), minval=0.15, maxval=0.85) * size
    # pull the wire's first inner control point towards the segment p3->q3 for a smooth exit
    q1 = 0.5 * qmid[0] + 0.5 * (p3 + 0.33 * (q3 - p3))
    wire = jnp.stack([p3, q1, qmid[1], q3], axis=0)
    lo, hi = 0.1 * size, 0.9 * size
    return jnp.clip(_bezier(cath), lo, hi), jnp.clip(_bezier(wire), lo, hi)


def _vessel_curves(key, size: float):
    """MAX_VESSELS curves crossing the field of view (may leave it)."""
    k = jax.random.split(key, 2)
    ends = jax.random.uniform(k[0], (MAX_VESSELS, 2), minval=0.0, maxval=2 * jnp.pi)
    c = 0.5 * size
    r = 0.6 * size
    p0 = c + r * jnp.stack([jnp.cos(ends[:, 0]), jnp.sin(ends[:, 0])], axis=-1)
    p3 = c + r * jnp.stack([jnp.cos(ends[:, 1]), jnp.sin(ends[:, 1])], axis=-1)
    mid = jax.random.uniform(k[1], (MAX_VESSELS, 2, 2), minval=0.1, maxval=0.9) * size
    ctrl = jnp.concatenate([p0[:, None], mid, p3[:, None]], axis=1)
    return jax.vmap(_bezier)(ctrl)


def _tissue(key, yy, xx, size: float, fov, strength):
    """Low-frequency soft tissue: sum of Gaussian blobs plus a gentle gradient, in [0, ~1]*strength."""
    k = jax.random.split(key, 4)
    centres = jax.random.uniform(k[0], (N_BLOBS, 2), minval=-0.1, maxval=1.1) * size
    sig = jax.random.uniform(k[1], (N_BLOBS,), minval=0.08, maxval=0.3) * size * fov
    amp = jax.random.uniform(k[2], (N_BLOBS,), minval=0.2, maxval=1.0)
    d2 = ((yy[None] - centres[:, 0, None, None]) ** 2
          + (xx[None] - centres[:, 1, None, None]) ** 2)
    blobs = jnp.sum(amp[:, None, None] * jnp.exp(-0.5 * d2 / (sig[:, None, None] ** 2)), axis=0)
    blobs = blobs / (1.0 + blobs)        # soft saturation keeps it in [0, 1)
    g = jax.random.uniform(k[3], (2,), minval=-0.3, maxval=0.3)
    grad = 0.5 + g[0] * (yy / size - 0.5) + g[1] * (xx / size - 0.5)
    return strength * (0.7 * blobs + 0.3 * grad)


def render(key, site_params, image_size: int):
    """Render one example.

    Args:
      key: PRNG key (see ``example_key``).
      site_params: dict knob -> [2] (lo, hi) float array (one row of ``site_table``).
      image_size: static output side length.
    Returns:
      image [H, W, 1] float32 in [0, 1] (devices dark), mask [H, W] int32 (0 bg, 1 cath, 2 wire).
    """
    size = float(image_size)
    ks = jax.random.split(key, 10)
    p = _sample_params(ks[0], site_params)
    fov = p["fov_scale"]
    anat = fov * size / 128.0  # anatomy scale

    coords = jnp.arange(image_size, dtype=jnp.float32) + 0.5
    yy, xx = jnp.meshgrid(coords, coords, indexing="ij")
    pix = jnp.stack([yy.ravel(), xx.ravel()], axis=-1)

    cath_pts, wire_pts = _device_curves(ks[1], size)
    vessel_pts = _vessel_curves(ks[2], size)
    curves = jnp.concatenate([cath_pts[None], wire_pts[None], vessel_pts], axis=0)
    dist = jax.vmap(lambda c: _polyline_distance(pix, c))(curves)
    dist = dist.reshape(2 + MAX_VESSELS, image_size, image_size)
    d_cath, d_wire, d_vessels = dist[0], dist[1], dist[2:]

    # --- device geometry (rendered widths clipped to the global bounds)
    cath_r = 0.5 * jnp.clip(p["catheter_width"] * fov, *CATHETER_WIDTH_BOUNDS)
    wire_r = 0.5 * jnp.clip(p["guidewire_width"] * fov, *GUIDEWIRE_WIDTH_BOUNDS)

    # --- attenuation
    kd = jax.random.split(ks[3], 4)
    dc = p["device_contrast"]
    hollow = jax.random.bernoulli(kd[0], 0.6)
    r_in = cath_r * jax.random.uniform(kd[1], (), minval=0.5, maxval=0.75) * hollow
    cath_peak = dc * jax.random.uniform(kd[2], (), minval=0.4, maxval=0.7)
    mu_wall = cath_peak / (2.0 * cath_r)
    mu_lumen = mu_wall * jax.random.uniform(kd[3], (), minval=0.0, maxval=0.4)
    L_cath = mu_wall * (_chord(cath_r, d_cath) - _chord(r_in, d_cath)) + mu_lumen * _chord(r_in, d_cath)
    wire_peak = dc * jax.random.uniform(ks[4], (), minval=0.45, maxval=0.8)
    L_wire = _tube(d_wire, wire_r, wire_peak)

    kv = jax.random.split(ks[5], 3)
    n_vessels = jax.random.randint(kv[0], (), 1, MAX_VESSELS + 1)
    active = (jnp.arange(MAX_VESSELS) < n_vessels).astype(jnp.float32)
    v_r = jax.random.uniform(kv[1], (MAX_VESSELS,), minval=2.5, maxval=6.0) * anat
    v_peak = p["vessel_contrast"] * jax.random.uniform(kv[2], (MAX_VESSELS,), minval=0.6, maxval=1.0)
    L_vessels = jnp.sum(
        active[:, None, None] * _tube(d_vessels, v_r[:, None, None], v_peak[:, None, None]), axis=0)

    L_tissue = _tissue(ks[6], yy, xx, size, fov, p["tissue_strength"])
    rr2 = ((yy - 0.5 * size) ** 2 + (xx - 0.5 * size) ** 2) / (0.5 * size) ** 2
    L_vignette = -jnp.log1p(-p["vignetting"] * jnp.minimum(rr2, 2.0) / 2.0)

    L = L_tissue + L_vessels + L_cath + L_wire + L_vignette

    # --- detector: quantum noise, blur, log
    dose = p["dose"]
    counts = dose * jnp.exp(-L)
    noise = jax.random.normal(ks[7], L.shape, dtype=jnp.float32)
    counts = jnp.maximum(counts + jnp.sqrt(counts) * noise, MIN_COUNTS)
    counts = _gaussian_blur(counts, p["blur_sigma"])
    L_obs = -jnp.log(jnp.maximum(counts, MIN_COUNTS) / dose)
    image = jnp.clip(1.0 - (L_obs + L_OFFSET) / L_RANGE, 0.0, 1.0).astype(jnp.float32)

    # --- masks: distance to centreline <= max(radius, 0.5); guidewire wins
    mask = jnp.where(d_cath <= jnp.maximum(cath_r, 0.5), CATHETER, BACKGROUND)
    mask = jnp.where(d_wire <= jnp.maximum(wire_r, 0.5), GUIDEWIRE, mask).astype(jnp.int32)
    return image[..., None], mask


@functools.partial(jax.jit, static_argnames=("image_size", "split", "vectorized"))
def _generate(seed, table, site_ids, indices, image_size: int, split: int, vectorized: bool):
    def one(site, index):
        params = jax.tree_util.tree_map(lambda a: a[site], table)
        return render(example_key(seed, site, index, split), params, image_size)

    if vectorized:
        return jax.vmap(lambda s, row: jax.vmap(lambda i: one(s, i))(row))(site_ids, indices)
    c, n = indices.shape
    sites = jnp.broadcast_to(site_ids[:, None], (c, n)).reshape(-1)
    images, masks = jax.lax.map(lambda si: one(*si), (sites, indices.reshape(-1)))
    return (images.reshape(c, n, image_size, image_size, 1),
            masks.reshape(c, n, image_size, image_size))


def generate(seed: int, table, site_ids, indices, image_size: int, split: int = 0,
             vectorized: bool = False):
    """Render a [C, N] grid of examples: client c gets examples ``indices[c]`` of site
    ``site_ids[c]`` (``table`` from ``sites.site_table``).

    Returns images [C, N, H, W, 1] float32 and masks [C, N, H, W] int32.

    By default examples are rendered one after another (``lax.map``) by a single compiled
    per-example body, so an example is bitwise identical whatever batch it is generated in.
    ``vectorized=True`` vmaps over sites and indices instead (about 3x faster on CPU), but XLA
    then fuses differently per batch shape and images can differ by ~1 ulp between batches.
    """
    site_ids = jnp.asarray(site_ids, dtype=jnp.int32)
    indices = jnp.asarray(indices, dtype=jnp.int32)
    if site_ids.ndim != 1 or indices.ndim != 2 or indices.shape[0] != site_ids.shape[0]:
        raise ValueError(f"expected site_ids [C] and indices [C, N], got {site_ids.shape}, "
                         f"{indices.shape}")
    seed = jnp.asarray(seed, dtype=jnp.uint32)
    return _generate(seed, table, site_ids, indices, image_size=int(image_size),
                     split=int(split), vectorized=bool(vectorized))
