"""TransUNet as a user runs it: the whole forward pass (CNN stem, GroupNorm, patch projection, position
embedding, attention, LayerNorm, bilinear decoder with skips, head) against an independent numpy
implementation; sizes on which the model cannot see the image refused at construction and, in a FedEFM
config, as a config error; the FedAvg and SCAFFOLD rounds of a TransUNet in every client layout x conv
lowering (vmap / chunked / unroll x xla / gemm / wgrad / matmul; the former bgemm, hybrid, gconv, map)
against a per-client loop, in f32, bf16 and with remat; encoder transfer between TransUNets of different
depth and of different head counts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fedkd.losses import make_segmentation_loss
from fedkd.models import init_model, init_params
from fedkd.models.transfer import load_encoder
from fedkd.models.transunet import TransUNet
from fedkd.sharding import shard_clients
from test_engine import _build, _max_diff, _reference_round, assert_scaffold_rounds

# 8 px images, patch 4 (two stem stages, a 2 x 2 token grid), skips on: every part of the model in play
TINY = dict(
  name="transunet",
  num_classes=3,
  image_size=8,
  patch_size=4,
  stem_width=2,
  hidden=8,
  num_layers=1,
  num_heads=2,
  mlp_dim=8,
  decoder_width=8,
  skips=True,
)


def _cfg(**kw):
  return ml_collections.ConfigDict(TINY | kw)


# --- an independent numpy TransUNet (float64) ---------------------------------------------------------


def _np_conv(x, k, b, stride=1):
  """NHWC x HWIO convolution with TensorFlow's SAME padding (total max((out-1)*s + k - in, 0), the
  smaller half before), as a loop over kernel taps."""
  n, h, w, _ = x.shape
  kh, kw, _, cout = k.shape
  oh, ow = -(-h // stride), -(-w // stride)
  ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
  xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros((n, oh, ow, cout))
  for i in range(kh):
    for j in range(kw):
      out += xp[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride, :] @ k[i, j]
  return out + b


def _np_groupnorm(x, p, groups, eps=1e-6):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mu = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _np_layernorm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):  # the tanh form (jax.nn.gelu's default)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_upsample2x(x):
  """Bilinear x2 with half-pixel centres, edge pixels repeated: output i samples input (i + 0.5) / 2 - 0.5."""
  for axis in (1, 2):
    n = x.shape[axis]
    src = (np.arange(2 * n) + 0.5) / 2 - 0.5
    lo = np.floor(src).astype(int)
    t = (src - lo).reshape([-1 if a == axis else 1 for a in range(4)])
    a = np.take(x, np.clip(lo, 0, n - 1), axis=axis)
    b = np.take(x, np.clip(lo + 1, 0, n - 1), axis=axis)
    x = (1 - t) * a + t * b
  return x


def _np_attention(x, p, heads):
  """Multi-head self-attention with fused [D, D] projections, head h = columns h*dh .. (h+1)*dh."""
  b, n, d = x.shape
  dh = d // heads
  q, k, v = (x @ p[name]["kernel"].reshape(d, d) + p[name]["bias"].reshape(d) for name in ("query", "key", "value"))
  out = np.zeros((b, n, d))
  for h in range(heads):
    sl = slice(h * dh, (h + 1) * dh)
    s = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / np.sqrt(dh)
    s = np.exp(s - s.max(-1, keepdims=True))
    out[..., sl] = (s / s.sum(-1, keepdims=True)) @ v[..., sl]
  return out @ p["out"]["kernel"].reshape(d, d) + p["out"]["bias"]


def _np_transunet(p, x, cfg):
  """(logits, encoder tokens [B, g, g, hidden]) of the TransUNet described in fedkd/models/transunet.py."""
  gn = lambda x, q: _np_groupnorm(x, q, np.gcd(8, x.shape[-1]))  # noqa: E731
  e = p["encoder"]
  stem = []
  for i in range(len(e["stem"])):
    s = e["stem"][i]
    x = _np_gelu(gn(_np_conv(x, s["conv1"]["kernel"], s["conv1"]["bias"], 2), s["norm1"]))
    x = _np_gelu(gn(_np_conv(x, s["conv2"]["kernel"], s["conv2"]["bias"]), s["norm2"]))
    stem.append(x)
  t = _np_conv(x, e["patch_proj"]["kernel"], e["patch_proj"]["bias"])
  b, g, _, d = t.shape
  t = t.reshape(b, g * g, d) + e["pos_embed"]
  for i in range(len(e["layers"])):
    lp = e["layers"][i]
    t = t + _np_attention(_np_layernorm(t, lp["ln1"]), lp["attn"], cfg.num_heads)
    m = _np_gelu(_np_layernorm(t, lp["ln2"]) @ lp["mlp"]["fc1"]["kernel"] + lp["mlp"]["fc1"]["bias"])
    t = t + m @ lp["mlp"]["fc2"]["kernel"] + lp["mlp"]["fc2"]["bias"]
  tokens = _np_layernorm(t, e["norm"]).reshape(b, g, g, d)
  dp = p["decoder"]
  y = np.maximum(
    gn(_np_conv(tokens, dp["conv_more"]["conv"]["kernel"], dp["conv_more"]["conv"]["bias"]), dp["conv_more"]["norm"]), 0
  )
  n = len(dp["blocks"])
  for j in range(n):
    bp = dp["blocks"][j]
    y = _np_upsample2x(y)
    if cfg.skips and n - 2 - j >= 0:
      y = np.concatenate([y, stem[n - 2 - j]], -1)
    y = np.maximum(gn(_np_conv(y, bp["conv1"]["kernel"], bp["conv1"]["bias"]), bp["norm1"]), 0)
    y = np.maximum(gn(_np_conv(y, bp["conv2"]["kernel"], bp["conv2"]["bias"]), bp["norm2"]), 0)
  return _np_conv(y, p["head"]["kernel"], p["head"]["bias"]), tokens


def _perturbed(params, seed):
  """Params with every leaf moved by N(0, 0.2^2): LayerNorm / GroupNorm scales and all biases non-trivial."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.2 * rng.standard_normal(a.shape), params)


