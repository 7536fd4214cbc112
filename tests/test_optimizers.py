"""adamw's weight decay is the config's: ``client_optimizer.weight_decay`` / ``server_optimizer.weight_decay``
and FedEFM's silo AdamW ``pretrain.weight_decay``, against a numpy AdamW loop (Loshchilov & Hutter 2019,
decoupled decay times the learning rate, as optax applies it), 0 = plain Adam, a config written before the key
existed keeps optax's default; bad values and keys that adam / sgd never read are named."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from fedkd import config as config_lib
from fedkd.config import ConfigError
from fedkd.fl import engine

P0 = {"w": np.array([[0.5, -1.5], [2.0, 0.25]], np.float32), "b": np.array([-0.75, 3.0], np.float32)}
GRADS = [
  {"w": np.array([[0.1, -0.2], [0.3, 0.05]], np.float32), "b": np.array([0.4, -0.1], np.float32)},
  {"w": np.array([[-0.3, 0.1], [0.2, -0.6]], np.float32), "b": np.array([0.05, 0.2], np.float32)},
  {"w": np.array([[0.2, 0.2], [-0.1, 0.1]], np.float32), "b": np.array([-0.3, 0.7], np.float32)},
]


def _adamw_np(lr, wd, b1, b2, eps):
  """Three AdamW steps in float64: p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)."""
  p = {k: v.astype(np.float64) for k, v in P0.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(GRADS, start=1):
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k].astype(np.float64) ** 2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
  return p


def _steps(tx):
  p = jax.tree.map(np.asarray, P0)
  state = tx.init(p)
  for g in GRADS:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: np.asarray(a + u), p, updates)
  return p


def _close(a, b):
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("wd", [0.05, 0.0])
def test_client_adamw_applies_the_configured_weight_decay(wd):
  c = config_lib.base_config().client_optimizer
  c.name, c.learning_rate, c.weight_decay = "adamw", 0.1, wd
  got = _steps(engine.make_optimizer(c))
  _close(got, _adamw_np(0.1, wd, 0.9, 0.999, 1e-8))  # the client config leaves b1 / b2 / eps to optax
  # the decay acted (or, at 0, did not): the run with optax's default decay ends elsewhere
  other = _adamw_np(0.1, 1e-4 if wd else 0.05, 0.9, 0.999, 1e-8)
  assert max(np.abs(got[k] - other[k]).max() for k in got) > 1e-4


def test_server_adamw_uses_its_own_moments_and_decay():
  c = config_lib.base_config().server_optimizer
  c.name, c.learning_rate, c.weight_decay = "adamw", 0.5, 0.2
  _close(_steps(engine.make_optimizer(c)), _adamw_np(0.5, 0.2, c.b1, c.b2, c.eps))


def test_a_config_written_before_the_key_keeps_optaxs_default_decay():
  old = ml_collections.ConfigDict(dict(name="adamw", learning_rate=0.1, momentum=0.0))
  _close(_steps(engine.make_optimizer(old)), _adamw_np(0.1, 1e-4, 0.9, 0.999, 1e-8))
  # which is also the schema's default, so such a run resumes with the same optimizer
  assert config_lib.base_config().client_optimizer.weight_decay == 1e-4


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan])
@pytest.mark.parametrize("name", ["client_optimizer", "server_optimizer"])
def test_a_bad_weight_decay_is_a_config_error_naming_the_key(name, value):
  c = config_lib.base_config()
  c[name].name, c[name].weight_decay = "adamw", value  # read by adamw only (range-checked where read)
  with pytest.raises(ConfigError, match=rf"config\.{name}\.weight_decay=\S+ .*(finite|>= 0)"):
    config_lib.validate(c, 8)


def test_weight_decay_is_noted_unused_unless_the_optimizer_is_adamw():
  c = config_lib.base_config()
  unused = config_lib.unused_keys(c)
  assert "not 'adamw'" in unused["client_optimizer.weight_decay"]
  assert "not 'adamw'" in unused["server_optimizer.weight_decay"]
  c.client_optimizer.name = c.server_optimizer.name = "adamw"
  unused = config_lib.unused_keys(c)
  assert "client_optimizer.weight_decay" not in unused and "server_optimizer.weight_decay" not in unused


@pytest.mark.parametrize("wd", [0.05, 0.0])
def test_fedefm_silo_adamw_applies_the_configured_weight_decay(wd, tmp_path):
  """The pretraining round's silo optimizer (built from the round's traced hyperparameters) is AdamW with
  ``pretrain.learning_rate`` and ``pretrain.weight_decay``, optax's b1 / b2 / eps."""
  from fedkd.tasks import fedefm as task
  from test_fedefm import _tiny

  c = _tiny().get_config("tiny")
  c.pretrain.learning_rate, c.pretrain.weight_decay = 0.1, wd
  exp = task.Experiment(c, str(tmp_path), log=lambda _: None)
  exp.build_models()
  _, ctx = exp._program("fedefm", True)[1](exp.hparams())
  _close(_steps(ctx.tx), _adamw_np(0.1, wd, 0.9, 0.999, 1e-8))


def test_fedefm_workdirs_written_before_the_key_ran_with_optaxs_default_decay():
  """A saved config without ``pretrain.weight_decay`` matches a config at optax's default 1e-4 (its runs
  continue, its results stay tabulated), and no other value."""
  from fedkd.tasks import fedefm as task
  from test_fedefm import _tiny

  current = json.loads(json.dumps(_tiny().get_config("tiny").to_dict()))
  old = json.loads(json.dumps(current))
  del old["pretrain"]["weight_decay"]
  assert current["pretrain"]["weight_decay"] == 1e-4 and task.config_difference(old, current) is None
  current["pretrain"]["weight_decay"] = 0.05
  assert task.config_difference(old, current) == (
    "config.pretrain.weight_decay differs: written before the key existed, it ran as 0.0001 "
    "(--config.pretrain.weight_decay=0.0001)"
  )
  assert "weight_decay" not in old["pretrain"]  # the saved config itself is not changed


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan])
def test_a_bad_fedefm_weight_decay_is_a_config_error_naming_the_key(value):
  from test_fedefm import _tiny

  c = _tiny().get_config("tiny")
  c.pretrain.weight_decay = value
  with pytest.raises(ConfigError, match=r"config\.pretrain\.weight_decay=\S+ .*(finite|>= 0)"):
    config_lib.validate_fedefm(c, 8)
