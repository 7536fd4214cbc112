"""TFDS builders (fedkd.data.tfds): array_record datasets read back without TensorFlow.

All input data is created here in tmp dirs (PIL-written PNG/JPEG, pydicom-written DICOM).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import procs
import pytest

pydicom = pytest.importorskip("pydicom")
from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

import tensorflow_datasets as tfds  # noqa: E402

from fedkd.data import sites, synth  # noqa: E402
from fedkd.data import tfds as fdata  # noqa: E402
from fedkd.data.tfds import folders  # noqa: E402

XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ writers
def write_png(path: Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.asarray(arr)
  im = Image.fromarray(arr)  # uint16 -> mode I;16 (Pillow >= 10; the mode= argument is gone)
  assert arr.dtype != np.uint16 or im.mode == "I;16", im.mode
  im.save(path)


def write_dicom(path: Path, pixels: np.ndarray, window=None, photometric="MONOCHROME2"):
  """Uncompressed Explicit VR Little Endian XA object; pixels [H, W] or [F, H, W]."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.ascontiguousarray(pixels)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = XA_STORAGE
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = XA_STORAGE
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "XA"
  ds.Rows, ds.Columns = pixels.shape[-2:]
  if pixels.ndim == 3:
    ds.NumberOfFrames = pixels.shape[0]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  bits = pixels.dtype.itemsize * 8
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
  ds.PixelRepresentation = 0
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  ds.PixelData = pixels.tobytes()
  ds.save_as(path, enforce_file_format=True)


def minmax_u8(x):
  x = np.asarray(x, np.float64)
  return np.round((x - x.min()) * 255.0 / (x.max() - x.min())).astype(np.uint8)


def records_by_id(src):
  return {src[i]["id"]: src[i] for i in range(len(src))}


def rng_mask(rng, shape, classes=4):
  return rng.integers(0, classes, size=shape).astype(np.uint8)


# ------------------------------------------------------------------------------ xray_folder
@pytest.fixture
def hospital(tmp_path):
  """A hospital folder with PNG (gray + RGB), DICOM (windowed, min-max, named by UID and extension-less) and two
  cine DICOMs.
  Returns (folder, expected {id: (image uint8 [H, W], mask uint8 [H, W])})."""
  rng = np.random.default_rng(0)
  root = tmp_path / "hospital_a"
  exp = {}
  # 8-bit gray PNG, PNG mask with class indices.
  img = rng.integers(0, 256, (40, 34), dtype=np.uint8)
  m = rng_mask(rng, (40, 34))
  write_png(root / "images/a.png", img)
  write_png(root / "masks/a.png", m)
  exp["a"] = (img, m)
  # RGB PNG (gray expected via luma, +-1), .npy mask.
  rgb = rng.integers(0, 256, (33, 37, 3), dtype=np.uint8)
  m = rng_mask(rng, (33, 37))
  write_png(root / "images/c.png", rgb)
  np.save(root / "masks/c.npy", m)
  exp["c"] = (np.round(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8), m)
  # 16-bit DICOM with a VOI window (center 2000, width 1001), mask as PNG.
  px = rng.integers(1000, 3000, (32, 32)).astype(np.uint16)
  m = rng_mask(rng, (32, 32))
  write_dicom(root / "images/d.dcm", px, window=(2000, 1001))
  write_png(root / "masks/d.png", m)
  lin = ((px.astype(float) - 1999.5) / 1000.0 + 0.5) * 255.0  # PS3.3 C.11.2.1.2.1
  exp["d"] = (np.clip(np.round(lin), 0, 255).astype(np.uint8), m)
  # DICOM files named as PACS exports name them: by their SOP Instance UID (the "extension" .1 is part of the
  # name) and without an extension; each name is the stem whole, so the masks are <name>.png.
  for name in ("1.2.826.0.1.3680043.8.498.1", "IM000001"):
    px = rng.integers(1000, 3000, (32, 33)).astype(np.uint16)
    m = rng_mask(rng, (32, 33))
    write_dicom(root / "images" / name, px, window=(2000, 1001))
    write_png(root / f"masks/{name}.png", m)
    exp[name] = (np.clip(np.round(((px.astype(float) - 1999.5) / 1000.0 + 0.5) * 255.0), 0, 255).astype(np.uint8), m)
  # 16-bit DICOM without window: min-max scaled.
  px = rng.integers(0, 4096, (34, 32)).astype(np.uint16)
  m = rng_mask(rng, (34, 32))
  write_dicom(root / "images/e.dcm", px)
  write_png(root / "masks/e.png", m)
  exp["e"] = (minmax_u8(px), m)
  # Multi-frame 16-bit cine (3 frames), per-frame PNG masks.
  cine = rng.integers(0, 65536, (3, 36, 33)).astype(np.uint16)
  for f in range(3):
    m = rng_mask(rng, (36, 33))
    write_png(root / f"masks/cine_{f:04d}.png", m)
    exp[f"cine#{f}"] = (minmax_u8(cine[f]), m)  # min-max per frame
  write_dicom(root / "images/cine.dcm", cine)
  # Multi-frame cine (2 frames, MONOCHROME1), one multi-frame DICOM mask.
  cine2 = rng.integers(100, 900, (2, 33, 32)).astype(np.uint16)
  m2 = rng_mask(rng, (2, 33, 32))
  write_dicom(root / "images/cine2.dcm", cine2, photometric="MONOCHROME1")
  write_dicom(root / "masks/cine2.dcm", m2)
  for f in range(2):
    exp[f"cine2#{f}"] = (255 - minmax_u8(cine2[f]), m2[f])
  return root, exp


