"""Image and mask files -> uint8 arrays: PNG / JPEG through PIL, DICOM through pydicom.

Image conversion
----------------
* PNG / JPEG, 8-bit gray (PIL mode ``L``): unchanged.
* Colour or palette images (``RGB``, ``RGBA``, ``P``, ``LA``, ``1``, ...): PIL ``convert("L")``,
  i.e. ITU-R 601-2 luma ``L = R*299/1000 + G*587/1000 + B*114/1000`` (alpha ignored). A build
  prints a ``note:`` line listing the images with real colour (gray stored as RGB is exact).
* 16-bit / 32-bit / float PNG (``I;16``, ``I``, ``F``): min-max scaled per image (see below),
  with a ``note:`` line. (Not a fixed ``x * 255 / 65535``: X-ray PNGs often use only 10-12 of
  the 16 bits, which a fixed scale would turn nearly black.)
* An EXIF orientation tag (JPEG, or PNG's ``eXIf`` chunk) other than 1: the pixels are flipped / turned upright
  as image viewers and annotation tools show them (PIL ``ImageOps.exif_transpose``), masks alike, with a
  ``note:`` line; a mask drawn over the stored (unturned) pixels of such an image no longer matches it.
* 16-bit PNG with colour or alpha (PNG colour types 2, 4, 6): refused, images and masks alike. PIL
  keeps only the high byte of each of their samples, which would cut a 12-bit X-ray to 0..15 and a
  class-index mask to all background; save such a file as 16-bit grayscale without alpha or as 8-bit.
* DICOM, monochrome, per frame, in the order of PS3.3 C.11 (pydicom's own LUT functions
  ``apply_modality_lut`` / ``apply_voi`` do the table lookups):

  1. modality LUT: the ``ModalityLUTSequence`` table if present, else the linear rescale
     ``x * RescaleSlope + RescaleIntercept`` if either tag is present, else identity;
  2. VOI LUT, onto [0, 255]:

     - ``VOILUTSequence`` table (first item; preferred over a window, as pydicom's
       ``apply_voi_lut`` does): the modality output is rounded to an integer and clamped to
       the table's input range, looked up, and the table output ``v`` (``n`` = third
       ``LUTDescriptor`` value, bits per entry) becomes ``round(v * 255 / (2**n - 1))``. An 8-bit
       table is handed to pydicom declared 16-bit (same entries), as pydicom would index a table
       of more than 256 8-bit entries with 8-bit integers (entry 300 read as entry 44); an entry
       above ``2**n - 1`` makes the file refused as inconsistent;
     - else ``WindowCenter``/``WindowWidth`` (width > 0): the DICOM window (first value when
       the tags are multi-valued; ``VOILUTFunction`` LINEAR (default), LINEAR_EXACT or
       SIGMOID, PS3.3 C.11.2.1.2) onto [0, 255]; LINEAR at width 1 is a threshold (``x <= c - 0.5``
       black, above white);
     - else 8-bit data (BitsStored 8, unsigned, in 8- or 16-bit words) without a modality
       transform or with an identity one (slope 1, intercept 0): unchanged;
     - else min-max scaled **per frame** (with a ``note:`` line);
  3. ``MONOCHROME1`` images are inverted afterwards (``255 - y``) so that all images share
     the MONOCHROME2 convention (low value = dark).

  A rescale or window value that is not a finite number (NaN, Inf, text), or NaN/Inf pixel
  values after the modality transform, make the file refused as corrupt.

  Enhanced multi-frame objects (Enhanced XA / XRF cine, Enhanced CT / MR) keep rescale and
  window per frame in functional groups: an item of ``PixelValueTransformationSequence``
  (rescale) or ``FrameVOILUTSequence`` (window) in ``SharedFunctionalGroupsSequence`` and then
  in the frame's ``PerFrameFunctionalGroupsSequence`` item replaces that attribute group of
  the top level for that frame.
* DICOM ``PALETTE COLOR``: the stored indices go through the palette (pydicom's
  ``apply_color_lut``; a palette of more than 256 8-bit entries re-encoded as 16-bit entries first, for the
  reason above); the RGB result (entries 0 .. ``2**n - 1``, ``n`` = third value of the
  Red Palette Color Lookup Table Descriptor) becomes ``round(luma * 255 / (2**n - 1))``.
  A palette file without its tables is refused.
* Colour DICOM (SamplesPerPixel 3, YBR decoded to RGB by pydicom): luma as above; 8-bit data
  rounded, deeper data min-max scaled per frame.
* Min-max scaling, in float64: ``y = round((x - min) * 255 / (max - min))`` with numpy's
  round-half-to-even; a constant image becomes all zeros.
* Images smaller than ``folders.MIN_IMAGE_SIDE`` (32) pixels in height or width are refused when
  a folder is read (``fedkd.data.tfds.folders.load_pair``).

Mask files
----------
Masks are ``.png`` (8/16-bit gray, palette or 8-bit RGB; a palette PNG's values are its palette indices, as
in VOC-style class masks, not the colours shown), ``.dcm`` (raw stored values, no windowing)
or ``.npy`` (integer/bool array ``[H, W]`` or ``[F, H, W]``). JPEG masks are rejected (lossy).
``read_mask`` turns their values into classes with a ``fedkd.data.tfds.label_maps.LabelSpec``.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import struct
import sys
from pathlib import Path

import numpy as np

from fedkd.data.tfds.label_maps import LabelSpec
from fedkd.data.tfds.records import DatasetInputError, short_list

PIL_IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DICOM_EXTS = (".dcm", ".dicom")
IMAGE_EXTS = PIL_IMAGE_EXTS + DICOM_EXTS
MASK_EXTS = (".png", ".dcm", ".npy")


def minmax_to_uint8(x: np.ndarray) -> np.ndarray:
  """``round((x - min) * 255 / (max - min))`` in float64 (half-to-even); constant -> 0."""
  x = np.asarray(x, dtype=np.float64)
  lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    return np.zeros(x.shape, dtype=np.uint8)
  return np.clip(np.round((x - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def voi_window_to_uint8(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
  """DICOM VOI LUT window (PS3.3 C.11.2.1.2) onto [0, 255], rounded half-to-even."""
  x = np.asarray(x, dtype=np.float64)
  function = (function or "LINEAR").upper()
  if function == "SIGMOID":
    y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  elif function == "LINEAR_EXACT":
    y = ((x - center) / width + 0.5) * 255.0
  elif width <= 1.0:  # LINEAR at width 1: a threshold, x <= c - 0.5 -> 0, above -> 255 (no ramp between)
    y = np.where(x > center - 0.5, 255.0, 0.0)
  else:  # LINEAR
    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.float64)
  return (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000.0


def is_dicom_file(path: Path) -> bool:
  """``.dcm``/``.dicom`` extension, or any other name but .png/.jpg/.jpeg/.npy with the DICM preamble (PS3.10):
  extension-less files, and files named by their UID (``1.2.826.0.1.3680043.8.498.1``, "extension" ``.1``)."""
  ext = Path(path).suffix.lower()
  if ext in DICOM_EXTS:
    return True
  if ext in PIL_IMAGE_EXTS or ext == ".npy":
    return False
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def image_stem(path: Path) -> str:
  """The name an image's mask and its splits.json entry use: the file name less its .png/.jpg/.jpeg/.dcm/.dicom
  extension; any other name whole (an extension-less or UID-named DICOM file: ``1.2.840.1.5`` is not ``1.2.840.1``
  with extension ``.5``)."""
  path = Path(path)
  return path.stem if path.suffix.lower() in IMAGE_EXTS else path.name


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {2: "RGB", 4: "gray + alpha", 6: "RGBA"}  # with 16-bit samples PIL keeps their high byte


EXIF_ORIENTATION = 0x0112  # TIFF/EXIF tag 274: 1 = stored as shown, 2-8 = a flip and/or a quarter turn to show it


def _open_pil(path: Path, what: str = "image"):
  """``path`` decoded by PIL, turned upright by its EXIF orientation as image viewers and annotation tools show it
  (with a note); a 16-bit PNG that PIL would cut to 8 bits is refused."""
  from PIL import Image, ImageOps

  try:
    raw = Path(path).read_bytes()
    im = Image.open(io.BytesIO(raw))
    im.load()
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL names the in-memory stream it was given (<_io.BytesIO object at 0x...>), not the file
    why = (
      "PIL cannot identify it as an image"
      if isinstance(e, Image.UnidentifiedImageError)
      else f"{type(e).__name__}: {e}"
    )
    raise DatasetInputError(
      f"{path}: unreadable or corrupt {what} file ({why}); "
      + (
        "re-export it as PNG/JPEG or remove it (and its mask) from the folder"
        if what == "image"
        else "re-export it as a PNG (or .npy) of label values, or remove it and its image"
      )
    ) from None
  head = raw[:26]  # the PNG header: signature, IHDR length and type, width, height, bit depth, colour type
  if (
    len(head) == 26
    and head[:8] == PNG_SIGNATURE
    and head[12:16] == b"IHDR"
    and head[24] == 16
    and head[25] in PNG_COLOUR_TYPES
  ):
    raise DatasetInputError(
      f"{path}: 16-bit {PNG_COLOUR_TYPES[head[25]]} PNG; its samples would be cut to their high byte here "
      f"(PIL reads such files as 8-bit), so save the {what} as 16-bit grayscale without alpha, or as 8-bit"
    )
  if orientation in range(2, 9):
    im = ImageOps.exif_transpose(im)
    _note(NOTE_ORIENTATION, path)
  return im


@contextlib.contextmanager
def _pydicom_quiet():
  """pydicom logs the traceback of every decoder plugin that fails on a frame (``logger.exception``) before it
  raises; the error raised says the same, so those records (below CRITICAL) are dropped while pixels decode."""
  import logging

  logger = logging.getLogger("pydicom")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _read_dicom(path: Path):
  import pydicom

  try:
    ds = pydicom.dcmread(str(path), force=True)
  except Exception as e:  # pydicom raises many types on garbage input
    raise DatasetInputError(
      f"{path}: unreadable or corrupt DICOM file ({type(e).__name__}: {e}); re-export it or remove it from the folder"
    ) from None
  if "PixelData" not in ds and "FloatPixelData" not in ds:
    raise DatasetInputError(
      f"{path}: DICOM file has no pixel data (not an image, or corrupt); remove it from the folder"
    )
  try:
    with _pydicom_quiet():
      arr = np.asarray(ds.pixel_array)
  except Exception as e:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
      compressed = ts is None or ts.is_compressed
    except (AttributeError, ValueError):  # pydicom: 'UID is not a transfer syntax' (a private or unknown one)
      compressed = True
    if not compressed:  # raw pixels that do not decode: cut short
      fix = "the file is uncompressed, so its pixel data is damaged, cut short or laid out in a way pydicom cannot read: re-export it or remove it"
    else:
      fix = "for compressed DICOM install pylibjpeg with pylibjpeg-libjpeg/openjpeg, or decompress first (e.g. `gdcmconv --raw`)"
    raise DatasetInputError(
      f"{path}: cannot decode DICOM pixel data (transfer syntax {ts or 'unknown'}; {type(e).__name__}: {e}); {fix}"
    ) from None
  nframes = int(ds.get("NumberOfFrames", 1) or 1)
  spp = int(ds.get("SamplesPerPixel", 1) or 1)
  base_ndim = 3 if spp > 1 else 2
  if arr.ndim == base_ndim:
    arr = arr[None]
  if arr.ndim != base_ndim + 1 or (nframes > 1 and arr.shape[0] != nframes):
    raise DatasetInputError(
      f"{path}: unexpected DICOM pixel array shape {arr.shape} (NumberOfFrames "
      f"{nframes}, SamplesPerPixel {spp}); the file is probably corrupt"
    )
  return ds, arr, nframes > 1


def _first_value(v) -> float:
  """The first value of a numeric data element: a number, a multi-value, or text (a DS value read under
  another VR, e.g. '2.5' or '40\\400', whose first character is not its first value)."""
  if isinstance(v, bytes):
    v = v.decode("ascii", errors="replace")
  if isinstance(v, str):
    return float(v.split("\\")[0].strip())
  try:
    return float(v[0])
  except TypeError:
    return float(v)


def _number(value, keyword: str, path: Path, default: float | None = None) -> float | None:
  """The (first) value of a numeric data element as a finite float; ``default`` when absent or
  empty. A value that is not a finite number (garbage text, NaN, Inf) is a corrupt file."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return default
  try:
    v = _first_value(value)
  except (TypeError, ValueError, IndexError):
    v = float("nan")
  if not np.isfinite(v):
    raise DatasetInputError(
      f"{path}: {keyword} {value!r} is not a finite number; the file is corrupt, re-export it or remove it "
      "from the folder"
    )
  return v


