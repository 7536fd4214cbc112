"""One FedEFM pretraining round in PyTorch, silos one after another (as the paper's released code runs its
11 silos), against fedkd's round of the same method and shapes (``configs/fedefm.py:runlocal``,
``fedkd.tasks.fedefm.Experiment.pretrain`` with method ``fedefm``: CFL, 100 % unseen, ring of 6 silos).
JSON lines; PyTorch f32 on CPU.

  TORCH_PY=/path/to/python-with-torch   FEDKD_PY=/path/to/python-with-fedkd
  $TORCH_PY bench/fedefm_torch.py [--silos 6] [--rounds 8] [--threads N]
  $TORCH_PY bench/fedefm_torch.py --fedkd --fedkd-python $FEDKD_PY      # + fedkd's round, same process tree
  $TORCH_PY bench/fedefm_torch.py --check --fedkd-python $FEDKD_PY      # numerics against fedkd

One row per timed round, then ``fedefm_torch``: the median seconds per round over the rounds after the
first (warm-up) and images/s = silos x local steps x batch / s. ``--fedkd`` then runs, in a subprocess of
``--fedkd-python``, ``bench/fedefm_stack.py``'s ``seconds_per_round("fedefm", silos, rounds, "runlocal")``
(the experiment's own round, median after compilation, the warm-up round and the distilling program's
compile, without the last, scoring round; so it needs ``--rounds`` >= 5) and prints
``fedefm_torch_vs_fedkd`` with ratio = fedkd images/s / PyTorch images/s.

What one PyTorch round does, per silo i in a Python loop (the same work as fedkd's distilling round,
``fedkd.distill.fedefm.FedEFMSilo.client``):

1. for each ring in-neighbour j of i (2 for >= 3 silos): a copy of the round's model trained
   ``expert_steps`` (1) steps on j's first batches with a fresh Adam (lr 1e-3) on the segmentation loss
   (0.5 cross-entropy + 0.5 soft Dice over the foreground classes): the overseas expert;
2. the silo's model, a fresh AdamW (lr 1e-3, config.pretrain.weight_decay 1e-4), takes
   ``local_steps`` (2) steps of batch 4 on its own data with
   ``beta sum_j w_j T^2 KL(softmax(z_j/T) || softmax(z_i/T)) + (1 - beta) L_seg`` (beta 0.5, T 2), the
   experts' logits and encoder tokens from a no-grad forward on the batch, w = softmax over neighbours of
   S_ij / 0.1, S_ij the batch mean of the debiased EMD similarity between the silo's and expert j's
   encoder tokens (64 nodes x 32 per image: cosine cost, log-domain Sinkhorn at epsilon 0.05 on fedkd's
   default schedule: 14 annealing stages x 3 iterations from epsilon 1, 30 plain iterations whose last 5
   measure the error rate, 45 over-relaxed and 1 plain = 118; S(u,v) - (S(u,u) + S(v,v))/2 + 1, the
   three solves and all pairs batched into one [J*B*3, 64, 64] solve; weights detached, so no backward
   through the solve, as in fedkd, where ``detach_weights`` stops that gradient and XLA drops it);
3. FedAvg: every silo model summed, the round's model = the mean (all silos weigh alike).

The model is fedkd's TransUNet at the runlocal size (``fedefm_base_config``'s teacher: 32 px, conv stem
of 2 stride-2 stages 8/16 wide, patch projection to 32, 64 tokens, 2 pre-norm ViT layers with 2 heads and
MLP 64, final LayerNorm, decoder 3x3 conv to 16 then 2 x (bilinear x2 + 2 convs) at 8, 3x3 head to 4
classes; GroupNorm with gcd(8, C) groups, eps 1e-6; tanh GELU; XLA's 'SAME' padding): 31,916 parameters,
the same as fedkd's flax model, tensor for tensor. ``--check`` loads fedkd's initial parameters into it
and compares, on random inputs: the config values above, the parameter count, the logits and tokens, the
EMD similarity on random and token-like node sets (must agree within 1e-4) and one silo's whole FedEFM
update (experts, EMD weights, KD, AdamW) from the same start and data.

Not matched (timing): the data are random tensors of the right shapes and dtypes (images N(0, 1)
[B, 1, 32, 32] f32, labels uniform in 0..3 int64), drawn inside the timed round, where fedkd renders its
synthetic silo images on the host each round; fedkd's timed round also moves its metrics to the host and
checks every silo model for NaN/Inf (here: one finiteness check of the silo losses). Every PyTorch round is
a distilling round (fedkd's round 1 is the warm-up; fedefm_stack times its distilling rounds only). The
PyTorch side is eager, NCHW, one model forward per expert (fedkd vmaps experts and silos in one jitted
program), torch's default (for-loop) optimizer implementation, SDPA attention; models are reused and
their parameters copied in place each round instead of deep-copied. Its parameters start from PyTorch's
default init (values do not change the work). Both sides run on the same CPU threads: on a shared
machine, run them when it is otherwise idle; with another process busy on the cores, torch's default
intra-op threads (one per core) oversubscribe them and its rounds swing by 10x, so pass ``--threads 1``
there (fedkd's XLA keeps its own thread pool). ``--check``'s silo update agrees to ~1e-5 except in the
tensors whose exact gradient is 0 (a conv bias under a one-channel-per-group GroupNorm, attention key
biases), where float noise becomes a full +-lr Adam step on either side; it prints both maxima.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

try:  # the fedkd-side helpers (--fedkd-side) run this file in a Python without torch
  import torch
  import torch.nn.functional as F
  from torch import nn

  Module = nn.Module
except ImportError:
  torch = F = nn = None
  Module = object

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/fedefm.py:runlocal (= fedkd.config.fedefm_base_config) values this round depends on; --check
# compares them with fedkd's config
CONFIG = dict(
  image_size=32,
  num_silos=6,
  local_steps=2,
  batch_size=4,
  learning_rate=1e-3,
  expert_learning_rate=1e-3,
  weight_decay=1e-4,
  beta=0.5,
  temperature=2.0,
  expert_steps=1,
  emd_epsilon=0.05,
  emd_marginals="uniform",
  emd_iters=0,
  emd_debias=True,
  weight_mode="softmax",
  weight_temperature=0.1,
  detach_weights=True,
  mixing="cfl",
  topology="ring",
  warmup_rounds=1,
  unseen_percent=100.0,
  objective="segmentation",
  model="transunet",
  num_classes=4,
  patch_size=4,
  stem_width=8,
  hidden=32,
  num_layers=2,
  num_heads=2,
  mlp_dim=64,
  decoder_width=16,
  skips=False,
)
# fedkd.distill.emd's default schedule (num_iters=None)
ANNEAL_START, ANNEAL_RATIO, ANNEAL_ITERS, PLAIN_ITERS, RATE_WINDOW = 1.0, 0.8, 3, 30, 5
RELAXED_ITERS_SCALE, MAX_RATE, RELAX_BELOW = 10.0, 0.99, 0.1


# ------------------------------------------------------------------ fedkd's side (runs in --fedkd-python)


def _fedkd_config(silos: int):
  sys.path.insert(0, ROOT)
  from configs.fedefm import get_config

  c = get_config("runlocal")
  c.pretrain.num_silos = silos
  return c


def _config_values(c) -> dict:
  p, f, t = c.pretrain, c.fedefm, c.teacher
  out = {k: p[k] for k in ("num_silos", "local_steps", "batch_size", "learning_rate", "expert_learning_rate")}
  out["weight_decay"] = p.weight_decay
  out.update({k: p[k] for k in ("unseen_percent", "objective")})
  out.update({k: f[k] for k in ("beta", "temperature", "expert_steps", "emd_epsilon", "emd_marginals")})
  out.update({k: f[k] for k in ("emd_iters", "emd_debias", "weight_mode", "weight_temperature", "detach_weights")})
  out.update({k: f[k] for k in ("mixing", "topology", "warmup_rounds")})
  out.update({k: t[k] for k in ("num_classes", "patch_size", "stem_width", "hidden", "num_layers", "num_heads")})
  out.update({k: t[k] for k in ("mlp_dim", "decoder_width", "skips")})
  out.update(image_size=c.image_size, model=t.name)
  return out


def fedkd_rate(silos: int, rounds: int) -> None:
  """fedefm_stack's timing of fedkd's round; prints one JSON line."""
  sys.path.insert(0, ROOT)
  import jax

  from bench.fedefm_stack import seconds_per_round
  from fedkd.models import init_model

  sec, images = seconds_per_round("fedefm", silos, rounds, "runlocal")
  params = sum(int(np.size(a)) for a in jax.tree.leaves(init_model(_fedkd_config(silos).teacher, 0)[2]))
  row = dict(bench="fedkd_fedefm_round", silos=silos, rounds=rounds, images_per_round=images)
  row.update(s_per_round_median=round(sec, 4), images_per_s=round(images / sec, 2), params=params)
  row.update(backend=jax.default_backend(), device=jax.devices()[0].device_kind, jax=jax.__version__)
  print(json.dumps(row), flush=True)


def fedkd_reference(path: str) -> None:
  """Writes fedkd's numbers for --check to ``path`` (.npz): config, initial parameters, a forward, EMD
  similarities of random node sets, and one silo's FedEFM update (``FedEFMSilo.client``, built as
  ``Experiment._program`` builds the round)."""
  import jax
  import jax.numpy as jnp

  c = _fedkd_config(CONFIG["num_silos"])
  from fedkd.distill import emd as emd_lib
  from fedkd.fl import topology
  from fedkd.tasks import fedefm as task

  exp = task.Experiment(c, tempfile.mkdtemp(), log=lambda _: None)
  exp.build_models()
  params = exp.init_foundation(0)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {f"param:{'/'.join(str(getattr(k, 'key', k)) for k in keys)}": np.asarray(a) for keys, a in leaves}
  rng = np.random.default_rng(0)
  p, h = c.pretrain, c.image_size
  x = rng.normal(size=(p.local_steps, p.batch_size, h, h, 1)).astype(np.float32)
  y = rng.integers(0, c.teacher.num_classes, size=(p.local_steps, p.batch_size, h, h)).astype(np.int32)
  logits, tokens = exp.t_apply_wf(params, jnp.asarray(x[0]))
  out.update(x=x, y=y, logits=np.asarray(logits), tokens=np.asarray(tokens))
  # EMD: random node sets, token-like (LayerNorm'd) ones and perturbed copies, 64 x 32 as the tokens
  u = rng.normal(size=(8, 64, 32)).astype(np.float32)
  v = rng.normal(size=(8, 64, 32)).astype(np.float32)
  v[2:4] = u[2:4] + 0.1 * v[2:4]
  v[4:6] = u[4:6] + 1.0 * v[4:6]
  u[6:], v[6:] = u[6:] + 2.0, v[6:] + 2.0  # mostly aligned (positive mean)
  f = c.fedefm
  kw = dict(epsilon=f.emd_epsilon, marginals=f.emd_marginals, num_iters=f.emd_iters or None, debias=f.emd_debias)
  sim = jax.jit(jax.vmap(lambda a, b: emd_lib.emd_similarity(a, b, return_error=True, **kw)))
  s, err = sim(jnp.asarray(u), jnp.asarray(v))
  out.update(emd_u=u, emd_v=v, emd_s=np.asarray(s), emd_err=np.asarray(err))
  # one silo's distilling update (silo 0), its experts trained on its ring neighbours' first batches
  alg, ctx = exp._program("fedefm", True)[1](exp.hparams())
  idx, mask = topology.neighbour_table(exp.adj)
  gx = rng.normal(size=(p.num_silos, f.expert_steps, p.batch_size, h, h, 1)).astype(np.float32)
  gy = rng.integers(0, c.teacher.num_classes, size=gx.shape[:-1]).astype(np.int32)
  batch = {"x": x, "y": y, "nbr": idx[0], "nbr_mask": mask[0]}
  server = {"round": jnp.asarray(1, jnp.int32)}
  client = jax.jit(lambda row, batch, g: alg.client(ctx, server, row, batch, g))
  res = client(alg.init_row(params), batch, {"x": gx, "y": gy})
  for keys, a in jax.tree_util.tree_flatten_with_path(res.upload)[0]:
    out[f"upload:{'/'.join(str(getattr(k, 'key', k)) for k in keys)}"] = np.asarray(a)
  out.update(gx=gx, gy=gy, nbr=idx[0], nbr_mask=mask[0], loss=np.asarray(res.loss))
  out.update({f"metric:{k}": np.asarray(v) for k, v in res.metrics.items()})
  out["config"] = np.asarray(json.dumps(_config_values(c)))
  np.savez(path, **out)


# ------------------------------------------------------------------ PyTorch: the model


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA's 'SAME' padding (low, high) of one spatial side."""
  total = max((math.ceil(size / s) - 1) * s + k - size, 0)
  return total // 2, total - total // 2


