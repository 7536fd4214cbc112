"""Several runs of one federated config (seeds, learning rates, FedProx's mu, DP noise) as ONE compiled
program (``python -m fedkd.main --seeds=0,1,2``, ``--replica_config=KEY=V1,V2,...``; ``launch.sweep
--replicas``).

The replicas' server states (parameters, server optimizer, rng) form a replica axis (a list of
states, stacked inside the program by the ``vmap`` layout) and the engine's round
(:func:`fedkd.fl.engine.make_round_fn`) runs over it, beside the clients axis.
The hyperparameters that keep the program's shapes (:data:`HPARAMS`) enter the round as traced
per-replica scalars (the engine's ``hparams``), so one compiled round serves a seed table and a
learning-rate grid alike. Each replica samples its own clients from its own rng, trains them on its own
seed's data and averages only its own clients (FedAvg within a replica: a block-diagonal mixing over
replica x client). How the replica axis runs (:func:`replica_layout`): ``loop`` (the default: the one
compiled round called per replica, so N replicas cost one compile), ``vmap`` (one program, the round
vmapped: meant for accelerators, not yet measured there) or ``unroll`` (one program emitting every
replica's round). A replica that diverges stops alone (under ``loop`` its rounds are no longer run);
the others train to the end.

Each replica writes what a single run of its config writes (config.json, metrics.jsonl, rounds.jsonl,
tb/, checkpoints/) into its own workdir, so ``fedkd.eval``, ``launch.sweep``'s tables and a single
``fedkd.main`` run resume or read it like any other run. A replica's numbers equal its single run's:
bitwise under ``loop`` / ``unroll``, up to float rounding under ``vmap`` (XLA batches the replicas'
convolutions together); tests/test_replicas.py. Measurements: docs/engine.md, "Replicas of one program".

Supported: the stateless algorithms (no per-client rows: fedavg, fedprox, fednova) with any server
optimizer, with or without DP (no privacy budget), synthetic data, one process, configs that differ only
in :data:`REPLICA_KEYS` that the config reads (a noise grid needs DP on, a mu grid FedProx), each replica in
its own workdir. Anything else gets one process per run (launch.sweep falls back by itself;
:func:`why_not` says why). FedEFM configs that differ only in its round's traced inputs (KD weight, KD
temperature, learning rates: :func:`replica_keys`) go through :func:`run` too: experiments one after
another in this process, sharing each method's compiled pretraining round.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedkd import checkpoint as ckpt_lib
from fedkd.config import ConfigError, flat_dict, num_attackers, unused_keys, validate, value_at
from fedkd.data.pipeline import evaluated_sites, make_client_data
from fedkd.errors import DivergedError, NonFiniteOutput
from fedkd.evaluate import Evaluator, summarize
from fedkd.fl import dp, engine
from fedkd.logs import RunLog, compiling_line, round_line
from fedkd.models import init_model
from fedkd.preemption import Stopped, requested_again
from fedkd.report import site_table
from fedkd.sharding import client_mesh, replicate, shard_clients
from fedkd.tasks import fedavg
from fedkd.workdir import as_path, expand, is_remote, prepare, write_atomic

STATELESS = ("fedavg", "fedprox", "fednova")
# config key -> the engine's traced hyperparameter (fedkd.fl.engine.make_round_fn's ``hparams``)
HPARAMS = {
  "client_optimizer.learning_rate": "client_lr",
  "server_optimizer.learning_rate": "server_lr",
  "algorithm.prox_mu": "prox_mu",
  "dp.noise_multiplier": "dp_noise",
  "dp.clip_norm": "dp_clip",
}
REPLICA_KEYS = ("seed", *HPARAMS)  # what replicas of one program may differ in


def replica_keys(config) -> tuple[str, ...]:
  """What replicas of ``config``'s task may differ in: :data:`REPLICA_KEYS` (fedavg); FedEFM: the
  pretraining round's traced inputs (``fedkd.tasks.fedefm.ROUND_HPARAMS``: KD weight, KD temperature,
  learning rates; its seeds are ``config.experiment.seeds``, in one process already)."""
  if config.get("task", "fedavg") == "fedefm":
    from fedkd.tasks.fedefm import ROUND_HPARAMS

    return tuple(ROUND_HPARAMS)
  return REPLICA_KEYS


def _value(config, key: str):
  """A replica key's value, as the number the program sees (0 and 0.0 are one value)."""
  return int(config.seed) if key == "seed" else float(value_at(config, key))


