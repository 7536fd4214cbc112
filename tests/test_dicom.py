"""DICOM decoding of fedkd.data.tfds.decode.read_image against pydicom's own pixel pipeline.

References are computed independently of fedkd: pydicom's ``apply_color_lut`` /
``apply_modality_lut`` / ``apply_voi_lut`` / ``apply_windowing``, or numpy with the DICOM
formulas (PS3.3 C.11), followed by the documented uint8 mapping:

* VOI LUT Sequence output ``v`` with ``n`` bits per entry: ``round(v * 255 / (2**n - 1))``;
* window output of pydicom (range ``[y_min, y_max]``):
  ``round((v - y_min) * 255 / (y_max - y_min))``;
* no VOI transform: min-max per frame; palette RGB: luma ``(299 R + 587 G + 114 B) / 1000``
  scaled by ``255 / (2**n - 1)``; MONOCHROME1 inverted at the end.

Shipped files come from pydicom's test data (``pydicom.data``): those bundled with pydicom are
always there; ``OBXXXX1A*.dcm`` / ``mlut_18.dcm`` / ``vlut_04.dcm`` live in pydicom-data and are
used only when already on disk (pydicom's download cache or the pydicom-data package): the
test never downloads and skips a file that is absent.
"""

import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

try:  # pydicom >= 3
  from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,  # noqa: E402
    apply_windowing,
  )
except ImportError:  # pydicom 2.x
  from pydicom.pixel_data_handlers.util import (
    apply_color_lut,  # noqa: E402
    apply_modality_lut,
    apply_voi_lut,
    apply_windowing,
  )

from fedkd.data.tfds import decode  # noqa: E402
from fedkd.data.tfds.records import DatasetInputError  # noqa: E402

ENHANCED_XA = "1.2.840.10008.5.1.4.1.1.12.1.1"
XA = "1.2.840.10008.5.1.4.1.1.12.1"
US_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


