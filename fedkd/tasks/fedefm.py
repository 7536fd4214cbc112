"""FedEFM end to end: federated foundation pretraining across silos whose data types (do not)
overlap, then a student fine-tuned on a small set from an unseen hospital, for every method and seed,
plus the unseen-label-% ablation; writes results.md / results.csv (mean +- std over seeds).

Pretraining data types (hospital profile x labelled structures, from fedkd.data.sites):
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
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedkd.config import ConfigError, fedefm_base_config
from fedkd.data import partition
from fedkd.data import sites as sites_lib
from fedkd.data import synth
from fedkd.distill import fedefm as fedefm_lib
from fedkd.distill.losses import feature_kd, kd_kl
from fedkd.fl import topology
from fedkd.losses import make_segmentation_loss
from fedkd.metrics import dice, iou
from fedkd.models import init_model, make_predictor
from fedkd.models.transfer import load_encoder
from fedkd.sharding import client_mesh, shard_clients

# (hospital profile, labelled structures) of each pretraining data type.
DATA_TYPES = (("flatpanel_1024_cine", "vessel"), ("animal_porcine", "catheter"),
              ("silicone_phantom", "catheter_guidewire"), ("simulator_clean", "all"))
TARGET = ("unseen_mobile_c_arm", "catheter_guidewire")
METHODS = ("scratch", "centralized", "fedavg", "ring", "matcha", "moon", "fedefm")
SEG_LOSS = ml_collections.ConfigDict(dict(name="dice_ce", ce_weight=0.5, dice_weight=0.5))


def _csv(s: str) -> list[str]:
  return [x.strip() for x in str(s).split(",") if x.strip()]


def validate(c) -> dict:
  """Checks the FedEFM config; returns parsed lists."""
  known = fedefm_base_config()
  for k in c.keys():
    if k not in known:
      raise ConfigError(f"unknown config key config.{k} for task 'fedefm'")
    if isinstance(known[k], ml_collections.ConfigDict):
      for kk in c[k].keys():
        if kk not in known[k]:
          raise ConfigError(f"unknown config key config.{k}.{kk}; known: {', '.join(sorted(known[k].keys()))}")
  for key in ("image_size",):
    if c[key] <= 0:
      raise ConfigError(f"config.{key} must be positive")
  for key in ("num_silos", "num_rounds", "local_steps", "batch_size", "examples_per_silo"):
    if c.pretrain[key] <= 0:
      raise ConfigError(f"config.pretrain.{key}={c.pretrain[key]} must be positive")
  for key in ("train_examples", "test_examples", "steps", "batch_size"):
    if c.downstream[key] <= 0:
      raise ConfigError(f"config.downstream.{key}={c.downstream[key]} must be positive")
  if not 0 <= c.pretrain.unseen_percent <= 100:
    raise ConfigError(f"config.pretrain.unseen_percent={c.pretrain.unseen_percent} must be in [0, 100]")
  if c.pretrain.unseen_percent == 100 and c.pretrain.num_silos > len(DATA_TYPES):
    raise ConfigError(f"config.pretrain.num_silos={c.pretrain.num_silos}: 100% unseen labels needs at "
                      f"most {len(DATA_TYPES)} silos (one data type each)")
  if c.fedefm.mixing not in ("cfl", "dfl"):
    raise ConfigError(f"config.fedefm.mixing={c.fedefm.mixing!r}: use cfl or dfl")
  if c.fedefm.expert_steps > c.pretrain.local_steps:
    raise ConfigError(f"config.fedefm.expert_steps={c.fedefm.expert_steps} cannot exceed "
                      f"config.pretrain.local_steps={c.pretrain.local_steps} (experts use the neighbour's batches)")
  if c.mesh.client_devices < 0 or (c.mesh.client_devices and c.pretrain.num_silos % c.mesh.client_devices):
    raise ConfigError(f"config.mesh.client_devices={c.mesh.client_devices} must divide "
                      f"config.pretrain.num_silos={c.pretrain.num_silos} (or be 0 = automatic)")
  if c.mesh.client_devices > jax.device_count():
    raise ConfigError(f"config.mesh.client_devices={c.mesh.client_devices} but only {jax.device_count()} "
                      "device(s) are visible")
  methods = _csv(c.experiment.methods)
  for m in methods + _csv(c.experiment.kd_methods) + _csv(c.experiment.ablation_methods):
    if m not in METHODS:
      raise ConfigError(f"config.experiment: unknown method {m!r}; known: {', '.join(METHODS)}")
  for m in _csv(c.experiment.kd_methods):
    if m == "scratch":
      raise ConfigError("config.experiment.kd_methods: 'scratch' has no foundation teacher")
  try:
    seeds = [int(s) for s in _csv(c.experiment.seeds)]
    percents = [float(p) for p in _csv(c.experiment.ablation_percents)]
  except ValueError as e:
    raise ConfigError(f"config.experiment.seeds / ablation_percents must be comma lists of numbers ({e})")
  if not seeds:
    raise ConfigError("config.experiment.seeds is empty; give e.g. '0,1,2'")
  for p in percents:
    if not 0 <= p <= 100 or (p == 100 and c.pretrain.num_silos > len(DATA_TYPES)):
      raise ConfigError(f"config.experiment.ablation_percents: {p} is not a valid unseen-label %")
  if c.teacher.name != c.student.name or c.teacher.name not in ("transunet", "unet"):
    raise ConfigError(f"config.teacher.name={c.teacher.name!r} / config.student.name={c.student.name!r}: "
                      "use the same model family for both, transunet or unet")
  if c.teacher.name == "transunet":
    for name in ("teacher", "student"):
      if c[name].image_size != c.image_size or c.image_size % c[name].patch_size:
        raise ConfigError(f"config.{name}.image_size must equal config.image_size={c.image_size} and be a "
                          f"multiple of config.{name}.patch_size")
    if c.teacher.hidden != c.student.hidden or c.teacher.patch_size != c.student.patch_size:
      raise ConfigError("config.student.hidden and patch_size must match the teacher's so the foundation "
                        "encoder loads into the student")
  else:
    if (c.teacher.width, c.teacher.depth) != (c.student.width, c.student.depth):
      raise ConfigError("config.student.width and depth must match the teacher's so the foundation "
                        "encoder (UNet enc + mid blocks) loads into the student")
    if c.image_size % (2 ** c.teacher.depth):
      raise ConfigError(f"config.image_size={c.image_size} must be divisible by 2**config.teacher.depth")
  return {"methods": methods, "kd_methods": _csv(c.experiment.kd_methods), "seeds": seeds,
          "percents": percents, "ablation_methods": _csv(c.experiment.ablation_methods)}


def transfer_encoder(student_params, foundation, model_name: str):
  """Loads the foundation's encoder into the student: TransUNet ``encoder``; UNet ``enc`` + ``mid``."""
  if model_name == "unet":
    params, _ = load_encoder(student_params, foundation, prefix=("enc",), require=())
    params, _ = load_encoder(params, foundation, prefix=("mid",), require=())
    return params
  return load_encoder(student_params, foundation)[0]


