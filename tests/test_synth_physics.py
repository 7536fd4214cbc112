"""The generator's corrected forward model (``physics=2``, config.data.synthetic_physics) against closed forms:
device attenuation scales with the device's diameter (Beer-Lambert with the material's coefficient), a pixel
averages transmitted intensity, read-out noise is white, the second guidewire has the site's size. ``physics=1``
(the published tables) is kept as it was; the line integrals L are read where the renderer forms the primary
counts dose * exp(-L) (a clean site: no anatomy, no vignetting)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi

from fedkd.data import synth
from test_synth import _CLEAN, _fixed_row


@functools.cache
def _render_fn(size, supersample, physics):
  """The jitted render of one example: (image, mask, the primary counts its scatter blur receives); one compile
  per image size, sampling and version (the rows and keys are traced)."""

  def render(key, row):
    seen = {}
    real = synth._broad_blur

    def spy(counts, sigma):
      seen["primary"] = counts
      return real(counts, sigma)

    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(synth, "_broad_blur", spy)
      image, mask = synth.render(key, row, size, supersample, physics=physics)
    return image, mask, seen["primary"]

  return jax.jit(render)


def _line_integral(row, physics, supersample, key, size=64):
  """L [H, W] of one render: -log(primary / dose) where the scatter blur receives the primary."""
  primary = np.asarray(_render_fn(size, supersample, physics)(key, row)[2], np.float64)
  return -np.log(primary / float(row["dose"][0]))


def _wire_row(inch, data_type="catheter_guidewire", **more):
  return _fixed_row(data_type, guidewire_inch=inch, pixel_spacing=0.3, vignetting=0.0, **_CLEAN, **more)


@pytest.mark.parametrize("physics,ratio", [(1, 0.035 / 0.014), (2, (0.035 / 0.014) ** 2)])
def test_a_thicker_wire_attenuates_as_its_cross_section(physics, ratio):
  """With the material's coefficient mu fixed, a wire's attenuation summed over the image is mu x its cross-section
  (pi d^2 / 4) x its length: 0.035" against 0.014" gives (2.5)^2 = 6.25. Physics 1 drew the peak line integral
  whatever the diameter, so the sum grew only with the width (2.5). One sample per pixel (no partial-volume
  averaging), the same key: the same devices' paths; the wire's part is the image less its catheter-only twin."""
  key = synth.example_key(2, 0, 3, 0)

  def wire(inch):
    both, cath = (_line_integral(_wire_row(inch, t), physics, 1, key) for t in ("catheter_guidewire", "catheter"))
    return (both - cath).sum()

  sums = [wire(inch) for inch in (0.014, 0.035)]
  assert sums[0] > 1.0
  np.testing.assert_allclose(sums[1] / sums[0], ratio, rtol=0.05)


def test_a_pixel_averages_transmitted_intensity():
  """Physics 2: a partly covered pixel records the mean of exp(-L) over its samples, so its L = -log(mean exp(-L_s))
  is at most the mean of L_s (physics 1's, at the reference wire size where the two draw the same devices), with
  equality where the samples agree and a clear gap at a dense coil's edges (Jensen's inequality)."""
  key = synth.example_key(4, 0, 1, 0)
  row = _wire_row(0.025, device_contrast=2.5)
  mean_l, mean_t = (_line_integral(row, physics, 4, key) for physics in (1, 2))
  assert (mean_t <= mean_l + 1e-5).all()
  assert (mean_l - mean_t).max() > 0.1
  flat = mean_l < 1e-6  # no device in any sample: both zero
  assert flat.mean() > 0.5 and np.abs(mean_t[flat]).max() < 1e-6


@pytest.mark.parametrize("physics", [1, 2])
def test_read_out_noise_is_added_after_the_blur(physics):
  """Counts of a flat field of c = 1e4: quantum noise (variance c) is blurred by the PSF, whose weights k give it
  variance c sum(k^2); read-out noise of sigma e is white (physics 2: e^2 added after the blur), where physics 1
  blurred it too ((c + e^2) sum(k^2))."""
  c, e, sigma = 1e4, 60.0, 1.3
  counts = np.asarray(synth._detected(jnp.full((256, 256), c), jax.random.key(0), e, sigma, physics), np.float64)
  delta = np.zeros((41, 41))
  delta[20, 20] = 1.0
  k = ndi.gaussian_filter(delta, sigma, mode="constant", truncate=6.0)
  expected = c * (k**2).sum() + e * e if physics == 2 else (c + e * e) * (k**2).sum()
  inner = counts[16:-16, 16:-16]
  np.testing.assert_allclose(inner.mean(), c, rtol=1e-3)
  np.testing.assert_allclose(inner.var(), expected, rtol=0.06)


@pytest.mark.parametrize("physics", [1, 2])
def test_the_second_guidewire_has_the_sites_size(physics):
  """A site whose guidewires are all 0.014" (1.19 px at 0.3 mm/px): physics 2 draws the second wire at that size
  too (the mask's ridge widths stay at one wire's); physics 1 drew it from 0.014-0.035" (up to 2.96 px). Four
  samples per axis: the render program of test_a_pixel_averages_transmitted_intensity."""
  row = _fixed_row(guidewire_inch=0.014, second_wire=1.0, pixel_spacing=0.3, **_CLEAN)
  widths = []
  for i in range(6):
    m = np.asarray(_render_fn(64, 4, physics)(synth.example_key(8, 0, i, 0), row)[1])
    edt = ndi.distance_transform_edt(m == 2)
    ridge = (edt >= ndi.maximum_filter(edt, size=3)) & (m == 2)
    widths.append(2.0 * np.percentile(edt[ridge], 95) - 1.0)
  if physics == 2:
    assert max(widths) <= 2.0, widths
  else:
    assert max(widths) >= 2.5, widths


def _longest_run(line) -> int:
  best = cur = 0
  for v in line:
    cur = cur + 1 if v else 0
    best = max(best, cur)
  return best


def test_physics_3_devices_leave_the_field_and_the_catheter_enters_from_outside_it():
  """96 frames of four sites at 64 px, without shutters or pincushion (which cut devices short of the edge):
  with physics 1 and 2 a device leaving the field was clipped to 2 % inside the edge and drawn along it, in the
  image and the mask (a wire mask running >= 8 px along that line, the row / column int(0.02 * 64) = 1 from the
  edge), and the catheter started inside the field (a proximal end that never reaches the image's edge). Physics
  3 draws neither; physics 2 is as it was (test_synth's published values)."""
  from fedkd.data import sites

  table = dict(sites.client_table(4))
  for knob in ("shutter", "pincushion"):
    table[knob] = np.zeros_like(np.asarray(table[knob]))
  size, k = 64, 1
  edge = np.zeros((size, size), bool)
  edge[[0, -1]] = edge[:, [0, -1]] = True
  along, free = {}, {}
  for physics in (2, 3):
    _, m = synth.generate(0, table, [0, 1, 2, 3], np.tile(np.arange(24), (4, 1)), size, split=1, physics=physics)
    m = np.asarray(m).reshape(-1, size, size)
    lines = lambda f: [f[k], f[size - 1 - k], f[:, k], f[:, size - 1 - k]]  # noqa: E731
    along[physics] = sum(max(_longest_run(line == 2) for line in lines(f)) >= 8 for f in m)
    free[physics] = sum((f == 1).any() and not ((f == 1) & edge).any() for f in m)
  assert along[2] >= 30 and free[2] >= 5, (along, free)  # measured: 56 and 13 of 96
  assert along[3] <= 10 and free[3] == 0, (along, free)  # 6 (wire tips curling by the edge) and 0


def test_the_config_key_reaches_the_clients_and_is_checked():
  """config.data.synthetic_physics: the clients' held-out images are the generator's at that version (2, the
  corrected one, by default), and a value other than 1 or 2 is a ConfigError naming both. 16-pixel images: the
  renderer's programs are those of the FedEFM silos below (tests/test_fedefm_usage.py's tiny config)."""
  from fedkd.config import ConfigError, base_config, validate
  from fedkd.data.pipeline import make_client_data

  c = base_config()
  c.num_clients, c.clients_per_round, c.image_size, c.eval.examples_per_site = 2, 2, 16, 2
  sets = {}
  for physics in (1, 2):
    c.data.synthetic_physics = physics
    data = make_client_data(c)
    sets[physics] = np.asarray(data.eval_sets([0])[data.site_names[0]][0])
    want = synth.generate(
      c.seed, data.table, np.array([0], np.int32), np.arange(2)[None], c.image_size, split=1, physics=physics
    )
    np.testing.assert_array_equal(sets[physics], np.asarray(want[0][0]))
  assert np.abs(sets[1] - sets[2]).mean() > 1e-3
  for bad in (4, 0):
    c.data.synthetic_physics = bad
    with pytest.raises(ConfigError, match=r"config.data.synthetic_physics=.* is unknown; use 2 .* or 1 "):
      validate(c, 8)
  c.data.synthetic_physics = True  # not a version number: refused for its type
  with pytest.raises(ConfigError, match=r"synthetic_physics=True is a bool, but the key takes a whole number"):
    validate(c, 8)


def test_fedefm_silos_render_with_the_configs_physics_and_old_workdirs_ran_physics_1():
  """FedEFM's schema has the key too: the silos' data (here the target site) is the generator's at that
  version, and a workdir written before the key (a config without config.data) matches only physics 1."""
  import json

  from fedkd.data.silos import SiloData
  from fedkd.tasks import fedefm as task
  from test_fedefm_usage import tiny

  imgs = {}
  for physics in (1, 2):
    c = tiny(**{"data.synthetic_physics": physics})
    silos = SiloData(c)
    imgs[physics] = np.asarray(silos.target(0, 1, 2)[0])
    row = np.array([silos.target_row], np.int32)
    want = synth.generate(0, silos.table, row, np.arange(2)[None], c.image_size, split=1, physics=physics)
    np.testing.assert_array_equal(imgs[physics], np.asarray(want[0][0]))
  assert np.abs(imgs[1] - imgs[2]).mean() > 1e-3
  old = json.loads(tiny().to_json())
  del old["data"]
  assert task.config_difference(old, json.loads(tiny().to_json())) is None
  assert task.config_difference(old, json.loads(tiny(**{"data.synthetic_physics": 2}).to_json())) == (
    "config.data.synthetic_physics differs: written before the key existed, it ran as 1 "
    "(--config.data.synthetic_physics=1)"
  )


@pytest.mark.parametrize("physics,ratio", [(1, 8.0 / 4.0), (2, (8.0 / 4.0) ** 2)])
def test_a_wider_catheter_attenuates_as_its_cross_section(physics, ratio):
  """The catheter's wall (and its faint lumen, a fixed share of the wall's coefficient) at 8 F against 4 F, the
  same inner-to-outer ratio (same key): with the material's coefficient fixed the summed attenuation grows with
  the cross-section, 4x; physics 1 drew the wall's peak whatever the size, so it grew with the width, 2x."""
  key = synth.example_key(6, 0, 2, 0)

  def total(french):
    row = _fixed_row("catheter", catheter_french=french, pixel_spacing=0.3, vignetting=0.0, **_CLEAN)
    return _line_integral(row, physics, 1, key).sum()

  np.testing.assert_allclose(total(8.0) / total(4.0), ratio, rtol=0.05)
