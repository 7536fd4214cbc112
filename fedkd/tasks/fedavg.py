"""Federated training of the segmenter on simulated hospitals (FedAvg family), with evaluation,
checkpoints and exact resume. Python loops over rounds only; each round is one jitted program."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from fedkd import checkpoint as ckpt_lib
from fedkd.config import (
  INERT_UNLESS,
  LINEAR_AGGREGATORS,
  ConfigError,
  base_config,
  clients_in_flight,
  flat_dict,
  dropout_note,
  krum_note,
  num_attackers,
  ran_as,
  unread_by_both,
  unroll_local_steps,
  validate,
)
from fedkd.errors import DivergedError, NonFiniteOutput, first_names
from fedkd.preemption import Stopped, requested_again
from fedkd.workdir import prepare, write_atomic
from fedkd.data.pipeline import evaluated_sites, make_client_data
from fedkd.fl import client_state as client_state_lib
from fedkd.fl import aggregate, algorithms, attacks, compress, dp, engine
from fedkd.fl.algorithm import ClientContext
from fedkd.fl.algorithms import fedbn
from fedkd.logs import RunLog, evaluations_left, compiling_line, round_line
from fedkd.losses import make_segmentation_loss
from fedkd.evaluate import Evaluator, summarize
from fedkd.models import init_model
from fedkd.report import site_table
from fedkd.tasks.kept import Kept
from fedkd.sharding import client_mesh, local_copy, local_rows, replicate, shard_clients

# Config keys (groups, or single dotted keys) that may change between a checkpoint and its resumed
# run without changing the numbers beyond float rounding (or, dp.target_epsilon, only where the run
# stops). engine.compute_dtype does change them;
# algorithm.client_state (host <-> device) holds the same numbers in one checkpoint format.
RESUMABLE_CHANGES = (
  "num_rounds",
  "eval",
  "checkpoint",
  "engine",
  "mesh",
  "algorithm.client_state",
  "dp.target_epsilon",  # raised to continue a run that stopped at its privacy budget
  "data.workers",  # where batches are made, not which
  "data.prefetch",
  "data.tfds_data_dir",  # where the prepared sites are read (moved data): the saved record counts refuse other data
)
NOT_RESUMABLE = ("engine.compute_dtype",)


def _may_change(key: str) -> bool:
  return key not in NOT_RESUMABLE and (key in RESUMABLE_CHANGES or key.split(".")[0] in RESUMABLE_CHANGES)


def sample_clients(key: jax.Array, num_clients: int, k: int) -> np.ndarray:
  return np.asarray(jax.random.choice(key, num_clients, (k,), replace=False))


def draw_reported(key: jax.Array, dropout: float, k: int) -> np.ndarray:
  """[k] bool: which of the round's k sampled clients report (each fails with probability ``dropout``),
  from the round's client-sampling key (folded, so the sampling itself is unchanged)."""
  return np.asarray(jax.random.uniform(jax.random.fold_in(key, 2), (k,)) >= dropout)


def draw_local_steps(key: jax.Array, low: int, high: int, k: int) -> np.ndarray:
  """[k] local step counts, uniform in low..high (config.algorithm.local_steps_min..local_steps), from
  the round's client-sampling key (folded, so the sampling itself is unchanged)."""
  return np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (k,), low, high + 1), np.int32)


# The jitted round programs of this process's latest runs, by what they are built from: the whole config, the
# resolved engine options and the mesh's devices (fedkd.tasks.kept). A resumed run in the same process or a
# sweep's repeat skips tracing and lowering: about 1 s of CPU per repeated run in tests/test_resume_matrix.py
# on 2 cores. A few only: each holds its compiled programs.
ROUND_FNS = Kept(4)


def _flat_configs(saved: dict, current: dict) -> tuple[dict, dict, dict]:
  """Both configs flat (:func:`fedkd.config.flat_dict`), and :func:`fedkd.config.ran_as`'s values for the keys
  the saved config lacks."""
  a, b = flat_dict(saved), flat_dict(current)
  return a, b, ran_as(a, b)


def resume_differences(saved: dict, current: dict) -> list[str]:
  """The dotted keys, sorted, in which a run's saved config and ``current`` differ beyond what may change
  on resume (:data:`RESUMABLE_CHANGES`) and beyond keys neither run reads (:func:`fedkd.config.unused_keys` of
  both: ``algorithm.prox_mu`` of two FedAvg runs). A key the saved config lacks was added to the schema later; its
  default (or, where :data:`fedkd.config.ADDED_KEYS` says so, the value its run ran with) may stand."""
  return _differences(*_flat_configs(saved, current), unread_by_both(saved, current))


def _differences(a: dict, b: dict, ran: dict, unread: set[str] = frozenset()) -> list[str]:
  defaults = flat_dict(base_config().to_dict()) | ran

  def inert(k):  # a key neither run depends on (INERT_UNLESS)
    return k in INERT_UNLESS and not INERT_UNLESS[k](a) and not INERT_UNLESS[k](b)

  return sorted(
    k
    for k in set(a) | set(b)
    if a.get(k) != b.get(k)
    and not _may_change(k)
    and not inert(k)
    and k not in unread
    and not (k not in a and k in defaults and b.get(k) == defaults[k])
  )


