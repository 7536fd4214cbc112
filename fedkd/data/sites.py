"""Simulated hospitals for synthetic X-ray fluoroscopy (generator v2, see ``fedkd.data.synth``).

A hospital (``SiteProfile``) is a distribution over imaging knobs: every knob is a ``(lo, hi)`` range
and each rendered image draws its own value uniformly from it. Probability knobs (``polarity_flip``,
``text_overlay``, ``second_wire``, ``vessel_follow``) draw a probability from the range and then a coin.
Sites differ in detector (flat panel / image intensifier), dose, blur, scatter, pixel spacing, anatomy,
artefacts and display processing, so the data of federated clients is non-IID.

Each site also has a ``data_type`` (what is visible and labeled):

  "catheter_guidewire" (default) catheter (1) + guidewire(s) (2); faint vessels, not labeled
  "catheter"           catheter (1) only; faint vessels, not labeled
  "vessel"             angiography: strong contrast vessel tree (3), no devices
  "all"                catheter (1), guidewire (2) and strong vessels (3)

Physical sizes: ``pixel_spacing`` is mm per pixel of the acquisition field, ``field_size`` px wide
(``synth.render``; ``config.data.synthetic_field_size``). By default the field is the output itself, so a
catheter is 3-12 px and a wire 0.8-3 px at any output size; with ``field_size=512`` a smaller output is a
downsampled view of a 512 px field (effective spacing = spacing * 512 / size, devices shrink with it).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math

import numpy as np

from fedkd.data.labels import BACKGROUND, CATHETER, CLASS_NAMES, GUIDEWIRE, VESSEL  # noqa: F401 - re-exported

DATA_TYPES = ("catheter_guidewire", "catheter", "vessel", "all")
DEFAULT_DATA_TYPE = "catheter_guidewire"
# Per data type: (catheter on, guidewire on, vessel contrast gain, vessels labeled), indexed like DATA_TYPES.
DATA_TYPE_FLAGS = np.array(
  [
    [1.0, 1.0, 0.3, 0.0],  # catheter_guidewire: faint unlabeled vessels (v1 behaviour)
    [1.0, 0.0, 0.3, 0.0],  # catheter
    [0.0, 0.0, 1.0, 1.0],  # vessel
    [1.0, 1.0, 1.0, 1.0],  # all
  ],
  dtype=np.float32,
)

REFERENCE_SIZE = 512
# Clamps on the rendered device full widths, in pixels of the acquisition field (scaled to the output size).
CATHETER_WIDTH_BOUNDS = (3.0, 12.0)
GUIDEWIRE_WIDTH_BOUNDS = (0.8, 3.0)

Range = tuple[float, float]

# knob -> (hard lower limit, hard upper limit, meaning). Profiles must stay inside the limits.
KNOB_INFO: dict[str, tuple[float, float, str]] = {
  "dose": (20.0, 2e5, "open-field counts per output pixel (quantum noise; >= 1e4 is ~noise free)"),
  "electronic_noise": (0.0, 10.0, "Gaussian detector noise sigma in counts, added before the log"),
  "blur_sigma": (0.0, 2.5, "Gaussian PSF sigma in output pixels"),
  "scatter": (0.0, 2.0, "scatter-to-primary ratio (broad blurred primary added to the primary)"),
  "pixel_spacing": (0.1, 0.6, "mm per pixel of the acquisition field (default: the output itself)"),
  "catheter_french": (4.0, 8.0, "catheter outer diameter in French (1 F = 1/3 mm)"),
  "guidewire_inch": (0.010, 0.040, "guidewire diameter in inches"),
  "device_contrast": (0.3, 2.5, "multiplier on catheter / guidewire attenuation"),
  "vessel_contrast": (0.0, 1.5, "peak line integral of the contrast-filled trunk vessel"),
  "tissue_strength": (0.0, 1.5, "line integral amplitude of the low-frequency soft tissue"),
  "spine_strength": (0.0, 1.5, "line integral of the vertebral bodies"),
  "rib_strength": (0.0, 1.0, "line integral of the ribs"),
  "organ_edge": (0.0, 1.0, "line integral step of the heart / diaphragm edge"),
  "anatomy_scale": (0.4, 2.0, "multiplier on anatomical sizes in mm (animal, patient size)"),
  "vignetting": (0.0, 0.5, "fraction of counts lost at the corners (image intensifier)"),
  "pincushion": (0.0, 0.08, "radial distortion k1 (image intensifier)"),
  "shutter": (0.0, 0.3, "collimator shutter depth per side, fraction of the field"),
  "motion_blur": (0.0, 4.0, "device motion during the pulse, output pixels"),
  "window_width": (1.0, 8.0, "display window span in standard deviations of the line integral"),
  "gamma": (0.5, 2.0, "display gamma"),
  "polarity_flip": (0.0, 1.0, "probability the display is inverted (devices bright)"),
  "text_overlay": (0.0, 1.0, "probability of burned-in text blocks near a corner"),
  "jpeg_quality": (20.0, 100.0, "JPEG quality of the 8x8 DCT quantization (100 = none)"),
  "second_wire": (0.0, 1.0, "probability of a second guidewire"),
  "vessel_follow": (0.0, 1.0, "probability that devices follow the vessel tree"),
}
KNOBS: tuple[str, ...] = tuple(KNOB_INFO)
PROBABILITY_KNOBS = ("polarity_flip", "text_overlay", "second_wire", "vessel_follow")


@dataclasses.dataclass(frozen=True)
class SiteProfile:
  """One simulated hospital: ``name``, a ``(lo, hi)`` range for every knob of ``KNOB_INFO`` and the
  ``data_type`` (one of ``DATA_TYPES``). Values are validated on construction."""

  name: str
  dose: Range
  electronic_noise: Range
  blur_sigma: Range
  scatter: Range
  pixel_spacing: Range
  catheter_french: Range
  guidewire_inch: Range
  device_contrast: Range
  vessel_contrast: Range
  tissue_strength: Range
  spine_strength: Range
  rib_strength: Range
  organ_edge: Range
  anatomy_scale: Range
  vignetting: Range
  pincushion: Range
  shutter: Range
  motion_blur: Range
  window_width: Range
  gamma: Range
  polarity_flip: Range
  text_overlay: Range
  jpeg_quality: Range
  second_wire: Range
  vessel_follow: Range
  data_type: str = DEFAULT_DATA_TYPE

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"SiteProfile.name must be a non-empty string, got {self.name!r}")
    if self.data_type not in DATA_TYPES:
      raise ValueError(f"site {self.name!r}: unknown data_type {self.data_type!r}; use one of {DATA_TYPES}")
    for knob, (lim_lo, lim_hi, _) in KNOB_INFO.items():
      value = getattr(self, knob)
      try:
        lo, hi = (float(v) for v in value)
      except (TypeError, ValueError):
        raise ValueError(f"site {self.name!r}: {knob} must be a (lo, hi) pair of numbers, got {value!r}") from None
      if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"site {self.name!r}: {knob}=({lo}, {hi}) must be finite")
      if lo > hi:
        raise ValueError(f"site {self.name!r}: {knob}=({lo}, {hi}) has lo > hi")
      if lo < lim_lo or hi > lim_hi:
        raise ValueError(
          f"site {self.name!r}: {knob}=({lo}, {hi}) is outside the allowed [{lim_lo}, {lim_hi}] ({KNOB_INFO[knob][2]})"
        )
      object.__setattr__(self, knob, (lo, hi))


def with_data_type(profile: SiteProfile, data_type: str) -> SiteProfile:
  """The same hospital with another data type (validated)."""
  return dataclasses.replace(profile, data_type=data_type)


def _site(name, **knobs) -> SiteProfile:
  return SiteProfile(name=name, **knobs)


# Shared defaults of the base sites; each site overrides what makes it distinct.
_COMMON = dict(
  dose=(300.0, 800.0),
  electronic_noise=(1.0, 3.0),
  blur_sigma=(0.5, 1.0),
  scatter=(0.3, 0.8),
  pixel_spacing=(0.25, 0.35),
  catheter_french=(5.0, 7.0),
  guidewire_inch=(0.014, 0.035),
  device_contrast=(0.9, 1.2),
  vessel_contrast=(0.5, 0.9),
  tissue_strength=(0.3, 0.6),
  spine_strength=(0.25, 0.5),
  rib_strength=(0.08, 0.2),
  organ_edge=(0.2, 0.5),
  anatomy_scale=(0.9, 1.1),
  vignetting=(0.0, 0.0),
  pincushion=(0.0, 0.0),
  shutter=(0.0, 0.1),
  motion_blur=(0.0, 1.0),
  window_width=(3.0, 4.0),
  gamma=(0.9, 1.1),
  polarity_flip=(0.0, 0.0),
  text_overlay=(0.3, 0.3),
  jpeg_quality=(100.0, 100.0),
  second_wire=(0.2, 0.2),
  vessel_follow=(0.6, 0.6),
)


def _make(name, **overrides) -> SiteProfile:
  return _site(name, **{**_COMMON, **overrides})


BASE_SITES: tuple[SiteProfile, ...] = (
  # Cardiac flat panel, 1024^2 cine: its native fine spacing (0.13-0.2 mm/px; a 512^2 archive of the same
  # field would be 0.26-0.4), low noise, anti-scatter grid.
  _make(
    "flatpanel_1024_cine",
    dose=(800.0, 2000.0),
    electronic_noise=(1.0, 2.0),
    blur_sigma=(0.5, 0.8),
    scatter=(0.2, 0.5),
    pixel_spacing=(0.13, 0.2),
    device_contrast=(1.0, 1.2),
    motion_blur=(0.0, 1.5),
    jpeg_quality=(85.0, 100.0),
    text_overlay=(0.6, 0.6),
  ),
  # Image intensifier, 512 fluoro: high noise, vignetting, pincushion, lossy archive.
  _make(
    "ii_512_fluoro",
    dose=(50.0, 150.0),
    electronic_noise=(3.0, 5.0),
    blur_sigma=(0.8, 1.3),
    scatter=(0.6, 1.2),
    pixel_spacing=(0.3, 0.45),
    device_contrast=(1.0, 1.3),
    vignetting=(0.15, 0.3),
    pincushion=(0.02, 0.05),
    shutter=(0.05, 0.2),
    gamma=(1.1, 1.4),
    jpeg_quality=(60.0, 85.0),
    text_overlay=(0.8, 0.8),
  ),
  # Silicone phantom on a bench: no anatomy, clean background, contrast-filled phantom vessels.
  _make(
    "silicone_phantom",
    dose=(300.0, 800.0),
    scatter=(0.1, 0.3),
    tissue_strength=(0.0, 0.0),
    spine_strength=(0.0, 0.0),
    rib_strength=(0.0, 0.0),
    organ_edge=(0.0, 0.0),
    vignetting=(0.0, 0.05),
    shutter=(0.0, 0.0),
    motion_blur=(0.0, 0.0),
    window_width=(3.0, 3.0),
    vessel_follow=(0.8, 0.8),
  ),
  # Live pig: smaller anatomy, moderate noise, half the frames shown inverted.
  _make(
    "animal_porcine",
    dose=(200.0, 500.0),
    electronic_noise=(2.0, 4.0),
    blur_sigma=(0.6, 1.1),
    scatter=(0.4, 1.0),
    tissue_strength=(0.5, 0.9),
    spine_strength=(0.3, 0.6),
    rib_strength=(0.15, 0.3),
    anatomy_scale=(0.6, 0.8),
    motion_blur=(0.5, 2.0),
    polarity_flip=(0.5, 0.5),
    jpeg_quality=(75.0, 95.0),
  ),
  # Software simulator: very clean (no noise, no blur, no scatter, no artefacts).
  _make(
    "simulator_clean",
    dose=(1e5, 1e5),
    electronic_noise=(0.0, 0.0),
    blur_sigma=(0.0, 0.0),
    scatter=(0.0, 0.0),
    tissue_strength=(0.2, 0.4),
    spine_strength=(0.2, 0.4),
    rib_strength=(0.1, 0.2),
    organ_edge=(0.1, 0.3),
    shutter=(0.0, 0.0),
    motion_blur=(0.0, 0.0),
    gamma=(1.0, 1.0),
    text_overlay=(0.0, 0.0),
  ),
)

# Held out of training: mobile C-arm (image intensifier), low dose, strong vignetting, no grid.
UNSEEN_SITE = _make(
  "unseen_mobile_c_arm",
  dose=(50.0, 200.0),
  electronic_noise=(3.0, 5.0),
  blur_sigma=(1.0, 1.5),
  scatter=(0.8, 1.5),
  pixel_spacing=(0.3, 0.45),
  device_contrast=(0.9, 1.2),
  tissue_strength=(0.5, 1.0),
  anatomy_scale=(0.9, 1.3),
  vignetting=(0.25, 0.4),
  pincushion=(0.02, 0.04),
  shutter=(0.0, 0.2),
  motion_blur=(0.5, 2.5),
  window_width=(2.5, 3.5),
  gamma=(0.8, 1.2),
  jpeg_quality=(50.0, 80.0),
  text_overlay=(0.6, 0.6),
)
# The site number in the PRNG keys of the unseen site's examples (``synth.generate``'s ``key_ids``): fixed and
# above every client id (config.MAX_CLIENTS), so a run's unseen images are the same whatever its client count.
UNSEEN_KEY = 2**31 - 1


_LIMITS = np.array([(lim_lo, lim_hi) for lim_lo, lim_hi, _ in KNOB_INFO.values()], dtype=np.float64)  # [knobs, 2]
_JITTER_CHUNK = 4096  # clients client_table jitters per numpy call: bounds the temporaries at any count


def _jitter(base: SiteProfile, clients: np.ndarray) -> np.ndarray:
  """Deterministic mild (+-12%) multiplicative jitter of every range of ``base``, per client index: client ``i``
  scales (lo, hi) by factors drawn from ``default_rng(10_007 + i)``, keeps a fixed knob (lo == hi) fixed (but
  moved), clamps to ``KNOB_INFO``'s limits and orders the pair. Returns float64 [clients, knobs, 2]."""
  lo, hi = np.array([getattr(base, knob) for knob in KNOBS], dtype=np.float64).T
  f = np.stack([np.random.default_rng(10_007 + int(c)).uniform(0.88, 1.12, size=(len(KNOBS), 2)) for c in clients])
  lo2 = lo * f[..., 0]
  hi2 = np.where(lo == hi, lo2, hi * f[..., 1])
  lo2 = np.minimum(np.maximum(lo2, _LIMITS[:, 0]), _LIMITS[:, 1])
  hi2 = np.minimum(np.maximum(hi2, _LIMITS[:, 0]), _LIMITS[:, 1])
  return np.stack([np.minimum(lo2, hi2), np.maximum(lo2, hi2)], axis=-1)