# ------------------------------------------------------------------------------ references
def luma(rgb):
  rgb = np.asarray(rgb, np.float64)
  return (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000


def pydicom_gray(ds) -> np.ndarray:
  """pydicom's pixel pipeline + the documented uint8 mapping; uint8 [F, H, W]."""
  arr = ds.pixel_array
  multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
  if not multi:
    arr = arr[None]
  pi = str(ds.PhotometricInterpretation).upper()
  if pi == "PALETTE COLOR":
    rgb = apply_color_lut(arr, ds)[..., :3]
    full = 2.0 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1
    out = np.round(luma(rgb) * 255.0 / full)
  else:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      v = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    if ds.get("VOILUTSequence"):
      bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
      out = np.round(v.astype(np.float64) * 255.0 / (2.0**bits - 1))
    elif "WindowCenter" in ds:
      lo, hi = apply_windowing(np.array([-1e300, 1e300]), ds)  # pydicom's output range
      out = np.round((v - lo) * 255.0 / (hi - lo))
    else:
      v = v.astype(np.float64)
      lo = v.min(axis=(1, 2), keepdims=True)
      hi = v.max(axis=(1, 2), keepdims=True)
      out = np.round((v - lo) * 255.0 / (hi - lo))
    if pi == "MONOCHROME1":
      out = 255 - out
  return np.clip(out, 0, 255).astype(np.uint8)


def window_linear(x, center, width):
  """PS3.3 C.11.2.1.2.1 (LINEAR) onto [0, 255]."""
  x = np.asarray(x, np.float64)
  y = np.where(
    x <= center - 0.5 - (width - 1) / 2,
    0.0,
    np.where(x > center - 0.5 + (width - 1) / 2, 255.0, ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0),
  )
  return np.round(y).astype(np.uint8)


def window_sigmoid(x, center, width):
  """PS3.3 C.11.2.1.3.1 (SIGMOID) onto [0, 255]."""
  x = np.asarray(x, np.float64)
  return np.round(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.uint8)


def minmax(x):
  x = np.asarray(x, np.float64)
  return np.round((x - x.min()) * 255.0 / (x.max() - x.min())).astype(np.uint8)


# ------------------------------------------------------------------------------ writers
def new_dataset(pixels, sop_class=XA, photometric="MONOCHROME2", signed=False, bits=None):
  """Uncompressed Explicit VR Little Endian dataset; pixels [H, W] or [F, H, W]."""
  pixels = np.ascontiguousarray(pixels)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "XA" if sop_class in (XA, ENHANCED_XA) else "US"
  ds.Rows, ds.Columns = pixels.shape[-2:]
  if pixels.ndim == 3:
    ds.NumberOfFrames = pixels.shape[0]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  alloc = pixels.dtype.itemsize * 8
  ds.BitsAllocated, ds.BitsStored = alloc, bits or alloc
  ds.HighBit = ds.BitsStored - 1
  ds.PixelRepresentation = 1 if signed else 0
  ds.PixelData = pixels.tobytes()
  return ds


def save_and_read(ds, path):
  ds.save_as(path, enforce_file_format=True)
  return pydicom.dcmread(path)


def lut_item(first, bits, data, ow=False):
  item = Dataset()
  item.LUTDescriptor = [len(data) if len(data) < 65536 else 0, first, bits]
  if ow:
    item.add_new(0x00283006, "OW", np.asarray(data, "<u2").tobytes())
  else:
    item.add_new(0x00283006, "US", [int(v) for v in data])
  return item


# ------------------------------------------------------------------------------ shipped files
def shipped(name):
  """Path of a pydicom test file already on this machine (never downloads), else skip."""
  from pydicom.data import get_testdata_file

  path = get_testdata_file(name, download=False)  # bundled, or the pydicom-data package
  if path is None:
    try:
      from pydicom.data import download

      cached = download.get_data_dir() / name
      if cached.is_file() and download.data_file_hash_check(name):
        path = str(cached)
    except Exception:  # no cache / no hash table: treat as absent
      path = None
  if path is None:
    pytest.skip(
      f"pydicom test file {name} is not on this machine (it is in pydicom-data; "
      f"get it once with pydicom.data.get_testdata_file({name!r}) online)"
    )
  return path


SHIPPED = [
  "examples_palette.dcm",  # PALETTE COLOR, 16-bit palette entries (bundled with pydicom)
  "OBXXXX1A.dcm",  # PALETTE COLOR ultrasound (pydicom-data)
  "OBXXXX1A_2frame.dcm",  # PALETTE COLOR, 2 frames (pydicom-data)
  "mlut_18.dcm",  # Modality LUT Sequence, signed 12-bit (pydicom-data)
  "vlut_04.dcm",  # VOI LUT Sequence (pydicom-data)
  "CT_small.dcm",  # rescale slope/intercept, no window: min-max (bundled)
  "MR_small.dcm",  # window center/width (bundled)
  "examples_overlay.dcm",  # 16-bit with window (bundled)
]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_match_pydicom(name):
  path = shipped(name)
  ds = pydicom.dcmread(path)
  want = pydicom_gray(ds)
  got, multi = decode.read_image(path)
  assert multi == (int(ds.get("NumberOfFrames", 1) or 1) > 1)
  assert got.dtype == np.uint8 and got.shape == want.shape
  np.testing.assert_array_equal(got, want, err_msg=name)
  assert len(np.unique(got)) > 8, name  # a real image, not a constant / index map


# ------------------------------------------------------------------------------ palette
def test_generated_palette_8bit_multiframe(tmp_path):
  """8-bit palette entries (no scaling), 2 frames, non-gray palette: luma of the colours,
  not the stored indices."""
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 256, (2, 34, 33)).astype(np.uint8)
  ds = new_dataset(idx, sop_class=US_STORAGE, photometric="PALETTE COLOR")
  red, green, blue = (rng.permutation(256).astype(np.uint8) for _ in range(3))
  for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
    setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
    ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW", table.tobytes())
  path = tmp_path / "palette.dcm"
  ds = save_and_read(ds, path)
  got, multi = decode.read_image(path)
  assert multi
  rgb = np.stack([red[idx], green[idx], blue[idx]], axis=-1)  # numpy palette lookup
  np.testing.assert_array_equal(got, np.round(luma(rgb)).astype(np.uint8))
  np.testing.assert_array_equal(got, pydicom_gray(ds))
  assert not np.array_equal(got, idx)


def _palette_index_image(rng, entries):
  """12-bit palette indices over ``entries`` entries (every index below 256 and above it drawn)."""
  idx = rng.integers(0, entries, (34, 33)).astype(np.uint16)
  idx[0, :3] = (0, 300, entries - 1)
  return idx


