"""Simulated hospital profiles for synthetic catheter/guidewire X-ray data.

Every knob is a ``(lo, hi)`` range; each rendered image draws its own value uniformly from it.
Sites differ in dose (quantum noise), blur, device widths, contrast, anatomy and field of view,
so the data across federated clients is non-IID.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

# Global bounds on the *rendered* device full widths in pixels (after fov_scale).
CATHETER_WIDTH_BOUNDS = (3.0, 12.0)
GUIDEWIRE_WIDTH_BOUNDS = (1.0, 3.0)

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class SiteProfile:
    """One simulated hospital. All knobs are (lo, hi) ranges sampled uniformly per image.

    dose:             background counts per pixel (I0), sets the quantum noise level.
    blur_sigma:       Gaussian PSF sigma in pixels.
    catheter_width:   catheter full width in px before fov_scale (rendered width clipped to 3..12).
    guidewire_width:  guidewire full width in px before fov_scale (rendered width clipped to 1..3).
    vessel_contrast:  peak line integral of a contrast-filled vessel.
    tissue_strength:  amplitude (line integral) of the low-frequency soft-tissue background.
    fov_scale:        zoom factor; multiplies device widths and anatomy size.
    device_contrast:  multiplier on catheter/guidewire attenuation.
    vignetting:       radial falloff of counts at the corners (image-intensifier look), 0 = none.
    """

    name: str
    dose: Range
    blur_sigma: Range
    catheter_width: Range
    guidewire_width: Range
    vessel_contrast: Range
    tissue_strength: Range
    fov_scale: Range
    device_contrast: Range
    vignetting: Range


KNOBS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SiteProfile) if f.name != "name")

BASE_SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="flatpanel_cine_low_noise",
        dose=(1000.0, 2000.0), blur_sigma=(0.4, 0.8), catheter_width=(5.0, 8.0),
        guidewire_width=(1.5, 2.5), vessel_contrast=(0.3, 0.7), tissue_strength=(0.3, 0.6),
        fov_scale=(1.0, 1.0), device_contrast=(0.9, 1.1), vignetting=(0.0, 0.0)),
    SiteProfile(
        name="image_intensifier_fluoro_noisy",
        dose=(50.0, 150.0), blur_sigma=(0.5, 0.9), catheter_width=(4.0, 7.0),
        guidewire_width=(1.0, 2.0), vessel_contrast=(0.2, 0.5), tissue_strength=(0.4, 0.8),
        fov_scale=(0.9, 1.1), device_contrast=(0.8, 1.0), vignetting=(0.15, 0.3)),
    SiteProfile(
        name="low_dose_blurry",
        dose=(50.0, 120.0), blur_sigma=(1.4, 2.0), catheter_width=(5.0, 9.0),
        guidewire_width=(1.5, 2.5), vessel_contrast=(0.2, 0.4), tissue_strength=(0.5, 1.0),
        fov_scale=(1.0, 1.2), device_contrast=(0.7, 0.9), vignetting=(0.0, 0.1)),
    SiteProfile(
        name="high_contrast",
        dose=(400.0, 900.0), blur_sigma=(0.5, 0.9), catheter_width=(6.0, 9.0),
        guidewire_width=(2.0, 2.6), vessel_contrast=(0.7, 1.0), tissue_strength=(0.2, 0.4),
        fov_scale=(1.1, 1.3), device_contrast=(1.2, 1.5), vignetting=(0.0, 0.0)),
    SiteProfile(
        name="thin_devices",
        dose=(300.0, 700.0), blur_sigma=(0.5, 1.0), catheter_width=(3.5, 5.0),
        guidewire_width=(1.0, 1.5), vessel_contrast=(0.3, 0.6), tissue_strength=(0.3, 0.7),
        fov_scale=(0.85, 0.95), device_contrast=(0.9, 1.1), vignetting=(0.0, 0.05)),
)

UNSEEN_SITE = SiteProfile(
    name="unseen_mobile_c_arm",
    dose=(150.0, 500.0), blur_sigma=(1.0, 1.6), catheter_width=(4.0, 8.0),
    guidewire_width=(1.0, 2.5), vessel_contrast=(0.4, 0.8), tissue_strength=(0.6, 1.2),
    fov_scale=(0.9, 1.2), device_contrast=(0.8, 1.2), vignetting=(0.1, 0.2))

# Hard limits used when perturbing profiles (widths here are pre-fov_scale values).
_KNOB_LIMITS: dict[str, Range] = {
    "dose": (20.0, 5000.0),
    "blur_sigma": (0.3, 2.5),
    "catheter_width": CATHETER_WIDTH_BOUNDS,
    "guidewire_width": GUIDEWIRE_WIDTH_BOUNDS,
    "vessel_contrast": (0.05, 1.2),
    "tissue_strength": (0.0, 1.5),
    "fov_scale": (0.7, 1.4),
    "device_contrast": (0.5, 2.0),
    "vignetting": (0.0, 0.4),
}


def _perturb(base: SiteProfile, client: int) -> SiteProfile:
    """Deterministic mild (+-12%) multiplicative jitter of every range, per client index."""
    rng = np.random.default_rng(10_007 + client)
    new = {}
    for knob in KNOBS:
        lo, hi = getattr(base, knob)
        f = rng.uniform(0.88, 1.12, size=2)
        lo2, hi2 = lo * f[0], hi * f[1]
        if lo == hi:  # keep fixed knobs fixed (but moved)
            hi2 = lo2
        lim_lo, lim_hi = _KNOB_LIMITS[knob]
        lo2, hi2 = float(np.clip(lo2, lim_lo, lim_hi)), float(np.clip(hi2, lim_lo, lim_hi))
        if hi2 < lo2:
            lo2, hi2 = hi2, lo2
        new[knob] = (lo2, hi2)
    return SiteProfile(name=f"{base.name}_c{client}", **new)


def make_sites(num_clients: int) -> tuple[list[SiteProfile], SiteProfile]:
    """One profile per client plus one held-out ``unseen`` profile.

    Client i uses base hospital ``i % n_base``. The first n_base clients get the bases
    unchanged; later ones get a deterministic mild perturbation so every client differs.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    n_base = len(BASE_SITES)
    profiles = []
    for i in range(num_clients):
        base = BASE_SITES[i % n_base]
        profiles.append(base if i < n_base else _perturb(base, i))
    return profiles, UNSEEN_SITE


def site_table(profiles) -> dict[str, jnp.ndarray]:
    """Stack profiles into ``{knob: float32 [n_sites, 2] (lo, hi)}`` for indexing inside jit."""
    profiles = list(profiles)
    if not profiles:
        raise ValueError("need at least one profile")
    return {
        knob: jnp.asarray(np.array([getattr(p, knob) for p in profiles], dtype=np.float32))
        for knob in KNOBS
    }
