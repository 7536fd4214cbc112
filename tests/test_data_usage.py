"""The data layer as a person with their own folder uses it: what real exports look like (odd sizes, colour
and 16-bit PNGs, upper-case extensions, unicode names, junk files, symlinks), what a killed build leaves
behind, and what the preview says. Expected values come from PIL / numpy readings of the files written."""

import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import procs
import pytest
from PIL import Image

from fedkd.data import pipeline
from fedkd.data import tfds as fdata
from fedkd.data.tfds import folders
from test_training import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _luma(rgb):
  """ITU-R 601 luma as PIL computes it (integer weights 19595, 38470, 7471 on a 2**16 scale, rounded)."""
  r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _by_id(src):
  return {src[i]["id"]: src[i] for i in range(len(src))}


def _save(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


def test_a_real_export_folder_reads_pixel_for_pixel(tmp_path):
  """Odd sizes, RGB / 16-bit / gray+alpha / palette images, upper-case extensions on images and masks,
  a unicode name with spaces, .DS_Store / AppleDouble junk, a symlinked image and mask: every record
  equals an independent reading of its files."""
  rng = np.random.default_rng(0)
  root, expect = tmp_path / "hospital", {}

  def add(stem, ext, image, image_ref, mask_ext=".png", mode=None):
    _save(root / "images" / f"{stem}{ext}", image, mode)
    mask = rng.integers(0, 3, image.shape[:2]).astype(np.uint8)
    _save(root / "masks" / f"{stem}{mask_ext}", mask)
    expect[stem] = (image_ref, mask)

  gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
  add("odd size", ".png", gray, gray)
  rgb = rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)
  add("colour", ".png", rgb, _luma(rgb))
  deep = rng.integers(1000, 4000, (34, 34)).astype(np.uint16)  # 12 bits used of 16: min-max per image
  lo, hi = int(deep.min()), int(deep.max())
  add("deep", ".png", deep, np.round((deep.astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8))
  la = rng.integers(0, 256, (32, 36, 2), dtype=np.uint8)
  add("gray_alpha", ".png", la, la[..., 0], mode="LA")
  add("UPPER", ".PNG", gray[:33, :40], gray[:33, :40], mask_ext=".PNG")
  add("mixed", ".png", gray[:32, :32], gray[:32, :32], mask_ext=".Png")
  add("Ünïcode frame 1", ".png", gray[:36, :50], gray[:36, :50])
  # a symlinked image and mask (a folder assembled from an archive)
  store = tmp_path / "store"
  _save(store / "linked.png", gray[:35, :35])
  mask = rng.integers(0, 3, (35, 35)).astype(np.uint8)
  _save(store / "linked_mask.png", mask)
  os.symlink(store / "linked.png", root / "images" / "linked.png")
  os.symlink(store / "linked_mask.png", root / "masks" / "linked.png")
  expect["linked"] = (gray[:35, :35], mask)
  for junk in ("images/.DS_Store", "masks/.DS_Store", "images/._colour.png", "masks/._colour.png", "masks/notes.txt"):
    (root / junk).write_bytes(b"\x00\x05\x16\x07 not an image")

  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  got = _by_id(fdata.load_source("xray_folder", "train", tmp_path / "tfds"))
  assert set(got) == set(expect)
  for stem, (image, mask) in expect.items():
    assert got[stem]["image"].shape == image.shape + (1,), stem
    np.testing.assert_array_equal(got[stem]["image"][..., 0], image, err_msg=stem)
    np.testing.assert_array_equal(got[stem]["mask"], mask, err_msg=stem)


def test_a_mask_in_two_letter_cases_is_ambiguous(tmp_path):
  """x.png and x.PNG in masks/ (a case-sensitive file system): one error naming both, nothing written."""
  root = tmp_path / "h"
  _save(root / "images/x.png", np.zeros((32, 32), np.uint8))
  _save(root / "masks/x.png", np.zeros((32, 32), np.uint8))
  _save(root / "masks/x.PNG", np.ones((32, 32), np.uint8))
  with pytest.raises(fdata.DatasetInputError, match=r"ambiguous masks \['x.PNG', 'x.png'\]"):
    fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  assert fdata.prepared_configs("xray_folder", tmp_path / "tfds") == []


def test_names_in_two_unicode_forms_match(tmp_path):
  """An image listed with a decomposed (NFD, as copied off macOS) name, its mask and splits.json with the
  composed (NFC) name: one example, read from those files; two images whose names differ only in the
  form are refused as duplicates."""
  composed = "M\u00fcller r\u00e9"
  decomposed = unicodedata.normalize("NFD", composed)
  assert decomposed != composed
  root, rng = tmp_path / "h", np.random.default_rng(3)
  image, mask = rng.integers(0, 256, (32, 40), dtype=np.uint8), rng.integers(0, 3, (32, 40)).astype(np.uint8)
  _save(root / "images" / f"{decomposed}.png", image)
  _save(root / "masks" / f"{composed}.png", mask)
  for stem in ("a", "b"):
    _save(root / "images" / f"{stem}.png", image)
    _save(root / "masks" / f"{stem}.png", mask)
  (root / "splits.json").write_text(json.dumps({"train": [composed, "a"], "test": ["b.png"]}))
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  got = _by_id(fdata.load_source("xray_folder", "train", tmp_path / "tfds"))
  assert len(got) == 2
  np.testing.assert_array_equal(got[decomposed]["image"][..., 0], image)
  np.testing.assert_array_equal(got[decomposed]["mask"], mask)
  _save(root / "images" / f"{composed}.png", image)
  with pytest.raises(fdata.DatasetInputError, match="duplicate image stem"):
    fdata.build("xray_folder", tmp_path / "tfds2", manual_dir=root)


def test_mask_listing_follows_the_folder(tmp_path):
  """The cached listing of masks/ sees a mask added after a first look (the folder's mtime changes)."""
  (tmp_path / "m").mkdir()
  assert folders.mask_files(tmp_path / "m") == {}
  _save(tmp_path / "m" / "a.PNG", np.zeros((4, 4), np.uint8))
  assert folders.mask_files(tmp_path / "m") == {("a", ".png"): [tmp_path / "m" / "a.PNG"]}


def _hospital(root, n_train, n_test, seed, size=(36, 44)):
  rng = np.random.default_rng(seed)
  stems = [f"f{i}" for i in range(n_train + n_test)]
  for s in stems:
    _save(root / "images" / f"{s}.png", rng.integers(0, 256, size, dtype=np.uint8))
    _save(root / "masks" / f"{s}.png", rng.integers(0, 3, size).astype(np.uint8))
  (root / "splits.json").write_text(json.dumps({"train": stems[:n_train], "test": stems[n_train:]}))


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
  base = tmp_path_factory.mktemp("sites")
  for k, site in enumerate(["north", "south"]):
    _hospital(base / site, 5, 3 + 2 * k, seed=k)
    fdata.build("xray_folder", base / "tfds", manual_dir=base / site)
  return base / "tfds"


def test_a_killed_build_leaves_no_site_that_training_opens(two_sites, tmp_path):
  """TFDS writes dataset_info.json into incomplete.<id>_1.0.0 and renames it when done; a build killed in
  between (or an --overwrite swap interrupted, .1.0.0.old-<pid>) must not count as a prepared site: the
  run trains on the complete sites instead of stopping on the leftover."""
  data_dir = tmp_path / "tfds"
  shutil.copytree(two_sites, data_dir)
  done = data_dir / "xray_folder" / "north" / "1.0.0"
  shutil.copytree(done, data_dir / "xray_folder" / "west" / "incomplete.1a2b_1.0.0")
  shutil.copytree(done, data_dir / "xray_folder" / "east" / ".1.0.0.old-123")
  assert fdata.prepared_configs("xray_folder", data_dir) == ["north", "south"]
  with pytest.raises(fdata.DatasetInputError, match=r"xray_folder/west: not prepared in .* build it first") as e:
    fdata.load_builder("xray_folder", data_dir, config="west")
  # the command it names can be run: an xray_folder site is built from its folder and named by --site (it said
  # --config=west, which the build refuses without --manual_dir)
  assert str(e.value).endswith(
    f"python -m fedkd.data.tfds.build --dataset=xray_folder --manual_dir=<the site's image/mask folder> "
    f"--site=west --data_dir={data_dir}"
  ), e.value
  c = tiny_config(num_clients=2, clients_per_round=2)
  c.data.source, c.data.tfds_data_dir = "tfds:xray_folder", str(data_dir)
  data = pipeline.make_client_data(c)
  assert data.site_names == ["north", "south"]


def test_each_epoch_visits_every_example_once(two_sites):
  """A client's stream is a new permutation of its examples every epoch (5 train images, batch 2: batches
  span epoch boundaries), and the same (seed, client) gives the same stream."""
  c = tiny_config(num_clients=2, clients_per_round=2, batch_size=1, image_size=32)
  c.data.source, c.data.tfds_data_dir, c.data.augment = "tfds:xray_folder", str(two_sites), False
  c.eval.examples_per_site = 1
  data = pipeline.make_client_data(c)
  assert data.sizes.tolist() == [5, 5]
  src = fdata.load_source("xray_folder", "train", two_sites, config="north")
  refs = [np.asarray(Image.fromarray(src[i]["mask"]).resize((32, 32), Image.NEAREST)) for i in range(5)]

  def which(mask):
    return [i for i, r in enumerate(refs) if np.array_equal(r, mask)]

  seq = []
  for r in range(15):
    _, ys = data.round_batches(r + 1, np.array([0]))
    seq += which(ys[0, 0, 0])
  epochs = [seq[i : i + 5] for i in range(0, 15, 5)]
  assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs), epochs
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
  again = pipeline.make_client_data(c)
  _, ys = again.round_batches(1, np.array([0]))
  assert which(ys[0, 0, 0]) == seq[:1]