# --------------------------------------------------------------------------------------------
# Conversion notes
# --------------------------------------------------------------------------------------------
NOTE_HIGH_DEPTH = (
  "16-bit (or 32-bit / float) PNG image(s) min-max scaled to 8 bits, per image (darkest pixel 0, brightest 255)"
)
NOTE_COLOUR = "colour image(s) converted to gray with ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B)"
NOTE_PALETTE = "PALETTE COLOR DICOM image(s): colour palette applied, then converted to gray (luma)"
NOTE_ORIENTATION = (
  "image or mask file(s) with an EXIF orientation: flipped/turned upright as viewers show them (the image and its "
  "mask each by its own tag)"
)
NOTE_DICOM_MINMAX = "DICOM image(s) without a VOI window or VOI LUT: min-max scaled to 8 bits per frame"


class ConversionNotes:
  """Conversions that change what the user may expect (bit depth, colour), by kind.

  Collected while a builder checks its input (``collect_notes``) and printed once per build
  as ``note: ...`` lines on stderr; the conversions themselves follow the module docstring."""

  def __init__(self):
    self.files: dict[str, list[Path]] = {}

  def add(self, kind: str, path: Path) -> None:
    paths = self.files.setdefault(kind, [])
    if path not in paths:
      paths.append(path)

  def lines(self) -> list[str]:
    out = []
    for kind, paths in self.files.items():
      names = [f"{p.parent.name}/{p.name}" for p in paths]
      if len(set(names)) < len(names):  # e.g. CathAction's train/images/x.jpg and test/images/x.jpg
        names = ["/".join(p.parts[-3:]) for p in paths]
      out.append(f"note: {kind}: {len(paths)} file(s) {short_list(names, 5)}")
    return out

  def emit(self, file=None) -> None:
    for line in self.lines():
      print(line, file=file or sys.stderr)