class SiloData:
  """On-device synthetic data for the pretraining silos and the downstream target site."""

  def __init__(self, c):
    self.c = c
    bases = {s.name: s for s in list(sites_lib.make_sites(5)[0]) + [sites_lib.make_sites(1)[1]]}
    rows = [sites_lib.with_data_type(bases[s], t) for s, t in DATA_TYPES + (TARGET,)]
    self.table = sites_lib.site_table(rows)
    self.target_row = len(DATA_TYPES)

  def silo_types(self, percent: float, seed: int) -> np.ndarray:
    """Data type of every example of every silo: [num_silos, examples_per_silo]."""
    p = self.c.pretrain
    mix = partition.unseen_label_corpus(p.num_silos, len(DATA_TYPES), percent)
    return np.stack([np.random.default_rng([seed, 11, i]).choice(len(DATA_TYPES), p.examples_per_silo,
                                                                 p=mix[i]) for i in range(p.num_silos)])

  def round_batches(self, types: np.ndarray, seed: int, round_: int):
    p, h = self.c.pretrain, self.c.image_size
    per = p.local_steps * p.batch_size
    idx = np.stack([np.random.default_rng([seed, round_, i]).integers(0, p.examples_per_silo, per)
                    for i in range(p.num_silos)])
    rows = np.take_along_axis(types, idx, axis=1)
    gidx = idx + np.arange(p.num_silos)[:, None] * p.examples_per_silo
    im, m = synth.generate(seed, self.table, jnp.asarray(rows.reshape(-1), jnp.int32),
                           jnp.asarray(gidx.reshape(-1, 1), jnp.int32), h)
    shape = (p.num_silos, p.local_steps, p.batch_size, h, h)
    return im.reshape(shape + (1,)), jnp.minimum(m.reshape(shape), self.c.teacher.num_classes - 1)

  def target(self, seed: int, split: int, n: int):
    im, m = synth.generate(seed, self.table, jnp.asarray([self.target_row], jnp.int32),
                           jnp.arange(n, dtype=jnp.int32)[None], self.c.image_size, split=split)
    return im[0], m[0]