def _perturb(base: SiteProfile, client: int, data_type: str) -> SiteProfile:
  """Client ``client``'s profile: ``base`` with the ranges of ``_jitter``."""
  ranges = _jitter(base, [client])[0].tolist()
  return SiteProfile(name=client_name(client), data_type=data_type, **dict(zip(KNOBS, map(tuple, ranges))))


def client_name(client: int) -> str:
  """The name of client ``client``'s site in ``make_sites`` (any number of clients above ``client``)."""
  base = BASE_SITES[client % len(BASE_SITES)].name
  return base if client < len(BASE_SITES) else f"{base}_c{client}"


class ClientNames(collections.abc.Sequence):
  """The site names of ``num_clients`` clients, ``client_name(k)`` computed when read (a list of a
  cross-device run's names would hold every one)."""

  def __init__(self, num_clients: int):
    self._n = int(num_clients)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, k):
    if isinstance(k, slice):
      return [client_name(i) for i in range(*k.indices(self._n))]
    if not -self._n <= k < self._n:
      raise IndexError(f"client {k} of {self._n}")
    return client_name(k % self._n)


def client_table(num_clients: int, data_type: str = DEFAULT_DATA_TYPE) -> dict[str, np.ndarray]:
  """``site_table(make_sites(num_clients, data_type)[0] + [unseen])`` (rows 0..num_clients-1 the clients, the
  last row the unseen site), equal to it bit for bit, without building a ``SiteProfile`` per client: ~200 bytes
  and one seeded jitter a client instead of ~3 KB of Python objects and their validation (a cross-device run
  registers up to ``config.MAX_CLIENTS`` clients)."""
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
  if data_type not in DATA_TYPES:
    raise ValueError(f"unknown data_type {data_type!r}; use one of {DATA_TYPES}")
  n_base = len(BASE_SITES)
  ranges = np.empty((num_clients + 1, len(KNOBS), 2), np.float32)
  for b, base in enumerate(BASE_SITES):
    if b < num_clients:
      ranges[b] = np.array([getattr(base, knob) for knob in KNOBS])
    later = np.arange(n_base + b, num_clients, n_base)  # the clients after the bases that jitter base b
    for start in range(0, len(later), _JITTER_CHUNK):
      part = later[start : start + _JITTER_CHUNK]
      ranges[part] = _jitter(base, part)
  ranges[num_clients] = np.array([getattr(UNSEEN_SITE, knob) for knob in KNOBS])
  table = {knob: np.ascontiguousarray(ranges[:, i]) for i, knob in enumerate(KNOBS)}
  table["data_type"] = np.full(num_clients + 1, DATA_TYPES.index(data_type), np.int32)
  return table