def varying(configs: Sequence) -> list[str]:
  """The replica keys (:func:`replica_keys`) whose values differ between ``configs``."""
  return [k for k in replica_keys(configs[0]) if len({_value(c, k) for c in configs}) > 1]


def label(config, keys: Sequence[str]) -> str:
  """One replica in logs: its values of ``keys`` (e.g. 'seed 1, client_optimizer.learning_rate=0.03')."""
  # repr: the shortest text that gives the float back (':g' showed 0.001 and 0.0010000001 alike)
  return (
    ", ".join(f"seed {config.seed}" if k == "seed" else f"{k}={float(value_at(config, k))!r}" for k in keys) or "base"
  )


def why_not(configs: Sequence) -> str | None:
  """None when ``configs`` can run as replicas of one program, else the reason (one phrase). Reads the
  configs only (no JAX backend is started: launch.sweep calls it)."""
  if len(configs) < 2:
    return "fewer than two runs"
  keys = replica_keys(configs[0])
  base = flat_dict(configs[0].to_dict())
  for c in configs[1:]:
    other = flat_dict(c.to_dict())
    diff = sorted(k for k in set(base) | set(other) if k not in keys and base.get(k) != other.get(k))
    if diff:
      return (
        f"config.{diff[0]} differs between the runs (replicas may differ only in "
        + ", ".join(f"config.{k}" for k in keys)
        + ")"
      )
  unused = unused_keys(configs[0])  # a key this config never reads: its replicas would be the same runs
  for k in varying(configs):
    if k in unused:
      return (
        f"config.{k} differs between the runs but is never read ({unused[k]}): set what reads it, or vary another key"
      )
  seen = {}
  for i, c in enumerate(configs):
    values = tuple(_value(c, k) for k in keys)
    if values in seen:
      return f"runs {seen[values]} and {i} are the same run (equal {', '.join(keys)})"
    seen[values] = i
  c = configs[0]
  if c.get("task", "fedavg") == "fedefm":  # experiments one after another (:func:`run`)
    return None
  checks = (
    (c.get("task", "fedavg") != "fedavg", f"config.task={c.get('task')!r} (fedavg only)"),
    (c.algorithm.name not in STATELESS, f"algorithm {c.algorithm.name!r} (it keeps per-client state)"),
    (c.data.source != "synthetic", f"config.data.source={c.data.source!r} (synthetic only)"),
    (c.dp.enabled and c.dp.target_epsilon > 0, "a privacy budget (config.dp.target_epsilon)"),
    (c.compress.name != "none", "compression"),
    (num_attackers(c) > 0, "attackers"),
    (c.aggregator.name != "mean", f"aggregator {c.aggregator.name!r}"),
    (bool(c.algorithm.dropout), "client dropout"),
    (bool(c.algorithm.local_steps_min), "drawn local steps"),
  )
  for bad, what in checks:
    if bad:
      return f"{what} is not supported as replicas"
  return None


REPLICA_LAYOUTS = ("loop", "unroll", "vmap")


def replica_layout(layout: str) -> str:
  """The replica axis's layout: ``auto`` -> ``loop``, the one measured faster than separate runs (on
  XLA:CPU, docs/engine.md, "Replicas of one program"); ``vmap`` is not the default on any backend until a
  GPU measurement shows it faster (``PLAN=profile bash bench/gpu.sh`` measures both)."""
  if layout == "auto":
    return "loop"
  if layout not in REPLICA_LAYOUTS:
    raise ValueError(f"unknown replica layout {layout!r}; use one of {', '.join(REPLICA_LAYOUTS)} or auto")
  return layout


