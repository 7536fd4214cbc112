"""Config schemas shared by every experiment file in ``configs/``, and their validation.

Every config file's ``get_config(arg)`` starts from its task's schema (:func:`base_config` for
'fedavg', :func:`fedefm_base_config` for 'fedefm'), changes what it needs and returns the ConfigDict.
:func:`validate` / :func:`validate_fedefm` run before any work and raise :class:`ConfigError` with one
line that names the key and the fix (FedEFM's topology is loaded, and checked, by fedkd.tasks.fedefm).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and a fix. A user error
  (``fedkd.errors.USER_ERRORS``): entry points print it as one line. Defined here so that this module
  imports nothing from fedkd (config files load no JAX)."""


# Names the modules that implement them also know (tests/test_config_names.py keeps them equal);
# this module holds them as plain strings so a config never imports the engine, the losses or JAX.
TASKS = ("fedavg",)
CLIENT_LAYOUTS = ("auto", "vmap", "chunked", "unroll")  # fedkd.fl.engine.LAYOUTS + auto
CONV_LOWERINGS = ("auto", "xla", "gemm", "wgrad", "matmul")  # fedkd.fl.engine.LOWERINGS + auto
# deprecated engine.client_parallelism names (fedkd.fl.engine.LEGACY_PARALLELISM); '' = not set
LEGACY_PARALLELISM = ("", "vmap", "bgemm", "hybrid", "unroll", "chunked", "map")
LEGACY_CHUNK_STRATEGIES = ("", "vmap", "bgemm", "hybrid")
COMPUTE_DTYPES = ("float32", "bfloat16")
ALGORITHMS = ("fedavg", "scaffold", "moon", "fedprox", "fednova", "fedbn", "ditto")  # fedkd.fl.algorithms.ALGORITHMS
SCAFFOLD_WEIGHTINGS = ("uniform", "data_size")  # fedkd.fl.algorithms.SCAFFOLD_WEIGHTINGS
# fedkd.fl.aggregate.KINDS, without gossip (FedEFM's); all but mean and norm_clip are non-linear
LINEAR_AGGREGATORS = ("mean", "norm_clip")  # the others are robust statistics that drop non-finite clients themselves
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_clip")
# whose upload is a model delta a robust statistic may replace
ROBUST_ALGORITHMS = ("fedavg", "fedprox", "moon", "fedbn", "ditto")
ATTACKS = ("none", "sign_flip", "scale", "gaussian")  # fedkd.fl.attacks.ATTACKS plus none
DP_ALGORITHMS = ROBUST_ALGORITHMS  # fedkd.fl.dp.DPFedAvg wraps uploads that are plain model deltas
COMPRESSORS = ("none", "int8", "topk")  # fedkd.fl.compress.KINDS plus none
LOSSES = ("dice_ce", "cldice", "focal_tversky")  # fedkd.losses.LOSSES
CLIENT_STATE_PLACEMENTS = ("device", "host")
OPTIMIZERS = ("sgd", "adam", "adamw")
UNSEEN_KEYS = ("fixed", "num_clients")  # config.data.unseen_key
EVAL_PICKS = ("spread", "first")  # config.eval.pick: fedkd.data.pipeline.eval_records
SYNTHETIC_PHYSICS = (1, 2, 3)  # config.data.synthetic_physics: fedkd.data.synth.PHYSICS
SERVER_OPTIMIZERS = OPTIMIZERS + ("yogi", "adagrad")  # fedkd.fl.engine.make_optimizer
# FedEFM (task 'fedefm'): foundations compared (fedkd.tasks.fedefm.METHODS), EMD options
# (fedkd.distill.emd.MARGINALS / WEIGHT_MODES), silo data types (len(fedkd.data.silos.DATA_TYPES)).
FEDEFM_METHODS = (
  "scratch",
  "centralized",
  "fedavg",
  "ring",
  "matcha",
  "moon",
  "fedefm",
  "fedefm_dfl",
  "fedefm_uniform",
  "fedefm_e0",
  "fedavg_matched",
  "fedprox",
)
# The methods that distil from overseas experts after the warm-up rounds (the others train on their own data).
FEDEFM_DISTILL = ("fedefm", "fedefm_dfl", "fedefm_uniform", "fedefm_e0")
# The methods whose silos mix by gossip over config.fedefm.topology (DFL); the distilling ones take their
# experts from its neighbours, and those of them with FedEFM's update follow config.fedefm.mixing.
FEDEFM_GOSSIP = ("ring", "matcha", "fedefm_dfl")
FEDEFM_FOLLOW_MIXING = ("fedefm", "fedefm_uniform", "fedefm_e0")
FEDEFM_OBJECTIVES = ("segmentation", "source")
EMD_MARGINALS = ("uniform", "cross_reference")
EMD_WEIGHT_MODES = ("softmax", "sum", "raw")
FEDEFM_MIXINGS = ("cfl", "dfl")
FEDEFM_NUM_DATA_TYPES = 6


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "fedavg"  # 'fedavg' (this schema) or 'fedefm' (fedefm_base_config)
  c.seed = 0  # model init, client sampling and data; same seed + config = same numbers
  # numpy streams drawn for one purpose (quantity_skew sizes): 2 = named apart from the round sampling streams,
  # 1 = the seeds before, where they were a client's batch draws of one round (fedkd/streams.py)
  c.rng_streams = 2
  c.num_rounds = 20  # federated rounds
  c.num_clients = 8  # simulated hospitals (clients)
  c.clients_per_round = 8  # clients sampled each round (without replacement)
  c.local_steps = 2  # client optimizer steps per round
  c.batch_size = 8  # images per client step
  c.image_size = 128  # training image side in px (>= 32, a multiple of 2**model.depth)

  # Each client's training set size (examples). quantity_skew > 0 draws unequal sizes
  # n_i = examples_per_client * lognormal(0, quantity_skew) (deterministic from the seed);
  # FedAvg weights clients by n_i. A drawn size below batch_size is raised to batch_size.
  c.examples_per_client = 256
  c.quantity_skew = 0.0  # 0 = equal sizes; > 0 lognormal sigma of client dataset sizes

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # or "tfds:<name>" (a dataset prepared by fedkd.data.tfds.build)
  c.data.tfds_data_dir = "~/tensorflow_datasets"  # folder of prepared TFDS datasets ('~' expanded)
  c.data.tfds_configs = ""  # comma list of builder configs used as sites; "" = all of them
  c.data.unseen_site = ""  # a builder config kept out of training, evaluated as the unseen site
  c.data.partition = "by_site"  # tfds: by_site | dirichlet (over sites) | iid (quantity_skew sizes)
  c.data.dirichlet_alpha = 0.5  # partition=dirichlet: concentration (small = more skew)
  c.data.augment = True  # tfds: crop, flips, rotations, intensity jitter
  c.data.workers = 0  # tfds: worker processes that decode + augment (0 = in the training process)
  c.data.prefetch = True  # tfds: prepare round r+1's batches in a background thread while round r trains
  # synthetic: side (px) of the acquisition field that the hospital pixel spacings refer to;
  # 0 = the output itself (catheter 3-12 px, wire 0.8-3 px); 512 = a downsampled 512 px view
  c.data.synthetic_field_size = 0
  # synthetic: the generator's forward model: 2 (device attenuation scales with its diameter, partial volume
  # averaged on intensity, white read-out noise, the second wire at the site's size), 3 (2 with devices that leave
  # the field instead of running along its edge and a catheter entering from outside it; not yet the tables') or
  # 1 (the generator before those corrections, which earlier published tables used; docs/data.md)
  c.data.synthetic_physics = 2
  # synthetic: the unseen site's images: 'fixed' (the same whatever num_clients) or 'num_clients' (keyed by the
  # client count, as runs made before the key existed; they resume with it)
  c.data.unseen_key = "fixed"

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"  # 'unet' (GroupNorm UNet)
  c.model.width = 16  # channels of the first UNet level
  c.model.depth = 3  # UNet levels (downsamplings)
  c.model.groups = 8  # GroupNorm groups (each level takes min(groups, its channels), which it must divide)
  c.model.num_classes = 3  # background, catheter, guidewire (4: + vessel)

  c.client_optimizer = ml_collections.ConfigDict()
  c.client_optimizer.name = "adam"  # sgd | adam | adamw
  c.client_optimizer.learning_rate = 1e-3  # client step size
  c.client_optimizer.momentum = 0.0  # sgd only; 0 = none
  c.client_optimizer.weight_decay = 1e-4  # adamw only: decoupled weight decay (Loshchilov & Hutter 2019); 0 = none

  # The server treats the negated weighted-mean client delta as a gradient:
  # plain FedAvg is SGD with learning rate 1.
  c.server_optimizer = ml_collections.ConfigDict()
  # yogi / adagrad: FedYogi / FedAdagrad exactly as Reddi et al. 2021, Algorithm 2 (docs/algorithms.md).
  c.server_optimizer.name = "sgd"  # sgd | adam | adamw | yogi | adagrad, stepping on the negated mean client delta
  c.server_optimizer.learning_rate = 1.0  # 1.0 with sgd = plain FedAvg
  c.server_optimizer.momentum = 0.0  # sgd only; 0.9 = FedAvgM
  c.server_optimizer.weight_decay = 1e-4  # adamw only: decoupled weight decay (Loshchilov & Hutter 2019); 0 = none
  c.server_optimizer.b1 = 0.9  # adam / adamw / yogi / adagrad: first-moment decay (Reddi et al. 2021: 0.9)
  c.server_optimizer.b2 = 0.99  # adam / adamw / yogi: second-moment decay (Reddi et al. 2021: 0.99)
  c.server_optimizer.eps = 1e-3  # adam / adamw / yogi / adagrad: adaptivity tau (Reddi et al. 2021: 1e-3)
  # yogi / adagrad: the second moment's start v_{-1} (Reddi et al. 2021: v_{-1} >= tau^2 = eps^2)
  c.server_optimizer.initial_accumulator = 1e-6

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dice_ce"  # dice_ce | cldice (dice_ce + soft-clDice) | focal_tversky
  c.loss.ce_weight = 0.5  # weight of cross-entropy in dice_ce
  c.loss.dice_weight = 0.5  # weight of soft Dice in dice_ce
  c.loss.cldice_weight = 0.5  # weight of the soft-clDice term (name=cldice)
  c.loss.cldice_iters = 3  # soft-skeleton iterations
  c.loss.tversky_alpha = 0.7  # weight of false negatives
  c.loss.tversky_beta = 0.3  # weight of false positives
  c.loss.tversky_gamma = 4.0 / 3.0  # focal exponent: loss = (1 - TI) ** (1 / gamma)

  # Client algorithm: 'fedavg' (stateless clients; FedAvgM / FedAdam via server_optimizer), 'scaffold'
  # (per-client control variates, Karimireddy et al. 2020, option II), 'moon' (model-contrastive
  # local objective, Li et al. 2021; per-client previous models), 'fedprox' (proximal local objective,
  # Li et al. 2020), 'fednova' (normalised averaging, Wang et al. 2020), 'fedbn' (normalisation layers
  # kept per client, Li et al. 2021) or 'ditto' (a personal model per client pulled towards the global
  # one, Li et al. 2021); fedbn / ditto also evaluate each site with its client's personal model.
  # docs/algorithms.md.
  c.algorithm = ml_collections.ConfigDict()
  c.algorithm.name = "fedavg"  # fedavg | scaffold | moon | fedprox | fednova | fedbn | ditto (see above)
  c.algorithm.moon_mu = 1.0  # moon: weight of the model-contrastive term
  c.algorithm.moon_tau = 0.5  # moon: temperature of the contrastive similarities
  c.algorithm.prox_mu = 0.01  # fedprox: weight mu of the proximal term (mu/2)||w - w_global||^2
  c.algorithm.ditto_lambda = 0.1  # ditto: weight lambda of the personal model's pull (lambda/2)||v - w||^2
  # scaffold: 'uniform' (the paper: mean of the sampled clients' deltas) or 'data_size' (deltas weighted
  # by client dataset size, the earlier behaviour); the control variate always moves by (1/N) sum dc_i
  c.algorithm.scaffold_weighting = "uniform"
  # Heterogeneous local work: 0 = every client takes local_steps steps; k >= 1 = each sampled client
  # takes a number of steps drawn uniformly from k..local_steps each round (from the round's rng)
  c.algorithm.local_steps_min = 0
  # Client dropout: each sampled client fails to report with this probability each round (drawn from
  # the round's rng); the aggregate uses the clients that reported, who reported is logged per round.
  c.algorithm.dropout = 0.0
  # Where per-client state of stateful algorithms lives between rounds: 'device' (one array of
  # num_clients rows in accelerator memory, a full copy on every device of the mesh) or 'host' (numpy
  # rows, only sampled clients travel).
  c.algorithm.client_state = "device"

  # How the server combines the clients' updates (fedkd/fl/aggregate.py, docs/algorithms.md): 'mean' (the
  # weighted mean), robust statistics over the clients that count: 'median' (coordinate-wise),
  # 'trimmed_mean' (drops the trim_beta fraction of largest and of smallest values per coordinate),
  # 'krum' / 'multi_krum' (Blanchard et al. 2017: the update(s) closest to their neighbours, krum_f
  # assumed attackers), or 'norm_clip' (each update clipped to clip_norm, then the weighted mean).
  c.aggregator = ml_collections.ConfigDict()
  c.aggregator.name = "mean"  # mean | median | trimmed_mean | krum | multi_krum | norm_clip
  c.aggregator.trim_beta = 0.1  # trimmed_mean: fraction dropped at each end, 0 <= beta < 0.5
  c.aggregator.krum_f = 1  # krum / multi_krum: number of attackers assumed
  c.aggregator.multi_krum_k = 0  # multi_krum: updates averaged (0 = clients - krum_f)
  c.aggregator.clip_norm = 1.0  # norm_clip: the largest L2 norm of a client's update

  # Attack simulation (fedkd/fl/attacks.py): the clients with ids below round(fraction * num_clients)
  # are attackers and, whenever sampled, send a 'sign_flip'ped update, one scaled by 'factor', or
  # Gaussian noise of std 'noise_std' instead of their update. 'none': every client is honest.
  c.attack = ml_collections.ConfigDict()
  c.attack.name = "none"  # none | sign_flip | scale | gaussian
  c.attack.fraction = 0.2  # share of the clients that attack (at least one when name != none)
  c.attack.factor = -10.0  # scale: the factor
  c.attack.noise_std = 1.0  # gaussian: the noise std

  # User-level differential privacy, DP-FedAvg (McMahan et al. 2018; fedkd/fl/dp.py): each client's
  # update clipped to L2 norm clip_norm, Gaussian noise of std noise_multiplier x clip_norm added to their
  # sum once per round, divided by clients_per_round (fixed denominator). The privacy spent, epsilon at
  # delta, is computed with Google's dp-accounting (RDP accountant, fixed-size sampling without
  # replacement) after every round; a run stops before a round that would spend more than target_epsilon.
  c.dp = ml_collections.ConfigDict()
  c.dp.enabled = False  # clip, noise and account every round (DP-FedAvg)
  c.dp.clip_norm = 0.1  # the largest L2 norm of a client's update
  c.dp.noise_multiplier = 1.0  # noise std / clip_norm (0: clipping only, no privacy: epsilon = inf)
  c.dp.delta = 1e-5  # the delta of (epsilon, delta)-DP; should be below 1 / num_clients
  c.dp.target_epsilon = 0.0  # 0 = no limit; else the run stops before exceeding it

  # Compression of the clients' uploads (fedkd/fl/compress.py): 'none', 'int8' (8-bit stochastic
  # quantisation per tensor, unbiased) or 'topk' (the fraction of largest-magnitude entries per tensor,
  # with error feedback: what was not sent is added to the next round's update). Bytes sent are logged.
  c.compress = ml_collections.ConfigDict()
  c.compress.name = "none"  # none | int8 | topk
  c.compress.fraction = 0.01  # topk: share of each tensor's entries sent
  c.compress.error_feedback = True  # topk: keep the unsent remainder per client (a per-client row)

  c.engine = ml_collections.ConfigDict()
  # How a device's clients run: 'vmap' (one batched program), 'chunked' (lax.scan over chunks of
  # client_chunk clients, vmapped inside: bounded memory for many clients per device), 'unroll' (each
  # client's ops emitted separately; XLA:CPU's fastest), 'auto' (CPU: unroll; GPU/TPU: vmap up to 16
  # clients per device for UNet / TransUNet, else chunked; docs/engine.md has the measurements).
  c.engine.client_layout = "auto"
  # How convolutions are computed: 'xla' (XLA's convs; vmapped they are grouped convs), 'gemm' (im2col
  # patches x weights batched matmuls for the forward pass and both gradients), 'wgrad' (XLA forward and
  # input gradient, GEMM kernel gradient), 'matmul' (XLA's convs except 1x1 and UNet's 2x2 stride-2
  # transposed convs, which are matmuls, and convs with at most 16 output positions per image, which are
  # im2col GEMMs), 'auto' (CPU: matmul with unroll, else xla; GPU/TPU: wgrad for UNet, gemm for TransUNet
  # and for chunked).
  c.engine.conv_lowering = "auto"
  # 'chunked': clients per chunk (1 = one client at a time); only one chunk's activations are alive. A
  # chunk is the largest divisor of a device's clients up to this (7 clients per device: chunks of 7 or 1).
  c.engine.client_chunk = 8
  # Deprecated (one release): the old single knob (vmap | bgemm | hybrid | unroll | chunked | map) and
  # its chunk_strategy; set, they map to client_layout / conv_lowering with a note. '' = not set.
  c.engine.client_parallelism = ""
  c.engine.chunk_strategy = ""  # deprecated: chunked's lowering (vmap | bgemm | hybrid); '' = not set
  # Unroll the lax.scan over local steps: 'auto' = on CPU only (XLA:CPU runs convs in loops ~20x slower).
  c.engine.unroll_local_steps = "auto"
  # 'unroll' with a linear aggregator: at most this many clients train at once; client i starts once the
  # running aggregate holds clients 0..i-k, which bounds the round's temporary memory (XLA:CPU allocates
  # it afresh at every round). 0 = XLA's own schedule (all clients in lockstep); 'auto' = on CPU the host
  # cores per device (4x that with host memory kept on one CPU device), elsewhere 0.
  c.engine.clients_in_flight = "auto"
  # Host memory of CPU programs (fedkd.hostmem, set at start for the whole process): 'keep' = freed memory
  # stays in the process (synchronous single-device CPU dispatch + glibc heap thresholds), so a round's
  # temporary buffer is not mapped and faulted in afresh each round; resident memory stays at its peak.
  # 'release' = glibc's and JAX's defaults. 'auto' = keep on Linux/glibc where JAX runs on the CPU
  # (JAX_PLATFORMS naming cpu first, or unset with no GPU/TPU plugin of JAX installed). Programs over
  # several CPU devices dispatch asynchronously as before.
  c.engine.host_memory = "auto"
  # Forward/backward dtype: 'float32' or 'bfloat16' (master weights, optimizer state, deltas and their
  # aggregation stay float32).
  c.engine.compute_dtype = "float32"
  # Recompute activations inside each model block in the backward pass (memory for compute).
  c.engine.remat = False
  # Drop a sampled client whose update is NaN/Inf from that round's aggregate (logged) instead of
  # stopping the run; off: any non-finite update stops the run before it is checkpointed.
  c.engine.skip_nonfinite_clients = False

  c.mesh = ml_collections.ConfigDict()
  # devices on the 'clients' mesh axis; 0 = automatic: gcd(clients_per_round, visible devices)
  c.mesh.client_devices = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 5  # rounds; the last round is always evaluated
  c.eval.examples_per_site = 32  # held-out images per site
  # tfds sources: which test records are scored when a site has more than examples_per_site: 'spread' evenly over
  # the split (a cine run's frames are consecutive records: the first ones can all be one run), 'first' the first
  c.eval.pick = "spread"
  c.eval.batch_size = 32  # images per prediction batch
  c.eval.max_sites = 0  # training sites to evaluate; 0 = all (synthetic: up to 1000 clients; set it above)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5  # rounds; the last round is always saved
  c.checkpoint.max_to_keep = 2  # newest checkpoints kept
  return c