class Conv(nn.Conv2d if nn else object):
  """nn.Conv2d with XLA's 'SAME' padding (stride 2 on an even side pads only the bottom and right)."""

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
    super().__init__(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0)

  def forward(self, x):
    if self.stride[0] > 1:
      (t, b), (l, r) = (_same_pads(n, self.kernel_size[0], self.stride[0]) for n in x.shape[-2:])
      x = F.pad(x, (l, r, t, b))
    return super().forward(x)


def _norm(c: int):
  return nn.GroupNorm(math.gcd(8, c), c, eps=1e-6)


def _gelu(x):
  return F.gelu(x, approximate="tanh")  # jax.nn.gelu's default


class StemStage(Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv1, self.norm1 = Conv(cin, cout, 3, 2), _norm(cout)
    self.conv2, self.norm2 = Conv(cout, cout, 3), _norm(cout)

  def forward(self, x):
    x = _gelu(self.norm1(self.conv1(x)))
    return _gelu(self.norm2(self.conv2(x)))


class Attention(Module):
  def __init__(self, hidden: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
    self.out = nn.Linear(hidden, hidden)

  def forward(self, x):  # [B, N, D]
    b, n, d = x.shape
    q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.query, self.key, self.value))
    ctx = F.scaled_dot_product_attention(q, k, v)
    return self.out(ctx.transpose(1, 2).reshape(b, n, d))


