"""fedkd.config is a leaf: it names engine/loss/algorithm/FedEFM choices as strings, and they stay in
step with the modules that implement them; loading it (or a config file) and validating a config of
either task imports no JAX."""

import sys

import procs

from fedkd import config, losses
from fedkd.data import silos, synth
from fedkd.distill import emd
from fedkd.fl import aggregate, algorithms, attacks, compress, engine, fedopt
from fedkd.tasks import fedefm


def test_config_names_match_the_implementations():
  assert config.CLIENT_LAYOUTS == ("auto",) + engine.LAYOUTS
  assert config.CONV_LOWERINGS == ("auto",) + engine.LOWERINGS
  assert set(config.LEGACY_PARALLELISM) == {""} | set(engine.LEGACY_PARALLELISM)
  assert set(config.LEGACY_CHUNK_STRATEGIES) == {""} | set(engine.LEGACY_CHUNK_STRATEGY)
  assert config.ALGORITHMS == algorithms.ALGORITHMS
  assert config.SCAFFOLD_WEIGHTINGS == algorithms.SCAFFOLD_WEIGHTINGS
  assert set(config.AGGREGATORS) == set(aggregate.KINDS) - {"gossip"}
  assert config.ATTACKS == ("none",) + attacks.ATTACKS
  assert set(config.ROBUST_ALGORITHMS) <= set(config.ALGORITHMS)
  assert config.SERVER_OPTIMIZERS == config.OPTIMIZERS + fedopt.KINDS
  assert config.LOSSES == tuple(losses.LOSSES)
  assert config.COMPRESSORS == ("none",) + tuple(compress.KINDS)
  assert config.SYNTHETIC_PHYSICS == synth.PHYSICS
  assert config.FEDEFM_METHODS == fedefm.METHODS
  assert config.EMD_MARGINALS == emd.MARGINALS
  assert config.EMD_WEIGHT_MODES == emd.WEIGHT_MODES
  assert config.FEDEFM_NUM_DATA_TYPES == len(silos.DATA_TYPES)


def test_loading_and_validating_the_configs_imports_no_jax():
  code = (
    "import sys, runpy\n"
    "import fedkd.config\n"
    "cfg = runpy.run_path('configs/quickstart.py')['get_config']()\n"
    "fedkd.config.validate(cfg, 1)\n"
    "efm = runpy.run_path('configs/fedefm.py')['get_config']('tiny')\n"
    "assert fedkd.config.validate_fedefm(efm, 1)['methods']\n"
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax') or m.startswith('fedkd.fl'))\n"
    "assert not bad, bad\n"
    "assert cfg.task == 'fedavg'\n"
  )
  r = procs.run([sys.executable, "-c", code], timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