def test_preview_says_how_many_frames_each_site_has(two_sites, tmp_path):
  """--frames above a site's test images: the summary names the sites shown with fewer frames. A site without a
  test split is named, not left out in silence; and the quickstart's batch_size=8 above the 5 training images of
  a client, which only training draws, no longer stops the preview ('fewer than batch_size=8')."""
  data_dir = tmp_path / "tfds"
  shutil.copytree(two_sites, data_dir)
  _hospital(tmp_path / "west", 4, 0, seed=7)
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "west")
  out = tmp_path / "p.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "fedkd.data.preview", "--config=configs/quickstart.py"]
  cmd += [f"--config.data.tfds_data_dir={data_dir}", "--config.data.source=tfds:xray_folder"]
  cmd += ["--config.num_clients=3", "--config.clients_per_round=3", "--config.image_size=32", "--frames=4"]
  r = procs.run(cmd + [f"--out={out}"], cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "note: training site(s) ['west'] have no test split in the dataset: not drawn" in r.stdout, r.stdout
  # north has 3 test images, south 5: 4 frames of south, 3 of north
  assert "2 sites x up to 4 frames (--frames=4; fewer test images at: north 3)" in r.stdout, r.stdout
  img = np.asarray(Image.open(out))
  assert img.shape[1] == 2 * 4 * 128  # the widest row: 4 frame pairs, 32 px zoomed to 128


def test_a_three_class_teacher_sees_vessels_as_background():
  """FedEFM with teacher.num_classes=3 (no vessel output): vessel pixels of the vessel sources are
  background in its masks, not guidewire (the old clip to the highest class merged them into class 2),
  and no class is scored on a vessel-only source."""
  from fedkd.config import fedefm_base_config
  from fedkd.data import silos, synth

  c = fedefm_base_config()
  c.image_size = c.teacher.image_size = 16
  c.teacher.num_classes = 3
  data = silos.SiloData(c)
  n = 2
  _, masks, src = data.heldout(5, n)
  # the generator's 4-class masks of the same examples (held-out = split 1, examples 0..n-1 of every source)
  _, raw = synth.generate(
    5, data.table, np.asarray(silos.SOURCE_ROWS), np.tile(np.arange(n), (silos.NUM_SOURCES, 1)), 16, split=1
  )
  raw = np.asarray(raw).reshape(-1, 16, 16)
  assert (raw == 3).any()  # the check below has vessels to look at
  np.testing.assert_array_equal(np.asarray(masks), np.where(raw == 3, 0, raw))
  assert [data.labelled_classes(s) for s in range(silos.NUM_SOURCES)] == [(), (1,), (1, 2), (1, 2), (1, 2), ()]
  assert src.tolist() == np.repeat(np.arange(silos.NUM_SOURCES), n).tolist()


def test_a_site_smaller_than_the_batch_is_named(two_sites):
  """5 training images per site, batch 8: one line naming the client, its site and the fix, before any
  training (no traceback: a DataError is a UserError)."""
  c = tiny_config(num_clients=2, clients_per_round=2, batch_size=8)
  c.data.source, c.data.tfds_data_dir = "tfds:xray_folder", str(two_sites)
  with pytest.raises(pipeline.DataError) as e:
    pipeline.make_client_data(c)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("client 0 (site 'north') got 5 training examples, fewer than batch_size=8 (2 such clients)")


def test_conversion_notes_tell_same_named_files_apart():
  """CathAction has train/images/x.jpg and test/images/x.jpg: the note names each one distinctly."""
  from fedkd.data.tfds import decode

  notes = decode.ConversionNotes()
  for split in ("train", "test"):
    notes.add(decode.NOTE_COLOUR, Path(f"/data/CathAction/{split}/images/frame 0.JPG"))
  notes.add(decode.NOTE_HIGH_DEPTH, Path("/data/h/images/a.png"))
  assert notes.lines() == [
    f"note: {decode.NOTE_COLOUR}: 2 file(s) [train/images/frame 0.JPG, test/images/frame 0.JPG]",
    f"note: {decode.NOTE_HIGH_DEPTH}: 1 file(s) [images/a.png]",
  ]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])  # Notepad's UTF-8 with BOM; PowerShell 5's `>`