def fedefm_base_config() -> ml_collections.ConfigDict:
  """Schema and defaults of the FedEFM experiment (task 'fedefm'): federated foundation pretraining
  across silos with (un)shared data types, then a student fine-tuned on an unseen hospital."""
  c = ml_collections.ConfigDict()
  c.task = "fedefm"  # 'fedefm': foundation pretraining + downstream fine-tuning experiment
  c.seed = 0  # base seed (the experiment runs experiment.seeds)
  # numpy streams drawn for one purpose (silo sources, MATCHA activations, downstream batches): 2 = named apart
  # from the silos' round sampling streams, 1 = the seeds before, where each was one silo's batch draws of one
  # round (fedkd/streams.py; configs/fedefm.py keeps 1, the streams of its docs/fedefm.md tables)
  c.rng_streams = 2
  c.image_size = 32  # image side in px

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_silos = 6  # pretraining silos (hospitals)
  c.pretrain.num_rounds = 60  # pretraining rounds per run
  c.pretrain.local_steps = 2  # silo steps per round
  c.pretrain.batch_size = 4  # images per silo step
  c.pretrain.examples_per_silo = 256  # training images per silo
  c.pretrain.unseen_percent = 100.0  # FedEFM's "unseen label corpus": 100 = one data type per silo, 0 = all types
  # What the foundation is pretrained on (and scored on, over held-out images of every source):
  # segmentation (partial labels; endpoint: mean Dice over source x labelled class) or source
  # (classify which source = hospital profile x data type an image comes from, as the paper's released
  # code; pooled encoder tokens -> linear head; endpoint: accuracy on a balanced held-out set).
  c.pretrain.objective = "segmentation"
  c.pretrain.learning_rate = 1e-3  # silo AdamW (optax's b1, b2, eps; fresh state each round)
  c.pretrain.weight_decay = 1e-4  # silo AdamW: decoupled weight decay (Loshchilov & Hutter 2019); 0 = none
  c.pretrain.expert_learning_rate = 1e-3  # overseas experts: Adam from the visiting model

  c.fedefm = ml_collections.ConfigDict()
  c.fedefm.beta = 0.5  # weight of the distillation term (0..1)
  c.fedefm.temperature = 2.0  # KD softmax temperature (> 0)
  c.fedefm.expert_steps = 1  # steps an overseas expert trains on the neighbour's data
  c.fedefm.emd_epsilon = 0.05  # entropic regularisation of the differentiable EMD (in [1e-4, 1e4])
  c.fedefm.emd_marginals = "uniform"  # uniform | cross_reference
  c.fedefm.emd_iters = 0  # Sinkhorn iterations; 0 = sized to emd_epsilon so the plan converges
  c.fedefm.emd_debias = True  # debiased similarity S(u,v) - (S(u,u) + S(v,v))/2 + 1 (S(u,u) = 1)
  c.fedefm.weight_mode = "softmax"  # softmax | sum | raw
  c.fedefm.weight_temperature = 0.1  # softmax temperature of EMD weights (>= 1e-6)
  c.fedefm.detach_weights = True  # stop gradients through the EMD weights
  # cfl (client-server) | dfl (gossip over the topology); the controls fedefm_uniform and fedefm_e0 follow it
  c.fedefm.mixing = "cfl"
  # Neighbours (overseas experts) and DFL mixing: ring | complete | gaia (Gaia underlay, undirected) |
  # gaia_ring (the paper's directed ring over the 11 Gaia silos) | file:<path>. Undirected graphs mix
  # with Metropolis-Hastings weights, balanced digraphs (gaia_ring) with I - L / (1 + max in-degree),
  # other digraphs by push-sum (column-stochastic, weights carried).
  c.fedefm.topology = "ring"
  c.fedefm.directed = False  # file:<path> topologies: read the edges as directed (i -> j)
  # push-sum gossip (a digraph that is not balanced): scale each silo's local steps by 1 / its push-sum weight
  # (stochastic gradient-push: the consensus is the plain average's optimum); False = unscaled steps, whose
  # consensus weights each silo by its push-sum weight
  c.fedefm.gradient_push = True
  c.fedefm.matcha_budget = 0.5  # MATCHA communication budget (0..1)
  c.fedefm.warmup_rounds = 1  # rounds of plain local training before distillation (paper: 1)
  c.fedefm.moon_mu = 1.0  # MOON baseline
  c.fedefm.moon_tau = 0.5  # MOON temperature
  c.fedefm.prox_mu = 0.01  # fedprox control: proximal weight mu (loss + mu/2 |w - w_round_start|^2)
  # fedavg_matched control: FedAvg with this many times the local steps, so its gradient compute per
  # round matches FedEFM's; 0 = the ratio of their gradient FLOPs per silo round (XLA cost analysis of
  # FedEFM's round without the EMD solves, over FedAvg's), rounded.
  c.fedefm.matched_steps_factor = 0

  # Foundation (teacher) and downstream (student) models. name: transunet (the paper's backbone:
  # patch_size, stem_width, hidden, num_layers, num_heads, mlp_dim, decoder_width, skips) or unet
  # (width, depth, groups; the encoder = enc + mid blocks); num_classes, image_size for both.
  c.teacher = ml_collections.ConfigDict(
    dict(
      name="transunet",
      num_classes=4,
      patch_size=4,
      stem_width=8,
      hidden=32,
      num_layers=2,
      num_heads=2,
      mlp_dim=64,
      decoder_width=16,
      skips=False,
      image_size=32,
      width=8,
      depth=2,
      groups=4,
    )
  )
  c.student = ml_collections.ConfigDict(
    dict(  # the downstream student; same keys as teacher; by default the teacher's whole
      # encoder (same layers) with a smaller decoder, so the foundation's encoder loads entirely
      name="transunet",
      num_classes=3,
      patch_size=4,
      stem_width=8,
      hidden=32,
      num_layers=2,
      num_heads=2,
      mlp_dim=64,
      decoder_width=8,
      skips=False,
      image_size=32,
      width=8,
      depth=2,
      groups=4,
    )
  )

  c.downstream = ml_collections.ConfigDict()
  c.downstream.train_examples = 128  # labelled images of the unseen hospital
  c.downstream.test_examples = 64  # its test images
  c.downstream.steps = 300  # fine-tuning steps
  c.downstream.batch_size = 8  # fine-tuning batch
  c.downstream.learning_rate = 3e-3  # student Adam step size
  c.downstream.kd_pixel_weight = 1.0  # pixel KD (KL) weight
  c.downstream.kd_feature_weight = 1.0  # feature KD weight
  c.downstream.kd_temperature = 2.0  # pixel KD temperature
  c.downstream.val_examples = 32  # target validation images (generator split 2): every downstream choice
  # scarce-data curve: target image counts (the first n of the training images; each <= train_examples)
  c.downstream.scarce_examples = "8,32"
  c.downstream.scarce_steps = 100  # fine-tuning steps at each scarce size (a fixed short budget)
  c.downstream.probe = True  # also fit a frozen-encoder probe (only the decoder trains)
  c.downstream.teacher_adapt_steps = 100  # teacher KD: steps adapting the foundation to the target first (0 = as is)
  c.downstream.kd_scales = "0.1,0.3,1"  # teacher KD: loss scales tried, the best on the validation split kept
  c.downstream.kd_confidence = 0.7  # teacher KD: pixels where the teacher's top probability is below are masked
  c.downstream.kd_class_balance = True  # teacher KD: each teacher class's pixels weigh equally (thin wires count)

  c.experiment = ml_collections.ConfigDict()
  # Foundations compared in the main table: baselines, FedEFM (CFL: fedefm, DFL: fedefm_dfl) and its
  # controls (uniform neighbour weights, expert_steps=0 = KD to the round's own model, FedAvg with
  # matched gradient compute, FedProx).
  c.experiment.methods = (
    "scratch,centralized,fedavg,ring,matcha,moon,fedefm,fedefm_dfl,fedefm_uniform,fedefm_e0,fedavg_matched,fedprox"
  )
  c.experiment.kd_methods = "fedavg,fedefm"  # also fine-tuned with teacher KD from their foundation
  c.experiment.seeds = "0,1,2,3,4"  # comma list of seeds (paired statistics need >= 5)
  c.experiment.ablation_percents = ""  # extra unseen-label % runs, e.g. "0,25,50,75" (main: unseen_percent)
  c.experiment.ablation_methods = "fedavg,fedefm"  # methods of the unseen-% ablation
  # Reuse the finished foundations (<workdir>/foundations/*.npz) of another FedEFM workdir whose config
  # differs at most in downstream.* / student.*: re-run only the downstream part with new settings.
  c.experiment.foundations_from = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.client_devices = 0  # devices on the silo axis; 0 = automatic
  c.data = ml_collections.ConfigDict()
  # the synthetic generator's forward model, as in the fedavg schema: 2 (device attenuation scales with its
  # diameter, partial volume averaged on intensity, white read-out noise), 3 (2 with the device geometry corrected)
  # or 1 (before those corrections; configs/fedefm.py keeps 1, the model its docs/fedefm.md tables were made with)
  c.data.synthetic_physics = 2
  # The silos' round runs on the FedAvg engine: the same two speed knobs (see the fedavg schema).
  c.engine = ml_collections.ConfigDict()
  # auto: on CPU vmap (compiles ~4x faster than unroll here), on GPU the engine's measured choice
  c.engine.client_layout = "auto"  # auto | vmap | chunked | unroll
  c.engine.conv_lowering = "auto"  # auto | xla | gemm | wgrad | matmul
  c.engine.client_chunk = 8  # chunked: silos per chunk
  c.engine.host_memory = "auto"  # auto | keep | release: see the fedavg schema (engine.host_memory)
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32  # images per prediction batch
  c.eval.foundation_every = 10  # pretraining rounds between foundation evaluations (pretraining curves)
  c.eval.heldout_per_source = 32  # held-out images per source for the foundation endpoint
  # In-run checkpoints of each pretraining run (foundation) every this many rounds; a stopped or
  # preempted experiment resumes inside the run it was in.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10  # pretraining rounds between in-run checkpoints
  c.checkpoint.max_to_keep = 2  # newest checkpoints kept per run
  c.log_every = 10  # a progress line (loss, rounds/s, ETA) every this many pretraining rounds
  return c


