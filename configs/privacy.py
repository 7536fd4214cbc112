"""Dice vs privacy: user-level DP-FedAvg at cross-device scale (configs/cross_device.py: 10,000 registered
clients, 32 sampled per round, 60 rounds, 64 px), FedAvg with server momentum 0.9 on the noised mean.

  python -m launch.sweep --config=configs/privacy.py --out=runs/privacy --parallel=2

Each client's update is clipped to L2 norm 0.3 (the median update norm, `dp/median_norm` in rounds.jsonl,
was 0.68, 0.43 and 0.31 in rounds 1-3 of an unclipped run); the sweep runs noise multipliers 0 (clipping
only: no privacy, epsilon
infinite), 0.7, 1.0 and 2.0, which spend epsilon about 14, 5.2 and 0.84 at delta 1e-5 over the 60 rounds
(fedkd.fl.dp.epsilon; docs/algorithms.md has the measured curve).

arg: as configs/cross_device.py (``clients=N``, ``per_round=K``, ``rounds=R``; FedAvg keeps no per-client
state, so there is no ``device``).
"""

from fedkd.config import parse_arg, sibling_config


def get_config(arg=None):
  cross_device = sibling_config(__file__, "cross_device.py")
  args = {k: v for k, v in cross_device.ARGS.items() if k != "device"}  # no per-client state to place
  c = cross_device.build(parse_arg(arg, args, __file__))  # errors name this file
  c.algorithm.name = "fedavg"  # DP-FedAvg wraps uploads that are plain deltas
  c.algorithm.client_state = "device"  # the default: FedAvg has no rows (cross_device places SCAFFOLD's)
  c.dp.enabled = True
  c.dp.clip_norm = 0.3
  c.dp.noise_multiplier = 1.0
  c.dp.delta = 1e-5
  return c


def get_sweep(arg=None):
  """arg (comma list): ``seeds=N`` (default 2), ``tiny`` (seconds-long smoke runs)."""
  from fedkd.config import FLAG, SEEDS
  from fedkd.sweep import TINY, product

  a = parse_arg(arg, {"seeds": SEEDS, "tiny": FLAG}, __file__, "sweep")
  tiny = a.get("tiny", False)
  seeds = range(a.get("seeds", 2))
  noise = [{"method": f"z={z:g}", "dp.noise_multiplier": z} for z in (0.0, 0.7, 1.0, 2.0)]
  sweep = product(product(seed=list(seeds)), noise)
  return product(sweep, [TINY]) if tiny else sweep
