"""A picture of the data for a person to look at: per site, frames and their mask overlays.

  python -m fedkd.data.preview --config=configs/quickstart.py [--out=runs/preview.png] [--frames=4]

Rows are sites (training sites, then the unseen one); the frames are each site's held-out frames that
training scores (the test split, without data.augment's crops, flips and intensity jitter); each appears
twice, plain and with the mask drawn over it (catheter red, guidewire green, vessel blue: fedkd.palette), under a legend of the
classes present. Works for every data.source.
The picture goes to --out (default runs/preview.png; .png, .jpg or .jpeg).
"""

from __future__ import annotations

import os

from absl import flags

from fedkd import cli

MAX_FRAME_PX = 2048  # one zoomed frame's side: larger pictures would take GiBs to draw
JPEG_MAX_SIDE = 65500  # the largest side a JPEG file holds (libjpeg, as PIL writes it)
ROW_LABEL_PX = 14  # the name strip above every site's row (fedkd.report.grid_rows)
HEADER_PX = 2 * ROW_LABEL_PX  # the title line and the legend line above the rows (fedkd.report.grid)
# The largest picture PIL opens (2 x PIL.Image.MAX_IMAGE_PIXELS by default; Image.open refuses more as a
# "decompression bomb"): ~540 MB of RGB to draw, and more frames than any screen shows.
MAX_PICTURE_PX = 178_956_970
_SCALE = flags.DEFINE_integer("scale", 0, "Pixel zoom (0: to make frames at least 128 px).")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DEFAULT_OUT = os.path.join("runs", "preview.png")


def _check_out_folder(out: str) -> None:
  """Refuse an --out below a file before any work, naming both (prepare would name only the folder)."""
  folder = os.path.dirname(os.path.abspath(out))
  while folder and not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if folder and not os.path.isdir(folder):
    cli.fail(f"--out={out}: {folder} is a file, not a folder; pass a path inside a folder, e.g. --out=runs/preview.png")