def _key_docs(fn) -> dict[str, str]:
  """{dotted key: its comment} read from the source of a schema function (the comment on the key's
  line, then the comment block just above it, if any): the docs live in one place, next to the defaults."""
  docs, pending = {}, []
  for line in inspect.getsource(fn).splitlines():
    s = line.strip()
    if s.startswith("#"):
      pending.append(s.lstrip("# ").strip())
      continue
    m = re.match(r"c\.([\w.]+)\s*=\s*(.*)$", s)
    if m:
      key, rest = m.groups()
      inline = rest.split("  # ", 1)[1].strip() if "  # " in rest else ""
      comment = "; ".join(part for part in (inline, " ".join(pending)) if part)
      if comment:
        docs[key] = comment
    pending = []
  return docs


# Keys of config.teacher / config.student (one ConfigDict literal each, so no per-line comments).
MODEL_KEY_DOCS = {
  "name": "transunet | unet (teacher and student alike)",
  "num_classes": "output classes",
  "image_size": "input side in px; must equal config.image_size (set all three together)",
  "patch_size": "transunet: ViT patch side in px",
  "stem_width": "transunet: channels of the conv stem",
  "hidden": "transunet: ViT width (same for both)",
  "num_layers": "transunet: ViT blocks",
  "num_heads": "transunet: attention heads",
  "mlp_dim": "transunet: ViT MLP width",
  "decoder_width": "transunet: channels of the decoder's first conv; its upsampling blocks have decoder_width/2, /4, ... (at least 8)",
  "skips": "transunet: UNet-style skip connections from the stem",
  "width": "unet: first-level channels",
  "depth": "unet: levels",
  "groups": "unet: GroupNorm groups",
}


def config_help() -> str:
  """Every ``--config.*`` key of every task with its default and meaning (for ``--helpfull``)."""
  out = []
  for task, fn in (("fedavg", base_config), ("fedefm", fedefm_base_config)):
    docs = _key_docs(fn)
    for model in ("teacher", "student"):
      docs.update({f"{model}.{k}": v for k, v in MODEL_KEY_DOCS.items()})
    out.append(f"--config.* keys of task {task!r} (default, meaning):")

    def walk(node, prefix):
      for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
          if docs.get(key):
            out.append(f"  config.{key}: {docs[key]}")
          walk(v, key + ".")
        else:
          out.append(f"  --config.{key}={v!r}" + (f"\n      {docs[key]}" if docs.get(key) else ""))

    walk(fn(), "")
  return "\n".join(out)


def find_config_file(path: str) -> str | None:
  """``path`` (``~`` expanded) if it is a file, else the same file inside the installed
  ``fedkd.configs`` package (``configs/quickstart.py`` from any directory after ``pip install .``)."""
  import os

  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return path
  rel = path[len("configs/") :] if path.startswith("configs/") else path
  try:
    from importlib import resources

    packaged = resources.files("fedkd.configs").joinpath(rel)
    if packaged.is_file():
      return os.fspath(packaged)
  except (ImportError, TypeError, ValueError):
    pass
  return None


def task_schema(task) -> ml_collections.ConfigDict | None:
  """The schema of ``task`` (a config's ``task`` value: 'fedavg' or 'fedefm'), or None for any other value."""
  if task == "fedavg":
    return base_config()
  if task == "fedefm":
    return fedefm_base_config()
  return None


def schemas() -> list[ml_collections.ConfigDict]:
  """Every task's schema (for checking --config.* override keys before the file is loaded)."""
  return [task_schema("fedavg"), task_schema("fedefm")]


def sibling_config(config_file: str, name: str):
  """The module of config file ``name`` in the folder of ``config_file`` (pass ``__file__``): for a config
  that builds on another, e.g. ``sibling_config(__file__, "quickstart.py").get_config()``."""
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f"fedkd_config_{os.path.splitext(name)[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


FLAG = None  # a config-file argument that is an on/off switch: given bare ('runlocal'), never with a value


class ArgValue:
  """A config-file argument that takes a value, ``name=VALUE``: ``placeholder`` is how the accepted forms
  write VALUE (``clients=N``), ``convert`` turns the text into the value (ValueError when it cannot) and
  ``hint`` says what to give instead (``{name}`` is replaced by the argument's name)."""

  def __init__(self, placeholder: str, convert: Callable[[str], object], hint: str):
    self.placeholder, self.convert, self.hint = placeholder, convert, hint


def whole_number(low: int = 1, placeholder: str = "N", hint: str = "", high: int | None = None) -> ArgValue:
  """``name=N``: a whole number >= ``low`` (and <= ``high``)."""

  def convert(v: str) -> int:
    n = int(v)
    if n < low or (high is not None and n > high):
      raise ValueError(v)
    return n

  return ArgValue(placeholder, convert, hint or f"give a whole number >= {low}, e.g. {{name}}={max(low, 2)}")


def real_number(low: float = 0.0, placeholder: str = "X") -> ArgValue:
  """``name=X``: a finite number >= ``low``."""

  def convert(v: str) -> float:
    x = float(v)
    if not math.isfinite(x) or x < low:
      raise ValueError(v)
    return x

  return ArgValue(placeholder, convert, f"give a finite number >= {low:g}, e.g. {{name}}={low + 0.5:g}")


def one_of(*choices: str) -> ArgValue:
  """``name=NAME`` for one of ``choices``."""

  def convert(v: str) -> str:
    if v not in choices:
      raise ValueError(v)
    return v

  return ArgValue("|".join(choices), convert, f"give one of {', '.join(choices)}")


# ``seeds=N``: runs seeds 0..N-1 (a billion built a billion-entry seed list before any check)
MAX_SEEDS_ARG = 1000
SEEDS = whole_number(1, hint=f"give a number of seeds 1..{MAX_SEEDS_ARG}, e.g. seeds=3", high=MAX_SEEDS_ARG)


def config_file_name(config_file: str) -> str:
  """How messages name a config file (pass ``__file__``): ``configs/<name>.py``, as users write it."""
  import os

  return "configs/" + os.path.basename(config_file)


def parse_arg(arg: str | None, spec: dict, config_file: str, kind: str = "config") -> dict:
  """The comma list ``arg`` of a config file's ``get_config(arg)`` (``kind='config'``, given as
  ``--config=FILE:ARG``) or ``get_sweep(arg)`` (``kind='sweep'``, given as ``--sweep=ARG``), checked
  against ``spec``: {name: :data:`FLAG` or an :class:`ArgValue`}. Returns {name: value} of the names given
  (``True`` for a flag; absent ones are left out: ``a.get('runlocal', False)``, ``a.get('clients', 16)``).

  A flag takes no value (``runlocal=0`` is refused rather than read as on), a value argument needs one
  (a bare ``clients`` is refused rather than read as 1), and an unknown, repeated or malformed argument is
  a :class:`ConfigError` naming the argument, ``config_file`` (pass ``__file__``) and the accepted forms.
  """
  name = config_file_name(config_file)
  where = f"{name}:{arg}" if kind == "config" else f"--sweep={arg} of {name}"
  forms = ", ".join(k if v is FLAG else f"{k}={v.placeholder}" for k, v in spec.items())
  accepted = f"accepted: {forms}" if spec else f"{name} takes no {kind} argument"
  out: dict = {}
  unknown = []
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, sep, value = (s.strip() for s in part.partition("="))
    if key not in spec:
      unknown.append(key or part)
      continue
    if key in out:
      raise ConfigError(f"{kind} argument {key!r} is given twice in {where}; give it once ({accepted})")
    kind_of = spec[key]
    if kind_of is FLAG:
      if sep:
        raise ConfigError(
          f"{kind} argument {part!r} in {where}: {key} is an on/off flag and takes no value; write {key} to "
          f"turn it on, leave it out for off ({accepted})"
        )
      out[key] = True
      continue
    example = f"{key}={kind_of.placeholder}"
    if not value:
      raise ConfigError(f"bad {key}= in {where}: {key} needs a value; write {example} ({accepted})")
    try:
      out[key] = kind_of.convert(value)
    except ValueError:
      raise ConfigError(
        f"bad {key}= in {where}: {value!r} is not valid for {example}; {kind_of.hint.format(name=key)}"
      ) from None
  if unknown:
    drop = f"; drop ':{arg}' and override keys with --config.KEY=VALUE" if kind == "config" else ""
    raise ConfigError(f"unknown {kind} argument(s) {unknown} in {where}; {accepted}" + ("" if spec else drop))
  return out


