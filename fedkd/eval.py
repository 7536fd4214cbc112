"""Evaluate a trained run: every site and class, an overlay picture, robustness curves.

  python -m fedkd.eval --workdir=runs/quickstart [--round=150] [--out=runs/quickstart/eval]

Loads the latest (or ``--round``) checkpoint with the config stored in it, evaluates each site's
held-out set (training sites and the unseen site) and writes to ``--out`` (default ``<workdir>/eval``):
  eval.json / eval.csv   dice, iou, cldice, hd95, assd, betti0_error, tip_error per site and class
                         (distance metrics in mm with --spacing_mm, NaN-free means + NaN counts)
  predictions.png        frames with true positives green, false positives red, false negatives blue
  robustness.png         Dice per class vs severity of noise, blur, contrast loss and downscaling
"""

from __future__ import annotations

from fedkd.errors import UserError

import csv
import json
import os
import sys

from absl import flags
import numpy as np

from fedkd import cli

_ROUND = flags.DEFINE_integer("round", None, "Checkpoint round to evaluate (default: latest).")
_EXAMPLES = flags.DEFINE_integer("examples", 32, "Held-out images per site.")
_SPACING = flags.DEFINE_float("spacing_mm", 1.0, "Pixel size in mm for distance metrics (1.0 = pixels).")

SEVERITIES = {
  "noise": [0.0, 0.05, 0.1, 0.2, 0.3],  # Gaussian noise sigma (images in [0, 1])
  "blur": [0.0, 0.5, 1.0, 1.5, 2.0],  # Gaussian blur sigma, px
  "contrast_loss": [0.0, 0.25, 0.5, 0.75, 0.9],  # fraction of contrast removed around the mean
  "downscale": [1.0, 1.5, 2.0, 3.0, 4.0],  # downsample by this factor, upsample back
}


class EvalError(UserError, ValueError):
  pass


def perturb(images: np.ndarray, kind: str, severity: float, seed: int = 0) -> np.ndarray:
  """images [N, H, W, 1] in [0, 1] -> perturbed copy (severity 0 / factor 1 = unchanged)."""
  from scipy import ndimage

  x = np.asarray(images, np.float32)
  if kind == "noise":
    y = x if severity == 0 else x + np.random.default_rng(seed).normal(0.0, severity, x.shape).astype(np.float32)
  elif kind == "blur":
    y = x if severity == 0 else ndimage.gaussian_filter(x, sigma=(0, severity, severity, 0))
  elif kind == "contrast_loss":
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    y = x if severity == 0 else m + (x - m) * (1.0 - severity)
  elif kind == "downscale":
    if severity == 1.0:
      y = x
    else:
      h = x.shape[1]
      small = ndimage.zoom(x, (1, 1 / severity, 1 / severity, 1), order=1)
      y = ndimage.zoom(small, (1, h / small.shape[1], h / small.shape[2], 1), order=1)[:, :h, :h]
  else:
    raise ValueError(f"unknown perturbation {kind!r}")
  return np.clip(y, 0.0, 1.0).astype(np.float32)