FORWARD_CASES = {
  "8px-patch4-skips": _cfg(),
  "12px-grid3-3heads-odd-widths": _cfg(
    image_size=12,
    stem_width=3,
    hidden=6,
    num_heads=3,
    num_layers=2,
    mlp_dim=5,
    decoder_width=12,
    skips=False,
    num_classes=1,
  ),
  "6px-patch2-1head": _cfg(image_size=6, patch_size=2, hidden=4, num_heads=1, num_classes=4),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_numpy(name):
  """Logits and encoder tokens of the jitted model against the numpy TransUNet above on the same (perturbed)
  params, batch 2. Measured: <= 2.4e-6 of max |ref| (f32 against float64)."""
  cfg = FORWARD_CASES[name]
  _, apply_wf, params = init_model(cfg, 0)
  p64 = _perturbed(params, 1)
  x = np.random.default_rng(2).standard_normal((2, cfg.image_size, cfg.image_size, 1))
  logits, feats = jax.jit(apply_wf)(jax.tree.map(jnp.float32, p64), jnp.float32(x))
  want_logits, want_feats = _np_transunet(p64, x, cfg)
  g = cfg.image_size // cfg.patch_size
  assert logits.shape == (2, cfg.image_size, cfg.image_size, cfg.num_classes)
  assert feats.shape == (2, g, g, cfg.hidden)
  for got, want in ((logits, want_logits), (feats, want_feats)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert np.abs(want_logits[0] - want_logits[1]).max() > 0.1  # the two images give different logits


def test_sizes_on_which_the_model_cannot_see_the_image_are_refused():
  """hidden=1 / 2 (LayerNorm over one feature outputs its bias, over two +-1: the logits were the same for
  every image and the transformer layers' gradient exactly 0 at hidden 1, 1.5e-6 at hidden 2) and
  patch_size == image_size (a 1x1 token grid, whose GroupNorms normalise one or two values per group at
  these widths: the logits also ignored the image): a ValueError naming the size and the fix. hidden=3 and
  a 2x2 grid see the image (layer gradients > 1e-4)."""
  small = dict(stem_width=2, num_layers=1, mlp_dim=4, decoder_width=8, rngs=nnx.Rngs(0))
  for hidden in (1, 2):
    with pytest.raises(ValueError, match=rf"hidden={hidden}: .* use hidden >= 3"):
      TransUNet(image_size=8, patch_size=4, hidden=hidden, num_heads=1, **small)
  with pytest.raises(
    ValueError, match=r"image_size=8 with patch_size=8 gives a 1x1 token grid.*at most image_size/2=4"
  ):
    TransUNet(image_size=8, patch_size=8, hidden=8, num_heads=2, **small)
  for kw in (dict(hidden=3, num_heads=1, patch_size=4), dict(hidden=8, num_heads=2, patch_size=4)):
    apply, params = init_params(_cfg(**kw), 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    g = jax.jit(jax.grad(lambda p: jnp.mean(apply(p, x)[0] ** 2)))(params)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g["encoder"]["layers"])) > 1e-4, kw


@pytest.mark.parametrize(
  "flags,match",
  [
    (["hidden=2", "num_heads=1"], r"config.teacher.hidden=2 is too small: the ViT needs hidden >= 3"),
    (["patch_size=16"], r"config.teacher.patch_size=16 leaves a 1x1 token grid at config.teacher.image_size=16"),
  ],
  ids=["hidden2", "patch-equals-image"],
)
def test_fedefm_config_with_such_sizes_is_a_config_error(cli, tmp_path, flags, match):
  """The same sizes in a FedEFM run (teacher and student): exit 2 with one line naming the key, no traceback,
  before anything is written to the workdir."""
  workdir = tmp_path / "fe"
  args = ["--config=configs/fedefm.py:tiny", f"--workdir={workdir}"]
  args += [f"--config.{m}.{f}" for m in ("teacher", "student") for f in flags]
  r = cli.run("fedkd.main", args)
  assert r.code == 2 and not r.traceback, (r.code, r.stderr[-2000:])
  lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("fedkd: error: config.teacher.")]
  assert len(lines) == 1 and __import__("re").search(match, lines[0]), r.stderr[-2000:]
  assert not workdir.exists() or not any(p.is_file() and p.stat().st_size for p in workdir.rglob("*"))