def _over_replicas(round_fn, layout: str, n: int):
  """The engine's round over the replicas, as one function of per-replica lists: ``(states, batches,
  weights, hparams, skip=()) -> (states, metrics)``, each a list of ``n``.

  ``loop``    the engine's compiled round called once per replica (the hyperparameters are inputs, so
              every replica runs the same executable: one compile whatever the number of replicas); the
              replicas' states stay separate arrays, nothing is stacked or split between rounds;
  ``unroll``  one jitted program that emits every replica's round (a program n times the size);
  ``vmap``    one jitted program, the round vmapped over the replicas stacked inside it (the accelerator
              form; on XLA:CPU a vmap turns every per-client convolution into a grouped one).

  ``skip``: replicas whose round is not run under ``loop`` (diverged ones; their state passes through,
  their metrics are None). ``unroll`` and ``vmap`` run every replica. The states are donated."""
  call = lambda s, b, w, h: round_fn(s, None, b, w, None, h)  # noqa: E731
  if layout == "loop":

    def loop(states, batches, weights, hps, skip=()):
      if all(i in skip for i in range(n)):
        raise ValueError("every replica is skipped")
      outs = [
        (states[i], None, None) if i in skip else call(states[i], batches[i], weights[i], hps[i]) for i in range(n)
      ]
      return [o[0] for o in outs], [o[2] for o in outs]

    return loop
  if layout == "unroll":
    body = lambda states, batches, weights, hps: [call(*a) for a in zip(states, batches, weights, hps)]  # noqa: E731
  else:
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731

    def body(states, batches, weights, hps):
      out = jax.vmap(call)(stack(states), stack(batches), stack(weights), stack(hps))
      return [jax.tree.map(lambda a, i=i: a[i], out) for i in range(n)]

  fn = jax.jit(body, donate_argnums=(0,))

  def run_all(states, batches, weights, hps, skip=()):
    outs = fn(states, batches, weights, hps)
    return [o[0] for o in outs], [o[2] for o in outs]

  return run_all


def shared_workdir(workdirs: Sequence) -> tuple[int, int] | None:
  """``(i, j)``, i < j, for the first two workdirs that name one folder (``x/a`` and ``x/b/../a/`` do), or None."""
  seen: dict[str, int] = {}
  for j, w in enumerate(workdirs):
    key = str(w).rstrip("/") if is_remote(w) else os.path.realpath(expand(str(w)))
    if key in seen:
      return seen[key], j
    seen[key] = j
  return None


def _saved_rounds(workdir) -> list[int]:
  """The finished checkpoint rounds in ``workdir`` (digit-named orbax steps; in-progress saves have other
  names), read without creating anything."""
  d = as_path(str(workdir)) / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def _common_round(reps, starts: Sequence[int]) -> int | None:
  """The round every replica resumes from when a stop fell between the replicas' saves of one round (they save one
  after another): the replicas hold two newest rounds, the newer ones hold the older round too and nothing between
  them. None for any other mix (a replica added to a set, replicas trained apart): those stay refused."""
  rounds = sorted(set(starts))
  if len(rounds) != 2 or rounds[0] == 0:
    return None
  older, newer = rounds
  for rep, s in zip(reps, starts):
    held = rep.ckpt.all_rounds()
    if s == newer and (older not in held or any(older < r < newer for r in held)):
      return None
  return older


def _mixed_rounds(names: Sequence[str], rounds: Sequence[int | None]) -> ConfigError:
  """The error of replicas whose workdirs hold different rounds (None: no checkpoint), grouped by round."""
  by: dict[int | None, list[str]] = {}
  for name, r in zip(names, rounds):
    by.setdefault(r, []).append(name)
  held = "; ".join(
    f"{'no checkpoint' if r is None else f'round {r}'}: {', '.join(by[r])}"
    for r in sorted(by, key=lambda r: -1 if r is None else r)
  )
  return ConfigError(
    f"the replicas' workdirs hold checkpoints of different rounds ({held}), and replicas of one program resume "
    "from one round: run the replicas of each round as their own replica set (the same command with only their "
    "values), or resume one alone as a single run: the same --config with its values as --config.KEY=VALUE (no "
    "--seeds / --replica_config) and --workdir=<its workdir>"
  )


def _values(config) -> dict:
  """{engine name: number} of :data:`HPARAMS`, and ``dp_std``, the DP noise std z C computed here in float64
  and rounded to float32 once, as a single run's Python-float product is (the traced z x C in float32 rounds
  twice)."""
  out = {name: _value(config, key) for key, name in HPARAMS.items()}
  out["dp_std"] = float(out["dp_noise"]) * float(out["dp_clip"])
  return out