def load_run(workdir: str, round_: int | None):
  """(config, params, round) from the run's checkpoint, using the config stored with it."""
  import jax
  import ml_collections
  from fedkd.checkpoint import CheckpointError, Checkpointer
  from fedkd.fl import engine
  from fedkd.models import init_params

  from fedkd.workdir import prepare

  path = prepare(workdir, create=False)
  ckdir = path / "checkpoints"
  if not ckdir.is_dir():
    raise EvalError(
      f"{workdir} has no checkpoints/ folder; train first with python -m fedkd.main --config=... --workdir={workdir}"
    )
  ckpt = Checkpointer(ckdir)

  def load(r):
    config = ml_collections.ConfigDict(ckpt.saved_config(r))
    try:
      apply, params = init_params(config.model, config.seed)
      server_tx = engine.make_optimizer(config.server_optimizer)
      like = engine.init_server_state(params, server_tx, jax.random.key(config.seed))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise CheckpointError(
        f"the config stored with round {r} is not a usable fedavg config ({type(e).__name__}: {e})"
      ) from None
    state, _ = ckpt.restore(r, like)
    return config, apply, state["params"]

  try:
    rounds = ckpt.all_rounds()
    if not rounds:
      raise EvalError(f"{ckdir} holds no finished checkpoint; train (or resume) with fedkd.main first")
    if round_ is None:
      r, (config, apply, params) = ckpt.restore_latest(load, lambda m: print(m, file=sys.stderr))
    else:
      if round_ not in rounds:
        raise EvalError(f"no checkpoint for round {round_} in {ckdir}; available rounds: {rounds}")
      r = round_
      config, apply, params = load(r)
  except CheckpointError as e:
    raise EvalError(str(e)) from None
  finally:
    ckpt.close()
  finite = all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(params))
  if not finite:
    raise EvalError(
      f"the checkpoint for round {r} in {ckdir} holds NaN/Inf parameters (that run diverged); "
      "evaluate an earlier --round or retrain with a lower learning rate"
    )
  return config, apply, params, r


