"""Tests for the synthetic X-ray generator and the hospital profiles.

Expectations are independent of the generator: widths are measured from the masks with a
Euclidean distance transform, darkness against a local background ring, noise against a
(near) noise-free rendering of the same key.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi

from fedkd.data import sites as sites_lib
from fedkd.data import synth

N_PER_SITE = 8


@pytest.fixture(scope="module")
def profiles():
  train, unseen = sites_lib.make_sites(5)
  return train + [unseen]


@pytest.fixture(scope="module")
def table(profiles):
  return sites_lib.site_table(profiles)


@pytest.fixture(scope="module")
def batch128(profiles, table):
  c = len(profiles)
  images, masks = synth.generate(0, table, np.arange(c), np.tile(np.arange(N_PER_SITE), (c, 1)), 128)
  return np.asarray(images), np.asarray(masks)


def _site_index(profiles, name):
  return [p.name for p in profiles].index(name)


def _width(mask, region, cls):
  """Full width of class ``cls`` from the distance transform of ``region``: median over the
  ridge (3x3 local maxima) of 2 * EDT, minus 1 px for pixel-centre discretisation."""
  edt = ndi.distance_transform_edt(region)
  ridge = (edt >= ndi.maximum_filter(edt, size=3)) & (mask == cls) & (edt > 0)
  return 2.0 * np.median(edt[ridge]) - 1.0


_FIXED = dict(
  dose=500.0,
  electronic_noise=0.0,
  blur_sigma=0.8,
  scatter=0.3,
  pixel_spacing=0.3,
  catheter_french=6.0,
  guidewire_inch=0.025,
  device_contrast=1.0,
  vessel_contrast=0.5,
  tissue_strength=0.5,
  spine_strength=0.3,
  rib_strength=0.1,
  organ_edge=0.3,
  anatomy_scale=1.0,
  vignetting=0.0,
  pincushion=0.0,
  shutter=0.0,
  motion_blur=0.0,
  window_width=3.5,
  gamma=1.0,
  polarity_flip=0.0,
  text_overlay=0.0,
  jpeg_quality=100.0,
  second_wire=0.0,
  vessel_follow=0.5,
)

# a clean bench site: no anatomy, (almost) no noise, no blur, no scatter
_CLEAN = dict(
  dose=1e8,
  blur_sigma=0.0,
  scatter=0.0,
  tissue_strength=0.0,
  spine_strength=0.0,
  rib_strength=0.0,
  organ_edge=0.0,
  vessel_contrast=0.0,
)

# one jitted render shared by all tests (same static args + same row structure = one compile per size)
_render = jax.jit(synth.render, static_argnums=(2, 3))


def _fixed_row(data_type="catheter_guidewire", **overrides):
  """One site row with lo == hi for every knob (same pytree structure as a site_table row)."""
  assert set(overrides) <= set(_FIXED), set(overrides) - set(_FIXED)
  vals = {**_FIXED, **overrides}
  row = {k: jnp.array([v, v], jnp.float32) for k, v in vals.items()}
  row["data_type"] = jnp.int32(sites_lib.DATA_TYPES.index(data_type))
  return row


def _row(table, i):
  return jax.tree_util.tree_map(lambda a: a[i], table)


def _ring(mask, cls, iterations=3):
  """Background pixels near (but not on) any labeled structure, around class ``cls``."""
  near = ndi.binary_dilation(mask == cls, iterations=iterations)
  return near & ~ndi.binary_dilation(mask > 0, iterations=1)


# ----------------------------------------------------------------------------- sites


def test_make_sites_distinct_and_unseen():
  train, unseen = sites_lib.make_sites(12)
  assert len(train) == 12
  n_base = len(sites_lib.BASE_SITES)
  assert n_base == 5
  assert [p.name for p in train[:n_base]] == [p.name for p in sites_lib.BASE_SITES]
  knobs = [tuple(getattr(p, k) for k in sites_lib.KNOBS) for p in train]
  assert len(set(knobs)) == 12, "every client must get a different profile"
  assert len({p.name for p in train}) == 12
  assert unseen.name == "unseen_mobile_c_arm" and unseen.name not in {p.name for p in train}
  assert tuple(getattr(unseen, k) for k in sites_lib.KNOBS) not in set(knobs)
  for p in train + [unseen]:
    assert p.data_type == "catheter_guidewire"
    for k in sites_lib.KNOBS:
      lo, hi = getattr(p, k)
      lim_lo, lim_hi, _ = sites_lib.KNOB_INFO[k]
      assert lim_lo <= lo <= hi <= lim_hi, (p.name, k)
  # deterministic
  assert sites_lib.make_sites(12) == (train, unseen)
  # mild perturbation: perturbed client stays close to its base
  base, pert = train[1], train[1 + n_base]
  assert np.allclose(np.array(pert.dose), np.array(base.dose), rtol=0.2)
  # named hospitals: the phantom has no anatomy, the simulator no noise
  phantom = next(p for p in sites_lib.BASE_SITES if p.name == "silicone_phantom")
  assert phantom.tissue_strength == phantom.spine_strength == phantom.rib_strength == (0.0, 0.0)
  sim = next(p for p in sites_lib.BASE_SITES if p.name == "simulator_clean")
  assert sim.blur_sigma == (0.0, 0.0) and sim.electronic_noise == (0.0, 0.0) and sim.dose[0] >= 1e4


def test_data_types_and_validation():
  assert sites_lib.CLASS_NAMES == ("background", "catheter", "guidewire", "vessel")
  assert sites_lib.DATA_TYPES == ("catheter_guidewire", "catheter", "vessel", "all")
  train, unseen = sites_lib.make_sites(7, data_type="vessel")
  assert all(p.data_type == "vessel" for p in train + [unseen])
  # data type does not change the imaging knobs
  ref, _ = sites_lib.make_sites(7)
  assert [sites_lib.with_data_type(p, "vessel") for p in ref] == train
  assert sites_lib.with_data_type(train[0], "all").data_type == "all"
  with pytest.raises(ValueError, match="data_type"):
    sites_lib.make_sites(2, data_type="stent")
  with pytest.raises(ValueError, match="data_type"):
    sites_lib.with_data_type(train[0], "stent")
  with pytest.raises(ValueError, match="lo > hi"):
    dataclasses.replace(train[0], dose=(500.0, 100.0))
  with pytest.raises(ValueError, match="outside"):
    dataclasses.replace(train[0], gamma=(0.1, 1.0))
  with pytest.raises(ValueError, match="pair"):
    dataclasses.replace(train[0], dose=500.0)
  with pytest.raises(ValueError, match="num_clients"):
    sites_lib.make_sites(0)


def test_site_table_shapes():
  train, unseen = sites_lib.make_sites(3)
  profiles = train[:2] + [sites_lib.with_data_type(train[2], "all"), unseen]
  table = sites_lib.site_table(profiles)
  assert set(table) == set(sites_lib.KNOBS) | {"data_type"}
  for k in sites_lib.KNOBS:
    v = table[k]
    assert v.shape == (4, 2) and v.dtype == jnp.float32, k
  assert table["data_type"].shape == (4,) and table["data_type"].dtype == jnp.int32
  assert np.asarray(table["data_type"]).tolist() == [0, 0, 3, 0]
  assert float(table["dose"][3, 0]) == pytest.approx(unseen.dose[0])


def test_example_key_traceable():
  k1 = synth.example_key(1, 2, 3, 0)
  k2 = jax.jit(synth.example_key)(1, jnp.int32(2), jnp.int32(3), 0)
  assert np.array_equal(np.asarray(k1), np.asarray(k2))
  assert not np.array_equal(np.asarray(k1), np.asarray(synth.example_key(1, 2, 3, 1)))
  assert not np.array_equal(np.asarray(k1), np.asarray(synth.example_key(1, 2, 4, 0)))


# ----------------------------------------------------------------------------- generator


def test_shapes_dtypes_and_jit_vmap(table):
  images, masks = synth.generate(3, table, np.array([2]), np.array([[7]]), 64)
  assert images.shape == (1, 1, 64, 64, 1) and images.dtype == jnp.float32
  assert masks.shape == (1, 1, 64, 64) and masks.dtype == jnp.int32
  row = _row(table, 2)
  keys = jax.vmap(lambda i: synth.example_key(3, 2, i, 0))(jnp.arange(3))
  im, m = jax.jit(jax.vmap(lambda k: synth.render(k, row, 64)))(keys)
  assert im.shape == (3, 64, 64, 1) and m.shape == (3, 64, 64)
  # render(example_key(...)) is the same example generate produces (up to fusion rounding, which
  # can move a pixel across one 8-bit level)
  one_im, one_m = _render(synth.example_key(3, 2, 7, 0), row, 64, synth.SUPERSAMPLE)
  diff = np.abs(np.asarray(one_im) - np.asarray(images[0, 0]))
  assert diff.max() <= 1.0 / 255 + 1e-5 and (diff > 1e-5).mean() < 0.01
  np.testing.assert_array_equal(np.asarray(one_m), np.asarray(masks[0, 0]))


def test_shapes_128(batch128, profiles):
  images, masks = batch128
  assert images.shape == (len(profiles), N_PER_SITE, 128, 128, 1) and images.dtype == np.float32
  assert masks.shape == (len(profiles), N_PER_SITE, 128, 128) and masks.dtype == np.int32
  assert np.isfinite(images).all()
  assert images.min() >= 0.0 and images.max() <= 1.0
  # 8-bit output levels
  np.testing.assert_allclose(images * 255.0, np.round(images * 255.0), atol=1e-3)
  assert set(np.unique(masks)) <= {0, 1, 2}


def test_determinism_across_batches(table):
  a_im, a_m = synth.generate(3, table, np.array([2]), np.array([[7]]), 64)
  idx = np.array([[1, 2, 3, 4], [5, 7, 9, 11], [7, 2, 3, 4]])
  b_im, b_m = synth.generate(3, table, np.array([0, 2, 1]), idx, 64)
  a_im, a_m, b_im, b_m = map(np.asarray, (a_im, a_m, b_im, b_m))
  # same (seed, site=2, index=7, split=0) in a different batch: bitwise identical
  assert np.array_equal(a_im[0, 0], b_im[1, 1])
  assert np.array_equal(a_m[0, 0], b_m[1, 1])
  # repeated call
  c_im, c_m = synth.generate(3, table, np.array([2]), np.array([[7]]), 64)
  assert np.array_equal(a_im, np.asarray(c_im)) and np.array_equal(a_m, np.asarray(c_m))
  # same index, different site -> different; different index -> different
  assert not np.array_equal(b_im[2, 0], a_im[0, 0])
  assert not np.array_equal(b_im[1, 0], b_im[1, 1])
  assert not np.array_equal(b_m[1, 0], b_m[1, 1])
  # other seed -> different
  d_im, _ = synth.generate(4, table, np.array([0, 2, 1]), idx, 64)
  assert not np.array_equal(np.asarray(d_im)[1, 1], b_im[1, 1])
  # split 1 (held-out eval) differs from split 0
  for i, s in enumerate([0, 2, 1]):
    for j in range(4):
      e_im, e_m = _render(synth.example_key(3, s, int(idx[i, j]), 1), _row(table, s), 64, synth.SUPERSAMPLE)
      assert np.abs(np.asarray(e_im) - b_im[i, j]).mean() > 0.01
      assert not np.array_equal(np.asarray(e_m), b_m[i, j])


def test_every_image_has_both_classes(batch128):
  _, masks = batch128
  cath = (masks == 1).sum(axis=(2, 3))
  wire = (masks == 2).sum(axis=(2, 3))
  assert (cath > 0).all(), cath
  assert (wire > 0).all(), wire
  # devices are thin structures, not the whole frame
  assert ((cath + wire) < 0.3 * 128 * 128).all()


def test_catheter_darker_than_local_background(batch128, profiles):
  images, masks = batch128
  s = _site_index(profiles, "flatpanel_1024_cine")
  for n in range(N_PER_SITE):
    img, m = images[s, n, ..., 0], masks[s, n]
    cath = m == 1
    ring = ndi.binary_dilation(m > 0, iterations=3) & (m == 0)
    # local comparison only: with spine, ribs and dark shutters the global background mean
    # says nothing about device contrast
    assert img[cath].mean() < img[ring].mean() - 0.02, n


def _expected_catheter_width(french, spacing, size, field=None):
  """Full width in output px from the physical size: F/3 mm over the effective spacing, clamped to
  3..12 px of the acquisition field (``field`` px; default: the output itself) -- an independent
  re-derivation of the documented rule."""
  ref = (field or size) / size
  w = french / 3.0 / (spacing * ref)
  return np.clip(w, 3.0 / ref, 12.0 / ref)


def test_widths_in_profile_range(batch128, profiles):
  _, masks = batch128
  for s, p in enumerate(profiles):
    lo = _expected_catheter_width(p.catheter_french[0], p.pixel_spacing[1], 128)
    hi = _expected_catheter_width(p.catheter_french[1], p.pixel_spacing[0], 128)
    for n in range(N_PER_SITE):
      m = masks[s, n]
      w_cath = _width(m, m > 0, 1)
      assert lo - 1.5 <= w_cath <= hi + 1.5, (p.name, n, w_cath, lo, hi)
      # wires are 0.8-3 px of the field (here the output itself)
      w_wire = _width(m, m == 2, 2)
      assert w_wire <= 3.5, (p.name, n, w_wire)


def test_more_dose_less_noise():
  key = synth.example_key(11, 0, 5, 0)
  ref, _ = _render(key, _fixed_row(dose=1e8), 64, 2)
  low, _ = _render(key, _fixed_row(dose=50.0), 64, 2)
  high, _ = _render(key, _fixed_row(dose=2000.0), 64, 2)
  ref, low, high = (np.asarray(x, np.float64) for x in (ref, low, high))
  var_low, var_high = np.var(low - ref), np.var(high - ref)
  # Poisson: variance of log-counts ~ 1/dose -> expect a ratio near 40
  assert var_low > 10.0 * var_high, (var_low, var_high)
  assert var_high > 0.0


def test_sites_differ(batch128, profiles):
  images, masks = batch128
  fine = _site_index(profiles, "flatpanel_1024_cine")  # 0.13-0.2 mm/px
  coarse = _site_index(profiles, "ii_512_fluoro")  # 0.3-0.45 mm/px
  w_fine = np.mean([_width(masks[fine, n], masks[fine, n] > 0, 1) for n in range(N_PER_SITE)])
  w_coarse = np.mean([_width(masks[coarse, n], masks[coarse, n] > 0, 1) for n in range(N_PER_SITE)])
  assert w_fine > w_coarse + 0.8, (w_fine, w_coarse)
  # image statistics differ between hospitals (mean grey level and contrast)
  stats = [(images[s].mean(), images[s].std()) for s in range(len(profiles))]
  assert len({(round(float(a), 3), round(float(b), 3)) for a, b in stats}) == len(profiles)


def test_wider_catheter_more_mask_pixels():
  # 64 px (the size the other single renders use: one compile): widths in px do not depend on the
  # output size (the field is the output itself)
  key = synth.example_key(0, 0, 1, 0)
  _, m_thin = _render(key, _fixed_row(catheter_french=4.0, pixel_spacing=0.15), 64, 2)
  _, m_wide = _render(key, _fixed_row(catheter_french=8.0, pixel_spacing=0.15), 64, 2)
  m_thin, m_wide = np.asarray(m_thin), np.asarray(m_wide)
  n_thin, n_wide = (m_thin == 1).sum(), (m_wide == 1).sum()
  # same centreline, width 8.9 px vs 12 px (8 F = 17.8 px is clamped to 12): the masked area of a
  # tube scales with its width, ratio ~1.35
  w_thin, w_wide = (_expected_catheter_width(f, 0.15, 64) for f in (4.0, 8.0))
  assert 1.15 < n_wide / n_thin < 1.6, (n_thin, n_wide, w_wide / w_thin)
  for m, w in ((m_thin, w_thin), (m_wide, w_wide)):
    assert abs(_width(m, m > 0, 1) - w) <= 1.5


def test_subpixel_wire_labeled_and_visible():
  # 0.3 px at 64 px = 2.4 px at 512 with 0.3 mm/px: 0.72 mm = 0.0283 inch
  inch = 0.3 * 0.3 * 8 / 25.4
  row = _fixed_row(guidewire_inch=inch, **_CLEAN)
  for i in range(3):
    img, m = _render(synth.example_key(5, 0, i, 0), row, 64, 2)
    img, m = np.asarray(img)[..., 0], np.asarray(m)
    wire = m == 2
    assert wire.sum() >= 10, i
    ring = _ring(m, 2, iterations=2)
    # noise-free: the background is flat up to 8-bit levels; the wire must stand out clearly
    bg = img[ring]
    assert bg.std() < 0.01
    assert bg.mean() - img[wire].mean() > 0.03, (i, bg.mean(), img[wire].mean())


def test_data_types():
  base, _ = sites_lib.make_sites(2)
  profiles = [sites_lib.with_data_type(base[1], dt) for dt in sites_lib.DATA_TYPES]
  table = sites_lib.site_table(profiles)
  expect = {"catheter_guidewire": {0, 1, 2}, "catheter": {0, 1}, "vessel": {0, 3}, "all": {0, 1, 2, 3}}
  for s, dt in enumerate(sites_lib.DATA_TYPES):
    for i in range(4):
      img, m = _render(synth.example_key(2, s, i, 0), _row(table, s), 64, 2)
      labels = set(np.unique(np.asarray(m)).tolist())
      assert labels == expect[dt], (dt, i, labels)


def test_phantom_has_flat_background():
  by_name = {p.name: p for p in sites_lib.BASE_SITES}
  quiet = dict(
    text_overlay=(0.0, 0.0), shutter=(0.0, 0.0), polarity_flip=(0.0, 0.0), vignetting=(0.0, 0.0), data_type="vessel"
  )
  profiles = [dataclasses.replace(by_name[n], **quiet) for n in ("silicone_phantom", "animal_porcine")]
  table = sites_lib.site_table(profiles)
  texture = []
  for s in range(2):
    vals = []
    for i in range(3):
      img, m = _render(synth.example_key(1, 7, i, 0), _row(table, s), 64, 2)
      img, m = np.asarray(img)[..., 0], np.asarray(m)
      smooth = ndi.gaussian_filter(img, 2.0)  # suppress quantum noise, keep anatomy
      bg = ~ndi.binary_dilation(m > 0, iterations=4)
      vals.append(smooth[bg].var())
    texture.append(np.mean(vals))
  assert texture[0] < 0.2 * texture[1], texture


def test_shutters_and_polarity():
  key = synth.example_key(3, 0, 2, 0)
  img, m = _render(key, _fixed_row(shutter=0.2), 64, 2)
  img, m = np.asarray(img)[..., 0], np.asarray(m)
  for border in (img[:8], img[-8:], img[:, :8], img[:, -8:]):
    assert border.mean() < 0.08 and border.std() < 0.05, (border.mean(), border.std())
  assert img[20:44, 20:44].mean() > 0.3
  assert (m[:8] == 0).all() and (m[:, :8] == 0).all()  # nothing labeled under the blades

  contrasts = []
  for flip in (0.0, 1.0):
    im, mm = _render(key, _fixed_row(polarity_flip=flip), 64, 2)
    im, mm = np.asarray(im)[..., 0], np.asarray(mm)
    contrasts.append(im[mm == 1].mean() - im[_ring(mm, 1)].mean())
  assert contrasts[0] < -0.03 and contrasts[1] > 0.03, contrasts


def test_pincushion_keeps_mask_and_image_consistent():
  for i in range(3):
    key = synth.example_key(4, 0, i, 0)
    img, m = _render(key, _fixed_row(pincushion=0.05, **_CLEAN), 64, 2)
    _, m0 = _render(key, _fixed_row(pincushion=0.0, **_CLEAN), 64, 2)
    img, m, m0 = np.asarray(img)[..., 0], np.asarray(m), np.asarray(m0)
    assert not np.array_equal(m, m0), "distortion must move the devices"
    cath = m == 1
    assert img[cath].mean() < img[_ring(m, 1)].mean() - 0.05, i