def test_a_palette_of_more_than_256_8bit_entries_is_looked_up_with_wide_indices(tmp_path):
  """4096 8-bit entries, one byte each: index 300 reads entry 300 (pydicom 3.0's apply_color_lut indexes an
  8-bit palette with uint8, reading entry 44)."""
  rng = np.random.default_rng(21)
  idx = _palette_index_image(rng, 4096)
  ds = new_dataset(idx, sop_class=US_STORAGE, photometric="PALETTE COLOR", bits=12)
  tables = [rng.integers(0, 256, 4096).astype(np.uint8) for _ in range(3)]
  for colour, table in zip(("Red", "Green", "Blue"), tables):
    setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4096, 0, 8])
    ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW", table.tobytes())
  path = tmp_path / "palette4096.dcm"
  save_and_read(ds, path)
  got, _ = decode.read_image(path)
  rgb = np.stack([t[idx] for t in tables], axis=-1)  # numpy, PS3.3 C.7.6.3.1.5
  np.testing.assert_array_equal(got[0], np.round(luma(rgb)).astype(np.uint8))


def test_a_segmented_palette_of_more_than_256_8bit_entries_is_looked_up_with_wide_indices(tmp_path):
  """An 8-bit segmented palette (PS3.3 C.7.9.2: discrete segments ``0, n, v1 .. vn``) of 610 entries: each index
  reads its own entry of the expanded table."""
  rng = np.random.default_rng(22)
  idx = _palette_index_image(rng, 610)
  ds = new_dataset(idx, sop_class=US_STORAGE, photometric="PALETTE COLOR", bits=12)
  tables = []
  for colour in ("Red", "Green", "Blue"):
    table = rng.integers(0, 256, 610).astype(np.uint8)
    segments = [np.concatenate([[0, len(part)], part]) for part in (table[:255], table[255:510], table[510:])]
    tables.append(table)
    setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [610, 0, 8])
    data = np.concatenate(segments).astype(np.uint8).tobytes()
    ds.add_new(pydicom.datadict.tag_for_keyword(f"Segmented{colour}PaletteColorLookupTableData"), "OW", data)
  path = tmp_path / "segmented.dcm"
  save_and_read(ds, path)
  got, _ = decode.read_image(path)
  rgb = np.stack([t[idx] for t in tables], axis=-1)
  np.testing.assert_array_equal(got[0], np.round(luma(rgb)).astype(np.uint8))


def test_palette_without_tables_is_refused(tmp_path):
  ds = new_dataset(np.zeros((32, 32), np.uint8), sop_class=US_STORAGE, photometric="PALETTE COLOR")
  path = tmp_path / "no_palette.dcm"
  ds.save_as(path, enforce_file_format=True)
  with pytest.raises(DatasetInputError, match=r"no_palette\.dcm.*PALETTE COLOR.*palette"):
    decode.read_image(path)


# ------------------------------------------------------------------------------ LUT sequences
def test_generated_modality_lut_sequence_nonlinear(tmp_path):
  """Signed 12-bit data through a gamma-shaped Modality LUT (16-bit entries), no VOI:
  min-max of the table output; with a window, the window on the table output."""
  rng = np.random.default_rng(1)
  px = rng.integers(-2048, 2048, (40, 36)).astype(np.int16)
  table = np.round(65535 * (np.arange(4096) / 4095.0) ** 2.2).astype(np.uint16)
  ds = new_dataset(px, signed=True, bits=12)
  ds.ModalityLUTSequence = Sequence([lut_item(-2048, 16, table)])
  ds.ModalityLUTSequence[0].ModalityLUTType = "US"
  path = tmp_path / "mlut.dcm"
  ds = save_and_read(ds, path)
  got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got, pydicom_gray(ds))
  np.testing.assert_array_equal(got[0], minmax(table[px.astype(int) + 2048]))  # numpy
  assert np.abs(got[0].astype(int) - minmax(px).astype(int)).max() > 40  # not linear

  ds.WindowCenter, ds.WindowWidth = 20000, 30001
  path = tmp_path / "mlut_window.dcm"
  ds = save_and_read(ds, path)
  got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got, pydicom_gray(ds))
  np.testing.assert_array_equal(got[0], window_linear(table[px.astype(int) + 2048], 20000, 30001))