def _check_resumable(saved: dict, current: dict, directory: str) -> None:
  a, b, ran = _flat_configs(saved, current)
  for k, value in ran.items():
    if b[k] != value:
      raise ckpt_lib.ResumeRefused(
        f"the checkpoint in {directory} was written before config.{k} existed and behaves as "
        f"{value!r}, but this run has {b.get(k)!r}; pass --config.{k}={value} to resume it, or use a new --workdir"
      )
  diff = _differences(a, b, ran, unread_by_both(saved, current))
  if diff:
    k = diff[0]
    # ResumeRefused, not CheckpointError: this checkpoint is intact but belongs to another experiment,
    # so restore_latest must not take it for damage and fall back over (and then condemn) every step.
    raise ckpt_lib.ResumeRefused(
      f"the checkpoint in {directory} was written with config.{k}={a.get(k)!r} but this run has "
      f"{b.get(k)!r} ({len(diff)} key(s) differ: {first_names(diff, 8)}); use a new --workdir to start "
      "a different experiment, or the original config to resume"
    )


def _diverged(
  r: int, m: dict, clients: np.ndarray, config, good: int | None, ckdir: str, counted: bool = True
) -> DivergedError:
  """The one-line error of a diverged round. ``counted``: whether any client's update counted (False: every
  reporting client diverged under engine.skip_nonfinite_clients or a robust aggregator, so the round has no
  loss)."""
  bad = [int(c) for c, ok in zip(clients, np.asarray(m["client_finite"])) if not ok]
  who = (
    f"non-finite updates from client(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} of {len(clients)}"
    if bad
    else "the aggregate became non-finite"
  )
  kept = f"the last good checkpoint (round {good}) in {ckdir} is kept" if good else "no checkpoint was written"
  robust = config.aggregator.name not in LINEAR_AGGREGATORS  # drops non-finite clients itself
  dropping = config.engine.skip_nonfinite_clients or robust  # a round whose every client diverged has no loss
  if not dropping and bad:  # (with every client finite, the aggregate itself overflowed: dropping clients cannot help)
    skip = ", or set --config.engine.skip_nonfinite_clients=True to drop such clients"
  elif bad and not counted:
    dropper = f"aggregator.name={config.aggregator.name!r}" if robust else "engine.skip_nonfinite_clients"
    skip = f" ({dropper} dropped every reporting client)"
  else:
    skip = ""
  return DivergedError(
    f"training diverged in round {r}: loss {'none' if dropping and not counted else float(m['loss'])}, {who}; "
    f"{_likely_cause(config)}{skip}; {kept}, nothing of this round was saved"
  )


def evaluated(config, r: int, last_round: int) -> bool:
  """Whether round ``r`` is evaluated: every ``eval.every``-th round and the last."""
  return r % config.eval.every == 0 or r == last_round


def scored_or_saved(config, r: int, last_round: int) -> bool:
  """Whether round ``r`` is evaluated or checkpointed (a stop signal aside): its model must then give finite outputs
  (finite but huge parameters can overflow), checked before anything of the round is written."""
  return evaluated(config, r, last_round) or r % config.checkpoint.every == 0


def _diverged_outputs(r: int, e: Exception, config, good: int | None, ckdir: str) -> DivergedError:
  """The one-line error of a round whose model is finite but gives NaN/Inf outputs (huge parameters overflow):
  found when the round is evaluated or saved, before either is written."""
  kept = f"the last good checkpoint (round {good}) in {ckdir} is kept" if good else "no checkpoint was written"
  return DivergedError(
    f"training diverged by round {r}: {e}; {_likely_cause(config)}; {kept}, nothing of this round was saved"
  )


def _likely_cause(config) -> str:
  """The advice of a diverged run: the learning rates, and the pull or DP noise that can add to them."""
  a, lr = config.algorithm, config.client_optimizer.learning_rate
  pull = {"ditto": ("ditto_lambda", a.ditto_lambda), "fedprox": ("prox_mu", a.prox_mu)}.get(a.name)
  pull = f", or config.algorithm.{pull[0]}={pull[1]:g} too large for it" if pull else ""
  d = config.dp
  if d.enabled:  # the server adds N(0, (z C / m)^2) to every coordinate of the averaged update
    std = d.noise_multiplier * d.clip_norm / config.clients_per_round
    pull += (
      f", or the DP noise (std {std:.3g} per coordinate of the averaged update: config.dp.noise_multiplier="
      f"{d.noise_multiplier:g} x dp.clip_norm={d.clip_norm:g} / {config.clients_per_round} clients a round)"
    )
  return (
    f"likely cause: a learning rate too large (config.client_optimizer.learning_rate={lr:g}, "
    f"server_optimizer.learning_rate={config.server_optimizer.learning_rate:g}){pull}: lower it"
  )