# --- the TransUNet in the FedAvg / SCAFFOLD round, every client layout x conv lowering --------------------

_PROBLEM = {}


def _problem():
  """TINY TransUNet, the 0.5 CE + 0.5 Dice loss and 4 clients x 2 local steps x batch 2 of 8 px images."""
  if not _PROBLEM:
    apply, params = init_params(_cfg(), 0)
    loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((4, 2, 2, 8, 8, 1)).astype(np.float32)
    ys = rng.integers(0, 3, (4, 2, 2, 8, 8)).astype(np.int32)
    _PROBLEM.update(
      apply=apply, params=params, loss_fn=loss_fn, xs=xs, ys=ys, weights=np.array([5, 1, 3, 8], np.float32)
    )
  return (_PROBLEM[k] for k in ("apply", "params", "loss_fn", "xs", "ys", "weights"))


_REFERENCES = {}


def _reference(compute_dtype=None):
  """The per-client loop's round on :func:`_problem` (one per dtype per process: the layouts share it)."""
  if compute_dtype not in _REFERENCES:
    apply, params, loss_fn, xs, ys, weights = _problem()
    _REFERENCES[compute_dtype] = _reference_round(apply, loss_fn, params, xs, ys, weights, compute_dtype=compute_dtype)
  return _REFERENCES[compute_dtype]