def evaluate(config, apply, params, sets, spacing_mm: float):
  from fedkd import metrics
  from fedkd.models import make_predictor

  predict = make_predictor(apply, config.eval.batch_size)

  def run(images):
    return np.asarray(predict(params, images))

  from fedkd.data.labels import CLASS_NAMES

  classes = list(enumerate(CLASS_NAMES[: config.model.num_classes]))[1:]
  results, preds = {}, {}
  for site, (images, masks) in sets.items():
    images, masks = np.asarray(images), np.asarray(masks)
    pred = run(images)
    preds[site] = pred
    res = {}
    for cid, cname in classes:
      m = {
        "dice": np.asarray(metrics.dice(pred, masks, cid)),
        "iou": np.asarray(metrics.iou(pred, masks, cid)),
        "cldice": np.asarray(metrics.cldice(pred, masks, cid)),
        "hd95": metrics.hd95(pred, masks, cid, spacing_mm),
        "assd": metrics.assd(pred, masks, cid, spacing_mm),
        "betti0_error": metrics.betti0_error(pred, masks, cid),
        "tip_error": metrics.tip_error(pred, masks, cid, spacing_mm),
      }
      entry = {}
      for k, v in m.items():
        v = np.asarray(v, np.float64)
        entry[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        if np.isnan(v).any():
          entry[f"{k}_nan_images"] = int(np.isnan(v).sum())
      res[cname] = entry
    results[site] = res
  return results, preds, run, classes


def robustness(sets, run, classes):
  from fedkd import metrics

  out = {}
  for kind, levels in SEVERITIES.items():
    curve = {c: [] for _, c in classes}
    for sev in levels:
      scores = {c: [] for _, c in classes}
      for images, masks in sets.values():
        pred = run(perturb(np.asarray(images), kind, sev))
        for cid, cname in classes:
          scores[cname].append(np.asarray(metrics.dice(pred, np.asarray(masks), cid)))
      for cname in scores:
        curve[cname].append(float(np.mean(np.concatenate(scores[cname]))))
    out[kind] = {"severity": levels, "dice": curve}
  return out


def plot_robustness(rob: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(rob), figsize=(4 * len(rob), 3.4))
  for ax, (kind, d) in zip(axes, rob.items()):
    for cname, ys in d["dice"].items():
      ax.plot(d["severity"], ys, marker="o", label=cname)
    ax.set_title(kind.replace("_", " "))
    ax.set_xlabel("factor" if kind == "downscale" else "severity")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("Dice (held-out, all sites)")
  axes[-1].legend(loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def prediction_grid(sets, preds, frames: int, path: str, unseen: str | None) -> None:
  from fedkd.report import error_overlay, grid_rows

  rows = {}
  for site, (images, masks) in sets.items():
    images, masks = np.asarray(images)[..., 0], np.asarray(masks)
    tiles = []
    for i in range(min(frames, len(images))):
      plain = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
      tiles += [np.repeat(plain[..., None], 3, -1), error_overlay(images[i], preds[site][i], masks[i])]
    rows[site + (" (unseen)" if site == unseen else "")] = np.concatenate(tiles, axis=1)
  size = next(iter(rows.values())).shape[0]
  grid_rows(rows, scale=max(1, -(-128 // size))).save(path)


def write_tables(results: dict, out: str, round_: int) -> None:
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump({"round": round_, "sites": results}, f, indent=2)
  with open(os.path.join(out, "eval.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["site", "class", "metric", "value"])
    for site, res in results.items():
      for cname, entry in res.items():
        for k, v in entry.items():
          w.writerow([site, cname, k, v])


def format_results(results: dict, unseen: str | None) -> str:
  keys = ["dice", "iou", "cldice", "hd95", "assd", "betti0_error", "tip_error"]
  lines = [f"{'site':<34}{'class':<11}" + "".join(f"{k:>13}" for k in keys)]
  for site, res in results.items():
    for cname, entry in res.items():
      label = site + (" (unseen)" if site == unseen else "")
      lines.append(f"{label:<34}{cname:<11}" + "".join(f"{entry[k]:>13.4f}" for k in keys))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  from fedkd.workdir import prepare

  if not cli.WORKDIR.value:
    cli.fail("--workdir is required (a run directory written by fedkd.main)")
  if _EXAMPLES.value < 1:
    cli.fail(f"--examples={_EXAMPLES.value} must be >= 1 (held-out images per site)")
  if cli.FRAMES.value < 0:
    cli.fail(f"--frames={cli.FRAMES.value} must be >= 0")
  if not np.isfinite(_SPACING.value) or _SPACING.value <= 0:
    cli.fail(f"--spacing_mm={_SPACING.value} must be a positive pixel size in mm")
  if _ROUND.value is not None and _ROUND.value < 0:
    cli.fail(f"--round={_ROUND.value} must be a checkpoint round (>= 0)")
  workdir = os.path.expanduser(cli.WORKDIR.value)
  from fedkd.data.pipeline import make_client_data

  config, apply, params, r = load_run(workdir, _ROUND.value)
  with config.unlocked():
    config.eval.examples_per_site = _EXAMPLES.value
  data = make_client_data(config)
  sets = data.eval_sets()
  out = prepare(os.path.expanduser(cli.OUT.value) if cli.OUT.value else os.path.join(workdir, "eval"))
  out = os.fspath(out)
  print(f"evaluating {workdir} at round {r}: {len(sets)} sites x {_EXAMPLES.value} held-out images", flush=True)
  results, preds, run, classes = evaluate(config, apply, params, sets, _SPACING.value)
  write_tables(results, out, r)
  if cli.FRAMES.value:
    prediction_grid(sets, preds, cli.FRAMES.value, os.path.join(out, "predictions.png"), data.unseen_name)
  print("robustness curves (noise, blur, contrast loss, downscaling) ...", flush=True)
  rob = robustness(sets, run, classes)
  with open(os.path.join(out, "robustness.json"), "w") as f:
    json.dump(rob, f, indent=2)
  plot_robustness(rob, os.path.join(out, "robustness.png"))
  unit = "mm" if _SPACING.value != 1.0 else "px"
  print(format_results(results, data.unseen_name))
  print(f"(hd95, assd, tip_error in {unit}; means over images where defined)")
  print(
    f"wrote {out}: eval.json, eval.csv, predictions.png (green TP, red FP, blue FN), robustness.json, robustness.png",
    flush=True,
  )


def run(argv=None) -> None:
  cli.run_app(main, argv, uses_config=False, usage=__doc__)


if __name__ == "__main__":
  run()
