"""FedEFM end to end: federated foundation pretraining across silos whose data types (do not)
overlap, then a student fine-tuned on a small set from an unseen hospital, for every method and seed,
plus the unseen-label-% ablation; writes results.md / results.csv (mean +- sample std over seeds, as
fedkd.report writes every table).

Silo data (``fedkd.data.silos``): pretraining data types (hospital profile x labelled structures):
  vessel angiography (flat-panel, human-like anatomy), catheter-only (animal), catheter+guidewire
  (silicone phantom), everything labelled (clean simulator). Label space of the foundation:
  background, catheter, guidewire, vessel. Each silo holds a mixture of types given by
  ``partition.unseen_label_corpus(num_silos, 4, unseen_percent)`` (100 % = no shared type).
Downstream: the held-out hospital profile (``unseen_mobile_c_arm``), catheter+guidewire labels,
``downstream.train_examples`` images; scored on ``downstream.test_examples`` held-out images.

Methods: scratch (no foundation), centralized (all silos' data pooled, one model, same images),
fedavg (CFL), ring and matcha (DFL gossip without distillation), moon (CFL + model-contrastive loss),
fedefm (overseas experts + EMD-weighted multishot distillation, then ``fedefm.mixing``).
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

import json
import os
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from etils import epath

from fedkd import checkpoint as ckpt_lib
from fedkd import report
from fedkd.config import ConfigError, validate_fedefm
from fedkd.data.silos import TARGET, SiloData
from fedkd.distill import fedefm as fedefm_lib
from fedkd.distill.losses import feature_kd, kd_kl
from fedkd.errors import DivergedError
from fedkd.evaluate import foreground_classes, overlap_scores
from fedkd.fl import engine, topology
from fedkd.fl.algorithm import ClientContext
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_model, make_predictor
from fedkd.models.transfer import load_encoder
from fedkd.preemption import Stopped
from fedkd.sharding import client_mesh, replicate, shard_clients
from fedkd.workdir import write_atomic

METHODS = ("scratch", "centralized", "fedavg", "ring", "matcha", "moon", "fedefm")
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
)
# Config groups that do not change any number in the results: a workdir's results and checkpoints
# stay valid when only these differ.
FREE_KEYS = ("experiment", "checkpoint", "log_every")
FT_CHUNK = 100  # fine-tuning steps between NaN checks and stop checks


def _print(msg: str) -> None:
  print(msg, flush=True)


def load_adjacency(c) -> np.ndarray:
  """Bool [N, N] neighbour graph of ``config.fedefm.topology`` (no self loops); ConfigError else."""
  n, topo = c.pretrain.num_silos, c.fedefm.topology
  try:
    if topo == "ring":
      adj = topology.ring(n) > 0
    elif topo == "complete":
      adj = topology.complete(n) > 0
    elif topo == "gaia":
      adj = topology.gaia_adjacency()[:n, :n] > 0
    elif isinstance(topo, str) and topo.startswith("file:"):
      adj = topology.from_file(topo[5:]) > 0
    else:
      raise ConfigError(f"config.fedefm.topology={topo!r}: use ring, complete, gaia or file:<path>")
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
  return adj


def validate(c) -> dict:
  """Checks every FedEFM setting before anything trains (``fedkd.config.validate_fedefm``, then the
  topology loads); returns the parsed lists and the topology's adjacency."""
  parsed = validate_fedefm(c, jax.device_count())
  parsed["adjacency"] = load_adjacency(c)
  return parsed


def results_config(config_json: dict) -> dict:
  """The part of a config (as JSON) that the numbers in a workdir depend on."""
  return {k: v for k, v in config_json.items() if k not in FREE_KEYS}


def config_difference(saved: dict, current: dict) -> str | None:
  """The first differing top-level key (``config.<key>``) of two configs' results parts; None if equal."""
  a, b = results_config(saved), results_config(current)
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return diff[0] if diff else None


def foundation_key(percent: float, method: str, seed: int) -> str:
  """Folder name of a pretraining run's checkpoints (shared by its plain and +KD fine-tunes)."""
  return f"u{percent:g}_{method}_seed{seed}"


def transfer_encoder(student_params, foundation, model_name: str):
  """Loads the foundation's encoder into the student: TransUNet ``encoder``; UNet ``enc`` + ``mid``."""
  if model_name == "unet":
    params, _ = load_encoder(student_params, foundation, prefix=("enc",), require=())
    params, _ = load_encoder(params, foundation, prefix=("mid",), require=())
    return params
  return load_encoder(student_params, foundation)[0]