# Keys added to a schema after runs were written, whose default is not (or not always) how those runs behaved:
# {dotted key: the value a run whose saved config lacks the key ran with, from that config's dotted keys, or None
# where the run's behaviour did not depend on one}. Such a saved config is compared as holding that value, so its
# run continues (and its results stay tabulated) only with it. fedkd.tasks.fedavg and fedkd.tasks.fedefm both
# read this table. In fedavg's configs a missing key may also stand at its default (a key added later whose
# default keeps the old behaviour needs no entry there); FedEFM compares its results part key for key.
ADDED_KEYS: dict[str, Callable[[dict], Any]] = {
  "algorithm.scaffold_weighting": lambda a: "data_size" if a.get("algorithm.name") == "scaffold" else None,
  "server_optimizer.b2": lambda a: 0.999 if a.get("server_optimizer.name") in ("adam", "adamw") else None,
  "server_optimizer.eps": lambda a: 1e-8 if a.get("server_optimizer.name") in ("adam", "adamw") else None,
  "data.unseen_key": lambda a: "num_clients" if a.get("data.source", "synthetic") == "synthetic" else None,
  # silo AdamW applied optax.adamw's default decay (fedkd.fl.engine.ADAMW_WEIGHT_DECAY)
  "pretrain.weight_decay": lambda a: 1e-4,
  # the generator's forward model: 1 before there was a second (FedEFM compares every key)
  "data.synthetic_physics": lambda a: 1 if a.get("data.source", "synthetic") == "synthetic" else None,
  # tfds test records scored: the first eval.examples_per_site of each site before 'spread'
  "eval.pick": lambda a: "first" if a.get("data.source", "synthetic") != "synthetic" else None,
  # push-sum gossip scaled no local steps before gradient-push; only a file:<path> digraph can be unbalanced,
  # elsewhere the key changes nothing (its default stands)
  "fedefm.gradient_push": lambda a: not str(a.get("fedefm.topology", "")).startswith("file:"),
  # numpy streams for one purpose, seeded apart from the round sampling streams (fedkd.streams)
  "rng_streams": lambda a: 1 if INERT_UNLESS["rng_streams"](a) else None,
}

# Keys that change nothing in a run whose flat config fails the predicate: two configs that differ there, neither
# depending on it, are the same experiment (resume, launch.sweep's reuse of a finished run).
INERT_UNLESS: dict[str, Callable[[dict], bool]] = {
  # FedEFM draws several named streams; FedAvg only quantity_skew's sizes of synthetic clients
  "rng_streams": lambda a: (
    a.get("task") == "fedefm"
    or (a.get("data.source", "synthetic") == "synthetic" and (a.get("quantity_skew") or 0) > 0)
  ),
  "eval.pick": lambda a: a.get("data.source", "synthetic") != "synthetic",  # which TFDS test records are scored
}


def flat_dict(d: dict, prefix: str = "") -> dict:
  """{'a.b': v} of a nested dict (a config's to_dict())."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def ran_as(saved: dict, current: dict) -> dict:
  """{dotted key: value} for the keys of :data:`ADDED_KEYS` that the saved config lacks and the current one
  has, where the saved config's run depended on one: the values it ran with. Both configs are flat
  (:func:`flat_dict`)."""
  added = {k: value_of(saved) for k, value_of in ADDED_KEYS.items() if k not in saved and k in current}
  return {k: v for k, v in added.items() if v is not None}


def unused_keys(c: ml_collections.ConfigDict) -> dict[str, str]:
  """{dotted key: the setting that makes the run ignore it} for the keys of ``c`` that its choices leave
  unread: an algorithm's, aggregator's, attack's, optimizer's or loss's own parameter while another one
  is chosen, ``dp.*`` with DP off, tfds-only ``data.*`` keys on synthetic data, FedEFM baselines' keys
  when the experiment runs no such method. Keys of a config whose groups do not match its task's schema
  are left out (validation reports those)."""
  try:
    return _unused_fedefm(c) if c.get("task") == "fedefm" else _unused_fedavg(c)
  except (AttributeError, KeyError, TypeError):  # a malformed config: validate() names the problem
    return {}


def _unused_fedavg(c) -> dict[str, str]:
  out: dict[str, str] = {}

  def unused(group: str, keys, because: str) -> None:
    out.update({f"{group}.{k}": because for k in keys})

  alg = c.algorithm.name
  for key, owner in (
    ("moon_mu", "moon"),
    ("moon_tau", "moon"),
    ("prox_mu", "fedprox"),
    ("ditto_lambda", "ditto"),
    ("scaffold_weighting", "scaffold"),
  ):
    if alg != owner:
      unused("algorithm", [key], f"config.algorithm.name={alg!r} (not {owner!r})")
  feedback = c.compress.name == "topk" and c.compress.error_feedback
  if alg in ("fedavg", "fedprox", "fednova") and not feedback:  # no per-client rows to place
    unused("algorithm", ["client_state"], f"config.algorithm.name={alg!r} keeps no per-client state")
  agg = c.aggregator.name
  for key, owners in (
    ("trim_beta", ("trimmed_mean",)),
    ("krum_f", ("krum", "multi_krum")),
    ("multi_krum_k", ("multi_krum",)),
    ("clip_norm", ("norm_clip",)),
  ):
    if agg not in owners:
      unused("aggregator", [key], f"config.aggregator.name={agg!r} (not {' / '.join(map(repr, owners))})")
  attack = c.attack.name
  if attack == "none":
    unused("attack", ("fraction", "factor", "noise_std"), "config.attack.name='none'")
  else:
    if attack != "scale":
      unused("attack", ["factor"], f"config.attack.name={attack!r} (not 'scale')")
    if attack != "gaussian":
      unused("attack", ["noise_std"], f"config.attack.name={attack!r} (not 'gaussian')")
  if not c.dp.enabled:
    unused("dp", ("clip_norm", "noise_multiplier", "delta", "target_epsilon"), "config.dp.enabled=False")
  if c.compress.name != "topk":
    unused("compress", ("fraction", "error_feedback"), f"config.compress.name={c.compress.name!r} (not 'topk')")
  if c.client_optimizer.name != "sgd":
    unused("client_optimizer", ["momentum"], f"config.client_optimizer.name={c.client_optimizer.name!r} (not 'sgd')")
  for name in ("client_optimizer", "server_optimizer"):
    if c[name].name != "adamw":
      unused(name, ["weight_decay"], f"config.{name}.name={c[name].name!r} (not 'adamw')")
  server = c.server_optimizer.name
  if server != "sgd":
    unused("server_optimizer", ["momentum"], f"config.server_optimizer.name={server!r} (not 'sgd')")
  else:
    unused("server_optimizer", ("b1", "b2", "eps", "initial_accumulator"), "config.server_optimizer.name='sgd'")
  if server in ("adam", "adamw"):
    unused("server_optimizer", ["initial_accumulator"], f"config.server_optimizer.name={server!r} (not yogi / adagrad)")
  if server == "adagrad":
    unused("server_optimizer", ["b2"], "config.server_optimizer.name='adagrad'")
  loss = c.loss.name
  if loss != "cldice":
    unused("loss", ("cldice_weight", "cldice_iters"), f"config.loss.name={loss!r} (not 'cldice')")
  if loss != "focal_tversky":
    unused(
      "loss", ("tversky_alpha", "tversky_beta", "tversky_gamma"), f"config.loss.name={loss!r} (not 'focal_tversky')"
    )
  else:
    unused("loss", ("ce_weight", "dice_weight"), "config.loss.name='focal_tversky'")
  if c.data.source == "synthetic":
    unused(
      "data",
      ("tfds_data_dir", "tfds_configs", "partition", "dirichlet_alpha", "augment", "workers", "prefetch"),
      "config.data.source='synthetic' (tfds sources only)",
    )
    unused("eval", ["pick"], "config.data.source='synthetic' (tfds sources only)")
  else:
    unused(
      "data",
      ["synthetic_field_size", "synthetic_physics", "unseen_key"],
      f"config.data.source={c.data.source!r} (not 'synthetic')",
    )
    if c.data.partition != "dirichlet":
      unused("data", ["dirichlet_alpha"], f"config.data.partition={c.data.partition!r} (not 'dirichlet')")
    # a TFDS client holds its partition's records: the synthetic sizes' keys are read by the iid split only
    out["examples_per_client"] = f"config.data.source={c.data.source!r} (synthetic clients' size)"
    if c.data.partition != "iid":
      out["quantity_skew"] = f"config.data.partition={c.data.partition!r} (not 'iid') on config.data.source='tfds:...'"
  if not INERT_UNLESS["rng_streams"]({"task": c.task, "data.source": c.data.source, "quantity_skew": c.quantity_skew}):
    out["rng_streams"] = "config.quantity_skew=0 or a TFDS source (no named random stream is drawn)"
  if c.aggregator.name not in LINEAR_AGGREGATORS and not c.engine.client_parallelism:
    unused("engine", ["clients_in_flight"], f"config.aggregator.name={c.aggregator.name!r} (not a weighted mean)")
  if c.engine.client_layout in ("vmap", "unroll") and not c.engine.client_parallelism:
    unused("engine", ["client_chunk"], f"config.engine.client_layout={c.engine.client_layout!r} (not 'chunked')")
  if c.engine.client_layout in ("vmap", "chunked") and not c.engine.client_parallelism:
    unused("engine", ["clients_in_flight"], f"config.engine.client_layout={c.engine.client_layout!r} (not 'unroll')")
  return out


def _unused_fedefm(c) -> dict[str, str]:
  out: dict[str, str] = {}
  percents = _csv(c.experiment.ablation_percents)
  runs = set(_csv(c.experiment.methods)) | (set(_csv(c.experiment.ablation_methods)) if percents else set())
  for key, owner in (
    ("matcha_budget", "matcha"),
    ("moon_mu", "moon"),
    ("moon_tau", "moon"),
    ("prox_mu", "fedprox"),
    ("matched_steps_factor", "fedavg_matched"),
  ):
    if owner not in runs:
      out[f"fedefm.{key}"] = f"no experiment method is {owner!r}"
  if not percents:
    out["experiment.ablation_methods"] = "config.experiment.ablation_percents='' (no ablation)"
  if not str(c.fedefm.topology).startswith("file:"):  # the named topologies are undirected or balanced
    out["fedefm.gradient_push"] = (
      f"config.fedefm.topology={c.fedefm.topology!r} (push-sum gossip needs a file:<path> digraph)"
    )
  # fedavg_matched sizes its local steps to FedEFM's round (experts from every neighbour) unless given a factor
  # MATCHA activates matchings of the complete graph whatever the topology: not a reader
  readers = {*FEDEFM_GOSSIP, *FEDEFM_DISTILL, *(() if c.fedefm.matched_steps_factor else ("fedavg_matched",))}
  readers.discard("matcha")
  if not runs & readers:
    because = f"no experiment method gossips or takes experts over a topology ({' / '.join(sorted(readers))})"
    out.update({f"fedefm.{key}": because for key in ("topology", "directed", "gradient_push")})
  if not runs & set(FEDEFM_FOLLOW_MIXING):
    out["fedefm.mixing"] = f"no experiment method follows it ({' / '.join(FEDEFM_FOLLOW_MIXING)})"
  no_kd = (
    f"config.pretrain.objective={c.pretrain.objective!r} (teacher KD needs segmentation)"
    if c.pretrain.objective != "segmentation"
    else "no method of config.experiment.kd_methods is run (no teacher-KD fine-tune)"
    if not runs & set(_csv(c.experiment.kd_methods))
    else None
  )
  if no_kd:
    out.update({f"downstream.{key}": no_kd for key in _FEDEFM_TEACHER_KD_KEYS})
  if not runs & set(FEDEFM_DISTILL):
    because = f"no experiment method distils from overseas experts ({' / '.join(FEDEFM_DISTILL)})"
    # fedavg_matched sizes its local steps to FedEFM's round, experts included, unless given a factor
    sizing = "fedavg_matched" in runs and not c.fedefm.matched_steps_factor
    for key in _FEDEFM_DISTILL_KEYS:
      if not (sizing and key == "expert_steps"):
        out[f"fedefm.{key}"] = because
  return out


# The downstream keys only the teacher-KD fine-tunes read (experiment.kd_methods).
_FEDEFM_TEACHER_KD_KEYS = (
  "kd_scales",
  "kd_pixel_weight",
  "kd_feature_weight",
  "kd_temperature",
  "kd_confidence",
  "kd_class_balance",
  "teacher_adapt_steps",
)

# The keys only the distilling methods read (the silo update's options and its warm-up).
_FEDEFM_DISTILL_KEYS = (
  "beta",
  "temperature",
  "expert_steps",
  "emd_epsilon",
  "emd_marginals",
  "emd_iters",
  "emd_debias",
  "weight_mode",
  "weight_temperature",
  "detach_weights",
  "warmup_rounds",
)


# The keys of the config being validated that its run does not read (unused_keys): their values are checked for
# type only, not for range, since the run's note says they have no effect (attack.fraction=0 with no attack).
_UNREAD: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("fedkd_config_unread", default=frozenset())


@contextlib.contextmanager
def _checking_read_keys_only(c):
  token = _UNREAD.set(frozenset(unused_keys(c)))
  try:
    yield
  finally:
    _UNREAD.reset(token)


def _unread(key: str) -> bool:
  """True while validating a config whose run does not read ``key`` (dotted, without 'config.')."""
  return key in _UNREAD.get()


def unread_by_both(saved: dict, current: dict) -> set[str]:
  """The dotted keys that neither config (two to_dict() forms, e.g. a run's config.json and the config given now)
  reads (:func:`unused_keys` of each): a change there changes no number of the run, as its note says."""
  try:
    a, b = (unused_keys(ml_collections.ConfigDict(c)) for c in (saved, current))
  except (TypeError, ValueError, AttributeError):  # not a config a run wrote: the key comparison names it
    return set()
  return set(a) & set(b)


def unused_notes(c: ml_collections.ConfigDict, given=()) -> list[str]:
  """One line per reason for the keys of :func:`unused_keys` that the user set: given on the command line
  (dotted keys in ``given``) or different from the task schema's default."""
  schema = task_schema(c.get("task")) or base_config()
  by_reason: dict[str, list[str]] = {}
  for key, because in unused_keys(c).items():
    try:
      value, default = value_at(c, key), value_at(schema, key)
    except (KeyError, AttributeError):
      continue
    if key in given or value != default or type(value) is not type(default):
      by_reason.setdefault(because, []).append(f"config.{key}={value!r}")
  return [
    f"note: {', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect while {because}"
    for because, keys in by_reason.items()
  ]


def check_finite(c: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Rejects NaN / Inf anywhere in the config (ml_collections parses 'nan' and 'inf' as floats)."""
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      check_finite(v, f"{prefix}.{k}")
    elif isinstance(v, float) and not math.isfinite(v):
      raise ConfigError(f"{prefix}.{k}={v} is not a finite number; set --{prefix}.{k} to a finite value")


def value_at(c, key: str):
  """``c``'s value at the dotted ``key`` ('model.width')."""
  v = c
  for k in key.split("."):
    v = v[k]
  return v


def stored_value(c, key: str):
  """``c``'s value at the dotted ``key`` of :data:`ADDED_KEYS`; where ``c`` is a stored config from before the key
  existed (it lacks it), the value its run ran with (None where its run did not depend on one)."""
  try:
    return value_at(c, key)
  except KeyError:
    return ADDED_KEYS[key](flat_dict(c.to_dict()))


def unet_groups_problem(width: int, depth: int, groups: int) -> str | None:
  """Why a UNet of ``width`` channels at its first level (doubling per level, ``depth`` levels below it) cannot
  GroupNorm its levels with ``groups`` groups (each level takes min(groups, its channels):
  ``fedkd.models.unet.ConvBlock``), or None."""
  for level in range(depth + 1):
    channels = width << level
    if channels % min(groups, channels):
      return f"a level of {channels} channels cannot be split into {groups} GroupNorm groups"
  return None


def _positive(c, key: str) -> None:
  value = value_at(c, key)
  if _unread(key):
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise ConfigError(f"config.{key}={value!r} must be a positive number; set --config.{key} to a value > 0")


MAX_FIELD_SIZE = 4096  # config.data.synthetic_field_size: the largest acquisition field (px) of the generator
MAX_CLIENTS = 10_000_000  # per-client arrays (sizes, sampling) are host numpy arrays of this length
# synthetic runs render every evaluated site's held-out set before the first round: eval.max_sites=0 (all) is
# refused above this many training sites, where it means tens of thousands of images (set max_sites explicitly)
EVAL_ALL_SITES_MAX = 1000
EMD_EPSILON_RANGE = (1e-4, 1e4)  # fedefm.emd_epsilon values the float32 Sinkhorn solve handles (validate_fedefm)
MIN_WEIGHT_TEMPERATURE = 1e-6  # fedefm.weight_temperature: S / T stays finite in float32 for S in [-1, 1]
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
FLOAT32_TINY = 1.1754943508222875e-38  # numpy.finfo(numpy.float32).tiny: smaller positive values lose precision
FLOAT32_RANGE = "from 1.2e-38 to 3.4e38 (positive, in float32's normal range)"
MAX_SEED = 2**32  # jax.random.key(seed) keeps 32 bits: seed 2**32 would repeat seed 0


def _kind_of(default) -> tuple[Callable[[Any], bool], str, str] | None:
  """For a schema default: (accepts(value), what the key takes, how to write it), or None (no rule: lists, None)."""
  if isinstance(default, bool):
    return (lambda v: isinstance(v, (bool, np.bool_))), "on/off (a bool)", "True or False (no quotes)"
  if isinstance(default, int):
    whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))  # noqa: E731
    return whole, "a whole number (an int)", f"a whole number without quotes (e.g. {default})"
  if isinstance(default, float):
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))  # noqa: E731
    return real, "a number", f"a number without quotes (e.g. {default!r})"
  if isinstance(default, str):
    return (lambda v: isinstance(v, str)), "text (a str)", f"text in quotes (e.g. {default!r})"
  return None


