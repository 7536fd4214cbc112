"""The synthetic hospitals as a user meets them: odd but valid sizes, the data preview's limits, and the
generator's physics against independent references (PIL's JPEG codec, the Poisson variance of counts)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy import stats

from fedkd.config import base_config
from fedkd.data import partition, pipeline
from fedkd.data import sites as sites_lib
from fedkd.data import synth
from test_synth import _FIXED  # one site, every knob fixed (lo == hi)


_render = jax.jit(synth.render, static_argnums=(2, 3))


def _row(**overrides):
  vals = {**_FIXED, **overrides}
  row = {k: jnp.array([v, v], jnp.float32) for k, v in vals.items()}
  row["data_type"] = jnp.int32(0)
  return row


def _rms(a, b):
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def _pil_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf), np.float64) / 255.0


@pytest.mark.parametrize("size", [44, 64])
def test_jpeg_archive_at_every_image_size(size):
  """A lossy-archive hospital (jpeg_quality 30) at an image size that is not a multiple of 8 (valid with
  model.depth <= 2) is compressed like PIL's JPEG encoder compresses the lossless frame, as at 64 px."""
  key = synth.example_key(0, 0, 3, 0)
  lossless, _ = _render(key, _row(), size, 2)
  lossy, _ = _render(key, _row(jpeg_quality=30.0), size, 2)
  lossless, lossy = np.asarray(lossless)[..., 0], np.asarray(lossy)[..., 0]
  reference = _pil_jpeg(lossless, 30)
  loss = _rms(reference, lossless)
  assert loss > 0.01  # quality 30 visibly changes the frame
  assert 0.7 * loss < _rms(lossy, lossless) < 1.4 * loss
  assert _rms(lossy, reference) < 0.4 * loss


@pytest.mark.parametrize("dose, electronic", [(50.0, 0.0), (1000.0, 0.0), (200.0, 5.0)])
def test_quantum_noise_at_the_stated_dose(dose, electronic):
  """``dose`` is open-field counts per pixel: on a flat, unblurred field the log image's noise has the
  Poisson + electronic standard deviation sqrt(N + sigma_e^2) / N (a 0.8-wide display window, gamma 1,
  so the line integral is 0.8 x the grey level)."""
  flat = dict(tissue_strength=0.0, spine_strength=0.0, rib_strength=0.0, organ_edge=0.0, vessel_contrast=0.0)
  row = _row(dose=dose, electronic_noise=electronic, blur_sigma=0.0, scatter=0.0, device_contrast=0.3, window_width=1.0)
  row.update({k: jnp.array([v, v], jnp.float32) for k, v in flat.items()})
  stds = []
  for i in range(4):
    img, m = _render(synth.example_key(0, 0, i, 0), row, 64, 2)
    img, m = np.asarray(img)[..., 0], np.asarray(m)
    far = ~ndi.binary_dilation(m > 0, iterations=6)  # away from the devices' partial-volume edges
    stds.append((0.8 * img[far]).std())
  expected = np.sqrt(dose + electronic**2) / dose
  assert abs(np.mean(stds) / expected - 1.0) < 0.08, (np.mean(stds), expected)


def test_example_indices_beyond_int32_are_refused():
  """Example keys are int32: index 2**31 + 5 would silently be example 5 (or a negative index)."""
  table = sites_lib.site_table(sites_lib.make_sites(1)[0])
  with pytest.raises(ValueError, match="indices must be integers in 0..2\\*\\*31-1"):
    synth.generate(0, table, np.array([0]), np.array([[2**31 + 5]], np.int64), 32)
  with pytest.raises(ValueError, match="site_ids"):
    synth.generate(0, table, np.array([-1]), np.array([[0]]), 32)


# ----------------------------------------------------------------------------- python -m fedkd.data.preview

_SMALL = [
  "--config=configs/fedavg_unet.py:runlocal",
  "--config.image_size=32",
  "--config.num_clients=7",
  "--config.clients_per_round=2",
]


def test_preview_draws_the_sites_training_evaluates(cli, tmp_path):
  """config.eval.max_sites (cross-device runs: thousands of clients, 5 evaluated) bounds the preview's
  rows as it bounds training's evaluation: the first max_sites training sites and the unseen one."""
  out = tmp_path / "p.png"
  r = cli.run("fedkd.data.preview", [*_SMALL, "--config.eval.max_sites=2", "--frames=1", f"--out={out}"])
  assert r.code == 0, r.stderr[-2000:]
  assert "3 sites x 1 frames" in r.stdout
  assert "the first 2 of the 7 training sites" in r.stdout
  rows = np.asarray(Image.open(out)).shape[0] // (128 + 14)  # 32 px frames zoomed to 128 px + a label strip
  assert rows == 3, np.asarray(Image.open(out)).shape


def test_preview_too_wide_for_a_jpeg_is_one_line(cli, tmp_path):
  """300 frames of 128 px pairs make a 76,800 px wide picture; a JPEG holds 65,500 px a side."""
  out = tmp_path / "p.jpg"
  r = cli.run("fedkd.data.preview", [*_SMALL, "--frames=300", f"--out={out}"])
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "76800 x" in lines[0] and "--frames <= 255" in lines[0], lines
  assert not out.exists()


def test_preview_of_a_fedefm_config_says_what_it_draws(cli, tmp_path):
  r = cli.run("fedkd.data.preview", ["--config=configs/fedefm.py", f"--out={tmp_path / 'p.png'}"])
  assert r.code == 2 and not r.traceback
  assert "FedAvg config" in r.stderr and "configs/quickstart.py" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- partitions and client sizes


def test_dirichlet_shares_follow_the_beta_marginal():
  """Under Dirichlet(alpha * 1_K) a client's share of a category is Beta(alpha, (K - 1) alpha)."""
  k, alpha, n = 4, 0.5, 2000
  shares = np.array(
    [[len(p) / n for p in partition.dirichlet(np.zeros(n, int), k, alpha, seed, min_size=0)] for seed in range(2000)]
  )
  assert np.allclose(shares.sum(axis=1), 1.0)
  for c in range(k):
    assert stats.kstest(shares[:, c], stats.beta(alpha, (k - 1) * alpha).cdf).pvalue > 0.01, c


def test_quantity_skew_sizes_are_lognormal():
  """Client sizes: examples_per_client x lognormal(0, quantity_skew) (the synthetic clients), and
  shares proportional to lognormal(0, sigma) draws (partition.quantity_skew)."""
  c = base_config()
  c.num_clients, c.examples_per_client, c.batch_size, c.quantity_skew = 3000, 100_000, 1, 0.7
  z = np.log(pipeline.client_sizes(c) / c.examples_per_client)
  assert stats.kstest(z, stats.norm(0.0, 0.7).cdf).pvalue > 0.01
  sizes = np.array([len(p) for p in partition.quantity_skew(3_000_000, 3000, 0.7, seed=1, min_size=0)])
  assert sizes.sum() == 3_000_000
  z = np.log(sizes)
  assert stats.kstest(z - z.mean(), stats.norm(0.0, 0.7).cdf).pvalue > 0.01
