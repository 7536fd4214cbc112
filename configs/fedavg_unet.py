"""FedAvg UNet on synthetic hospitals. Variants via the config argument, big_vision style:

  --config=configs/fedavg_unet.py                       # 16 clients, 128px, sized for one GPU
  --config=configs/fedavg_unet.py:runlocal              # laptop-sized (2 CPU cores, a few minutes)
  --config=configs/fedavg_unet.py:clients=64,per_round=16,skew=0.5
Any key can still be overridden with --config.KEY=VALUE.
"""

from fedkd.config import FLAG, SEEDS, base_config, parse_arg, real_number, whole_number

ARGS = {"runlocal": FLAG, "clients": whole_number(1), "per_round": whole_number(1), "skew": real_number(0.0)}
SWEEP_ARGS = {"seeds": SEEDS, "fedavgm": FLAG, "tiny": FLAG}


def get_config(arg=None):
  a = parse_arg(arg, ARGS, __file__)
  c = base_config()
  c.num_rounds = 200
  c.num_clients = 16
  c.clients_per_round = 16
  c.local_steps = 4
  c.batch_size = 8
  c.image_size = 128
  c.model.width = 32
  c.model.depth = 4
  c.eval.every = 20
  c.checkpoint.every = 20
  if a.get("runlocal", False):
    c.num_rounds = 20
    c.num_clients = 4
    c.clients_per_round = 4
    c.local_steps = 2
    c.image_size = 64
    c.model.width = 8
    c.model.depth = 3
    c.model.groups = 4
    c.eval.every = 5
    c.checkpoint.every = 5
  if "clients" in a:
    c.num_clients = a["clients"]
    c.clients_per_round = min(c.clients_per_round, c.num_clients)
  c.clients_per_round = a.get("per_round", c.clients_per_round)
  c.quantity_skew = a.get("skew", c.quantity_skew)
  return c


def get_sweep(arg=None):
  """FedAvg under unequal client dataset sizes: quantity_skew x seeds, for ``python -m launch.sweep``:

    python -m launch.sweep --config=configs/fedavg_unet.py:runlocal --out=runs/skew --parallel=2
    python -m launch.sweep --config=configs/fedavg_unet.py --sweep=fedavgm,seeds=5 --out=runs/skew_gpu

  arg (comma list): ``seeds=N`` (default 3), ``fedavgm`` (also run server momentum 0.9),
  ``tiny`` (2-round smoke test). Results get a ``vs_quantity_skew.png`` plot (Dice vs skew).
  The "method" key is a label for tables and plots, not a config key.
  """
  from fedkd.sweep import TINY, product

  a = parse_arg(arg, SWEEP_ARGS, __file__, "sweep")
  tiny = a.get("tiny", False)
  with_momentum = a.get("fedavgm", False)
  seeds = range(a.get("seeds", 3))
  methods = [{"method": "fedavg", "server_optimizer.momentum": 0.0}]
  if with_momentum:
    methods.append({"method": "fedavgm", "server_optimizer.momentum": 0.9})
  sweep = product(product(seed=list(seeds)), methods, quantity_skew=[0.0, 0.5, 1.0])
  return product(sweep, [TINY]) if tiny else sweep