def test_xray_folder_records_match_written_arrays(hospital, tmp_path):
  root, exp = hospital
  data_dir = tmp_path / "tfds"
  builder = fdata.build("xray_folder", data_dir, manual_dir=root)
  assert builder.info.config_name == "hospital_a"
  assert builder.info.file_format.file_suffix == "array_record"
  assert list(builder.info.splits.keys()) == ["train"]
  src = fdata.load_source("xray_folder", "train", data_dir)  # the only prepared config
  assert len(src) == 6 + 3 + 2 == len(exp)  # images + cine frames
  got = records_by_id(src)
  assert set(got) == set(exp)
  for key, (img, mask) in exp.items():
    rec = got[key]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == img.shape + (1,)
    assert rec["mask"].dtype == np.uint8 and rec["mask"].shape == mask.shape
    assert rec["site"] == "hospital_a"
    np.testing.assert_array_equal(rec["mask"], mask, err_msg=key)
    tol = 1 if key == "c" else 0  # luma rounding of PIL's integer RGB->L
    diff = np.abs(rec["image"][..., 0].astype(int) - img.astype(int))
    assert diff.max() <= tol, key
  # Reading through the TFDS API directly (files only, no TensorFlow) works too.
  tsrc = tfds.data_source("xray_folder/hospital_a", split="train", data_dir=str(data_dir))
  assert len(tsrc) == len(exp)


def test_xray_folder_splits_site_and_label_map(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "site_folder"
  for i in range(5):
    write_png(root / f"images/im{i}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    write_png(root / f"masks/im{i}.png", rng.choice(np.array([0, 128, 255], np.uint8), (32, 32)))
  (root / "splits.json").write_text(json.dumps({"train": ["im0", "im1", "im2"], "test": ["im3", "im4.png"]}))
  data_dir = tmp_path / "tfds"
  with pytest.raises(fdata.DatasetInputError, match=r"im0\.png.*unknown label value"):
    fdata.build("xray_folder", data_dir, manual_dir=root)
  builder = fdata.build("xray_folder", data_dir, manual_dir=root, site="hosp B", label_map={0: 0, 128: 1, 255: 2})
  assert builder.info.config_name == "hosp_B"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "test": 2}
  src = fdata.load_source("xray_folder", "test", data_dir, config="hosp_B")
  rec = records_by_id(src)["im4"]
  raw = np.asarray(Image.open(root / "masks/im4.png"))
  np.testing.assert_array_equal(rec["mask"], np.select([raw == 128, raw == 255], [1, 2], 0))
  assert rec["site"] == "hosp B"
  # Same config name, other settings: refused instead of silently reusing the old records.
  with pytest.raises(fdata.DatasetInputError, match="already prepared with other settings"):
    fdata.build("xray_folder", data_dir, manual_dir=root, site="hosp B", label_map={0: 0, 128: 2, 255: 1})


# ------------------------------------------------------------------------------ cathaction
def test_cathaction_layout_and_label_map(tmp_path):
  manual = tmp_path / "cathaction_raw"
  yy, xx = np.mgrid[0:32, 0:32]
  written = {}
  for split, names in (("train", ["f0", "f1", "f2"]), ("test", ["f3"])):
    for k, name in enumerate(names):
      img = (30 + 4 * xx + 2 * yy + 10 * k).astype(np.uint8)  # smooth: small JPEG error
      lab = np.zeros((32, 32), np.uint8)
      lab[3:6, :] = 128  # catheter
      lab[:, 9:11] = 255  # guidewire
      (manual / split / "images").mkdir(parents=True, exist_ok=True)
      Image.fromarray(img).save(manual / split / "images" / f"{name}.jpg", quality=95)
      write_png(manual / split / "labels" / f"{name}.png", lab)
      written[f"{split}/images/{name}.jpg"] = (img, lab)
  data_dir = tmp_path / "tfds"
  # The default config expects class indices: 128/255 are rejected with a clear message.
  with pytest.raises(fdata.DatasetInputError) as err:
    fdata.build("cathaction", data_dir, manual_dir=manual)
  msg = str(err.value)
  assert "f0.png" in msg and "128" in msg and "255" in msg and "label_map" in msg
  assert fdata.prepared_configs("cathaction", data_dir) == []

  builder = fdata.build("cathaction", data_dir, manual_dir=manual, config="gray_0_128_255")
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "test": 1}
  for split in ("train", "test"):
    src = fdata.load_source("cathaction", split, data_dir, config="gray_0_128_255")
    for key, rec in records_by_id(src).items():
      img, lab = written[key]
      assert rec["site"] == "cathaction"
      expected = np.select([lab == 128, lab == 255], [1, 2], 0).astype(np.uint8)
      np.testing.assert_array_equal(rec["mask"], expected)
      err_px = np.abs(rec["image"][..., 0].astype(int) - img.astype(int))
      assert rec["image"].shape == (32, 32, 1) and err_px.mean() < 2 and err_px.max() < 10

  # Same mapping through a custom label_map: same records.
  custom = fdata.build("cathaction", data_dir, manual_dir=manual, label_map={0: 0, 128: 1, 255: 2})
  a = fdata.load_source("cathaction", "train", data_dir, config="gray_0_128_255")
  b = fdata.load_source("cathaction", "train", data_dir, config=custom.info.config_name)
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i]["mask"], b[i]["mask"])


