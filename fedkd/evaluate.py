"""Evaluation: the one implementation behind training's held-out scores, FedEFM's downstream scores and
the eval CLI (``python -m fedkd.eval``).

* :func:`overlap_scores`: mean Dice and IoU per foreground class of label maps against masks (what
  metrics.jsonl and FedEFM's results hold).
* :class:`Evaluator`: a model's predictions on every site's held-out set; ``evaluator(params)`` gives
  :func:`overlap_scores` per site (training), ``detailed_metrics`` every metric of ``fedkd.metrics``
  per site and class, ``robustness`` Dice under increasing image perturbations (:func:`perturb`).
* :func:`summarize`: the metrics.jsonl record of one evaluation (training sites, unseen site, each site).
* :func:`load_run` / :func:`evaluate_run`: a finished run's checkpoint, evaluated; writes eval.json,
  eval.csv, predictions.png, robustness.json and robustness.png through ``fedkd.report``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence

import numpy as np

from fedkd import preemption
from fedkd.data.labels import CLASS_NAMES
from fedkd.errors import NonFiniteOutput, UserError

SEVERITIES = {
  "noise": [0.0, 0.05, 0.1, 0.2, 0.3],  # Gaussian noise sigma (images in [0, 1])
  "blur": [0.0, 0.5, 1.0, 1.5, 2.0],  # Gaussian blur sigma, px
  "contrast_loss": [0.0, 0.25, 0.5, 0.75, 0.9],  # fraction of contrast removed around the mean
  "downscale": [1.0, 1.5, 2.0, 3.0, 4.0],  # downsample by this factor, upsample back
}


# Algorithms whose training evaluation scores each training site with its client's personal model (synthetic
# data); fedkd.eval restores only the server model.
PERSONAL_ALGORITHMS = ("fedbn", "ditto")


class EvalError(UserError, ValueError):
  pass


def foreground_classes(num_classes: int) -> list[tuple[int, str]]:
  """``[(class id, name), ...]`` of the foreground classes of a ``num_classes`` model (background left out)."""
  return list(enumerate(CLASS_NAMES[:num_classes]))[1:]


def overlap_scores(pred, masks, classes: Sequence[tuple[int, str]]) -> dict[str, float]:
  """``{"dice/<class>": mean Dice, "iou/<class>": mean IoU}`` over the images of label maps ``pred``
  against ``masks`` ([N, H, W]); means in float32 as JAX computes them."""
  import jax.numpy as jnp

  from fedkd.metrics import dice, iou

  out = {}
  for cid, cname in classes:
    out[f"dice/{cname}"] = float(jnp.mean(dice(pred, masks, cid)))
    out[f"iou/{cname}"] = float(jnp.mean(iou(pred, masks, cid)))
  return out


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


class Evaluator:
  """A model's scores on every site's held-out set.

  ``config``: reads ``model.num_classes`` and ``eval.batch_size``; ``apply``: the model's apply
  function; ``eval_sets``: {site: (images [N, H, W, 1], masks [N, H, W])}."""

  def __init__(self, config, apply, eval_sets: dict[str, tuple]):
    from fedkd.models import make_predictor

    self.sets = eval_sets
    self.classes = foreground_classes(config.model.num_classes)
    self._predict = make_predictor(apply, config.eval.batch_size)
    self._batch = config.eval.batch_size

  def images_per_site(self) -> str:
    """How many held-out images the sites have: '32', or '1-32' where a prepared site's test split is smaller."""
    sizes = sorted({len(images) for images, _ in self.sets.values()})
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"

  def predict(self, params, images):
    """Label maps [N, H, W] of ``images`` [N, H, W, 1]; :class:`fedkd.errors.NonFiniteOutput` where the
    model's outputs are NaN/Inf."""
    return self._predict(params, images)

  def check_outputs(self, params) -> None:
    """Raises :class:`fedkd.errors.NonFiniteOutput` when ``params`` give NaN/Inf outputs on the first
    prediction batch of the first site (a checkpoint saved without an evaluation: one batch, not a score)."""
    images, _ = next(iter(self.sets.values()))
    self.predict(params, images[: self._batch])

  def site_metrics(self, params, images, masks) -> dict[str, float]:
    return overlap_scores(self.predict(params, images), masks, self.classes)

  def __call__(self, params, site_params: dict | None = None) -> dict[str, dict[str, float]]:
    """{site: {"dice/<class>", "iou/<class>"}}: what training logs every ``eval.every`` rounds.
    ``site_params`` {site: params}: the sites evaluated with their own (personal) model instead."""
    site_params = site_params or {}
    return {name: self.site_metrics(site_params.get(name, params), im, m) for name, (im, m) in self.sets.items()}

  def detailed_metrics(self, params, spacing_mm: float = 1.0, site_params: dict | None = None):
    """``(results, preds)``: results {site: {class: {metric: mean over images}}} for every metric in
    ``fedkd.report.EVAL_METRICS`` (distances in mm for ``spacing_mm`` mm pixels; NaN-free means, and
    ``<metric>_nan_images`` where some images had none), preds {site: label maps}. ``site_params``: as for
    :meth:`__call__`."""
    from fedkd import metrics

    site_params = site_params or {}
    results, preds = {}, {}
    for site, (images, masks) in self.sets.items():
      masks = np.asarray(masks)
      pred = np.asarray(self.predict(site_params.get(site, params), np.asarray(images)))
      preds[site] = pred
      res = {}
      for cid, cname in self.classes:
        per_image = {
          "dice": np.asarray(metrics.dice(pred, masks, cid)),
          "iou": np.asarray(metrics.iou(pred, masks, cid)),
          "cldice": metrics.cldice_reference(pred, masks, cid),
          "hd95": metrics.hd95(pred, masks, cid, spacing_mm),
          "assd": metrics.assd(pred, masks, cid, spacing_mm),
          "betti0_error": metrics.betti0_error(pred, masks, cid),
          "tip_error": metrics.tip_error(pred, masks, cid, spacing_mm),
        }
        entry = {}
        for k, v in per_image.items():
          v = np.asarray(v, np.float64)
          entry[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
          if np.isnan(v).any():
            entry[f"{k}_nan_images"] = int(np.isnan(v).sum())
        res[cname] = entry
      results[site] = res
    return results, preds

  def robustness(
    self, params, severities: dict[str, list[float]] = SEVERITIES, site_params: dict | None = None
  ) -> dict:
    """{perturbation: {"severity": levels, "dice": {class: mean Dice over all sites' images per level}}};
    ``site_params``: as for :meth:`__call__`."""
    from fedkd import metrics

    site_params = site_params or {}
    out = {}
    for kind, levels in severities.items():
      curve = {c: [] for _, c in self.classes}
      for sev in levels:
        scores = {c: [] for _, c in self.classes}
        for site, (images, masks) in self.sets.items():
          pred = np.asarray(self.predict(site_params.get(site, params), perturb(np.asarray(images), kind, sev)))
          for cid, cname in self.classes:
            scores[cname].append(np.asarray(metrics.dice(pred, np.asarray(masks), cid)))
        for cname in scores:
          curve[cname].append(float(np.mean(np.concatenate(scores[cname]))))
      out[kind] = {"severity": list(levels), "dice": curve}
    return out


def summarize(round_: int, per_site: dict[str, dict[str, float]], unseen_name: str | None) -> dict:
  """One metrics.jsonl record: means over training sites, the unseen site, and every site."""
  train = [v for k, v in per_site.items() if k != unseen_name]
  rec: dict = {"round": round_}
  for key in train[0]:
    rec[key] = float(np.mean([m[key] for m in train]))
  for key, val in per_site.get(unseen_name, {}).items():
    rec[f"unseen/{key}"] = val
  for site, m in per_site.items():
    for key, val in m.items():
      rec[f"site/{site}/{key}"] = val
  return rec


class _Vanished(Exception):
  """The checkpoint of a round was deleted while it was read (a run still training rotates its checkpoints)."""


_READ_TRIES = 5  # reads of a running run's checkpoints before giving up


def _restore(ckdir, round_: int | None, busy: str = "", personal_models: bool = True):
  """(config, apply, params, round, personal) from the checkpoint of ``round_`` (default: the newest intact one)
  in ``ckdir`` (``personal``: :func:`_personal_models`, {} unless ``personal_models``); :class:`_Vanished` when
  the round being read is deleted meanwhile (and no ``round_`` was asked for)."""
  import jax
  import ml_collections

  from fedkd.checkpoint import CheckpointError, Checkpointer
  from fedkd.fl import algorithms, engine
  from fedkd.models import init_params

  ckpt = Checkpointer(ckdir)

  def load(r):
    try:
      config = ml_collections.ConfigDict(ckpt.saved_config(r))
      try:
        apply, params = init_params(config.model, config.seed)
        server_tx = engine.make_optimizer(config.server_optimizer)
        like = algorithms.FedAvg(server_tx).init(params, jax.random.key(config.seed))
      except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
          f"the config stored with round {r} is not a usable fedavg config ({type(e).__name__}: {e})"
        ) from None
      state, _ = ckpt.restore(r, like)
      personal = _personal_models(ckpt, r, config, server_tx, state["params"]) if personal_models else {}
    except CheckpointError:
      if not (ckdir / str(r)).exists():  # not damaged: gone (a running trainer keeps only its latest rounds)
        if round_ is None:
          raise _Vanished(r) from None
        now = Checkpointer(ckdir)
        try:
          left = now.all_rounds()
        finally:
          now.close()
        raise EvalError(
          f"the checkpoint for round {r} in {ckdir} was deleted while it was read (a run still training there keeps "
          f"only its latest checkpoints); evaluate a round it still has ({', '.join(map(str, left)) or 'none yet'}) "
          "or leave out --round for the newest"
        ) from None
      raise
    return config, apply, state["params"], personal

  rounds = []
  try:
    rounds = ckpt.all_rounds()
    if not rounds:
      raise EvalError(f"{ckdir} holds no finished checkpoint" + (busy or "; train (or resume) with fedkd.main first"))
    if round_ is None:
      r, (config, apply, params, personal) = ckpt.restore_latest(load, lambda m: print(m, file=sys.stderr))
    else:
      if round_ not in rounds:
        raise EvalError(f"no checkpoint for round {round_} in {ckdir}; available rounds: {rounds}")
      r = round_
      config, apply, params, personal = load(r)
  except CheckpointError as e:
    # the cause without the checkpoint's training advice (a new --workdir, moving steps away): eval only reads
    which = f"round {round_}" if round_ is not None else f"round(s) {', '.join(map(str, rounds))}"
    others = [x for x in rounds if x != round_] if round_ is not None else []
    hint = f"; evaluate another --round ({', '.join(map(str, others))})" if others else ""
    raise EvalError(
      f"the checkpoint of {which} in {ckdir} cannot be evaluated: {e.reason or e}; it is damaged or was not "
      f"written by a FedAvg-family run, and fedkd.eval changed nothing{hint}"
    ) from None
  finally:
    ckpt.close()
  return config, apply, params, r, personal