_ROUNDS = {}


def _round(layout, lowering, n_dev, chunk=8, in_flight=0, **ctx_kw):
  """One round of :func:`_problem`: (new params, metrics); each setting run once per process (the plain
  vmap + gemm round serves both the layout test and the remat test)."""
  key = (layout, lowering, n_dev, chunk, in_flight, tuple(sorted(ctx_kw.items())))
  if key not in _ROUNDS:
    _ROUNDS[key] = _run_round(layout, lowering, n_dev, chunk, in_flight, **ctx_kw)
  return _ROUNDS[key]


def _run_round(layout, lowering, n_dev, chunk=8, in_flight=0, **ctx_kw):
  apply, params, loss_fn, xs, ys, weights = _problem()
  fn, mesh, alg = _build(apply, loss_fn, n_dev, layout, lowering, chunk=chunk, in_flight=in_flight, **ctx_kw)
  state = alg.init(params, jax.random.key(0))
  xs, ys, weights = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, {"x": xs, "y": ys}, weights)
  return jax.tree.map(np.asarray, state["params"]), metrics


STRATEGIES = [  # (layout, lowering, devices on the clients axis, client_chunk); the former client_parallelism
  ("vmap", "xla", 2, 8),  # vmap
  ("vmap", "gemm", 2, 8),  # bgemm
  ("vmap", "wgrad", 1, 8),  # hybrid
  ("vmap", "matmul", 4, 8),  # gconv
  ("chunked", "gemm", 1, 2),  # chunked: two chunks of 2
  ("chunked", "xla", 2, 1),  # map: one client at a time
  ("unroll", "matmul", 2, 8),  # the CPU default (2 clients unrolled per device)
  ("unroll", "wgrad", 2, 8),
]


@pytest.mark.parametrize("layout,lowering,n_dev,chunk", STRATEGIES, ids=[f"{a}-{b}" for a, b, *_ in STRATEGIES])
def test_fedavg_round_equals_per_client_loop(layout, lowering, n_dev, chunk):
  """One FedAvg round of the TransUNet (client SGD, weighted mean) against each client trained on its own with
  numpy updates. Measured: <= 1.2e-7 against a round that moves the params by 1.0e-2."""
  _, params, *_ = _problem()
  ref = _reference()
  got, metrics = _round(layout, lowering, n_dev, chunk)
  assert _max_diff(ref, got) < 2e-5
  assert _max_diff(params, got) > 1e-3
  assert metrics["client_loss"].shape == (4,) and np.all(np.isfinite(metrics["client_loss"]))


@pytest.mark.parametrize("layout,lowering,n_dev", [("vmap", "gemm", 2)])  # TransUNet's GPU default (auto)
def test_scaffold_rounds_equal_per_client_loop(layout, lowering, n_dev):
  """Two SCAFFOLD rounds of the TransUNet over overlapping client samples (the second round's clients 2 and 3
  start from their own control variates) against the client-by-client numpy loop: server params, server
  control and every client's control."""
  apply, params, loss_fn, xs, ys, weights = _problem()
  assert_scaffold_rounds(apply, params, loss_fn, xs, ys, weights, n_dev, layout, lowering)


@pytest.mark.parametrize("layout,lowering,n_dev", [("vmap", "xla", 2), ("unroll", "matmul", 2)])
def test_bf16_round_is_the_bf16_loop(layout, lowering, n_dev):
  """engine.compute_dtype=bfloat16: finite, f32 master weights, and nearer the loop whose gradients are taken
  on bf16-cast params and images than the f32 loop is (bf16 moves this tiny model's round by about its own
  step: 8.1e-3 against a step of 1.0e-2; the bf16 rounds are 2.7e-4 (vmap + xla) and 1.8e-3 (unroll + matmul)
  from the bf16 loop: the loop and the lowerings round bf16 sums in different orders)."""
  _, params, *_ = _problem()
  got16, m16 = _round(layout, lowering, n_dev, compute_dtype=jnp.bfloat16)
  assert all(a.dtype == np.float32 and np.all(np.isfinite(a)) for a in jax.tree.leaves(got16))
  assert np.all(np.isfinite(m16["client_loss"]))
  ref16, ref32 = _reference(jnp.bfloat16), _reference()
  assert _max_diff(ref16, got16) < 0.3 * _max_diff(ref32, ref16)
  assert _max_diff(ref32, params) > 1e-3