def test_splits_json_saved_by_windows_editors(tmp_path, encoding):
  root = tmp_path / "h"
  stems = ["a", "b", "\u00e9t\u00e9"]
  for s in stems:
    _save(root / "images" / f"{s}.png", np.zeros((32, 32), np.uint8))
    _save(root / "masks" / f"{s}.png", np.zeros((32, 32), np.uint8))
  text = json.dumps({"train": stems[:2], "test": stems[2:]}, ensure_ascii=False)
  (root / "splits.json").write_bytes(text.encode(encoding))
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  test = fdata.load_source("xray_folder", "test", tmp_path / "tfds")
  assert [test[i]["id"] for i in range(len(test))] == [stems[2]]


def test_a_source_sent_to_a_worker_process_logs_nothing(two_sites, caplog):
  """data.workers pickles every site's source to each worker; unpickling rebuilds the TFDS builder of the
  unregistered xray_folder config, whose "Using custom data configuration" warning used to appear once per
  site and worker. The copy reads the same records."""
  import pickle

  src = fdata.load_source("xray_folder", "train", two_sites, config="south")
  with caplog.at_level("INFO"):
    copy = pickle.loads(pickle.dumps(src))
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
  assert len(copy) == len(src) == 5 and copy.name == src.name
  for i in range(len(src)):
    np.testing.assert_array_equal(copy[i]["image"], src[i]["image"])
    np.testing.assert_array_equal(copy[i]["mask"], src[i]["mask"])


