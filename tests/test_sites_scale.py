"""The data preview's picture size limit, checked against the image reader that opens the picture (PIL), and the
synthetic clients' site table at cross-device scale, against the profiles and a loop over the jitter rule."""

import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from fedkd.data import preview
from fedkd.data import sites as sites_lib


def test_preview_refuses_a_picture_that_pil_cannot_open(tmp_path):
  """The quickstart's rows (64 px frames zoomed to 128 px: a 28 px header + 5 x (128 + 14) px = 738 px high)
  at --frames=948 make a 242,688 x 738 px picture, which PIL's Image.open refuses; 947 frames still open."""
  height, pair = 738, 2 * 128
  fits, too_many = 947 * pair, 948 * pair
  for width in (fits, too_many):
    Image.new("1", (width, height)).save(tmp_path / f"{width}.png")  # 1 bit a pixel: ~20 kB, no RAM cost
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # above half the limit PIL warns, still opens
    assert Image.open(tmp_path / f"{fits}.png").size == (fits, height)
    with pytest.raises(Image.DecompressionBombError):
      Image.open(tmp_path / f"{too_many}.png")

  out = str(tmp_path / "p.png")
  assert preview.picture_problem(out, fits, height, 128) is None
  problem = preview.picture_problem(out, too_many, height, 128)
  assert problem is not None and f"{too_many} x {height} px" in problem and "--frames <= 947" in problem, problem
  # rows alone past the limit (--config.eval.max_sites=0 on 10,000 clients): fewer frames cannot help
  problem = preview.picture_problem(out, 2 * 128, 10_001 * 142 + 28, 128)
  assert problem is not None and "--config.eval.max_sites" in problem and "--frames" not in problem, problem


def test_preview_with_too_many_frames_is_one_line_and_writes_nothing(cli, tmp_path):
  """--frames=1000 on the quickstart would render 5,000 frames into a 256,000 x 738 px PNG (189 Mpx, ~0.6 GB to
  draw) that PIL then refuses to open: refused before any frame is rendered, nothing written."""
  out = tmp_path / "p.png"
  r = cli.run("fedkd.data.preview", ["--config=configs/quickstart.py", "--frames=1000", f"--out={out}"])
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "256000 x 738 px" in lines[0] and "--frames <= 947" in lines[0], lines
  assert not out.exists()


@pytest.mark.parametrize("data_type", sites_lib.DATA_TYPES)
def test_client_table_is_the_table_of_the_profiles(data_type):
  for n in (1, 4, 5, 6, 13):
    train, unseen = sites_lib.make_sites(n, data_type)
    reference = sites_lib.site_table(train + [unseen])
    table = sites_lib.client_table(n, data_type)
    assert table.keys() == reference.keys()
    for key, want in reference.items():
      assert table[key].dtype == want.dtype and np.array_equal(table[key], want), (n, key)
    assert [sites_lib.client_name(k) for k in range(n)] == [p.name for p in train]


def test_client_jitter_follows_the_documented_rule():
  """Client 12 (after the 5 bases: base 12 % 5 = 2, silicone_phantom): every (lo, hi) scaled by factors from
  default_rng(10_007 + 12) in [0.88, 1.12), a fixed knob kept fixed, clamped to KNOB_INFO's limits, ordered."""
  base = sites_lib.BASE_SITES[2]
  factors = np.random.default_rng(10_007 + 12).uniform(0.88, 1.12, size=(len(sites_lib.KNOBS), 2))
  table = sites_lib.client_table(13)
  profile = sites_lib.make_sites(13)[0][12]
  assert profile.name == "silicone_phantom_c12"
  for i, (knob, (lim_lo, lim_hi, _)) in enumerate(sites_lib.KNOB_INFO.items()):
    lo, hi = getattr(base, knob)
    new_lo = lo * factors[i, 0]
    new_hi = new_lo if lo == hi else hi * factors[i, 1]
    new_lo, new_hi = sorted(min(max(v, lim_lo), lim_hi) for v in (new_lo, new_hi))
    assert getattr(profile, knob) == (new_lo, new_hi), knob
    assert tuple(table[knob][12]) == (np.float32(new_lo), np.float32(new_hi)), knob


def test_client_table_at_cross_device_scale_is_small():
  """50,000 clients (config.MAX_CLIENTS allows 10,000,000): the table is 50,001 x 25 knobs x (lo, hi) float32,
  10 MB; make_sites' profiles for as many take ~3 KB a client (150 MB) and ~10x the time."""
  tracemalloc.start()
  try:
    table = sites_lib.client_table(50_000)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert table["dose"].shape == (50_001, 2) and table["data_type"].shape == (50_001,)
  assert peak < 40e6, peak
  assert tuple(table["dose"][-1]) == sites_lib.UNSEEN_SITE.dose  # the last row is the unseen site
  assert sites_lib.client_name(49_999) == f"{sites_lib.BASE_SITES[49_999 % 5].name}_c49999"


def test_synthetic_clients_use_the_table_of_the_profiles():
  """The training data's table and names are make_sites' (the images of every published run depend on them)."""
  from fedkd.config import base_config
  from fedkd.data.pipeline import SyntheticClients

  c = base_config()
  c.num_clients = 12
  data = SyntheticClients(c)
  train, unseen = sites_lib.make_sites(12)
  reference = sites_lib.site_table(train + [unseen])
  assert data.table.keys() == reference.keys() and all(np.array_equal(data.table[k], reference[k]) for k in reference)
  assert list(data.site_names) == [p.name for p in train] and data.unseen_name == unseen.name


@pytest.mark.parametrize(
  "num_clients, data_type, digest",
  [
    (13, "catheter_guidewire", "7bb44f63943eedf8"),
    (13, "catheter", "2e0a7aaf04981d95"),
    (13, "vessel", "f57182d9b8d0dda1"),
    (13, "all", "ec1e35da02959feb"),
    (9000, "catheter_guidewire", "c527896dec129b09"),  # past client_table's 4,096-client chunks
  ],
)
def test_client_table_is_the_published_runs_table(num_clients, data_type, digest):
  """The bytes of site_table(make_sites(n) + [unseen]) as fedkd built them before client_table existed
  (sha256 over sorted key + bytes, computed from that code), which every published synthetic number used:
  client_table and make_sites must both keep them, whatever later refactors of the jitter."""
  import hashlib

  train, unseen = sites_lib.make_sites(num_clients, data_type)
  for table in (sites_lib.client_table(num_clients, data_type), sites_lib.site_table(train + [unseen])):
    h = hashlib.sha256()
    for key in sorted(table):
      h.update(key.encode())
      h.update(table[key].tobytes())
    assert h.hexdigest()[:16] == digest
