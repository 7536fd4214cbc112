"""The data preview a person looks at: one labelled row per site, frames with mask overlays."""

import os
import sys

import numpy as np
import procs
from PIL import Image

from fedkd.report import overlay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preview_grid_per_site(tmp_path):
  out = tmp_path / "p.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  r = procs.run(
    [
      sys.executable,
      "-m",
      "fedkd.data.preview",
      "--config=configs/quickstart.py",
      "--config.image_size=32",
      "--frames=2",
      f"--out={out}",
    ],
    cwd=ROOT,
    env=env,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "5 sites x 2 frames" in r.stdout
  img = np.asarray(Image.open(out))
  # 32 px frames zoomed 4x to 128 px; a title line and a legend line (14 px each), then 4 training sites +
  # the unseen one, each with a 14 px label strip
  assert img.shape == (2 * 14 + 5 * (128 + 14), 2 * 2 * 128, 3)
  assert "labels drawn: red catheter, green guidewire (legend in the picture)" in r.stdout  # no vessel drawn
  legend = {tuple(c) for c in img[:28].reshape(-1, 3)}
  assert (235, 64, 52) in legend and (60, 220, 60) in legend and (70, 120, 255) not in legend


def test_overlay_tints_only_labelled_pixels():
  image = np.full((2, 2), 0.5)
  mask = np.array([[0, 1], [2, 3]])
  rgb = overlay(image, mask, alpha=1.0)
  assert tuple(rgb[0, 0]) == (128, 128, 128)
  assert tuple(rgb[0, 1]) == (235, 64, 52)  # catheter red
  assert tuple(rgb[1, 0]) == (60, 220, 60)  # guidewire green
  assert tuple(rgb[1, 1]) == (70, 120, 255)  # vessel blue


def test_preview_bad_config_is_one_line(cli):
  args = ["--config=configs/quickstart.py", "--config.data.source=tfds:no_such_dataset", "--out=/tmp/never.png"]
  r = cli.run("fedkd.data.preview", args)
  assert r.code == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("fedkd: error:") and not r.traceback


def test_preview_out_below_a_file_names_both(cli, tmp_path):
  blocker = tmp_path / "afile"
  blocker.write_text("keep")
  out = blocker / "sub" / "p.png"
  r = cli.run("fedkd.data.preview", ["--config=configs/quickstart.py", f"--out={out}"])
  assert r.code == 2 and not r.traceback
  assert f"--out={out}: {blocker} is a file, not a folder" in r.stderr
  assert blocker.read_text() == "keep"


def test_preview_out_that_is_a_folder_says_so(cli, tmp_path):
  """A folder named like a picture was called a path not ending in .png."""
  folder = tmp_path / "dir.png"
  folder.mkdir()
  r = cli.run("fedkd.data.preview", ["--config=configs/quickstart.py", f"--out={folder}"])
  assert r.code == 2 and not r.traceback
  assert f"--out={folder} is a folder; name the image file to write, e.g. --out={folder / 'preview.png'}" in r.stderr
  assert not list(folder.iterdir())


def test_preview_scale_too_large_is_one_line(cli, tmp_path):
  """--scale=1000 at 64 px would draw frames of 64,000 px (GiBs of picture): refused before any data is made."""
  out = tmp_path / "p.png"
  r = cli.run("fedkd.data.preview", ["--config=configs/quickstart.py", "--scale=1000", f"--out={out}"])
  assert r.code == 2 and not r.traceback
  assert "--scale=1000 draws each 64px frame at 64000px, above 2048px; pass --scale <= 32" in r.stderr
  assert not out.exists()


def test_scale_limit_never_refuses_frames_at_their_own_size():
  from fedkd.data.preview import scale_problem

  for size in (64, 2048, 4096):
    assert scale_problem(0, size) is None and scale_problem(1, size) is None  # as large as the data itself
  assert scale_problem(32, 64) is None  # 2048 px
  assert "pass --scale <= 32" in scale_problem(33, 64)
  assert "pass --scale <= 1" in scale_problem(2, 4096)
