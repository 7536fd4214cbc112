"""Cross-device scale: 10,000 registered clients, 32 sampled per round, SCAFFOLD with per-client control
variates kept on the host (only the clients ever sampled cost memory), 64px synthetic X-rays.

Client k is a mild perturbation of one of the 5 base hospitals; evaluation covers the 5 base
hospitals (eval.max_sites) and the unseen one. About 2.5 minutes on 2 CPU cores (60 rounds of ~1.8 s,
docs/engine.md; 1,753 clients sampled at least once, so the host keeps 1,753 control variates, ~200 MiB):
  python -m fedkd.main --config=configs/cross_device.py --workdir=runs/cross_device

arg (comma list, optional): ``clients=N`` (registered clients), ``per_round=K`` (default 32, at most N), ``rounds=R``,
``device`` (client state in device memory instead: num_clients x model size on every device).
"""

from fedkd.config import FLAG, base_config, parse_arg, whole_number

# also configs/privacy.py's arguments
ARGS = {"clients": whole_number(1), "per_round": whole_number(1), "rounds": whole_number(1), "device": FLAG}


def get_config(arg=None):
  return build(parse_arg(arg, ARGS, __file__))


def build(a: dict):
  """The config for the parsed arguments ``a`` (``fedkd.config.parse_arg(arg, ARGS, ...)``)."""
  c = base_config()
  c.num_clients = a.get("clients", 10_000)
  c.clients_per_round = a.get("per_round", min(32, c.num_clients))  # clients=8 alone: all 8 each round
  c.num_rounds = a.get("rounds", 60)
  placement = "device" if a.get("device", False) else "host"
  c.local_steps = 4
  c.batch_size = 2
  c.image_size = 64
  # small devices of unequal sizes: the weights of FedAvg's mean and of the logged loss (SCAFFOLD's default
  # algorithm.scaffold_weighting='uniform' averages the sampled clients' deltas unweighted)
  c.examples_per_client = 64
  c.quantity_skew = 0.5
  c.model.width = 8
  c.model.depth = 2
  c.model.groups = 4
  c.algorithm.name = "scaffold"
  c.algorithm.client_state = placement
  # SCAFFOLD's control-variate update assumes plain SGD steps on the clients.
  c.client_optimizer.name = "sgd"
  c.client_optimizer.learning_rate = 0.3
  c.server_optimizer.name = "sgd"
  c.server_optimizer.learning_rate = 1.0
  c.server_optimizer.momentum = 0.9
  # 32 clients on one CPU device: vmapped, convolutions as batched matrix multiplies over clients.
  # The unroll layout (the CPU default) runs a round ~2x faster but compiles 32 client copies for ~3
  # minutes; vmap with XLA's (grouped) convolutions is ~2x slower than gemm on XLA:CPU.
  c.engine.client_layout = "vmap"
  c.engine.conv_lowering = "gemm"
  c.eval.every = 20
  c.eval.examples_per_site = 32
  c.eval.max_sites = 5
  c.checkpoint.every = 20
  return c