_NOTES: contextvars.ContextVar = contextvars.ContextVar("fedkd_tfds_notes", default=None)


@contextlib.contextmanager
def collect_notes():
  """``with collect_notes() as notes:`` records the conversion notes of the files decoded
  inside the block (``read_image``) into ``notes`` (a ``ConversionNotes``)."""
  notes = ConversionNotes()
  token = _NOTES.set(notes)
  try:
    yield notes
  finally:
    _NOTES.reset(token)


def _note(kind: str, path: Path) -> None:
  notes = _NOTES.get()
  if notes is not None:
    notes.add(kind, Path(path))


# --------------------------------------------------------------------------------------------
# DICOM grayscale pipeline (PS3.3 C.11: modality LUT -> VOI LUT -> presentation)
# --------------------------------------------------------------------------------------------
_MODALITY_KEYS = ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence")
_VOI_KEYS = ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")
# Functional-group macros of enhanced multi-frame objects (Enhanced XA/XRF/CT/MR, PS3.3
# C.7.6.16.2) and the attribute group each one carries for its frame(s).
_FRAME_MACROS = (("PixelValueTransformationSequence", _MODALITY_KEYS), ("FrameVOILUTSequence", _VOI_KEYS))
# What pydicom's LUT functions raise on malformed tables.
_LUT_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError, struct.error)


