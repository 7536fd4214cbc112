"""Image/mask folders -> records: pairing each image with its mask(s), checking every pair before
anything is written, and yielding the examples (every frame of a cine file is one example)."""

from __future__ import annotations

import dataclasses
import functools
import os
import unicodedata
from pathlib import Path
from collections.abc import Iterable

import numpy as np

from fedkd.data.tfds.decode import IMAGE_EXTS, MASK_EXTS, image_stem, is_dicom_file, read_image, read_mask
from fedkd.data.tfds.label_maps import LabelSpec
from fedkd.data.tfds.records import DatasetInputError, record, short_list

#: Smallest accepted image side in pixels (height and width). Training takes random crops of
#: 80-100 % of each side and resizes them to ``config.image_size``; an image smaller than this
#: cannot be cropped or resized sensibly and is almost always an export mistake (a thumbnail,
#: an icon or a 1-pixel placeholder).
MIN_IMAGE_SIDE = 32

JUNK_FILES = {"thumbs.db", "desktop.ini", "dicomdir"}


@dataclasses.dataclass(frozen=True)
class Pair:
  """One image file and where its mask(s) live.

  ``id_prefix`` is the record id of a single-frame image; frame ``f`` of a cine file gets
  ``f"{id_prefix}#{f}"``.
  """

  image: Path
  mask_dir: Path
  stem: str
  id_prefix: str
  mask_exts: tuple[str, ...] = MASK_EXTS

  def mask_candidates(self) -> list[Path]:
    """The mask files of this image: ``<stem><ext>`` for every mask extension, in any letter case
    (``x.PNG`` as well as ``x.png``; both present: two candidates, refused as ambiguous)."""
    index = mask_files(self.mask_dir)
    return [p for e in self.mask_exts for p in index.get((nfc(self.stem), e), ())]

  def frame_mask_path(self, frame: int) -> Path:
    """Per-frame mask ``<stem>_<frame:04d>.png`` (extension in any letter case); the lower-case
    name when there is none."""
    name = f"{self.stem}_{frame:04d}"
    found = mask_files(self.mask_dir).get((nfc(name), ".png"))
    return found[0] if found else self.mask_dir / f"{name}.png"


def nfc(name: str) -> str:
  """``name`` in Unicode normal form C: the same accented name typed on Linux or Windows (composed, NFC)
  and listed from a folder copied off macOS (decomposed, NFD) compares equal."""
  return unicodedata.normalize("NFC", name)