@jax.jit
def _finite_rows(tree) -> jax.Array:
  """Bool [n]: every parameter of stacked model i is finite."""
  return jnp.stack([jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1) for a in jax.tree.leaves(tree)]).all(0)


_CACHE: dict = {}  # models and jitted programs by what they depend on (see _cached)


def _cached(key, make):
  """Models and jitted programs shared by every Experiment in this process whose config gives the same
  ``key`` (a re-run, a resumed run, tests): each program compiles once."""
  if key not in _CACHE:
    if len(_CACHE) >= 64:
      _CACHE.clear()
    _CACHE[key] = make()
  return _CACHE[key]


def _json(tree) -> str:
  return json.dumps(tree.to_dict() if isinstance(tree, ml_collections.ConfigDict) else tree, sort_keys=True)


def _build_model(m, image_size: int):
  try:
    apply, apply_wf, params = init_model(m, 0)
    jax.eval_shape(apply_wf, params, jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32))
  except (ValueError, TypeError, AssertionError, ZeroDivisionError) as e:
    raise ConfigError(
      f"config.teacher / config.student: the model {m.name} cannot be built "
      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); fix its sizes"
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
    self.parsed = validate(c)
    self.cfg_json = ckpt_lib.config_json(c)
    self.adj = self.parsed["adjacency"]
    self.gossip_w = topology.metropolis_hastings(self.adj)
    self.data = SiloData(c)
    self.seg_loss = make_segmentation_loss(SEG_LOSS)
    self._teacher_key = ("model", _json(c.teacher), c.image_size)
    self._student_key = ("model", _json(c.student), c.image_size)
    n = c.pretrain.num_silos
    self.mesh = client_mesh(c.mesh.client_devices or int(np.gcd(n, jax.device_count())))
    self.mesh1 = client_mesh(1)
    self._stop_checks = 0
    self._models = False

  def build_models(self) -> None:
    """The teacher and student (a ConfigError when they cannot be built); run() calls it after the
    workdir checks, before anything trains."""
    if self._models:
      return
    c = self.c
    self.t_apply, self.t_apply_wf = _cached(self._teacher_key, lambda: _build_model(c.teacher, c.image_size))
    self.s_apply, self.s_apply_wf = _cached(self._student_key, lambda: _build_model(c.student, c.image_size))
    # compiled once for all runs
    self.predict = _cached(
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

  def _options(self, method: str, distill: bool) -> fedefm_lib.FedEFMOptions:
    f = self.c.fedefm
    mixing = {"fedavg": "cfl", "moon": "cfl", "centralized": "cfl", "ring": "dfl", "matcha": "dfl", "fedefm": f.mixing}[
      method
    ]
    return fedefm_lib.FedEFMOptions(
      distill=distill,
      beta=f.beta,
      temperature=f.temperature,
      expert_steps=f.expert_steps,
      emd_epsilon=f.emd_epsilon,
      emd_marginals=f.emd_marginals,
      emd_iters=f.emd_iters,
      weight_mode=f.weight_mode,
      weight_temperature=f.weight_temperature,
      detach_weights=f.detach_weights,
      mixing=mixing,
      moon_mu=f.moon_mu if method == "moon" else 0.0,
      moon_tau=f.moon_tau,
    )

  def _engine_options(self, method: str) -> engine.EngineOptions:
    e = self.c.engine
    per_shard = 1 if method == "centralized" else self.c.pretrain.num_silos // self.mesh.size
    return engine.resolve(
      e.client_layout,
      e.conv_lowering,
      "auto",
      model=self.c.teacher.name,
      clients_per_shard=per_shard,
      client_chunk=e.client_chunk,
    )

  def _round_fn(self, method: str, distill: bool):
    """The engine's round function for ``method``: ``(server, rows, batch, weights, W) -> (server, rows,
    metrics)`` with the silo models as rows (:class:`fedkd.distill.fedefm.FedEFMSilo`)."""
    # Keyed by what the program computes: methods with the same options (fedavg and FedEFM's warm-up
    # rounds, ring and matcha) share one compiled program.
    opts, p = self._options(method, distill), self.c.pretrain
    mesh = self.mesh1 if method == "centralized" else self.mesh
    eopts = self._engine_options(method)
    key = ("round", self._teacher_key, p.learning_rate, p.expert_learning_rate, opts, mesh.size, eopts)

    def build():
      t_apply_wf = self.t_apply_wf
      ctx = ClientContext(
        lambda q, x: t_apply_wf(q, x)[0], self.seg_loss, optax.adamw(p.learning_rate), apply_wf=t_apply_wf
      )
      alg = fedefm_lib.FedEFMSilo(opts, optax.adam(p.expert_learning_rate))
      return engine.make_round_fn(alg, ctx, mesh, eopts)

    return _cached(key, build)

  def checkpoint_dir(self, method: str, percent: float, seed: int) -> str:
    return os.path.join(self.workdir, "checkpoints", foundation_key(percent, method, seed))

  def _load(self, ckpt: ckpt_lib.Checkpointer, r: int, like: dict):
    """Everything pretraining needs from the checkpoint of round ``r`` (raises CheckpointError when it
    is damaged, ResumeRefused when it belongs to another config)."""
    diff = config_difference(ckpt.saved_config(r), self.cfg_json)
    if diff:
      raise ckpt_lib.ResumeRefused(
        f"the checkpoint for round {r} in {ckpt.directory} was written with another config (config.{diff} "
        "differs); use a new --workdir, or the original config (only config.experiment, config.checkpoint "
        "and config.log_every may change)"
      )
    data = ckpt.saved_data_state(r)
    if data.get("round") != r or not isinstance(data.get("metrics"), dict):
      raise ckpt_lib.CheckpointError(
        f"checkpoint for round {r} in {ckpt.directory} holds no FedEFM pretraining state (no round metrics)"
      )
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
    raise DivergedError(
      f"{label}: pretraining diverged at round {r}: the {what} of {who} is NaN/Inf ({kept}); likely cause: "
      f"config.pretrain.learning_rate={p.learning_rate:g} is too high (overseas experts: "
      f"config.pretrain.expert_learning_rate={p.expert_learning_rate:g}); lower it, e.g. "
      f"--config.pretrain.learning_rate={p.learning_rate / 10:g}, and use a new --workdir"
    )

  def pretrain(self, method: str, percent: float, seed: int, label: str | None = None):
    """Foundation parameters (teacher architecture) for ``method``, and the last round's metrics.

    Resumes from the run's newest intact checkpoint; saves every ``checkpoint.every`` rounds, at the
    last round, and when ``stop`` asks (then raises ``Stopped``)."""
    self.build_models()
    c, p = self.c, self.c.pretrain
    label = label or f"{percent:g}% unseen, {method}, seed {seed}"
    _, _, params0 = init_model(c.teacher, seed)
    types = self.data.silo_types(percent, seed)
    n = 1 if method == "centralized" else p.num_silos
    mesh = self.mesh1 if method == "centralized" else self.mesh
    # Carried between rounds: the mixed models (next round's start) and each silo's trained model
    # (MOON's negative). The silo optimisers start fresh every round. Two separate buffers: the round
    # donates both (one array in both places is "donate the same buffer twice" where MOON reads prev).
    state = shard_clients({"params": fedefm_lib.stack(params0, n), "prev": fedefm_lib.stack(params0, n)}, mesh)
    metrics_json: dict = {}
    ckpt = ckpt_lib.Checkpointer(self.checkpoint_dir(method, percent, seed), c.checkpoint.max_to_keep)
    try:
      start, out = ckpt.restore_latest(lambda r: self._load(ckpt, r, state), self.log)
      if start is None:
        start = 0
      else:
        state, data = out
        metrics_json = data["metrics"]
        self.log(f"  {label}: resuming pretraining after round {start}/{p.num_rounds} (checkpoint in {ckpt.directory})")
      last_saved = start or None
      idx, mask = topology.neighbour_table(self.adj)
      base = topology.complete(p.num_silos) > 0
      timed, timed_s = 0, 0.0
      for r in range(start + 1, p.num_rounds + 1):
        t0 = time.time()
        xs, ys = self.data.round_batches(types, seed, r)  # a function of (seed, r) only
        if method == "centralized":  # pool all silos' batches: one model, same images per step
          xs = jnp.swapaxes(xs, 0, 1).reshape((1, p.local_steps, -1) + xs.shape[3:])
          ys = jnp.swapaxes(ys, 0, 1).reshape((1, p.local_steps, -1) + ys.shape[3:])
          nbr, nmask, W = np.zeros((1, 1), np.int32), np.zeros((1, 1), bool), np.ones((1, 1), np.float32)
        else:
          nbr, nmask = idx, mask
          W = topology.matcha(base, c.fedefm.matcha_budget, seed, r) if method == "matcha" else self.gossip_w
        distill = method == "fedefm" and r > c.fedefm.warmup_rounds
        fn = self._round_fn(method, distill)
        batch = shard_clients({"x": xs, "y": ys, "nbr": jnp.asarray(nbr), "nbr_mask": jnp.asarray(nmask)}, mesh)
        server = replicate({"round": jnp.asarray(r - 1, jnp.int32)}, mesh)
        _, state, metrics = fn(server, state, batch, shard_clients(jnp.ones(n), mesh), jnp.asarray(W, jnp.float32))
        metrics = dict(metrics, loss=metrics["client_loss"])  # per silo
        self._check_finite(label, r, method, metrics, state, last_saved)  # waits for the round
        metrics_json = {k: np.asarray(v).tolist() for k, v in metrics.items() if k in ("loss", "kd", "w")}
        dt = time.time() - t0
        if r > start + 1:  # the first round of a process includes compilation
          timed, timed_s = timed + 1, timed_s + dt
        if r % c.log_every == 0 or r == p.num_rounds:
          pace = (
            f"{timed / timed_s:.2f} rounds/s  eta {_duration((p.num_rounds - r) * timed_s / timed)}"
            if timed and timed_s > 0
            else f"{dt:.1f}s (first round: may include compilation)"
          )
          self.log(
            f"  {label}: pretraining round {r}/{p.num_rounds}  loss {float(np.mean(metrics_json['loss'])):.4f}  {pace}"
          )
        stopping = self._stop_requested()
        if r % c.checkpoint.every == 0 or r == p.num_rounds or stopping:
          ckpt.save(r, state, self.cfg_json, {"round": r, "metrics": metrics_json})
          last_saved = r
        if stopping:
          ckpt.wait()
          raise self._stopped(r, f"{label}, pretraining round")
    finally:
      ckpt.close()  # finishes pending async saves, also when the run dies mid-way
    return jax.tree.map(np.asarray, fedefm_lib.mean_model(state["params"])), metrics_json

  # ------------------------------------------------------------------ downstream

  def _finetune_fn(self, kd: bool):
    d = self.c.downstream
    key = (
      "finetune",
      self._student_key,
      self._teacher_key,
      kd,
      d.learning_rate,
      d.kd_pixel_weight,
      d.kd_feature_weight,
      d.kd_temperature,
    )
    return _cached(key, lambda: self._make_finetune_fn(kd))

  def _make_finetune_fn(self, kd: bool):
    d = self.c.downstream  # values read now: the program is shared by configs with the same key
    tx = optax.adam(d.learning_rate)
    nc = self.c.student.num_classes
    pixel_w, feature_w, temp = float(d.kd_pixel_weight), float(d.kd_feature_weight), float(d.kd_temperature)
    s_apply_wf, t_apply_wf, seg_loss = self.s_apply_wf, self.t_apply_wf, self.seg_loss

    def loss_fn(p, teacher, x, y):
      logits, feats = s_apply_wf(p, x)
      loss = seg_loss(logits, y)
      if kd:
        t_logits, t_feats = t_apply_wf(teacher, x)
        loss = loss + pixel_w * kd_kl(logits, t_logits[..., :nc], temp)
        loss = loss + feature_w * feature_kd(feats, t_feats)
      return loss

    @jax.jit
    def step(p, o, teacher, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, teacher, x, y)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o, loss

    return step, tx

  def finetune(self, foundation, kd: bool, seed: int, label: str | None = None) -> dict:
    self.build_models()
    c, d = self.c, self.c.downstream
    label = label or f"{'teacher-KD ' if kd else ''}fine-tune seed {seed}"
    _, _, params = init_model(c.student, seed + 1000)
    if foundation is not None:
      params = transfer_encoder(params, foundation, c.student.name)
    x_tr, y_tr = self.data.target(seed, 0, d.train_examples)
    x_te, y_te = self.data.target(seed, 1, d.test_examples)
    step, tx = self._finetune_fn(kd)
    opt = tx.init(params)
    teacher = foundation if kd else None
    rng = np.random.default_rng([seed, 99])
    for first in range(0, d.steps, FT_CHUNK):
      last = min(first + FT_CHUNK, d.steps)
      losses = []
      for _ in range(first, last):
        b = jnp.asarray(rng.integers(0, d.train_examples, d.batch_size))
        params, opt, loss = step(params, opt, teacher, x_tr[b], y_tr[b])
        losses.append(loss)
      values = np.asarray(jax.device_get(losses), np.float64)
      bad = np.flatnonzero(~np.isfinite(values))
      if len(bad):
        hint = " (or the teacher-KD terms: config.downstream.kd_pixel_weight / kd_feature_weight)" if kd else ""
        raise DivergedError(
          f"{label}: fine-tuning diverged at step {first + int(bad[0]) + 1}/{d.steps}: the loss is "
          f"{values[bad[0]]}; likely cause: config.downstream.learning_rate={d.learning_rate:g} is too "
          f"high{hint}; lower it, e.g. --config.downstream.learning_rate={d.learning_rate / 10:g}, and use "
          "a new --workdir"
        )
      if last < d.steps and self._stop_requested():
        raise self._stopped(last, f"{label}, fine-tuning (it restarts on re-run) step")
    return overlap_scores(self.predict(params, x_te), y_te, foreground_classes(3))  # catheter, guidewire

  # ------------------------------------------------------------------ orchestration

  def plan(self) -> list[tuple[float, str, bool, int]]:
    pr, main = self.parsed, float(self.c.pretrain.unseen_percent)
    entries = []
    for seed in pr["seeds"]:
      for percent in [main] + [p for p in pr["percents"] if p != main]:
        methods = pr["methods"] if percent == main else pr["ablation_methods"]
        for m in methods:
          entries.append((percent, m, False, seed))
          if m in pr["kd_methods"]:
            entries.append((percent, m, True, seed))
    return entries

  def read_results(self, raw_path: str) -> dict:
    """Finished runs of results_raw.jsonl by (percent, method, kd, seed). A last line cut short (the
    experiment was killed while writing it) is dropped with a note and removed from the file; any
    other unreadable line is a ConfigError naming it."""
    if not os.path.exists(raw_path):
      return {}
    with open(raw_path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline; else a line cut short
    if not tail.strip("\x00 \t\r") and tail:
      tail = "\x00"  # NUL padding of a crashed write: not a record
    numbered = [(i, line) for i, line in enumerate(lines + ([tail] if tail else []), 1) if line.strip()]
    done, kept = {}, []
    for pos, (i, line) in enumerate(numbered):
      try:
        r = json.loads(line)
        if not isinstance(r, dict) or any(k not in r for k in RESULT_KEYS[:4]):
          raise ValueError(f"not a result record (needs {', '.join(RESULT_KEYS[:4])})")
        key = (r["unseen_percent"], r["method"], r["teacher_kd"], r["seed"])
        hash(key)
      except (ValueError, TypeError) as e:
        if pos == len(numbered) - 1:  # the last line: a write cut short by a kill
          self.log(
            f"note: {raw_path}: dropped its last line ({i}), which was cut short (the experiment was "
            "stopped while writing it); that run is redone"
          )
          write_atomic(epath.Path(raw_path), "".join(l + "\n" for l in kept))
          return done
        raise ConfigError(
          f"{raw_path}: line {i} is unreadable ({type(e).__name__}: {str(e)[:120]}); delete "
          "that line (its run is redone) or use a new --workdir"
        ) from None
      done[key] = r
      kept.append(line)
    if tail:  # a complete last record without its newline: end the line before appending more
      write_atomic(epath.Path(raw_path), "".join(l + "\n" for l in kept))
    return done

  def read_saved_config(self, cfg_path: str) -> dict:
    try:
      with open(cfg_path, encoding="utf-8") as f:
        saved = json.load(f)
      if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
      raise ConfigError(
        f"{cfg_path} is unreadable ({type(e).__name__}: {str(e)[:120]}), so the results and checkpoints in "
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
            f"(config.{diff} differs); use a new --workdir, or the original config (only "
            "config.experiment, config.checkpoint and config.log_every may change)"
          )
        return
    finally:
      ckpt.close()

  def run(self) -> list[dict]:
    os.makedirs(self.workdir, exist_ok=True)
    raw_path = os.path.join(self.workdir, "results_raw.jsonl")
    done = self.read_results(raw_path)
    ck_root = os.path.join(self.workdir, "checkpoints")
    in_progress = sorted(os.listdir(ck_root)) if os.path.isdir(ck_root) else []
    cfg_path = os.path.join(self.workdir, "config.json")
    if (done or in_progress) and os.path.exists(cfg_path):
      diff = config_difference(self.read_saved_config(cfg_path), self.cfg_json)
      if diff:
        raise ConfigError(
          f"{self.workdir} holds results of another config (config.{diff} differs); use a "
          "new --workdir, or the original config (only config.experiment, config.checkpoint "
          "and config.log_every may change)"
        )
    for name in in_progress:  # also when config.json is gone: each checkpoint carries its config
      self._check_checkpoint_config(os.path.join(ck_root, name))
    for r in done.values():  # checked after the config: a record of another config is that error
      missing = [k for k in RESULT_KEYS if k not in r]
      if missing:
        raise ConfigError(
          f"{raw_path}: the record of {r['method']} seed {r['seed']} lacks {', '.join(missing)}; "
          "delete that line (its run is redone) or use a new --workdir"
        )
    self.build_models()
    write_atomic(epath.Path(cfg_path), self.c.to_json(indent=2))
    plan = self.plan()
    users: dict = {}  # foundation key -> the plan entries fine-tuned from it
    for e in plan:
      if e[1] != "scratch":
        users.setdefault(foundation_key(e[0], e[1], e[3]), []).append(e)
    for name in in_progress:  # left by a run killed between its last result and the clean-up
      if name in users and all(e in done for e in users[name]):
        shutil.rmtree(os.path.join(ck_root, name), ignore_errors=True)
    self.log(
      f"fedkd fedefm: {len(plan)} runs ({len(done)} already done) -> {self.workdir}; "
      f"{self.c.pretrain.num_silos} silos, {self.c.pretrain.num_rounds} rounds, {self.c.image_size}px"
    )
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
        cache[found_key] = self.pretrain(method, percent, seed, label=label)
      foundation, pre = cache.get(found_key, (None, {}))
      res = self.finetune(foundation, kd, seed, label=label)
      rec = {
        "unseen_percent": percent,
        "method": method,
        "teacher_kd": kd,
        "seed": seed,
        **res,
        "seconds": round(time.time() - t, 2),
        "pretrain_final": pre,
      }
      with open(raw_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
      done[key] = rec
      self.log(
        f"[{k:>3}/{len(plan)}] {percent:5.1f}% unseen  {method + (' +KD' if kd else ''):<16} seed {seed}:"
        f"  dice catheter {res['dice/catheter']:.4f}  guidewire {res['dice/guidewire']:.4f}"
        f"  ({time.time() - t:.1f}s, total {time.time() - t0:.0f}s)"
      )
      fkey = foundation_key(percent, method, seed)
      if method != "scratch" and all(e in done for e in users[fkey]):
        shutil.rmtree(self.checkpoint_dir(method, percent, seed), ignore_errors=True)
      if any(e not in done for e in plan) and self._stop_requested():
        raise self._stopped(k, "the end of run")
    if os.path.isdir(ck_root) and not os.listdir(ck_root):
      os.rmdir(ck_root)
    rows = [done[e] for e in plan]
    self.write_tables(rows)
    return rows

  def write_tables(self, rows: list[dict]) -> None:
    """results.md / results.csv: one row per (unseen %, method, teacher KD), mean ± std over seeds
    (``fedkd.report``'s convention: sample std, ddof=1; n/a for one seed)."""
    keys = ["dice/catheter", "dice/guidewire", "iou/catheter", "iou/guidewire"]
    groups: dict = {}
    for r in rows:
      groups.setdefault((r["unseen_percent"], r["method"], r["teacher_kd"]), []).append(r)
    md = report.mean_std_tables(
      os.path.join(self.workdir, "results.md"),
      os.path.join(self.workdir, "results.csv"),
      ["unseen_percent", "method", "teacher_kd", "seeds"],
      [
        ([f"{pct:g}", m, "yes" if kd else "no", len(rs)], {k: [r[k] for r in rs] for k in keys})
        for (pct, m, kd), rs in groups.items()
      ],
      keys,
      headers=["unseen %", "foundation", "teacher KD", "seeds"],
      caption=f"Target site {TARGET[0]} ({self.c.downstream.train_examples} training images).",
      digits=3,
    )
    self.log("\n" + "\n".join(md))
    self.log(f"\nwrote {self.workdir}/results.md, results.csv, results_raw.jsonl")


def run(config, workdir: str, log: Callable[[str], None] = _print, stop=None) -> list[dict]:
  """The whole experiment; ``stop``: a ``fedkd.preemption.StopSignals`` (None = never stop).
  Raises ``Stopped`` after saving when ``stop`` asks, ``DivergedError`` on NaN/Inf training and
  ``ConfigError`` (before anything trains) for a bad setting or a workdir of another config."""
  return Experiment(config, workdir, log, stop).run()