class Mlp(Module):
  def __init__(self, hidden: int, mlp_dim: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(hidden, mlp_dim), nn.Linear(mlp_dim, hidden)

  def forward(self, x):
    return self.fc2(_gelu(self.fc1(x)))


class Block(Module):
  def __init__(self, hidden: int, heads: int, mlp_dim: int):
    super().__init__()
    self.ln1, self.attn = nn.LayerNorm(hidden, eps=1e-6), Attention(hidden, heads)
    self.ln2, self.mlp = nn.LayerNorm(hidden, eps=1e-6), Mlp(hidden, mlp_dim)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class Encoder(Module):
  def __init__(self, c: dict):
    super().__init__()
    stages = int(round(math.log2(c["patch_size"])))
    widths = [c["stem_width"] * 2**i for i in range(stages)]
    self.stem = nn.ModuleList(StemStage(a, b) for a, b in zip([1] + widths[:-1], widths))
    self.patch_proj = Conv(widths[-1], c["hidden"], 1)
    self.grid = c["image_size"] // c["patch_size"]
    self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.grid**2, c["hidden"]))
    self.layers = nn.ModuleList(Block(c["hidden"], c["num_heads"], c["mlp_dim"]) for _ in range(c["num_layers"]))
    self.norm = nn.LayerNorm(c["hidden"], eps=1e-6)

  def forward(self, x):  # [B, 1, H, W] -> tokens [B, N, hidden] (row-major over the token grid)
    for stage in self.stem:
      x = stage(x)
    x = self.patch_proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    for layer in self.layers:
      x = layer(x)
    return self.norm(x)