def _pydicom_luts():
  """pydicom's LUT functions: ``pydicom.pixels`` (pydicom >= 3) or their 2.x location."""
  try:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
  except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi
  return apply_color_lut, apply_modality_lut, apply_voi


def _item(ds, keyword: str):
  """First item of sequence ``keyword`` of ``ds`` (None if ``ds`` is None, or the sequence
  is absent or empty)."""
  seq = ds.get(keyword) if ds is not None else None
  return seq[0] if seq else None


def _frame_transforms(ds, nframes: int, path: Path) -> list[dict]:
  """Per frame, the data elements of the modality and VOI transforms that apply to it.

  Top-level attributes apply to every frame. In an enhanced multi-frame object an item of a
  functional-group macro in ``SharedFunctionalGroupsSequence`` and then in the frame's
  ``PerFrameFunctionalGroupsSequence`` item replaces the whole attribute group it carries
  (``PixelValueTransformationSequence``: rescale; ``FrameVOILUTSequence``: window)."""
  base = {k: ds[k] for k in _MODALITY_KEYS + _VOI_KEYS if k in ds}
  shared = _item(ds, "SharedFunctionalGroupsSequence")
  per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
  if not any(macro in item for item in per_frame for macro, _ in _FRAME_MACROS):
    per_frame = []  # nothing for us there (e.g. only plane positions)
  if per_frame and len(per_frame) != nframes:
    raise DatasetInputError(
      f"{path}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items but the file "
      f"has {nframes} frame(s); the file is inconsistent, re-export it"
    )
  out = []
  for f in range(nframes):
    attrs = dict(base)
    for group in (shared, per_frame[f] if per_frame else None):
      for macro, keys in _FRAME_MACROS:
        item = _item(group, macro)
        if item is None:
          continue
        for k in keys:
          attrs.pop(k, None)
        attrs.update({k: item[k] for k in keys if k in item})
    out.append(attrs)
  return out


