"""A hospital folder's mistakes the build used to miss or misname: a split TFDS reserves, two images whose
records or masks collide, a mask folder holding a JPEG or a broken link, a cut-short uncompressed DICOM, a site
name too long for a folder, a damaged prepared dataset, Ctrl-C, and the temporary folder of a killed rebuild.
Each is one problem naming the files and the fix; the expected texts name what the test wrote."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fedkd.data import tfds as fdata
from fedkd.data.tfds import api

from fedkd.data.tfds.records import DatasetInputError

pytest.importorskip("pydicom")
from test_dicom import new_dataset  # noqa: E402

build_cli = importlib.import_module("fedkd.data.tfds.build")  # the package attribute is the function

H = W = 40


def _folder(root, stems=("x0", "x1", "x2"), test=("x2",)):
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i, s in enumerate(stems):
    Image.fromarray(np.full((H, W), 10 * i, np.uint8)).save(root / "images" / f"{s}.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / f"{s}.png")
  _splits(root, [s for s in stems if s not in test], list(test))
  return root


def _splits(root, train, test, **more):
  (root / "splits.json").write_text(json.dumps({"train": list(train), "test": list(test), **more}))


def _cine(path, frames=2):
  new_dataset(np.arange(frames * H * W, dtype=np.uint8).reshape(frames, H, W)).save_as(path, enforce_file_format=True)


def _problems(tmp_path, folder, **kw) -> list[str]:
  with pytest.raises(DatasetInputError) as e:
    fdata.build("xray_folder", tmp_path / "tfds", manual_dir=folder, **kw)
  assert fdata.prepared_configs("xray_folder", tmp_path / "tfds") == []
  return e.value.problems


@pytest.mark.parametrize("name", ["all", "ALL", "All"])
def test_a_split_named_all_is_refused(tmp_path, name):
  """TFDS reads 'all' in any case as every split together: the build ended in its ValueError traceback."""
  folder = _folder(tmp_path / "h", stems=("x0", "x1", "x2", "x3"))
  _splits(folder, ["x0", "x1"], ["x2"], **{name: ["x3"]})
  assert _problems(tmp_path, folder) == [
    f"{folder / 'splits.json'}: split name {name!r} is reserved by TFDS (it means every split); use another name"
  ]


def _gray(path):
  Image.fromarray(np.zeros((H, W), np.uint8)).save(path)


@pytest.mark.parametrize(
  "cine_masks, single, problem",
  [
    # frame 1 of cine a.dcm and the image a#1.png both became record 'a#1' (ids are documented unique)
    (
      ["a.npy"],
      "a#1",
      "{images}/a#1.png: its record id 'a#1' is also the id of a.dcm (frame f of a cine file X gets the id 'X#f'); "
      "rename one of them",
    ),
    # masks/a_0001.png was both frame 1's mask of cine a.dcm and the mask of image a_0001.png
    (
      ["a_0000.png", "a_0001.png"],
      "a_0001",
      "{masks}/a_0001.png: read as the mask of both a.dcm and a_0001.png (frame f of a cine file X takes the "
      "per-frame mask X_<f:04d>.png); rename one of the images",
    ),
  ],
)
def test_two_images_that_would_share_a_record_id_or_a_mask_are_refused(tmp_path, cine_masks, single, problem):
  folder = _folder(tmp_path / "h")
  _cine(folder / "images" / "a.dcm")
  for name in cine_masks:
    if name.endswith(".npy"):
      np.save(folder / "masks" / name, np.zeros((2, H, W), np.uint8))
    else:
      _gray(folder / "masks" / name)
  _gray(folder / "images" / f"{single}.png")
  if single + ".png" not in cine_masks:
    _gray(folder / "masks" / f"{single}.png")
  _splits(folder, ["x0", "x1", "a", single], ["x2"])
  assert _problems(tmp_path, folder) == [problem.format(images=folder / "images", masks=folder / "masks")]


def test_a_missing_mask_names_what_stands_in_its_place(tmp_path):
  """A JPEG mask, or a link whose target moved: the message said only 'missing mask', naming neither."""
  folder = _folder(tmp_path / "h")
  (folder / "masks" / "x0.png").rename(folder / "masks" / "x0.jpg")
  (folder / "masks" / "x1.png").unlink()
  (folder / "masks" / "x1.png").symlink_to(tmp_path / "moved.png")
  expected = "{m}: missing mask; expected {e} (or {s}.dcm / {s}.npy), and {why}; add it or remove the image"
  assert _problems(tmp_path, folder) == [
    expected.format(
      m=folder / "images" / "x0.png",
      e=folder / "masks" / "x0.png",
      s="x0",
      why="x0.jpg is a JPEG (lossy compression changes label values: save masks as PNG)",
    ),
    expected.format(
      m=folder / "images" / "x1.png",
      e=folder / "masks" / "x1.png",
      s="x1",
      why=f"x1.png is a broken link (to {tmp_path / 'moved.png'})",
    ),
  ]


def test_a_cut_short_uncompressed_dicom_is_not_sent_to_a_decoder_plugin(tmp_path):
  """The advice was to install JPEG plugins or decompress, for a file that is not compressed."""
  folder = _folder(tmp_path / "h")
  path = folder / "images" / "c.dcm"
  _cine(path)
  path.write_bytes(path.read_bytes()[: -H * W])  # the second frame's pixels cut off
  np.save(folder / "masks" / "c.npy", np.zeros((2, H, W), np.uint8))
  _splits(folder, ["x0", "x1", "c"], ["x2"])
  (problem,) = _problems(tmp_path, folder)
  assert problem.startswith(f"{path}: cannot decode DICOM pixel data (transfer syntax 1.2.840.10008.1.2.1;"), problem
  assert problem.endswith(
    "the file is uncompressed, so its pixel data is damaged, cut short or laid out in a way pydicom cannot read: "
    "re-export it or remove it"
  ), problem
  assert "pylibjpeg" not in problem


def test_a_dicom_of_a_private_transfer_syntax_that_does_not_decode_is_one_problem(tmp_path):
  """pydicom raises ValueError ('UID is not a transfer syntax') when asked whether a private one is compressed."""
  folder = _folder(tmp_path / "h")
  path = folder / "images" / "p.dcm"
  _cine(path)
  data = path.read_bytes()
  explicit, private = b"1.2.840.10008.1.2.1\x00", b"1.2.840.113619.5.22\x00"  # same length: a GE private syntax
  path.write_bytes(data.replace(explicit, private, 1)[: -H * W])
  np.save(folder / "masks" / "p.npy", np.zeros((2, H, W), np.uint8))
  _splits(folder, ["x0", "x1", "p"], ["x2"])
  (problem,) = _problems(tmp_path, folder)
  assert problem.startswith(f"{path}: cannot decode DICOM pixel data (transfer syntax 1.2.840.113619.5.22;"), problem


def test_a_site_name_too_long_for_a_folder_is_refused(tmp_path):
  """It was an OSError 'File name too long' with advice to check that --data_dir is writable."""
  folder = _folder(tmp_path / "h")
  (problem,) = _problems(tmp_path, folder, site="s" * 250)
  assert problem == (
    f"the config name {'s' * 40!r}... is 250 bytes long, more than a folder name of the dataset may be (200); give "
    "a shorter name (CLI: --site=NAME or --config=NAME)"
  )


def test_a_damaged_prepared_dataset_is_named(tmp_path, capsys):
  folder = _folder(tmp_path / "hosp")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=folder)
  (shard,) = data_dir.glob("xray_folder/hosp/*/*train.array_record*")
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  capsys.readouterr()  # the build's progress bars
  code = build_cli.main(["--dataset=xray_folder", f"--manual_dir={folder}", f"--data_dir={data_dir}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: xray_folder/hosp train: "), err


def test_ctrl_c_during_a_build_is_one_line(tmp_path, capsys, monkeypatch):
  """Ctrl-C printed a KeyboardInterrupt traceback (the old dataset stays, as api.build's own tests check)."""

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(build_cli, "build", interrupted)
  folder = _folder(tmp_path / "h")
  code = build_cli.main(["--dataset=xray_folder", f"--manual_dir={folder}", f"--data_dir={tmp_path / 'tfds'}"])
  assert code == 130
  assert capsys.readouterr().err.strip().splitlines() == [
    "interrupted: nothing was prepared (a version prepared before is kept as it was); run the command again"
  ]


def test_ctrl_c_after_an_overwrite_swapped_its_new_version_in_says_so(tmp_path, capsys, monkeypatch):
  """Ctrl-C while the replaced version was being deleted: it said nothing was prepared, with the new version in
  place."""
  folder = _folder(tmp_path / "h")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=folder)
  real = api.build

  def built_then_interrupted(*args, **kwargs):
    real(*args, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(build_cli, "build", built_then_interrupted)
  capsys.readouterr()
  code = build_cli.main(["--dataset=xray_folder", f"--manual_dir={folder}", f"--data_dir={data_dir}", "--overwrite"])
  (version,) = data_dir.glob("xray_folder/h/*")
  assert code == 130
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
    f"interrupted: the dataset in {version} is prepared; run the command again to see its summary"
  )