class _Privacy:
  """The run's DP accounting at config.dp.delta (fedkd.fl.dp with Google's dp-accounting; dp.epsilon
  caches its values)."""

  def __init__(self, config):
    d = config.dp
    self.z, self.clip, self.delta, self.target = (
      float(d.noise_multiplier),
      float(d.clip_norm),
      float(d.delta),
      float(d.target_epsilon),
    )
    self.n, self.k = int(config.num_clients), int(config.clients_per_round)

  def epsilon(self, r: int) -> float:
    return float(dp.epsilon(self.z, self.n, self.k, r, self.delta))

  def max_rounds(self, limit: int) -> int:
    return int(dp.max_rounds(self.target, self.z, self.n, self.k, self.delta, limit))

  def plan(self, rounds: int) -> str:
    """The mechanism and the (epsilon, delta) it spends in ``rounds`` rounds (dp.describe)."""
    weak = f"; note: delta >= 1/num_clients = {1 / self.n:.2g} is weak" if self.delta >= 1 / self.n else ""
    return dp.describe(self.z, self.clip, self.n, self.k, rounds, self.delta) + weak

  def round_record(self, r: int, norms: np.ndarray, clipped: np.ndarray) -> dict:
    """Round ``r``'s privacy entries (rounds.jsonl and scalars) from its reporting clients' update norms
    before clipping and clipped flags: epsilon so far, the median norm (a common choice of clip_norm),
    the fraction clipped; the last two are None in a round in which no client reported."""
    return {
      "dp/epsilon": self.epsilon(r),
      "dp/median_norm": float(np.median(norms)) if len(norms) else None,
      "dp/clipped_fraction": float(np.mean(clipped)) if len(clipped) else None,
    }

  def spent(self, r: int) -> str:
    return f"epsilon {self.epsilon(r):.3f} at delta {self.delta:g} after {r} rounds (noise multiplier {self.z:g})"


def _host_all(x) -> np.ndarray:
  """A per-client round output [C] as one host array (every process's clients)."""
  return np.asarray(x if jax.process_count() == 1 else multihost_utils.process_allgather(x, tiled=True))


def _aggregator_params(config) -> dict:
  a = config.aggregator
  return {
    "median": {},
    "trimmed_mean": {"beta": float(a.trim_beta)},
    "krum": {"f": int(a.krum_f)},
    "multi_krum": {"f": int(a.krum_f), **({"k": int(a.multi_krum_k)} if a.multi_krum_k else {})},
    "norm_clip": {"clip": float(a.clip_norm)},
  }[a.name]


def _attack_params(config) -> dict:
  return {
    "sign_flip": {},
    "scale": {"factor": float(config.attack.factor)},
    "gaussian": {"std": float(config.attack.noise_std)},
  }[config.attack.name]


def make_algorithm(config, server_tx, prox_mu=None):
  """config.algorithm.name with its parameters and ``server_tx``, before any wrapper (robust
  aggregator, attack, compression, DP). ``prox_mu``: instead of config.algorithm.prox_mu (a traced
  scalar: fedkd.tasks.replicas)."""
  return algorithms.make(
    config.algorithm.name,
    server_tx,
    client_lr=float(config.client_optimizer.learning_rate),
    num_clients=config.num_clients,
    moon_mu=config.algorithm.moon_mu,
    moon_tau=config.algorithm.moon_tau,
    prox_mu=config.algorithm.prox_mu if prox_mu is None else prox_mu,
    scaffold_weighting=config.algorithm.scaffold_weighting,
    ditto_lambda=config.algorithm.ditto_lambda,
  )


def build_algorithm(config, server_tx):
  """The algorithm a run of ``config`` trains with: :func:`make_algorithm` with its robust aggregator, attack,
  compression and DP wrappers, in that order (what its per-client rows hold depends on them: ``fedkd.eval``
  builds it to read a checkpoint's personal models)."""
  alg = make_algorithm(config, server_tx)
  if config.aggregator.name != "mean":  # a robust statistic of the clients' deltas instead of their mean
    alg.aggregator = aggregate.make_aggregator(config.aggregator.name, **_aggregator_params(config))
  if num_attackers(config):
    alg = attacks.Attacked(alg, attacks.make_attack(config.attack.name, (), **_attack_params(config)))
  if config.compress.name != "none":
    alg = compress.Compressed(
      alg, config.compress.name, fraction=config.compress.fraction, error_feedback=config.compress.error_feedback
    )
  if config.dp.enabled:
    alg = dp.DPFedAvg(alg, config.dp.clip_norm, config.dp.noise_multiplier, config.clients_per_round)
  return alg


def make_context(config, apply, apply_wf, client_lr=None) -> ClientContext:
  """How a client trains: the model, the segmentation loss, the client optimizer, compute dtype, remat.
  ``client_lr``: instead of config.client_optimizer.learning_rate (a traced scalar: fedkd.tasks.replicas)."""
  return ClientContext(
    apply,
    make_segmentation_loss(config.loss),
    engine.make_optimizer(config.client_optimizer, client_lr),
    apply_wf=apply_wf,
    compute_dtype=jnp.dtype(config.engine.compute_dtype),
    remat=config.engine.remat,
  )