def make_sites(num_clients: int, data_type: str = DEFAULT_DATA_TYPE) -> tuple[list[SiteProfile], SiteProfile]:
  """One profile per client plus one held-out ``unseen`` profile, all of ``data_type``.

  Client i uses base hospital ``i % n_base``. The first n_base clients get the bases
  unchanged; later ones get a deterministic mild perturbation so every client differs.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if data_type not in DATA_TYPES:
    raise ValueError(f"unknown data_type {data_type!r}; use one of {DATA_TYPES}")
  n_base = len(BASE_SITES)
  bases = [with_data_type(b, data_type) for b in BASE_SITES]
  profiles = bases[:num_clients] + [_perturb(bases[i % n_base], i, data_type) for i in range(n_base, num_clients)]
  return profiles, with_data_type(UNSEEN_SITE, data_type)


def site_table(profiles) -> dict[str, np.ndarray]:
  """Stack profiles into host arrays (``synth.generate`` gathers each example's row on the host):
  ``{knob: float32 [n_sites, 2] (lo, hi)}`` plus ``"data_type": int32 [n_sites]`` (index into
  ``DATA_TYPES``)."""
  profiles = list(profiles)
  if not profiles:
    raise ValueError("need at least one profile")
  table = {knob: np.array([getattr(p, knob) for p in profiles], dtype=np.float32) for knob in KNOBS}
  table["data_type"] = np.array([DATA_TYPES.index(p.data_type) for p in profiles], dtype=np.int32)
  return table
