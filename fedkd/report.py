"""Pictures and result tables: every picture and table fedkd writes for a person comes from here.

Pictures
  ``overlay`` / ``grid``: masks tinted over frames (the data preview); ``error_overlay`` /
  ``grid(..., preds=)``: predictions and their errors (``fedkd.eval``'s predictions.png); every grid
  carries a legend, and every class has one colour in every picture (``fedkd.palette``); ``robustness_plot``:
  Dice vs perturbation severity; ``curves_plot`` / ``errorbar_plot``: a sweep's scores vs round and vs
  a swept key.
Tables
  ``site_table``: held-out Dice / IoU per site (end of training); ``eval_table`` / ``write_eval_tables``:
  every metric per site and class (``fedkd.eval``); ``mean_std_tables``: one row per group of runs,
  mean ± std over seeds (``launch.sweep`` and the FedEFM experiment); ``write_csv``: plain rows.

Paired statistics
  ``paired_difference``: method A minus method B over the same seeds (shared data, init and test per
  seed): mean, sample std, a two-sided Student-t confidence interval and the paired t-test's p-value;
  ``holm``: Holm-Bonferroni adjusted p-values for a family of contrasts; ``format_contrast``: one cell.

Mean ± std convention, the same in every table and plot over seeds: the mean and the **sample**
standard deviation (``ddof=1``, as ``numpy.std(ddof=1)`` / ``statistics.stdev``) over seeds. With a
single seed the std is undefined: ``nan`` in CSV files, ``n/a`` in Markdown tables, and no band or
error bar in plots. ``MEAN_STD`` says so in words; every table's caption carries it.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from fedkd import palette

MEAN_STD = "mean ± sample std (ddof=1) over seeds; the std is n/a (nan in CSV) for a single seed"
EVAL_METRICS = ("dice", "iou", "cldice", "hd95", "assd", "betti0_error", "tip_error")


# ---------------------------------------------------------------- mean ± std


def mean_std(values, axis: int = 0):
  """Mean and sample std (ddof=1) of ``values`` along ``axis``; std is NaN where there is one value.

  A 1-D list gives two floats; an array gives two arrays (e.g. [seeds, rounds] -> per round)."""
  a = np.asarray(values, np.float64)
  if a.ndim == 0 or a.shape[axis] == 0:
    raise ValueError("mean_std needs at least one value")
  mean = a.mean(axis)
  if a.shape[axis] > 1:
    with np.errstate(invalid="ignore"):  # inf values (e.g. epsilon without noise): std NaN, no warning
      std = a.std(axis, ddof=1)
  else:
    std = np.full_like(mean, np.nan)
  if np.ndim(mean) == 0:
    return float(mean), float(std)
  return mean, std


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
  """Method ``a`` minus method ``b``, paired by seed (``a[i]`` and ``b[i]`` share seed i's data, init and
  test set): d_i = a_i - b_i over n seeds. Returns ``n``, ``mean`` (of d), ``std`` (sample, ddof=1),
  ``ci_low`` / ``ci_high`` (the two-sided ``confidence`` interval mean ± t_{n-1} std / sqrt(n)) and ``p``
  (two-sided paired t-test of mean d = 0). With n < 2 the std, interval and p are NaN; with every d equal
  (to the rounding of a - b) the interval is that value and p is 1 if it is 0, else 0. NaN or Inf in ``a``, ``b`` or d is not a
  result: a ValueError (callers leave such seeds out or stop first)."""
  from scipy import stats

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f"paired_difference needs two equally long 1-D sequences, got shapes {a.shape} and {b.shape}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  with np.errstate(over="ignore", invalid="ignore"):
    d = a - b
  bad = np.flatnonzero(~np.isfinite(d))
  if len(bad):
    i = int(bad[0])
    raise ValueError(
      f"paired_difference: pair {i + 1} of {len(d)} gives {float(a[i])!r} - {float(b[i])!r} = {float(d[i])!r}, "
      f"not a result ({len(bad)} such pairs); leave NaN / Inf out before contrasting"
    )
  n = len(d)
  # every d equal up to the rounding of a - b (.8 - .7 and .9 - .8 differ in the last bit: a std of 1e-17 and
  # a p of 1e-31 otherwise)
  tol = 16 * np.finfo(np.float64).eps * max(float(np.max(np.abs(a))), float(np.max(np.abs(b))))
  if float(np.ptp(d)) <= tol:
    mean = float(np.median(d))
    mean = 0.0 if abs(mean) <= tol else mean
    out = {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
    if n >= 2:
      out.update(std=0.0, ci_low=mean, ci_high=mean, p=1.0 if mean == 0.0 else 0.0)
    return out
  mean, std = float(d.mean()), float(d.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  t = mean / (std / math.sqrt(n))
  return {
    "n": n,
    "mean": mean,
    "std": std,
    "ci_low": mean - half,
    "ci_high": mean + half,
    "p": float(2 * stats.t.sf(abs(t), n - 1)),
  }


def holm_family(pvalues: Sequence[float], noun: str) -> tuple[list, str]:
  """(Holm-adjusted p-values, or None each where fewer than 2 are tests; the header's words): a contrast of fewer
  than 2 seeds has no p (NaN) and is no test, so it is not counted among the family's ``noun``."""
  tested = sum(not math.isnan(p) for p in pvalues)
  adjusted = holm(pvalues) if tested > 1 else [None] * len(pvalues)
  untested = f"; {len(pvalues) - tested} without a p (fewer than 2 seeds)" if tested < len(pvalues) else ""
  return adjusted, f"Holm over the {tested} {noun}{untested}"


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given: with the m p-values sorted ascending
  p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). A contrast is
  significant at level alpha when its adjusted p <= alpha (family-wise error <= alpha). NaN stays NaN
  and does not count towards m; a value outside [0, 1] is a ValueError."""
  p = np.asarray(pvalues, np.float64)
  if p.ndim != 1:
    raise ValueError(f"holm needs a 1-D list of p-values, got shape {p.shape}")
  wrong = p[~np.isnan(p) & ~((p >= 0) & (p <= 1))]
  if len(wrong):
    raise ValueError(f"holm: {float(wrong[0])!r} is not a p-value (outside [0, 1])")
  out = np.full(p.shape, np.nan)
  ok = np.flatnonzero(~np.isnan(p))
  m = len(ok)
  running = 0.0
  for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
    running = max(running, min(1.0, (m - rank) * float(p[i])))
    out[i] = running
  return out.tolist()


def format_contrast(res: dict[str, float], p_adjusted: float | None = None, alpha: float = 0.05, digits: int = 3):
  """One table cell for a :func:`paired_difference`: ``+0.012 [-0.004, 0.028] p=0.12 (Holm 0.24), n.s.``
  (the verdict from the Holm-adjusted p when given, else from p; ``n/a`` with fewer than 2 seeds). A
  difference and interval that all round to 0 at ``digits`` decimals, yet are not all 0, are written with
  ``digits`` significant digits instead (``+2e-05 [-4.84e-06, +4.48e-05]``), not as ``+0.000 [-0.000,
  +0.000]``."""
  nums = [x for x in (res["mean"], res["ci_low"], res["ci_high"]) if not math.isnan(x)]
  tiny = any(nums) and all(round(x, digits) == 0 for x in nums)
  spec = f"+.{digits}g" if tiny else f"+.{digits}f"
  if math.isnan(res["p"]):
    return f"{res['mean']:{spec}} (n/a: {res['n']} seed)"
  p = res["p"] if p_adjusted is None else p_adjusted
  cell = f"{res['mean']:{spec}} [{res['ci_low']:{spec}}, {res['ci_high']:{spec}}] p={format_p(res['p'], alpha)}"
  if p_adjusted is not None:
    cell += f" (Holm {format_p(p_adjusted, alpha)})"
  return cell + (", significant" if p <= alpha else ", n.s.")


def format_p(p: float, alpha: float = 0.05) -> str:
  """``p`` to 3 significant digits, or to as many more as it takes for the printed value to fall on the same
  side of ``alpha`` as ``p`` itself: 0.0500001 prints as ``0.0500001``, not as ``0.05`` beside "n.s."."""
  for digits in range(3, 18):
    text = f"{p:.{digits}g}"
    if math.isnan(p) or (float(text) <= alpha) == (p <= alpha):
      return text
  return repr(p)


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
  """``"0.8070 ± 0.0123"``; ``"0.8070 ± n/a"`` when the std is NaN (a single seed); ``"inf"`` / ``"-inf"``
  for an infinite mean (e.g. epsilon without noise: no std); ``"NaN"`` for a NaN mean."""
  if math.isnan(mean):
    return "NaN"
  if math.isinf(mean):
    return "inf" if mean > 0 else "-inf"
  return f"{mean:.{digits}f} ± " + ("n/a" if math.isnan(std) else f"{std:.{digits}f}")


def not_results(values: Sequence) -> str:
  """``""`` when every one of ``values`` is a number other than NaN (a result a mean may take), else what the
  others are, e.g. ``"NaN in 1 of 3 seeds"`` or ``"NaN or missing in 2 of 3 seeds"`` (``None``, or anything
  not a number, is missing)."""
  nan = sum(1 for v in values if is_number(v) and math.isnan(v))
  missing = sum(1 for v in values if not is_number(v))
  if not nan and not missing:
    return ""
  what = " or ".join(w for w, n in (("NaN", nan), ("missing", missing)) if n)
  return f"{what} in {nan + missing} of {len(values)} seed{'s' if len(values) > 1 else ''}"


def _check_targets(*paths: str) -> None:
  """A :class:`fedkd.workdir.WorkdirError` (a user error: one line, exit 2) where one of ``paths`` is a folder,
  checked before a writer of several files writes any of them."""
  for path in paths:
    if os.path.isdir(path):
      from fedkd.workdir import WorkdirError

      raise WorkdirError(f"{path} is a folder, where fedkd writes a file; move or rename that folder and re-run")


def _replace_atomic(path: str, write) -> None:
  """``write(f)`` into a temporary file beside ``path`` (hidden, one per process), then renamed over
  ``path``: a reader sees the old or the new file; a write that fails (a full disk, an unserialisable value)
  leaves the old file and no temporary. A folder at ``path`` is a user error (one line)."""
  _check_targets(path)
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", newline="") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def write_text(path: str, text: str) -> None:
  """A text file written atomically."""
  _replace_atomic(path, lambda f: f.write(text))


@functools.cache
def code_version() -> dict:
  """Which fedkd produced a table: the git commit of the checkout fedkd runs from, and whether it had
  uncommitted changes (both None outside a git checkout, e.g. an installed wheel). Read once per process
  (the first call; an experiment calls it when it starts): a commit made while a long run goes on is not
  the code that run loaded. Callers must not modify the returned dict."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  top = git("rev-parse", "--show-toplevel")  # fedkd's own checkout, not a repository that holds a venv
  commit = git("rev-parse", "HEAD") if top and os.path.samefile(top, root) else None
  status = git("status", "--porcelain", "--untracked-files=no") if commit else None
  return {"fedkd_commit": commit, "fedkd_dirty": None if status is None else bool(status)}


