"""The record format every fedkd TFDS builder writes, and the error its input checks raise.

Record format (every builder)
-----------------------------
``image``  uint8 [H, W, 1]  grayscale (conversion rules: ``fedkd.data.tfds.decode``)
``mask``   uint8 [H, W]     0 background, 1 catheter, 2 guidewire, 3 vessel (``fedkd.data.labels``)
``site``   string           hospital / site name
``id``     string           unique key: source file (+ ``#<frame>`` for cine frames)

Images and masks are stored as zlib-compressed raw tensors (``tfds.features.Tensor`` with
``Encoding.ZLIB``), which TFDS encodes and decodes with numpy only: TensorFlow is never needed.

The other pieces of the builders: ``label_maps`` (stored mask values -> classes), ``decode`` (image
and mask files -> uint8 arrays, incl. DICOM), ``folders`` (image/mask folders -> checked records).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable

import numpy as np

from fedkd.data.labels import CLASS_NAMES, NUM_CLASSES  # noqa: F401 - re-exported by fedkd.data.tfds
from fedkd.errors import UserError

_MAX_LISTED_PROBLEMS = 5
_NEWLINES = re.compile(r"\s*[\r\n]+\s*")


class DatasetInputError(UserError, ValueError):
  """Bad input files or arguments for a fedkd TFDS builder.

  ``problems`` holds one line per problem (file, what is wrong, how to fix it); ``str(e)`` is a
  single line naming the first few.
  """

  def __init__(self, problems: str | Iterable[str]):
    # one line each: a library's multi-line exception text quoted in a problem would split the error line
    self.problems = [_NEWLINES.sub(" ", p) for p in ([problems] if isinstance(problems, str) else list(problems))]
    if not self.problems:
      self.problems = ["invalid dataset input"]
    if len(self.problems) == 1:
      msg = self.problems[0]
    else:
      shown = self.problems[:_MAX_LISTED_PROBLEMS]
      msg = f"{len(self.problems)} problems in the input: " + "; ".join(shown)
      if len(self.problems) > len(shown):
        msg += f"; ... and {len(self.problems) - len(shown)} more"
    super().__init__(msg)


def features():
  """The shared ``tfds.features.FeaturesDict`` (numpy-only encoding, variable image size)."""
  import tensorflow_datasets as tfds

  zlib = tfds.features.Encoding.ZLIB
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Tensor(shape=(None, None, 1), dtype=np.uint8, encoding=zlib),
      "mask": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib),
      "site": tfds.features.Text(),
      "id": tfds.features.Text(),
    }
  )


def record(image: np.ndarray, mask: np.ndarray, site: str, example_id: str) -> dict:
  """One example dict in the record format (image [H, W] or [H, W, 1], mask [H, W])."""
  image = np.asarray(image, dtype=np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  return {"image": image, "mask": np.asarray(mask, dtype=np.uint8), "site": site, "id": example_id}


#: Key of ``metadata.json`` (the prepared folder's TFDS metadata) that holds, per split, the smallest image:
#: ``{"train": {"min_side": 40, "height": 40, "width": 64, "id": "x"}, ...}``. Readers check image sizes against
#: it without decoding every record (``fedkd.data.tfds.api.smallest_image``).
SMALLEST_IMAGE_KEY = "smallest_image"
#: Key of ``metadata.json`` that holds, per split, the highest class in any mask and the first record holding it:
#: ``{"train": {"label": 3, "id": "x"}, ...}``. Training checks it against ``model.num_classes`` when it opens the
#: data, not when a batch first draws that record (``fedkd.data.tfds.api.largest_label``).
LARGEST_LABEL_KEY = "largest_label"
#: Key of ``metadata.json`` that holds, for a dataset built from a folder (``xray_folder``, ``cathaction``), the
#: ``source_fingerprint`` of that folder: a later build of the same config from another folder (two hospitals'
#: exports with the same folder name make the same site name) is refused instead of reusing this one.
SOURCE_KEY = "source_folder_sha1"
#: Key of ``metadata.json`` that holds, per split, a digest of its records that does not depend on their order:
#: ``{"train": "<64 hex digits>", ...}``, the sum modulo 2**256 of every record's :func:`record_digest`. A run saves
#: its training sites' digests with its checkpoint, so a resume on a site rebuilt from other images of the same
#: number is refused (``fedkd.data.tfds.api.content_digest``).
CONTENT_KEY = "content_sha256"


def record_digest(ex: dict) -> int:
  """SHA-256 of one record (its id, site, and image and mask with their shapes and dtypes) as an integer."""
  h = hashlib.sha256()
  for key in ("id", "site"):
    text = ex[key].decode() if isinstance(ex[key], bytes) else str(ex[key])
    h.update(text.encode("utf-8", "surrogatepass") + b"\0")
  for key in ("image", "mask"):  # as stored: image [H, W, C], mask [H, W] (a generator may yield [H, W] images)
    a = np.asarray(ex[key])
    a = np.ascontiguousarray(a.reshape(a.shape[:2] + ((-1,) if key == "image" else ())))
    h.update(f"{key}:{a.dtype.str}:{a.shape}".encode() + b"\0")
    h.update(a.tobytes())
  return int.from_bytes(h.digest(), "big")


def is_content_digest(value) -> bool:
  """Whether ``value`` is a split's content digest as :func:`track_split_stats` writes it (64 hex digits)."""
  return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def source_fingerprint(folder) -> str:
  """SHA-1 of ``folder``'s resolved absolute path: tells two source folders apart without storing the path
  (prepared datasets are exchanged between hospitals)."""
  return hashlib.sha1(os.fsencode(os.path.realpath(folder))).hexdigest()