def hparams(configs: Sequence) -> dict:
  """{engine name: float32 [replicas]} of :data:`HPARAMS` (every key, varying or not) and ``dp_std``."""
  values = [_values(c) for c in configs]
  return {name: np.asarray([v[name] for v in values], np.float32) for name in values[0]}


def _rebuild(config, apply, apply_wf):
  """The engine's ``rebuild``: the round's algorithm and client context from the hyperparameters (traced
  scalars, or numbers)."""

  def rebuild(hp):
    server_tx = engine.make_optimizer(config.server_optimizer, hp["server_lr"])
    alg = fedavg.make_algorithm(config, server_tx, prox_mu=hp["prox_mu"])
    if config.dp.enabled:
      alg = dp.DPFedAvg(alg, hp["dp_clip"], hp["dp_noise"], config.clients_per_round, noise_std=hp["dp_std"])
    return alg, fedavg.make_context(config, apply, apply_wf, client_lr=hp["client_lr"])

  return rebuild


class _Replica:
  """One replica's host side: data, evaluation sets, log files, checkpoints; ``name`` in logs."""

  def __init__(self, config, workdir, apply, log, name):
    self.config, self.seed, self.name = config, int(config.seed), name
    self.workdir = prepare(str(workdir))
    self.data = make_client_data(config)
    self.evaluator = Evaluator(config, apply, self.data.eval_sets(evaluated_sites(config)))
    self.cfg_json = ckpt_lib.config_json(config)
    self.ckpt = ckpt_lib.Checkpointer(self.workdir / "checkpoints", config.checkpoint.max_to_keep, cleanup_tmp=True)
    self.runlog = RunLog(self.workdir, note=log)
    self.privacy = fedavg._Privacy(config) if config.dp.enabled else None
    # 0 as a single run's total of no rounds (an int: round 0's record reads as its single run's, byte for byte)
    self.bytes_up = self.bytes_down = 0

  def evaluate(self, r: int, params) -> tuple[dict, dict]:
    return self.scores_record(r, self.evaluator(params, {}))

  def scores_record(self, r: int, per_site: dict) -> tuple[dict, dict]:
    rec = summarize(r, per_site, self.data.unseen_name)
    rec.update({"comm/bytes_up_total": self.bytes_up, "comm/bytes_down_total": self.bytes_down})
    if self.privacy is not None:
      rec["dp/epsilon"] = self.privacy.epsilon(r)
    return rec, per_site

  def close(self):
    self.ckpt.close()
    self.data.close()
    self.runlog.close()