def _value(attrs: dict, keyword: str):
  elem = attrs.get(keyword)
  return None if elem is None else elem.value


def _lut_dataset(ds, elem):
  """A Dataset holding just ``elem`` (a LUT sequence) with the encoding of ``ds``: pydicom's
  LUT functions read the byte order of OW LUT data from the file meta or the encoding."""
  view = _encoding_view(ds)
  view.add(elem)
  return view


def _encoding_view(ds):
  """An empty Dataset with the file meta and encoding of ``ds`` (which pydicom's LUT functions read)."""
  from pydicom.dataset import Dataset

  view = Dataset()
  if getattr(ds, "file_meta", None) is not None:
    view.file_meta = ds.file_meta
  try:
    view.set_original_encoding(*ds.original_encoding, None)
  except (AttributeError, TypeError):  # pydicom without original_encoding
    pass
  return view


def _little_endian(ds) -> bool:
  """Whether ``ds``'s OW data is little-endian: its transfer syntax, else the encoding it was read with."""
  uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  if uid is not None:
    try:
      return bool(uid.is_little_endian)
    except (AttributeError, ValueError):  # a private or unknown transfer syntax
      pass
  encoding = getattr(ds, "original_encoding", (None, None))
  return encoding[1] is not False


def _voi_16bit(elem):
  """A VOI LUT Sequence element like ``elem`` whose first item declares 16 bits per entry. pydicom indexes an
  8-bit table with 8-bit integers, so entry 300 of a 4096-entry table is read as entry 44; its entries are
  16-bit words anyway, so the same table declared 16-bit is looked up right (values unchanged)."""
  from pydicom.dataset import Dataset
  from pydicom.dataelem import DataElement
  from pydicom.sequence import Sequence

  item, wide = elem.value[0], Dataset()
  entries, first, _ = (int(v) for v in item.LUTDescriptor)
  wide.LUTDescriptor = [entries, first, 16]
  wide.add(item["LUTData"])
  return DataElement(elem.tag, "SQ", Sequence([wide]))