class ConvNormAct(Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv, self.norm = Conv(cin, cout, 3), _norm(cout)

  def forward(self, x):
    return F.relu(self.norm(self.conv(x)))


class DecoderBlock(Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv1, self.norm1 = Conv(cin, cout, 3), _norm(cout)
    self.conv2, self.norm2 = Conv(cout, cout, 3), _norm(cout)

  def forward(self, x):
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    x = F.relu(self.norm1(self.conv1(x)))
    return F.relu(self.norm2(self.conv2(x)))


class Decoder(Module):
  def __init__(self, c: dict):
    super().__init__()
    if c["skips"]:
      raise ValueError("skips=True is not implemented here (runlocal has none)")
    self.conv_more = ConvNormAct(c["hidden"], c["decoder_width"])
    cin, blocks = c["decoder_width"], []
    for j in range(int(round(math.log2(c["patch_size"])))):
      cout = max(c["decoder_width"] // 2 ** (j + 1), 8)
      blocks.append(DecoderBlock(cin, cout))
      cin = cout
    self.blocks, self.out_channels = nn.ModuleList(blocks), cin

  def forward(self, x):
    x = self.conv_more(x)
    for block in self.blocks:
      x = block(x)
    return x


class TransUNet(Module):
  """fedkd.models.transunet.TransUNet (skips=False) in NCHW; parameter names mirror fedkd's tree."""

  def __init__(self, c: dict):
    super().__init__()
    self.encoder, self.decoder = Encoder(c), Decoder(c)
    self.head = Conv(self.decoder.out_channels, c["num_classes"], 3)

  def forward(self, x):
    """x [B, 1, H, W] -> (logits [B, K, H, W], tokens [B, N, hidden])."""
    tokens = self.encoder(x)
    b, n, d = tokens.shape
    g = self.encoder.grid
    return self.head(self.decoder(tokens.transpose(1, 2).reshape(b, d, g, g))), tokens


def load_fedkd_params(model, flat: dict) -> None:
  """Copies fedkd's parameters (``{"encoder/stem/0/conv1/kernel": array, ...}``) into ``model``."""
  own = dict(model.named_parameters())
  used = set()
  with torch.no_grad():
    for path, a in flat.items():
      parts = path.split("/")
      leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
      name = ".".join(parts[:-1] + [leaf])
      t = torch.from_numpy(np.ascontiguousarray(a))
      if parts[-3:-1] == ["attn", "out"] and leaf == "weight":  # [heads, head_dim, hidden]
        t = t.reshape(-1, t.shape[-1]).T
      elif len(parts) > 2 and parts[-3] == "attn":  # q/k/v kernel [hidden, heads, head_dim], bias [heads, head_dim]
        t = t.reshape(t.shape[0], -1).T if leaf == "weight" else t.reshape(-1)
      elif t.ndim == 4:  # conv [kh, kw, cin, cout]
        t = t.permute(3, 2, 0, 1)
      elif t.ndim == 2:  # dense [in, out]
        t = t.T
      if own[name].shape != t.shape:
        raise ValueError(f"{path}: fedkd {tuple(a.shape)} -> {tuple(t.shape)}, torch {tuple(own[name].shape)}")
      own[name].copy_(t)
      used.add(name)
  if used != set(own):
    raise ValueError(f"parameters not loaded: {sorted(set(own) - used)}")


# ------------------------------------------------------------------ PyTorch: losses and the EMD


def dice_ce(logits, y):
  """fedkd.losses dice_ce: 0.5 CE + 0.5 (1 - soft Dice per image and foreground class)."""
  ce = F.cross_entropy(logits, y)
  probs = torch.softmax(logits, 1)[:, 1:]
  onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(logits.dtype)
  inter = (probs * onehot).sum((2, 3))
  denom = probs.sum((2, 3)) + onehot.sum((2, 3))
  return 0.5 * ce + 0.5 * (1.0 - ((2.0 * inter + 1.0) / (denom + 1.0)).mean())


def kd_kl(student, teacher, T: float):
  """T^2 mean over pixels of KL(softmax(teacher / T) || softmax(student / T)), class axis 1."""
  log_ps = F.log_softmax(student / T, 1)
  log_pt = F.log_softmax(teacher.detach() / T, 1)
  return T * T * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


def sinkhorn_schedule(eps: float):
  stages = 0
  if eps < ANNEAL_START:
    stages = max(1, math.ceil(math.log(ANNEAL_START / eps) / math.log(1.0 / ANNEAL_RATIO) - 1e-9))
  anneal = [float(np.float32(ANNEAL_START * (eps / ANNEAL_START) ** (k / stages))) for k in range(stages)]
  return [e for e in anneal for _ in range(ANNEAL_ITERS)], PLAIN_ITERS, math.ceil(RELAXED_ITERS_SCALE / math.sqrt(eps))


def _iterate(cost, log_a, log_b, f, g, eps, n: int, omega=None):
  for i in range(n):
    e = eps[i] if isinstance(eps, list) else eps
    g_new = e * log_b - e * torch.logsumexp((f[:, :, None] - cost) / e, dim=1)
    g = g_new if omega is None else (1.0 - omega) * g + omega * g_new
    f_new = e * log_a - e * torch.logsumexp((g[:, None, :] - cost) / e, dim=2)
    f = f_new if omega is None else (1.0 - omega) * f + omega * f_new
  return f, g


def _plan(f, g, cost, eps):
  return torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)


def _marginal_error(plan, a, b):
  return (plan.sum(2) - a).abs().sum(1) + (plan.sum(1) - b).abs().sum(1)


def emd_similarity(u, v, eps: float, debias: bool = True):
  """fedkd.distill.emd.emd_similarity (uniform marginals, the default schedule) for a batch of node-set
  pairs u [P, n, d], v [P, m, d] -> (S [P], marginal error [P]); the debiased solves batched with them."""
  p = u.shape[0]
  if debias:
    u, v = torch.cat([u, u, v]), torch.cat([v, u, v])
  un = u * torch.rsqrt((u * u).sum(-1, keepdim=True).clamp_min(1e-24))
  vn = v * torch.rsqrt((v * v).sum(-1, keepdim=True).clamp_min(1e-24))
  cost = (1.0 - un @ vn.transpose(1, 2)).clamp(0.0, 2.0)
  s, n, m = cost.shape
  a = torch.full((s, n), 1.0 / n, dtype=cost.dtype)
  b = torch.full((s, m), 1.0 / m, dtype=cost.dtype)
  log_a, log_b = a.log(), b.log()
  f, g = cost.new_zeros(s, n), cost.new_zeros(s, m)
  anneal, plain, relaxed = sinkhorn_schedule(eps)
  f, g = _iterate(cost, log_a, log_b, f, g, anneal, len(anneal))
  f, g = _iterate(cost, log_a, log_b, f, g, eps, plain - RATE_WINDOW)
  err0 = _marginal_error(_plan(f, g, cost, eps), a, b)
  f, g = _iterate(cost, log_a, log_b, f, g, eps, RATE_WINDOW)
  err1 = _marginal_error(_plan(f, g, cost, eps), a, b)
  rate = ((err1 / err0.clamp_min(1e-30)) ** (1.0 / RATE_WINDOW)).clamp(0.0, MAX_RATE)
  omega = torch.where(err1 < RELAX_BELOW, 2.0 / (1.0 + torch.sqrt(1.0 - rate)), torch.ones_like(rate))[:, None]
  f, g = _iterate(cost, log_a, log_b, f, g, eps, relaxed, omega)
  f, g = _iterate(cost, log_a, log_b, f, g, eps, 1)
  plan = _plan(f, g, cost, eps)
  sim, err = ((1.0 - cost) * plan).sum((1, 2)), _marginal_error(plan, a, b)
  if not debias:
    return sim, err
  sim, err = sim.view(3, p), err.view(3, p)
  return sim[0] - 0.5 * (sim[1] + sim[2]) + 1.0, err.max(0).values


# ------------------------------------------------------------------ PyTorch: the round


def ring_neighbours(n: int) -> list[list[int]]:
  """fedkd.fl.topology.neighbours(ring(n)): each silo's ring neighbours, ascending."""
  return [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]


def copy_params(dst, src) -> None:
  with torch.no_grad():
    for d, s in zip(dst.parameters(), src.parameters()):
      d.copy_(s)


def silo_update(c: dict, start, student, experts, x, y, gx, gy, nbrs):
  """One silo's FedEFM update, in place in ``student`` (``FedEFMSilo.client``): experts trained at the
  neighbours ``nbrs`` on their first batches ``gx[j]``, ``gy[j]`` [expert_steps, B, ...], then the local
  steps on ``x``, ``y`` [local_steps, B, ...]. Returns (mean loss over the steps, metrics: means over the
  steps, as fedkd's)."""
  for e, j in zip(experts, nbrs):
    copy_params(e, start)
    opt = torch.optim.Adam(e.parameters(), lr=c["expert_learning_rate"])
    for k in range(c["expert_steps"]):
      loss = dice_ce(e(gx[j][k])[0], gy[j][k])
      opt.zero_grad()
      loss.backward()
      opt.step()
  copy_params(student, start)
  opt = torch.optim.AdamW(student.parameters(), lr=c["learning_rate"], weight_decay=c["weight_decay"])
  losses, metrics = [], []
  for t in range(c["local_steps"]):
    logits, tokens = student(x[t])
    seg = dice_ce(logits, y[t])
    with torch.no_grad():  # fixed teachers; detach_weights: no gradient through the EMD weights
      outs = [e(x[t]) for e in experts[: len(nbrs)]]
      e_tokens = torch.stack([o[1] for o in outs])  # [J, B, N, C]
      j, b = e_tokens.shape[:2]
      u = tokens.detach().expand(j, *tokens.shape).reshape(j * b, *tokens.shape[1:])
      s, err = emd_similarity(u, e_tokens.reshape(j * b, *tokens.shape[1:]), c["emd_epsilon"], c["emd_debias"])
      sims = s.view(j, b).mean(1)
      w = torch.softmax(sims / c["weight_temperature"], 0)
    kd = sum(w[i] * kd_kl(logits, o[0], c["temperature"]) for i, o in enumerate(outs))
    loss = c["beta"] * kd + (1.0 - c["beta"]) * seg
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.detach())
    metrics.append(dict(sims=sims, w=w, kd=kd.detach(), seg=seg.detach(), emd_error=err.max()))
  return torch.stack(losses).mean(), {k: torch.stack([m[k] for m in metrics]).mean(0) for k in metrics[0]}


def fedefm_round(c: dict, model, student, experts, sums, nbrs, x, y) -> torch.Tensor:
  """One round: every silo's update one after another from ``model``, then ``model`` = their mean.
  x [S, L, B, 1, H, W], y [S, L, B, H, W]. Returns the silos' mean losses [S]."""
  for acc in sums:
    acc.zero_()
  losses = []
  gx, gy = x[:, : c["expert_steps"]], y[:, : c["expert_steps"]]  # each silo's first batches (the experts')
  for i in range(x.shape[0]):
    loss, _ = silo_update(c, model, student, experts, x[i], y[i], gx, gy, nbrs[i])
    losses.append(loss)
    with torch.no_grad():
      for acc, p in zip(sums, student.parameters()):
        acc.add_(p)
  with torch.no_grad():
    for p, acc in zip(model.parameters(), sums):
      p.copy_(acc / x.shape[0])
  return torch.stack(losses)


def zero_gradient_params(model) -> set[str]:
  """Names of the parameters whose gradient is exactly 0 in exact arithmetic: the bias of a conv followed
  by a GroupNorm with one channel per group (the norm removes it) and attention key biases (the softmax
  over keys removes them)."""
  out = set()
  for prefix, m in model.named_modules():
    for conv, norm in (("conv", "norm"), ("conv1", "norm1"), ("conv2", "norm2")):
      gn = getattr(m, norm, None)
      if isinstance(gn, nn.GroupNorm) and gn.num_groups == gn.num_channels:
        out.add(f"{prefix}.{conv}.bias")
    if isinstance(m, Attention):
      out.add(f"{prefix}.key.bias")
  return out


def count(model) -> int:
  return sum(p.numel() for p in model.parameters())


def bench(c: dict, silos: int, rounds: int) -> dict:
  torch.manual_seed(0)
  model, student = TransUNet(c), TransUNet(c)
  nbrs = ring_neighbours(silos)
  experts = [TransUNet(c) for _ in range(max(len(n) for n in nbrs))]
  sums = [torch.zeros_like(p) for p in model.parameters()]
  h, L, B = c["image_size"], c["local_steps"], c["batch_size"]
  times = []
  for r in range(1, rounds + 1):
    t0 = time.perf_counter()
    x = torch.randn(silos, L, B, 1, h, h)
    y = torch.randint(0, c["num_classes"], (silos, L, B, h, h))
    losses = fedefm_round(c, model, student, experts, sums, nbrs, x, y)
    if not bool(torch.isfinite(losses).all()):
      raise FloatingPointError(f"round {r}: non-finite silo loss {losses.tolist()}")
    times.append(time.perf_counter() - t0)
    row = dict(bench="fedefm_torch_round", round=r, seconds=round(times[-1], 4), loss=round(float(losses.mean()), 4))
    print(json.dumps(row), flush=True)
  med = float(np.median(times[1:]))  # main() asks for 2 or more rounds: the first warms up
  images = silos * L * B
  out = dict(bench="fedefm_torch", silos=silos, local_steps=L, batch_size=B, images_per_round=images)
  out.update(s_per_round_median=round(med, 4), images_per_s=round(images / med, 2), params=count(model))
  out.update(torch=torch.__version__, threads=torch.get_num_threads())
  print(json.dumps(out), flush=True)
  return out


# ------------------------------------------------------------------ --check


def _fedkd_rows(cmd: list[str]) -> list[dict]:
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if res.returncode != 0:
    sys.exit(f"fedefm_torch: {' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
  return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def check(fedkd_python: str) -> int:
  """Compares this file's model, EMD and silo update with fedkd's (run in ``fedkd_python``)."""
  path = os.path.join(tempfile.mkdtemp(), "fedkd_reference.npz")
  _fedkd_rows([fedkd_python, os.path.abspath(__file__), "--fedkd-side", "check", "--out", path])
  ref = dict(np.load(path))
  c = dict(CONFIG)
  fedkd_config = json.loads(str(ref["config"]))
  differ = {k: (c.get(k), v) for k, v in fedkd_config.items() if c.get(k) != v}
  flat = {k[len("param:") :]: v for k, v in ref.items() if k.startswith("param:")}
  model = TransUNet(c)
  load_fedkd_params(model, flat)
  n_torch, n_fedkd = count(model), int(sum(a.size for a in flat.values()))
  x = torch.from_numpy(ref["x"]).permute(0, 1, 4, 2, 3).contiguous()  # [L, B, 1, H, W]
  y = torch.from_numpy(ref["y"]).long()
  with torch.no_grad():
    logits, tokens = model(x[0])
  d_logits = float((logits.permute(0, 2, 3, 1) - torch.from_numpy(ref["logits"])).abs().max())
  d_tokens = float((tokens - torch.from_numpy(ref["tokens"]).flatten(1, 2)).abs().max())
  s, err = emd_similarity(torch.from_numpy(ref["emd_u"]), torch.from_numpy(ref["emd_v"]), c["emd_epsilon"])
  d_emd = float((s - torch.from_numpy(ref["emd_s"])).abs().max())
  # one silo's update from fedkd's start parameters and data
  student, experts = TransUNet(c), [TransUNet(c) for _ in range(len(ref["nbr"]))]
  gx = torch.from_numpy(ref["gx"]).permute(0, 1, 2, 5, 3, 4).contiguous()
  gy = torch.from_numpy(ref["gy"]).long()
  nbrs = [int(j) for j, m in zip(ref["nbr"], ref["nbr_mask"]) if m]
  loss, met = silo_update(c, model, student, experts, x, y, gx, gy, nbrs)
  loss = loss.detach()
  up = TransUNet(c)
  load_fedkd_params(up, {k[len("upload:") :]: v for k, v in ref.items() if k.startswith("upload:")})
  flat_grad = zero_gradient_params(model)
  with torch.no_grad():
    diff = {n: float((a - b).abs().max()) for (n, a), b in zip(student.named_parameters(), up.parameters())}
    moved = max(float((a - b).abs().max()) for a, b in zip(up.parameters(), model.parameters()))
  row = dict(bench="fedefm_torch_check", config_equal=not differ, config_differences=differ)
  row.update(params_torch=n_torch, params_fedkd=n_fedkd, forward_shapes=[list(logits.shape), list(tokens.shape)])
  row.update(logits_max_abs_diff=d_logits, tokens_max_abs_diff=d_tokens)
  row.update(emd_pairs=len(s), emd_max_abs_diff=d_emd, emd_torch=[round(float(v), 5) for v in s])
  row.update(emd_error_max_torch=float(err.max()), emd_error_max_fedkd=float(ref["emd_err"].max()))
  row.update(silo_loss_torch=float(loss), silo_loss_fedkd=float(ref["loss"]))
  row.update(silo_w_torch=met["w"].tolist(), silo_w_fedkd=ref["metric:w"].tolist())
  row.update(silo_sims_max_abs_diff=float((met["sims"] - torch.from_numpy(ref["metric:sims"])).abs().max()))
  row.update(silo_kd_torch=float(met["kd"]), silo_kd_fedkd=float(ref["metric:kd"]))
  row.update(silo_update_max_abs_change=moved, silo_update_max_abs_diff=max(diff.values()))
  # tensors whose exact gradient is 0 (a conv bias under a one-channel-per-group GroupNorm, attention key
  # biases): float noise there is a full +-lr Adam step on either side, so they differ by up to ~1e-3
  row.update(silo_update_max_abs_diff_others=max(v for n, v in diff.items() if n not in flat_grad))
  row.update(zero_gradient_tensors=len(flat_grad))
  print(json.dumps(row), flush=True)
  ok = not differ and n_torch == n_fedkd and d_emd < 1e-4
  print(json.dumps(dict(bench="fedefm_torch_check_ok", ok=ok, emd_tolerance=1e-4)), flush=True)
  return 0 if ok else 1


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
  if ROOT not in sys.path:  # run as a script: the bench package (its one-line errors) sits at the root
    sys.path.insert(0, ROOT)
  from bench import ArgumentParser, fail

  ap = ArgumentParser(prog="fedefm_torch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--silos", type=int, default=CONFIG["num_silos"])
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
  ap.add_argument("--fedkd", action="store_true", help="then time fedkd's round (bench/fedefm_stack.py) too")
  ap.add_argument("--check", action="store_true", help="compare the model, EMD and a silo update with fedkd's")
  ap.add_argument("--fedkd-python", default=sys.executable, help="a Python with fedkd (jax) installed")
  ap.add_argument("--fedkd-side", choices=("check", "rate"), help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.fedkd_side == "check":
    fedkd_reference(a.out)
    return 0
  if a.fedkd_side == "rate":
    fedkd_rate(a.silos, a.rounds)
    return 0
  if a.rounds < 2:  # the first round warms up and is not timed
    fail("fedefm_torch", f"--rounds={a.rounds}: give 2 or more (the first round warms up; the rest are timed)")
  if a.threads < 0:
    fail("fedefm_torch", f"--threads={a.threads} must be >= 0 (0: torch's default)")
  if torch is None:
    fail("fedefm_torch", "torch is not installed in this Python; run it with one that has torch")
  if a.fedkd and a.rounds < 5:
    ap.error("--fedkd needs --rounds >= 5: fedefm_stack leaves out the compiling, warm-up and last rounds")
  if a.threads:
    torch.set_num_threads(a.threads)
  if a.check:
    return check(a.fedkd_python)
  if a.silos < 2:
    ap.error("--silos must be >= 2 (every silo needs a ring neighbour)")
  out = bench(dict(CONFIG), a.silos, a.rounds)
  if a.fedkd:
    cmd = [a.fedkd_python, os.path.abspath(__file__), "--fedkd-side", "rate"]
    rows = _fedkd_rows(cmd + ["--silos", str(a.silos), "--rounds", str(a.rounds)])
    fed = next(r for r in rows if r.get("bench") == "fedkd_fedefm_round")
    print(json.dumps(fed), flush=True)
    row = dict(bench="fedefm_torch_vs_fedkd", silos=a.silos, fedkd_images_per_s=fed["images_per_s"])
    row.update(torch_images_per_s=out["images_per_s"], ratio=round(fed["images_per_s"] / out["images_per_s"], 3))
    row.update(params_fedkd=fed["params"], params_torch=out["params"])
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