def environment() -> dict:
  """What produced a table: machine (CPU model, cores), accelerator, Python / jax / jaxlib / XLA
  versions, thread and XLA flags, host memory mode (fedkd.hostmem), fedkd's commit -- saved next to
  every results table (numbers differ between machines, XLA builds and engine versions)."""
  import platform
  import sys

  import jax
  import jaxlib

  from fedkd import hostmem

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "backend": jax.default_backend(),
    "devices": sorted({d.device_kind for d in jax.devices()}),
    "device_count": jax.device_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    "host_memory_kept": hostmem.kept(),
    **code_version(),
  }


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  """A CSV file written atomically (a reader never sees half a table)."""

  def write(f):
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)

  _replace_atomic(path, write)


def md_cell(value) -> str:
  """``value`` as one cell of a Markdown table: a ``|`` in it (a method label, a value) escaped, else it splits the
  row and every later cell moves one column; a line break is a space."""
  return " ".join(str(value).splitlines()).replace("|", "\\|")


def mean_std_tables(
  md_path: str,
  csv_path: str,
  columns: Sequence[str],
  groups: Sequence[tuple[Sequence, dict[str, Sequence[float]]]],
  metrics: Sequence[str],
  *,
  title: str | None = None,
  caption: str = "",
  headers: Sequence[str] | None = None,
  digits: int = 4,
) -> list[str]:
  """One row per group of runs: its label cells, then mean ± std over seeds of every metric.

  ``groups``: ``(cells, values)`` with ``cells`` one entry per ``columns`` and ``values`` {metric: the
  values of the group's seeds}; a metric a group lacks is an empty cell. NaN is not a result: values with a
  NaN or a ``None`` (a seed without that metric) among them are not averaged; their cell says so (``NaN in
  1 of 3 seeds``, :func:`not_results`) and their CSV mean and std are ``nan``. The CSV has ``columns`` and
  ``<metric>_mean``, ``<metric>_std`` (full precision; std ``nan`` for one seed); the Markdown table
  has ``headers`` (default ``columns``) and one ``mean ± std`` cell per metric (``digits`` decimals; none for a
  byte count, a metric named ``*bytes*``; ``n/a`` for one seed) under ``title`` and a caption of ``caption`` plus :data:`MEAN_STD`. Both files
  are replaced atomically. Returns the Markdown lines."""
  _check_targets(md_path, csv_path)  # neither file is replaced when the other cannot be
  headers = list(headers or columns)
  if len(headers) != len(columns):
    raise ValueError(f"{len(headers)} headers for {len(columns)} columns")
  rows_csv, rows_md = [], []
  for cells, values in groups:
    if len(cells) != len(columns):
      raise ValueError(f"a group has {len(cells)} cells for {len(columns)} columns: {cells}")
    row_csv, row_md = list(cells), [md_cell(c) for c in cells]
    for m in metrics:
      vals = list(values.get(m, ()))
      if vals and not_results(vals):
        row_csv += ["nan", "nan"]
        row_md.append(not_results(vals))
      elif vals:
        mean, std = mean_std(vals)
        row_csv += [repr(mean), repr(std)]
        row_md.append(format_mean_std(mean, std, 0 if "bytes" in m else digits))  # byte counts: whole numbers
      else:
        row_csv += ["", ""]
        row_md.append("")
    rows_csv.append(row_csv)
    rows_md.append(row_md)
  write_csv(csv_path, list(columns) + [f"{m}_{s}" for m in metrics for s in ("mean", "std")], rows_csv)
  lines = ([title, ""] if title else []) + [(caption + " " if caption else "") + f"Each cell: {MEAN_STD}.", ""]
  lines.append("| " + " | ".join(md_cell(h) for h in headers + list(metrics)) + " |")
  lines.append("|" + "|".join(["---"] * len(headers) + ["---:"] * len(metrics)) + "|")
  lines += ["| " + " | ".join(r) + " |" for r in rows_md]
  _replace_atomic(md_path, lambda f: f.write("\n".join(lines) + "\n"))
  return lines