# ------------------------------------------------------------------------------ synthetic
def test_synthetic_tiny_deterministic_and_matches_generator(tmp_path):
  train, unseen = sites.make_sites(5)
  profiles = list(train) + [unseen]
  site_id = 1
  name = profiles[site_id].name
  config = f"{name}_tiny"
  assert config in {c.name for c in fdata.SyntheticEndovascular.BUILDER_CONFIGS}
  assert fdata.config_names("synthetic_endovascular") == [p.name for p in profiles]

  fdata.build("synthetic_endovascular", tmp_path / "a", config=config)
  fdata.build("synthetic_endovascular", tmp_path / "b", config=config)
  table = sites.site_table(profiles)
  for split, split_id, n in (("train", 0, 8), ("test", 1, 4)):
    a = fdata.load_source("synthetic_endovascular", split, tmp_path / "a", config=config)
    b = fdata.load_source("synthetic_endovascular", split, tmp_path / "b", config=config)
    assert len(a) == len(b) == n
    # 8 per call for both splits: one compiled shape per split, shared with the builder.
    images, masks = synth.generate(0, table, np.array([site_id]), np.arange(8)[None], 32, split=split_id)
    want_img = np.round(np.clip(np.asarray(images[0]), 0, 1) * 255).astype(np.uint8)
    want_mask = np.asarray(masks[0]).astype(np.uint8)
    for i in range(n):
      ra, rb = a[i], b[i]
      for k in ("image", "mask", "site", "id"):
        np.testing.assert_array_equal(ra[k], rb[k])
      assert ra["image"].shape == (32, 32, 1) and ra["mask"].shape == (32, 32)
      assert ra["site"] == name and ra["id"] == f"{name}/{split}/{i:05d}"
      np.testing.assert_array_equal(ra["image"], want_img[i])
      np.testing.assert_array_equal(ra["mask"], want_mask[i])


def test_synthetic_physics_2_renders_the_corrected_generator(tmp_path):
  """physics=2 (config.data.synthetic_physics): a config named ...-physics2 whose records are the generator's
  at that version, not version 1's; a prepared one reads back under its name; an unknown version is refused."""
  train, unseen = sites.make_sites(5)
  profiles = list(train) + [unseen]
  name = profiles[2].name
  builder = fdata.build(
    "synthetic_endovascular", tmp_path, site=name, image_size=32, num_train=8, num_test=0, physics=2
  )
  assert builder.info.config_name == f"{name}-32px-8-0-seed0-physics2"
  images, masks = synth.generate(0, sites.site_table(profiles), np.array([2]), np.arange(8)[None], 32, physics=2)
  old, _ = synth.generate(0, sites.site_table(profiles), np.array([2]), np.arange(8)[None], 32, physics=1)
  want = np.round(np.clip(np.asarray(images[0]), 0, 1) * 255).astype(np.uint8)
  src = fdata.load_source("synthetic_endovascular", "train", tmp_path, config=builder.info.config_name)
  got = np.stack([src[i]["image"] for i in range(8)])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.stack([src[i]["mask"] for i in range(8)]), np.asarray(masks[0]).astype(np.uint8))
  assert not np.array_equal(got, np.round(np.clip(np.asarray(old[0]), 0, 1) * 255).astype(np.uint8))
  assert fdata.synthetic_config(name, 32, 8, 0).name == f"{name}-32px-8-0-seed0"  # version 1 keeps its names
  for bad in (4, 0, True):
    with pytest.raises(fdata.DatasetInputError, match=r"physics=.* is unknown; use one of \[1, 2, 3\]"):
      fdata.synthetic_config(name, physics=bad)


# ------------------------------------------------------------------------------ bad input
def _good_pair(root, stem, shape=(32, 32)):
  write_png(root / f"images/{stem}.png", np.full(shape, 7, np.uint8))
  write_png(root / f"masks/{stem}.png", np.zeros(shape, np.uint8))


def _bad_missing_mask(root):
  _good_pair(root, "ok")
  write_png(root / "images/lonely.png", np.zeros((32, 32), np.uint8))
  return "lonely.png"


def _bad_size(root):
  _good_pair(root, "ok")
  write_png(root / "images/big.png", np.zeros((32, 32), np.uint8))
  write_png(root / "masks/big.png", np.zeros((31, 32), np.uint8))
  return "big.png"


def _bad_label(root):
  _good_pair(root, "ok")
  write_png(root / "images/lab.png", np.zeros((32, 32), np.uint8))
  write_png(root / "masks/lab.png", np.resize(np.array([0, 1, 7], np.uint8), (32, 32)))
  return "lab.png"


def _bad_empty(root):
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  return "images"