@pytest.mark.parametrize("ow", [False, True], ids=["US", "OW"])
def test_generated_voi_lut_sequence_nonlinear(tmp_path, ow):
  """A 12-bit non-monotone VOI LUT that starts at 1000 with 2048 entries (values outside
  clamp to the first/last entry); a window is present too and must lose to the table."""
  rng = np.random.default_rng(2)
  px = rng.integers(0, 4096, (33, 35)).astype(np.uint16)
  i = np.arange(2048)
  table = np.round(4095 * (0.5 + 0.5 * np.sin(i / 150.0))).astype(np.uint16)
  ds = new_dataset(px, bits=12)
  ds.VOILUTSequence = Sequence([lut_item(1000, 12, table, ow=ow)])
  ds.WindowCenter, ds.WindowWidth = 2048, 4096
  path = tmp_path / "vlut.dcm"
  ds = save_and_read(ds, path)
  got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got, pydicom_gray(ds))
  lookup = table[np.clip(px.astype(int) - 1000, 0, 2047)]  # numpy, PS3.3 C.11.2.1.1
  np.testing.assert_array_equal(got[0], np.round(lookup * 255.0 / 4095).astype(np.uint8))


@pytest.mark.parametrize("ow", [False, True], ids=["US", "OW"])
def test_a_voi_lut_of_more_than_256_8bit_entries_is_looked_up_with_wide_indices(tmp_path, ow):
  """A 12-bit image through a VOI LUT of 4096 random 8-bit entries starting at 100: value 400 reads entry 300
  (pydicom 3.0's apply_voi indexes an 8-bit table with uint8, reading entry 44)."""
  rng = np.random.default_rng(23)
  px = rng.integers(0, 4096, (33, 35)).astype(np.uint16)
  px[0, :3] = (0, 400, 4095)
  table = rng.integers(0, 256, 4096).astype(np.uint16)
  ds = new_dataset(px, bits=12)
  ds.VOILUTSequence = Sequence([lut_item(100, 8, table, ow=ow)])
  path = tmp_path / "vlut8.dcm"
  save_and_read(ds, path)
  got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got[0], table[np.clip(px.astype(int) - 100, 0, 4095)])  # numpy; 8 bits: v * 255 / 255


def test_an_8bit_voi_lut_with_an_entry_above_255_is_refused(tmp_path):
  table = np.arange(300, dtype=np.uint16)  # entries 256 .. 299 do not fit the 8 bits the descriptor states
  ds = new_dataset(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 300, bits=12)
  ds.VOILUTSequence = Sequence([lut_item(0, 8, table)])
  path = tmp_path / "vlut_over.dcm"
  ds.save_as(path, enforce_file_format=True)
  with pytest.raises(
    DatasetInputError, match=r"vlut_over\.dcm: its VOI LUT Sequence holds entries up to 299 .* 8 bits"
  ):
    decode.read_image(path)


def test_a_linear_window_of_width_1_is_a_threshold(tmp_path):
  """PS3.3 C.11.2.1.2.1 at width 1: x <= c - 0.5 is black, above white, nothing between (c = 2000.5: 2000 is
  black, 2001 white)."""
  px = np.resize(np.arange(1990, 2012, dtype=np.uint16), (32, 32))
  ds = new_dataset(px, bits=12)
  ds.WindowCenter, ds.WindowWidth = 2000.5, 1
  path = tmp_path / "threshold.dcm"
  ds = save_and_read(ds, path)
  got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got[0], np.where(px > 2000, 255, 0).astype(np.uint8))
  np.testing.assert_array_equal(got, pydicom_gray(ds))


def test_generated_monochrome1_voi_lut(tmp_path):
  rng = np.random.default_rng(3)
  px = rng.integers(0, 256, (32, 32)).astype(np.uint8)
  table = np.round(255 * np.sqrt(np.arange(256) / 255.0)).astype(np.uint16)
  ds = new_dataset(px, photometric="MONOCHROME1")
  ds.VOILUTSequence = Sequence([lut_item(0, 8, table)])
  path = tmp_path / "m1.dcm"
  ds = save_and_read(ds, path)
  got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got, pydicom_gray(ds))
  np.testing.assert_array_equal(got[0], 255 - table[px].astype(np.uint8))