def _built_with_an_ended_pid(tmp_path):
  """A site built in tmp_path/tfds, this host's name and the pid of a process that has ended."""
  folder = _folder(tmp_path / "h")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=folder)
  ended = subprocess.Popen([sys.executable, "-c", "pass"])
  ended.wait()
  return folder, data_dir, socket.gethostname(), ended.pid


def test_a_killed_rebuilds_folder_is_removed_by_the_next_one(tmp_path):
  """An --overwrite build SIGKILLed mid-way left data_dir/.fedkd-rebuild-<pid> for good (its pid never comes
  back). The next rebuild removes this host's folders of processes that ended; another host's stays."""
  folder, data_dir, host, pid = _built_with_an_ended_pid(tmp_path)
  dead, other, old_style = (data_dir / n for n in (f".fedkd-rebuild-{host}-{pid}", ".fedkd-rebuild-elsewhere-1", ".x"))
  (version,) = data_dir.glob("xray_folder/h/*")
  replaced = version.parent / f".{version.name}.old-{host}-{pid}"  # killed before it deleted the old version
  for d in (dead, other, old_style, replaced):
    (d / "xray_folder").mkdir(parents=True)
  fdata.build("xray_folder", data_dir, manual_dir=folder, overwrite=True)
  assert not dead.exists() and not replaced.exists() and other.exists() and old_style.exists()
  assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith(api._REBUILD_PREFIX)) == [other.name]
  assert os.path.isfile(next(data_dir.glob("xray_folder/h/*/dataset_info.json")))