def _personal_models(ckpt, r: int, config, server_tx, params) -> dict:
  """{client id: its personal model} from round ``r``'s per-client rows, for a run of a personalised algorithm
  (:data:`PERSONAL_ALGORITHMS`) on synthetic data, where training site i is client i; {} otherwise. The rows are
  those of the algorithm as the run built it (``fedkd.tasks.fedavg.build_algorithm``: compression keeps a
  residual beside them)."""
  import jax

  from fedkd.data.pipeline import evaluated_sites
  from fedkd.tasks.fedavg import build_algorithm

  if (config.get("algorithm") or {}).get("name") not in PERSONAL_ALGORITHMS:
    return {}
  if (config.get("data") or {}).get("source", "synthetic") != "synthetic":
    return {}
  config = _completed(config)  # a run from before a key existed (algorithm.scaffold_weighting, ...)
  alg = build_algorithm(config, server_tx)
  init_row = jax.tree.map(np.asarray, alg.init_row(params))
  n = ckpt.saved_client_rows(r) or 0
  like = {"ids": np.zeros(n, np.int64), "rows": jax.tree.map(lambda a: np.zeros((n,) + a.shape, a.dtype), init_row)}
  saved = ckpt.restore_client_state(r, like) if n else like
  scored = set(evaluated_sites(config))  # of thousands of cross-device clients, the sites scored
  return {
    int(cid): alg.personal(params, jax.tree.map(lambda a, k=k: np.asarray(a)[k], saved["rows"]))
    for k, cid in enumerate(np.asarray(saved["ids"]).tolist())
    if int(cid) in scored
  }