def run(
  configs: Sequence, workdirs: Sequence, log: Callable[[str], None] = print, stop=None, layout: str = "auto"
) -> list[dict]:
  """Trains ``configs`` (:func:`why_not` must be None) as one program, each into its workdir; returns
  one {'state', 'metrics', 'per_site'} per replica, like :func:`fedkd.tasks.fedavg.run`. ``layout``: the
  replica axis's (:func:`replica_layout`). Resumes when every workdir holds its checkpoint of the same
  round. FedEFM configs (``config.task='fedefm'``) run as experiments one after another that share each
  method's compiled round (:func:`fedkd.tasks.fedefm.run_replicas`; ``layout`` does not apply) and
  return each experiment's rows."""
  reason = why_not(configs)
  if reason is not None:
    raise ConfigError(f"these runs cannot be replicas of one program: {reason}; run them one by one")
  if len(workdirs) != len(configs):
    raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs")
  same = shared_workdir(workdirs)  # two replicas in one folder would write each other's files
  if same is not None:
    i, j = same
    raise ConfigError(f"replicas {i} and {j} have the same workdir {workdirs[j]}; give each replica its own")
  if configs[0].get("task", "fedavg") == "fedefm":
    from fedkd.tasks import fedefm

    return fedefm.run_replicas(configs, workdirs, log=log, stop=stop)
  if jax.process_count() > 1:
    raise ConfigError("replicas run in one process; start a multi-process run once per seed")
  config = configs[0]
  n_dev = validate(config, jax.device_count(), jax.process_count())
  for c in configs[1:]:  # each replica's own values (learning rates, DP settings) are checked too
    validate(c, jax.device_count(), jax.process_count())
  mesh = client_mesh(n_dev)
  rows = slice(None)
  opts = fedavg.engine_options(config, n_dev, log)
  inits = [init_model(c.model, c.seed) for c in configs]
  apply, apply_wf = inits[0][0], inits[0][1]
  rebuild = _rebuild(config, apply, apply_wf)
  # the same construction with the first replica's values as numbers: the state's structure, the aggregator
  alg, ctx = rebuild(_values(config))
  round_fn = engine.make_round_fn(
    alg, ctx, mesh, opts, skip_nonfinite=config.engine.skip_nonfinite_clients, rebuild=rebuild
  )
  layout = replica_layout(layout)
  vround = _over_replicas(round_fn, layout, len(configs))
  states = [alg.init(params, jax.random.key(c.seed)) for c, (_, _, params) in zip(configs, inits)]
  params_like = jax.eval_shape(lambda p: p, inits[0][2])
  bytes_up, bytes_down, _ = fedavg.dense_bytes(config.algorithm.name, params_like)
  del inits
  keys = varying(configs)
  latest = [(_saved_rounds(w) or [None])[-1] for w in workdirs]
  # a replica without a checkpoint beside ones with: refused before its folder is made (other mixes after
  # the restore: a damaged newest step falls back to an older one, which may be the others' round)
  if None in latest and len(set(latest)) > 1:
    raise _mixed_rounds([label(c, keys) for c in configs], latest)
  reps = []
  try:
    for c, w in zip(configs, workdirs):  # inside the try: the ones made are closed if one fails
      reps.append(_Replica(c, w, apply, log, label(c, keys)))
    return _train(configs, reps, states, vround, mesh, rows, opts, bytes_up, bytes_down, log, stop, keys, layout)
  finally:
    for rep in reps:
      rep.close()


