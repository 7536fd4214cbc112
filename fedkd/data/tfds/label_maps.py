"""Mask label values: how stored mask values (gray levels, palette indices, colours) become classes.

Mask files and label values
---------------------------
* Default: values must already be class indices in {0, 1, 2, 3}. Palette (``P``) PNGs give their
  palette indices; bilevel (``1``) PNGs give 0/1.
* ``label_map`` {stored value: class}: e.g. ``{0: 0, 128: 1, 255: 2}`` for 0/128/255 masks or
  ``{0: 0, 255: 1}`` for binary catheter masks. Every value found must be a key.
* ``color_map`` {(r, g, b): class} for RGB colour masks, e.g.
  ``{(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3}`` (the ``RGB_COLOR_MAP``
  preset). Alpha is ignored. An RGB mask whose three channels are equal everywhere is treated
  as a gray mask when no colour map is given.

Which mask files are read (``.png``, ``.dcm``, ``.npy``) and how: ``fedkd.data.tfds.decode.read_mask``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from collections.abc import Mapping

import numpy as np

from fedkd.data.tfds.records import NUM_CLASSES, DatasetInputError, short_list

#: Colour preset for RGB masks: black background, red catheter, green guidewire, blue vessel.
RGB_COLOR_MAP: dict[tuple[int, int, int], int] = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3}
#: Gray preset for 3-level masks: 0 background, 128 catheter, 255 guidewire.
GRAY_0_128_255_MAP: dict[int, int] = {0: 0, 128: 1, 255: 2}


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How stored mask values become classes 0..3 (see the module docstring)."""

  label_map: tuple[tuple[int, int], ...] | None = None
  color_map: tuple[tuple[tuple[int, int, int], int], ...] | None = None

  @classmethod
  def create(cls, label_map: Mapping | None = None, color_map: Mapping | None = None) -> LabelSpec:
    lm = None
    if label_map is not None:
      items = []
      for k, v in dict(label_map).items():
        try:
          k, v = int(k), int(v)
        except (TypeError, ValueError):
          raise DatasetInputError(f"label_map entry {k!r}: {v!r} is not integer value: class") from None
        items.append((k, _check_class(v, f"label_map[{k}]")))
      lm = tuple(sorted(items))
    cm = None
    if color_map is not None:
      items = []
      for k, v in dict(color_map).items():
        rgb = _parse_rgb(k)
        items.append((rgb, _check_class(int(v), f"color_map[{k}]")))
      cm = tuple(sorted(items))
    return cls(label_map=lm, color_map=cm)

  def describe(self) -> str:
    parts = []
    if self.label_map is not None:
      parts.append("label_map " + json.dumps({str(k): v for k, v in self.label_map}))
    if self.color_map is not None:
      parts.append("color_map " + json.dumps({",".join(map(str, k)): v for k, v in self.color_map}))
    return "; ".join(parts) if parts else "mask values are class indices 0..3"

  def allowed_values(self) -> list[int]:
    if self.label_map is not None:
      return [k for k, _ in self.label_map]
    return list(range(NUM_CLASSES))

  def apply(self, raw: np.ndarray, path: Path) -> np.ndarray:
    """Map raw mask values ``[..., H, W]`` or colours ``[..., H, W, 3]`` to uint8 classes."""
    if raw.ndim >= 3 and raw.shape[-1] == 3 and raw.dtype != np.bool_:
      if self.color_map is not None:
        return self._apply_colors(raw, path)
      if np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
        raw = raw[..., 0]
      else:
        raise DatasetInputError(
          f"{path}: RGB colour mask but no color_map is configured; pass color_map, "
          f"e.g. {{(0,0,0): 0, (255,0,0): 1, (0,255,0): 2, (0,0,255): 3}} (CLI "
          f"--color_map='0,0,0:0;255,0,0:1;0,255,0:2'), or save masks as gray "
          f"class-index PNGs"
        )
    elif self.color_map is not None and self.label_map is None:
      raise DatasetInputError(
        f"{path}: a color_map is configured but this mask is not an RGB image "
        f"(shape {raw.shape}); pass label_map for gray masks instead"
      )
    values, inverse = np.unique(raw.astype(np.int64), return_inverse=True)
    table = dict(self.label_map) if self.label_map is not None else {c: c for c in range(NUM_CLASSES)}
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:
      hint = (
        "add them to label_map"
        if self.label_map is not None
        else "pass label_map (value: class), e.g. {0: 0, 128: 1, 255: 2} (CLI --label_map=0:0,128:1,255:2)"
      )
      raise DatasetInputError(
        f"{path}: unknown label value(s) {short_list(unknown)} (found "
        f"{short_list([int(v) for v in values])}; allowed {self.allowed_values()}); "
        f"{hint}"
      )
    lut = np.array([table[int(v)] for v in values], dtype=np.uint8)
    return lut[inverse.reshape(raw.shape)]

  def _apply_colors(self, raw: np.ndarray, path: Path) -> np.ndarray:
    rgb = raw.astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, inverse = np.unique(code, return_inverse=True)
    table = {(r << 16) | (g << 8) | b: c for (r, g, b), c in self.color_map}
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:

      def fmt(v):
        return f"({v >> 16},{(v >> 8) & 255},{v & 255})"

      raise DatasetInputError(
        f"{path}: unknown mask colour(s) {short_list([fmt(v) for v in unknown])} "
        f"(allowed {[fmt(v) for v in sorted(table)]}); add them to color_map"
      )
    lut = np.array([table[int(v)] for v in values], dtype=np.uint8)
    return lut[inverse.reshape(code.shape)]