def shared_params(algorithm: str, params_like):
  """The leaves of ``params_like`` that travel between clients and server: all but FedBN's normalisation leaves,
  which each client keeps (its upload holds them as zeros, which a real deployment would not send)."""
  if algorithm != "fedbn":
    return params_like
  return [a for path, a in jax.tree_util.tree_leaves_with_path(params_like) if not fedbn.is_norm(path)]


def dense_bytes(algorithm: str, params_like) -> tuple[int, int, int]:
  """(bytes up per client, bytes down per client, of which beside the model) of one uncompressed round:
  the model delta in float32 plus SCAFFOLD's control-variate change / FedNova's tau up; the server model
  (and SCAFFOLD's control variate) down. FedBN's normalisation leaves stay with each client, both ways
  (:func:`shared_params`)."""
  model_bytes = compress.dense_bytes(shared_params(algorithm, params_like))
  beside = {"scaffold": model_bytes, "fednova": 4}.get(algorithm, 0)
  return model_bytes + beside, model_bytes * (2 if algorithm == "scaffold" else 1), beside


def round_logs(
  r: int,
  loss: float | None,
  clients,
  participants: int,
  sent: float,
  received: float,
  up_total: float,
  down_total: float,
) -> tuple[dict, dict]:
  """A round's rounds.jsonl record and its participation / communication scalars (callers add theirs).

  ``loss`` is None for a round in which no sampled client reported (``algorithm.dropout``): there is no
  training loss to average, and the record holds ``null``."""
  rec = {
    "round": r,
    "loss": loss,
    "clients": [int(c) for c in clients],
    "participants": participants,
    "comm/bytes_up": sent,
    "comm/bytes_down": received,
    "comm/bytes_up_total": up_total,
    "comm/bytes_down_total": down_total,
  }
  scalars = {
    "train/participants": float(participants),
    "comm/bytes_up": sent,
    "comm/bytes_down": received,
    "comm/bytes_up_total": up_total,
    "comm/bytes_down_total": down_total,
  }
  return rec, scalars


def speed_scalars(loss: float | None, seconds: float, images: int, input_wait: float) -> dict:
  """A round's loss and timing scalars (``images``: trained in the round); no ``train/loss`` when ``loss`` is
  None (no client reported)."""
  return {
    **({} if loss is None else {"train/loss": loss}),
    "train/round_seconds": seconds,
    "train/images_per_s": images / seconds,
    "train/input_wait_seconds": input_wait,
  }


def engine_options(config, n_dev: int, log: Callable[[str], None]) -> engine.EngineOptions:
  """The engine's layout and lowering for this config on ``n_dev`` devices ('auto' resolved)."""
  layout, lowering, chunk = engine.legacy_options(config.engine, log)
  return engine.resolve(
    layout,
    lowering,
    unroll_local_steps(config.engine),
    model=config.model.name,
    clients_per_shard=config.clients_per_round // n_dev,
    client_chunk=chunk,
    clients_in_flight=clients_in_flight(config.engine),
  )