def _completed(config):
  """The stored config of a run with the keys fedkd added since: the value that run ran with
  (``fedkd.config.ADDED_KEYS``), else today's default."""
  import ml_collections

  from fedkd.config import base_config, flat_dict, ran_as

  d = config.to_dict()
  saved, base = flat_dict(d), flat_dict(base_config().to_dict())
  for key, value in ({k: v for k, v in base.items() if k not in saved} | ran_as(saved, base)).items():
    *groups, leaf = key.split(".")
    node = d
    for g in groups:
      node = node.setdefault(g, {})
      if not isinstance(node, dict):
        break
    else:
      node[leaf] = value
  return ml_collections.ConfigDict(d)


def _training_now(path) -> str:
  """'; <holder> is training there ...' when the workdir's lock names a live process on this host, else ''."""
  from fedkd.workdir import running_holder

  holder = running_holder(path)
  return f"; {holder} is training there and has not saved a checkpoint yet: evaluate after it has" if holder else ""


def load_run(workdir: str, round_: int | None):
  """(config, apply, params, round) from the run's checkpoint, using the config stored with it."""
  return _read_checkpoint(workdir, *_checkpoint_folder(workdir), round_)[:4]


def _run_folder(workdir: str):
  from fedkd.workdir import prepare

  return prepare(workdir, create=False, skip=("eval",))  # eval/: the caller's output folder checks it