def type_problem(
  c: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "config", allow_none: bool = False
):
  """The first key of ``c`` (recursively, keys both have) whose value is not of its schema default's type, as
  (dotted key, value, what the key takes, how to write it), or None. A 'false' string on an on/off key would
  read as true, a '5' string where a number belongs fails later with a message about the number.
  ``allow_none``: None passes (a typed placeholder that a --config.KEY override fills)."""
  for k, default in schema.items():
    if k not in c:
      continue
    v = c[k]
    if isinstance(default, ml_collections.ConfigDict):
      nested = isinstance(v, ml_collections.ConfigDict)
      found = type_problem(v, default, f"{prefix}.{k}", allow_none) if nested else None
      if found:
        return found
      continue
    kind = _kind_of(default)
    if kind is not None and not kind[0](v) and not (v is None and allow_none):
      return f"{prefix}.{k}", v, kind[1], kind[2]
  return None


def a_type(value) -> str:
  """'a str', 'an int': the type of ``value`` with its article."""
  if value is None:
    return "unset"
  name = type(value).__name__
  return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def check_keys(c: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every key of ``schema`` present in ``c`` and no other (recursively), each of its default's type, with
  one-line errors."""
  _check_key_names(c, schema, prefix)
  found = type_problem(c, schema, prefix)
  if found:
    key, value, takes, write = found
    raise ConfigError(f"{key}={value!r} is {a_type(value)}, but the key takes {takes}; set it to {write}")


def _check_key_names(c: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
  if not isinstance(c, ml_collections.ConfigDict):
    raise ConfigError(f"{prefix} is {c!r}, not a group of keys; start get_config from the task's base config")
  extra = sorted(set(c.keys()) - set(schema.keys()))
  if extra:
    close = difflib.get_close_matches(extra[0], list(schema.keys()), n=1)
    raise ConfigError(
      f"unknown config key {prefix}.{extra[0]}"
      + (
        f"; did you mean {prefix}.{close[0]}?"
        if close
        else f"; known keys in {prefix}: {', '.join(sorted(schema.keys()))}"
      )
    )
  missing = sorted(set(schema.keys()) - set(c.keys()))
  if missing:
    raise ConfigError(
      f"{prefix}.{missing[0]} is missing ({len(missing)} key(s) missing); build the config "
      "from fedkd.config.base_config() (or fedefm_base_config()) and change what you need"
    )
  for k, v in schema.items():
    if isinstance(v, ml_collections.ConfigDict):
      _check_key_names(c[k], v, f"{prefix}.{k}")


def _int_at_least(c, key: str, low: int, high: int | None = None) -> None:
  value = value_at(c, key)
  if _unread(key):
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
    rng = f">= {low}" if high is None else f"in {low}..{high}"
    raise ConfigError(f"config.{key}={value!r} must be an integer {rng}; set --config.{key}")


def _validate_robustness(c) -> None:
  """config.aggregator.* and config.attack.*: names, ranges, and which algorithms they combine with."""
  _choice(c, "aggregator.name", AGGREGATORS)
  name = c.aggregator.name
  if name != "mean" and c.algorithm.name not in ROBUST_ALGORITHMS:
    raise ConfigError(
      f"config.aggregator.name={name!r} works with config.algorithm.name = {' | '.join(ROBUST_ALGORITHMS)} "
      f"(uploads that are model deltas), not {c.algorithm.name!r}; use aggregator.name='mean'"
    )
  if name not in LINEAR_AGGREGATORS and c.engine.skip_nonfinite_clients:
    raise ConfigError(
      f"config.engine.skip_nonfinite_clients=True needs a linear aggregator (mean or norm_clip), not {name!r}; "
      "the robust aggregators already leave out clients whose update is NaN/Inf: set it to False"
    )
  _number(c, "aggregator.trim_beta", lambda v: 0 <= v < 0.5, "in [0, 0.5)")
  _int_at_least(c, "aggregator.krum_f", 0)
  _int_at_least(c, "aggregator.multi_krum_k", 0)
  _number(c, "aggregator.clip_norm", lambda v: FLOAT32_TINY <= v <= FLOAT32_MAX, FLOAT32_RANGE)
  if name in ("krum", "multi_krum") and c.clients_per_round < c.aggregator.krum_f + 3:
    raise ConfigError(
      f"config.aggregator.name={name!r} with krum_f={c.aggregator.krum_f} needs at least krum_f + 3 = "
      f"{c.aggregator.krum_f + 3} clients per round, not {c.clients_per_round}; lower config.aggregator.krum_f "
      "or raise config.clients_per_round"
    )
  beta, m = c.aggregator.trim_beta, c.clients_per_round
  if name == "trimmed_mean" and beta > 0 and math.floor(beta * m) == 0:  # else silently the plain mean
    raise ConfigError(
      f"config.aggregator.trim_beta={beta:g} drops floor({beta:g} x {m}) = 0 values at each end of the {m} "
      f"clients of a round: the plain mean, which an attacker passes; "
      + (
        f"set trim_beta >= {1 / m:.3g} (e.g. {math.ceil(100 / m) / 100:g}) or trim_beta=0 for a plain mean"
        if m >= 3
        else "trimming needs at least 3 clients per round (trim_beta < 0.5): raise config.clients_per_round"
      )
    )
  if name == "multi_krum" and c.aggregator.multi_krum_k > c.clients_per_round:
    raise ConfigError(
      f"config.aggregator.multi_krum_k={c.aggregator.multi_krum_k} is more than the {c.clients_per_round} "
      "clients of a round; use 0 (clients - krum_f) or at most clients_per_round"
    )
  k = c.aggregator.multi_krum_k or c.clients_per_round - c.aggregator.krum_f
  if name == "multi_krum" and k >= c.clients_per_round:  # else silently the plain mean
    given = f"multi_krum_k={k}" if c.aggregator.multi_krum_k else f"krum_f=0 (k = clients - krum_f = {k})"
    raise ConfigError(
      f"config.aggregator.{given} averages all {c.clients_per_round} clients of a round: the plain mean, "
      f"which an attacker passes; set multi_krum_k < {c.clients_per_round} (or krum_f >= 1 with multi_krum_k=0), "
      "or aggregator.name='mean' for a plain mean"
    )
  _choice(c, "attack.name", ATTACKS)
  _number(c, "algorithm.dropout", lambda v: 0 <= v < 1, "in [0, 1)")
  _number(c, "attack.fraction", lambda v: 0 < v < 1, "in (0, 1)")
  # the factor multiplies float32 updates: past float32's largest value it is inf there
  _number(c, "attack.factor", lambda v: abs(v) <= FLOAT32_MAX, "finite in float32 (|x| <= 3.4e38)")
  _number(c, "attack.noise_std", lambda v: v >= 0, ">= 0")
  if c.attack.name != "none" and num_attackers(c) >= c.num_clients:
    raise ConfigError(
      f"config.attack.fraction={c.attack.fraction:g} makes all {c.num_clients} client(s) attackers "
      f"(round({c.attack.fraction:g} x {c.num_clients}), at least 1), so no honest update is left; lower "
      "config.attack.fraction or raise config.num_clients"
    )
  if c.attack.name != "none" and c.algorithm.name not in ROBUST_ALGORITHMS:
    raise ConfigError(
      f"config.attack.name={c.attack.name!r} works with config.algorithm.name = {' | '.join(ROBUST_ALGORITHMS)}, "
      f"not {c.algorithm.name!r}"
    )


def _validate_privacy_and_compression(c) -> None:
  """config.dp.* and config.compress.*: ranges, and which algorithms / aggregators they combine with."""
  _number(c, "dp.clip_norm", lambda v: FLOAT32_TINY <= v <= FLOAT32_MAX, FLOAT32_RANGE)
  _number(c, "dp.noise_multiplier", lambda v: v >= 0, ">= 0")
  _number(c, "dp.delta", lambda v: 0 < v < 1, "in (0, 1)")
  _number(c, "dp.target_epsilon", lambda v: v >= 0, ">= 0 (0 = no limit)")
  if c.dp.enabled:
    if c.algorithm.name not in DP_ALGORITHMS:
      raise ConfigError(
        f"config.dp.enabled=True works with config.algorithm.name = {' | '.join(DP_ALGORITHMS)} (uploads that "
        f"are plain model deltas), not {c.algorithm.name!r}"
      )
    if c.aggregator.name != "mean":
      raise ConfigError(
        f"config.dp.enabled=True clips and noises the sum of the updates, so it needs config.aggregator.name="
        f"'mean', not {c.aggregator.name!r}"
      )
    if c.dp.target_epsilon and c.dp.noise_multiplier == 0:
      raise ConfigError(
        "config.dp.target_epsilon is set but config.dp.noise_multiplier=0 spends an infinite epsilon; set a "
        "noise_multiplier > 0 or target_epsilon=0"
      )
  _choice(c, "compress.name", COMPRESSORS)
  _number(c, "compress.fraction", lambda v: 0 < v <= 1, "in (0, 1]")


def num_attackers(c) -> int:
  """How many clients attack: round(attack.fraction * num_clients), at least one (0 with attack.name=none)."""
  if c.attack.name == "none":
    return 0
  return max(1, round(c.attack.fraction * c.num_clients))


def dropout_note(c, need: int) -> str | None:
  """A note when client dropout can leave a round fewer counting clients than the aggregator's ``min_counting``
  (Krum's f + 3, the trimmed mean's fewest that trim a value): there the server keeps its model. Each of the
  round's m clients reports with probability 1 - dropout, so that happens in P(Binomial(m, 1 - dropout) < min)
  of the rounds (non-finite clients aside). ``need``: the aggregator's ``min_counting``."""
  m, q = c.clients_per_round, c.algorithm.dropout
  if need <= 1 or not q:
    return None
  share = sum(math.comb(m, j) * (1 - q) ** j * q ** (m - j) for j in range(min(need, m + 1)))
  return (
    f"note: with config.algorithm.dropout={q:g}, {c.aggregator.name} needs {need} of the {m} clients of a round to "
    f"report; in about {100 * share:.3g}% of the rounds fewer do, and the server keeps its model there "
    "(lower the dropout or raise config.clients_per_round)"
  )


def krum_note(c) -> str | None:
  """A note when Krum runs with fewer clients per round than its resilience needs: Blanchard et al. 2017
  (Proposition 1) assume n > 2f + 2; validate only requires the n >= f + 3 that the score needs."""
  f, n = c.aggregator.krum_f, c.clients_per_round
  if c.aggregator.name not in ("krum", "multi_krum") or n > 2 * f + 2:
    return None
  return (
    f"note: Krum's resilience to krum_f={f} attacker(s) (Blanchard et al. 2017, Proposition 1) needs more than "
    f"2 krum_f + 2 = {2 * f + 2} clients per round; with {n} it runs as a heuristic without that guarantee "
    f"(clients_per_round >= {2 * f + 3} or a lower config.aggregator.krum_f restores it)"
  )


def _at_least(c, key: str, low: float, strict: bool = False) -> None:
  value = value_at(c, key)
  if _unread(key):
    return
  bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (value <= low if strict else value < low)
  if bad:
    raise ConfigError(f"config.{key}={value!r} must be a number {'>' if strict else '>='} {low}; set --config.{key}")


def _number(c, key: str, ok: Callable[[float], bool], rule: str, integer: bool = False):
  """``config.<key>`` must be a (finite; ``integer``: whole) number with ``ok(value)``; returns it."""
  v = value_at(c, key)
  kind = int if integer else (int, float)
  if _unread(key):
    return v
  if isinstance(v, bool) or not isinstance(v, kind) or not ok(v):
    raise ConfigError(
      f"config.{key}={v!r} must be {'an integer' if integer else 'a number'} {rule}; "
      f"set --config.{key} to a value {rule}"
    )
  return v


def unroll_local_steps(engine_cfg):
  """``engine.unroll_local_steps`` as 'auto', True or False (a command-line override of the string field
  arrives as text: 'true' / 'false' in any case); None when it is none of them."""
  v = engine_cfg.get("unroll_local_steps", "auto")
  if isinstance(v, str) and v.strip().lower() in ("true", "false"):
    return v.strip().lower() == "true"
  return v if v == "auto" or isinstance(v, bool) else None


def host_memory(config) -> str:
  """``engine.host_memory`` ('auto' when the config has no such key), or ConfigError naming the choices."""
  from fedkd.hostmem import MODES

  engine_cfg = config.get("engine") or {}
  v = engine_cfg.get("host_memory", "auto")
  if v not in MODES:
    raise ConfigError(f"config.engine.host_memory={v!r} is unknown; use one of {', '.join(repr(m) for m in MODES)}")
  return v


def clients_in_flight(engine_cfg):
  """``engine.clients_in_flight`` as 'auto' or an int >= 0; None when it is neither."""
  return parse_clients_in_flight(engine_cfg.get("clients_in_flight", "auto"))


def parse_clients_in_flight(v):
  """A clients-in-flight value as 'auto' or an int >= 0 (command-line text such as '2' included); None
  when it is neither."""
  if isinstance(v, str) and v.strip().isdigit():
    v = int(v)
  if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
    return v
  return None


def _choice(c, key: str, choices) -> str:
  """``config.<key>`` must be one of ``choices`` (strings); returns it."""
  v = value_at(c, key)
  if v not in choices and not _unread(key):
    raise ConfigError(f"config.{key}={v!r} is unknown; use one of {', '.join(choices)}")
  return v


def _check_streams(c) -> None:
  from fedkd.streams import VERSIONS

  if _unread("rng_streams"):
    return
  if isinstance(c.rng_streams, bool) or c.rng_streams not in VERSIONS:
    raise ConfigError(
      f"config.rng_streams={c.rng_streams!r} is unknown; use 2 (the default: streams named apart from the round "
      "sampling streams) or 1 (the seeds of runs made before them; fedkd/streams.py)"
    )


def _check_physics(c) -> None:
  if _unread("data.synthetic_physics"):
    return
  if isinstance(c.data.synthetic_physics, bool) or c.data.synthetic_physics not in SYNTHETIC_PHYSICS:
    raise ConfigError(
      f"config.data.synthetic_physics={c.data.synthetic_physics!r} is unknown; use 2 (the default: corrected "
      "device attenuation, partial volume and read-out noise), 3 (2 with devices that leave the field and a "
      "catheter entering from outside it) or 1 (the generator before them; docs/data.md)"
    )


def validate(c: ml_collections.ConfigDict, num_devices: int, processes: int = 1) -> int:
  """Checks ``c`` before any work; returns the number of devices on the 'clients' mesh axis. ``processes``: the
  run's process count (``jax.process_count()``; each process drives ``num_devices / processes`` devices). Keys
  the run does not read (:func:`unused_keys`) are checked for type only."""
  with _checking_read_keys_only(c):
    return _validate(c, num_devices, processes)


def _validate(c: ml_collections.ConfigDict, num_devices: int, processes: int) -> int:
  if "task" not in c:
    raise ConfigError("config.task is missing; build the config from fedkd.config.base_config()")
  if c.task not in TASKS:
    raise ConfigError(f"config.task={c.task!r} is not a known task; use one of {', '.join(TASKS)}")
  check_keys(c, base_config())
  check_finite(c)
  for key in (
    "num_rounds",
    "num_clients",
    "clients_per_round",
    "local_steps",
    "batch_size",
    "image_size",
    "examples_per_client",
    "model.width",
    "model.depth",
    "model.groups",
    "model.num_classes",
    "client_optimizer.learning_rate",
    "server_optimizer.learning_rate",
    "eval.every",
    "eval.examples_per_site",
    "eval.batch_size",
    "checkpoint.every",
    "checkpoint.max_to_keep",
    "engine.client_chunk",
  ):
    _positive(c, key)
  for key in ("client_optimizer.learning_rate", "server_optimizer.learning_rate"):  # float32 in the optimizer
    _number(c, key, lambda v: FLOAT32_TINY <= v <= FLOAT32_MAX, FLOAT32_RANGE)
  if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < MAX_SEED:
    raise ConfigError(
      f"config.seed={c.seed!r} must be an integer in 0..{MAX_SEED - 1} (JAX keys hold 32 "
      "bits; larger seeds would repeat smaller ones)"
    )
  for key in (
    "num_rounds",
    "num_clients",
    "clients_per_round",
    "local_steps",
    "batch_size",
    "image_size",
    "examples_per_client",
    "model.width",
    "model.depth",
    "model.groups",
    "eval.every",
    "eval.examples_per_site",
    "eval.batch_size",
    "checkpoint.every",
    "checkpoint.max_to_keep",
    "engine.client_chunk",
    "loss.cldice_iters",
  ):
    _int_at_least(c, key, 1)
  for key in ("eval.max_sites", "data.synthetic_field_size", "mesh.client_devices"):
    _int_at_least(c, key, 0)
  _choice(c, "data.unseen_key", UNSEEN_KEYS)
  _choice(c, "eval.pick", EVAL_PICKS)
  _check_physics(c)
  _check_streams(c)
  field_read = not _unread("data.synthetic_field_size")
  if 0 < c.data.synthetic_field_size < 32 and field_read:  # a field of a few pixels: devices wider than the image
    raise ConfigError(
      f"config.data.synthetic_field_size={c.data.synthetic_field_size} is too small: the acquisition field is at "
      "least 32 px (0 = the output itself, 512 = a downsampled 512 px view)"
    )
  if (
    c.data.synthetic_field_size > MAX_FIELD_SIZE and field_read
  ):  # devices of a fraction of a pixel: labels on blank pixels
    raise ConfigError(
      f"config.data.synthetic_field_size={c.data.synthetic_field_size} is larger than any detector: the acquisition "
      f"field is at most {MAX_FIELD_SIZE} px (its devices would be far thinner than a pixel of the output, labelled "
      "where nothing is drawn); use 0 (the output itself) or a detector's size such as 512 or 1024"
    )
  if c.num_clients > MAX_CLIENTS:
    raise ConfigError(
      f"config.num_clients={c.num_clients} is more than fedkd simulates ({MAX_CLIENTS:,}); use fewer clients"
    )
  for key in (
    "quantity_skew",
    "loss.ce_weight",
    "loss.dice_weight",
    "loss.cldice_weight",
    "loss.tversky_alpha",
    "loss.tversky_beta",
    "client_optimizer.momentum",
    "server_optimizer.momentum",
  ):
    _at_least(c, key, 0.0)
  _at_least(c, "loss.tversky_gamma", 0.0, strict=True)
  for name in ("client_optimizer", "server_optimizer"):
    if c[name].momentum >= 1 and not _unread(f"{name}.momentum"):
      raise ConfigError(f"config.{name}.momentum={c[name].momentum} must be < 1 (0 = none)")
    _number(c, f"{name}.weight_decay", lambda v: v >= 0, ">= 0 (0 = none)")  # finite: check_finite above
  if not isinstance(c.engine.skip_nonfinite_clients, bool):
    raise ConfigError(f"config.engine.skip_nonfinite_clients={c.engine.skip_nonfinite_clients!r} must be True or False")
  if c.data.unseen_site and c.data.source == "synthetic":
    raise ConfigError(
      f"config.data.unseen_site={c.data.unseen_site!r} applies to tfds sources only; synthetic "
      "data always evaluates its own unseen hospital profile; drop --config.data.unseen_site"
    )
  if c.clients_per_round > c.num_clients:
    raise ConfigError(
      f"config.clients_per_round={c.clients_per_round} is larger than "
      f"config.num_clients={c.num_clients}; set --config.clients_per_round={c.num_clients} (or less) or raise "
      "--config.num_clients (or, where the config file takes them, its per_round= / clients= arguments)"
    )
  if c.quantity_skew < 0:
    raise ConfigError(f"config.quantity_skew={c.quantity_skew} must be >= 0 (0 = equal client sizes)")
  if c.data.source == "synthetic" and c.examples_per_client < c.batch_size:
    raise ConfigError(
      f"config.examples_per_client={c.examples_per_client} is smaller than config.batch_size={c.batch_size}: a "
      "synthetic client holds at least one batch of examples; raise examples_per_client or lower batch_size"
    )
  if c.data.source == "synthetic" and c.eval.max_sites == 0 and c.num_clients > EVAL_ALL_SITES_MAX:
    images = (c.num_clients + 1) * c.eval.examples_per_site
    gb = images * c.image_size**2 * 8 / 1e9  # float32 image + int32 mask per pixel
    raise ConfigError(
      f"config.eval.max_sites=0 evaluates all {c.num_clients:,} training sites: {images:,} held-out images "
      f"({gb:.1f} GB) rendered before the first round; set --config.eval.max_sites to the number of sites to "
      f"evaluate (e.g. 16; configs/cross_device.py uses 5), or --config.eval.max_sites={c.num_clients} for all"
    )
  if c.quantity_skew > 0 and c.data.source == "synthetic":  # sizes past int32: checked before any run starts
    from fedkd.data.pipeline import DataError, client_sizes

    try:
      client_sizes(c)
    except DataError as e:
      raise ConfigError(str(e)) from None
  if c.data.source != "synthetic" and not (c.data.source.startswith("tfds:") and len(c.data.source) > 5):
    raise ConfigError(
      f"config.data.source={c.data.source!r} is not a data source; use 'synthetic' or 'tfds:<dataset name>'"
    )
  if c.data.partition not in ("by_site", "dirichlet", "iid"):
    raise ConfigError(f"config.data.partition={c.data.partition!r} is unknown; use by_site, dirichlet or iid")
  if c.data.dirichlet_alpha <= 0:
    raise ConfigError(f"config.data.dirichlet_alpha={c.data.dirichlet_alpha} must be > 0")
  if isinstance(c.data.workers, bool) or not isinstance(c.data.workers, int) or c.data.workers < 0:
    raise ConfigError(f"config.data.workers={c.data.workers!r} must be an integer >= 0 (worker processes; 0 = none)")
  if c.model.name != "unet":
    raise ConfigError(f"config.model.name={c.model.name!r} is not a known model; use 'unet'")
  if c.model.num_classes not in (3, 4):
    raise ConfigError(
      f"config.model.num_classes={c.model.num_classes} must be 3 (background, catheter, guidewire) or 4 (+ vessel)"
    )
  if c.image_size % (2**c.model.depth):
    raise ConfigError(
      f"config.image_size={c.image_size} must be divisible by 2**config.model.depth="
      f"{2**c.model.depth}; pick an image size that is a multiple of it"
    )
  if c.image_size < 32:
    raise ConfigError(f"config.image_size={c.image_size} is too small for the synthetic X-rays; use >= 32")
  bad = unet_groups_problem(c.model.width, c.model.depth, c.model.groups)
  if bad:
    raise ConfigError(
      f"config.model.width={c.model.width} with config.model.groups={c.model.groups}: {bad}; change either"
    )
  _choice(c, "client_optimizer.name", OPTIMIZERS)
  _choice(c, "server_optimizer.name", SERVER_OPTIMIZERS)
  for key in ("server_optimizer.b1", "server_optimizer.b2"):
    _number(c, key, lambda v: 0 <= v < 1, "in [0, 1)")
  _number(c, "server_optimizer.eps", lambda v: v > 0, "> 0")
  _number(c, "server_optimizer.initial_accumulator", lambda v: v >= 0, ">= 0")
  if c.engine.client_parallelism == "measure":
    raise ConfigError(
      "config.engine.client_parallelism='measure' is retired: time the layouts with "
      "python -m bench --measure --config=<your config>, then set config.engine.client_layout / conv_lowering"
    )
  for key, choices in (
    ("client_layout", CLIENT_LAYOUTS),
    ("conv_lowering", CONV_LOWERINGS),
    ("client_parallelism", LEGACY_PARALLELISM),
    ("chunk_strategy", LEGACY_CHUNK_STRATEGIES),
  ):
    if c.engine[key] not in choices:
      raise ConfigError(
        f"config.engine.{key}={c.engine[key]!r} is unknown; use one of {', '.join(repr(x) for x in choices)}"
      )
  if unroll_local_steps(c.engine) is None:
    raise ConfigError(
      f"config.engine.unroll_local_steps={c.engine.unroll_local_steps!r} must be 'auto', 'true' or 'false' (a string "
      "field: in a config file write the value in quotes)"
    )
  if clients_in_flight(c.engine) is None:
    raise ConfigError(
      f"config.engine.clients_in_flight={c.engine.clients_in_flight!r} must be 'auto' or a whole number >= 0 "
      "(0: XLA's own schedule; a string field: in a config file write the number in quotes, e.g. '2')"
    )
  _choice(c, "engine.compute_dtype", COMPUTE_DTYPES)
  host_memory(c)
  if not isinstance(c.engine.remat, bool):
    raise ConfigError(f"config.engine.remat={c.engine.remat!r} must be True or False")
  _choice(c, "algorithm.name", ALGORITHMS)
  if c.algorithm.name == "moon" and not (c.algorithm.moon_mu >= 0 and c.algorithm.moon_tau > 0):
    raise ConfigError(
      f"config.algorithm.moon_mu={c.algorithm.moon_mu} must be >= 0 and config.algorithm.moon_tau="
      f"{c.algorithm.moon_tau} > 0"
    )
  if c.algorithm.name == "scaffold" and c.client_optimizer.name != "sgd":
    raise ConfigError(
      f"config.algorithm.name='scaffold' needs config.client_optimizer.name='sgd' (its "
      f"control-variate update assumes plain SGD steps), not {c.client_optimizer.name!r}"
    )
  if c.algorithm.name == "fednova" and c.client_optimizer.name != "sgd":
    raise ConfigError(
      f"config.algorithm.name='fednova' needs config.client_optimizer.name='sgd' (its normalisation "
      f"a_i = tau_i holds for plain SGD steps), not {c.client_optimizer.name!r}"
    )
  if c.algorithm.name in ("scaffold", "fednova") and c.client_optimizer.momentum != 0:
    raise ConfigError(
      f"config.client_optimizer.momentum={c.client_optimizer.momentum} cannot be used with "
      f"config.algorithm.name={c.algorithm.name!r} (its update assumes plain SGD steps); set "
      "--config.client_optimizer.momentum=0"
    )
  _at_least(c, "algorithm.prox_mu", 0.0)
  _at_least(c, "algorithm.ditto_lambda", 0.0)
  if c.algorithm.name == "ditto" and c.client_optimizer.name == "sgd":
    # the pull's own step on the personal model, which persists over rounds: v <- v - lr * lambda * v (heavy
    # ball with momentum) grows without bound past lr * lambda = 2 (1 + momentum). (FedProx restarts every round
    # at the global model, so its pull can only amplify one round's drift, by |1 - lr mu|^(local_steps - 1).)
    lr, w, beta = c.client_optimizer.learning_rate, c.algorithm.ditto_lambda, c.client_optimizer.momentum
    if lr * w > 2 * (1 + beta):
      raise ConfigError(
        f"config.algorithm.ditto_lambda={w:g} with config.client_optimizer.learning_rate={lr:g} (plain SGD"
        f"{f', momentum {beta:g}' if beta else ''}) diverges: learning_rate x ditto_lambda = {lr * w:g} > "
        f"{2 * (1 + beta):g}, so the personal model overshoots further every step; lower ditto_lambda to at most "
        f"{2 * (1 + beta) / lr:g} or the learning rate"
      )
  _choice(c, "algorithm.scaffold_weighting", SCAFFOLD_WEIGHTINGS)
  _int_at_least(c, "algorithm.local_steps_min", 0)
  if c.algorithm.local_steps_min > c.local_steps:
    raise ConfigError(
      f"config.algorithm.local_steps_min={c.algorithm.local_steps_min} is more than config.local_steps="
      f"{c.local_steps}; set it to at most {c.local_steps} (0 = every client takes local_steps steps)"
    )
  _choice(c, "algorithm.client_state", CLIENT_STATE_PLACEMENTS)
  _validate_robustness(c)
  _validate_privacy_and_compression(c)
  _choice(c, "loss.name", LOSSES)
  if c.loss.ce_weight < 0 or c.loss.dice_weight < 0:
    raise ConfigError("config.loss.ce_weight and config.loss.dice_weight must be >= 0")
  region = c.loss.cldice_weight if c.loss.name == "cldice" else 0.0  # clDice alone is a loss
  if c.loss.name != "focal_tversky" and c.loss.ce_weight + c.loss.dice_weight + region <= 0:
    also = " and config.loss.cldice_weight" if c.loss.name == "cldice" else ""
    raise ConfigError(
      f"config.loss.ce_weight, config.loss.dice_weight{also} are all 0: the loss is constant and nothing trains; "
      "set one > 0"
    )
  if c.loss.name == "focal_tversky" and c.loss.tversky_alpha + c.loss.tversky_beta <= 0:
    raise ConfigError(
      "config.loss.tversky_alpha and config.loss.tversky_beta are both 0: the focal Tversky loss is constant "
      "(TP / TP) and nothing trains; set one > 0"
    )
  if processes > 1 and c.clients_per_round % processes:  # every process drives part of every round
    raise ConfigError(
      f"config.clients_per_round={c.clients_per_round} cannot be split over the {processes} processes of this run "
      f"(each drives part of every round on its own devices); use a multiple of {processes}"
    )
  # auto: as many devices as split the sampled clients evenly (the same number on every process)
  auto = processes * math.gcd(c.clients_per_round // processes, num_devices // processes)
  if c.mesh.client_devices == 0:
    return auto
  n = c.mesh.client_devices
  if n < 0 or n > num_devices:
    raise ConfigError(
      f"config.mesh.client_devices={c.mesh.client_devices} but {num_devices} device(s) "
      f"are visible; use a value in 1..{num_devices}, or 0 (automatic: the most devices that split "
      f"config.clients_per_round={c.clients_per_round} evenly, here {auto})"
    )
  if c.clients_per_round % n:
    fit = math.gcd(c.clients_per_round, n)
    multiple = f"use a multiple of {n} or " if n <= c.num_clients else ""  # at most num_clients are sampled
    raise ConfigError(
      f"config.clients_per_round={c.clients_per_round} cannot be split over the {n} "
      f"devices of the 'clients' mesh axis; {multiple}set "
      f"--config.mesh.client_devices={fit} (or 0 = automatic)"
    )
  if n % processes:
    raise ConfigError(
      f"config.mesh.client_devices={n} cannot take the same number of devices from each of the {processes} "
      f"processes of this run (each drives part of every round); use a multiple of {processes} (or 0 = automatic)"
    )
  return n


def _csv(s: str) -> list[str]:
  return [x.strip() for x in str(s).split(",") if x.strip()]


def _validate_fedefm_model(c, name: str) -> None:
  """config.teacher / config.student of a FedEFM config."""
  m = c[name]
  if m.name == "transunet":
    for k in (
      "num_classes",
      "patch_size",
      "stem_width",
      "hidden",
      "num_layers",
      "num_heads",
      "mlp_dim",
      "decoder_width",
      "image_size",
    ):
      _number(c, f"{name}.{k}", lambda v: v > 0, "> 0", integer=True)
    if m.patch_size < 2 or m.patch_size & (m.patch_size - 1):
      raise ConfigError(
        f"config.{name}.patch_size={m.patch_size} must be a power of two >= 2 (the decoder "
        "upsamples by 2 per stem stage)"
      )
    if m.hidden % m.num_heads:
      raise ConfigError(f"config.{name}.hidden={m.hidden} must be divisible by config.{name}.num_heads={m.num_heads}")
    if m.hidden < 3:  # LayerNorm over 1 or 2 features outputs constants or signs: the logits ignore the image
      raise ConfigError(f"config.{name}.hidden={m.hidden} is too small: the ViT needs hidden >= 3 to see the image")
    if m.image_size < 2 * m.patch_size:  # a 1 x 1 token grid: the same, through its GroupNorms
      raise ConfigError(
        f"config.{name}.patch_size={m.patch_size} leaves a 1x1 token grid at config.{name}.image_size="
        f"{m.image_size}, whose norms ignore the image; use patch_size <= {m.image_size // 2}"
      )
  else:
    for k in ("num_classes", "width", "depth", "groups"):
      _number(c, f"{name}.{k}", lambda v: v > 0, "> 0", integer=True)
    bad = unet_groups_problem(m.width, m.depth, m.groups)
    if bad:
      raise ConfigError(f"config.{name}.width={m.width} with config.{name}.groups={m.groups}: {bad}; change either")


def validate_fedefm(c: ml_collections.ConfigDict, num_devices: int) -> dict:
  """Checks every FedEFM setting (task 'fedefm') before anything trains, except that the topology
  loads (``fedkd.tasks.fedefm.load_adjacency``); returns the parsed experiment lists: methods,
  kd_methods, seeds, percents, ablation_methods. Keys the experiment does not read (:func:`unused_keys`) are
  checked for type only."""
  with _checking_read_keys_only(c):
    return _validate_fedefm(c, num_devices)


def _validate_fedefm(c: ml_collections.ConfigDict, num_devices: int) -> dict:
  check_keys(c, fedefm_base_config())
  if c.task != "fedefm":
    raise ConfigError(f"config.task={c.task!r}: this experiment is task 'fedefm'")
  check_finite(c)
  pos, nonneg, unit = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: 0 <= v <= 1)
  _number(c, "seed", nonneg, ">= 0", integer=True)
  expert_steps_read = not _unread("fedefm.expert_steps")
  if type(c.fedefm.get("expert_steps")) is int and c.fedefm.expert_steps == 0 and expert_steps_read:
    raise ConfigError(
      "config.fedefm.expert_steps=0 must be an integer >= 1; the expert_steps = 0 control (KD to the silo's own "
      "round-start model) is the method fedefm_e0: add it to --config.experiment.methods instead"
    )
  for key in (
    "image_size",
    "pretrain.num_silos",
    "pretrain.num_rounds",
    "pretrain.local_steps",
    "pretrain.batch_size",
    "pretrain.examples_per_silo",
    "downstream.train_examples",
    "downstream.test_examples",
    "downstream.steps",
    "downstream.batch_size",
    "downstream.val_examples",
    "downstream.scarce_steps",
    "eval.batch_size",
    "fedefm.expert_steps",
    "checkpoint.every",
    "checkpoint.max_to_keep",
    "log_every",
  ):
    _number(c, key, pos, ">= 1", integer=True)
  for key in ("fedefm.warmup_rounds", "fedefm.emd_iters", "fedefm.matched_steps_factor"):
    _number(c, key, nonneg, ">= 0", integer=True)
  for key in ("eval.foundation_every", "eval.heldout_per_source"):
    _number(c, key, pos, ">= 1", integer=True)
  p = c.pretrain
  if p.examples_per_silo * p.num_silos >= 2**31:  # the silos' example indices are int32
    raise ConfigError(
      f"config.pretrain.examples_per_silo={p.examples_per_silo} x num_silos={p.num_silos} is 2**31 images or "
      "more, past what the generator indexes; lower config.pretrain.examples_per_silo"
    )
  _choice(c, "pretrain.objective", FEDEFM_OBJECTIVES)
  for key in (
    "pretrain.learning_rate",
    "pretrain.expert_learning_rate",
    "downstream.learning_rate",
    "fedefm.temperature",
    "fedefm.moon_tau",
    "downstream.kd_temperature",
  ):
    _number(c, key, pos, "> 0")
  # float32 Sinkhorn: (f + g - cost) / epsilon carries a rounding error of ~1e-7 / epsilon, so below 1e-4
  # the plans are noise (marginal error up to 30 at 1e-20, or NaN) and the default schedule needs
  # ~10 / sqrt(epsilon) iterations (1e7 at 1e-12); above 1e4 the plan is a b^T to float32 precision, and
  # very large values overflow the potentials (NaN at 1e38). The cosine cost lies in [0, 2].
  lo, hi = EMD_EPSILON_RANGE
  _number(
    c, "fedefm.emd_epsilon", lambda v: lo <= v <= hi, f"in [{lo:g}, {hi:g}] (where the float32 solve is accurate)"
  )
  # the similarities lie in [-1, 1]; S / T below this overflows float32 in the softmax
  _number(c, "fedefm.weight_temperature", lambda v: v >= MIN_WEIGHT_TEMPERATURE, f">= {MIN_WEIGHT_TEMPERATURE:g}")
  for key in (
    "fedefm.moon_mu",
    "fedefm.prox_mu",
    "pretrain.weight_decay",
    "downstream.kd_pixel_weight",
    "downstream.kd_feature_weight",
  ):
    _number(c, key, nonneg, ">= 0")
  for key in ("fedefm.beta", "fedefm.matcha_budget", "downstream.kd_confidence"):
    _number(c, key, unit, "in [0, 1]")
  _number(c, "downstream.teacher_adapt_steps", nonneg, ">= 0", integer=True)
  for key in ("probe", "kd_class_balance"):
    if not isinstance(c.downstream[key], bool):
      raise ConfigError(f"config.downstream.{key}={c.downstream[key]!r} must be True or False")
  for key, kind, ok, what in (
    ("scarce_examples", int, lambda v: v >= 1, "image counts >= 1, e.g. '8,32' ('' = no scarce-data curve)"),
    ("kd_scales", float, lambda v: v >= 0 and math.isfinite(v), "KD loss scales >= 0, e.g. '0.1,0.3,1'"),
  ):
    if _unread(f"downstream.{key}"):
      continue
    try:
      vals = [kind(v) for v in _csv(str(c.downstream[key]))]
    except ValueError:
      vals = None
    if vals is None or not all(ok(v) for v in vals) or (key == "kd_scales" and not vals):
      raise ConfigError(f"config.downstream.{key}={c.downstream[key]!r} must be a comma list of {what}")
    twice = sorted({f"{v:g}" for v in vals if vals.count(v) > 1})
    if key == "scarce_examples" and twice:  # each size would be trained twice: two equal columns
      raise ConfigError(
        f"config.downstream.{key}={c.downstream[key]!r} lists {', '.join(twice)} more than once; give each once"
      )
  _number(c, "pretrain.unseen_percent", lambda v: 0 <= v <= 100, "in [0, 100]")
  _choice(c, "fedefm.emd_marginals", EMD_MARGINALS)
  _choice(c, "fedefm.weight_mode", EMD_WEIGHT_MODES)
  _choice(c, "fedefm.mixing", FEDEFM_MIXINGS)
  _choice(c, "engine.client_layout", CLIENT_LAYOUTS)
  _choice(c, "engine.conv_lowering", CONV_LOWERINGS)
  _number(c, "engine.client_chunk", pos, ">= 1", integer=True)
  _check_physics(c)
  _check_streams(c)
  for key in ("detach_weights", "emd_debias", "directed", "gradient_push"):
    if not isinstance(c.fedefm[key], bool):
      raise ConfigError(f"config.fedefm.{key}={c.fedefm[key]!r} must be True or False")
  if c.fedefm.expert_steps > c.pretrain.local_steps and expert_steps_read:
    raise ConfigError(
      f"config.fedefm.expert_steps={c.fedefm.expert_steps} cannot exceed "
      f"config.pretrain.local_steps={c.pretrain.local_steps} (experts use the neighbour's batches)"
    )
  _number(c, "mesh.client_devices", nonneg, ">= 0 (0 = automatic)", integer=True)
  if c.mesh.client_devices and c.pretrain.num_silos % c.mesh.client_devices:
    raise ConfigError(
      f"config.mesh.client_devices={c.mesh.client_devices} must divide "
      f"config.pretrain.num_silos={c.pretrain.num_silos} (or be 0 = automatic)"
    )
  if c.mesh.client_devices > num_devices:
    raise ConfigError(
      f"config.mesh.client_devices={c.mesh.client_devices} but only {num_devices} device(s) are visible"
    )
  methods = _csv(c.experiment.methods)
  for m in methods + _csv(c.experiment.kd_methods) + _csv(c.experiment.ablation_methods):
    if m not in FEDEFM_METHODS:
      raise ConfigError(f"config.experiment: unknown method {m!r}; known: {', '.join(FEDEFM_METHODS)}")
  if not methods:
    raise ConfigError(f"config.experiment.methods is empty; give a comma list of {', '.join(FEDEFM_METHODS)}")
  for m in _csv(c.experiment.kd_methods):
    if m == "scratch":
      raise ConfigError(
        "config.experiment.kd_methods: 'scratch' has no foundation teacher; list only pretrained methods there"
      )
  try:
    seeds = [int(s) for s in _csv(c.experiment.seeds)]
    percents = [float(p) for p in _csv(c.experiment.ablation_percents)]
  except ValueError as e:
    raise ConfigError(f"config.experiment.seeds / ablation_percents must be comma lists of numbers ({e})")
  if not seeds:
    raise ConfigError("config.experiment.seeds is empty; give e.g. '0,1,2'")
  if any(not 0 <= s < MAX_SEED for s in seeds):
    raise ConfigError(
      f"config.experiment.seeds={c.experiment.seeds!r}: seeds must be integers in 0..{MAX_SEED - 1} (JAX keys "
      "hold 32 bits; larger seeds would repeat smaller ones)"
    )
  for p in percents:
    if not math.isfinite(p) or not 0 <= p <= 100:
      raise ConfigError(
        f"config.experiment.ablation_percents: {p:g} is not a valid unseen-label %; give values in 0..100"
      )
  # a repeat would run once and then count as a second seed (n=2, std 0) in the tables
  for key, values in (
    ("seeds", seeds),
    ("methods", methods),
    ("kd_methods", _csv(c.experiment.kd_methods)),
    ("ablation_methods", _csv(c.experiment.ablation_methods)),
    ("ablation_percents", percents),
  ):
    twice = sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in values if values.count(v) > 1})
    if twice:
      raise ConfigError(
        f"config.experiment.{key}={getattr(c.experiment, key)!r} lists {', '.join(twice)} more than once; "
        "give each once"
      )
  if c.teacher.name != c.student.name or c.teacher.name not in ("transunet", "unet"):
    raise ConfigError(
      f"config.teacher.name={c.teacher.name!r} / config.student.name={c.student.name!r}: "
      "use the same model family for both, transunet or unet"
    )
  _validate_fedefm_model(c, "teacher")
  _validate_fedefm_model(c, "student")
  if c.student.num_classes < 3:
    raise ConfigError(
      f"config.student.num_classes={c.student.num_classes} must be >= 3 (background, catheter, guidewire)"
    )
  if c.teacher.num_classes < c.student.num_classes:
    raise ConfigError(
      f"config.teacher.num_classes={c.teacher.num_classes} must be >= config.student.num_classes="
      f"{c.student.num_classes} (teacher KD uses the student's classes of the teacher logits)"
    )
  if c.teacher.name == "transunet":
    for name in ("teacher", "student"):  # the patch first: the size the second message names must fit it
      if c.image_size % c[name].patch_size:
        raise ConfigError(
          f"config.image_size={c.image_size} must be a multiple of config.{name}.patch_size={c[name].patch_size}; "
          f"give e.g. --config.image_size={max(2, round(c.image_size / c[name].patch_size)) * c[name].patch_size} "
          "(and the same teacher.image_size and student.image_size)"
        )
    for name in ("teacher", "student"):
      if c[name].image_size != c.image_size:
        raise ConfigError(
          f"config.{name}.image_size={c[name].image_size} must equal config.image_size={c.image_size} (it does not "
          f"follow it): give --config.teacher.image_size={c.image_size} --config.student.image_size={c.image_size} "
          "with --config.image_size"
        )
    for k in ("hidden", "patch_size", "num_heads", "mlp_dim", "stem_width"):  # the encoder's shapes
      if c.teacher[k] != c.student[k]:
        raise ConfigError(
          f"config.student.{k}={c.student[k]} must equal config.teacher.{k}={c.teacher[k]} so the foundation "
          "encoder loads into the student"
        )
    if c.student.num_layers > c.teacher.num_layers:  # the student's extra layers would stay random
      raise ConfigError(
        f"config.student.num_layers={c.student.num_layers} must be <= config.teacher.num_layers="
        f"{c.teacher.num_layers} (the foundation has that many encoder layers to load)"
      )
  else:
    for k in ("width", "depth", "groups"):  # groups: the same shapes, but GroupNorm over other channels
      if c.teacher[k] != c.student[k]:
        raise ConfigError(
          f"config.student.{k}={c.student[k]} must equal config.teacher.{k}={c.teacher[k]} so the foundation "
          "encoder (UNet enc + mid blocks, their GroupNorm groups) loads into the student"
        )
    if c.image_size % (2**c.teacher.depth):
      raise ConfigError(f"config.image_size={c.image_size} must be divisible by 2**config.teacher.depth")
  return {
    "methods": methods,
    "kd_methods": _csv(c.experiment.kd_methods),
    "seeds": seeds,
    "percents": percents,
    "ablation_methods": _csv(c.experiment.ablation_methods),
  }