def _bad_corrupt(root):
  _good_pair(root, "ok")
  (root / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
  write_png(root / "masks/broken.png", np.zeros((32, 32), np.uint8))
  return "broken.png"


def _bad_corrupt_mask(root):
  _good_pair(root, "ok")
  write_png(root / "images/torn.png", np.zeros((32, 32), np.uint8))
  (root / "masks/torn.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  return "torn.png"


def _bad_cine_frames(root):
  (root / "masks").mkdir(parents=True)
  write_dicom(root / "images/run.dcm", np.zeros((3, 32, 32), np.uint16))
  np.save(root / "masks/run.npy", np.zeros((2, 32, 32), np.uint8))
  return "run.npy"


@pytest.mark.parametrize(
  "make_bad",
  [_bad_missing_mask, _bad_size, _bad_label, _bad_empty, _bad_corrupt, _bad_corrupt_mask, _bad_cine_frames],
)
def test_bad_input_raises_and_leaves_nothing_prepared(tmp_path, make_bad):
  root = tmp_path / "site_x"
  fname = make_bad(root)
  data_dir = tmp_path / "tfds"
  with pytest.raises(fdata.DatasetInputError) as err:
    fdata.build("xray_folder", data_dir, manual_dir=root)
  assert isinstance(err.value, ValueError)
  assert fname in str(err.value)
  if make_bad is _bad_label:
    assert "[0, 1, 7]" in str(err.value) and "[0, 1, 2, 3]" in str(err.value)
  if make_bad is _bad_corrupt_mask:  # a mask's fix, not an image's; not the in-memory stream PIL was handed
    assert "masks/torn.png: unreadable or corrupt mask file (PIL cannot identify it as an image)" in str(err.value)
    assert "remove it and its image" in str(err.value) and "BytesIO" not in str(err.value)
  assert fdata.prepared_configs("xray_folder", data_dir) == []
  assert not list(data_dir.rglob("dataset_info.json"))
  cfg = fdata.resolve_config("xray_folder", manual_dir=root)
  assert not fdata.XrayFolder(data_dir=str(data_dir), config=cfg).is_prepared()
  with pytest.raises(fdata.DatasetInputError, match="not prepared|nothing prepared"):
    fdata.load_source("xray_folder", "train", data_dir, config=cfg.name)


def test_missing_manual_dir(tmp_path):
  with pytest.raises(fdata.DatasetInputError, match="does_not_exist"):
    fdata.build("xray_folder", tmp_path / "tfds", manual_dir=tmp_path / "does_not_exist")
  with pytest.raises(fdata.DatasetInputError, match="manual_dir"):
    fdata.build("cathaction", tmp_path / "tfds")


def test_failure_mid_generation_leaves_no_prepared_dataset(tmp_path, monkeypatch):
  root = tmp_path / "site_y"
  for stem in ("p0", "p1", "p2"):
    _good_pair(root, stem)
  data_dir = tmp_path / "tfds"
  real = folders.load_pair
  calls = []

  def flaky(pair, spec):
    calls.append(pair.stem)
    if len(calls) == 3 + 2:  # 3 validation reads, then fail on the 2nd written example
      raise RuntimeError("disk full (simulated)")
    return real(pair, spec)

  monkeypatch.setattr(folders, "load_pair", flaky)
  with pytest.raises(RuntimeError, match="simulated"):
    fdata.build("xray_folder", data_dir, manual_dir=root)
  assert calls == ["p0", "p1", "p2", "p0", "p1"]  # validated everything, then started writing
  cfg = fdata.resolve_config("xray_folder", manual_dir=root)
  assert not fdata.XrayFolder(data_dir=str(data_dir), config=cfg).is_prepared()
  assert not list(data_dir.rglob("dataset_info.json"))
  assert fdata.prepared_configs("xray_folder", data_dir) == []
  with pytest.raises(fdata.DatasetInputError):
    fdata.load_source("xray_folder", "train", data_dir)
  # A clean retry into the same data_dir succeeds.
  monkeypatch.setattr(folders, "load_pair", real)
  builder = fdata.build("xray_folder", data_dir, manual_dir=root)
  assert builder.info.splits["train"].num_examples == 3


# ------------------------------------------------------------------------------ grain + CLI
def test_grain_map_dataset_source(hospital, tmp_path):
  grain = pytest.importorskip("grain")
  root, exp = hospital
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=root)
  src = fdata.load_source("xray_folder", "train", data_dir, config="hospital_a")
  ds = grain.MapDataset.source(src)
  assert len(ds) == len(exp)
  for i in (0, len(ds) - 1):
    ex = ds[i]
    np.testing.assert_array_equal(ex["image"], src[i]["image"])
    np.testing.assert_array_equal(ex["mask"][..., None].shape, ex["image"].shape)
    img, mask = exp[ex["id"]]
    np.testing.assert_array_equal(ex["mask"], mask)
  shuffled = ds.shuffle(seed=3).map(lambda e: int(e["mask"].max()))
  assert sorted(shuffled[i] for i in range(len(shuffled))) == sorted(int(m.max()) for _, m in exp.values())


def test_cli(hospital, tmp_path, capsys):
  import importlib

  cli = importlib.import_module("fedkd.data.tfds.build")
  root, exp = hospital
  data_dir = tmp_path / "tfds"
  assert cli.main(["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={data_dir}", "--site=Hospital A"]) == 0
  out = capsys.readouterr().out
  assert "xray_folder/Hospital_A" in out and f"train: {len(exp)} examples" in out
  assert "no 'test' split" in out and "splits.json" in out  # fedkd.main would refuse it: say so at build time
  # a stem is the name less .png / .dcm; the UID-named and extension-less DICOM files' stems are their whole names
  stems = sorted(p.stem if p.suffix in (".png", ".dcm") else p.name for p in (root / "images").iterdir())
  (root / "splits.json").write_text(json.dumps({"train": stems[1:], "test": stems[:1]}))
  args = ["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={data_dir}", "--site=Hospital A", "--overwrite"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "test: " in out and "no 'test' split" not in out and out.startswith("built ")
  assert cli.main(args[:-1]) == 0  # again without --overwrite: the prepared one is reused, and it says so
  out = capsys.readouterr().out
  assert out.startswith("already prepared (reused): ") and "pass --overwrite to rebuild it" in out

  bad = tmp_path / "bad_site"
  _bad_missing_mask(bad)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = procs.run(
    [
      sys.executable,
      "-m",
      "fedkd.data.tfds.build",
      "--dataset=xray_folder",
      f"--manual_dir={bad}",
      f"--data_dir={tmp_path / 'tfds2'}",
    ],
    cwd=REPO,
    env=env,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(err_lines) == 1 and "lonely.png" in err_lines[0] and "missing mask" in err_lines[0]
  # Importing the CLI module must not break the package-level build() function.
  assert callable(fdata.build) and callable(cli.main)


# ------------------------------------------------------------------------------ input rules
def _cli():
  import importlib

  return importlib.import_module("fedkd.data.tfds.build")


def _error_lines(err: str) -> list[str]:
  return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_orphan_masks_are_refused(tmp_path):
  root = tmp_path / "site_o"
  _good_pair(root, "ok")
  _good_pair(root, "single")
  write_png(root / "masks/gone.png", np.zeros((32, 32), np.uint8))  # its image is missing
  write_png(root / "masks/single_0001.png", np.zeros((32, 32), np.uint8))  # not a cine
  (root / "masks/notes.txt").write_text("labelled by reader 2")  # not a mask: ignored
  data_dir = tmp_path / "tfds"
  with pytest.raises(fdata.DatasetInputError) as err:
    fdata.build("xray_folder", data_dir, manual_dir=root)
  problems = err.value.problems
  assert len(problems) == 2, problems
  gone = next(p for p in problems if "gone.png" in p)
  assert "mask without an image" in gone and "move the mask out of masks/" in gone
  single = next(p for p in problems if "single_0001.png" in p)
  assert "single frame" in single and "single.png" in single
  assert fdata.prepared_configs("xray_folder", data_dir) == []
  assert not data_dir.exists()  # a refused first build leaves no folder of TFDS' (downloads/, .config/)
  # ... and in a data_dir that holds other things, only those
  data_dir.mkdir()
  (data_dir / "keep.txt").write_text("mine")
  with pytest.raises(fdata.DatasetInputError):
    fdata.build("xray_folder", data_dir, manual_dir=root)
  assert [p.name for p in data_dir.iterdir()] == ["keep.txt"]
  # Moving the orphans out is the fix: the same folder then builds.
  (root / "masks/gone.png").unlink()
  (root / "masks/single_0001.png").unlink()
  builder = fdata.build("xray_folder", data_dir, manual_dir=root)
  assert builder.info.splits["train"].num_examples == 2


def test_conversion_notes_16bit_and_colour_png(tmp_path, capsys):
  rng = np.random.default_rng(5)
  root = tmp_path / "site_n"
  deep = rng.integers(200, 3000, (33, 32)).astype(np.uint16)  # 12-bit values in a 16-bit PNG
  colour = rng.integers(0, 256, (32, 34, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
  for stem, img in (("deep", deep), ("colour", colour), ("gray_rgb", np.stack([gray] * 3, -1))):
    write_png(root / f"images/{stem}.png", img)
    write_png(root / f"masks/{stem}.png", np.zeros(img.shape[:2], np.uint8))
  assert Image.open(root / "images/deep.png").mode.startswith("I")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=root)
  notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
  assert len(notes) == 2, notes
  deep_note = next(ln for ln in notes if "16-bit" in ln)
  assert "images/deep.png" in deep_note and "min-max" in deep_note and "1 file" in deep_note
  colour_note = next(ln for ln in notes if "colour" in ln)
  assert "images/colour.png" in colour_note and "gray_rgb" not in colour_note
  got = records_by_id(fdata.load_source("xray_folder", "train", data_dir))
  np.testing.assert_array_equal(got["deep"]["image"][..., 0], minmax_u8(deep))
  want = np.round(colour.astype(float) @ [0.299, 0.587, 0.114])
  assert np.abs(got["colour"]["image"][..., 0] - want).max() <= 1  # PIL integer luma
  np.testing.assert_array_equal(got["gray_rgb"]["image"][..., 0], gray)  # exact


def write_png16(path: Path, arr: np.ndarray, colour_type: int) -> None:
  """A 16-bit PNG of any colour type (PIL writes none with colour or alpha), written from the PNG spec:
  signature, IHDR, one zlib IDAT of filter-0 scanlines of big-endian samples, IEND."""
  import struct
  import zlib

  arr = np.asarray(arr, np.uint16)
  arr = arr[..., None] if arr.ndim == 2 else arr
  h, w, _ = arr.shape
  rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  path.parent.mkdir(parents=True, exist_ok=True)
  ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
  path.write_bytes(
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
  )


@pytest.mark.parametrize("colour_type,channels", [(2, 3), (4, 2), (6, 4)])
@pytest.mark.parametrize("which", ["images", "masks"])
def test_a_16bit_png_with_colour_or_alpha_is_refused_not_cut_to_its_high_byte(tmp_path, colour_type, channels, which):
  """PIL opens a 16-bit RGB / gray+alpha / RGBA PNG as 8-bit, keeping each sample's high byte: 12-bit X-ray
  values 300..4095 would read 1..15 and class indices 0/1/2 all 0. Such a file is refused, naming it; a
  16-bit gray PNG (colour type 0) is still min-max scaled."""
  rng = np.random.default_rng(3)
  root = tmp_path / "site_16"
  deep = rng.integers(300, 4096, (32, 40)).astype(np.uint16)
  labels = np.zeros((32, 40), np.uint16)
  labels[10:12], labels[20:22] = 1, 2
  _good_pair(root, "ok")
  planes = deep if which == "images" else labels
  alpha = colour_type in (4, 6)
  stack = np.stack([planes] * (channels - alpha) + [np.full_like(planes, 65535)] * alpha, -1)
  write_png16(root / f"{which}/deep.png", stack, colour_type)
  other = "masks" if which == "images" else "images"
  write_png(root / f"{other}/deep.png", labels.astype(np.uint8) if other == "masks" else deep)
  seen = np.asarray(Image.open(root / f"{which}/deep.png"))  # what PIL makes of it: the high bytes
  assert seen.dtype == np.uint8 and seen[..., 0].max() == (15 if which == "images" else 0)
  with pytest.raises(fdata.DatasetInputError, match=rf"{which}/deep.png: 16-bit .* PNG; .*16-bit grayscale"):
    fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  write_png16(root / f"{which}/deep.png", planes, 0)  # the same samples as 16-bit gray
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  got = records_by_id(fdata.load_source("xray_folder", "train", tmp_path / "tfds"))["deep"]
  if which == "images":
    np.testing.assert_array_equal(got["image"][..., 0], minmax_u8(deep))
  else:
    np.testing.assert_array_equal(got["mask"], labels)


# EXIF orientation -> the stored pixels as shown (TIFF 6.0 / EXIF 2.3, tag 274: where the stored row 0 and column 0
# belong): 2 mirrored, 3 upside down, 4 flipped top-bottom, 5 transposed, 6 a quarter turn clockwise, 7 transposed
# across the other diagonal, 8 a quarter turn anticlockwise
UPRIGHT = {
  1: lambda a: a,
  2: lambda a: a[:, ::-1],
  3: lambda a: a[::-1, ::-1],
  4: lambda a: a[::-1],
  5: lambda a: a.T,
  6: lambda a: np.rot90(a, -1),
  7: lambda a: a[::-1, ::-1].T,
  8: lambda a: np.rot90(a, 1),
}


def test_exif_orientation_is_applied_to_images_and_masks_each_by_its_own_tag(tmp_path, capsys):
  """An image shown turned by its EXIF orientation is read as shown, as viewers and annotation tools do; a mask is
  turned by its own tag (a mask drawn over the upright image has none), with one note naming the files."""
  rng = np.random.default_rng(11)
  root = tmp_path / "site_o"
  stored = rng.integers(0, 256, (32, 40), dtype=np.uint8)
  labels = np.zeros((32, 40), np.uint8)
  labels[3:5, 2:30], labels[20, 5:] = 1, 2  # not symmetric under any of the 8 orientations
  for o in UPRIGHT:
    ex = Image.Exif()
    ex[0x0112] = o
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(root / f"images/o{o}.png", exif=ex)
    Image.fromarray(labels).save(root / f"masks/o{o}.png", exif=ex)
  # a JPEG turned a quarter (a C-arm export), its mask drawn over the upright image: no tag
  smooth = np.add.outer(np.arange(32) * 4, np.arange(40) * 3).astype(np.uint8)  # 0..241
  ex = Image.Exif()
  ex[0x0112] = 6
  Image.fromarray(smooth).save(root / "images/cam.jpg", exif=ex, quality=95)
  Image.fromarray(np.rot90(labels, -1)).save(root / "masks/cam.png")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=root)
  notes = [ln for ln in capsys.readouterr().err.splitlines() if "EXIF orientation" in ln]
  assert len(notes) == 1 and "15 file(s)" in notes[0], notes  # orientations 2-8, image and mask, and cam.jpg
  got = records_by_id(fdata.load_source("xray_folder", "train", data_dir))
  for o, upright in UPRIGHT.items():
    np.testing.assert_array_equal(got[f"o{o}"]["image"][..., 0], upright(stored), err_msg=f"orientation {o}")
    np.testing.assert_array_equal(got[f"o{o}"]["mask"], upright(labels), err_msg=f"orientation {o}")
  cam = got["cam"]["image"][..., 0].astype(int)
  assert cam.shape == (40, 32) and np.abs(cam - np.rot90(smooth, -1)).max() <= 4  # JPEG's rounding
  np.testing.assert_array_equal(got["cam"]["mask"], np.rot90(labels, -1))


@pytest.mark.parametrize("shape", [(1, 1), (31, 64)])
def test_tiny_images_are_refused(tmp_path, shape):
  root = tmp_path / "site_t"
  _good_pair(root, "ok")
  write_png(root / "images/tiny.png", np.full(shape, 9, np.uint8))
  write_png(root / "masks/tiny.png", np.zeros(shape, np.uint8))
  assert folders.MIN_IMAGE_SIDE == 32
  with pytest.raises(fdata.DatasetInputError) as err:
    fdata.build("xray_folder", tmp_path / "tfds", manual_dir=root)
  msg = str(err.value)
  assert "tiny.png" in msg and f"{shape[0]}x{shape[1]}" in msg and "32x32" in msg
  assert "ok.png" not in msg


def test_cli_rgb_mask_needs_color_map(tmp_path, capsys):
  root = tmp_path / "site_c"
  write_png(root / "images/m.png", np.full((32, 32), 50, np.uint8))
  rgb = np.zeros((32, 32, 3), np.uint8)
  rgb[4:8, :, 0] = 255  # red catheter
  rgb[10:, 20, 1] = 255  # green guidewire
  write_png(root / "masks/m.png", rgb)
  cli = _cli()
  args = ["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  lines = _error_lines(err)
  assert len(lines) == 1 and "m.png" in lines[0] and "--color_map" in lines[0]
  assert "Traceback" not in err
  assert fdata.prepared_configs("xray_folder", tmp_path / "tfds") == []
  # The hinted fix works.
  assert cli.main(args + ["--color_map=0,0,0:0;255,0,0:1;0,255,0:2"]) == 0
  rec = fdata.load_source("xray_folder", "train", tmp_path / "tfds")[0]
  want = np.zeros((32, 32), np.uint8)
  want[rgb[..., 0] == 255] = 1
  want[rgb[..., 1] == 255] = 2
  np.testing.assert_array_equal(rec["mask"], want)


# ------------------------------------------------------------------------------ CLI paths, I/O
def test_cli_expands_tilde(tmp_path, monkeypatch, capsys):
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  _good_pair(home / "hosp", "a")
  cwd.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(cwd)
  assert _cli().main(["--dataset=xray_folder", "--manual_dir=~/hosp", "--data_dir=~/tfds"]) == 0
  assert fdata.prepared_configs("xray_folder", home / "tfds") == ["hosp"]
  assert not (cwd / "~").exists() and list(cwd.iterdir()) == []
  assert str(home / "tfds") in capsys.readouterr().out


def test_cli_data_dir_that_is_a_file(tmp_path, capsys):
  root = tmp_path / "site_f"
  _good_pair(root, "a")
  target = tmp_path / "out.txt"
  target.write_text("keep me")
  cli = _cli()
  for data_dir in (target, target / "sub"):
    assert cli.main(["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={data_dir}"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and str(data_dir) in lines[0], err
    assert "Traceback" not in err
  assert target.read_text() == "keep me"


@pytest.mark.parametrize(
  "make_error",
  [
    lambda d: PermissionError(13, "Permission denied", str(d / "xray_folder")),
    lambda d: OSError(30, "Read-only file system", str(d)),
    lambda d: OSError(28, "No space left on device", str(d / "xray_folder/x/a.array_record")),
    # array_record reports a full disk as a RuntimeError naming the file (seen on a full tmpfs)
    lambda d: RuntimeError(
      f'Failed to finalize writing of split "train": write() failed: No '
      f'space left on device; writing {d}/xray_folder/s/incomplete.X_1.0.0/'
      f'xray_folder-train.array_record-00000-of-00001; at byte 61440'
    ),
  ],
  ids=["EACCES", "EROFS", "ENOSPC", "array_record-ENOSPC"],
)
def test_cli_write_errors_are_one_line(tmp_path, monkeypatch, capsys, make_error):
  root = tmp_path / "site_w"
  _good_pair(root, "a")
  data_dir = tmp_path / "tfds"
  cli = _cli()

  def failing_build(*args, **kwargs):
    raise make_error(data_dir)

  monkeypatch.setattr(cli, "build", failing_build)
  assert cli.main(["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={data_dir}"]) == 2
  err = capsys.readouterr().err
  lines = _error_lines(err)
  assert len(lines) == 1 and f"--data_dir {data_dir}" in lines[0], err
  assert "Traceback" not in err


@pytest.mark.parametrize(
  "error", [RuntimeError("internal bug"), ValueError("internal bug"), RuntimeError("Permission denied somewhere else")]
)
def test_cli_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch, error):
  root = tmp_path / "site_u"
  _good_pair(root, "a")
  cli = _cli()

  def failing_build(*args, **kwargs):
    raise error

  monkeypatch.setattr(cli, "build", failing_build)
  with pytest.raises(type(error), match="internal bug|somewhere else"):
    cli.main(["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_cli_read_only_data_dir(tmp_path, capsys):
  root = tmp_path / "site_r"
  _good_pair(root, "a")
  data_dir = tmp_path / "ro"
  data_dir.mkdir()
  data_dir.chmod(0o555)
  try:
    assert _cli().main(["--dataset=xray_folder", f"--manual_dir={root}", f"--data_dir={data_dir}"]) == 2
  finally:
    data_dir.chmod(0o755)
  err = capsys.readouterr().err
  lines = _error_lines(err)
  assert len(lines) == 1 and str(data_dir) in lines[0] and "Traceback" not in err


def test_a_damaged_record_file_is_one_line_naming_the_rebuild(hospital, tmp_path):
  """A cut array_record file (a copy that stopped half-way) is a DatasetInputError, not array_record's
  RuntimeError traceback; the intact dataset still reads."""
  root, exp = hospital
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=root)
  (shard,) = data_dir.rglob("*train.array_record*")
  assert len(fdata.load_source("xray_folder", "train", data_dir)[0]["mask"].shape) == 2
  with open(shard, "r+b") as f:
    f.truncate(100)
  src = fdata.load_source("xray_folder", "train", data_dir)
  with pytest.raises(fdata.DatasetInputError, match=r"record file is damaged .*--overwrite"):
    src[0]
  with pytest.raises(fdata.DatasetInputError, match="damaged"):
    src.__getitems__([0, 1])


def test_a_record_file_cut_anywhere_reads_as_records_or_one_line(hospital, tmp_path):
  """Cut at a chunk boundary (64 KiB of a 128 KiB shard), array_record reads records back without their features
  and TFDS' decoding raised TypeError with a traceback (in training, fedkd.eval and the preview). At every cut,
  each record reads whole or is a DatasetInputError naming the rebuild."""
  import shutil

  root, _ = hospital
  built = tmp_path / "built"
  fdata.build("xray_folder", built, manual_dir=root)
  (shard,) = built.rglob("*train.array_record*")
  size = shard.stat().st_size
  outcomes = set()
  for cut in sorted({100, 1000, size // 2, size - 1, 65536} | set(range(size // 8, size, size // 8))):
    if cut >= size:
      continue
    data_dir = tmp_path / f"cut{cut}"
    shutil.copytree(built, data_dir)
    (copy,) = data_dir.rglob("*train.array_record*")
    with open(copy, "r+b") as f:
      f.truncate(cut)
    src = fdata.load_source("xray_folder", "train", data_dir)
    for i in range(len(src)):
      try:
        outcomes.add(len(src[i]["mask"].shape))
      except fdata.DatasetInputError as e:
        assert "its record file is damaged" in str(e) and "--overwrite" in str(e), (cut, e)
        outcomes.add(type(e).__name__)
  assert "DatasetInputError" in outcomes, outcomes


def test_a_refused_overwrite_keeps_the_prepared_dataset(hospital, tmp_path):
  """--overwrite builds beside the old dataset and swaps it in when complete: a rebuild refused on its
  inputs leaves every file of the old one byte-identical (TFDS' FORCE_REDOWNLOAD deleted it first)."""
  import shutil

  root, exp = hospital
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=root, site="h")
  before = {p: p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}
  bad = tmp_path / "bad"
  shutil.copytree(root, bad)
  next((bad / "images").glob("a.*")).unlink()  # masks/a.png is now an orphan: refused
  with pytest.raises(fdata.DatasetInputError, match="a.png"):
    fdata.build("xray_folder", data_dir, manual_dir=bad, site="h", overwrite=True)
  assert {p: p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()} == before
  assert len(fdata.load_source("xray_folder", "train", data_dir, config="h")) == len(exp)
  (bad / "masks" / "a.png").unlink()  # now a valid folder with one image fewer: the rebuild replaces it
  fdata.build("xray_folder", data_dir, manual_dir=bad, site="h", overwrite=True)
  assert len(fdata.load_source("xray_folder", "train", data_dir, config="h")) == len(exp) - 1
  assert not [p for p in data_dir.iterdir() if p.name.startswith(".fedkd-rebuild")]


def test_splits_json_names_a_stem_listed_twice_in_one_split(tmp_path):
  """A stem listed twice in 'train' used to be reported as 'listed in both 'train' and 'train''."""
  from fedkd.data.tfds.xray_folder import _read_splits

  path = tmp_path / "splits.json"
  by_stem = {s: tmp_path / "images" / f"{s}.png" for s in ("a", "b", "c")}
  path.write_text(json.dumps({"train": ["a", "b", "a"], "test": ["c"]}))
  with pytest.raises(fdata.DatasetInputError, match=r"'a' is listed twice in split 'train'; list it once") as err:
    _read_splits(path, by_stem)
  assert "both" not in str(err.value)
  path.write_text(json.dumps({"train": ["a", "b"], "test": ["c", "a"]}))
  with pytest.raises(fdata.DatasetInputError, match=r"'a' is listed in both 'train' and 'test'"):
    _read_splits(path, by_stem)
