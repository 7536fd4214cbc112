"""FedEFM end to end: federated foundation pretraining across silos whose data types (do not)
overlap, then a student fine-tuned on a small set from an unseen hospital, for every method and seed,
plus the unseen-label-% ablation; writes results.md / results.csv (mean +- sample std over seeds, as
fedkd.report writes every table).

Silo data (``fedkd.data.silos``): six pretraining sources (hospital profile x labelled structures).
  Label space of the foundation: background, catheter, guidewire, vessel. At x % unseen each silo holds
  ``partition.unseen_label_corpus`` 's type set (100 % = its home source only, 0 % = all sources).
Foundation endpoint (``pretrain.objective``): segmentation -> mean Dice over source x labelled class on
  held-out images of every source; source -> source-classification accuracy (pooled tokens -> linear head).
Downstream: the held-out hospital profile (``unseen_mobile_c_arm``), catheter+guidewire labels,
``downstream.train_examples`` images; scored on ``downstream.test_examples`` held-out images.

Methods: scratch (no foundation), centralized (all silos' data pooled, one model, same images),
fedavg (CFL), ring and matcha (DFL gossip without distillation), moon (CFL + model-contrastive loss),
fedefm (overseas experts + EMD-weighted multishot distillation, then ``fedefm.mixing``), fedefm_dfl
(the same with gossip), and the controls fedefm_uniform (uniform neighbour weights), fedefm_e0
(expert_steps = 0: KD to the silo's own round-start model), fedavg_matched (FedAvg with FedEFM's
gradient compute per round) and fedprox (a proximal pull to the round's model).
Each finished (percent, method, kd, seed) is appended to results_raw.jsonl; re-running the same
command skips finished entries.

In-run checkpoints: every ``checkpoint.every`` pretraining rounds, at the last round, and when a stop
is requested (SIGTERM / Ctrl-C through ``stop``), the state a pretraining run carries between rounds
(stacked silo models ``params``, each silo's trained model ``prev`` for MOON; the round and its
metrics as JSON) is saved with orbax under ``<workdir>/checkpoints/<foundation key>/<round>/``, the
key being ``u<unseen %>_<method>_seed<seed>`` (one foundation serves its plain and its +KD fine-tune).
A re-run resumes inside that pretraining run; the folder is deleted once every result that uses the
foundation is in results_raw.jsonl. Nothing else carries state between rounds: the silo optimisers
start fresh each round, the round programs draw no random numbers, and round r's batches (and MATCHA's
mixing matrix) are functions of (seed, r) only, so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from etils import epath

from fedkd import checkpoint as ckpt_lib
from fedkd import report, streams
from fedkd.config import (
  FEDEFM_DISTILL,
  FEDEFM_FOLLOW_MIXING,
  FEDEFM_GOSSIP,
  FEDEFM_METHODS,
  ConfigError,
  _csv,
  flat_dict,
  ran_as,
  unread_by_both,
  unused_keys,
  validate_fedefm,
  value_at,
)
from fedkd.data.silos import TARGET, SiloData
from fedkd.distill import emd as emd_lib
from fedkd.distill import fedefm as fedefm_lib
from fedkd.distill.losses import feature_kd, masked_kd_kl
from fedkd.errors import DivergedError, first_names, reason
from fedkd.evaluate import foreground_classes, overlap_scores
from fedkd.fl import engine, topology
from fedkd.fl.algorithm import ClientContext
from fedkd.logs import BadJsonLine, is_count, is_finite_number, json_lines
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_model, make_predictor
from fedkd.models.transfer import load_encoder
from fedkd.preemption import Stopped
from fedkd.sharding import client_mesh, replicate, shard_clients
from fedkd.tasks.kept import Kept
from fedkd.workdir import read_json_object, write_atomic

METHODS = FEDEFM_METHODS  # foundations compared (names kept in fedkd.config, a leaf)
DISTILL = FEDEFM_DISTILL  # methods that distil from overseas experts (after the warm-up rounds)
# Methods whose silos mix by gossip over the topology (DFL); "fedefm" and its controls with FedEFM's
# update (uniform weights, no experts) follow config.fedefm.mixing, so each control changes one ingredient.
GOSSIP = FEDEFM_GOSSIP
# the largest step scale stochastic gradient-push may give a silo (1 / its push-sum weight) before a run is refused
MAX_STEP_SCALE = 1e6
FOLLOW_MIXING = FEDEFM_FOLLOW_MIXING
# config key -> its name among the pretraining round's traced inputs (the engine's ``hparams``): the KD
# weight, KD temperature, learning rates and the silos' weight decay. Experiments that differ only in these
# share one compiled round (``fedkd.main --replica_config=fedefm.beta=0.3,0.5,0.7``: one process, one compile
# per method).
ROUND_HPARAMS = {
  "fedefm.beta": "beta",
  "fedefm.temperature": "temperature",
  "pretrain.learning_rate": "learning_rate",
  "pretrain.expert_learning_rate": "expert_learning_rate",
  "pretrain.weight_decay": "weight_decay",
}
SEG_LOSS = ml_collections.ConfigDict(dict(name="dice_ce", ce_weight=0.5, dice_weight=0.5))
RESULT_KEYS = (
  "unseen_percent",
  "method",
  "teacher_kd",
  "seed",
  "dice/catheter",
  "dice/guidewire",
  "iou/catheter",
  "iou/guidewire",
  "dice/mean",
)
SCORES = ("dice/catheter", "iou/catheter", "dice/guidewire", "iou/guidewire", "dice/mean")  # of each setting


def _finite_or_none(v: float) -> float | None:
  return v if math.isfinite(v) else None


def _cost_cell(v) -> str:
  """A cost column's cell: empty where the cost is unknown (null, or NaN in records written before null)."""
  return str(v) if report.is_finite_number(v) else ""


def _score_key(k: str) -> bool:
  """Whether a top-level key of a results_raw.jsonl record is a number the tables or contrasts read."""
  return k in RESULT_KEYS[4:] or k in ("foundation", "seconds") or re.match(r"(n\d+|probe)/", k) is not None


# Config groups that do not change any number in the results: a workdir's results and checkpoints
# stay valid when only these differ.
FREE_KEYS = ("experiment", "checkpoint", "log_every")
PROCESS_KEYS = ("engine.host_memory",)  # how this process holds memory: no number depends on it
# ... and those a finished foundation does not depend on: a foundation of another workdir whose config
# differs only here is reused (config.experiment.foundations_from).
DOWNSTREAM_KEYS = ("downstream", "student")
FT_CHUNK = 100  # fine-tuning steps between NaN checks and stop checks


def _print(msg: str) -> None:
  print(msg, flush=True)


def load_adjacency(c) -> np.ndarray:
  """Bool [N, N] neighbour graph of ``config.fedefm.topology`` (no self loops; directed for gaia_ring
  and for file:<path> with config.fedefm.directed); ConfigError else."""
  n, topo = c.pretrain.num_silos, c.fedefm.topology
  if c.fedefm.directed and not (isinstance(topo, str) and topo.startswith("file:")):
    raise ConfigError(  # else silently ignored: ring, complete and gaia are undirected, gaia_ring directed
      f"config.fedefm.directed=True applies to file:<path> topologies only, not to topology={topo!r} (ring, "
      "complete and gaia are undirected, gaia_ring is directed); list the directed links in a file, or drop it"
    )
  try:
    if topo == "ring":
      adj = topology.ring(n) > 0
    elif topo == "complete":
      adj = topology.complete(n) > 0
    elif topo == "gaia":
      adj = topology.gaia_adjacency()[:n, :n] > 0
    elif topo == "gaia_ring":
      adj = topology.gaia_ring_adjacency(directed=True)
    elif isinstance(topo, str) and topo.startswith("file:"):
      adj = topology.from_file(topo[5:], directed=bool(c.fedefm.directed)) > 0
    else:
      raise ConfigError(f"config.fedefm.topology={topo!r}: use ring, complete, gaia, gaia_ring or file:<path>")
  except ConfigError:
    raise
  except (OSError, ValueError) as e:  # TopologyError is a ValueError
    raise ConfigError(f"config.fedefm.topology={topo!r} does not load: {str(e).splitlines()[0]}") from None
  if adj.shape[0] != n:
    raise ConfigError(
      f"config.fedefm.topology={topo!r} has {adj.shape[0]} nodes but config.pretrain.num_silos="
      f"{n}; give a topology with {n} nodes or set --config.pretrain.num_silos={adj.shape[0]}"
    )
  adj = adj.copy()
  np.fill_diagonal(adj, False)
  try:  # a directed file that one silo's models never reach (a chain 0 -> 1 -> 2) would train apart
    topology.check_strongly_connected(adj, f"config.fedefm.topology={topo!r}")
  except topology.TopologyError as e:
    raise ConfigError(str(e)) from None
  return adj


def validate(c) -> dict:
  """Checks every FedEFM setting before anything trains (``fedkd.config.validate_fedefm``, then the
  topology loads); returns the parsed lists and the topology's adjacency."""
  parsed = validate_fedefm(c, jax.device_count())
  if c.seed != 0:  # read nowhere: each seed of experiment.seeds draws the data, initialisation and batches
    raise ConfigError(
      f"config.seed={c.seed} is not used by FedEFM, which runs the seeds config.experiment.seeds="
      f"{c.experiment.seeds!r}; set --config.experiment.seeds={c.seed} instead (and leave config.seed at 0)"
    )
  planned = parsed["methods"] + (parsed["ablation_methods"] if parsed["percents"] else [])
  distilling = [m for m in DISTILL if m in planned]
  if distilling and c.fedefm.warmup_rounds >= c.pretrain.num_rounds:  # else silently the warm-up baseline
    raise ConfigError(
      f"config.fedefm.warmup_rounds={c.fedefm.warmup_rounds} leaves no distilling round of "
      f"config.pretrain.num_rounds={c.pretrain.num_rounds}: {', '.join(distilling)} would never distil (only "
      f"plain warm-up rounds); set --config.fedefm.warmup_rounds below {c.pretrain.num_rounds} or raise "
      "config.pretrain.num_rounds"
    )
  d = c.downstream
  beyond = [n for n in scarce_sizes(d) if n > d.train_examples]
  if beyond:  # else an "nN" column would train on more target images than the full budget
    raise ConfigError(
      f"config.downstream.scarce_examples={d.scarce_examples!r} lists {', '.join(map(str, beyond))}, more than "
      f"config.downstream.train_examples={d.train_examples}: the scarce-data curve trains on the first n of the "
      f"training images; list sizes <= {d.train_examples} or raise config.downstream.train_examples"
    )
  if "fedefm.topology" in unused_keys(c):  # no planned method reads it (its note says so): not loaded
    n = c.pretrain.num_silos
    parsed["adjacency"] = ~np.eye(n, dtype=bool)
  else:
    parsed["adjacency"] = load_adjacency(c)
  alone = np.flatnonzero(~parsed["adjacency"].any(1))
  if distilling and len(alone):  # only with one silo: loaded topologies connect every silo
    raise ConfigError(
      f"config.pretrain.num_silos={c.pretrain.num_silos}: silo {int(alone[0])} has no neighbour on "
      f"config.fedefm.topology={c.fedefm.topology!r}, so {', '.join(distilling)} would distil from nobody (the KD "
      "term is 0); use at least 2 silos, or only methods that do not distil"
    )
  return parsed