_PALETTE_COLOURS = ("Red", "Green", "Blue", "Alpha")


def _palette_16bit(ds):
  """``ds``'s palette (a view holding only its palette elements and encoding) with 8-bit entries re-encoded as
  16-bit ones, values unchanged: pydicom indexes an 8-bit palette with 8-bit integers, so index 300 of a
  4096-entry palette reads entry 44. ``ds`` itself where its entries are 16-bit or there are at most 256."""
  entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
  entries = entries or 65536
  plain = "RedPaletteColorLookupTableData" in ds
  eight = len(ds.RedPaletteColorLookupTableData) == entries if plain else bits == 8  # pydicom's own rules
  if entries <= 256 or not eight:
    return ds
  view = _encoding_view(ds)
  if "PixelPresentation" in ds:
    view.PixelPresentation = ds.PixelPresentation
  # plain data: pydicom reads 16-bit entries in the machine's byte order; segmented: in the file's
  order = "=u2" if plain else ("<u2" if _little_endian(ds) else ">u2")
  for colour in _PALETTE_COLOURS:
    data = f"{colour}PaletteColorLookupTableData" if plain else f"Segmented{colour}PaletteColorLookupTableData"
    if data in ds:
      setattr(view, f"{colour}PaletteColorLookupTableDescriptor", [entries % 65536, first, 16])
      setattr(view, data, np.frombuffer(ds[data].value, np.uint8).astype(order).tobytes())
  return view


def _valid_lut(seq) -> bool:
  return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _lut_descriptor(seq, what: str, path: Path) -> tuple[int, int, int]:
  """(entries, first mapped value, bits per entry) of the first item of a LUT sequence."""
  desc = seq[0].get("LUTDescriptor")
  try:
    entries, first, bits = (int(v) for v in desc)
  except (TypeError, ValueError):
    raise DatasetInputError(
      f"{path}: {what} has an invalid LUTDescriptor {desc!r}; the file is inconsistent, re-export it"
    ) from None
  return entries or 65536, first, bits