def metadata():
  """The ``tfds.core.MetadataDict`` every builder declares in its ``DatasetInfo`` (see ``SMALLEST_IMAGE_KEY`` and
  ``LARGEST_LABEL_KEY``)."""
  import tensorflow_datasets as tfds

  return tfds.core.MetadataDict()


def track_split_stats(info, split: str, examples):
  """Yield ``examples`` (``(key, record)`` pairs) unchanged, keeping the smallest image (by its shorter side),
  the highest mask class and the content digest (:data:`CONTENT_KEY`) of split ``split`` in ``info.metadata``;
  TFDS writes them as ``metadata.json`` once every split is written."""
  sizes = info.metadata.setdefault(SMALLEST_IMAGE_KEY, {})
  labels = info.metadata.setdefault(LARGEST_LABEL_KEY, {})
  contents = info.metadata.setdefault(CONTENT_KEY, {})
  total, count = 0, 0
  for key, ex in examples:
    total, count = total + record_digest(ex), count + 1
    h, w = (int(n) for n in ex["image"].shape[:2])
    now = sizes.get(split)
    if now is None or min(h, w) < now["min_side"]:
      sizes[split] = {"min_side": min(h, w), "height": h, "width": w, "id": str(ex["id"])}
    top = int(np.max(ex["mask"])) if np.size(ex["mask"]) else 0
    if split not in labels or top > labels[split]["label"]:
      labels[split] = {"label": top, "id": str(ex["id"])}
    yield key, ex
  if count:  # the order-free digest of the split: its records' digests summed modulo 2**256
    contents[split] = f"{total % 2**256:064x}"


MAX_CONFIG_NAME_BYTES = 200  # a folder name (most file systems: 255 bytes), with room for TFDS' incomplete.* prefix


def config_safe_name(name: str) -> str:
  """A TFDS-valid config name (letters, digits, ``_ - . +``) derived from ``name``."""
  safe = re.sub(r"[^\w\-.+]", "_", str(name).strip())
  safe = safe.strip(".")
  if len(safe.encode()) > MAX_CONFIG_NAME_BYTES:  # it names a folder: most file systems stop at 255 bytes
    raise DatasetInputError(
      f"the config name {safe[:40]!r}... is {len(safe.encode())} bytes long, more than a folder name of the dataset "
      f"may be ({MAX_CONFIG_NAME_BYTES}); give a shorter name (CLI: --site=NAME or --config=NAME)"
    )
  if not safe:
    raise DatasetInputError(
      f"cannot derive a config name from {name!r}; give a name of letters or digits (CLI: --site=NAME or "
      "--config=NAME; Python: site= or config=)"
    )
  return safe


def short_list(values: list, limit: int = 12) -> str:
  """``[a, b, ...]`` for messages; past ``limit`` items: the first ``limit`` and the count."""
  if len(values) <= limit:
    return "[" + ", ".join(map(str, values)) + "]"
  return "[" + ", ".join(map(str, values[:limit])) + f", ... ({len(values)} in all)]"
