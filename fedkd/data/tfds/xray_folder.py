"""``xray_folder``: a hospital's own labelled X-ray folder as a TFDS dataset (array_record).

Layout under ``manual_dir``::

    images/<stem>.png|.jpg|.jpeg|.dcm   (or DICOM files of any other name: <stem> is then the whole name)
    masks/<stem>.png|.dcm|.npy          one mask per image (exactly one of these)
    splits.json                         optional: {"train": [stems], "test": [stems], ...}

Multi-frame (cine) DICOM images (NumberOfFrames > 1): every frame is one example with id
``<stem>#<frame>`` (frames counted from 0). Their masks are either one multi-frame file
``masks/<stem>.dcm`` / ``masks/<stem>.npy`` ([F, H, W], same number of frames) or per-frame PNGs
``masks/<stem>_<frame:04d>.png`` (``x_0000.png``, ``x_0001.png``, ...).

Without ``splits.json`` every image goes to ``train``. With it, every image stem must be listed
in exactly one split (split names: letters, digits, ``_``, ``-``).

Image conversion: see ``fedkd.data.tfds.decode``; mask label conventions: ``label_maps``. Every file is
decoded and checked before anything is written, and TFDS writes into a temporary folder renamed
only on success, so a failed build never leaves a dataset that looks prepared.

Input rules beyond the decoding:

* Orphan masks are refused: a file in ``masks/`` with a mask or image extension that is not
  read as the mask of any image (no image with that stem, a per-frame name for a single-frame
  image, a frame number past the end of the cine, a second mask next to the one used). In a
  hospital export an orphan mask almost always means a missing or renamed image, i.e. labelled
  data that would silently be left out; the error names each file and the fix (add the image,
  rename, or move the file out of ``masks/``). Other files there (``.txt``, ``.csv``, ...) are
  ignored.
* Images smaller than ``folders.MIN_IMAGE_SIDE`` (32) pixels in height or width are refused.
* RGB masks need a ``color_map`` (CLI ``--color_map``) unless their three channels are equal.
* Lossy or non-obvious conversions (16-bit PNG min-max scaled, colour images converted to
  gray, palette DICOM, DICOM without a VOI window) are listed as ``note: ...`` lines on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from fedkd.data.tfds import decode
from fedkd.data.tfds import folders
from fedkd.data.tfds import label_maps
from fedkd.data.tfds import records
from fedkd.data.tfds.folders import Pair
from fedkd.data.tfds.label_maps import LabelSpec
from fedkd.data.tfds.records import DatasetInputError

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][\w\-]*$")
_PER_FRAME = re.compile(r"^(.+)_(\d{4})$")  # <stem>_<frame:04d>


@dataclasses.dataclass
class XrayFolderConfig(tfds.core.BuilderConfig):
  """``site``: site name stored in every record (None: the manual_dir folder name).
  ``label_map`` / ``color_map``: mask value conventions (see ``label_maps``)."""

  site: str | None = None
  label_map: dict | None = None
  color_map: dict | None = None

  def label_spec(self) -> LabelSpec:
    return LabelSpec.create(self.label_map, self.color_map)


class XrayFolder(tfds.core.GeneratorBasedBuilder):
  """A local folder of X-ray images (PNG/JPEG/DICOM incl. cine) with segmentation masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: PNG/JPEG/DICOM (incl. multi-frame) + masks."}
  BUILDER_CONFIGS = [
    XrayFolderConfig(name="default", description="Masks hold class indices 0..3."),
    XrayFolderConfig(
      name="gray_0_128_255",
      label_map=dict(label_maps.GRAY_0_128_255_MAP),
      description="Gray masks 0 background, 128 catheter, 255 guidewire.",
    ),
    XrayFolderConfig(
      name="rgb",
      color_map=dict(label_maps.RGB_COLOR_MAP),
      description="RGB masks: black bg, red catheter, green guidewire, blue vessel.",
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put your own data under manual_dir:
      images/<stem>.png|.jpg|.jpeg|.dcm   (multi-frame XA cine DICOM allowed)
      masks/<stem>.png|.dcm|.npy          labels 0 bg, 1 catheter, 2 guidewire, 3 vessel
                                          (other conventions: label_map / color_map)
      masks/<stem>_<frame:04d>.png        alternative per-frame masks for cine DICOM
      splits.json                         optional {"train": [stems], "test": [stems]}
    Build: python -m fedkd.data.tfds.build --dataset=xray_folder --manual_dir=DIR \\
             --data_dir=OUT [--site=NAME] [--label_map=0:0,128:1,255:2]
    """

  # Set explicitly: TFDS' own lookup of the code path needs the `importlib_resources`
  # backport for packages outside tensorflow_datasets, which is not a dependency here.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=(f"Local catheter/guidewire X-ray segmentation folder. Labels: {cfg.label_spec().describe()}."),
      features=records.features(),
      metadata=records.metadata(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = folders.manual_dir_from(
      dl_manager, "xray_folder", "pass manual_dir=<folder with images/ and masks/> (CLI --manual_dir)"
    )
    spec = self.builder_config.label_spec()
    site = self.builder_config.site or root.resolve().name
    self.info.metadata[records.SOURCE_KEY] = records.source_fingerprint(root)
    splits = scan_folder(root)
    check_folder(root, splits, spec)  # everything, before any split is written
    return {name: self._generate_examples(name, pairs, spec, site) for name, pairs in splits.items()}

  def _generate_examples(self, split, pairs, spec, site):
    yield from records.track_split_stats(self.info, split, folders.generate_pairs(pairs, spec, site))


def scan_folder(root: Path) -> dict[str, list[Pair]]:
  """List ``root/images`` and assign each image to a split (``splits.json`` or all train)."""
  root = Path(root)
  if not root.is_dir():
    raise DatasetInputError(f"{root}: manual_dir not found; create it with images/ and masks/ subfolders")
  images = folders.list_images(root / "images")
  masks_dir = root / "masks"
  if not masks_dir.is_dir():
    raise DatasetInputError(
      f"{masks_dir}: mask folder not found; put one mask per image there as <stem>.png (or .dcm/.npy)"
    )
  by_stem = {decode.image_stem(p): p for p in images}
  split_file = root / "splits.json"
  if not split_file.is_file():
    assignment = {"train": sorted(by_stem)}
  else:
    assignment = _read_splits(split_file, by_stem)
  return {
    name: [Pair(image=by_stem[s], mask_dir=masks_dir, stem=s, id_prefix=s) for s in stems]
    for name, stems in assignment.items()
    if stems
  }


def check_folder(root: Path, splits: dict[str, list[Pair]], spec: LabelSpec) -> int:
  """Decode and check every image and mask, and refuse orphan masks in every mask folder the pairs use
  (xray_folder: ``root/masks``; CathAction: each split's ``labels/``); raise one ``DatasetInputError``
  listing every problem. On success print the conversion notes (``note: ...`` on stderr) and return the
  number of examples."""
  del root  # the mask folders are the pairs' own
  groups: dict[Path, list[Pair]] = {}
  for pairs in splits.values():
    for pair in pairs:
      groups.setdefault(pair.mask_dir, []).append(pair)
  problems, total, ids = [], 0, {}
  with decode.collect_notes() as notes:
    for masks_dir, pairs in groups.items():  # stems are unique within one mask folder, not across them
      used, failed, frames = {}, set(), {}
      for pair in pairs:
        try:
          frames[pair.stem] = folders.validate_pairs([pair], spec, used, ids)
        except DatasetInputError as e:
          problems.extend(e.problems)
          failed.add(pair.stem)
      problems.extend(_orphan_masks(masks_dir, {p.stem: p for p in pairs}, set(used), failed, frames))
      total += sum(frames.values())
  if problems:
    raise DatasetInputError(problems)
  notes.emit()
  return total


def _orphan_masks(
  masks_dir: Path, images: dict[str, Pair], used: set[Path], failed: set[str], frames: dict[str, int]
) -> list[str]:
  """One problem per file in ``masks_dir`` that looks like a mask or image but is not read
  as the mask of any image (files of images already reported as failed are skipped)."""
  problems = []
  lower = {s.lower(): s for s in images}
  for f in sorted(masks_dir.iterdir()):
    if f.name.startswith(".") or f.name.lower() in folders.JUNK_FILES or not f.is_file():
      continue
    ext = f.suffix.lower()
    named = ext in decode.MASK_EXTS or ext in decode.IMAGE_EXTS
    if not (named or decode.is_dicom_file(f)) or f in used:
      continue
    stem = f.stem if named else f.name  # an extension-less or UID-named DICOM file: its whole name
    per_frame = _PER_FRAME.match(stem)
    base = per_frame.group(1) if per_frame else None
    if stem in failed or base in failed:
      continue
    fix = f"remove it or move it out of {masks_dir.name}/"
    if stem in images:
      why = (
        f"not used: image {images[stem].image.name} already has its mask(s) "
        f"{_names(_masks_of(stem, used))} (masks are {'/'.join(decode.MASK_EXTS)})"
      )
    elif base in images and frames.get(base) == 1:
      why = (
        f"per-frame mask name, but image {images[base].image.name} has a single "
        f"frame (its mask is {base}.png/.dcm/.npy)"
      )
    elif base in images:
      why = (
        f"not used: image {images[base].image.name} has {frames.get(base)} frames "
        f"(0..{frames.get(base, 1) - 1}) with masks {_names(_masks_of(base, used))}"
      )
    elif stem.lower() in lower or (base or "").lower() in lower:
      match = images[lower.get(stem.lower()) or lower[base.lower()]]
      why = f"mask without an image; file names are case-sensitive: did you mean image {match.image.name}?"
      fix = "rename the mask to match the image"
    else:
      why = (
        f"mask without an image (no images/{stem}.* image file"
        + (f" nor multi-frame images/{base}.dcm" if base else "")
        + ")"
      )
      fix = (
        f"add the image, fix the file name, or move the mask out of {masks_dir.name}/ (orphan "
        "masks are refused: they usually mean a missing or renamed image)"
      )
    problems.append(f"{f}: {why}; {fix}")
  return problems


def _masks_of(stem: str, used: set[Path]) -> list[Path]:
  """The used mask files of image ``stem`` (``stem.*`` or per-frame ``stem_<frame>.png``)."""
  out = []
  for p in used:
    m = _PER_FRAME.match(p.stem)
    if p.stem == stem or (m and m.group(1) == stem):
      out.append(p)
  return out


def _names(paths) -> str:
  names = sorted(p.name for p in paths)
  return records.short_list(names, 4)


def _read_splits(path: Path, by_stem: dict[str, Path]) -> dict[str, list[str]]:
  try:
    data = json.loads(path.read_bytes())  # bytes: UTF-8 with or without BOM, UTF-16/32 (Windows editors, PowerShell)
  except (OSError, ValueError) as e:
    raise DatasetInputError(
      f"{path}: unreadable splits.json ({e}); expected {{\"train\": [\"stem\", ...], \"test\": [...]}}"
    ) from None
  if (
    not isinstance(data, dict)
    or not data
    or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values())
  ):
    raise DatasetInputError(
      f"{path}: splits.json must map split names to lists of image "
      f'stems, e.g. {{"train": ["a", "b"], "test": ["c"]}}'
    )
  problems, seen, out, refused = [], {}, {}, set()
  composed = {folders.nfc(s): s for s in by_stem}  # splits.json typed in NFC, file names listed in NFD
  for name, stems in data.items():
    if not _SPLIT_NAME.match(name):
      problems.append(f"{path}: invalid split name {name!r} (use letters, digits, _ -)")
    elif name.lower() == "all":  # TFDS reads 'all' (any case) as every split together
      problems.append(f"{path}: split name {name!r} is reserved by TFDS (it means every split); use another name")
    else:
      out[name] = []
    if name not in out:  # its images are named by the problem above, not as unlisted
      refused.update(stems)
      continue
    for s in stems:
      stem = s
      if stem not in by_stem and Path(s).suffix and folders.nfc(Path(s).stem) in composed:
        stem = Path(s).stem  # a file name was given
      stem = stem if stem in by_stem else composed.get(folders.nfc(stem), stem)
      if stem not in by_stem:
        problems.append(
          f"{path}: split {name!r} lists {s!r} but there is no such image in {next(iter(by_stem.values())).parent}"
        )
      elif stem in seen and seen[stem] == name:
        problems.append(f"{path}: image {stem!r} is listed twice in split {name!r}; list it once")
      elif stem in seen:
        problems.append(f"{path}: image {stem!r} is listed in both {seen[stem]!r} and {name!r}; list it in one split")
      else:
        seen[stem] = name
        out[name].append(stem)
  unlisted = sorted(set(by_stem) - set(seen) - refused)
  if unlisted:
    problems.append(
      f"{path}: {len(unlisted)} image(s) not listed in any split "
      f"({unlisted[:6]}{' ...' if len(unlisted) > 6 else ''}); add them to a "
      f"split or move them out of images/"
    )
  if problems:
    raise DatasetInputError(problems)
  return out