def _gray_frame(x: np.ndarray, attrs: dict, ds, path: Path) -> tuple[np.ndarray, str | None]:
  """One monochrome frame of stored values -> uint8 (before the MONOCHROME1 inversion) and
  the conversion note to report (None if none). Rules: see the module docstring."""
  _, apply_modality_lut, apply_voi = _pydicom_luts()
  stored_unsigned = x.dtype.kind == "u"
  if x.dtype.kind in "iu":
    x = x.astype(np.int64)  # pydicom's table lookups subtract the first mapped value
  # Modality LUT: table (Modality LUT Sequence) or linear rescale (slope, intercept).
  mlut = _value(attrs, "ModalityLUTSequence")
  slope, intercept = _value(attrs, "RescaleSlope"), _value(attrs, "RescaleIntercept")
  if _valid_lut(mlut):
    _lut_descriptor(mlut, "ModalityLUTSequence", path)
    try:
      y = apply_modality_lut(x, _lut_dataset(ds, attrs["ModalityLUTSequence"]))
    except _LUT_ERRORS as e:
      raise DatasetInputError(
        f"{path}: cannot apply its Modality LUT Sequence ({type(e).__name__}: {e}); re-export the image"
      ) from None
    modality = True
  elif slope is not None or intercept is not None:
    y = x.astype(np.float64) * _number(slope, "RescaleSlope", path, 1.0) + _number(
      intercept, "RescaleIntercept", path, 0.0
    )
    modality = True
  else:
    y, modality = x, False
  if not np.isfinite(y).all():  # NaN/Inf float pixel data or an overflowing rescale: no faithful 8-bit image
    raise DatasetInputError(
      f"{path}: NaN/Inf pixel values after the modality transform; the file is corrupt, re-export it or "
      "remove it from the folder"
    )
  # VOI LUT: table (VOI LUT Sequence; preferred over a window, as pydicom's apply_voi_lut
  # does), else window (center/width), else min-max.
  vlut = _value(attrs, "VOILUTSequence")
  center, width = _value(attrs, "WindowCenter"), _value(attrs, "WindowWidth")
  if _valid_lut(vlut):
    entries, first, bits = _lut_descriptor(vlut, "VOILUTSequence", path)
    # The table is indexed by integers: round the modality output and clamp it to the
    # table (values outside map to the first / last entry, PS3.3 C.11.2.1.1).
    iv = np.clip(np.rint(y), first, first + entries - 1).astype(np.int64)
    try:
      elem = _voi_16bit(attrs["VOILUTSequence"]) if bits == 8 else attrs["VOILUTSequence"]
      v = apply_voi(iv, _lut_dataset(ds, elem))
    except _LUT_ERRORS as e:
      raise DatasetInputError(
        f"{path}: cannot apply its VOI LUT Sequence ({type(e).__name__}: {e}); re-export the image"
      ) from None
    if v.size and int(v.max()) > 2**bits - 1:
      raise DatasetInputError(
        f"{path}: its VOI LUT Sequence holds entries up to {int(v.max())} though its LUTDescriptor says {bits} bits "
        "per entry; the file is inconsistent, re-export the image"
      )
    scaled = np.round(v.astype(np.float64) * 255.0 / (2.0**bits - 1.0))
    return np.clip(scaled, 0, 255).astype(np.uint8), None
  center, width = _number(center, "WindowCenter", path), _number(width, "WindowWidth", path)
  if center is not None and width is not None and width > 0:
    function = _value(attrs, "VOILUTFunction")
    return voi_window_to_uint8(y, center, width, str(function or "LINEAR")), None
  # 8-bit stored values the modality transform leaves as they are (none, or slope 1 and intercept 0)
  eight_bit = stored_unsigned and int(ds.get("BitsStored", 8) or 8) == 8 and x.size and x.max() <= 255
  if eight_bit and (not modality or np.array_equal(y, x)):
    return x.astype(np.uint8), None
  return minmax_to_uint8(y), NOTE_DICOM_MINMAX


def _palette_to_gray(ds, arr: np.ndarray, path: Path) -> np.ndarray:
  """PALETTE COLOR stored indices [F, H, W] -> uint8 gray via the palette and luma."""
  apply_color_lut = _pydicom_luts()[0]
  desc = ds.get("RedPaletteColorLookupTableDescriptor")
  if desc is None or not any(
    k in ds for k in ("RedPaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData")
  ):
    raise DatasetInputError(
      f"{path}: PALETTE COLOR DICOM without its palette (Red/Green/Blue Palette Color "
      f"Lookup Table Descriptor and Data); re-export the images as MONOCHROME2 or RGB"
    )
  try:
    bits = int(desc[2])
    rgb = apply_color_lut(arr, _palette_16bit(ds))
  except _LUT_ERRORS as e:
    raise DatasetInputError(
      f"{path}: cannot apply its colour palette ({type(e).__name__}: {e}); re-export the images as MONOCHROME2 or RGB"
    ) from None
  # Palette entries span 0 .. 2**bits - 1 (PS3.3 C.7.6.3.1.5); map that range onto 0..255.
  gray = _luma(rgb[..., :3]) * (255.0 / (2.0**bits - 1.0))
  return np.clip(np.round(gray), 0, 255).astype(np.uint8)