def _checkpoint_folder(workdir: str, path=None):
  """(the run directory, its checkpoints/ folder), or an :class:`EvalError` / ``WorkdirError`` saying why
  ``workdir`` holds no FedAvg-family run to evaluate. Reads no checkpoint. ``path``: ``_run_folder(workdir)``
  where the caller has it already."""
  from fedkd.workdir import WorkdirError, name_runs, runs_below, saved_task, task_from_files

  path = path or _run_folder(workdir)
  try:
    task = saved_task(path) or (task_from_files(path) or ("fedavg",))[0]
  except WorkdirError:  # a damaged config.json: the config stored with the checkpoint is what is evaluated
    task = "fedavg"
  if task != "fedavg":
    raise EvalError(
      f"{workdir} holds a {task!r} experiment (config.task={task!r}); fedkd.eval evaluates FedAvg-family runs. "
      "Its results are in results.md / results.csv there (python -m fedkd.tasks.fedefm_contrast compares them)"
    )
  ckdir = path / "checkpoints"
  if not ckdir.is_dir():
    runs = runs_below(path)
    if runs:  # a sweep's --out, or the parent of --seeds / --replica_config replicas: one run per subfolder
      raise EvalError(
        f"{workdir} holds no run of its own but runs in its subfolders ({name_runs(runs)}); evaluate each, "
        f"e.g. --workdir={os.path.join(workdir, runs[0])}"
      )
    if path.name == "checkpoints" and any(p.name.isdigit() for p in path.iterdir()):
      raise EvalError(f"{workdir} is a run's checkpoints/ folder; pass the run directory: --workdir={path.parent}")
    if (path / "eval.json").exists() and (path.parent / "checkpoints").is_dir():  # <run>/eval, or an --out in a run
      raise EvalError(
        f"{workdir} holds an evaluation's outputs (eval.json), not a run; pass the run directory: "
        f"--workdir={path.parent}"
      )
    busy = _training_now(path)
    raise EvalError(
      f"{workdir} has no checkpoints/ folder"
      + (busy or f"; train first with python -m fedkd.main --config=... --workdir={workdir}")
    )
  return path, ckdir