class Experiment:

  def __init__(self, c, workdir: str, log: Callable[[str], None] = print):
    self.c, self.workdir, self.log = c, workdir, log
    self.parsed = validate(c)
    self.data = SiloData(c)
    self.seg_loss = make_segmentation_loss(SEG_LOSS)
    n = c.pretrain.num_silos
    nd = c.mesh.client_devices or int(np.gcd(n, jax.device_count()))
    self.mesh = client_mesh(nd)
    self.mesh1 = client_mesh(1)
    self._round_fns: dict = {}
    self._ft_fns: dict = {}
    self.t_apply, self.t_apply_wf, _ = init_model(c.teacher, 0)
    self.s_apply, self.s_apply_wf, _ = init_model(c.student, 0)
    self.predict = make_predictor(self.s_apply, c.eval.batch_size)  # compiled once for all runs
    topo = c.fedefm.topology
    if topo == "ring":
      self.adj = topology.ring(n) > 0
    elif topo == "complete":
      self.adj = topology.complete(n) > 0
    elif topo == "gaia":
      self.adj = topology.gaia_adjacency()[:n, :n] > 0
    elif topo.startswith("file:"):
      self.adj = topology.from_file(topo[5:]) > 0
    else:
      raise ConfigError(f"config.fedefm.topology={topo!r}: use ring, complete, gaia or file:<path>")
    np.fill_diagonal(self.adj, False)
    if self.adj.shape[0] != n:
      raise ConfigError(f"topology has {self.adj.shape[0]} nodes but config.pretrain.num_silos={n}")
    self.gossip_w = topology.metropolis_hastings(self.adj)

  # ------------------------------------------------------------------ pretraining

  def _options(self, method: str, distill: bool) -> fedefm_lib.FedEFMOptions:
    f = self.c.fedefm
    mixing = {"fedavg": "cfl", "moon": "cfl", "centralized": "cfl", "ring": "dfl", "matcha": "dfl",
              "fedefm": f.mixing}[method]
    return fedefm_lib.FedEFMOptions(
        distill=distill, beta=f.beta, temperature=f.temperature, expert_steps=f.expert_steps,
        emd_epsilon=f.emd_epsilon, emd_marginals=f.emd_marginals, emd_iters=f.emd_iters,
        weight_mode=f.weight_mode, weight_temperature=f.weight_temperature, detach_weights=f.detach_weights,
        mixing=mixing, moon_mu=f.moon_mu if method == "moon" else 0.0, moon_tau=f.moon_tau,
        unroll=jax.default_backend() == "cpu")

  def _round_fn(self, method: str, distill: bool):
    key = (method, distill)
    if key not in self._round_fns:
      p = self.c.pretrain
      mesh = self.mesh1 if method == "centralized" else self.mesh
      self._round_fns[key] = fedefm_lib.make_silo_round(
          self.t_apply_wf, self.seg_loss, optax.adam(p.expert_learning_rate), optax.adamw(p.learning_rate),
          mesh, self._options(method, distill))
    return self._round_fns[key]

  def pretrain(self, method: str, percent: float, seed: int):
    """Foundation parameters (teacher architecture) for ``method``."""
    c, p = self.c, self.c.pretrain
    _, _, params0 = init_model(c.teacher, seed)
    types = self.data.silo_types(percent, seed)
    n = 1 if method == "centralized" else p.num_silos
    mesh = self.mesh1 if method == "centralized" else self.mesh
    stacked = fedefm_lib.stack(params0, n)
    prev = stacked
    idx, mask = topology.neighbour_table(self.adj)
    base = topology.complete(p.num_silos) > 0
    for r in range(1, p.num_rounds + 1):
      xs, ys = self.data.round_batches(types, seed, r)
      if method == "centralized":  # pool all silos' batches: one model, same images per step
        xs = jnp.swapaxes(xs, 0, 1).reshape((1, p.local_steps, -1) + xs.shape[3:])
        ys = jnp.swapaxes(ys, 0, 1).reshape((1, p.local_steps, -1) + ys.shape[3:])
        nbr, nmask, W = np.zeros((1, 1), np.int32), np.zeros((1, 1), bool), np.ones((1, 1), np.float32)
      else:
        nbr, nmask = idx, mask
        W = topology.matcha(base, c.fedefm.matcha_budget, seed, r) if method == "matcha" else self.gossip_w
      distill = method == "fedefm" and r > c.fedefm.warmup_rounds
      fn = self._round_fn(method, distill)
      args = shard_clients((stacked, prev, xs, ys, jnp.asarray(nbr), jnp.asarray(nmask), jnp.ones(n)), mesh)
      stacked, prev, metrics = fn(*args, jnp.asarray(W, jnp.float32))
    return jax.tree.map(np.asarray, fedefm_lib.mean_model(stacked)), {
        k: np.asarray(v).tolist() for k, v in metrics.items() if k in ("loss", "kd", "w")}

  # ------------------------------------------------------------------ downstream

  def _finetune_fn(self, kd: bool):
    if kd not in self._ft_fns:
      d = self.c.downstream
      tx = optax.adam(d.learning_rate)
      nc = self.c.student.num_classes

      def loss_fn(p, teacher, x, y):
        logits, feats = self.s_apply_wf(p, x)
        loss = self.seg_loss(logits, y)
        if kd:
          t_logits, t_feats = self.t_apply_wf(teacher, x)
          loss = loss + d.kd_pixel_weight * kd_kl(logits, t_logits[..., :nc], d.kd_temperature)
          loss = loss + d.kd_feature_weight * feature_kd(feats, t_feats)
        return loss

      @jax.jit
      def step(p, o, teacher, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, teacher, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

      self._ft_fns[kd] = (step, tx)
    return self._ft_fns[kd]

  def finetune(self, foundation, kd: bool, seed: int) -> dict:
    c, d = self.c, self.c.downstream
    _, _, params = init_model(c.student, seed + 1000)
    if foundation is not None:
      params = transfer_encoder(params, foundation, c.student.name)
    x_tr, y_tr = self.data.target(seed, 0, d.train_examples)
    x_te, y_te = self.data.target(seed, 1, d.test_examples)
    step, tx = self._finetune_fn(kd)
    opt = tx.init(params)
    teacher = foundation if kd else None
    rng = np.random.default_rng([seed, 99])
    for _ in range(d.steps):
      b = jnp.asarray(rng.integers(0, d.train_examples, d.batch_size))
      params, opt, _ = step(params, opt, teacher, x_tr[b], y_tr[b])
    pred = self.predict(params, x_te)
    return {f"{m}/{name}": float(jnp.mean(fn(pred, y_te, cid)))
            for m, fn in (("dice", dice), ("iou", iou)) for cid, name in ((1, "catheter"), (2, "guidewire"))}

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

  def run(self) -> list[dict]:
    os.makedirs(self.workdir, exist_ok=True)
    raw_path = os.path.join(self.workdir, "results_raw.jsonl")
    done = {}
    if os.path.exists(raw_path):
      for line in open(raw_path):
        if line.strip():
          r = json.loads(line)
          done[(r["unseen_percent"], r["method"], r["teacher_kd"], r["seed"])] = r
    cfg_path = os.path.join(self.workdir, "config.json")
    if done and os.path.exists(cfg_path):
      saved = json.load(open(cfg_path))
      current = json.loads(self.c.to_json())
      diff = sorted(k for k in set(saved) | set(current)
                    if k != "experiment" and saved.get(k) != current.get(k))
      if diff:
        raise ConfigError(f"{self.workdir} holds results of another config (config.{diff[0]} differs); use a "
                          "new --workdir, or the original config (only config.experiment may change)")
    with open(cfg_path, "w") as f:
      f.write(self.c.to_json(indent=2))
    plan = self.plan()
    self.log(f"fedkd fedefm: {len(plan)} runs ({len(done)} already done) -> {self.workdir}; "
             f"{self.c.pretrain.num_silos} silos, {self.c.pretrain.num_rounds} rounds, {self.c.image_size}px")
    cache: dict = {}
    t0 = time.time()
    for k, (percent, method, kd, seed) in enumerate(plan, 1):
      key = (percent, method, kd, seed)
      if key in done:
        continue
      t = time.time()
      found_key = (percent, method, seed)
      if method != "scratch" and found_key not in cache:
        cache.clear()  # one foundation at a time (KD and plain fine-tunes share it)
        cache[found_key] = self.pretrain(method, percent, seed)
      foundation, pre = cache.get(found_key, (None, {}))
      res = self.finetune(foundation, kd, seed)
      rec = {"unseen_percent": percent, "method": method, "teacher_kd": kd, "seed": seed, **res,
             "seconds": round(time.time() - t, 2), "pretrain_final": pre}
      with open(raw_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
      done[key] = rec
      self.log(f"[{k:>3}/{len(plan)}] {percent:5.1f}% unseen  {method + (' +KD' if kd else ''):<16} seed {seed}:"
               f"  dice catheter {res['dice/catheter']:.4f}  guidewire {res['dice/guidewire']:.4f}"
               f"  ({time.time() - t:.1f}s, total {time.time() - t0:.0f}s)")
    rows = [done[e] for e in plan]
    self.write_tables(rows)
    return rows

  def write_tables(self, rows: list[dict]) -> None:
    keys = ["dice/catheter", "dice/guidewire", "iou/catheter", "iou/guidewire"]
    groups: dict = {}
    for r in rows:
      groups.setdefault((r["unseen_percent"], r["method"], r["teacher_kd"]), []).append(r)
    csv_lines = ["unseen_percent,method,teacher_kd,seeds," + ",".join(f"{k} mean,{k} std" for k in keys)]
    md = [f"| unseen % | foundation | teacher KD | seeds | " + " | ".join(keys) + " |",
          "|---|---|---|---|" + "---|" * len(keys)]
    for (pct, m, kd), rs in groups.items():
      stats = [(np.mean([r[k] for r in rs]), np.std([r[k] for r in rs])) for k in keys]
      csv_lines.append(f"{pct},{m},{kd},{len(rs)}," + ",".join(f"{a:.4f},{s:.4f}" for a, s in stats))
      md.append(f"| {pct:g} | {m} | {'yes' if kd else 'no'} | {len(rs)} | "
                + " | ".join(f"{a:.3f} ± {s:.3f}" for a, s in stats) + " |")
    with open(os.path.join(self.workdir, "results.csv"), "w") as f:
      f.write("\n".join(csv_lines) + "\n")
    with open(os.path.join(self.workdir, "results.md"), "w") as f:
      f.write(f"Target site {TARGET[0]} ({self.c.downstream.train_examples} training images), "
              f"mean ± std over seeds (std with ddof=0).\n\n" + "\n".join(md) + "\n")
    self.log("\n" + "\n".join(md))
    self.log(f"\nwrote {self.workdir}/results.md, results.csv, results_raw.jsonl")


def run(config, workdir: str, log: Callable[[str], None] = print) -> list[dict]:
  return Experiment(config, workdir, log).run()