# ------------------------------------------------------------------------------ enhanced
def enhanced_cine(frames, rescale, windows, shared=None, photometric="MONOCHROME2"):
  """Enhanced XA object: per-frame PixelValueTransformationSequence (slope, intercept) and
  FrameVOILUTSequence (center, width[, function]) items; ``shared``: items for the shared
  functional groups instead ({"rescale": (s, i)} or {"window": (c, w)})."""
  ds = new_dataset(frames, sop_class=ENHANCED_XA, photometric=photometric, bits=12)
  ds.Modality = "XA"

  def pvt(slope, intercept):
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
    return Sequence([item])

  def voi(window):
    item = Dataset()
    item.WindowCenter, item.WindowWidth = window[:2]
    if len(window) > 2:
      item.VOILUTFunction = window[2]
    return Sequence([item])

  sfg = Dataset()
  if shared and "rescale" in shared:
    sfg.PixelValueTransformationSequence = pvt(*shared["rescale"])
  if shared and "window" in shared:
    sfg.FrameVOILUTSequence = voi(shared["window"])
  ds.SharedFunctionalGroupsSequence = Sequence([sfg])
  per = []
  for f in range(frames.shape[0]):
    item = Dataset()
    if rescale is not None:
      item.PixelValueTransformationSequence = pvt(*rescale[f])
    if windows is not None:
      item.FrameVOILUTSequence = voi(windows[f])
    per.append(item)
  ds.PerFrameFunctionalGroupsSequence = Sequence(per)
  return ds


def test_enhanced_per_frame_rescale_and_window(tmp_path):
  rng = np.random.default_rng(4)
  frames = rng.integers(0, 4096, (3, 36, 34)).astype(np.uint16)
  rescale = [(1.0, 0.0), (2.0, -1000.0), (0.5, 300.0)]
  windows = [(2048, 4096), (1500, 801), (900, 600, "SIGMOID")]
  ds = enhanced_cine(frames, rescale, windows)
  # Top-level values that the functional groups must override.
  ds.RescaleSlope, ds.RescaleIntercept = 3, 7
  ds.WindowCenter, ds.WindowWidth = 10, 20
  path = tmp_path / "enhanced.dcm"
  ds.save_as(path, enforce_file_format=True)
  got, multi = decode.read_image(path)
  assert multi and got.shape == frames.shape
  for f, ((slope, intercept), window) in enumerate(zip(rescale, windows)):
    y = frames[f].astype(np.float64) * slope + intercept  # PS3.3 C.11.1
    want = window_sigmoid(y, *window[:2]) if len(window) > 2 else window_linear(y, *window)
    np.testing.assert_array_equal(got[f], want, err_msg=f"frame {f}")


def test_enhanced_shared_window_per_frame_rescale_monochrome1(tmp_path):
  rng = np.random.default_rng(5)
  frames = rng.integers(0, 4096, (2, 32, 33)).astype(np.uint16)
  rescale = [(1.0, -500.0), (1.5, 0.0)]
  ds = enhanced_cine(frames, rescale, None, shared={"window": (1200, 2001)}, photometric="MONOCHROME1")
  path = tmp_path / "enhanced_m1.dcm"
  ds.save_as(path, enforce_file_format=True)
  got, _ = decode.read_image(path)
  for f, (slope, intercept) in enumerate(rescale):
    y = frames[f].astype(np.float64) * slope + intercept
    np.testing.assert_array_equal(got[f], 255 - window_linear(y, 1200, 2001))


def test_enhanced_shared_rescale_without_window_is_minmax_per_frame(tmp_path):
  rng = np.random.default_rng(6)
  frames = rng.integers(0, 4096, (2, 32, 32)).astype(np.uint16)
  ds = enhanced_cine(frames, None, None, shared={"rescale": (-1.0, 4095.0)})
  path = tmp_path / "enhanced_minmax.dcm"
  ds.save_as(path, enforce_file_format=True)
  got, _ = decode.read_image(path)
  for f in range(2):
    np.testing.assert_array_equal(got[f], minmax(4095.0 - frames[f]))  # slope -1 inverts


@pytest.mark.parametrize("words,rescale", [(16, None), (8, (1, 0)), (16, (1.0, 0.0))])
def test_plain_8bit_data_is_kept_in_16bit_words_and_under_an_identity_rescale(tmp_path, words, rescale):
  """BitsStored 8 without a window: the stored values, whether the words are 8 or 16 bits and whether a
  slope 1 / intercept 0 rescale is present (min-max per frame gave each frame of a cine its own gain:
  stored 63 read 6 in one frame and 4 in the next). A real rescale is still min-max scaled."""
  rng = np.random.default_rng(8)
  frames = rng.integers(60, 180, (2, 32, 32))
  frames[1, 0, 0] = 250
  ds = new_dataset(frames.astype(np.uint16 if words == 16 else np.uint8), bits=8)
  if rescale:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  path = tmp_path / "plain8.dcm"
  ds.save_as(path, enforce_file_format=True)
  with decode.collect_notes() as notes:
    got, _ = decode.read_image(path)
  np.testing.assert_array_equal(got, frames)
  assert notes.lines() == []
  ds.RescaleSlope, ds.RescaleIntercept = 2, 0
  ds.save_as(path, enforce_file_format=True)
  got, _ = decode.read_image(path)
  for f in range(2):
    np.testing.assert_array_equal(got[f], minmax(2.0 * frames[f]))


