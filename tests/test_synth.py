"""Tests for the synthetic X-ray generator and the hospital profiles.

Expectations are independent of the generator: widths are measured from the masks with a
Euclidean distance transform, darkness against a local background ring, noise against a
(near) noise-free rendering of the same key.
"""
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


def _fixed_row(**overrides):
    """One site row with lo == hi for every knob."""
    vals = dict(dose=500.0, blur_sigma=0.8, catheter_width=6.0, guidewire_width=2.0,
                vessel_contrast=0.5, tissue_strength=0.5, fov_scale=1.0, device_contrast=1.0,
                vignetting=0.0)
    vals.update(overrides)
    return {k: jnp.array([v, v], jnp.float32) for k, v in vals.items()}


# ----------------------------------------------------------------------------- sites


def test_make_sites_distinct_and_unseen():
    train, unseen = sites_lib.make_sites(12)
    assert len(train) == 12
    n_base = len(sites_lib.BASE_SITES)
    assert [p.name for p in train[:n_base]] == [p.name for p in sites_lib.BASE_SITES]
    knobs = [tuple(getattr(p, k) for k in sites_lib.KNOBS) for p in train]
    assert len(set(knobs)) == 12, "every client must get a different profile"
    assert len({p.name for p in train}) == 12
    assert unseen.name not in {p.name for p in train}
    assert tuple(getattr(unseen, k) for k in sites_lib.KNOBS) not in set(knobs)
    for p in train + [unseen]:
        for k in sites_lib.KNOBS:
            lo, hi = getattr(p, k)
            assert lo <= hi, (p.name, k)
        assert 3.0 <= p.catheter_width[0] and p.catheter_width[1] <= 12.0
        assert 1.0 <= p.guidewire_width[0] and p.guidewire_width[1] <= 3.0
    # deterministic
    assert sites_lib.make_sites(12) == (train, unseen)
    # mild perturbation: perturbed client stays close to its base
    base, pert = train[1], train[1 + n_base]
    assert np.allclose(np.array(pert.dose), np.array(base.dose), rtol=0.2)


def test_site_table_shapes():
    train, unseen = sites_lib.make_sites(3)
    table = sites_lib.site_table(train + [unseen])
    assert set(table) == set(sites_lib.KNOBS)
    for k, v in table.items():
        assert v.shape == (4, 2) and v.dtype == jnp.float32, k
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
    row = jax.tree_util.tree_map(lambda a: a[2], table)
    keys = jax.vmap(lambda i: synth.example_key(3, 2, i, 0))(jnp.arange(3))
    im, m = jax.jit(jax.vmap(lambda k: synth.render(k, row, 64)))(keys)
    assert im.shape == (3, 64, 64, 1) and m.shape == (3, 64, 64)
    # render(example_key(...)) is the same example generate produces (up to fusion rounding)
    one_im, one_m = jax.jit(synth.render, static_argnums=2)(synth.example_key(3, 2, 7, 0), row, 64)
    np.testing.assert_allclose(np.asarray(one_im), np.asarray(images[0, 0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(one_m), np.asarray(masks[0, 0]))


def test_shapes_128(batch128, profiles):
    images, masks = batch128
    assert images.shape == (len(profiles), N_PER_SITE, 128, 128, 1) and images.dtype == np.float32
    assert masks.shape == (len(profiles), N_PER_SITE, 128, 128) and masks.dtype == np.int32
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
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
    e_im, e_m = synth.generate(3, table, np.array([0, 2, 1]), idx, 64, split=1)
    e_im = np.asarray(e_im)
    assert not np.array_equal(e_im[1, 1], b_im[1, 1])
    assert all(not np.array_equal(e_im[i, j], b_im[i, j]) for i in range(3) for j in range(4))


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
    s = _site_index(profiles, "flatpanel_cine_low_noise")
    for n in range(N_PER_SITE):
        img, m = images[s, n, ..., 0], masks[s, n]
        cath = m == 1
        ring = ndi.binary_dilation(m > 0, iterations=3) & (m == 0)
        assert img[cath].mean() < img[ring].mean() - 0.02, n
        assert img[cath].mean() < img[m == 0].mean(), n


def test_widths_in_profile_range(batch128, profiles):
    _, masks = batch128
    clo, chi = sites_lib.CATHETER_WIDTH_BOUNDS
    for s, p in enumerate(profiles):
        lo = np.clip(p.catheter_width[0] * p.fov_scale[0], clo, chi)
        hi = np.clip(p.catheter_width[1] * p.fov_scale[1], clo, chi)
        for n in range(N_PER_SITE):
            m = masks[s, n]
            w_cath = _width(m, m > 0, 1)
            assert lo - 1.5 <= w_cath <= hi + 1.5, (p.name, n, w_cath, lo, hi)
            w_wire = _width(m, m == 2, 2)
            assert w_wire <= 3.5, (p.name, n, w_wire)


def test_more_dose_less_noise():
    key = synth.example_key(11, 0, 5, 0)
    render = jax.jit(synth.render, static_argnums=2)
    ref, _ = render(key, _fixed_row(dose=1e8), 64)
    low, _ = render(key, _fixed_row(dose=50.0), 64)
    high, _ = render(key, _fixed_row(dose=2000.0), 64)
    ref, low, high = (np.asarray(x, np.float64) for x in (ref, low, high))
    var_low, var_high = np.var(low - ref), np.var(high - ref)
    # Poisson: variance of log-counts ~ 1/dose -> expect a ratio near 40
    assert var_low > 10.0 * var_high, (var_low, var_high)
    assert var_high > 0.0


def test_sites_differ(batch128, profiles):
    images, masks = batch128
    thin = _site_index(profiles, "thin_devices")
    wide = _site_index(profiles, "high_contrast")
    w_thin = np.mean([_width(masks[thin, n], masks[thin, n] > 0, 1) for n in range(N_PER_SITE)])
    w_wide = np.mean([_width(masks[wide, n], masks[wide, n] > 0, 1) for n in range(N_PER_SITE)])
    assert w_wide > w_thin + 2.0, (w_thin, w_wide)
    # image statistics differ between hospitals (mean grey level and contrast)
    stats = [(images[s].mean(), images[s].std()) for s in range(len(profiles))]
    assert len({(round(float(a), 3), round(float(b), 3)) for a, b in stats}) == len(profiles)


def test_catheter_width_follows_knob():
    render = jax.jit(synth.render, static_argnums=2)
    key = synth.example_key(0, 0, 1, 0)
    _, m_thin = render(key, _fixed_row(catheter_width=4.0), 128)
    _, m_wide = render(key, _fixed_row(catheter_width=10.0), 128)
    m_thin, m_wide = np.asarray(m_thin), np.asarray(m_wide)
    assert abs(_width(m_thin, m_thin > 0, 1) - 4.0) <= 1.5
    assert abs(_width(m_wide, m_wide > 0, 1) - 10.0) <= 1.5