def results_config(config_json: dict) -> dict:
  """The part of a config (as JSON) that the numbers in a workdir depend on."""
  return {k: v for k, v in config_json.items() if k not in FREE_KEYS}


def config_difference(saved: dict, current: dict, ignore: tuple = (), pooled: bool = False) -> str | None:
  """Where two configs' results parts differ, not counting the top-level keys ``ignore``, as a phrase for an
  error: ``config.<dotted key> differs`` (the first in sorted order), or where ``saved`` lacks a key of
  :data:`fedkd.config.ADDED_KEYS` that ``current`` does not hold at the value its runs ran with, how to
  continue them; None if equal. ``pooled``: two saved configs (neither is the current one; the same answer in
  either order): each that lacks an added key stands at the value its own runs ran with."""
  unread = unread_by_both(saved, current) | set(PROCESS_KEYS)  # keys no number of the runs depends on
  a, b = (
    {k: v for k, v in flat_dict(results_config(d)).items() if k.split(".")[0] not in ignore and k not in unread}
    for d in (saved, current)
  )
  if pooled:
    b.update(ran_as(b, a))
    a.update(ran_as(a, b))
  for k, old in ran_as(a, b).items():
    if b[k] != old:
      return f"config.{k} differs: written before the key existed, it ran as {old!r} (--config.{k}={old})"
    a[k] = old
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return f"config.{diff[0]} differs" if diff else None


def _summary_problem(m: dict, r: int) -> str | None:
  """What in a checkpoint's pretraining summary (what :meth:`Experiment.pretrain` carries on from after round
  ``r``) is not what a run writes, or None: the foundation curve (rounds up to ``r`` with their scores), the
  per-round EMD weights, the transfer count, the largest EMD marginal error."""
  curve = m.get("curve")
  if not isinstance(curve, list) or not all(
    isinstance(p, dict) and is_count(p.get("round")) and 0 < p["round"] <= r and is_finite_number(p.get("foundation"))
    for p in curve
  ):
    return "'curve' is not a list of {round, foundation} scores"
  if not isinstance(m.get("w"), list):
    return "'w' is not a list of EMD weights"
  if not is_finite_number(m.get("transfers")) or m["transfers"] < 0:
    return f"'transfers' is {m.get('transfers')!r}, not a count"
  if "emd_error_max" in m and not is_finite_number(m["emd_error_max"]):
    return f"'emd_error_max' is {m['emd_error_max']!r}, not a number"
  return None


def foundation_of(stacked_params):
  """The foundation (mean of the silo models) of silo-sharded parameters, averaged on one device (a
  device-to-device copy, no trip through the host): an eager mean across several CPU devices
  (``--cpu_devices=2``) deadlocked in XLA's all-reduce rendezvous. On one device the copy is a no-op and
  the numbers are bitwise those of the plain mean."""
  return fedefm_lib.mean_model(jax.device_put(stacked_params, jax.local_devices()[0]))


def foundation_key(percent: float, method: str, seed: int) -> str:
  """Folder name of a pretraining run's checkpoints (shared by its plain and +KD fine-tunes)."""
  return f"u{percent:g}_{method}_seed{seed}"


ENCODER = {"transunet": ("encoder",), "unet": ("enc", "mid")}  # top-level parameter groups of the encoder


def in_encoder(path, model_name: str) -> bool:
  """Whether a parameter (its key path) belongs to the model's encoder (``ENCODER``)."""
  return bool(path) and str(getattr(path[0], "key", path[0])) in ENCODER[model_name]


def transfer_encoder(student_params, foundation, model_name: str):
  """Loads the foundation's encoder into the student: TransUNet ``encoder``; UNet ``enc`` + ``mid``."""
  if model_name == "unet":
    for group in ENCODER["unet"]:
      student_params, _ = load_encoder(student_params, foundation, prefix=(group,), require=())
    return student_params
  return load_encoder(student_params, foundation)[0]


def weight_spread(w, adjacency) -> float:
  """One round's spread of the neighbour weights w [silos, J] (J padded in-neighbour slots): the root mean
  square, over every silo's real neighbours, of a weight minus that silo's mean weight (uniform weights: 0;
  with every silo's weights summing to 1 on a regular graph, the std over silos x neighbours)."""
  _, mask = topology.neighbour_table(adjacency)
  w = np.asarray(w, np.float64)
  mean = np.sum(np.where(mask, w, 0.0), 1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
  dev = (w - mean)[mask]
  return float(np.sqrt(np.mean(dev**2))) if dev.size else 0.0


def scarce_sizes(d) -> list[int]:
  """downstream.scarce_examples as a list of image counts (validated by fedkd.config)."""
  return [int(v) for v in _csv(d.scarce_examples)]


def kd_scales(d) -> list[float]:
  """downstream.kd_scales as a list of KD loss scales (validated by fedkd.config)."""
  return [float(v) for v in _csv(d.kd_scales)]


def save_foundation(path: str, params, summary: dict) -> None:
  """A finished foundation (parameters + its pretraining summary) as one .npz, written atomically."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = {f"p{i}": np.asarray(a) for i, (_, a) in enumerate(leaves)}
  arrays["paths"] = np.asarray([jax.tree_util.keystr(k) for k, _ in leaves])
  arrays["summary"] = np.asarray(json.dumps(summary))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load_foundation(path: str, like):
  """(params shaped as ``like``, summary) from :func:`save_foundation`'s file; ConfigError when the file
  is damaged or holds another model."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  try:
    with np.load(path, allow_pickle=False) as z:
      paths = [str(k) for k in z["paths"]]
      want = [jax.tree_util.keystr(k) for k, _ in leaves]
      if paths != want:
        raise ValueError("its parameter names differ from this config's model")
      out = [z[f"p{i}"] for i in range(len(leaves))]
      summary = json.loads(str(z["summary"]))
    for (k, a), b in zip(leaves, out):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
          f"{jax.tree_util.keystr(k)} is {b.dtype}{list(b.shape)}, the model's is {a.dtype}{list(a.shape)}"
        )
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ConfigError(
      f"{path} is unreadable or of another model ({reason(e, 160)}); delete it (that "
      "foundation is pretrained again) or use a new --workdir"
    ) from None
  return jax.tree_util.tree_unflatten(treedef, out), summary


@jax.jit
def _finite_rows(tree) -> jax.Array:
  """Bool [n]: every parameter of stacked model i is finite."""
  return jnp.stack([jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1) for a in jax.tree.leaves(tree)]).all(0)


# Models, jitted programs and held-out sets shared by every Experiment in this process whose config gives the
# same key (a re-run, a resumed run, tests): each program compiles once.
PROGRAMS = Kept(64)


def opts_distill(alg) -> bool:
  return bool(alg.opts.distill and alg.opts.expert_steps > 0)


def _json(tree) -> str:
  return json.dumps(tree.to_dict() if isinstance(tree, ml_collections.ConfigDict) else tree, sort_keys=True)


def _build_model(m, image_size: int):
  try:
    apply, apply_wf, params = init_model(m, 0)
    jax.eval_shape(apply_wf, params, jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32))
  except (ValueError, TypeError, AssertionError, ZeroDivisionError) as e:
    raise ConfigError(
      f"config.teacher / config.student: the model {m.name} cannot be built ({reason(e)}); fix its sizes"
    ) from None
  return apply, apply_wf


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return (
    f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if seconds >= 3600
    else f"{seconds // 60}:{seconds % 60:02d}"
  )