def _check_class(v: int, what: str) -> int:
  if not 0 <= v < NUM_CLASSES:
    raise DatasetInputError(f"{what} = {v} is not a class; classes are 0 background, 1 catheter, 2 guidewire, 3 vessel")
  return v


def _parse_rgb(key) -> tuple[int, int, int]:
  if isinstance(key, str):
    key = [p for p in re.split(r"[,\s]+", key.strip("()[] ")) if p]
  try:
    rgb = tuple(int(c) for c in key)
  except (TypeError, ValueError):
    rgb = ()
  if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
    raise DatasetInputError(f"color_map key {key!r} is not an (r, g, b) triple of 0..255")
  return rgb  # type: ignore[return-value]


def parse_label_map(text: str) -> dict[int, int]:
  """CLI form ``"0:0,128:1,255:2"`` -> ``{0: 0, 128: 1, 255: 2}``."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    if ":" not in part:
      raise DatasetInputError(f"--label_map entry {part!r} is not VALUE:CLASS (e.g. --label_map=0:0,128:1,255:2)")
    k, v = part.split(":", 1)
    try:
      out[int(k)] = int(v)
    except ValueError:
      raise DatasetInputError(
        f"--label_map entry {part!r} is not VALUE:CLASS with integers (e.g. 0:0,128:1,255:2)"
      ) from None
  if not out:
    raise DatasetInputError("--label_map is empty (e.g. --label_map=0:0,128:1,255:2)")
  return out


def parse_color_map(text: str) -> dict[tuple[int, int, int], int]:
  """CLI form ``"0,0,0:0;255,0,0:1"`` -> ``{(0, 0, 0): 0, (255, 0, 0): 1}``."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    if ":" not in part:
      raise DatasetInputError(
        f"--color_map entry {part!r} is not R,G,B:CLASS (e.g. --color_map='0,0,0:0;255,0,0:1;0,255,0:2')"
      )
    k, v = part.rsplit(":", 1)
    try:
      out[_parse_rgb(k)] = int(v)
    except ValueError:
      raise DatasetInputError(f"--color_map entry {part!r}: class must be an integer") from None
  if not out:
    raise DatasetInputError("--color_map is empty (e.g. '0,0,0:0;255,0,0:1;0,255,0:2')")
  return out