def mask_files(mask_dir: Path) -> dict[tuple[str, str], list[Path]]:
  """``{(NFC stem, lower-case extension): [files]}`` of the regular files (or links to them) in
  ``mask_dir``, with their names as listed: an export's ``x.PNG`` is ``x``'s mask as ``x.png`` is, a
  decomposed ``Mu\u0308ller.png`` is ``Müller``'s, and on a case-insensitive file system the path is the one
  the folder listing shows. Cached per listing (the folder's modification time changes when a file is
  added, removed or renamed)."""
  try:
    st = os.stat(mask_dir)
  except OSError:
    return {}
  return _mask_index(os.fspath(mask_dir), st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _mask_index(mask_dir: str, mtime_ns: int, inode: int) -> dict[tuple[str, str], list[Path]]:
  del mtime_ns, inode  # cache keys only
  out: dict[tuple[str, str], list[Path]] = {}
  for entry in sorted(os.scandir(mask_dir), key=lambda e: e.name):
    try:
      is_file = entry.is_file()
    except OSError:
      is_file = False
    if is_file:
      p = Path(mask_dir) / entry.name
      out.setdefault((nfc(p.stem), p.suffix.lower()), []).append(p)
  return out


def list_images(images_dir: Path) -> list[Path]:
  """Image files in ``images_dir`` (not recursive), sorted; raises on unsupported files,
  duplicate stems and an empty folder."""
  images_dir = Path(images_dir)
  if not images_dir.is_dir():
    raise DatasetInputError(
      f"{images_dir}: image folder not found; expected image files ({', '.join(IMAGE_EXTS)}) there"
    )
  files, problems, stems = [], [], {}
  for p in sorted(images_dir.iterdir()):
    if p.name.startswith(".") or p.name.lower() in JUNK_FILES or p.is_dir():
      continue
    if p.is_symlink() and not p.exists():
      problems.append(
        f"{p}: broken symbolic link (to {os.readlink(p)}); restore the file it points to or remove the link"
      )
      continue
    if p.suffix.lower() in IMAGE_EXTS or is_dicom_file(p):
      stem = image_stem(p)
      if nfc(stem) in stems:  # also the same name in two Unicode forms: both would read one mask
        problems.append(f"{p}: duplicate image stem {stem!r} (also {stems[nfc(stem)].name}); keep one file per stem")
        continue
      stems[nfc(stem)] = p
      files.append(p)
    else:
      problems.append(
        f"{p}: unsupported image file type; supported: "
        f"{', '.join(IMAGE_EXTS)} (or DICOM files of any other name, such as a UID); convert or "
        f"remove it"
      )
  if problems:
    raise DatasetInputError(problems)
  if not files:
    raise DatasetInputError(
      f"{images_dir}: no images found (supported: {', '.join(IMAGE_EXTS)}; "
      f"subfolders are not searched); put the images directly in this folder"
    )
  return files


def load_pair(pair: Pair, spec: LabelSpec) -> tuple[np.ndarray, np.ndarray, bool]:
  """Decode one image file and its mask(s): uint8 images [F, H, W], classes [F, H, W] and
  whether the image is multi-frame. Raises ``DatasetInputError`` naming the file."""
  frames, multi = read_image(pair.image)
  nframes, h, w = frames.shape
  if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
    raise DatasetInputError(
      f"{pair.image}: image is {h}x{w} (HxW) pixels, below the minimum of "
      f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (training takes random crops and resizes them; "
      f"smaller images cannot be cropped or resized sensibly); export it at full "
      f"resolution or remove it and its mask"
    )
  cands = pair.mask_candidates()
  if len(cands) > 1:
    raise DatasetInputError(
      f"{pair.image}: ambiguous masks {[c.name for c in cands]} in {pair.mask_dir}; keep exactly one"
    )
  if cands:
    masks = read_mask(cands[0], spec)
    mask_desc = str(cands[0])
    if masks.shape[0] != nframes:
      raise DatasetInputError(
        f"{cands[0]}: mask has {masks.shape[0]} frame(s) but image {pair.image.name} "
        f"has {nframes}; a cine mask must have one frame per image frame"
      )
  elif multi:
    paths = [pair.frame_mask_path(f) for f in range(nframes)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
      raise DatasetInputError(
        f"{pair.image}: missing mask for {len(missing)} of {nframes} frames "
        f"({short_list(missing, 6)}) in {pair.mask_dir}; provide one multi-frame "
        f"{pair.stem}.dcm/.npy or per-frame {pair.stem}_<frame:04d>.png files "
        f"(frames counted from 0)"
      )
    parts = []
    for p in paths:
      m = read_mask(p, spec)
      if m.shape[0] != 1:
        raise DatasetInputError(f"{p}: per-frame mask must be a single 2-D image, got {m.shape[0]} frames")
      if m.shape[1:] != (h, w):
        raise _size_error(pair.image, (h, w), p, m.shape[1:])
      parts.append(m[0])
    masks = np.stack(parts)
    mask_desc = str(paths[0])
  else:
    found = _unusable_masks(pair)
    raise DatasetInputError(
      f"{pair.image}: missing mask; expected {pair.mask_dir / (pair.stem + '.png')} "
      f"(or {pair.stem}.dcm / {pair.stem}.npy)"  # a cine image (multi) takes the per-frame branch above
      + (f", and {found}" if found else "")
      + "; add it or remove the image"
    )
  if masks.shape[1:] != (h, w):
    raise _size_error(pair.image, (h, w), Path(mask_desc), masks.shape[1:])
  return frames, masks, multi


def _unusable_masks(pair: Pair) -> str:
  """What ``pair``'s mask folder holds under the image's name that cannot be its mask (a broken link, a
  JPEG, another format), for the missing-mask message; '' if nothing."""
  try:
    entries = sorted(os.scandir(pair.mask_dir), key=lambda e: e.name)
  except OSError:
    return ""
  out = []
  for e in entries:
    p = Path(e.name)
    if nfc(p.stem) != nfc(pair.stem):
      continue
    if e.is_symlink() and not os.path.exists(e.path):
      out.append(f"{e.name} is a broken link (to {os.readlink(e.path)})")
    elif p.suffix.lower() in (".jpg", ".jpeg"):
      out.append(f"{e.name} is a JPEG (lossy compression changes label values: save masks as PNG)")
    elif p.suffix.lower() not in pair.mask_exts:
      out.append(f"{e.name} is not a mask format")
  return "; ".join(out)


def _size_error(image: Path, ishape, mask: Path, mshape) -> DatasetInputError:
  return DatasetInputError(
    f"{mask}: image/mask size mismatch: image {image.name} is {ishape[0]}x{ishape[1]} "
    f"(HxW) but mask is {mshape[0]}x{mshape[1]}; re-export the mask at the image size "
    f"(nearest-neighbour resampling)"
  )


def pair_mask_files(pair: Pair, nframes: int, multi: bool) -> list[Path]:
  """The mask file(s) ``load_pair`` reads for ``pair`` (an image with ``nframes`` frames)."""
  cands = pair.mask_candidates()
  if cands:
    return cands
  return [pair.frame_mask_path(f) for f in range(nframes)] if multi else []


def example_ids(pair: Pair, nframes: int, multi: bool) -> list[str]:
  """The record ids of ``pair``'s frames: ``id_prefix``, or ``id_prefix#f`` for frame f of a cine file."""
  return [f"{pair.id_prefix}#{f}" for f in range(nframes)] if multi else [pair.id_prefix]


def validate_pairs(
  pairs: Iterable[Pair],
  spec: LabelSpec,
  used_masks: dict[Path, Path] | None = None,
  ids: dict[str, Path] | None = None,
) -> int:
  """Decode every pair once; raise one ``DatasetInputError`` listing all problems.
  Returns the number of examples (frames) that will be written. ``used_masks`` ({mask file: its image})
  and ``ids`` ({record id: its image}), when given, collect what the pairs read and write across calls: a
  mask file read for two images, or a record id given to two, is a problem naming both."""
  problems, count = [], 0
  for pair in pairs:
    try:
      frames, _, multi = load_pair(pair, spec)
    except DatasetInputError as e:
      problems.extend(e.problems)
      continue
    count += frames.shape[0]
    claims = (
      (
        used_masks,
        pair_mask_files(pair, frames.shape[0], multi),
        "{0}: read as the mask of both {1} and {2} (frame "
        "f of a cine file X takes the per-frame mask X_<f:04d>.png); rename one of the images",
      ),
      (
        ids,
        example_ids(pair, frames.shape[0], multi),
        "{3}: its record id {0!r} is also the id of {1} (frame f of a "
        "cine file X gets the id 'X#f'); rename one of them",
      ),
    )
    for owners, keys, problem in claims:
      for key in keys if owners is not None else ():
        other = owners.setdefault(key, pair.image)
        if other != pair.image:
          problems.append(problem.format(key, other.name, pair.image.name, pair.image))
  if problems:
    raise DatasetInputError(problems)
  return count


def generate_pairs(pairs: Iterable[Pair], spec: LabelSpec, site: str):
  """Yield ``(key, record)`` for every frame of every pair."""
  for pair in pairs:
    frames, masks, multi = load_pair(pair, spec)
    for f, ex_id in enumerate(example_ids(pair, frames.shape[0], multi)):
      yield ex_id, record(frames[f], masks[f], site, ex_id)


def manual_dir_from(dl_manager, name: str, instructions_hint: str) -> Path:
  """``dl_manager.manual_dir`` as a local Path, with TFDS' assertion turned into a clear
  ``DatasetInputError``."""
  try:
    return Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as e:
    raise DatasetInputError(
      f"{name}: manual_dir missing or empty ({str(e).splitlines()[0]}); {instructions_hint}"
    ) from None