def read_image(path: Path) -> tuple[np.ndarray, bool]:
  """Decode an image file to uint8 ``[F, H, W]``; also returns whether it is a multi-frame
  (cine) object. See the module docstring for the conversion rules."""
  path = Path(path)
  if is_dicom_file(path):
    ds, arr, multi = _read_dicom(path)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR" and arr.ndim == 3:
      _note(NOTE_PALETTE, path)
      return _palette_to_gray(ds, arr, path), multi
    if arr.ndim == 4:  # colour frames
      gray = _luma(arr)
      if arr.dtype == np.uint8:
        out = np.clip(np.round(gray), 0, 255).astype(np.uint8)
      else:
        out = np.stack([minmax_to_uint8(g) for g in gray])
      if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        _note(NOTE_COLOUR, path)
      return out, multi
    transforms = _frame_transforms(ds, arr.shape[0], path)
    frames = []
    for f in range(arr.shape[0]):
      frame, note = _gray_frame(arr[f], transforms[f], ds, path)
      frames.append(frame)
      if note:
        _note(note, path)
    out = np.stack(frames)
    if photometric == "MONOCHROME1":
      out = 255 - out
    return out, multi
  if path.suffix.lower() not in PIL_IMAGE_EXTS:
    raise DatasetInputError(
      f"{path}: unsupported image file type; supported: {', '.join(IMAGE_EXTS)} "
      f"(or DICOM files of any other name, such as a UID); convert or remove it"
    )
  im = _open_pil(path)
  if im.mode == "L":
    out = np.asarray(im, dtype=np.uint8)
  elif im.mode in ("I", "F") or im.mode.startswith("I;16"):
    out = minmax_to_uint8(np.asarray(im))
    _note(NOTE_HIGH_DEPTH, path)
  else:
    if im.mode not in ("1", "LA", "La"):
      rgb = np.asarray(im.convert("RGB"))
      if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        _note(NOTE_COLOUR, path)  # gray stored as RGB converts exactly: no note
    out = np.asarray(im.convert("L"), dtype=np.uint8)
  return out[None], False


def read_mask(path: Path, spec: LabelSpec) -> np.ndarray:
  """Decode a mask file to uint8 classes ``[F, H, W]`` (F = 1 for 2-D masks)."""
  path = Path(path)
  ext = path.suffix.lower()
  if ext == ".npy":
    try:
      raw = np.load(path, allow_pickle=False)
    except Exception as e:
      raise DatasetInputError(
        f"{path}: unreadable or corrupt .npy mask ({type(e).__name__}: {e}); re-save it with np.save"
      ) from None
    if raw.dtype.kind not in "biu" or raw.ndim not in (2, 3):
      raise DatasetInputError(
        f"{path}: .npy mask must be an integer/bool array [H, W] or [F, H, W], got dtype {raw.dtype} shape {raw.shape}"
      )
  elif is_dicom_file(path):
    _, raw, _ = _read_dicom(path)
    if raw.ndim == 3 and raw.shape[0] == 1:
      raw = raw[0]
  elif ext == ".png":
    im = _open_pil(path, "mask")
    mode = im.mode
    if mode in ("P", "PA") and spec.color_map is not None and spec.label_map is None:
      raise DatasetInputError(
        f"{path}: a palette PNG, whose values are palette indices, not colours, so color_map does not apply; "
        "save the masks as RGB PNGs, or pass label_map (palette index:class) instead of color_map"
      )
    if mode in ("L", "P", "I") or mode.startswith("I;16"):
      raw = np.asarray(im)
    elif mode == "1":
      raw = np.asarray(im).astype(np.uint8)
    elif mode in ("LA", "PA"):  # drop alpha; PA keeps the palette indices
      raw = np.asarray(im)[..., 0]
    elif mode in ("RGB", "RGBA", "RGBX"):
      raw = np.asarray(im)[..., :3]
    elif mode == "F":
      raise DatasetInputError(
        f"{path}: floating-point mask PNG; masks must hold integer labels (0..3 or values mapped by label_map)"
      )
    else:
      raw = np.asarray(im.convert("RGB"))
  elif ext in (".jpg", ".jpeg"):
    raise DatasetInputError(
      f"{path}: JPEG masks are not supported (lossy compression changes label values); save masks as PNG"
    )
  else:
    raise DatasetInputError(f"{path}: unsupported mask file type; use one of {', '.join(MASK_EXTS)}")
  mask = spec.apply(np.asarray(raw), path)
  if mask.ndim == 2:
    mask = mask[None]
  return mask