def _read_checkpoint(workdir: str, path, ckdir, round_: int | None, personal_models: bool = True):
  import jax

  for _ in range(_READ_TRIES):
    try:
      config, apply, params, r, personal = _restore(ckdir, round_, _training_now(path), personal_models)
      break
    except _Vanished:  # a run still training there saved a newer round and deleted this one: read afresh
      continue
  else:
    raise EvalError(
      f"the checkpoints in {ckdir} were replaced while being read, {_READ_TRIES} times: a run is still training "
      "there and keeps only its latest checkpoints; evaluate it when it has finished"
    )
  finite = all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves((params, personal)))
  if not finite:
    raise EvalError(
      f"the checkpoint for round {r} in {ckdir} holds NaN/Inf parameters (that run diverged); "
      "evaluate an earlier --round or retrain with a lower learning rate"
    )
  return config, apply, params, r, personal


OUTPUT_FILES = ("eval.json", "eval.csv", "predictions.png", "robustness.json", "robustness.png")
STAGING_PREFIX = ".eval-staging-"  # + pid: the folder in --out the files are written to before they are renamed


def _remove_stale_staging(out: str) -> None:
  """Staging folders of evaluations that were killed (SIGKILL, a power cut) before they could remove theirs."""
  from fedkd.workdir import pid_alive

  for name in os.listdir(out):
    pid = name[len(STAGING_PREFIX) :]
    if name.startswith(STAGING_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
      shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _output_folder(out: str, flag: str) -> str:
  """``out`` created and proven writable, with none of :data:`OUTPUT_FILES` a folder there (checked before
  anything is computed: a folder found at the last file written would leave new tables beside old curves)."""
  from fedkd.workdir import WORKDIR_FILES, WORKDIR_FOLDERS, prepare

  folder = os.fspath(prepare(out, flag=flag, skip=WORKDIR_FILES + WORKDIR_FOLDERS))  # not a run's workdir
  for name in OUTPUT_FILES:
    path = os.path.join(folder, name)
    if os.path.isdir(path):
      raise EvalError(f"{path} is a folder, where fedkd.eval writes a file; move or rename that folder and re-run")
  return folder


def _check_output_folder(out: str, flag: str) -> None:
  """:func:`_output_folder`'s checks, creating nothing where ``out`` does not exist yet (a run that then
  cannot be evaluated leaves no folder behind): its nearest existing parent is a writable folder."""
  from fedkd.workdir import WorkdirError, is_remote

  if not out.strip() or is_remote(out) or os.path.isdir(os.path.expanduser(out)):
    _output_folder(out, flag)  # an existing folder: only a probe file is written and removed
    return
  parent = os.path.abspath(os.path.expanduser(out))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    what = (
      " is a file, not a folder" if parent == os.path.abspath(os.path.expanduser(out)) else ": a parent of it is a file"
    )
    raise WorkdirError(f"{flag}={out}{what}; pass a folder path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"cannot write to {flag}={out} ({parent} is not writable); use a writable {flag}")


def evaluate_run(
  workdir: str,
  *,
  round_: int | None = None,
  examples: int | None = None,
  spacing_mm: float = 1.0,
  frames: int = 4,
  out: str | None = None,
  tfds_data_dir: str | None = None,
  global_model: bool = False,
  log: Callable[[str], None] = lambda msg: print(msg, flush=True),
) -> dict:
  """Evaluates the checkpoint of ``round_`` (default: the latest) of the run in ``workdir`` on
  ``examples`` held-out images (default: the run's ``config.eval.examples_per_site``, what training scored) of
  every site training evaluates (the training sites, at most ``config.eval.max_sites`` of them, and the unseen
  one) and writes to ``out``
  (default ``<workdir>/eval``): eval.json / eval.csv (every metric per site and class),
  predictions.png (``frames`` per site; none for 0), robustness.json / robustness.png.
  ``tfds_data_dir``: where a run on prepared data finds its datasets (default: its stored config's).
  A personalised run's (FedBN, Ditto) training sites are scored with their clients' personal models, as training
  scores them, unless ``global_model`` (every site with the server model); eval.json's ``model`` says which.
  Returns {"round", "results", "robustness", "out"}."""
  from fedkd import report
  from fedkd.data.pipeline import DataError, evaluated_sites, make_client_data

  path = _run_folder(workdir)
  # a bad --out is refused before the workdir's checkpoints are looked for and read
  if out:
    _check_output_folder(out, "--out")
  elif os.path.lexists(default := os.path.join(os.path.expanduser(workdir), "eval")) and not os.path.isdir(default):
    raise EvalError(
      f"{default} is a file, where fedkd.eval writes its outputs by default; move it away or pass --out=FOLDER"
    )
  config, apply, params, r, personal = _read_checkpoint(
    workdir, *_checkpoint_folder(workdir, path), round_, personal_models=not global_model
  )
  out = _output_folder(out or os.path.join(workdir, "eval"), "--out" if out else "--workdir")
  source, stored_dir = config.data.source, config.data.get("tfds_data_dir") or ""
  if tfds_data_dir is not None and source == "synthetic":
    raise EvalError(
      f"--tfds_data_dir is for runs on prepared data; {workdir} was trained on synthetic data: leave it out"
    )
  with config.unlocked():
    if examples is not None:
      config.eval.examples_per_site = examples
    if tfds_data_dir is not None:
      config.data.tfds_data_dir = tfds_data_dir
  sites = evaluated_sites(config)
  try:
    data = make_client_data(config, training=False)
    eval_sets = data.eval_sets(sites)
  except DataError as e:
    if source == "synthetic" or tfds_data_dir is not None:
      raise
    if os.path.isdir(os.path.join(os.path.expanduser(stored_dir), source.partition(":")[2])):
      raise  # the dataset is where the run read it: a problem with its content
    where = f" (relative: read from {os.getcwd()})" if not os.path.isabs(os.path.expanduser(stored_dir)) else ""
    raise EvalError(
      f"{e}. fedkd.eval reads the run's stored config.data.tfds_data_dir={stored_dir!r}{where}: "
      "pass the prepared datasets' folder with --tfds_data_dir=DIR"
    ) from None
  evaluator = Evaluator(config, apply, eval_sets)
  log(f"evaluating {workdir} at round {r}: {len(evaluator.sets)} sites x {evaluator.images_per_site()} held-out images")
  if getattr(data, "untested", None):  # a run trained before such datasets were refused
    log(
      f"note: training site(s) {data.untested} have no test split in the dataset now: no row for them, and the mean "
      "over training sites leaves them out"
    )
  if source == "synthetic" and len(sites) < config.num_clients:
    log(
      f"note: the first {len(sites)} of the {config.num_clients} training sites and the unseen one, as training "
      f"evaluated them (config.eval.max_sites={config.eval.max_sites})"
    )
  # a personalised run's training sites: each with its client's personal model, as training scored them (a
  # client never trained: the global model, as training does)
  algorithm = (config.get("algorithm") or {}).get("name")
  personalised = algorithm in PERSONAL_ALGORITHMS and source == "synthetic"
  if global_model and not personalised:
    raise EvalError(
      f"--global_model: {workdir} holds no personal models (config.algorithm.name={algorithm!r}"
      f"{'' if source == 'synthetic' else ' on ' + source}); every site is scored with the global model already: "
      "leave the flag out"
    )
  site_params = {} if global_model else {data.site_names[i]: personal[i] for i in sites if i in personal}
  models = {site: "personal" if site in site_params else "global" for site in evaluator.sets}
  if global_model:
    log(
      f"note: a {algorithm} run scored with the global (server) model on every site (--global_model); "
      "training's metrics.jsonl scored each training site with its client's personal model"
      + (", and FedBN's server model keeps its initial normalisation layers" if algorithm == "fedbn" else "")
    )
  elif personalised:
    never = [data.site_names[i] for i in sites if i not in personal]
    log(
      f"note: a {algorithm} run: each training site is scored with its client's personal model, as training "
      "scored it"
      + (f" ({', '.join(never)}: the global model, its client never trained)" if never else "")
      + "; the unseen site with the global model (--global_model: every site with the global model)"
    )
  try:
    results, preds = evaluator.detailed_metrics(params, spacing_mm, site_params)
    log("robustness curves (noise, blur, contrast loss, downscaling) ...")
    rob = evaluator.robustness(params, site_params=site_params)
  except NonFiniteOutput as e:
    raise EvalError(
      f"round {r} of {workdir}: {e}; evaluate an earlier round with --round=R, or train again with a lower "
      "learning rate"
    ) from None
  # everything computed: the files are written into a hidden folder in ``out``, then renamed into place in a row
  # that Ctrl-C and SIGTERM wait for, so an interrupted or failed evaluation leaves the earlier one's files as
  # they were (never tables of one round beside curves of another)
  staging = os.path.join(out, f"{STAGING_PREFIX}{os.getpid()}")
  _remove_stale_staging(out)
  os.makedirs(staging, exist_ok=True)
  try:
    report.write_eval_tables(
      results,
      staging,
      r,
      spacing_mm=spacing_mm,
      unseen=data.unseen_name,
      images_per_site={site: len(images) for site, (images, _) in evaluator.sets.items()},
      models=models,
    )
    if frames:
      size = next(iter(preds.values())).shape[1]
      pic = report.grid(evaluator.sets, frames, max(1, -(-128 // size)), data.unseen_name, preds=preds)
      pic.save(os.path.join(staging, "predictions.png"))
    report.write_text(os.path.join(staging, "robustness.json"), json.dumps(rob, indent=2))
    report.robustness_plot(rob, os.path.join(staging, "robustness.png"))
    with preemption.held_signals():
      for name in OUTPUT_FILES:
        if os.path.exists(os.path.join(staging, name)):
          os.replace(os.path.join(staging, name), os.path.join(out, name))
        elif os.path.exists(os.path.join(out, name)):  # an earlier evaluation's frames (--frames=0 now)
          os.remove(os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  log(report.eval_table(results, data.unseen_name))
  log(f"(hd95, assd, tip_error in {'mm' if spacing_mm != 1.0 else 'px'}; means over images where defined)")
  pictures = (
    "predictions.png (per frame: image | ground truth | prediction; the legend in the picture), " if frames else ""
  )
  log(f"wrote {out}: eval.json, eval.csv, {pictures}robustness.json, robustness.png")
  return {"round": r, "results": results, "robustness": rob, "out": out}


if __name__ == "__main__":  # a library module; the command is fedkd.eval
  print(
    "fedkd: error: fedkd.evaluate is the library behind the command; run python -m fedkd.eval --workdir=W",
    file=sys.stderr,
  )
  sys.exit(2)
