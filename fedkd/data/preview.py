"""A picture of the data for a person to look at: per site, frames and their mask overlays.

  python -m fedkd.data.preview --config=configs/quickstart.py --out=preview.png [--frames=4]

Rows are sites (training sites, then the unseen one); each frame appears twice, plain and with the
mask drawn over it (catheter red, guidewire green, vessel blue). Works for every data.source.
"""
from __future__ import annotations

import os

from absl import flags
import numpy as np

from fedkd import cli

_OUT = flags.DEFINE_string("out", "preview.png", "PNG file to write.")
_FRAMES = flags.DEFINE_integer("frames", 4, "Frames per site.")
_SCALE = flags.DEFINE_integer("scale", 0, "Pixel zoom (0: to make frames at least 128 px).")

COLOURS = {1: (235, 64, 52), 2: (60, 220, 60), 3: (70, 120, 255)}


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.65) -> np.ndarray:
  """Grey [H, W] image in [0, 1] + label map -> RGB uint8 with classes tinted."""
  g = np.clip(image, 0.0, 1.0)
  rgb = np.repeat(g[..., None], 3, axis=-1)
  for cls, col in COLOURS.items():
    sel = mask == cls
    rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(col) / 255.0
  return (rgb * 255).round().astype(np.uint8)


def grid(sets: dict[str, tuple[np.ndarray, np.ndarray]], frames: int, scale: int, unseen: str | None):
  from PIL import Image, ImageDraw
  rows, names = [], []
  for name, (images, masks) in sets.items():
    images, masks = np.asarray(images)[..., 0], np.asarray(masks)
    tiles = []
    for i in range(min(frames, len(images))):
      plain = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
      tiles += [np.repeat(plain[..., None], 3, -1), overlay(images[i], masks[i])]
    rows.append(np.concatenate(tiles, axis=1))
    names.append(name + (" (unseen)" if name == unseen else ""))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
  h = rows[0].shape[0]
  img = Image.fromarray(np.concatenate(rows, axis=0))
  img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  label_h = 14
  out = Image.new("RGB", (img.width, img.height + label_h * len(rows)), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for i, name in enumerate(names):
    y = i * (h * scale + label_h)
    draw.text((4, y + 1), name, fill=(0, 0, 0))
    out.paste(img.crop((0, i * h * scale, img.width, (i + 1) * h * scale)), (0, y + label_h))
  return out


def run(argv=None) -> None:
  cli.parse(argv)
  config = cli.CONFIG.value
  from fedkd.config import ConfigError, validate
  from fedkd.data.pipeline import DataError, make_client_data
  import jax
  try:
    validate(config, jax.device_count())
    data = make_client_data(config)
    with config.unlocked():
      config.eval.examples_per_site = max(_FRAMES.value, 1)
    sets = data.eval_sets()
  except (ConfigError, DataError) as e:
    cli.fail(str(e))
  scale = _SCALE.value or max(1, -(-128 // config.image_size))
  pic = grid(sets, _FRAMES.value, scale, data.unseen_name)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  pic.save(_OUT.value)
  print(f"wrote {os.path.abspath(_OUT.value)}: {len(sets)} sites x {_FRAMES.value} frames "
        f"({config.data.source}, {config.image_size}px); red catheter, green guidewire, blue vessel")


if __name__ == "__main__":
  run()