def test_remat_round_equals_plain_round():
  """engine.remat=True on TransUNet's GPU default (vmap + gemm): the same round as without (CPU: bitwise so
  far; asserted to 1e-6 against a step of 1e-2)."""
  plain, _ = _round("vmap", "gemm", 2)
  remat, _ = _round("vmap", "gemm", 2, remat=True)
  assert _max_diff(plain, remat) < 1e-6


# --- encoder transfer between TransUNets --------------------------------------------------------------------


def test_foundation_encoder_of_another_depth_loads_its_first_layers():
  """A 3-layer foundation into a 1-layer student (another decoder width and class count): the student's
  tokens are the numpy encoder's on the foundation's stem, embedding, first layer and final norm, and its
  decoder and head stay its own. A 1-layer foundation into a 2-layer student: layer 1 is reported missing
  and keeps the student's values."""
  _, t_wf, teacher = init_model(_cfg(num_layers=3, num_classes=4), 0)
  s_cfg = _cfg(num_layers=1, decoder_width=16)
  _, s_wf, student = init_model(s_cfg, 1)
  new, report = load_encoder(student, teacher)
  assert {p[2] for p in report["unused_in_foundation"]} == {1, 2}
  t64 = jax.tree.map(lambda a: np.asarray(a, np.float64), teacher)
  want = dict(encoder=dict(t64["encoder"], layers={0: t64["encoder"]["layers"][0]}))
  want |= {k: jax.tree.map(lambda a: np.asarray(a, np.float64), student[k]) for k in ("decoder", "head")}
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 1))
  logits, feats = jax.jit(s_wf)(new, jnp.float32(x))
  want_logits, want_feats = _np_transunet(want, x, s_cfg)
  np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=0, atol=1e-5 * np.abs(want_feats).max())
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=1e-5 * np.abs(want_logits).max())
  for k in ("decoder", "head"):
    assert all(a is b for a, b in zip(jax.tree.leaves(new[k]), jax.tree.leaves(student[k])))

  _, shallow = init_params(_cfg(num_layers=1), 2)
  _, deep = init_params(_cfg(num_layers=2), 3)
  new, report = load_encoder(deep, shallow)
  assert report["missing_in_foundation"] and {p[:3] for p in report["missing_in_foundation"]} == {
    ("encoder", "layers", 1)
  }
  for a, b in zip(jax.tree.leaves(new["encoder"]["layers"][1]), jax.tree.leaves(deep["encoder"]["layers"][1])):
    assert a is b
  np.testing.assert_array_equal(
    new["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"], shallow["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
  )


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(num_heads=4), r"'layers' do not match.*attn/key/bias: student \(4, 2\) vs foundation \(2, 4\)"),
    (dict(mlp_dim=16), r"'layers' do not match.*mlp/fc1/\w+: student \(\w*.*16\) vs foundation"),
  ],
  ids=["heads", "mlp_dim"],
)
def test_foundation_with_other_heads_or_mlp_is_refused(change, match):
  """Same hidden size, another head count or MLP width: the transformer layers cannot be moved whole, so
  load_encoder refuses (naming the leaf and both shapes) instead of loading the stem alone."""
  _, teacher = init_params(_cfg(), 0)
  _, student = init_params(_cfg(**change), 1)
  with pytest.raises(ValueError, match=match):
    load_encoder(student, teacher)