def test_enhanced_per_frame_items_must_match_frames(tmp_path):
  frames = np.zeros((3, 32, 32), np.uint16)
  ds = enhanced_cine(frames, [(1.0, 0.0)] * 3, None)
  ds.PerFrameFunctionalGroupsSequence = Sequence(list(ds.PerFrameFunctionalGroupsSequence)[:2])
  path = tmp_path / "bad_groups.dcm"
  ds.save_as(path, enforce_file_format=True)
  with pytest.raises(DatasetInputError, match=r"bad_groups\.dcm.*2 items.*3 frame"):
    decode.read_image(path)


def test_plain_cine_window_applies_to_every_frame(tmp_path):
  """Non-enhanced multi-frame: the top-level window applies to all frames (unchanged rule)."""
  rng = np.random.default_rng(7)
  frames = rng.integers(0, 4096, (2, 32, 32)).astype(np.uint16)
  ds = new_dataset(frames, bits=12)
  ds.WindowCenter, ds.WindowWidth = 2000, 1001
  path = tmp_path / "cine.dcm"
  ds = save_and_read(ds, path)
  got, multi = decode.read_image(path)
  assert multi
  np.testing.assert_array_equal(got, pydicom_gray(ds))
  for f in range(2):
    np.testing.assert_array_equal(got[f], window_linear(frames[f], 2000, 1001))


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"])
@pytest.mark.parametrize("bad", ["NaN ", "-inf", "a.b "], ids=["nan", "inf", "text"])
def test_non_finite_or_garbage_rescale_and_window_are_refused(tmp_path, keyword, bad):
  """A corrupt numeric tag (NaN, Inf or text) is one clear error naming the tag, not an image of
  NaN cast to uint8 (an undefined value) nor a ValueError traceback; valid tags still decode."""
  frames = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3) % 4096
  ds = new_dataset(frames, bits=12)
  values = {"RescaleSlope": "1.00", "RescaleIntercept": "0.00", "WindowCenter": "2000", "WindowWidth": "1000"}
  values[keyword] = "7.25"  # a placeholder of the same length as the bad value, patched in the file below
  for k, v in values.items():
    setattr(ds, k, v)
  good = tmp_path / "good.dcm"
  ds.save_as(good, enforce_file_format=True)
  raw = good.read_bytes()
  assert raw.count(b"7.25") == 1
  bad_path = tmp_path / "bad.dcm"
  bad_path.write_bytes(raw.replace(b"7.25", bad.encode()))
  got, _ = decode.read_image(good)  # the placeholder itself is a valid file
  assert got.dtype == np.uint8
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pydicom warns about the invalid DS value while reading
    with pytest.raises(DatasetInputError, match=rf"bad\.dcm: {keyword} .* is not a finite number"):
      decode.read_image(bad_path)


def test_rescale_slope_stored_as_text_is_read_as_its_number(tmp_path):
  """A RescaleSlope / WindowCenter written under a text VR (pydicom returns a str, e.g. '2.5' or '40\\400')
  is its number, not its first character: the image equals the same file with the DS-typed values."""
  from pydicom.dataelem import DataElement

  frames = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3) % 4096
  paths = []
  for vr in ("DS", "LO"):
    ds = new_dataset(frames, bits=12)
    ds.RescaleIntercept = "0"
    ds.add(DataElement(0x00281053, vr, "2.5"))  # RescaleSlope
    ds.add(DataElement(0x00281050, vr, "4000\\1" if vr == "LO" else ["4000", "1"]))  # WindowCenter
    ds.WindowWidth = "6000"
    paths.append(tmp_path / f"{vr}.dcm")
    ds.save_as(paths[-1], enforce_file_format=True)
  ref, _ = decode.read_image(paths[0])
  got, _ = decode.read_image(paths[1])
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(ref.reshape(frames.shape), window_linear(frames * 2.5, 4000, 6000))