# ---------------------------------------------------------------- held-out scores per site


def site_table(per_site: dict[str, dict[str, float]], unseen_name: str | None) -> str:
  """Console table of held-out ``dice/*`` and ``iou/*`` per site, the unseen site last, then the mean
  over the training sites."""
  cols = list(next(iter(per_site.values())))
  cols = [c for c in cols if c.startswith("dice/")] + [c for c in cols if c.startswith("iou/")]
  w = max(max(len(s) for s in per_site) + 9, len("mean (train sites)") + 2)  # the mean row's label fits
  lines = [f"{'site':<{w}}" + "".join(f"{c:>17}" for c in cols)]
  train = [k for k in per_site if k != unseen_name]
  for site in train + ([unseen_name] if unseen_name in per_site else []):
    label = site + (" (unseen)" if site == unseen_name else "")
    lines.append(f"{label:<{w}}" + "".join(f"{per_site[site][c]:>17.4f}" for c in cols))
  mean = {c: np.mean([per_site[s][c] for s in train]) for c in cols}
  lines.append(f"{'mean (train sites)':<{w}}" + "".join(f"{mean[c]:>17.4f}" for c in cols))
  return "\n".join(lines)


def eval_table(results: dict, unseen_name: str | None) -> str:
  """Console table of every metric (``EVAL_METRICS``) per site and class."""
  lines = [f"{'site':<34}{'class':<11}" + "".join(f"{k:>13}" for k in EVAL_METRICS)]
  for site, res in results.items():
    for cname, entry in res.items():
      label = site + (" (unseen)" if site == unseen_name else "")
      lines.append(f"{label:<34}{cname:<11}" + "".join(f"{entry[k]:>13.4f}" for k in EVAL_METRICS))
  return "\n".join(lines)


