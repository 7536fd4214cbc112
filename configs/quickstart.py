"""Quickstart: 4 simulated hospitals + 1 unseen, FedAvg, small UNet, 64px synthetic X-rays.

About 2 minutes on 2 idle CPU cores (150 rounds x 4 clients x 4 local steps x batch 8):
  python -m fedkd.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

from fedkd.config import base_config, parse_arg


def get_config(arg=None):
  parse_arg(arg, {}, __file__)  # no variants: override keys with --config.KEY=VALUE
  return build()


def build():
  """The quickstart config (configs/robust.py and configs/zoo.py build on it)."""
  c = base_config()
  c.num_rounds = 150
  c.num_clients = 4
  c.clients_per_round = 4
  c.local_steps = 4
  c.batch_size = 8
  c.image_size = 64
  c.model.width = 8
  c.model.depth = 3
  c.model.groups = 4
  c.client_optimizer.learning_rate = 3e-3
  c.eval.every = 25
  c.eval.examples_per_site = 32
  c.checkpoint.every = 25
  return c


def get_sweep(arg=None):
  """FedAvg vs FedAvgM (server momentum 0.9) x seeds, for ``python -m launch.sweep``:

    python -m launch.sweep --config=configs/quickstart.py --out=runs/sweep_qs --parallel=2
    python -m launch.sweep --config=configs/quickstart.py --sweep=seeds=5 --out=runs/sweep_qs5
    python -m launch.sweep --config=configs/quickstart.py --sweep=tiny --out=/tmp/sweep_tiny  # seconds/run
    python -m launch.sweep --config=configs/quickstart.py --sweep=lr_grid --out=runs/lr --replicas

  arg (comma list): ``seeds=N`` (default 2), ``tiny`` (2 rounds of a 4-channel UNet on 32px: a
  smoke test, not a result), ``lr_grid`` (FedAvg only, client learning rate 1e-3 / 3e-3 / 1e-2 x seeds:
  with ``--replicas`` the whole grid is one compiled program). The "method" key is a label for tables
  and plots, not a config key. Seeds vary slowest, so the first runs already compare both methods.
  """
  from fedkd.config import FLAG, SEEDS
  from fedkd.sweep import TINY, product

  a = parse_arg(arg, {"seeds": SEEDS, "tiny": FLAG, "lr_grid": FLAG}, __file__, "sweep")
  tiny = a.get("tiny", False)
  lr_grid = a.get("lr_grid", False)
  seeds = range(a.get("seeds", 2))
  if lr_grid:
    sweep = product(product(seed=list(seeds)), product(**{"client_optimizer.learning_rate": [1e-3, 3e-3, 1e-2]}))
    return product(sweep, [TINY]) if tiny else sweep
  methods = [
    {"method": "fedavg", "server_optimizer.name": "sgd", "server_optimizer.momentum": 0.0},
    {
      "method": "fedavgm",
      "server_optimizer.name": "sgd",
      "server_optimizer.momentum": 0.9,
      "server_optimizer.learning_rate": 1.0,
    },
  ]
  sweep = product(product(seed=list(seeds)), methods)
  return product(sweep, [TINY]) if tiny else sweep
