"""Config schema shared by every experiment file in ``configs/``, and its validation.

Every config file's ``get_config(arg)`` starts from :func:`base_config`, changes what it needs and
returns the ConfigDict. :func:`validate` runs before any work and raises :class:`ConfigError` with
one line that names the key and the fix.
"""
from __future__ import annotations

from fedkd.errors import UserError

import math

import ml_collections

from fedkd.fl.engine import STRATEGIES, VMAP_CONV_MODES
from fedkd.losses import LOSSES


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key and a fix."""


TASKS = ("fedavg",)
CLIENT_PARALLELISM = ("auto", "measure") + STRATEGIES
COMPUTE_DTYPES = ("float32", "bfloat16")
ALGORITHMS = ("fedavg", "scaffold")
CLIENT_STATE_PLACEMENTS = ("device", "host")
OPTIMIZERS = ("sgd", "adam", "adamw")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "fedavg"
  c.seed = 0
  c.num_rounds = 20
  c.num_clients = 8
  c.clients_per_round = 8
  c.local_steps = 2
  c.batch_size = 8
  c.image_size = 128

  # Each client's training set size (examples). quantity_skew > 0 draws unequal sizes
  # n_i = examples_per_client * lognormal(0, quantity_skew) (deterministic from the seed);
  # FedAvg weights clients by n_i.
  c.examples_per_client = 256
  c.quantity_skew = 0.0

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # or "tfds:<name>" (a dataset prepared by fedkd.data.tfds.build)
  c.data.tfds_data_dir = "~/tensorflow_datasets"
  c.data.tfds_configs = ""  # comma list of builder configs used as sites; "" = all of them
  c.data.unseen_site = ""  # a builder config kept out of training, evaluated as the unseen site
  c.data.partition = "by_site"  # tfds: by_site | dirichlet (over sites) | iid (quantity_skew sizes)
  c.data.dirichlet_alpha = 0.5
  c.data.augment = True  # tfds: crop, flips, rotations, intensity jitter
  # synthetic: side (px) of the acquisition field that the hospital pixel spacings refer to;
  # 0 = the output itself (catheter 3-12 px, wire 0.8-3 px); 512 = a downsampled 512 px view
  c.data.synthetic_field_size = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.width = 16
  c.model.depth = 3
  c.model.groups = 8
  c.model.num_classes = 3  # background, catheter, guidewire (4: + vessel)

  c.client_optimizer = ml_collections.ConfigDict()
  c.client_optimizer.name = "adam"
  c.client_optimizer.learning_rate = 1e-3
  c.client_optimizer.momentum = 0.0

  # The server treats the negated weighted-mean client delta as a gradient:
  # plain FedAvg is SGD with learning rate 1.
  c.server_optimizer = ml_collections.ConfigDict()
  c.server_optimizer.name = "sgd"
  c.server_optimizer.learning_rate = 1.0
  c.server_optimizer.momentum = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dice_ce"  # dice_ce | cldice (dice_ce + soft-clDice) | focal_tversky
  c.loss.ce_weight = 0.5
  c.loss.dice_weight = 0.5
  c.loss.cldice_weight = 0.5  # weight of the soft-clDice term (name=cldice)
  c.loss.cldice_iters = 3  # soft-skeleton iterations
  c.loss.tversky_alpha = 0.7  # weight of false negatives
  c.loss.tversky_beta = 0.3  # weight of false positives
  c.loss.tversky_gamma = 4.0 / 3.0  # focal exponent: loss = (1 - TI) ** (1 / gamma)

  # Client algorithm: 'fedavg' (stateless clients; FedAvgM etc. via server_optimizer) or 'scaffold'
  # (per-client control variates, Karimireddy et al. 2020, option II).
  c.algorithm = ml_collections.ConfigDict()
  c.algorithm.name = "fedavg"
  # Where per-client state of stateful algorithms lives between rounds: 'device' (one array of
  # num_clients rows in accelerator memory) or 'host' (numpy rows, only sampled clients travel).
  c.algorithm.client_state = "device"

  c.engine = ml_collections.ConfigDict()
  # How clients inside one device shard run: 'vmap' (one batched program; per-client conv weights
  # become grouped convolutions), 'bgemm' (vmap with every convolution computed as patches x weights
  # batched matrix multiplies: tensor cores instead of grouped convolutions), 'hybrid' (vmap with
  # XLA's convs for the forward pass and input gradients, GEMMs for the kernel gradients), 'gconv'
  # (vmap with only 1x1 / transposed convs as matmuls), 'unroll' (each client's ops emitted
  # separately; fastest for convolutions on XLA:CPU), 'chunked' / 'map' (below), 'measure' (compile
  # and time the candidates on the first round's shapes, keep the fastest), 'auto' (CPU: unroll;
  # GPU/TPU: hybrid for UNet, bgemm for TransUNet up to 16 clients per device, else chunked; see the
  # README's GPU measurements).
  c.engine.client_parallelism = "auto"
  # 'chunked' / 'map': lax.scan over chunks of this many clients (vmapped inside); only one chunk's
  # client deltas are alive at a time (memory for many clients per device); 'map' = chunks of 1.
  c.engine.client_chunk = 8
  # 'chunked': the vmapped strategy inside each chunk ('bgemm', 'hybrid', 'gconv' or 'vmap').
  c.engine.chunk_strategy = "bgemm"
  # Unroll the lax.scan over local steps: 'auto' = on CPU only (XLA:CPU runs convs in loops ~20x slower).
  c.engine.unroll_local_steps = "auto"
  # Forward/backward dtype: 'float32' or 'bfloat16' (master weights, optimizer state, deltas and their
  # aggregation stay float32).
  c.engine.compute_dtype = "float32"
  # Recompute activations inside each model block in the backward pass (memory for compute).
  c.engine.remat = False

  c.mesh = ml_collections.ConfigDict()
  # devices on the 'clients' mesh axis; 0 = automatic: gcd(clients_per_round, visible devices)
  c.mesh.client_devices = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 5  # rounds; the last round is always evaluated
  c.eval.examples_per_site = 32
  c.eval.batch_size = 32
  c.eval.max_sites = 0  # training sites to evaluate; 0 = all

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5  # rounds; the last round is always saved
  c.checkpoint.max_to_keep = 2
  return c


def fedefm_base_config() -> ml_collections.ConfigDict:
  """Schema and defaults of the FedEFM experiment (task 'fedefm'): federated foundation pretraining
  across silos with (un)shared data types, then a student fine-tuned on an unseen hospital."""
  c = ml_collections.ConfigDict()
  c.task = "fedefm"
  c.seed = 0
  c.image_size = 32

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_silos = 4
  c.pretrain.num_rounds = 100
  c.pretrain.local_steps = 2
  c.pretrain.batch_size = 4
  c.pretrain.examples_per_silo = 256
  c.pretrain.unseen_percent = 100.0  # FedEFM's "unseen label corpus": 100 = no shared data type
  c.pretrain.learning_rate = 1e-3  # silo AdamW (fresh state each round)
  c.pretrain.expert_learning_rate = 1e-3  # overseas experts: Adam from the visiting model

  c.fedefm = ml_collections.ConfigDict()
  c.fedefm.beta = 0.5
  c.fedefm.temperature = 2.0
  c.fedefm.expert_steps = 1
  c.fedefm.emd_epsilon = 0.05
  c.fedefm.emd_marginals = "uniform"  # uniform | cross_reference
  c.fedefm.emd_iters = 50
  c.fedefm.weight_mode = "softmax"  # softmax | sum | raw
  c.fedefm.weight_temperature = 0.1
  c.fedefm.detach_weights = True
  c.fedefm.mixing = "cfl"  # cfl (client-server) | dfl (gossip over the topology)
  c.fedefm.topology = "ring"  # ring | complete | gaia | file:<path>: neighbours and DFL mixing
  c.fedefm.matcha_budget = 0.5
  c.fedefm.warmup_rounds = 1  # rounds of plain local training before distillation (paper: 1)
  c.fedefm.moon_mu = 1.0  # MOON baseline
  c.fedefm.moon_tau = 0.5

  # name: transunet (the paper's backbone) or unet (width/depth/groups; the encoder = enc + mid blocks)
  c.teacher = ml_collections.ConfigDict(dict(
      name="transunet", num_classes=4, patch_size=4, stem_width=8, hidden=32, num_layers=2,
      num_heads=2, mlp_dim=64, decoder_width=16, skips=False, image_size=32, width=8, depth=2, groups=4))
  c.student = ml_collections.ConfigDict(dict(
      name="transunet", num_classes=3, patch_size=4, stem_width=8, hidden=32, num_layers=1,
      num_heads=2, mlp_dim=64, decoder_width=8, skips=False, image_size=32, width=8, depth=2, groups=4))

  c.downstream = ml_collections.ConfigDict()
  c.downstream.train_examples = 128
  c.downstream.test_examples = 64
  c.downstream.steps = 500
  c.downstream.batch_size = 8
  c.downstream.learning_rate = 3e-3
  c.downstream.kd_pixel_weight = 1.0
  c.downstream.kd_feature_weight = 1.0
  c.downstream.kd_temperature = 2.0

  c.experiment = ml_collections.ConfigDict()
  c.experiment.methods = "scratch,centralized,fedavg,ring,matcha,moon,fedefm"
  c.experiment.kd_methods = "fedavg,fedefm"  # also fine-tuned with teacher KD from their foundation
  c.experiment.seeds = "0,1,2"
  c.experiment.ablation_percents = "0,50"  # extra unseen-label % runs (the main table is pretrain.unseen_percent)
  c.experiment.ablation_methods = "fedavg,fedefm"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.client_devices = 0
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32
  # In-run checkpoints of each pretraining run (foundation) every this many rounds; a stopped or
  # preempted experiment resumes inside the run it was in.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.max_to_keep = 2
  c.log_every = 10  # a progress line (loss, rounds/s, ETA) every this many pretraining rounds
  return c


def schemas() -> list[ml_collections.ConfigDict]:
  """Every task's schema (for checking --config.* override keys before the file is loaded)."""
  return [base_config(), fedefm_base_config()]


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """'clients=64,runlocal' -> {'clients': '64', 'runlocal': True}."""
  out: dict[str, str | bool] = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      out[k.strip()] = v.strip()
    else:
      out[part] = True
  return out


