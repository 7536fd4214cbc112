"""Cross-device scale: 10,000 registered clients, 32 sampled per round, SCAFFOLD with per-client control
variates kept on the host (only the clients ever sampled cost memory), 64px synthetic X-rays.

Client k is a mild perturbation of one of the 5 base hospitals; evaluation covers the 5 base
hospitals (eval.max_sites) and the unseen one. About 2 minutes on 2 CPU cores (60 rounds of ~1.5 s;
1,753 clients sampled at least once, so the host keeps 1,753 control variates, ~200 MiB):
  python -m fedkd.main --config=configs/cross_device.py --workdir=runs/cross_device

arg (comma list, optional): ``clients=N`` (registered clients), ``per_round=K``, ``rounds=R``,
``device`` (client state in device memory instead: num_clients x model size on every device).
"""

from fedkd.config import ConfigError, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg)
  c = base_config()
  try:
    c.num_clients = int(a.pop("clients", 10_000))
    c.clients_per_round = int(a.pop("per_round", 32))
    c.num_rounds = int(a.pop("rounds", 60))
  except ValueError as e:
    raise ConfigError(f"bad config argument in {arg!r}: {e}") from None
  placement = "device" if a.pop("device", False) else "host"
  if a:
    raise ConfigError(
      f"unknown config argument(s) {sorted(a)} in {arg!r}; known: clients=N, per_round=K, rounds=R, device"
    )
  c.local_steps = 4
  c.batch_size = 2
  c.image_size = 64
  c.examples_per_client = 64  # small devices, unequal sizes (FedAvg / SCAFFOLD weights)
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
