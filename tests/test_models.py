"""Tests for fedkd.models: TransUNet, init_model/init_params and encoder transfer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from fedkd.models import build_model, init_model, init_params
from fedkd.models.transfer import load_encoder
from fedkd.models.transunet import TransUNet
from fedkd.models.unet import UNet

TINY = dict(stem_width=4, hidden=16, num_layers=1, num_heads=2, mlp_dim=32, decoder_width=8)


def _cfg(**kw):
  base = dict(name="transunet", num_classes=3, image_size=32, patch_size=4, **TINY)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _paths(tree):
  return {p: v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _key_paths(tree):
  return {tuple(getattr(k, "key", k) for k in p) for p in _paths(tree)}


@pytest.mark.parametrize("image_size,patch_size,skips", [(32, 4, True), (64, 8, False)])
def test_transunet_shapes(image_size, patch_size, skips):
  cfg = _cfg(image_size=image_size, patch_size=patch_size, skips=skips, num_classes=2)
  apply, apply_f, params = init_model(cfg, 0)
  assert set(params) == {"encoder", "decoder", "head"}
  graphdef = nnx.split(build_model(cfg, 0), nnx.Param)[0]

  @jax.jit
  def run(p, x):
    model = nnx.merge(graphdef, nnx.State(p))
    return apply(p, x), apply_f(p, x), model.features(x), model(x)

  x = jax.random.normal(jax.random.key(1), (2, image_size, image_size, 1))
  logits, (logits2, feats), feats2, logits3 = run(params, x)
  g = image_size // patch_size
  assert logits.shape == (2, image_size, image_size, 2)
  assert feats.shape == (2, g, g, TINY["hidden"])
  np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits3, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(feats2, feats, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(logits))
  # with skips the decoder really consumes the stem outputs (wider first decoder convs)
  n_stages = int(np.log2(patch_size))
  cin = params["decoder"]["blocks"][0]["conv1"]["kernel"].shape[2]
  skip_c = TINY["stem_width"] * 2 ** (n_stages - 2)
  assert cin == TINY["decoder_width"] + (skip_c if skips else 0)


def test_transunet_rejects_bad_sizes():
  with pytest.raises(ValueError, match="power of two"):
    TransUNet(num_classes=2, image_size=36, patch_size=6, rngs=nnx.Rngs(0), **TINY)
  with pytest.raises(ValueError, match="divisible"):
    TransUNet(num_classes=2, image_size=36, patch_size=8, rngs=nnx.Rngs(0), **TINY)


def _np_layernorm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_gelu(x):  # tanh approximation, as jax.nn.gelu's default
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_mhsa(x, p, num_heads):
  """Textbook multi-head self-attention with fused [D, D] projections, heads split by reshape."""
  b, n, d = x.shape
  dh = d // num_heads
  wq = p["query"]["kernel"].reshape(d, d)
  wk = p["key"]["kernel"].reshape(d, d)
  wv = p["value"]["kernel"].reshape(d, d)
  wo = p["out"]["kernel"].reshape(d, d)
  out = np.zeros((b, n, d))
  for bi in range(b):
    q = x[bi] @ wq + p["query"]["bias"].reshape(d)
    k = x[bi] @ wk + p["key"]["bias"].reshape(d)
    v = x[bi] @ wv + p["value"]["bias"].reshape(d)
    heads = []
    for h in range(num_heads):
      sl = slice(h * dh, (h + 1) * dh)
      s = q[:, sl] @ k[:, sl].T / np.sqrt(dh)
      s = np.exp(s - s.max(-1, keepdims=True))
      s /= s.sum(-1, keepdims=True)
      heads.append(s @ v[:, sl])
    out[bi] = np.concatenate(heads, -1) @ wo + p["out"]["bias"]
  return out


def test_attention_matches_numpy():
  """One ViT layer + final norm vs an independent numpy implementation on the same weights."""
  heads = 4
  model = TransUNet(
    num_classes=2,
    image_size=32,
    patch_size=4,
    stem_width=4,
    hidden=32,
    num_layers=1,
    num_heads=heads,
    mlp_dim=48,
    decoder_width=8,
    rngs=nnx.Rngs(3),
  )
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))
  # non-trivial LayerNorm / bias params so that they are exercised too
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape), params)
  graphdef, _ = nnx.split(model, nnx.Param)
  model = nnx.merge(graphdef, nnx.State(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))

  @nnx.jit
  def run(model, x):
    tokens = model.encoder.embed(model.encoder.run_stem(x)[-1])
    block = model.encoder.layers[0]
    return tokens, block.attn(block.ln1(tokens)), model.features(x)

  tokens, attn_jax, feats = run(model, x)
  tokens = np.asarray(tokens, np.float64)
  lp = params["encoder"]["layers"][0]
  # attention block alone
  ln1 = _np_layernorm(tokens, lp["ln1"]["scale"], lp["ln1"]["bias"])
  attn_np = _np_mhsa(ln1, lp["attn"], heads)
  np.testing.assert_allclose(attn_jax, attn_np, rtol=1e-4, atol=1e-4)
  # the whole encoder output on the token grid
  h = tokens + attn_np
  m = _np_layernorm(h, lp["ln2"]["scale"], lp["ln2"]["bias"])
  m = _np_gelu(m @ lp["mlp"]["fc1"]["kernel"] + lp["mlp"]["fc1"]["bias"])
  h = h + m @ lp["mlp"]["fc2"]["kernel"] + lp["mlp"]["fc2"]["bias"]
  out = _np_layernorm(h, params["encoder"]["norm"]["scale"], params["encoder"]["norm"]["bias"])
  np.testing.assert_allclose(feats, out.reshape(2, 8, 8, 32), rtol=1e-3, atol=1e-3)


def test_load_encoder_teacher_to_student():
  teacher_cfg = _cfg(num_layers=4, decoder_width=16)
  student_cfg = _cfg(num_layers=2, decoder_width=8)
  _, teacher = init_params(teacher_cfg, 0)
  _, student = init_params(student_cfg, 1)
  new, report = load_encoder(student, teacher)
  assert jax.tree.structure(new) == jax.tree.structure(student)
  s_leaves, t_leaves, n_leaves = _paths(student), _paths(teacher), _paths(new)
  expect_loaded, changed = set(), 0
  for path, leaf in n_leaves.items():
    keys = tuple(getattr(k, "key", k) for k in path)
    if keys[0] == "encoder":
      expect_loaded.add(keys)
      assert keys[1] != "layers" or keys[2] in (0, 1)
      np.testing.assert_array_equal(leaf, t_leaves[path])
      assert leaf.shape == s_leaves[path].shape and leaf.dtype == s_leaves[path].dtype
      changed += not np.array_equal(leaf, s_leaves[path])
    else:
      assert leaf is s_leaves[path] or np.array_equal(leaf, s_leaves[path])
  # every leaf whose init differs between the two seeds (all but zero biases / unit scales)
  n_differ = sum(
    not np.array_equal(t_leaves[p], s_leaves[p]) for p in n_leaves if getattr(p[0], "key", None) == "encoder"
  )
  assert changed == n_differ and changed > 10
  assert set(report["loaded"]) == expect_loaded
  assert report["skipped_shape"] == [] and report["missing_in_foundation"] == []
  assert {p[2] for p in report["unused_in_foundation"]} == {2, 3}
  assert all(p[:2] == ("encoder", "layers") for p in report["unused_in_foundation"])
  # the student model still runs on the new params
  apply, _, _ = init_model(student_cfg, 1)
  out = jax.eval_shape(apply, new, jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
  assert out.shape == (1, 32, 32, 3)


def test_load_encoder_reports_shape_mismatch_and_missing():
  _, teacher = init_params(_cfg(num_layers=2), 0)
  _, student = init_params(_cfg(num_layers=3, stem_width=8), 1)  # other stem width, same ViT
  new, report = load_encoder(student, teacher)
  skipped = {p for p, _, _ in report["skipped_shape"]}
  assert skipped and all(p[1] in ("stem", "patch_proj") for p in skipped)
  for p, s, f in report["skipped_shape"]:
    assert s != f
  assert report["missing_in_foundation"] and all(
    p[:3] == ("encoder", "layers", 2) for p in report["missing_in_foundation"]
  )
  np.testing.assert_array_equal(
    new["encoder"]["layers"][1]["mlp"]["fc1"]["kernel"], teacher["encoder"]["layers"][1]["mlp"]["fc1"]["kernel"]
  )
  np.testing.assert_array_equal(
    new["encoder"]["stem"][0]["conv1"]["kernel"], student["encoder"]["stem"][0]["conv1"]["kernel"]
  )


def test_load_encoder_hidden_mismatch_raises():
  _, teacher = init_params(_cfg(hidden=16), 0)
  _, student = init_params(_cfg(hidden=32), 1)
  msg = r"'layers'.*hidden size.*got hidden 32 \(student\) vs 16"
  with pytest.raises(ValueError, match=msg):
    load_encoder(student, teacher)
  _, other_stem = init_params(_cfg(hidden=32, stem_width=8, mlp_dim=64), 1)
  with pytest.raises(ValueError, match="no encoder parameter of the foundation matches"):
    load_encoder(other_stem, teacher)


def _square_batch(key, n=8, size=32):
  k1, k2 = jax.random.split(key)
  pos = jax.random.randint(k1, (n, 2), 4, size - 12)
  yy, xx = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")
  inside = (
    (yy[None] >= pos[:, 0, None, None])
    & (yy[None] < pos[:, 0, None, None] + 8)
    & (xx[None] >= pos[:, 1, None, None])
    & (xx[None] < pos[:, 1, None, None] + 8)
  )
  x = inside.astype(jnp.float32) + 0.1 * jax.random.normal(k2, inside.shape)
  return x[..., None], inside.astype(jnp.int32)


def test_transunet_trains_on_squares():
  apply, params = init_params(_cfg(num_classes=2, patch_size=4, num_layers=2), 0)
  opt = optax.adam(3e-3)
  state = opt.init(params)
  x, y = _square_batch(jax.random.key(0))

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(31):  # the 31st step's loss is the loss after 30 updates
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[30] < 0.5 * losses[0], losses


def test_vmap_over_client_params():
  cfg = _cfg(num_classes=2)
  apply, apply_f, _ = init_model(cfg, 0)
  client_params = [init_model(cfg, s)[2] for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *client_params)
  x = jax.random.normal(jax.random.key(0), (3, 2, 32, 32, 1))
  out, feats = jax.jit(jax.vmap(apply_f))(stacked, x)
  single = jax.jit(lambda p, x: (apply(p, x), apply_f(p, x)[1]))
  for i, p in enumerate(client_params):
    ref_out, ref_feats = single(p, x[i])
    np.testing.assert_allclose(out[i], ref_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[i], ref_feats, rtol=1e-4, atol=1e-4)
  assert not np.allclose(out[0], out[1])  # the clients really differ


def test_unet_init_params_unchanged_and_features():
  cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=2, groups=2, num_classes=3))
  apply, params = init_params(cfg, 0)
  direct = UNet(in_channels=1, num_classes=3, width=4, depth=2, groups=2, rngs=nnx.Rngs(0))
  ref = nnx.to_pure_dict(nnx.split(direct, nnx.Param)[1])
  assert _key_paths(params) == _key_paths(ref)
  for path, leaf in _paths(ref).items():
    np.testing.assert_array_equal(_paths(params)[path], leaf)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  apply2, apply_f, params2 = init_model(cfg, 0)
  graphdef = nnx.split(direct, nnx.Param)[0]

  @jax.jit
  def run(p, q, x):  # direct UNet call on the reference params vs the pure functions
    return nnx.merge(graphdef, nnx.State(q))(x), apply(p, x), apply2(p, x), apply_f(p, x)

  ref_logits, logits, logits2, (logits3, feats) = run(params, ref, x)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(logits2, logits)
  np.testing.assert_allclose(logits3, logits, rtol=1e-6, atol=1e-6)
  assert feats.shape == (2, 4, 4, 16)  # bottleneck: 16/2**depth, 2 * width * 2**(depth-1)
  mid = jax.jit(lambda p, x: nnx.merge(graphdef, nnx.State(p)).mid(x))
  pooled = x
  for i in range(2):  # recompute the bottleneck from the UNet's own submodules
    pooled = jax.jit(
      lambda p, x, i=i: nnx.max_pool(nnx.merge(graphdef, nnx.State(p)).enc[i](x), (2, 2), strides=(2, 2))
    )(params, pooled)
  np.testing.assert_allclose(feats, mid(params, pooled), rtol=1e-5, atol=1e-5)


def test_max_pool_2x2_matches_numpy_loop_with_ties():
  """UNet's pool: values and gradient equal a numpy loop in which the first maximum of each 2x2 window
  (row-major) takes the window's gradient, as XLA's select-and-scatter does, ties included (ReLU
  zeros, quantised values), also under vmap (clients)."""
  from fedkd.models.unet import max_pool_2x2

  x = np.maximum(np.round(np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 6, 4, 5))) * 2) / 2, 0)
  g = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 3, 2, 5)))
  want_y, want_dx = np.zeros_like(g), np.zeros_like(x)
  for idx in np.ndindex(g.shape):
    k, b, i, j, c = idx
    win = x[k, b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c]
    di, dj = np.unravel_index(np.argmax(win), (2, 2))  # argmax: the first maximum, row-major
    want_y[idx] = win[di, dj]
    want_dx[k, b, 2 * i + di, 2 * j + dj, c] = g[idx]
  y, vjp = jax.vjp(jax.vmap(max_pool_2x2), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), want_y)
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), want_dx)
  assert (want_y == 0).sum() > 5 and (want_dx != 0).sum() == g.size  # ties were there, one tap each


def test_unet_gradient_under_jit_equals_flax_max_pool(monkeypatch):
  """The whole UNet's jitted gradient with its pool equals the one with flax's ``nnx.max_pool``: under
  jit XLA fuses the pool input's producer (GroupNorm, ReLU) into several consumers, so a gradient mask
  built by comparing the input with the pooled maximum in the backward pass loses taps."""
  import fedkd.models.unet as unet_mod

  cfg = ml_collections.ConfigDict(dict(name="unet", width=8, depth=2, groups=8, num_classes=3))
  apply, params = init_params(cfg, 0)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), params)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  target = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))

  def grads():  # a new function each time: traced again under the current pool
    return jax.jit(jax.grad(lambda p, x: jnp.mean((apply(p, x) - target) ** 2), argnums=(0, 1)))(params, x)

  ours = grads()
  monkeypatch.setattr(unet_mod, "max_pool_2x2", lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2)))
  ref = grads()
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_the_groups_check_accepts_exactly_the_unets_flax_builds():
  """A UNet's GroupNorm takes min(groups, channels) groups at each level, so width 4 with the default 8 groups
  builds and trains; the config refused every width not divisible by groups. The check now agrees with flax's own
  GroupNorm, which refuses channels its groups do not divide, over a grid of widths, depths and groups."""
  from fedkd.config import unet_groups_problem

  for width in (1, 2, 3, 4, 6, 8, 12):
    for depth in (1, 2, 3):
      for groups in (1, 2, 3, 4, 8):
        try:
          UNet(width=width, depth=depth, groups=groups, rngs=nnx.Rngs(0))
          built = True
        except ValueError as e:
          assert "does not divide the number of channels" in str(e), e
          built = False
        assert (unet_groups_problem(width, depth, groups) is None) == built, (width, depth, groups)