def check_finite(c: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Rejects NaN / Inf anywhere in the config (ml_collections parses 'nan' and 'inf' as floats)."""
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      check_finite(v, f"{prefix}.{k}")
    elif isinstance(v, float) and not math.isfinite(v):
      raise ConfigError(f"{prefix}.{k}={v} is not a finite number; set --{prefix}.{k} to a finite value")


def _positive(c, key: str) -> None:
  value = c
  for k in key.split("."):
    value = value[k]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise ConfigError(f"config.{key}={value!r} must be a positive number; set --config.{key} to a value > 0")


def validate(c: ml_collections.ConfigDict, num_devices: int) -> int:
  """Checks ``c`` before any work; returns the number of devices on the 'clients' mesh axis."""
  known = set(base_config().keys())
  extra = sorted(set(c.keys()) - known)
  if extra:
    raise ConfigError(f"unknown config key config.{extra[0]}; known keys: {', '.join(sorted(known))}")
  for group in ("data", "model", "client_optimizer", "server_optimizer", "loss", "algorithm", "engine",
                "mesh", "eval", "checkpoint"):
    extra = sorted(set(c[group].keys()) - set(base_config()[group].keys()))
    if extra:
      raise ConfigError(f"unknown config key config.{group}.{extra[0]}; known keys in config.{group}: "
                        f"{', '.join(sorted(base_config()[group].keys()))}")
  if c.task not in TASKS:
    raise ConfigError(f"config.task={c.task!r} is not a known task; use one of {', '.join(TASKS)}")
  for key in ("num_rounds", "num_clients", "clients_per_round", "local_steps", "batch_size",
              "image_size", "examples_per_client", "model.width", "model.depth", "model.groups",
              "model.num_classes", "client_optimizer.learning_rate",
              "server_optimizer.learning_rate", "eval.every", "eval.examples_per_site",
              "eval.batch_size", "checkpoint.every", "checkpoint.max_to_keep", "engine.client_chunk"):
    _positive(c, key)
  if not isinstance(c.seed, int) or c.seed < 0:
    raise ConfigError(f"config.seed={c.seed!r} must be a non-negative integer")
  if c.clients_per_round > c.num_clients:
    raise ConfigError(f"config.clients_per_round={c.clients_per_round} is larger than "
                      f"config.num_clients={c.num_clients}; set --config.clients_per_round to at most "
                      f"{c.num_clients} or raise --config.num_clients")
  if c.quantity_skew < 0:
    raise ConfigError(f"config.quantity_skew={c.quantity_skew} must be >= 0 (0 = equal client sizes)")
  if c.data.source != "synthetic" and not (c.data.source.startswith("tfds:") and len(c.data.source) > 5):
    raise ConfigError(f"config.data.source={c.data.source!r} is not a data source; use 'synthetic' or "
                      "'tfds:<dataset name>'")
  if c.data.partition not in ("by_site", "dirichlet", "iid"):
    raise ConfigError(f"config.data.partition={c.data.partition!r} is unknown; use by_site, dirichlet or iid")
  if c.data.dirichlet_alpha <= 0:
    raise ConfigError(f"config.data.dirichlet_alpha={c.data.dirichlet_alpha} must be > 0")
  if c.model.name != "unet":
    raise ConfigError(f"config.model.name={c.model.name!r} is not a known model; use 'unet'")
  if c.model.num_classes not in (3, 4):
    raise ConfigError(f"config.model.num_classes={c.model.num_classes} must be 3 (background, catheter, "
                      "guidewire) or 4 (+ vessel)")
  if c.image_size % (2 ** c.model.depth):
    raise ConfigError(f"config.image_size={c.image_size} must be divisible by 2**config.model.depth="
                      f"{2 ** c.model.depth}; pick an image size that is a multiple of it")
  if c.image_size < 32:
    raise ConfigError(f"config.image_size={c.image_size} is too small for the synthetic X-rays; use >= 32")
  if c.model.width % c.model.groups:
    raise ConfigError(f"config.model.width={c.model.width} must be divisible by config.model.groups="
                      f"{c.model.groups} (GroupNorm); change either")
  for name in ("client_optimizer", "server_optimizer"):
    if c[name].name not in OPTIMIZERS:
      raise ConfigError(f"config.{name}.name={c[name].name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
  if c.engine.client_parallelism not in CLIENT_PARALLELISM:
    raise ConfigError(f"config.engine.client_parallelism={c.engine.client_parallelism!r} is unknown; "
                      f"use one of {', '.join(CLIENT_PARALLELISM)}")
  if c.engine.chunk_strategy not in VMAP_CONV_MODES:
    raise ConfigError(f"config.engine.chunk_strategy={c.engine.chunk_strategy!r} is unknown; use one of "
                      f"{', '.join(VMAP_CONV_MODES)}")
  if c.engine.unroll_local_steps not in ("auto", True, False):
    raise ConfigError(f"config.engine.unroll_local_steps={c.engine.unroll_local_steps!r} must be "
                      "'auto', True or False")
  if c.engine.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.engine.compute_dtype={c.engine.compute_dtype!r} is unknown; use one of "
                      f"{', '.join(COMPUTE_DTYPES)}")
  if not isinstance(c.engine.remat, bool):
    raise ConfigError(f"config.engine.remat={c.engine.remat!r} must be True or False")
  if c.algorithm.name not in ALGORITHMS:
    raise ConfigError(f"config.algorithm.name={c.algorithm.name!r} is unknown; use one of {', '.join(ALGORITHMS)}")
  if c.algorithm.name == "scaffold" and c.client_optimizer.name != "sgd":
    raise ConfigError(f"config.algorithm.name='scaffold' needs config.client_optimizer.name='sgd' (its "
                      f"control-variate update assumes plain SGD steps), not {c.client_optimizer.name!r}")
  if c.algorithm.client_state not in CLIENT_STATE_PLACEMENTS:
    raise ConfigError(f"config.algorithm.client_state={c.algorithm.client_state!r} is unknown; use one of "
                      f"{', '.join(CLIENT_STATE_PLACEMENTS)}")
  if c.loss.name not in LOSSES:
    raise ConfigError(f"config.loss.name={c.loss.name!r} is unknown; use one of {', '.join(LOSSES)}")
  if c.loss.ce_weight < 0 or c.loss.dice_weight < 0 or c.loss.ce_weight + c.loss.dice_weight <= 0:
    raise ConfigError("config.loss.ce_weight and config.loss.dice_weight must be >= 0 and not both 0")
  if c.mesh.client_devices == 0:  # auto: as many devices as split the sampled clients evenly
    return math.gcd(c.clients_per_round, num_devices)
  n = c.mesh.client_devices
  if n < 0 or n > num_devices:
    raise ConfigError(f"config.mesh.client_devices={c.mesh.client_devices} but {num_devices} device(s) "
                      f"are visible; use 0 (all) or a value in 1..{num_devices}")
  if c.clients_per_round % n:
    fit = math.gcd(c.clients_per_round, n)
    raise ConfigError(f"config.clients_per_round={c.clients_per_round} cannot be split over the {n} "
                      f"devices of the 'clients' mesh axis; use a multiple of {n} or set "
                      f"--config.mesh.client_devices={fit} (or 0 = automatic)")
  return n
