"""Robust aggregation under attack on the quickstart hospitals: one attacker client of 4 (25 %).

  python -m launch.sweep --config=configs/robust.py --out=runs/robust --parallel=2           # 3 seeds
  python -m launch.sweep --config=configs/robust.py --sweep=attack=sign_flip --out=runs/robust_flip

The config is the quickstart's (configs/quickstart.py) with 50 rounds; the sweep runs, per seed: FedAvg
without attackers (``clean``), FedAvg with the attacker (``mean``), and the attacked runs with each robust
aggregator (``median``, ``trimmed_mean`` with beta 0.25 = one client dropped at each end, ``krum`` with
f = 1). The attacker (client 0, round(0.2 x 4) = 1) sends its update scaled by -10 (``--sweep=attack=...``:
scale | sign_flip | gaussian). Alone, ``python -m fedkd.main --config=configs/robust.py`` trains the clean
baseline (attack.name 'none'); ``--config.attack.name=scale --config.aggregator.name=median`` is one attacked run.
"""

from fedkd.config import parse_arg, sibling_config


def get_config(arg=None):
  parse_arg(arg, {}, __file__)  # no variants (errors name this file, not quickstart.py)
  c = sibling_config(__file__, "quickstart.py").build()
  c.num_rounds = 50
  c.eval.every = 25
  c.attack.fraction = 0.2
  return c


def get_sweep(arg=None):
  """arg (comma list): ``seeds=N`` (default 3), ``attack=scale|sign_flip|gaussian`` (default scale),
  ``tiny`` (seconds-long smoke runs)."""
  from fedkd.config import FLAG, SEEDS, one_of
  from fedkd.sweep import TINY, product

  spec = {"seeds": SEEDS, "attack": one_of("scale", "sign_flip", "gaussian"), "tiny": FLAG}
  a = parse_arg(arg, spec, __file__, "sweep")
  tiny = a.get("tiny", False)
  attack = a.get("attack", "scale")
  seeds = range(a.get("seeds", 3))
  methods = [{"method": "clean", "attack.name": "none", "aggregator.name": "mean"}]
  for agg, extra in (
    ("mean", {}),
    ("median", {}),
    ("trimmed_mean", {"aggregator.trim_beta": 0.25}),
    ("krum", {"aggregator.krum_f": 1}),
  ):
    methods.append({"method": agg, "attack.name": attack, "aggregator.name": agg, **extra})
  sweep = product(product(seed=list(seeds)), methods)
  return product(sweep, [{**TINY, "num_clients": 4, "clients_per_round": 4}]) if tiny else sweep  # krum: f + 3