def test_a_running_rebuild_of_another_container_with_this_host_name_is_left_alone(tmp_path):
  """Two containers with one host name on one data_dir: the other's build runs under a pid this container does
  not see, so its rebuild folder was removed as a dead one, mid-build. A build's lock file, locked while it runs,
  now tells; a build killed before its cleanup leaves its lock free, and its leftovers (lock file too) go."""
  folder, data_dir, host, pid = _built_with_an_ended_pid(tmp_path)
  running, killed = (f".fedkd-rebuild-{host}-{pid}", f".fedkd-rebuild-{host}-{pid}-0a1b2c3d")
  # host 'HOST-b', whose name begins with this one's: another host's build, whatever its lock says here
  other_host = f".fedkd-rebuild-{host}-b-{pid}-0a1b2c3d"
  for name in (running, killed, other_host):
    (data_dir / name / "xray_folder").mkdir(parents=True)
    (data_dir / (name + ".lock")).touch()
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
      "print('locked', flush=True); time.sleep(600)",
      str(data_dir / (running + ".lock")),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    fdata.build("xray_folder", data_dir, manual_dir=folder, overwrite=True)
    left = sorted(p.name for p in data_dir.iterdir() if p.name.startswith(api._REBUILD_PREFIX))
    assert left == sorted([running, running + ".lock", other_host, other_host + ".lock"]), left  # own lock gone too
    assert not list(data_dir.glob(".fedkd-lock-*"))
  finally:
    holder.kill()
    holder.wait()
  assert os.path.isfile(next(data_dir.glob("xray_folder/h/*/dataset_info.json")))


def test_the_lock_file_of_a_build_killed_while_making_it_is_removed_once_free_and_old(tmp_path):
  """A build killed between creating its lock file (.fedkd-lock-<owner>) and renaming it into place left the 0-byte
  file for good. The next rebuild removes this host's such files whose lock is free and that are over a minute
  old; a locked one, a new one (perhaps about to be locked) and another host's stay."""
  folder, data_dir, host, pid = _built_with_an_ended_pid(tmp_path)
  names = {
    k: f".fedkd-lock-{h}-{pid}-0a1b2c{k}" for k, h in (("d0", host), ("d1", host), ("d2", host), ("d3", "elsewhere"))
  }
  for name in names.values():
    (data_dir / name).touch()
  hour_ago = time.time() - 3600
  for k in ("d0", "d2", "d3"):
    os.utime(data_dir / names[k], (hour_ago, hour_ago))
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
      "print('locked', flush=True); time.sleep(600)",
      str(data_dir / names["d2"]),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    fdata.build("xray_folder", data_dir, manual_dir=folder, overwrite=True)
  finally:
    holder.kill()
    holder.wait()
  assert sorted(p.name for p in data_dir.glob(".fedkd-lock-*")) == sorted(names[k] for k in ("d1", "d2", "d3"))


def test_a_palette_mask_under_a_color_map_says_it_is_a_palette_png(tmp_path):
  """It said 'not an RGB image (shape ...); pass label_map for gray masks': nothing about the palette."""
  folder = _folder(tmp_path / "h")
  p = Image.fromarray(np.zeros((H, W), np.uint8), mode="P")
  p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  p.save(folder / "masks" / "x0.png")
  for s in ("x1", "x2"):  # colour masks, as the color_map expects
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "masks" / f"{s}.png")
  (problem,) = _problems(tmp_path, folder, color_map={(0, 0, 0): 0, (255, 0, 0): 1})
  assert problem == (
    f"{folder / 'masks' / 'x0.png'}: a palette PNG, whose values are palette indices, not colours, so color_map "
    "does not apply; save the masks as RGB PNGs, or pass label_map (palette index:class) instead of color_map"
  )
