"""The algorithm zoo on the quickstart hospitals: client- and server-side methods, personalisation,
compression and dropout, side by side (docs/algorithms.md has the measured table and plots).

  python -m launch.sweep --config=configs/zoo.py --out=runs/zoo --parallel=2                  # 2 seeds
  python -m launch.sweep --config=configs/zoo.py --sweep=seeds=3,only=fedavg+fedbn --out=runs/zoo_bn

The config is the quickstart's (configs/quickstart.py: 4 hospitals + 1 unseen, small UNet, 64 px) with
50 rounds, evaluated every 10. Methods with the quickstart's Adam clients (learning rate 3e-3): fedavg,
fedavgm (server momentum 0.9), fedadam and fedyogi (server learning rate 1e-2, Reddi et al.'s b1, b2,
eps), fedprox (mu 0.01), moon (mu 1, tau 0.5), fedbn, ditto (lambda 0.1; training sites evaluated with
the personal models), int8 (8-bit stochastic uploads), topk10 / topk1 (10 % / 1 % of each tensor, error
feedback) and dropout30 (each sampled client fails to report with probability 0.3). Methods whose update
assumes plain SGD steps run with SGD clients (learning rate 0.2) and heterogeneous local work (1-4 steps
per client and round): fedavg_sgd (their baseline), fednova, scaffold.
"""

from fedkd.config import parse_arg, sibling_config

ADAM = {
  "fedavg": {},
  "fedavgm": {"server_optimizer.momentum": 0.9},
  "fedadam": {"server_optimizer.name": "adam", "server_optimizer.learning_rate": 1e-2},
  "fedyogi": {"server_optimizer.name": "yogi", "server_optimizer.learning_rate": 1e-2},
  "fedprox": {"algorithm.name": "fedprox", "algorithm.prox_mu": 0.01},
  "moon": {"algorithm.name": "moon"},
  "fedbn": {"algorithm.name": "fedbn"},
  "ditto": {"algorithm.name": "ditto", "algorithm.ditto_lambda": 0.1},
  "int8": {"compress.name": "int8"},
  "topk10": {"compress.name": "topk", "compress.fraction": 0.1},
  "topk1": {"compress.name": "topk", "compress.fraction": 0.01},
  "dropout30": {"algorithm.dropout": 0.3},
}
SGD = {"client_optimizer.name": "sgd", "client_optimizer.learning_rate": 0.2, "algorithm.local_steps_min": 1}
PLAIN_SGD = {
  "fedavg_sgd": {},
  "fednova": {"algorithm.name": "fednova"},
  "scaffold": {"algorithm.name": "scaffold"},
}
METHODS = {**ADAM, **{k: {**SGD, **v} for k, v in PLAIN_SGD.items()}}


def get_config(arg=None):
  parse_arg(arg, {}, __file__)  # no variants (errors name this file, not quickstart.py)
  c = sibling_config(__file__, "quickstart.py").build()
  c.num_rounds = 50
  c.eval.every = 10
  return c


def get_sweep(arg=None):
  """arg (comma list): ``seeds=N`` (default 2), ``only=a+b+...`` (a subset of the methods), ``tiny``
  (seconds-long smoke runs)."""
  from fedkd.config import FLAG, SEEDS, ArgValue
  from fedkd.sweep import TINY, product

  def methods_of(v: str) -> list[str]:
    names = v.split("+")
    if any(m not in METHODS for m in names):
      raise ValueError(v)
    return list(dict.fromkeys(names))

  only_arg = ArgValue("a+b", methods_of, f"give methods joined by '+' from {', '.join(METHODS)}")
  a = parse_arg(arg, {"seeds": SEEDS, "only": only_arg, "tiny": FLAG}, __file__, "sweep")
  tiny = a.get("tiny", False)
  only = a.get("only", list(METHODS))
  seeds = range(a.get("seeds", 2))
  methods = [{"method": m, **METHODS[m]} for m in only]
  sweep = product(product(seed=list(seeds)), methods)
  return product(sweep, [TINY]) if tiny else sweep
