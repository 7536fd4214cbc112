"""Evaluate a trained run: every site and class, an overlay picture, robustness curves.

  python -m fedkd.eval --workdir=runs/quickstart [--round=150] [--out=runs/quickstart/eval]

Loads the latest (or ``--round``) checkpoint with the config stored in it, evaluates each site's
held-out set (the training sites training evaluated: all, or the first config.eval.max_sites; and the
unseen site; --examples images each, by default the run's config.eval.examples_per_site, as training) and
writes to ``--out`` (default ``<workdir>/eval``):
  eval.json / eval.csv   dice, iou, cldice, hd95, assd, betti0_error, tip_error per site and class
                         (distance metrics in mm with --spacing_mm, NaN-free means + NaN counts)
  predictions.png        per frame image | ground truth | prediction: right pixels in class colour,
                         false positives yellow, misses magenta (legend in the picture)
  robustness.json / .png Dice per class vs severity of noise, blur, contrast loss and downscaling

A FedBN or Ditto run's training sites are scored with their clients' personal models, as training scored them
(a client never trained, and the unseen site: the global model; eval.json's "model" names which per site);
--global_model scores every site with the global (server) model.

A run on prepared (TFDS) data reads its datasets from the config.data.tfds_data_dir stored with it (absolute;
a run from before fedkd stored it so may hold a relative one, read from the current folder);
--tfds_data_dir=DIR reads them from DIR instead.

--spacing_mm is the pixel size of the images as evaluated, i.e. after resizing to config.image_size: a
prepared dataset's 512 x 512 records at 0.3 mm evaluated at image_size 128 have 1.2 mm pixels.

The command line over ``fedkd.evaluate.evaluate_run`` (the evaluation training uses too).
"""

from __future__ import annotations

import os

from absl import flags
import numpy as np

from fedkd import cli

_ROUND = flags.DEFINE_integer("round", None, "Checkpoint round to evaluate (default: latest).")
_EXAMPLES = flags.DEFINE_integer(
  "examples", None, "Held-out images per site (default: the run's config.eval.examples_per_site, as training scored)."
)
_SPACING = flags.DEFINE_float(
  "spacing_mm", 1.0, "Pixel size in mm of the evaluated (config.image_size) images for distance metrics (1.0 = pixels)."
)

_GLOBAL_MODEL = flags.DEFINE_bool(
  "global_model",
  False,
  "Score every site with the global (server) model; by default a FedBN / Ditto run's training sites are scored "
  "with their clients' personal models, as training scored them.",
)

_TFDS_DATA_DIR = flags.DEFINE_string(
  "tfds_data_dir",
  None,
  "Folder of the prepared TFDS datasets of a run on prepared data (default: the config.data.tfds_data_dir it was "
  "trained with).",
)


def main(argv) -> None:
  del argv
  if not cli.WORKDIR.value:
    cli.fail("--workdir is required (a run directory written by fedkd.main)")
  if _EXAMPLES.value is not None and _EXAMPLES.value < 1:
    cli.fail(f"--examples={_EXAMPLES.value} must be >= 1 (held-out images per site)")
  if cli.FRAMES.value < 0:
    cli.fail(f"--frames={cli.FRAMES.value} must be >= 0")
  if not np.isfinite(_SPACING.value) or _SPACING.value <= 0:
    cli.fail(f"--spacing_mm={_SPACING.value} must be a positive pixel size in mm")
  if _ROUND.value is not None and _ROUND.value < 0:
    cli.fail(f"--round={_ROUND.value} must be a checkpoint round (>= 0)")
  if _TFDS_DATA_DIR.value is not None and not _TFDS_DATA_DIR.value.strip():
    cli.fail("--tfds_data_dir is empty; pass the folder of the prepared TFDS datasets")
  from fedkd.evaluate import evaluate_run

  evaluate_run(
    os.path.expanduser(cli.WORKDIR.value),
    round_=_ROUND.value,
    examples=_EXAMPLES.value,
    spacing_mm=_SPACING.value,
    frames=cli.FRAMES.value,
    out=os.path.expanduser(cli.OUT.value) if cli.OUT.value else None,
    tfds_data_dir=_TFDS_DATA_DIR.value,
    global_model=_GLOBAL_MODEL.value,
  )


def run(argv=None) -> None:
  cli.run_app(
    main,
    argv,
    uses_config=False,
    usage=__doc__,
    shared=("workdir", "out", "frames"),
    # an evaluation writes its files once everything is computed
    interrupted="evaluation interrupted; the run and an earlier evaluation's files are kept; re-run the same command",
  )


if __name__ == "__main__":
  run()