def test_cathaction_refuses_a_label_without_its_image(tmp_path):
  """An incomplete extraction (a train label whose JPEG is missing) used to be dropped silently; the same
  stem in train/ and test/ is fine (orphans are looked for per labels/ folder)."""
  root = tmp_path / "CathAction"
  for split in ("train", "test"):
    _save(root / split / "images" / "frame 0.jpg", np.full((32, 32), 100, np.uint8))
    _save(root / split / "labels" / "frame 0.png", np.zeros((32, 32), np.uint8))
  fdata.build("cathaction", tmp_path / "ok", manual_dir=root)
  assert len(fdata.load_source("cathaction", "test", tmp_path / "ok")) == 1
  _save(root / "train" / "labels" / "frame 1.png", np.zeros((32, 32), np.uint8))
  with pytest.raises(fdata.DatasetInputError) as e:
    fdata.build("cathaction", tmp_path / "tfds", manual_dir=root)
  assert str(e.value).startswith(f"{root / 'train' / 'labels' / 'frame 1.png'}: mask without an image")
  assert "move the mask out of labels/" in str(e.value)
  assert fdata.prepared_configs("cathaction", tmp_path / "tfds") == []


def test_build_summary_into_a_closed_pipe_is_not_an_error(two_sites, tmp_path):
  """`build ... | head -0`: the dataset is prepared, the summary has nowhere to go; that is exit 0 with no
  error line (it used to print "error: I/O error while building ... Broken pipe")."""
  import subprocess

  data_dir = tmp_path / "tfds"
  shutil.copytree(two_sites, data_dir)
  cmd = [sys.executable, "-m", "fedkd.data.tfds.build", "--dataset=xray_folder"]
  cmd += [f"--manual_dir={two_sites.parent / 'north'}", f"--data_dir={data_dir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  p.stdout.close()  # the reader is gone before the summary is written
  err = p.stderr.read().decode()
  assert p.wait(timeout=300) == 0, err
  assert "error" not in err.lower(), err
  assert fdata.prepared_configs("xray_folder", data_dir) == ["north", "south"]


def test_the_build_command_a_missing_preset_site_names_builds_it(tmp_path):
  """'west-rgb' (site west, rgb mask preset) was to be built with --site=west-rgb: a site of that name with the
  default label map. The named flags, run, make exactly the missing config."""
  root = tmp_path / "west"
  rng = np.random.default_rng(0)
  colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
  for s in ("a", "b", "c"):
    _save(root / "images" / f"{s}.png", rng.integers(0, 256, (36, 36), dtype=np.uint8))
    _save(root / "masks" / f"{s}.png", colours[rng.integers(0, 3, (36, 36))])
  (root / "splits.json").write_text(json.dumps({"train": ["a", "b"], "test": ["c"]}))
  data_dir = tmp_path / "tfds"
  with pytest.raises(fdata.DatasetInputError) as e:
    fdata.load_builder("xray_folder", data_dir, config="west-rgb")
  flags = str(e.value).split("python -m fedkd.data.tfds.build ")[1].split()
  assert flags == [
    "--dataset=xray_folder",
    "--manual_dir=<the",
    "site's",
    "image/mask",
    "folder>",
    "--site=west",
    "--config=rgb",
    f"--data_dir={data_dir}",
  ], flags
  fdata.build("xray_folder", data_dir, manual_dir=root, site="west", config="rgb")  # what those flags do
  assert fdata.prepared_configs("xray_folder", data_dir) == ["west-rgb"]