def main(argv) -> None:
  del argv
  import jax

  from fedkd.config import validate
  from fedkd.data.pipeline import evaluated_sites, make_client_data
  import numpy as np

  from fedkd import palette
  from fedkd.report import grid
  from fedkd.workdir import prepare

  config = cli.CONFIG.value
  out = os.path.expanduser(cli.OUT.value or DEFAULT_OUT)
  if os.path.isdir(out):
    cli.fail(f"--out={out} is a folder; name the image file to write, e.g. --out={os.path.join(out, 'preview.png')}")
  if not out.lower().endswith(IMAGE_EXTS):
    cli.fail(f"--out={out} must be an image file path ending in {', '.join(IMAGE_EXTS)}, e.g. --out=runs/preview.png")
  _check_out_folder(out)
  if cli.FRAMES.value < 1:
    cli.fail(f"--frames={cli.FRAMES.value} must be >= 1")
  if _SCALE.value < 0:
    cli.fail(f"--scale={_SCALE.value} must be >= 0 (0 = automatic)")
  if config.get("task") == "fedefm":
    cli.fail(
      "fedkd.data.preview draws the sites of a FedAvg config; a FedEFM config's silos are not drawn: "
      "pass a FedAvg config, e.g. --config=configs/quickstart.py"
    )
  validate(config, jax.device_count())
  problem = scale_problem(_SCALE.value, config.image_size)
  if problem:
    cli.fail(problem)
  scale = _SCALE.value or max(1, -(-128 // config.image_size))
  sites = evaluated_sites(config)
  n_sites = len(sites)
  frame_px = config.image_size * scale
  rows = n_sites + 1 if config.data.source == "synthetic" else 1
  problem = picture_problem(
    out, 2 * cli.FRAMES.value * frame_px, HEADER_PX + rows * (frame_px + ROW_LABEL_PX), frame_px
  )
  if problem:
    cli.fail(problem)
  data = make_client_data(config, training=False)
  with config.unlocked():
    config.eval.examples_per_site = cli.FRAMES.value
  sets = data.eval_sets(sites)
  if getattr(data, "untested", None):  # prepared sites without a test split: nothing held out to draw
    print(f"note: training site(s) {data.untested} have no test split in the dataset: not drawn")
  if config.data.source == "synthetic" and n_sites < config.num_clients:
    print(
      f"note: the first {n_sites} of the {config.num_clients} training sites and the unseen one, as training "
      f"evaluates them (config.eval.max_sites={config.eval.max_sites})"
    )
  pic = grid(sets, cli.FRAMES.value, scale, data.unseen_name)
  problem = picture_problem(out, pic.width, pic.height, frame_px)
  if problem:
    cli.fail(problem)
  shown = set()
  for _, masks in sets.values():
    shown.update(np.unique(np.asarray(masks)[: cli.FRAMES.value]).tolist())
  prepare(os.path.dirname(os.path.abspath(out)), flag="--out")
  pic.save(out)
  print(
    f"wrote {os.path.abspath(out)}: {len(sets)} sites x {_frames_shown(sets, cli.FRAMES.value)} "
    f"({config.data.source}, {config.image_size}px); labels drawn: {palette.caption(shown)} (legend in the picture)"
  )


def scale_problem(scale: int, image_size: int) -> str | None:
  """Why ``--scale`` cannot draw ``image_size`` frames (a zoomed frame above ``MAX_FRAME_PX``), else None;
  0 (automatic) and 1 draw frames at their own size, which is never refused."""
  if scale > 1 and scale * image_size > MAX_FRAME_PX:
    return (
      f"--scale={scale} draws each {image_size}px frame at {scale * image_size}px, above {MAX_FRAME_PX}px; "
      f"pass --scale <= {max(1, MAX_FRAME_PX // image_size)} (0 = automatic)"
    )
  return None


def picture_problem(out: str, width: int, height: int, frame_px: int) -> str | None:
  """Why a ``width`` x ``height`` px picture cannot be written to ``out`` (more than ``MAX_PICTURE_PX`` pixels,
  or a JPEG side above ``JPEG_MAX_SIDE``), else None. ``frame_px``: one zoomed frame's side, for the largest
  --frames that fits."""
  if width * height > MAX_PICTURE_PX:
    frames = MAX_PICTURE_PX // (height * 2 * frame_px)
    fix = f"pass --frames <= {frames} or a smaller --scale" if frames >= 1 else "set --config.eval.max_sites lower"
    return (
      f"--out={out}: the picture would be {width} x {height} px ({width * height:,} px), more than an image "
      f"reader opens ({MAX_PICTURE_PX:,} px: PIL refuses it as a decompression bomb); {fix}"
    )
  if not out.lower().endswith((".jpg", ".jpeg")) or max(width, height) <= JPEG_MAX_SIDE:
    return None
  if width > JPEG_MAX_SIDE:
    fix = f"pass --frames <= {max(1, JPEG_MAX_SIDE // (2 * frame_px))}, a smaller --scale, or a .png --out"
  else:
    fix = "set --config.eval.max_sites to show fewer sites, or pass a .png --out"
  return (
    f"--out={out}: the picture would be {width} x {height} px and a JPEG holds at most {JPEG_MAX_SIDE} px a side; {fix}"
  )


def _frames_shown(sets, frames: int) -> str:
  """``"N frames"``, naming the sites that have fewer (a prepared dataset's test split may hold fewer
  images than --frames)."""
  counts = {name: min(len(images), frames) for name, (images, _) in sets.items()}
  short = {name: n for name, n in counts.items() if n < frames}
  if not short:
    return f"{frames} frames"
  few = ", ".join(f"{name} {n}" for name, n in short.items())
  return f"up to {max(counts.values())} frames (--frames={frames}; fewer test images at: {few})"


def run(argv=None) -> None:
  cli.run_app(
    main,
    argv,
    usage=__doc__,
    shared=("out", "frames"),
    interrupted="interrupted before the preview was complete; re-run the command",
  )


if __name__ == "__main__":
  run()