class Experiment:
  def __init__(self, c, workdir: str, log: Callable[[str], None] = _print, stop=None):
    """``stop``: a ``fedkd.preemption.StopSignals`` (or anything with ``reason`` and
    ``requested(step)``), asked after every pretraining round, every ``FT_CHUNK`` fine-tuning steps
    and between runs; None = never stop."""
    self.c, self.workdir, self.log, self.stop = c, os.path.expanduser(workdir), log, stop
    report.code_version()  # the commit this process loaded, before a long run (environment.json reports it)
    self.parsed = validate(c)
    self.cfg_json = ckpt_lib.config_json(c)
    self.adj = self.parsed["adjacency"]
    # undirected: Metropolis-Hastings; balanced digraph: doubly stochastic; else push-sum (column-stochastic A)
    self.gossip_w, self.push_sum = topology.directed_mixing(self.adj)
    # stochastic gradient-push scales a silo's local steps by 1 / its push-sum weight: the largest over the run
    self.step_scale_peak = None
    ablated = self.parsed["ablation_methods"] if self.parsed["percents"] else []
    if any(self._gradient_push(m) for m in [*self.parsed["methods"], *ablated]):
      self.step_scale_peak = topology.push_sum_peak_scale(self.gossip_w, c.pretrain.num_rounds)
      scale, silo, mixed = self.step_scale_peak
      if not scale <= MAX_STEP_SCALE:
        raise ConfigError(
          f"config.fedefm.topology={c.fedefm.topology!r} is a directed graph on which silo {silo}'s push-sum "
          f"weight falls to {1 / scale:.3g} by round {mixed + 1}, so stochastic gradient-push would scale its "
          f"local steps by {scale:.3g}x (more than {MAX_STEP_SCALE:.0e}x; no learning rate trains that): give "
          "that silo more in-edges (a balanced digraph mixes without push-sum), or set "
          "config.fedefm.gradient_push=False"
        )
    self.data = SiloData(c)
    self.seg_loss = make_segmentation_loss(SEG_LOSS)
    self._teacher_key = ("model", _json(c.teacher), c.image_size)
    self._student_key = ("model", _json(c.student), c.image_size)
    n = c.pretrain.num_silos
    self.mesh = client_mesh(c.mesh.client_devices or int(np.gcd(n, jax.device_count())))
    self.mesh1 = client_mesh(1)
    self._stop_checks = 0
    self._from: list[str] = []  # config.experiment.foundations_from and the workdirs it reused from, checked
    self._chain_notes: list[str] = []  # why the walk along those workdirs stopped early (_reusable_from)
    self._checked = None  # (finished runs, checkpoints in progress, results repair) of the last check_workdir()
    self._models = False

  def build_models(self) -> None:
    """The teacher and student (a ConfigError when they cannot be built); run() calls it after the
    workdir checks, before anything trains."""
    if self._models:
      return
    c = self.c
    self.t_apply, self.t_apply_wf = PROGRAMS.get(self._teacher_key, lambda: _build_model(c.teacher, c.image_size))
    self.s_apply, self.s_apply_wf = PROGRAMS.get(self._student_key, lambda: _build_model(c.student, c.image_size))
    # The pretrained model: the teacher, plus (objective "source") a linear head on its pooled tokens.
    if c.pretrain.objective == "source":
      net_apply_wf = self.t_apply_wf

      def f_apply_wf(p, x):
        _, tokens = net_apply_wf(p["net"], x)
        t = tokens.astype(jnp.float32)
        axes = tuple(range(1, t.ndim - 1))  # mean and std over the token grid: content and texture
        pooled = jnp.concatenate([jnp.mean(t, axes), jnp.std(t, axes)], axis=-1)
        return pooled @ p["head"]["w"] + p["head"]["b"], tokens

      self.f_apply_wf = f_apply_wf
      self.f_loss = lambda logits, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    else:
      self.f_apply_wf, self.f_loss = self.t_apply_wf, self.seg_loss
    apply_wf = self.f_apply_wf
    self.f_predict = PROGRAMS.get(
      ("f_predict", self._teacher_key, c.pretrain.objective, self.data.num_sources, c.eval.batch_size),
      lambda: make_predictor(lambda p, x: apply_wf(p, x)[0], c.eval.batch_size),
    )
    # compiled once for all runs
    self.predict = PROGRAMS.get(
      ("predict", self._student_key, c.eval.batch_size), lambda: make_predictor(self.s_apply, c.eval.batch_size)
    )
    self._models = True

  def _stop_requested(self) -> bool:
    """``stop.requested`` with a step id that only grows (multi-process preemption sync points need
    that, and every process asks at the same places)."""
    if self.stop is None:
      return False
    self._stop_checks += 1
    return bool(self.stop.requested(self._stop_checks))

  def _stopped(self, round_: int, what: str) -> Stopped:
    return Stopped(round_, getattr(self.stop, "reason", None) or "preempted", what=what)

  # ------------------------------------------------------------------ pretraining

  def _mixing(self, method: str) -> str:
    if method in GOSSIP or (method in FOLLOW_MIXING and self.c.fedefm.mixing == "dfl"):
      return "dfl"
    return "cfl"

  def _gossips_by_push_sum(self, method: str) -> bool:
    """Whether ``method`` gossips by push-sum (an unbalanced digraph; MATCHA mixes over the complete graph)."""
    return self.push_sum and self._mixing(method) == "dfl" and method != "matcha"

  def _gradient_push(self, method: str) -> bool:
    """Whether ``method`` gossips by push-sum with its silos' steps scaled by 1 / their push-sum weights
    (stochastic gradient-push; config.fedefm.gradient_push)."""
    return self._gossips_by_push_sum(method) and self.c.fedefm.gradient_push

  def _options(self, method: str, distill: bool) -> fedefm_lib.FedEFMOptions:
    f = self.c.fedefm
    mixing = self._mixing(method)
    return fedefm_lib.FedEFMOptions(
      distill=distill,
      beta=f.beta,
      temperature=f.temperature,
      expert_steps=0 if method == "fedefm_e0" else f.expert_steps,
      emd_epsilon=f.emd_epsilon,
      emd_marginals=f.emd_marginals,
      emd_iters=f.emd_iters,
      emd_debias=f.emd_debias,
      weight_mode="uniform" if method == "fedefm_uniform" else f.weight_mode,
      weight_temperature=f.weight_temperature,
      detach_weights=f.detach_weights,
      mixing=mixing,
      moon_mu=f.moon_mu if method == "moon" else 0.0,
      moon_tau=f.moon_tau,
      prox_mu=f.prox_mu if method == "fedprox" else 0.0,
    )

  def _engine_options(self, method: str) -> engine.EngineOptions:
    e = self.c.engine
    per_shard = 1 if method == "centralized" else self.c.pretrain.num_silos // self.mesh.size
    layout = e.client_layout
    if layout == "auto" and jax.default_backend() == "cpu":
      # an experiment compiles one round program per method, each used for ~60 rounds: on CPU vmap
      # compiles ~4x faster than the engine's CPU choice (unroll) at about the same time per round
      # (runlocal: FedEFM round 31 s vs 117 s to compile, ~1.0 s per round each; docs/fedefm.md)
      layout = "vmap"
    return engine.resolve(
      layout,
      e.conv_lowering,
      "auto",
      model=self.c.teacher.name,
      clients_per_shard=per_shard,
      client_chunk=e.client_chunk,
    )

  def hparams(self) -> dict:
    """{engine name: value} of :data:`ROUND_HPARAMS`: this config's values of the pretraining round's
    traced inputs."""
    return {name: float(value_at(self.c, key)) for key, name in ROUND_HPARAMS.items()}

  def _program(self, method: str, distill: bool):
    """(round function, rebuild) for ``method``: the engine's ``(server, rows, batch, weights, W,
    hparams) -> (server, rows, metrics)`` with the silo models as rows
    (:class:`fedkd.distill.fedefm.FedEFMSilo`); ``rebuild(hparams) -> (algorithm, client context)``
    from :meth:`hparams` (numbers, or the round's traced scalars)."""
    # Keyed by what the program computes: methods with the same options (fedavg and FedEFM's warm-up
    # rounds, ring and matcha) share one compiled program; the KD weight, KD temperature, learning
    # rates and weight decay are inputs (ROUND_HPARAMS), so Experiments that differ only in them share it too.
    opts = dataclasses.replace(self._options(method, distill), beta=0.0, temperature=1.0)
    mesh = self.mesh1 if method == "centralized" else self.mesh
    eopts = self._engine_options(method)
    key = ("round", self._teacher_key, self.c.pretrain.objective, self.data.num_sources, opts, mesh.size, eopts)

    def build():
      apply_wf, f_loss = self.f_apply_wf, self.f_loss

      def rebuild(hp):
        tx = optax.adamw(hp["learning_rate"], weight_decay=hp["weight_decay"])
        ctx = ClientContext(lambda q, x: apply_wf(q, x)[0], f_loss, tx, apply_wf=apply_wf)
        silo = dataclasses.replace(opts, beta=hp["beta"], temperature=hp["temperature"])
        return fedefm_lib.FedEFMSilo(silo, optax.adam(hp["expert_learning_rate"])), ctx

      alg, ctx = rebuild(self.hparams())  # the aggregator; every round passes its hparams
      return engine.make_round_fn(alg, ctx, mesh, eopts, rebuild=rebuild), rebuild

    return PROGRAMS.get(key, build)

  def _round_fn(self, method: str, distill: bool):
    return self._program(method, distill)[0]

  def init_foundation(self, seed: int):
    """The pretrained model's initial parameters: the teacher's, plus the source head (objective source)."""
    _, _, params = init_model(self.c.teacher, seed)
    if self.c.pretrain.objective != "source":
      return params
    feats = jax.eval_shape(
      self.t_apply_wf, params, jax.ShapeDtypeStruct((1, self.c.image_size, self.c.image_size, 1), jnp.float32)
    )[1]
    dim, k = 2 * feats.shape[-1], self.data.num_sources  # pooled mean and std of the tokens
    w = jax.random.normal(jax.random.key(seed + 77), (dim, k), jnp.float32) / np.sqrt(dim)
    return {"net": params, "head": {"w": w, "b": jnp.zeros((k,), jnp.float32)}}

  def client_flops(self, method: str, distill: bool) -> float:
    """FLOPs of one silo's round (local training; for distilling methods also its overseas experts and
    the EMD solves, every Sinkhorn iteration), from XLA's cost analysis of that silo's part of the round
    program with the local steps and the Sinkhorn loops unrolled."""
    c, p = self.c, self.c.pretrain
    steps = p.local_steps * (self._matched_factor() if method == "fedavg_matched" else 1)
    # the count depends on the options' structure, not on the KD weight or temperature's values
    opts = dataclasses.replace(self._options(method, distill), beta=0.0, temperature=1.0)
    key = ("flops", self._teacher_key, p.objective, self.data.num_sources, opts, steps)

    def measure():
      alg, ctx = self._program(method, distill)[1](self.hparams())
      # local and expert steps and Sinkhorn loops unrolled: XLA's cost analysis counts a loop body once,
      # whatever its trip count
      ctx = dataclasses.replace(ctx, unroll=True)
      h = c.image_size
      params = self.init_foundation(0)
      row = alg.init_row(params)
      x = jax.ShapeDtypeStruct((steps, p.batch_size, h, h, 1), jnp.float32)
      ys = (steps, p.batch_size) if p.objective == "source" else (steps, p.batch_size, h, h)
      y = jax.ShapeDtypeStruct(ys, jnp.int32)
      j = max(int(self.adj.sum(1).max()), 1)
      batch = {
        "x": x,
        "y": y,
        "nbr": jax.ShapeDtypeStruct((j,), jnp.int32),
        "nbr_mask": jax.ShapeDtypeStruct((j,), bool),
      }
      n = p.num_silos
      gathered = None
      if opts_distill(alg):
        k = alg.opts.expert_steps
        gathered = {
          "x": jax.ShapeDtypeStruct((n, k) + x.shape[1:], jnp.float32),
          "y": jax.ShapeDtypeStruct((n, k) + ys[1:], jnp.int32),
        }
      server = {"round": jax.ShapeDtypeStruct((), jnp.int32)}
      fn = jax.jit(lambda row, batch, gathered: alg.client(ctx, server, row, batch, gathered).upload)
      with emd_lib.counting_every_iteration():
        cost = fn.lower(row, batch, gathered).cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float((cost or {}).get("flops", float("nan")))

    return PROGRAMS.get(key, measure)

  def _matched_factor(self) -> int:
    """fedavg_matched's local-steps multiplier: config.fedefm.matched_steps_factor, or (0) FedEFM's
    per-silo round gradient FLOPs over FedAvg's, rounded (at least 1)."""
    f = int(self.c.fedefm.matched_steps_factor)
    if f:
      return f
    # gradient compute: FedEFM's experts + student steps with the experts' forward passes, without the
    # EMD solves (fedefm_uniform's program), over FedAvg's
    ratio = self.client_flops("fedefm_uniform", True) / self.client_flops("fedavg", False)
    return max(1, int(round(ratio))) if np.isfinite(ratio) else 1

  def checkpoint_dir(self, method: str, percent: float, seed: int, folder: str = "") -> str:
    """The in-run checkpoints of a pretraining run; ``folder=ckpt_lib.UNREADABLE``: where its resumes set aside
    the steps they fell back over (outside the run's folder, which is deleted once its foundation is saved)."""
    return os.path.join(self.workdir, "checkpoints", folder, foundation_key(percent, method, seed))

  def _load(self, ckpt: ckpt_lib.Checkpointer, r: int, like: dict):
    """Everything pretraining needs from the checkpoint of round ``r`` (raises CheckpointError when it
    is damaged, ResumeRefused when it belongs to another config)."""
    diff = config_difference(ckpt.saved_config(r), self.cfg_json)
    if diff:
      raise ckpt_lib.ResumeRefused(
        f"the checkpoint for round {r} in {ckpt.directory} was written with another config ({diff}); "
        "use a new --workdir, or the original config (only config.experiment, config.checkpoint "
        "and config.log_every may change)"
      )
    data = ckpt.saved_data_state(r)
    if data.get("round") != r or not isinstance(data.get("metrics"), dict):
      raise ckpt_lib.CheckpointError(
        f"checkpoint for round {r} in {ckpt.directory} holds no FedEFM pretraining state (no round metrics)"
      )
    problem = _summary_problem(data["metrics"], r)
    if problem:  # a damaged step: restore_latest falls back to the one before
      raise ckpt_lib.CheckpointError(f"checkpoint for round {r} in {ckpt.directory} is damaged: its metrics' {problem}")
    state, _ = ckpt.restore(r, like)
    return state, data

  def _check_finite(self, label: str, r: int, method: str, metrics, state, last_saved) -> None:
    """DivergedError (before anything of this state is saved) when round ``r`` made NaN/Inf."""
    losses = np.asarray(metrics["loss"], np.float64).reshape(-1)
    finite = np.asarray(_finite_rows(state["params"]))
    if np.isfinite(losses).all() and finite.all():
      return
    bad, what = np.flatnonzero(~np.isfinite(losses)), "loss"
    if not len(bad):
      bad, what = np.flatnonzero(~finite), "model"
    who = (
      "the centralized model"
      if method == "centralized"
      else f"silo{'s' if len(bad) > 1 else ''} {', '.join(str(int(i)) for i in bad)} of {len(losses)}"
    )
    p = self.c.pretrain
    kept = f"the last checkpoint kept is round {last_saved}" if last_saved else "no checkpoint of this run was saved"
    # the overseas experts take their own step (DISTILL methods): blame the larger of the two rates
    key, lr = "learning_rate", p.learning_rate
    if method in DISTILL and p.expert_learning_rate > p.learning_rate:
      key, lr = "expert_learning_rate", p.expert_learning_rate
    other = "expert_learning_rate" if key == "learning_rate" else "learning_rate"
    raise DivergedError(
      f"{label}: pretraining diverged at round {r}: the {what} of {who} is NaN/Inf ({kept}); likely cause: "
      f"config.pretrain.{key}={lr:g} is too high (config.pretrain.{other}={getattr(p, other):g}); lower it, "
      f"e.g. --config.pretrain.{key}={lr / 10:g}, and use a new --workdir"
    )

  def round_data(self, method: str, types: np.ndarray, seed: int, r: int):
    """Round ``r``'s inputs and labels of every silo, [silos, steps, batch, ...]: segmentation masks or
    (objective source) source ids. fedavg_matched takes ``_matched_factor()`` times the local steps:
    draw k >= 1 of round r uses the round id r + k * 10**6 (a function of (seed, r) only)."""
    draws = self._matched_factor() if method == "fedavg_matched" else 1
    xs, ys = [], []
    for k in range(draws):
      rid = r + k * 10**6
      x, y = self.data.round_batches(types, seed, rid)
      if self.c.pretrain.objective == "source":
        y = jnp.asarray(self.data.round_sources(types, seed, rid), jnp.int32)
      xs.append(x)
      ys.append(y)
    return (xs[0], ys[0]) if draws == 1 else (jnp.concatenate(xs, 1), jnp.concatenate(ys, 1))

  def heldout(self, types: np.ndarray, seed: int):
    """The foundation endpoint's held-out set: ``eval.heldout_per_source`` images of every source any
    silo holds (balanced), never used in training: (images, masks, source ids)."""
    key = ("heldout", seed, self.c.eval.heldout_per_source, self.c.image_size, self.c.teacher.num_classes)
    x, y, src = PROGRAMS.get(key, lambda: self.data.heldout(seed, self.c.eval.heldout_per_source))  # one per seed
    keep = np.isin(np.asarray(src), np.unique(types))
    return x[keep], y[keep], np.asarray(src)[keep]

  def foundation_score(self, params, held) -> float:
    """The primary endpoint on the held-out set of every source: objective source -> accuracy (balanced
    set); segmentation -> mean over (source, labelled class) of the Dice pooled over that source's
    images (partial labels: only the classes a source labels are scored on it)."""
    x, y, src = held
    pred = np.asarray(self.f_predict(params, x))
    if self.c.pretrain.objective == "source":
      return float(np.mean(pred == src))
    y = np.asarray(y)
    scores = []
    for s_ in np.unique(src):
      sel = src == s_
      for k in self.data.labelled_classes(int(s_)):
        pk, gk = pred[sel] == k, y[sel] == k
        denom = pk.sum() + gk.sum()
        scores.append(1.0 if denom == 0 else 2.0 * np.logical_and(pk, gk).sum() / denom)
    if not scores:  # check_scorable refuses such a plan before training: reaching this is a bug
      raise ValueError(
        f"no (source, class) pair to score: sources {np.unique(src).tolist()} label no class of the "
        f"{self.c.teacher.num_classes}-class teacher"
      )
    return float(np.mean(scores))

  def _round_transfers(self, method: str, distill: bool, W: np.ndarray, nmask: np.ndarray) -> float:
    """Models sent + received per silo this round (mean over silos): CFL 2 (up, down); gossip: one per
    out- and per in-neighbour with a nonzero weight; overseas experts: 2 per neighbour (the model goes,
    the expert comes back; none for fedefm_e0, whose "experts" are the silo's own model); centralized: 0
    (its data are pooled instead)."""
    if method == "centralized":
      return 0.0
    if self._mixing(method) == "cfl":
      moves = np.full(W.shape[0], 2.0)
    else:
      off = (np.asarray(W) != 0) & ~np.eye(W.shape[0], dtype=bool)
      moves = off.sum(0) + off.sum(1)  # sent (column) + received (row)
    if distill and self._options(method, distill).expert_steps > 0:
      moves = moves + 2.0 * np.asarray(nmask).sum(1)
    return float(np.mean(moves))

  def pretrain(self, method: str, percent: float, seed: int, label: str | None = None):
    """Foundation parameters for ``method`` (teacher architecture; objective source: ``{"net", "head"}``)
    and the run's summary (last round's metrics, foundation curve, EMD weights, cost).

    Resumes from the run's newest intact checkpoint; saves every ``checkpoint.every`` rounds, at the
    last round, and when ``stop`` asks (then raises ``Stopped``)."""
    self.build_models()
    c, p = self.c, self.c.pretrain
    label = label or f"{percent:g}% unseen, {method}, seed {seed}"
    params0 = self.init_foundation(seed)
    types = self.data.silo_types(percent, seed)
    held = self.heldout(types, seed)
    n = 1 if method == "centralized" else p.num_silos
    mesh = self.mesh1 if method == "centralized" else self.mesh
    # Carried between rounds: the mixed models (next round's start) and each silo's trained model
    # (MOON's negative). The silo optimisers start fresh every round. Two separate buffers: the round
    # donates both (one array in two places is "donate the same buffer twice" where MOON reads prev).
    state = shard_clients({"params": fedefm_lib.stack(params0, n), "prev": fedefm_lib.stack(params0, n)}, mesh)
    summary: dict = {"curve": [], "w": [], "transfers": 0.0}
    hp = replicate({k: np.float32(v) for k, v in self.hparams().items()}, mesh)  # the round's traced inputs
    ckpt = ckpt_lib.Checkpointer(
      self.checkpoint_dir(method, percent, seed),
      c.checkpoint.max_to_keep,
      cleanup_tmp=True,
      unreadable=self.checkpoint_dir(method, percent, seed, ckpt_lib.UNREADABLE),
    )
    try:
      start, out = ckpt.restore_latest(lambda r: self._load(ckpt, r, state), self.log)
      if start is None:
        start = 0
      else:
        state, data = out
        summary = data["metrics"]
        self.log(f"  {label}: resuming pretraining after round {start}/{p.num_rounds} (checkpoint in {ckpt.directory})")
      last_saved = start or None
      idx, mask = topology.neighbour_table(self.adj)
      base = topology.complete(p.num_silos) > 0
      timed, timed_s = 0, 0.0
      scoring = []  # seconds of each foundation scoring in this process (the first compiles the scorer)
      weights = shard_clients(jnp.ones(n), mesh)  # every silo counts alike, every round
      kinds = set()  # round programs run so far in this process: the first of each compiles
      for r in range(start + 1, p.num_rounds + 1):
        t0 = time.time()
        xs, ys = self.round_data(method, types, seed, r)  # a function of (seed, r) only
        if method == "centralized":  # pool all silos' batches: one model, same images per step
          xs = jnp.swapaxes(xs, 0, 1).reshape((1, xs.shape[1], -1) + xs.shape[3:])
          ys = jnp.swapaxes(ys, 0, 1).reshape((1, ys.shape[1], -1) + ys.shape[3:])
          nbr, nmask, W = np.zeros((1, 1), np.int32), np.zeros((1, 1), bool), np.ones((1, 1), np.float32)
        else:
          nbr, nmask = idx, mask
          if method == "matcha":
            W = topology.matcha(base, c.fedefm.matcha_budget, streams.rng("matcha", seed, r, version=c.rng_streams), r)
          elif self.push_sum:  # push-sum on a directed graph: round r's row-stochastic form of A
            W = topology.push_sum_round(self.gossip_w, r - 1)
          else:
            W = self.gossip_w
        distill = method in DISTILL and r > c.fedefm.warmup_rounds
        fn = self._round_fn(method, distill)
        batch = {"x": xs, "y": ys, "nbr": jnp.asarray(nbr), "nbr_mask": jnp.asarray(nmask)}
        if self._gradient_push(method):
          batch["step_scale"] = jnp.asarray(1.0 / topology.push_sum_weights(self.gossip_w, r - 1), jnp.float32)
        batch = shard_clients(batch, mesh)
        server = replicate({"round": jnp.asarray(r - 1, jnp.int32)}, mesh)
        _, state, metrics = fn(server, state, batch, weights, jnp.asarray(W, jnp.float32), hp)
        metrics = dict(metrics, loss=metrics["client_loss"])  # per silo
        self._check_finite(label, r, method, metrics, state, last_saved)  # waits for the round
        summary["last"] = {k: np.asarray(v).tolist() for k, v in metrics.items() if k in ("loss", "kd", "w")}
        summary["transfers"] += self._round_transfers(method, distill, W, nmask)
        if distill:
          summary["w"].append(np.asarray(metrics["w"]).round(4).tolist())
          err = float(np.max(metrics["emd_error"]))
          summary["emd_error_max"] = max(summary.get("emd_error_max", 0.0), err)
        dt = time.time() - t0  # the round, without the foundation's score (its first call compiles the scorer)
        if r % c.eval.foundation_every == 0 or r == p.num_rounds:
          t_score = time.time()
          score = self.foundation_score(foundation_of(state["params"]), held)
          scoring.append(time.time() - t_score)
          summary["curve"].append({"round": r, "foundation": score})
        if distill in kinds:  # the first round of each program (plain, then distilling) includes compilation
          timed, timed_s = timed + 1, timed_s + dt
        kinds.add(distill)
        if r % c.log_every == 0 or r == p.num_rounds:
          # the scorings left at the mean of those after the first (which compiled), while there are any
          per_score = float(np.mean(scoring[1:] or scoring)) if scoring else 0.0
          every = c.eval.foundation_every  # scored every `every` rounds and at the last
          scores_left = p.num_rounds // every - r // every + (r < p.num_rounds and p.num_rounds % every != 0)
          eta = (p.num_rounds - r) * timed_s / timed + scores_left * per_score if timed else 0.0
          pace = (
            f"{timed / timed_s:.2f} rounds/s  eta {_duration(eta)}"
            if timed and timed_s > 0
            else f"{dt:.1f}s (first round: may include compilation)"
          )
          found = f"  foundation {summary['curve'][-1]['foundation']:.4f}" if summary["curve"] else ""
          self.log(
            f"  {label}: pretraining round {r}/{p.num_rounds}  loss {float(np.mean(summary['last']['loss'])):.4f}"
            f"{found}  {pace}"
          )
        stopping = self._stop_requested()
        if r % c.checkpoint.every == 0 or r == p.num_rounds or stopping:
          ckpt.save(r, state, self.cfg_json, {"round": r, "metrics": summary})
          last_saved = r
        if stopping:
          ckpt.wait()
          raise self._stopped(r, f"{label}, pretraining round")
    finally:
      ckpt.close()  # finishes pending async saves, also when the run dies mid-way
    if summary.get("emd_error_max", 0.0) > emd_lib.CONVERGED_TOL:
      self.log(
        f"  {label}: note: some EMD solves did not converge (largest L1 marginal error "
        f"{summary['emd_error_max']:.2g} > {emd_lib.CONVERGED_TOL:g}), so their weights are approximate; "
        "config.fedefm.emd_iters=0 sizes the iterations to converge"
      )
    summary["foundation"] = summary["curve"][-1]["foundation"] if summary["curve"] else None
    model_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params0))
    summary["cost"] = {  # a distilling round for FedEFM and its controls
      # null where XLA's cost analysis gives no FLOPs for the backend (client_flops: NaN)
      "gflops_per_silo_round": _finite_or_none(round(self.client_flops(method, method in DISTILL) / 1e9, 4)),
      "mb_per_silo_round": round(summary["transfers"] / p.num_rounds * model_bytes / 1e6, 4),
    }
    return jax.tree.map(np.asarray, foundation_of(state["params"])), summary

  # ------------------------------------------------------------------ downstream

  def _finetune_fn(self, kd: bool, frozen: bool = False):
    d = self.c.downstream
    key = ("finetune", self._student_key, kd, frozen, d.learning_rate)
    if kd:  # the teacher and the KD settings only shape the distilling program
      key += (self._teacher_key, d.kd_pixel_weight, d.kd_feature_weight, d.kd_temperature, d.kd_confidence)
      key += (d.kd_class_balance,)
    return PROGRAMS.get(key, lambda: self._make_finetune_fn(kd, frozen))

  def _make_finetune_fn(self, kd: bool, frozen: bool):
    """(step, tx): one Adam step of the student on (x, y); ``kd``: + ``scale`` x (pixel KD masked by the
    teacher's confidence, class-balanced, + feature KD on the encoder tokens) from ``teacher``; ``frozen``:
    only the decoder trains (the frozen-encoder probe)."""
    d = self.c.downstream  # values read now: the program is shared by configs with the same key
    tx = optax.adam(d.learning_rate)
    if frozen:
      name = self.c.student.name
      tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda p: jax.tree_util.tree_map_with_path(lambda k, _: "frozen" if in_encoder(k, name) else "train", p),
      )
    nc = self.c.student.num_classes
    pixel_w, feature_w, temp = float(d.kd_pixel_weight), float(d.kd_feature_weight), float(d.kd_temperature)
    conf, balance = float(d.kd_confidence), bool(d.kd_class_balance)
    s_apply_wf, t_apply_wf, seg_loss = self.s_apply_wf, self.t_apply_wf, self.seg_loss

    def loss_fn(p, teacher, x, y, scale):
      logits, feats = s_apply_wf(p, x)
      loss = seg_loss(logits, y)
      if kd:
        t_logits, t_feats = t_apply_wf(teacher, x)
        pixel = masked_kd_kl(logits, t_logits[..., :nc], temp, conf, balance)
        loss = loss + scale * (pixel_w * pixel + feature_w * feature_kd(feats, t_feats))
      return loss

    @jax.jit
    def step(p, o, teacher, x, y, scale):
      loss, g = jax.value_and_grad(loss_fn)(p, teacher, x, y, scale)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o, loss

    return step, tx

  def _adapt_fn(self):
    """(step, tx): one Adam step of the teacher (the foundation) on target images, segmentation loss on
    the student's classes of its logits: the teacher adapted to the target before it teaches."""
    d = self.c.downstream
    key = ("adapt", self._teacher_key, self.c.student.num_classes, d.learning_rate)

    def make():
      tx, nc, t_apply, seg_loss = optax.adam(d.learning_rate), self.c.student.num_classes, self.t_apply, self.seg_loss

      @jax.jit
      def step(p, o, _teacher, x, y, _scale):
        loss, g = jax.value_and_grad(lambda q: seg_loss(t_apply(q, x)[..., :nc], y))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

      return step, tx

    return PROGRAMS.get(key, make)

  def _train(self, params, fn, teacher, x, y, steps: int, rng, scale: float, label: str, what: str):
    """``steps`` steps of ``fn = (step, tx)`` on random batches of (x, y); DivergedError on NaN/Inf."""
    step, tx = fn
    opt = tx.init(params)
    s = jnp.float32(scale)
    phase = getattr(self.stop, "phase", None)
    if phase is not None:  # a stop signal's notice speaks of this fine-tune, not of a round's checkpoint
      self.stop.phase = "fine-tune"
    try:
      return self._train_steps(params, step, opt, teacher, x, y, steps, rng, s, label, what)
    finally:
      if phase is not None:
        self.stop.phase = phase

  def _train_steps(self, params, step, opt, teacher, x, y, steps: int, rng, s, label: str, what: str):
    d = self.c.downstream
    for first in range(0, steps, FT_CHUNK):
      last = min(first + FT_CHUNK, steps)
      losses = []
      for _ in range(first, last):
        b = jnp.asarray(rng.integers(0, len(x), d.batch_size))
        params, opt, loss = step(params, opt, teacher, x[b], y[b], s)
        losses.append(loss)
      values = np.asarray(jax.device_get(losses), np.float64)
      bad = np.flatnonzero(~np.isfinite(values))
      if len(bad):
        hint = (
          " (or the teacher-KD terms: config.downstream.kd_pixel_weight / kd_feature_weight)"
          if teacher is not None
          else ""
        )
        raise DivergedError(
          f"{label}: {what} diverged at step {first + int(bad[0]) + 1}/{steps}: the loss is "
          f"{values[bad[0]]}; likely cause: config.downstream.learning_rate={d.learning_rate:g} is too "
          f"high{hint}; lower it, e.g. --config.downstream.learning_rate={d.learning_rate / 10:g}, and use "
          "a new --workdir"
        )
      if last < steps and self._stop_requested():
        raise self._stopped(last, f"{label}, {what} (it restarts on re-run) step")
    return params

  def _scores(self, params, x, y) -> dict:
    s = overlap_scores(self.predict(params, x), y, foreground_classes(3))  # catheter, guidewire
    return dict(s, **{"dice/mean": (s["dice/catheter"] + s["dice/guidewire"]) / 2})

  def finetune(self, foundation, kd: bool, seed: int, label: str | None = None) -> dict:
    """The student on the unseen target site, from ``foundation``'s encoder (None: from scratch): scores
    on the target's test split at ``downstream.train_examples`` images x ``downstream.steps`` steps (keys
    ``dice/catheter`` ...), at each ``downstream.scarce_examples`` size x ``downstream.scarce_steps`` steps
    (``n8/dice/catheter`` ...) and, without KD, the frozen-encoder probe (``probe/...``). With ``kd`` the
    foundation, first adapted on the same target images (``downstream.teacher_adapt_steps``), teaches;
    the KD scale is chosen per setting from ``downstream.kd_scales`` on the validation split."""
    self.build_models()
    c, d = self.c, self.c.downstream
    label = label or f"{'teacher-KD ' if kd else ''}fine-tune seed {seed}"
    _, _, params0 = init_model(c.student, seed + 1000)
    if foundation is not None:
      params0 = transfer_encoder(params0, foundation, c.student.name)
    sizes = scarce_sizes(d)
    x_all, y_all = self.data.target(seed, 0, max([d.train_examples] + sizes))
    x_te, y_te = self.data.target(seed, 1, d.test_examples)
    x_val, y_val = self.data.target(seed, 2, d.val_examples)
    out: dict = {"kd_scale": {}} if kd else {}
    settings = [("", d.train_examples, d.steps)] + [(f"n{n}/", n, d.scarce_steps) for n in sizes]
    for prefix, n, steps in settings:
      x, y = x_all[:n], y_all[:n]
      if not kd:
        rng = streams.rng("finetune", seed, n, version=self.c.rng_streams)
        p = self._train(
          params0, self._finetune_fn(False), None, x, y, steps, rng, 0.0, label, f"fine-tuning ({n} images)"
        )
        out.update({prefix + k: v for k, v in self._scores(p, x_te, y_te).items()})
        continue
      teacher = jax.tree.map(jnp.asarray, foundation)  # on the device once, not every step
      if d.teacher_adapt_steps:
        rng = streams.rng("teacher_adapt", seed, n, version=self.c.rng_streams)
        teacher = self._train(
          teacher, self._adapt_fn(), None, x, y, d.teacher_adapt_steps, rng, 0.0, label, "teacher adaptation"
        )
      best = None
      for scale in kd_scales(d):
        rng = streams.rng("finetune", seed, n, version=self.c.rng_streams)  # the same batches for every scale
        p = self._train(
          params0, self._finetune_fn(True), teacher, x, y, steps, rng, scale, label, f"KD fine-tuning ({n} images)"
        )
        val = self._scores(p, x_val, y_val)["dice/mean"]
        if best is None or val > best[0]:
          best = (val, scale, p)
      out["kd_scale"][prefix.rstrip("/") or "full"] = best[1]
      out.update({prefix + k: v for k, v in self._scores(best[2], x_te, y_te).items()})
    if d.probe and not kd:
      rng = streams.rng("probe", seed, version=self.c.rng_streams)
      x, y = x_all[: d.train_examples], y_all[: d.train_examples]
      p = self._train(
        params0, self._finetune_fn(False, True), None, x, y, d.steps, rng, 0.0, label, "frozen-encoder probe"
      )
      out.update({"probe/" + k: v for k, v in self._scores(p, x_te, y_te).items()})
    return out

  # ------------------------------------------------------------------ orchestration

  def plan(self) -> list[tuple[float, str, bool, int]]:
    pr, main = self.parsed, float(self.c.pretrain.unseen_percent)
    entries = []
    for seed in pr["seeds"]:
      for percent in [main] + [p for p in pr["percents"] if p != main]:
        methods = pr["methods"] if percent == main else pr["ablation_methods"]
        for m in methods:
          entries.append((percent, m, False, seed))
          # teacher KD needs a segmentation teacher: not with a source-classification foundation
          if m in pr["kd_methods"] and self.c.pretrain.objective == "segmentation":
            entries.append((percent, m, True, seed))
    return entries

  def check_scorable(self) -> None:
    """A ConfigError (before anything trains) when a planned (seed, percent) leaves the segmentation
    foundation nothing to score: every source its silos hold labels only classes the teacher has no output
    for (vessel-only sources under ``teacher.num_classes=3``)."""
    if self.c.pretrain.objective != "segmentation":
      return
    for percent, seed in dict.fromkeys((p, s) for p, _, _, s in self.plan()):
      held = np.unique(self.data.silo_types(percent, seed))
      if not any(self.data.labelled_classes(int(s)) for s in held):
        raise ConfigError(
          f"at unseen {percent:g}% (seed {seed}) the silos hold only sources {held.tolist()}, which label no class "
          f"of the {self.c.teacher.num_classes}-class teacher (vessels need teacher.num_classes=4): the foundation "
          "would have nothing to be scored on; raise config.teacher.num_classes or config.pretrain.num_silos"
        )

  def plan_notes(self) -> list[str]:
    """What the plan leaves out of config.experiment's lists, said at the start instead of in silence."""
    pr, notes = self.parsed, []
    unused = [m for m in pr["kd_methods"] if m not in pr["methods"]]
    if unused and self.c.pretrain.objective == "segmentation":
      notes.append(
        f"experiment.kd_methods lists {', '.join(unused)}, not in experiment.methods: no teacher-KD fine-tune for "
        f"{'it' if len(unused) == 1 else 'them'} (add {'it' if len(unused) == 1 else 'them'} to methods to run one)"
      )
    if pr["kd_methods"] and self.c.pretrain.objective != "segmentation":
      notes.append(
        f"experiment.kd_methods is not run with pretrain.objective={self.c.pretrain.objective!r}: teacher KD needs "
        "a segmentation teacher"
      )
    pushed = [m for m in pr["methods"] if self._gossips_by_push_sum(m)]
    if pushed:
      head = (
        f"the topology is a directed graph that is not balanced: {', '.join(pushed)} "
        f"{'mixes' if len(pushed) == 1 else 'mix'} by push-sum"
      )
      if self.c.fedefm.gradient_push:  # _gradient_push holds for every method in pushed
        scale, silo, mixed = self.step_scale_peak
        notes.append(
          f"{head}, and each silo's local steps are scaled by 1 / its push-sum weight (stochastic gradient-push), "
          f"up to {scale:.3g}x (silo {silo}, round {mixed + 1}); lower the learning rate if that silo diverges"
        )
      else:
        notes.append(
          f"{head} with unscaled local steps (config.fedefm.gradient_push=False), so the silos settle where the "
          "push-sum-weighted average of their objectives is optimal, not the plain average"
        )
    return notes

  def read_results(self, raw_path: str) -> tuple[list[tuple[int, dict]], tuple[str, str] | None]:
    """The records of results_raw.jsonl with their line numbers, read without changing the file, and the
    repair the file needs before more is appended (:meth:`run` makes it once the workdir is checked): its new
    text and a note to print (or ""), else None. A last line that is not complete JSON (a write cut short by a
    kill, or a crashed write's NUL padding; :func:`fedkd.logs.json_lines`) is dropped by the repair (its run is
    redone); a complete last record without its newline gets one. Any other line that is not JSON, and any
    JSON line that is not a result record, is a ConfigError naming it."""
    if not os.path.exists(raw_path):
      return [], None
    with open(raw_path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    fix = "delete that line (its run is redone) or use a new --workdir"
    try:
      lines, cut = json_lines(text)
    except BadJsonLine as e:
      raise ConfigError(f"{raw_path}: line {e.number} is unreadable ({reason(e.error, 120)}); {fix}") from None
    note = ""
    if cut is not None:
      note = (
        f"note: {raw_path}: dropped its last line ({cut}), which was cut short (the experiment was "
        "stopped while writing it); that run is redone"
      )
    records, kept = [], []
    for i, line, r in lines:
      if not isinstance(r, dict) or any(k not in r for k in RESULT_KEYS[:4]):
        what = (
          f"a JSON {type(r).__name__}"
          if not isinstance(r, dict)
          else "a record without " + ", ".join(k for k in RESULT_KEYS[:4] if k not in r)
        )
        raise ConfigError(
          f"{raw_path}: line {i} is not a result record ({what}; a record holds {', '.join(RESULT_KEYS[:4])} "
          f"and the scores); {fix}"
        )
      try:
        hash((r["unseen_percent"], r["method"], r["teacher_kd"], r["seed"]))
      except TypeError:
        raise ConfigError(
          f"{raw_path}: line {i} is not a result record (a list or object where {', '.join(RESULT_KEYS[:4])} "
          f"hold a number, name or flag); {fix}"
        ) from None
      records.append((i, r))
      kept.append(line)
    # a cut-short line is dropped; a complete last record gets its newline before anything is appended
    repair = ("".join(l + "\n" for l in kept), note) if cut is not None or (text and not text.endswith("\n")) else None
    return records, repair

  def check_records(self, raw_path: str, records: list[tuple[int, dict]]) -> dict:
    """The finished runs of ``records`` (:meth:`read_results`) by (percent, method, kd, seed), each checked
    (a ConfigError naming the file, line and key otherwise): one record per run; every score it holds
    (``SCORES`` of each setting, ``foundation``, ``seconds``) a finite number, ``foundation`` null for
    scratch only; the keys its kind of run writes (the scarce sizes' and, without KD, the probe's scores)
    present; its cost and EMD weight spread numbers or null."""
    d = self.c.downstream
    done, line_of = {}, {}
    for i, r in records:
      key = (r["unseen_percent"], r["method"], r["teacher_kd"], r["seed"])
      name = f"{r['method']}{' +KD' if r['teacher_kd'] is True else ''} seed {report.shown_value(r['seed'])}"
      if key in line_of:
        pct = f"{key[0]:g}" if report.is_finite_number(key[0]) else report.shown_value(key[0])
        raise ConfigError(
          f"{raw_path}: lines {line_of[key]} and {i} are both the record of {name} at {pct}% unseen "
          "(one run, two results); delete the line that should not count (both, to redo the run)"
        )
      line_of[key] = i
      fix = f"delete its line {i} (its run is redone) or use a new --workdir"
      scratch = r["method"] == "scratch"
      bad = [
        k
        for k, v in r.items()
        if _score_key(k) and not report.is_finite_number(v) and not (k == "foundation" and v is None and scratch)
      ]
      # what endpoints.md reads besides the scores: the cost columns and the EMD weight spread
      nested = {f"cost.{k}": v for k, v in r["cost"].items()} if isinstance(r.get("cost"), dict) else {}
      nested["emd.w_spread"] = r["emd"].get("w_spread") if isinstance(r.get("emd"), dict) else None
      bad += [k for k in ("cost", "emd") if r.get(k) is not None and not isinstance(r[k], dict)]
      bad += [k for k, v in r.items() if not _score_key(k) and isinstance(v, float) and not math.isfinite(v)]
      # a cost XLA gave no FLOPs for was written NaN (now null): a missing cell, as endpoints.md shows it
      bad += [
        k
        for k, v in nested.items()
        if v is not None and not report.is_finite_number(v) and not (k.startswith("cost.") and v != v)
      ]
      if bad:
        v = nested[bad[0]] if bad[0] in nested else r[bad[0]]
        raise ConfigError(
          f"{raw_path}: the record of {name} holds {report.shown_value(v)} for {bad[0]}, not a result (a finite number); {fix}"
        )
      need = list(RESULT_KEYS) + ["foundation"] + [f"n{n}/{k}" for n in scarce_sizes(d) for k in SCORES]
      need += [f"probe/{k}" for k in SCORES] * bool(d.probe and r["teacher_kd"] is False)
      missing = [k for k in need if k not in r]
      if missing:
        raise ConfigError(f"{raw_path}: the record of {name} lacks {', '.join(missing)}; {fix}")
      done[key] = r
    return done

  def read_saved_config(self, cfg_path: str) -> dict:
    try:
      saved = read_json_object(cfg_path)
    except (OSError, ValueError) as e:
      raise ConfigError(
        f"{cfg_path} is unreadable ({reason(e, 120)}), so the results and checkpoints in "
        f"{self.workdir} cannot be matched to this config; restore the file, use a new --workdir, or delete "
        "it if this config is the one they were made with"
      ) from None
    return saved

  def _check_checkpoint_config(self, directory: str) -> None:
    """ConfigError when the newest readable checkpoint in ``directory`` is of another config (damaged
    steps are left to ``restore_latest``, which falls back over them)."""
    if not os.path.isdir(directory):
      return
    ckpt = ckpt_lib.Checkpointer(directory, self.c.checkpoint.max_to_keep)
    try:
      for r in reversed(ckpt.all_rounds()):
        try:
          saved = ckpt.saved_config(r)
        except ckpt_lib.CheckpointError:
          continue
        diff = config_difference(saved, self.cfg_json)
        if diff:
          raise ConfigError(
            f"the checkpoint for round {r} in {directory} was written with another config "
            f"({diff}); use a new --workdir, or the original config (only "
            "config.experiment, config.checkpoint and config.log_every may change)"
          )
        return
    finally:
      ckpt.close()

  def foundation_path(self, workdir: str, method: str, percent: float, seed: int) -> str:
    return os.path.join(workdir, "foundations", foundation_key(percent, method, seed) + ".npz")

  def _reusable_from(self) -> list[str]:
    """config.experiment.foundations_from, checked, and in turn the workdir that one reused its foundations
    from (its config.json's experiment.foundations_from), and so on: those that hold a foundations/ folder,
    in the order they are looked in ([] when the key is not set). Each needs a config.json that differs from
    this one at most in the downstream keys (``DOWNSTREAM_KEYS``) and ``FREE_KEYS``. A problem with the given
    workdir is a ConfigError; one further along the chain ends the walk with a note (:meth:`source_notes`), the
    workdirs before it still used, unless none of them holds foundations."""
    given = self.c.experiment.foundations_from
    self._chain_notes = []
    if not given:
      return []
    head, src, chain, seen = f"config.experiment.foundations_from={given!r}", given, [], set()
    fix = (
      "point config.experiment.foundations_from at the workdir whose foundations/ holds them, or '' to pretrain them"
    )
    subject = head
    while src and os.path.realpath(os.path.expanduser(src)) not in seen:
      src = os.path.expanduser(src)
      seen.add(os.path.realpath(src))
      saved, problem = self._source_config(src)
      if problem and not seen - {os.path.realpath(src)}:  # the given workdir
        raise ConfigError(f"{subject} {problem[0]}; {problem[1] or fix}")
      if problem:
        self._chain_notes.append(f"{subject} {problem[0]}: its foundations are not looked in")
        break
      if os.path.isdir(os.path.join(src, "foundations")):
        chain.append(src)
      experiment = saved.get("experiment")
      nxt = experiment.get("foundations_from") if isinstance(experiment, dict) else None
      prev, src = src, nxt if isinstance(nxt, str) else ""
      subject = f"{head}: {prev!r} reused its foundations from {src!r} (its config.json says so), which"
    if not chain:
      reused = f" ({self._chain_notes[0]})" if self._chain_notes else " and reused none from another workdir"
      raise ConfigError(f"{head} holds no foundations/ (its runs saved none){reused}; {fix}")
    return chain

  def _source_config(self, src: str) -> tuple[dict, tuple[str, str] | None]:
    """The workdir ``src``'s saved config, and why it cannot lend this experiment its foundations (what is wrong,
    the fix or '') or None."""
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
      where = "" if os.path.isabs(src) else f" (a relative path, looked up from the working directory {os.getcwd()})"
      return {}, (f"is not a folder{where}", "")
    if not os.path.exists(cfg_path):
      return {}, ("holds no config.json (not a FedEFM workdir)", "")
    try:
      saved = read_json_object(cfg_path)
    except (OSError, ValueError) as e:
      return {}, (
        f"has an unreadable {cfg_path} ({reason(e, 120)}), so its foundations cannot be matched to this config",
        "restore the file, or point config.experiment.foundations_from elsewhere",
      )
    diff = config_difference(saved, self.cfg_json, ignore=DOWNSTREAM_KEYS)
    if diff:
      return saved, (
        f"holds foundations pretrained with another config ({diff}; only config.downstream and config.student may)",
        "use that config or '' to pretrain them",
      )
    return saved, None

  def source_notes(self, plan, done) -> list[str]:
    """What config.experiment.foundations_from leaves to pretrain here, said at the start: the planned
    foundations (not yet finished runs) that neither this workdir nor the source holds."""
    if not self._from:
      return []
    notes = list(self._chain_notes)
    lacking = [
      (percent, method, seed)
      for percent, method, seed in dict.fromkeys((p, m, s) for p, m, _, s in plan if m != "scratch")
      if any(e not in done for e in plan if (e[0], e[1], e[3]) == (percent, method, seed))
      and self._foundation_file(method, percent, seed) is None
    ]
    if not lacking:
      return notes
    names = [f"{m} at {p:g}% unseen seed {s}" for p, m, s in lacking]
    shown = first_names(names, 6)
    return notes + [
      f"config.experiment.foundations_from={self.c.experiment.foundations_from!r} lacks {len(lacking)} of the "
      f"foundations this plan uses, pretrained here instead: {shown}"
    ]

  def _foundation_file(self, method: str, percent: float, seed: int) -> str | None:
    """The file a foundation is read from: this workdir's, else that of the first workdir along
    config.experiment.foundations_from's chain that holds it; None when none does (it is pretrained here)."""
    for w in [self.workdir, *self._from]:
      path = self.foundation_path(w, method, percent, seed)
      if os.path.exists(path):
        return path
    return None

  def _load_foundation(self, path: str, seed: int):
    # shapes and dtypes only: tracing the initialiser allocates no parameters
    return load_foundation(path, jax.eval_shape(lambda: self.init_foundation(seed)))

  def _check_foundation_files(self, done) -> None:
    """Each foundation file a run still to do reads (this workdir's or a source's) is read once before anything
    trains: a damaged file, or one of another model, is refused at the start instead of when the run that needs
    it starts, perhaps hours in."""
    for percent, method, seed in dict.fromkeys(
      (p, m, s) for p, m, kd, s in self.plan() if m != "scratch" and (p, m, kd, s) not in done
    ):
      path = self._foundation_file(method, percent, seed)
      if path is not None:
        self._load_foundation(path, seed)

  def foundation(self, method: str, percent: float, seed: int, label: str):
    """A finished foundation and its pretraining summary: this workdir's foundations/ file, else that of
    config.experiment.foundations_from (or of the workdir it reused from), else pretrained now (and saved
    in foundations/; :meth:`source_notes` says which at the start)."""
    own = self.foundation_path(self.workdir, method, percent, seed)
    path = self._foundation_file(method, percent, seed)
    if path is not None:
      params, summary = self._load_foundation(path, seed)
      if path != own:
        self.log(f"  {label}: foundation reused from {path}")
      return params, summary
    params, summary = self.pretrain(method, percent, seed, label=label)
    save_foundation(own, params, summary)
    shutil.rmtree(self.checkpoint_dir(method, percent, seed), ignore_errors=True)  # the .npz supersedes them
    return params, summary

  def check_workdir(self) -> dict:
    """What :meth:`run` checks before anything trains or is written (a ConfigError otherwise): the workdir's
    results, checkpoints and foundations are of this config, config.experiment.foundations_from is usable,
    the models build. Returns the finished runs (:meth:`read_results`). ``run_replicas`` calls it for every
    experiment before the first one starts."""
    raw_path = os.path.join(self.workdir, "results_raw.jsonl")
    records, repair = self.read_results(raw_path)  # nothing is changed before every check has passed
    ck_root = os.path.join(self.workdir, "checkpoints")
    # checkpoints/unreadable/: steps set aside by resumes (checkpoint_dir), not a run in progress
    in_progress = sorted(n for n in os.listdir(ck_root) if n != ckpt_lib.UNREADABLE) if os.path.isdir(ck_root) else []
    found_root = os.path.join(self.workdir, "foundations")  # reused as they are: of this config only
    foundations = os.listdir(found_root) if os.path.isdir(found_root) else []
    cfg_path = os.path.join(self.workdir, "config.json")
    if (records or in_progress) and os.path.exists(cfg_path):
      diff = config_difference(self.read_saved_config(cfg_path), self.cfg_json)
      if diff:
        raise ConfigError(
          f"{self.workdir} holds results of another config ({diff}); use a "
          "new --workdir, or the original config (only config.experiment, config.checkpoint "
          "and config.log_every may change)"
        )
    elif foundations and os.path.exists(cfg_path):  # no results yet: the foundations are reused as they are
      diff = config_difference(self.read_saved_config(cfg_path), self.cfg_json, ignore=DOWNSTREAM_KEYS)
      if diff:
        raise ConfigError(
          f"{self.workdir} holds foundations pretrained under another config ({diff}); use a "
          "new --workdir, or the original config (config.downstream and config.student may change while no "
          "result is written)"
        )
    for name in in_progress:  # also when config.json is gone: each checkpoint carries its config
      self._check_checkpoint_config(os.path.join(ck_root, name))
    done = self.check_records(raw_path, records)  # after the config: a record of another config is that error
    self._from = self._reusable_from()
    self.build_models()
    self.check_scorable()
    self._check_foundation_files(done)
    self._checked = (done, in_progress, repair)  # for the next run(): the workdir is read once
    return done

  def saved_config_text(self) -> str:
    """config.json's text: the config, with config.experiment.foundations_from as an absolute path, so that a
    later experiment following this workdir's chain finds the source from any working directory."""
    c = self.c
    if c.experiment.foundations_from:
      c = ml_collections.ConfigDict(c.to_dict())
      c.experiment.foundations_from = os.path.abspath(os.path.expanduser(self.c.experiment.foundations_from))
    return c.to_json(indent=2)

  def run(self) -> list[dict]:
    os.makedirs(self.workdir, exist_ok=True)
    if self._checked is None:
      self.check_workdir()
    (done, in_progress, repair), self._checked = self._checked, None  # a later run() checks afresh
    raw_path, ck_root, cfg_path = (
      os.path.join(self.workdir, n) for n in ("results_raw.jsonl", "checkpoints", "config.json")
    )
    if repair is not None:  # the workdir is checked: now the file may change
      text, note = repair
      write_atomic(epath.Path(raw_path), text)
      if note:
        self.log(note)
    write_atomic(epath.Path(cfg_path), self.saved_config_text())
    plan = self.plan()
    for name in in_progress:  # left by a run killed between saving its foundation and the clean-up
      if os.path.exists(os.path.join(self.workdir, "foundations", name + ".npz")):
        shutil.rmtree(os.path.join(ck_root, name), ignore_errors=True)
    self.log(
      f"fedkd fedefm: {len(plan)} runs ({sum(e in done for e in plan)} already done) -> {self.workdir}; "
      f"{self.c.pretrain.num_silos} silos, {self.c.pretrain.num_rounds} rounds, {self.c.image_size}px"
    )
    for note in self.plan_notes() + self.source_notes(plan, done):
      self.log(f"note: {note}")
    cache: dict = {}
    t0 = time.time()
    for k, (percent, method, kd, seed) in enumerate(plan, 1):
      key = (percent, method, kd, seed)
      if key in done:
        continue
      label = f"run {k}/{len(plan)} ({percent:g}% unseen, {method}{' +KD' if kd else ''}, seed {seed})"
      t = time.time()
      found_key = (percent, method, seed)
      if method != "scratch" and found_key not in cache:
        cache.clear()  # one foundation at a time (KD and plain fine-tunes share it)
        cache[found_key] = self.foundation(method, percent, seed, label)
      foundation, pre = cache.get(found_key, (None, {}))
      if foundation is not None and self.c.pretrain.objective == "source":
        foundation = foundation["net"]  # the encoder travels; the source head stays behind
      res = self.finetune(foundation, kd, seed, label=label)
      w_hist = pre.get("w") or []
      rec = {
        "unseen_percent": percent,
        "method": method,
        "teacher_kd": kd,
        "seed": seed,
        **res,
        "foundation": pre.get("foundation"),
        "seconds": round(time.time() - t, 2),
        "cost": pre.get("cost"),
        "emd": {
          "w_spread": float(np.mean([weight_spread(w, self.adj) for w in w_hist])) if w_hist else None,
          "error_max": pre.get("emd_error_max"),
        },
        "foundation_curve": pre.get("curve", []),
        "w_history": w_hist if not kd else [],
        "pretrain_final": pre.get("last", {}),
      }
      with open(raw_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
      done[key] = rec
      found = "" if rec["foundation"] is None else f"  foundation {rec['foundation']:.4f}"
      self.log(
        f"[{k:>3}/{len(plan)}] {percent:5.1f}% unseen  {method + (' +KD' if kd else ''):<16} seed {seed}:{found}"
        f"  dice catheter {res['dice/catheter']:.4f}  guidewire {res['dice/guidewire']:.4f}"
        + "".join(f"  n{n} {res[f'n{n}/dice/mean']:.4f}" for n in scarce_sizes(self.c.downstream))
        + f"  ({time.time() - t:.1f}s, total {time.time() - t0:.0f}s)"
      )
      if any(e not in done for e in plan) and self._stop_requested():
        raise self._stopped(k, "the end of run")
    if os.path.isdir(ck_root) and not os.listdir(ck_root):
      os.rmdir(ck_root)
    rows = [done[e] for e in plan]
    self.write_tables(rows)
    return rows

  def write_tables(self, rows: list[dict]) -> None:
    """results.md / results.csv: one row per (unseen %, method, teacher KD), mean ± std over seeds
    (``fedkd.report``'s convention: sample std, ddof=1; n/a for one seed) of the foundation endpoint and
    the downstream scores; endpoints.md: the pre-registered contrasts (:func:`write_endpoints`);
    environment.json; pretraining curves and the EMD-weight heatmap (PNG)."""
    sizes = scarce_sizes(self.c.downstream)
    probe = any("probe/dice/mean" in r for r in rows)  # no column without a probe (downstream.probe=False)
    keys = ["foundation", "dice/catheter", "dice/guidewire", "dice/mean"] + ["probe/dice/mean"] * probe
    keys += [f"n{n}/dice/mean" for n in sizes] + ["iou/catheter", "iou/guidewire"]
    groups: dict = {}
    for r in rows:
      groups.setdefault((r["unseen_percent"], r["method"], r["teacher_kd"]), []).append(r)
    md = report.mean_std_tables(
      os.path.join(self.workdir, "results.md"),
      os.path.join(self.workdir, "results.csv"),
      ["unseen_percent", "method", "teacher_kd", "seeds"],
      [
        ([f"{pct:g}", m, "yes" if kd else "no", len(rs)], {k: [r[k] for r in rs if r.get(k) is not None] for k in keys})
        for (pct, m, kd), rs in groups.items()
      ],
      keys,
      headers=["unseen %", "method", "teacher KD", "seeds"],
      caption=(
        f"foundation: the pretrained model's {ENDPOINT[self.c.pretrain.objective]} on held-out images of every "
        f"source; dice / iou: the student on target site {TARGET[0]} ({self.c.downstream.train_examples} "
        f"training images, {self.c.downstream.steps} steps; dice/mean = mean of catheter and guidewire); "
        + ("probe: the same with the encoder frozen (scratch: a frozen random encoder); " if probe else "")
        + f"nN: N training images, {self.c.downstream.scarce_steps} steps (the scarce-data curve)."
      ),
      digits=3,
    )
    endpoints = write_endpoints(
      self.workdir, rows, float(self.c.pretrain.unseen_percent), self.c.pretrain.objective, sizes
    )
    report.write_text(os.path.join(self.workdir, "environment.json"), json.dumps(report.environment(), indent=2))
    main = [r for r in rows if r["unseen_percent"] == float(self.c.pretrain.unseen_percent) and not r["teacher_kd"]]
    curves: dict = {}
    for r in main:
      if r.get("foundation_curve"):
        curves.setdefault(r["method"], []).append(r["foundation_curve"])
    pictures = []
    if report.curves_plot(list(curves.items()), ["foundation"], os.path.join(self.workdir, "pretraining_curves.png")):
      pictures.append("pretraining_curves.png")
    scarce: dict = {}  # the scarce-data curve: student dice/mean vs target training images
    shown = {"scratch"} | {m for _, a, b in PRIMARY for m in (a, b)}  # not the controls: a readable plot
    for r in rows:
      if r["unseen_percent"] == float(self.c.pretrain.unseen_percent) and "dice/mean" in r and r["method"] in shown:
        full = self.c.downstream.train_examples  # its point is the full budget's (a scarce n = full: the table's)
        pts = [{"images": n, "dice/mean": r[f"n{n}/dice/mean"]} for n in sizes if f"n{n}/dice/mean" in r and n < full]
        pts.append({"images": full, "dice/mean": r["dice/mean"]})
        scarce.setdefault(r["method"] + (" +KD" if r["teacher_kd"] else ""), []).append(pts)
    if sizes and report.curves_plot(
      list(scarce.items()),
      ["dice/mean"],
      os.path.join(self.workdir, "scarce_curve.png"),
      x="images",
      logx=True,
      unit_range=False,
    ):
      pictures.append("scarce_curve.png")
    for m in ("fedefm", "fedefm_dfl"):
      first = next((r for r in main if r["method"] == m and r.get("w_history")), None)
      if first is not None:
        w = np.asarray(first["w_history"], np.float64)  # [rounds, silos, J]: J in-neighbour slots, some padded
        idx, mask = topology.neighbour_table(self.adj)
        slots = [(i, k) for i in range(w.shape[1]) for k in range(w.shape[2]) if mask[i, k]]
        labels = [f"silo {i} <- silo {idx[i, k]}" for i, k in slots]
        name = f"emd_weights_{m}.png"
        report.heatmap(
          np.stack([w[:, i, k] for i, k in slots]),
          labels,
          os.path.join(self.workdir, name),
          xlabel="distillation round",
          title=f"{m}: EMD weight w_ij per round (seed {first['seed']})",
        )
        pictures.append(name)
    report.remove_stale(self.workdir, lambda n: n in PICTURES, pictures)  # e.g. a method no longer run
    self.log("\n" + "\n".join(md) + "\n\n" + "\n".join(endpoints))
    extra = ", " + ", ".join(pictures) if pictures else ""
    self.log(
      f"\nwrote {self.workdir}/results.md, results.csv, endpoints.md, environment.json, results_raw.jsonl{extra}"
    )


# the pictures the results writer may draw in the workdir
PICTURES = ("pretraining_curves.png", "scarce_curve.png", "emd_weights_fedefm.png", "emd_weights_fedefm_dfl.png")
ENDPOINT = {"source": "source-classification accuracy", "segmentation": "mean Dice over source x labelled class"}
# Pre-registered contrasts (docs/fedefm.md): (name, a, b) = a - b paired by seed, Holm within each family.
PRIMARY = (("P1", "fedefm", "fedavg"), ("P2", "fedefm_dfl", "matcha"), ("P3", "fedefm", "centralized"))
CONTROLS = (
  ("C1", "fedefm", "fedefm_uniform"),
  ("C2", "fedefm", "fedefm_e0"),
  ("C3", "fedefm", "fedavg_matched"),
  ("C4", "fedefm", "fedprox"),
)


def _by_seed(rows, method: str, key: str) -> dict:
  """{seed: r[key]} of ``method``'s rows; "m +KD" names method m's teacher-KD rows."""
  name, kd = (method[: -len(" +KD")], True) if method.endswith(" +KD") else (method, False)
  return {r["seed"]: r[key] for r in rows if r["method"] == name and r["teacher_kd"] == kd and r.get(key) is not None}


def _family(rows, contrasts, key: str) -> list[tuple[str, str, dict]]:
  """[(name, "a - b", paired_difference)] for the contrasts whose two methods share >= 1 seed."""
  out = []
  for name, a, b in contrasts:
    va, vb = _by_seed(rows, a, key), _by_seed(rows, b, key)
    seeds = sorted(set(va) & set(vb))
    if seeds:
      out.append((name, f"{a} - {b}", report.paired_difference([va[s] for s in seeds], [vb[s] for s in seeds])))
  return out


def _family_lines(title: str, fam: list) -> list[str]:
  if not fam:
    return []
  adj, holm_words = report.holm_family([res["p"] for _, _, res in fam], "contrasts of this family")
  lines = [f"**{title}** (paired by seed; 95% t-interval; {holm_words})", ""]
  lines += ["| contrast | | n | difference [95% CI] p |", "|---|---|---:|---|"]
  for (name, what, res), pa in zip(fam, adj):
    pa = None if np.isnan(res["p"]) else pa
    lines.append(f"| {name} | {what} | {res['n']} | {report.format_contrast(res, pa)} |")
  return lines + [""]


def write_endpoints(
  workdir: str, rows: list[dict], main_percent: float, objective: str, sizes: Sequence[int] = ()
) -> list[str]:
  """endpoints.md: the primary endpoint (the foundation on held-out data of every source) per method
  with its 95% CI and cost columns, the pre-registered contrasts P1-P3 and the controls C1-C4 (paired by
  seed, Holm-corrected within each family), and the downstream contrasts vs scratch (every student, with
  and without teacher KD: per class at the full budget, dice/mean at the scarce end ``min(sizes)`` and of
  the frozen-encoder probe); rows at other unseen-% settings (the ablation) add their foundation table and
  the contrasts among their methods. Returns its lines."""
  main = [r for r in rows if r["unseen_percent"] == main_percent and not r["teacher_kd"]]
  down = [r for r in rows if r["unseen_percent"] == main_percent]
  lines = [
    f"# FedEFM endpoints ({main_percent:g}% unseen, objective {objective})",
    "",
    f"Primary endpoint: the foundation's {ENDPOINT[objective]} on a balanced held-out set of every source; "
    "mean ± sample std (ddof 1) over seeds, 95% t-interval of the mean. Cost per silo per round: FLOPs of "
    "one silo's round program (local steps, overseas experts, EMD solves; XLA cost analysis; FedEFM and its "
    "controls: a distilling round) and model bytes sent + received.",
    "",
    "| method | seeds | foundation | 95% CI | GFLOP / silo / round | MB / silo / round | EMD weight spread |",
    "|---|---:|---|---|---:|---:|---:|",
  ]
  for m in dict.fromkeys(r["method"] for r in main):
    vals = list(_by_seed(main, m, "foundation").values())
    cost = next((r.get("cost") for r in main if r["method"] == m and r.get("cost")), None) or {}
    spread = [
      r["emd"]["w_spread"] for r in main if r["method"] == m and (r.get("emd") or {}).get("w_spread") is not None
    ]
    if vals:
      mean, std = report.mean_std(vals)
      ci = report.paired_difference(vals, [0.0] * len(vals))
      cell_ci = "n/a" if np.isnan(ci["ci_low"]) else f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
      found = report.format_mean_std(float(mean), float(std), 3)
    else:
      found, cell_ci = "(no foundation)", ""
    lines.append(
      f"| {m} | {len(vals) or len([r for r in main if r['method'] == m])} | {found} | {cell_ci} | "
      f"{_cost_cell(cost.get('gflops_per_silo_round'))} | {_cost_cell(cost.get('mb_per_silo_round'))} | "
      f"{f'{np.mean(spread):.4f}' if spread else ''} |"
    )
  lines.append("")
  lines += _family_lines("Primary contrasts on the foundation endpoint", _family(main, PRIMARY, "foundation"))
  lines += _family_lines("Controls on the foundation endpoint", _family(main, CONTROLS, "foundation"))
  at_pct = {  # the unseen-% ablation: its rows per setting
    pct: [r for r in rows if r["unseen_percent"] == pct and not r["teacher_kd"]]
    for pct in sorted({r["unseen_percent"] for r in rows} - {main_percent})
  }
  if at_pct:
    lines += ["**Foundation endpoint at the other unseen-% settings**", ""]
    lines += ["| unseen % | method | seeds | foundation |", "|---:|---|---:|---|"]
    for pct, at in at_pct.items():
      for m in dict.fromkeys(r["method"] for r in at):
        vals = list(_by_seed(at, m, "foundation").values())
        if vals:
          mean, std = report.mean_std(vals)
          lines.append(f"| {pct:g} | {m} | {len(vals)} | {report.format_mean_std(float(mean), float(std), 3)} |")
    lines.append("")
  for pct, at in at_pct.items():
    lines += _family_lines(f"Contrasts at {pct:g}% unseen", _family(at, PRIMARY + CONTROLS, "foundation"))
  students = [r["method"] + (" +KD" if r["teacher_kd"] else "") for r in down]
  others = [m for m in dict.fromkeys(students) if m != "scratch"]
  versus = [(f"D{i + 1}", m, "scratch") for i, m in enumerate(others)]
  for key in ("dice/catheter", "dice/guidewire"):
    lines += _family_lines(f"Downstream {key}: each student vs scratch", _family(down, versus, key))
  if sizes:
    key = f"n{min(sizes)}/dice/mean"
    lines += _family_lines(
      f"Downstream at the scarce end ({min(sizes)} target images, {key}): each student vs scratch",
      _family(down, [(f"S{i + 1}", m, "scratch") for i, m in enumerate(others)], key),
    )
  probes = [(f"F{i + 1}", m, "scratch") for i, m in enumerate(o for o in others if not o.endswith(" +KD"))]
  lines += _family_lines(
    "Frozen-encoder probe (probe/dice/mean): each foundation's encoder vs a frozen random one",
    _family(down, probes, "probe/dice/mean"),
  )
  report.write_text(os.path.join(workdir, "endpoints.md"), "\n".join(lines) + "\n")
  return lines


def run(config, workdir: str, log: Callable[[str], None] = _print, stop=None) -> list[dict]:
  """The whole experiment; ``stop``: a ``fedkd.preemption.StopSignals`` (None = never stop).
  Raises ``Stopped`` after saving when ``stop`` asks, ``DivergedError`` on NaN/Inf training and
  ``ConfigError`` (before anything trains) for a bad setting or a workdir of another config."""
  return Experiment(config, workdir, log, stop).run()


def run_replicas(configs: Sequence, workdirs: Sequence[str], log: Callable[[str], None] = _print, stop=None):
  """Experiments whose configs differ only in :data:`ROUND_HPARAMS` (a KD-weight or learning-rate grid),
  one after another in this process, each into its workdir: their pretraining rounds are one compiled
  program per method (the differing values are the round's inputs), so N experiments compile as one.
  An experiment that diverges stops alone and the others still run; the call then ends in a
  ``DivergedError`` that names it. Returns each experiment's rows (None for a diverged one). Every config
  is validated before the first experiment starts."""
  from fedkd.tasks.replicas import label, varying

  for c in configs:
    validate(c)
  keys = varying(configs)
  experiments = [Experiment(c, w, log, stop) for c, w in zip(configs, workdirs)]
  for exp in experiments:  # a workdir of another config stops the grid before the first experiment trains
    exp.check_workdir()
  out, failed = [], []
  for i, (c, w, exp) in enumerate(zip(configs, workdirs, experiments)):
    name = label(c, keys)
    log(f"fedkd fedefm: experiment {i + 1}/{len(configs)} ({name}) into {w}")
    try:
      out.append(exp.run())
    except DivergedError as e:
      out.append(None)
      failed.append(f"{name}: {e}")
      log(f"{failed[-1]}; the other experiments go on")
  if failed:
    done = [label(c, keys) for c, rows in zip(configs, out) if rows is not None]
    raise DivergedError("; ".join(failed) + (f" (finished: {'; '.join(done)})" if done else ""))
  return out
