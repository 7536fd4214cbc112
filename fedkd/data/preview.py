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
from fedkd.report import grid

_SCALE = flags.DEFINE_integer("scale", 0, "Pixel zoom (0: to make frames at least 128 px).")

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
      config.eval.examples_per_site = max(cli.FRAMES.value, 1)
    sets = data.eval_sets()
  except (ConfigError, DataError) as e:
    cli.fail(str(e))
  scale = _SCALE.value or max(1, -(-128 // config.image_size))
  pic = grid(sets, cli.FRAMES.value, scale, data.unseen_name)
  out = cli.OUT.value or "preview.png"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  pic.save(out)
  print(f"wrote {os.path.abspath(out)}: {len(sets)} sites x {cli.FRAMES.value} frames "
        f"({config.data.source}, {config.image_size}px); red catheter, green guidewire, blue vessel")


if __name__ == "__main__":
  run()