def run(config, workdir, log: Callable[[str], None] = print, stop=None) -> dict:
  """Trains, evaluates and checkpoints; returns {'state', 'metrics' (last record), 'per_site'} and, for
  stateful algorithms, 'client_state' (the per-client store's state dict: ids ever sampled, rows).

  ``workdir``: a local path or ``gs://`` URL. ``stop``: a :class:`fedkd.preemption.StopSignals`; when it
  asks, the run saves the round just finished and raises :class:`fedkd.preemption.Stopped`. A round
  whose loss, client updates or new parameters are NaN/Inf raises :class:`DivergedError` before
  anything of it is written."""
  n_dev = validate(config, jax.device_count(), jax.process_count())
  privacy = _Privacy(config) if config.dp.enabled else None
  # the rounds the privacy budget allows (dp.target_epsilon; all of them without a target)
  budget = privacy.max_rounds(config.num_rounds) if privacy is not None and config.dp.target_epsilon else None
  if budget == 0:
    raise ConfigError(
      f"config.dp.target_epsilon={config.dp.target_epsilon:g} allows no round: one round already spends epsilon "
      f"{privacy.epsilon(1):.3f} at delta {config.dp.delta:g}; raise dp.target_epsilon or dp.noise_multiplier"
    )
  primary = jax.process_index() == 0
  if not primary:  # one process speaks and writes files; all of them compute and checkpoint
    log = lambda _: None  # noqa: E731
  workdir = prepare(os.fspath(workdir))
  mesh = client_mesh(n_dev)
  rows = local_rows(mesh, config.clients_per_round)
  engine_opts = engine_options(config, n_dev, log)
  data = make_client_data(config)
  sizes = data.sizes

  apply, apply_wf, params = init_model(config.model, config.seed)
  # the held-out sets before anything is written: a dataset without a test split leaves no workdir
  evaluator = Evaluator(config, apply, data.eval_sets(evaluated_sites(config)))
  unseen_name = data.unseen_name
  server_tx = engine.make_optimizer(config.server_optimizer)
  algorithm = config.algorithm.name
  alg = build_algorithm(config, server_tx)
  attackers = np.arange(config.num_clients) < num_attackers(config)  # by global client id
  # Bytes per client and round. Up: the model delta as the compressor sends it (dense float32 without
  # one), plus what travels beside it uncompressed: SCAFFOLD's control-variate change, FedNova's tau.
  # Down: the server model (and SCAFFOLD's control variate) to every sampled client.
  params_like = jax.eval_shape(lambda p: p, params)
  bytes_per_client, bytes_down, beside = dense_bytes(algorithm, params_like)
  if config.compress.name != "none":
    shared = shared_params(algorithm, params_like)
    bytes_per_client = compress.upload_bytes(config.compress.name, shared, config.compress.fraction) + beside
  ids_needed = attackers.any() or config.compress.name != "none"  # batch["client_id"] keys their randomness
  state = replicate(alg.init(params, jax.random.key(config.seed)), mesh)
  # Per-client state of stateful algorithms (SCAFFOLD's c_i, MOON's previous model), rows of all
  # num_clients clients on the host or the devices (config.algorithm.client_state); None for FedAvg.
  init_row = alg.init_row(params)
  clients_store = (
    None
    if init_row is None
    else client_state_lib.make_client_state(
      config.algorithm.client_state, jax.tree.map(np.asarray, init_row), config.num_clients, mesh, rows
    )
  )
  del init_row
  cfg_json = ckpt_lib.config_json(config)
  round_fn = ROUND_FNS.get(
    (json.dumps(cfg_json, sort_keys=True), engine_opts, tuple(d.id for d in mesh.devices.flat)),
    lambda: engine.make_round_fn(
      alg,
      make_context(config, apply, apply_wf),
      mesh,
      engine_opts,
      skip_nonfinite=config.engine.skip_nonfinite_clients,
    ),
  )
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint.max_to_keep, cleanup_tmp=True)
  runlog = RunLog(workdir, enabled=primary, note=log)
  like = state

  def load(r):
    _check_resumable(ckpt.saved_config(r), cfg_json, ckpt.directory)
    restored, _ = ckpt.restore(r, like)
    data_state = ckpt.saved_data_state(r)
    why = data.damaged(data_state)
    if why is not None:  # a damaged step: restore_latest falls back to an older one
      raise ckpt_lib.CheckpointError(f"checkpoint for round {r} in {ckpt.directory} is unreadable ({why})", why)
    rows_state = None
    if clients_store is not None:
      n_rows = ckpt.saved_client_rows(r)
      if n_rows is None:
        raise ckpt_lib.ResumeRefused(
          f"the checkpoint for round {r} in {ckpt.directory} holds no per-client state, which "
          f"algorithm {algorithm!r} needs; use a new --workdir or the config it was written with"
        )
      rows_state = ckpt.restore_client_state(r, clients_store.empty_state_dict(n_rows))
    return restored, data_state, rows_state

  start, loaded = ckpt.restore_latest(load, log)
  if start is not None:
    if start > config.num_rounds:
      ckpt.close()
      raise ckpt_lib.ResumeRefused(
        f"{workdir} already holds round {start}, beyond config.num_rounds={config.num_rounds}; pass "
        f"--config.num_rounds={start} (or more) to continue it, evaluate an earlier round with "
        f"python -m fedkd.eval --workdir={workdir} --round=R, or use a new --workdir"
      )
    state, data_state, rows_state = loaded
    data.set_state(data_state)
    if clients_store is not None:
      clients_store.load_state_dict(rows_state)
    runlog.truncate_after(start)
    log(f"resuming from round {start} (checkpoint in {ckpt.directory})")
  else:
    start = 0
    runlog.truncate_after(-1)  # records of an attempt that died before its first checkpoint
  if primary:  # on resume too: what may change then (num_rounds, eval.*, ...) is the current run's
    write_atomic(workdir / "config.json", json.dumps(cfg_json, indent=2))
  del loaded

  # personalised algorithms (fedbn, ditto): each training site evaluated with its client's own model
  personal_sites = {}
  if clients_store is not None and config.data.source == "synthetic":
    probe = alg.personal(params, clients_store.host_row(0))
    if probe is not None:
      personal_sites = {data.site_names[i]: i for i in evaluated_sites(config)}
  elif config.algorithm.name in ("fedbn", "ditto"):
    log(
      f"note: {config.data.source} sites are not one client each, so every site is evaluated with the global model"
      + (
        ", whose normalisation layers FedBN never trains (they keep their initial values): the scores do not "
        "measure FedBN's personal models"
        if config.algorithm.name == "fedbn"
        else ""
      )
    )

  def eval_params():
    """The global model, and the personal model of each training site whose client was sampled: a client never
    sampled is scored with the global model, which it would receive first (its row still holds the initial
    model: Ditto's v_i would be the untrained round-0 model in the training-site mean)."""
    params_now = local_copy(state["params"])
    site_params = {
      name: alg.personal(params_now, clients_store.host_row(i))
      for name, i in personal_sites.items()
      if clients_store.was_sampled(i)
    }
    return params_now, site_params

  def check_outputs(r):
    """Before round ``r``'s record and checkpoint, at a round that is saved but not evaluated: the diverged-run
    error where its model's outputs are NaN/Inf (on the first prediction batch)."""
    try:
      evaluator.check_outputs(local_copy(state["params"]))
    except NonFiniteOutput as e:
      raise _diverged_outputs(r, e, config, last_saved, ckpt.directory) from None

  def score(r):
    """Round ``r``'s per-site scores, made before anything of the round is written: a model whose outputs are
    NaN/Inf on any held-out image is the diverged-run error instead (a diverged model has no scores)."""
    try:
      return evaluator(*eval_params())
    except NonFiniteOutput as e:
      raise _diverged_outputs(r, e, config, last_saved, ckpt.directory) from None

  def record_scores(r, per_site):
    rec = summarize(r, per_site, unseen_name)
    rec.update(_extras(r))
    runlog.record(rec)
    return rec

  # bytes so far: those of the rounds before a resumed checkpoint from their rounds.jsonl records
  bytes_total = sum(float(rr.get("comm/bytes_up", 0)) for rr in runlog.rounds)
  bytes_down_total = sum(float(rr.get("comm/bytes_down", 0)) for rr in runlog.rounds)

  def _extras(r):
    """Privacy spent and bytes sent so far, for evaluation records."""
    out = {"comm/bytes_up_total": bytes_total, "comm/bytes_down_total": bytes_down_total}
    if privacy is not None:
      out["dp/epsilon"] = privacy.epsilon(r)
    return out

  local_work = (
    f"{config.algorithm.local_steps_min}-{config.local_steps}"
    if config.algorithm.local_steps_min
    else f"{config.local_steps}"
  )
  robust = "" if config.aggregator.name == "mean" else f", aggregator {config.aggregator.name}"
  if attackers.any():
    robust += f", {int(attackers.sum())} attacker client(s) ({config.attack.name})"
  log(
    f"fedkd {algorithm}{robust}"
    f"{'' if clients_store is None else ' (per-client state ' + clients_store.describe() + ')'}: "
    f"{config.data.source} data, {config.num_clients} clients ({config.clients_per_round}/round), "
    f"{local_work} local steps x batch {config.batch_size}, {config.image_size}px, "
    f"{n_dev} device(s) on the 'clients' axis [{jax.default_backend()}], "
    f"{engine.describe(engine.effective_options(engine_opts, alg), config.clients_per_round // n_dev)}"
    f"{', ' + config.engine.compute_dtype + ' compute' if config.engine.compute_dtype != 'float32' else ''}"
    f"{', remat' if config.engine.remat else ''}"
  )
  min_counting = getattr(engine._aggregator(alg), "min_counting", 1)  # fewer counting clients: no server step
  for note in (krum_note(config), dropout_note(config, min_counting)):
    if note:
      log(note)
  rec, per_site = None, None
  last_saved = start or None  # the newest checkpoint (a diverged round's message names it)
  if start == 0:
    per_site = score(0)
    rec = record_scores(0, per_site)
    log(f"round 0 (untrained): dice catheter {rec['dice/catheter']:.4f}  guidewire {rec['dice/guidewire']:.4f}")

  imgs_per_round = config.clients_per_round * config.local_steps * config.batch_size
  last_round = config.num_rounds
  if privacy is not None:  # the last round the privacy budget allows (at least the one resumed from)
    log(f"privacy: {privacy.plan(config.num_rounds)}")
    log(dp.ACCOUNTING)
    if budget is not None:
      last_round = max(budget, start)
      if budget >= start and last_round < config.num_rounds:
        log(
          f"note: config.dp.target_epsilon={config.dp.target_epsilon:g} allows {last_round} of the "
          f"{config.num_rounds} rounds; the run stops after round {last_round}"
        )
  if start and start >= last_round:  # a finished run run again: said, not left to look like a resume
    if last_round >= config.num_rounds:
      why = "raise --config.num_rounds to train on"
    elif budget < start:  # a target lowered below what the run has spent
      why = (
        f"config.dp.target_epsilon={config.dp.target_epsilon:g} allows {budget} round(s), and its {start} rounds "
        f"have already spent epsilon {privacy.epsilon(start):.3f}"
      )
    else:
      why = f"config.dp.target_epsilon={config.dp.target_epsilon:g} allows no further round"
    log(f"note: {workdir} already finished round {start}: nothing to train; scoring the restored model ({why})")
  t_start, timed_rounds, timed_s = time.time(), 0, 0.0
  eval_seconds = []  # of each evaluation in the loop, for the ETA
  next_clients = None  # drawn by the round before (the first round of a run draws its own)
  try:
    if start and stop is not None and stop.requested(start):  # a signal while restoring and setting up: round
      raise Stopped(start, stop.reason)  # `start` is saved, and a spot VM's notice may not outlast another round
    for r in range(start + 1, last_round + 1):
      t0 = time.time()
      key, sub = jax.random.split(jax.random.wrap_key_data(local_copy(state["rng"])))
      clients = (
        sample_clients(sub, config.num_clients, config.clients_per_round) if next_clients is None else next_clients
      )
      # round r + 1's clients, from the key this round stores (read now: the round donates its buffers)
      next_clients = (
        sample_clients(jax.random.split(key)[1], config.num_clients, config.clients_per_round)
        if r < last_round
        else None
      )
      t_in = time.time()
      xs, ys = data.round_batches(r, clients, rows)  # this process's clients only
      input_wait = time.time() - t_in
      xs, ys, weights = shard_clients((xs, ys, jnp.asarray(sizes[clients[rows]], jnp.float32)), mesh, rows)
      batch = {"x": xs, "y": ys}
      if ids_needed:  # who attacks, and the ids that key per-client randomness (attack noise, quantisation)
        ids = clients[rows]
        batch["attacker"], batch["client_id"] = shard_clients(
          (jnp.asarray(attackers[ids]), jnp.asarray(ids, jnp.int32)), mesh, rows
        )
      reported = np.ones(len(clients), bool)
      if config.algorithm.dropout:  # client dropout: who fails to report this round
        reported = draw_reported(sub, config.algorithm.dropout, config.clients_per_round)
        batch["reported"] = shard_clients(jnp.asarray(reported[rows]), mesh, rows)
      if config.algorithm.local_steps_min:  # heterogeneous local work: each client its own step count
        steps = draw_local_steps(sub, config.algorithm.local_steps_min, config.local_steps, config.clients_per_round)
        batch["steps"] = shard_clients(jnp.asarray(steps[rows]), mesh, rows)
      state = dict(state, rng=replicate(jax.random.key_data(key), mesh))
      # the sampled clients' rows, split over the mesh like the data (None for stateless algorithms)
      rows_in = None if clients_store is None else clients_store.gather(clients)
      if r == start + 1:
        log(compiling_line(r))
      state, new_rows, m = round_fn(state, rows_in, batch, weights)
      if next_clients is not None:  # the next round's batches are made while this one trains
        data.prefetch(r + 1, next_clients, rows)
      loss = float(m["loss"])  # waits for the round
      client_ok = _host_all(m["client_finite"])  # a client that did not report counts as finite
      counted = reported & client_ok  # reported, with a finite update (the others got weight 0)
      if not bool(m["finite"]) or (reported.any() and not counted.any()):  # every reporting client diverged
        raise _diverged(
          r, dict(m, client_finite=client_ok), clients, config, last_saved, ckpt.directory, bool(counted.any())
        )
      if clients_store is not None:  # before the scores: personal models are evaluated from the rows
        clients_store.scatter(clients, new_rows, trained=counted)
      checked = scored_or_saved(config, r, last_round)
      evaluating, eval_s = evaluated(config, r, last_round), 0.0
      if evaluating:  # scored now, recorded after the round's record; its time is not the round's
        t_eval = time.time()
        scores = score(r)
        eval_s = time.time() - t_eval
        eval_seconds.append(eval_s)
      elif checked:
        check_outputs(r)
      if not client_ok.all():  # engine.skip_nonfinite_clients or a robust aggregator: they got weight 0
        log(f"round {r}: dropped client(s) {[int(c) for c in clients[~client_ok]]} (non-finite update)")
        runlog.scalars(r, {"train/dropped_clients": float((~client_ok).sum())})
      participants = int(reported.sum())
      if not participants:  # every sampled client dropped out: the server kept its state, there is no loss
        loss = None
      kept_model = bool(counted.any()) and not bool(m["aggregated"])  # too few counted for a robust statistic
      if kept_model:
        log(
          f"round {r}: {int(counted.sum())} client(s) counted (reported, finite), fewer than the "
          f"{min_counting} that {config.aggregator.name} needs; the server kept its model"
        )
      sent, received = float(bytes_per_client * participants), float(bytes_down * len(clients))
      bytes_total += sent
      bytes_down_total += received
      round_rec, scalars = round_logs(r, loss, clients, participants, sent, received, bytes_total, bytes_down_total)
      if config.algorithm.dropout:
        round_rec["reported"] = [int(c) for c in clients[reported]]
      if kept_model:
        round_rec["aggregated"] = False
      if config.compress.name != "none":  # ||decoded - upload|| / ||upload||, mean over the counted clients
        err = _host_all(m["compress_error"])[counted]
        round_rec["comm/compress_error"] = float(np.mean(err)) if err.size else None
        if err.size:
          scalars["comm/compress_error"] = round_rec["comm/compress_error"]
      if privacy is not None:
        dp_rec = privacy.round_record(r, _host_all(m["dp_norm"])[counted], _host_all(m["dp_clipped"])[counted])
        round_rec.update(dp_rec)
        scalars.update({k: v for k, v in dp_rec.items() if v is not None})
      runlog.round_record(round_rec)
      runlog.scalars(r, scalars)
      dt = time.time() - t0 - eval_s
      if r > start + 1:  # the first round includes compilation
        timed_rounds, timed_s = timed_rounds + 1, timed_s + dt
      runlog.scalars(r, speed_scalars(loss, dt, imgs_per_round, input_wait))
      held_out = ""
      if evaluating:
        per_site = scores
        rec = record_scores(r, per_site)
        held_out = f"  | held-out dice catheter {rec['dice/catheter']:.4f} guidewire {rec['dice/guidewire']:.4f}"
      if timed_rounds:
        per = timed_s / timed_rounds
        # evaluations left at their mean time; a resumed run's first one compiled the evaluator (a fresh run
        # compiled it for round 0), so it is left out, also while it is the only one
        warm = eval_seconds[1:] if start else eval_seconds
        per_eval = float(np.mean(warm)) if warm else 0.0
        eta = (last_round - r) * per + evaluations_left(r, last_round, config.eval.every) * per_eval
        pace = f"{imgs_per_round / per:7.1f} img/s  eta {eta:5.0f}s"
      else:
        pace = "(includes compilation)"
      losses = f"{loss:.4f}" if loss is not None else "  none (no sampled client reported)"
      log(round_line(r, config.num_rounds, losses, dt, pace) + held_out)
      stopping = stop is not None and stop.requested(r)
      if stopping or r % config.checkpoint.every == 0 or r == last_round:
        if not checked:  # a save a stop signal asked for
          check_outputs(r)
        runlog.flush()  # the TensorBoard scalars up to this round on disk before the checkpoint that keeps them
        ckpt.save(r, state, cfg_json, data.get_state(), None if clients_store is None else clients_store.state_dict())
        last_saved = r
        stopping = stopping or requested_again(stop, r)  # a signal during the save
      if stopping and r < last_round:
        ckpt.wait()
        raise Stopped(r, stop.reason)
  finally:
    ckpt.close()  # finish pending async saves, also when the run dies mid-way
    data.close()  # worker processes and the prefetch thread
    runlog.close()

  if per_site is None:  # resumed at the end already: evaluate the restored model
    per_site = evaluator(*eval_params())
    rec = summarize(last_round, per_site, unseen_name)
    rec.update(_extras(last_round))
  if last_round < config.num_rounds:
    spent = privacy.epsilon(last_round)
    if spent > config.dp.target_epsilon:  # a target lowered on resume below what the run had spent
      over = f"its rounds have spent epsilon {spent:.3f}"
    else:
      over = f"round {last_round + 1} would spend epsilon {privacy.epsilon(last_round + 1):.3f}"
    log(
      f"\nstopped after round {last_round} of {config.num_rounds}: {over} > "
      f"config.dp.target_epsilon={config.dp.target_epsilon:g}"
    )
  never = [name for name, i in personal_sites.items() if not clients_store.was_sampled(i)]
  personal = (
    " (training sites with their clients' personal models"
    + (
      f"; {', '.join(never)} with the global model: its client never trained (not sampled, or dropped)" if never else ""
    )
    + ")"
    if personal_sites
    else ""
  )
  log(f"\nheld-out Dice / IoU after round {last_round}{personal} ({evaluator.images_per_site()} images per site):")
  log(site_table(per_site, unseen_name))
  if privacy is not None:
    log(f"privacy: {privacy.spent(last_round)}")
  if config.compress.name != "none" or config.algorithm.dropout:
    log(
      f"communication: {bytes_total / 2**20:.2f} MiB sent up ({bytes_per_client / 2**10:.1f} KiB per reporting "
      f"client per round{', ' + config.compress.name + ' compressed' if config.compress.name != 'none' else ''}), "
      f"{bytes_down_total / 2**20:.2f} MiB down"
    )
  log(
    f"\noutputs in {workdir}: metrics.jsonl (one record per evaluation), rounds.jsonl (one per round), "
    f"tb/ (TensorBoard; view: pip install -e '.[tb]' && tensorboard --logdir {shlex.quote(os.fspath(workdir / 'tb'))}), config.json, "
    "checkpoints/ (orbax; re-run with the same --workdir to resume)"
  )
  if clients_store is not None:
    log(f"client state {clients_store.describe()}")
  if timed_rounds:
    log(
      f"training speed: {imgs_per_round * timed_rounds / timed_s:.1f} images/s over {timed_rounds} "
      f"rounds (excluding the first, compiled round); wall time {time.time() - t_start:.0f}s"
    )
  sys.stdout.flush()
  out = {"state": state, "metrics": rec, "per_site": per_site}
  if clients_store is not None:
    out["client_state"] = clients_store.state_dict()  # {"ids", "rows"}: the clients ever sampled
  return out
