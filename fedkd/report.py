"""Pictures a person looks at: mask overlays, error overlays, labelled grids."""

from __future__ import annotations

import numpy as np

COLOURS = {1: (235, 64, 52), 2: (60, 220, 60), 3: (70, 120, 255)}


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.65) -> np.ndarray:
  """Grey [H, W] image in [0, 1] + label map -> RGB uint8 with classes tinted."""
  g = np.clip(image, 0.0, 1.0)
  rgb = np.repeat(g[..., None], 3, axis=-1)
  for cls, col in COLOURS.items():
    sel = mask == cls
    rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(col) / 255.0
  return (rgb * 255).round().astype(np.uint8)


def grid_rows(rows: dict[str, np.ndarray], scale: int = 1):
  """Stacks labelled RGB rows (name -> [h, w, 3] uint8) into one PIL image, zoomed by ``scale``."""
  from PIL import Image, ImageDraw

  width = max(r.shape[1] for r in rows.values())
  label_h = 14
  pics = []
  for name, r in rows.items():
    r = np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)))
    pic = Image.fromarray(r).resize((r.shape[1] * scale, r.shape[0] * scale), Image.NEAREST)
    pics.append((name, pic))
  out = Image.new("RGB", (width * scale, sum(p.height + label_h for _, p in pics)), (255, 255, 255))
  draw, y = ImageDraw.Draw(out), 0
  for name, pic in pics:
    draw.text((4, y + 1), name, fill=(0, 0, 0))
    out.paste(pic, (0, y + label_h))
    y += pic.height + label_h
  return out


def grid(sets: dict[str, tuple[np.ndarray, np.ndarray]], frames: int, scale: int, unseen: str | None):
  rows = {}
  for name, (images, masks) in sets.items():
    images, masks = np.asarray(images)[..., 0], np.asarray(masks)
    tiles = []
    for i in range(min(frames, len(images))):
      plain = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
      tiles += [np.repeat(plain[..., None], 3, -1), overlay(images[i], masks[i])]
    rows[name + (" (unseen)" if name == unseen else "")] = np.concatenate(tiles, axis=1)
  return grid_rows(rows, scale)


def error_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """RGB uint8: TP (pred == target > 0) green, FP (pred > 0, target == 0) red, FN (target > 0,
  pred != target; a wrong class counts as a miss) blue, over the grey image."""
  g = np.clip(image, 0, 1)
  rgb = np.repeat(g[..., None], 3, -1) * 0.7
  rgb[(pred == target) & (target > 0)] = (0.1, 0.9, 0.1)
  rgb[(pred > 0) & (target == 0)] = (0.95, 0.15, 0.1)
  rgb[(target > 0) & (pred != target)] = (0.2, 0.4, 1.0)
  return (rgb * 255).round().astype(np.uint8)