def _train(
  configs, reps, states, vround, mesh, rows, opts, bytes_up, bytes_down, log, stop, keys, layout
) -> list[dict]:
  config = configs[0]
  like = states[0]
  starts, loads = [], []
  for i, rep in enumerate(reps):

    def load(r, rep=rep):
      fedavg._check_resumable(rep.ckpt.saved_config(r), rep.cfg_json, rep.ckpt.directory)
      return rep.ckpt.restore(r, like)[0]

    start, restored = rep.ckpt.restore_latest(load, log)
    if start is not None:
      states[i] = restored
    starts.append(start or 0)
    loads.append(load)
  if len(set(starts)) > 1:
    common = _common_round(reps, starts)
    if common is None:  # e.g. a damaged newest checkpoint made one fall back further than the others
      raise _mixed_rounds([rep.name for rep in reps], [s or None for s in starts])
    newest = max(starts)
    for i, rep in enumerate(reps):
      if starts[i] != common:
        try:
          states[i] = loads[i](common)
        except ckpt_lib.CheckpointError:
          raise _mixed_rounds([rep.name for rep in reps], [s or None for s in starts]) from None
        rep.ckpt.drop_after(common)
        log(
          f"note: the run stopped between the replicas' saves of round {newest}: {rep.name} resumes from round "
          f"{common}, as the others do (its round {newest} is trained again, to the same numbers)"
        )
    starts = [common] * len(reps)
  start = starts[0]
  if start > config.num_rounds:
    raise ckpt_lib.ResumeRefused(
      f"the replicas already hold round {start}, beyond config.num_rounds={config.num_rounds}; "
      f"pass --config.num_rounds={start} (or more) to continue them"
    )
  for rep in reps:
    rep.runlog.truncate_after(start if start else -1)
    if start:
      rep.bytes_up = sum(float(rr.get("comm/bytes_up", 0)) for rr in rep.runlog.rounds)
      rep.bytes_down = sum(float(rr.get("comm/bytes_down", 0)) for rr in rep.runlog.rounds)
    write_atomic(rep.workdir / "config.json", json.dumps(rep.cfg_json, indent=2))  # on resume too (as fedavg)
  states = [replicate(s, mesh) for s in states]
  hp_all = hparams(configs)
  hp = [replicate({name: v[i] for name, v in hp_all.items()}, mesh) for i in range(len(reps))]
  if keys == ["seed"]:
    which = "seeds " + ", ".join(str(rep.seed) for rep in reps)
  else:
    which = "; ".join(rep.name for rep in reps)
  log(
    f"fedkd {config.algorithm.name}: {len(reps)} replicas ({which}) as one program, "
    f"{config.num_clients} clients ({config.clients_per_round}/round) each, {config.local_steps} local steps x batch "
    f"{config.batch_size}, {config.image_size}px, {mesh.size} device(s) [{jax.default_backend()}], "
    f"{engine.describe(opts, config.clients_per_round // mesh.size)}"
    f", replicas as {layout}" + (f"; resuming from round {start}" if start else "")
  )
  for rep in reps:
    if rep.privacy is not None:
      log(f"privacy, {rep.name}: {rep.privacy.plan(config.num_rounds)}")
  if reps[0].privacy is not None:
    log(dp.ACCOUNTING)
  if start and stop is not None and stop.requested(start):  # a signal while restoring: round `start` is saved
    raise Stopped(start, stop.reason)
  results = [None] * len(reps)
  if start == 0:
    for i, rep in enumerate(reps):
      rec, _ = rep.evaluate(0, states[i]["params"])
      rep.runlog.record(rec)
  k = config.clients_per_round
  imgs = len(reps) * k * config.local_steps * config.batch_size
  timed_rounds, timed_s, t_start = 0, 0.0, time.time()
  last_saved = start or None  # the newest checkpoint every replica holds
  failed: dict[int, str] = {}  # replica -> its DivergedError message; it trains no further
  for r in range(start + 1, config.num_rounds + 1):
    t0 = time.time()
    clients, batches, weights = [], [], []
    input_wait = 0.0
    for i, rep in enumerate(reps):
      key, sub = jax.random.split(jax.random.wrap_key_data(states[i]["rng"]))
      c = fedavg.sample_clients(sub, config.num_clients, k)
      t_in = time.time()
      x, y = rep.data.round_batches(r, c, rows)
      input_wait += time.time() - t_in
      x, y, w = shard_clients((x, y, jnp.asarray(rep.data.sizes[c], jnp.float32)), mesh)
      clients.append(c)
      batches.append({"x": x, "y": y})
      weights.append(w)
      states[i] = dict(states[i], rng=replicate(jax.random.key_data(key), mesh))
    if r == start + 1:
      log(compiling_line(r))
    states, ms = vround(states, batches, weights, hp, skip=frozenset(failed))
    losses = [np.nan if i in failed else float(m["loss"]) for i, m in enumerate(ms)]
    evaluating = fedavg.evaluated(config, r, config.num_rounds)
    stopping = stop is not None and stop.requested(r)
    # a model with NaN/Inf outputs stops its replica before anything of the round is written: an evaluated
    # round is scored now (recorded after the round's record), a saved one predicts one batch
    checked = stopping or fedavg.scored_or_saved(config, r, config.num_rounds)
    scores, eval_s = [None] * len(reps), 0.0
    for i, rep in enumerate(reps):
      if i in failed:
        continue
      if checked and bool(ms[i]["finite"]):
        try:
          if evaluating:
            t_eval = time.time()
            scores[i] = rep.evaluator(states[i]["params"], {})
            eval_s += time.time() - t_eval
          else:
            rep.evaluator.check_outputs(states[i]["params"])
        except NonFiniteOutput as e:
          failed[i] = f"{rep.name}: {fedavg._diverged_outputs(r, e, configs[i], last_saved, rep.ckpt.directory)}"
          if len(failed) < len(reps):
            log(f"{failed[i]}; the other replicas go on")
          continue
      finite, client_ok = bool(ms[i]["finite"]), np.asarray(ms[i]["client_finite"])
      if not finite or not client_ok.any():  # this replica stops; the others go on
        err = fedavg._diverged(
          r,
          {"loss": losses[i], "client_finite": client_ok},
          clients[i],
          configs[i],
          last_saved,
          rep.ckpt.directory,
          bool(client_ok.any()),
        )
        failed[i] = f"{rep.name}: {err}"
        if len(failed) < len(reps):
          log(f"{failed[i]}; the other replicas go on")
        continue
      if not client_ok.all():  # engine.skip_nonfinite_clients or a robust aggregator: they got weight 0
        log(f"round {r}, {rep.name}: dropped client(s) {[int(c) for c in clients[i][~client_ok]]} (non-finite update)")
        rep.runlog.scalars(r, {"train/dropped_clients": float((~client_ok).sum())})
    if len(failed) == len(reps):
      raise DivergedError("; ".join(failed.values()))
    dt = time.time() - t0 - eval_s
    if r > start + 1:
      timed_rounds, timed_s = timed_rounds + 1, timed_s + dt
    saving = stopping or r % config.checkpoint.every == 0 or r == config.num_rounds
    line = round_line(
      r,
      config.num_rounds,
      " ".join("stopped" if i in failed else f"{v:.4f}" for i, v in enumerate(losses)),
      dt,
      f"{imgs * timed_rounds / timed_s:7.1f} img/s" if timed_rounds else "(includes compilation)",
    )
    for i, rep in enumerate(reps):
      if i in failed:  # nothing of a diverged replica's rounds is written
        continue
      sent, received = float(bytes_up * k), float(bytes_down * k)
      rep.bytes_up += sent
      rep.bytes_down += received
      rec, scalars = fedavg.round_logs(r, float(losses[i]), clients[i], k, sent, received, rep.bytes_up, rep.bytes_down)
      if rep.privacy is not None:
        # the clients whose update counted (engine.skip_nonfinite_clients gives the others weight 0)
        ok = np.asarray(ms[i]["client_finite"])
        dp_rec = rep.privacy.round_record(r, np.asarray(ms[i]["dp_norm"])[ok], np.asarray(ms[i]["dp_clipped"])[ok])
        rec.update(dp_rec)
        scalars.update({key: v for key, v in dp_rec.items() if v is not None})
      rep.runlog.round_record(rec)
      rep.runlog.scalars(r, {**scalars, **fedavg.speed_scalars(float(losses[i]), dt, imgs // len(reps), input_wait)})
      if evaluating:
        rec, per_site = rep.scores_record(r, scores[i])
        rep.runlog.record(rec)
        results[i] = (rec, per_site)
      if saving:
        rep.runlog.flush()  # its TensorBoard scalars on disk before the checkpoint that keeps them
        rep.ckpt.save(r, states[i], rep.cfg_json, rep.data.get_state(), None)
    if saving:
      last_saved = r
      stopping = stopping or requested_again(stop, r)  # a signal during the saves
    if evaluating:
      line += "  | held-out dice catheter " + " ".join(
        "-" if i in failed else f"{res[0]['dice/catheter']:.4f}" for i, res in enumerate(results)
      )
    log(line)
    if stopping and r < config.num_rounds:
      for rep in reps:
        rep.ckpt.wait()
      if failed:  # the same command would not resume a set whose diverged replica holds no such round
        rest = "; ".join(rep.name for i, rep in enumerate(reps) if i not in failed)
        raise DivergedError(
          "; ".join(failed.values()) + f" ({stop.reason} at round {r}: the others ({rest}) saved it; resume them "
          "without the diverged replica(s): the same command with only their values, or one alone as a single run "
          "with its values as --config.KEY=VALUE and --workdir=<its workdir>)"
        )
      raise Stopped(r, stop.reason)
  out = []
  for i, rep in enumerate(reps):
    if i in failed:
      continue
    params = states[i]["params"]
    if results[i] is None:  # resumed at the end already
      results[i] = rep.evaluate(config.num_rounds, params)
    rec, per_site = results[i]
    log(f"\n{rep.name}: held-out Dice / IoU after round {config.num_rounds} -> {rep.workdir}")
    log(site_table(per_site, rep.data.unseen_name))
    if rep.privacy is not None:
      log(f"privacy: {rep.privacy.spent(config.num_rounds)}")
    out.append({"state": states[i], "metrics": rec, "per_site": per_site})
  if timed_rounds:
    log(
      f"training speed: {imgs * timed_rounds / timed_s:.1f} images/s over {timed_rounds} rounds of {len(reps)} "
      f"replicas (excluding the first, compiled round); wall time {time.time() - t_start:.0f}s"
    )
  if failed:  # the others finished and wrote everything; the run as a whole did not succeed
    rest = "; ".join(rep.name for i, rep in enumerate(reps) if i not in failed)
    raise DivergedError("; ".join(failed.values()) + f" (finished: {rest})")
  return out