def is_number(v) -> bool:
  """A JSON number (int or float, not a bool): a result a table or a contrast can take."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
  """A JSON number (not a bool) that is finite as a float: NaN, Infinity and an integer too large for a float
  (``10**400``, on which ``math.isfinite`` raises) are not."""
  if not is_number(v):
    return False
  try:
    return math.isfinite(v)
  except OverflowError:
    return False


def shown_value(v) -> str:
  """A JSON value for an error message: null for None, else its repr, at most 40 characters."""
  text = "null" if v is None else repr(v)
  return text if len(text) <= 40 else text[:37] + "..."


def _null_for_nan(x):
  """``x`` with every NaN float (a metric no image defines, e.g. hd95 with nothing predicted) as None."""
  if isinstance(x, dict):
    return {k: _null_for_nan(v) for k, v in x.items()}
  return None if isinstance(x, float) and math.isnan(x) else x


def write_eval_tables(
  results: dict,
  out: str,
  round_: int,
  spacing_mm: float = 1.0,
  unseen: str | None = None,
  images_per_site: dict[str, int] | None = None,
  models: dict[str, str] | None = None,
) -> None:
  """``eval.json`` ({"round", "spacing_mm", "unseen", ["images_per_site",] "sites": {site: {class: {metric:
  value}}}}; strict JSON: a metric no image defines is null) and ``eval.csv`` (one row per site, class and
  metric; such a value is ``nan``) in the folder ``out``. ``spacing_mm``: mm per pixel the distances (hd95,
  assd, tip_error) were measured with (1.0, the default: pixels); ``unseen``: the site no client trained on;
  ``images_per_site``: {site: how many of its held-out images were scored} (left out when None); ``models``:
  {site: "personal" or "global"}, the model that scored it (left out when None)."""
  _check_targets(os.path.join(out, "eval.json"), os.path.join(out, "eval.csv"))
  doc = {"round": round_, "spacing_mm": spacing_mm, "unseen": unseen}
  if images_per_site is not None:
    doc["images_per_site"] = images_per_site
  if models is not None:
    doc["model"] = models
  doc["sites"] = _null_for_nan(results)
  _replace_atomic(os.path.join(out, "eval.json"), lambda f: json.dump(doc, f, indent=2, allow_nan=False))
  rows = [
    [site, cname, k, v] for site, res in results.items() for cname, entry in res.items() for k, v in entry.items()
  ]
  write_csv(os.path.join(out, "eval.csv"), ["site", "class", "metric", "value"], rows)


# ---------------------------------------------------------------- pictures

# Metrics bounded to [0, 1]: their std bands and error bars are clipped to that range.
BOUNDED = ("dice", "iou", "cldice", "accuracy")


def _bounded(metric: str) -> bool:
  return any(part in BOUNDED for part in metric.replace("/", " ").replace("_", " ").split())


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.65) -> np.ndarray:
  """Grey [H, W] image in [0, 1] + label map -> RGB uint8 with each class tinted in its
  ``fedkd.palette`` colour."""
  g = np.clip(image, 0.0, 1.0)
  rgb = np.repeat(g[..., None], 3, axis=-1)
  for cls, col in palette.CLASS_RGB.items():
    sel = mask == cls
    rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(col) / 255.0
  return (rgb * 255).round().astype(np.uint8)


def error_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """RGB uint8 over the darkened grey image: a correctly predicted labelled pixel in its class colour
  (``fedkd.palette``: catheter red, guidewire green, vessel blue), a false positive (a class predicted
  on background) yellow, a miss (a labelled pixel predicted as background or as another class)
  magenta."""
  g = np.clip(image, 0, 1)
  rgb = np.repeat(g[..., None], 3, -1) * 0.7
  for cls, col in palette.CLASS_RGB.items():
    rgb[(pred == cls) & (target == cls)] = np.asarray(col) / 255.0
  rgb[(pred > 0) & (target == 0)] = np.asarray(palette.FALSE_POSITIVE_RGB) / 255.0
  rgb[(target > 0) & (pred != target)] = np.asarray(palette.MISS_RGB) / 255.0
  return (rgb * 255).round().astype(np.uint8)


def _legend_strip(draw, y: int, items, width: int) -> int:
  """Draws coloured squares with their names from the left at height ``y``, wrapping at ``width``;
  returns the height used."""
  x, row_h = 4, 14
  for rgb, name in items:
    w = 14 + 6 * len(name) + 10
    if x + w > width and x > 4:
      x, y = 4, y + row_h
    draw.rectangle((x, y + 2, x + 9, y + 11), fill=tuple(rgb), outline=(0, 0, 0))
    draw.text((x + 13, y + 1), name, fill=(0, 0, 0))
    x += w
  return y + row_h


def grid_rows(rows: dict[str, np.ndarray], scale: int = 1, title: str = "", legend=()):
  """Stacks labelled RGB rows (name -> [h, w, 3] uint8) into one PIL image, zoomed by ``scale``, under
  an optional title line and a legend (``(rgb, name)`` entries, drawn as coloured squares)."""
  from PIL import Image, ImageDraw

  width = max(r.shape[1] for r in rows.values())
  label_h = 14
  pics = []
  for name, r in rows.items():
    r = np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)))
    pic = Image.fromarray(r).resize((r.shape[1] * scale, r.shape[0] * scale), Image.NEAREST)
    pics.append((name, pic))
  width = max(width * scale, 320 if legend else 0)
  # measure the header on a scratch canvas, then draw it for real
  scratch = ImageDraw.Draw(Image.new("RGB", (width, 200)))
  head = (label_h if title else 0) + (_legend_strip(scratch, 0, legend, width) if legend else 0)
  out = Image.new("RGB", (width, head + sum(p.height + label_h for _, p in pics)), (255, 255, 255))
  draw, y = ImageDraw.Draw(out), 0
  if title:
    draw.text((4, 1), title, fill=(0, 0, 0))
    y += label_h
  if legend:
    y = _legend_strip(draw, y, legend, width)
  for name, pic in pics:
    draw.text((4, y + 1), name, fill=(0, 0, 0))
    out.paste(pic, (0, y + label_h))
    y += pic.height + label_h
  return out


def grid(
  sets: dict[str, tuple[np.ndarray, np.ndarray]],
  frames: int,
  scale: int,
  unseen: str | None,
  preds: dict[str, np.ndarray] | None = None,
):
  """One labelled row per site, with a legend of the colours used. Without ``preds`` (the data
  preview): ``frames`` pairs of (frame, masks tinted by ``overlay``). With ``preds`` {site: label
  maps} (``fedkd.eval``'s predictions.png): triples of (frame, ground truth by ``overlay``, the
  prediction by ``error_overlay``)."""
  rows, present = {}, set()
  for name, (images, masks) in sets.items():
    images, masks = np.asarray(images)[..., 0], np.asarray(masks)
    tiles = []
    for i in range(min(frames, len(images))):
      plain = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
      tiles.append(np.repeat(plain[..., None], 3, -1))
      tiles.append(overlay(images[i], masks[i]))
      present.update(np.unique(masks[i]).tolist())
      if preds is not None:
        tiles.append(error_overlay(images[i], preds[name][i], masks[i]))
        present.update(np.unique(preds[name][i]).tolist())
    rows[name + (" (unseen)" if name == unseen else "")] = np.concatenate(tiles, axis=1)
  legend = palette.class_legend(present)
  if preds is None:
    title = "per frame (held-out, not augmented): image | labels"
  else:
    title = "per frame: image | ground truth | prediction (class colour where right)"
    legend += palette.error_legend()
  return grid_rows(rows, scale, title=title, legend=legend)


def remove_stale(folder: str, ours, kept: Sequence[str]) -> list[str]:
  """Removes the files in ``folder`` that ``ours(name)`` claims as pictures this writer draws but that
  this call did not draw (``kept``, paths or names): a plot left from an earlier run of other settings
  would show results that no table beside it holds. Returns the names removed."""
  keep = {os.path.basename(p) for p in kept}
  removed = []
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    path = os.path.join(folder, name)
    if ours(name) and name not in keep and os.path.isfile(path):
      os.remove(path)
      removed.append(name)
  return removed


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def robustness_plot(rob: dict, path: str) -> None:
  """Dice per class vs severity, one panel per perturbation (``fedkd.evaluate.robustness``'s dict);
  each class in its ``fedkd.palette`` colour."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(rob), figsize=(4 * len(rob), 3.4), squeeze=False)
  axes = axes[0]
  for ax, (kind, d) in zip(axes, rob.items()):
    for cname, ys in d["dice"].items():
      ax.plot(d["severity"], ys, marker="o", label=cname, color=palette.plot_colour(cname))
    ax.set_title(kind.replace("_", " "))
    ax.set_xlabel("factor" if kind == "downscale" else "severity")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("Dice (held-out, all sites)")
  axes[-1].legend(loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


LEGEND_CHARS = 48  # longer legend labels keep their start and end around a '…' (tables hold them whole)


def legend_label(label: str, width: int = LEGEND_CHARS) -> str:
  """``label`` as a legend shows it: at most ``width`` characters, the middle of a longer one cut to '…'
  (a group label ends with the values that tell it apart from the others)."""
  if len(label) <= width:
    return label
  head = (width - 1) // 2
  return label[:head] + "…" + label[len(label) - (width - 1 - head) :]


def legend_labels(labels: Sequence[str], width: int = LEGEND_CHARS) -> dict[str, str]:
  """{label: what the legend shows} for the labels of one picture: :func:`legend_label` of each, unless two
  different labels would then look alike (their middles, where cut, held what tells them apart); then with
  the dotted keys shortened to their last part (``client_optimizer.learning_rate=0.1`` -> ``learning_rate=0.1``),
  and where even those collide, whole."""
  distinct = list(dict.fromkeys(labels))
  for shorten in (lambda s: s, lambda s: re.sub(r"(?<![\w.])(?:\w+\.)+(?=\w+=)", "", s)):
    shown = {lab: legend_label(shorten(lab), width) for lab in distinct}
    if len(set(shown.values())) == len(distinct):
      return shown
  return {lab: lab for lab in distinct}


def curves_plot(
  groups: Sequence[tuple[str, Sequence[Sequence[dict]]]],
  metrics: Sequence[str],
  path: str,
  x: str = "round",
  logx: bool = False,
  unit_range: bool = True,
) -> bool:
  """Scores vs round (or another record key ``x``; ``logx``: log axis), one panel per metric, one line
  per group: ``groups`` is ``(label, runs)`` with each run its list of evaluation records ({x, metric:
  value}); ``unit_range``: Dice / IoU-like axes span [0, 1] (else they fit the data). The line is the mean over the
  group's runs at the rounds all of them have, the band ± the sample std (:func:`mean_std`; no band
  for one run; clipped to [0, 1] for Dice / IoU-like scores). Every panel has the legend. Returns
  whether anything was drawn (nothing when no group has a metric)."""
  present = [m for m in metrics if any(m in r for _, runs in groups for run in runs for r in run)]
  if not present:
    return False
  plt = _pyplot()
  shown = legend_labels([label for label, _ in groups])
  fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
  for ax, m in zip(axes[0], present):
    for label, runs in groups:
      per_run = [{r[x]: r[m] for r in run if m in r} for run in runs]
      rounds = sorted(set.intersection(*[set(d) for d in per_run])) if per_run else []
      if not rounds:
        continue
      mean, std = mean_std([[d[x] for x in rounds] for d in per_run], axis=0)
      (line,) = ax.plot(
        rounds, mean, marker="o" if len(rounds) < 12 else None, ms=3, label=f"{shown[label]} (n={len(runs)})"
      )
      if len(per_run) > 1:
        lo, hi = mean - std, mean + std
        if _bounded(m):
          lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
        ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_title(m)
    ax.set_xlabel(x)
    if logx:
      ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if _bounded(m) and unit_range:
      ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="best").set_in_layout(False)  # long labels must not squeeze the panels
  axes[0][0].set_ylabel("held-out score (mean ± std over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def errorbar_plot(
  lines: dict[str, Sequence[tuple[float, Sequence[float]]]],
  xlabel: str,
  ylabel: str,
  path: str,
  logx: bool = False,
  references: dict[str, Sequence[float]] | None = None,
):
  """One line per label through points ``(x, values over seeds)``: the mean with a ± sample-std error
  bar (none for a single seed; clipped to [0, 1] when ``ylabel`` names a Dice / IoU-like score);
  ``logx``: a logarithmic x axis; ``references`` {label: values over seeds}: a dashed horizontal line at
  their mean each (e.g. the run without noise)."""
  plt = _pyplot()
  many = len(lines) + len(references or {}) > 6  # then markers vary and the legend sits beside the axes
  fig, ax = plt.subplots(figsize=(7.2 if many else 5, 3.6))
  markers = "osD^vPX"  # 7 markers against 10 colours: no two of 70 labels look alike
  shown = legend_labels([*lines, *(references or {})])
  for i, (label, pts) in enumerate(lines.items()):
    pts = sorted(pts, key=lambda p: p[0])
    stats = [mean_std(list(v)) for _, v in pts]
    mean = np.array([s[0] for s in stats], np.float64)
    std = np.array([0.0 if math.isnan(s[1]) else s[1] for s in stats], np.float64)
    lo, hi = mean - std, mean + std
    if _bounded(ylabel):
      lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    marker = markers[i % len(markers)] if many else "o"
    ax.errorbar([p[0] for p in pts], mean, yerr=[mean - lo, hi - mean], marker=marker, capsize=3, label=shown[label])
  for label, values in (references or {}).items():
    ax.axhline(float(np.mean(values)), ls="--", lw=1, color="0.4", label=f"{shown[label]} (n={len(values)})")
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f"{ylabel} (mean ± std)")
  ax.grid(alpha=0.3)
  if many:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  else:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def heatmap(matrix, row_labels: Sequence[str], path: str, xlabel: str = "", title: str = "") -> None:
  """A [rows, columns] matrix as an image with a colour bar (e.g. EMD weights: silo x neighbour rows,
  rounds as columns)."""
  m = np.asarray(matrix, np.float64)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(min(12, 3 + 0.08 * m.shape[1]), 1.2 + 0.25 * m.shape[0]))
  im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis")
  ax.set_yticks(range(len(row_labels)))
  ax.set_yticklabels(row_labels, fontsize=6)
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
