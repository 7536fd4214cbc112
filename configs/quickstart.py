"""Quickstart: 4 simulated hospitals, FedAvg, small UNet, 64px synthetic X-rays; ~3-4 min on 2 CPU cores.

python -m fedkd.main --config=configs/quickstart.py --workdir=runs/quickstart
"""
from fedkd.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.num_rounds = 30
  c.num_clients = 4
  c.clients_per_round = 4
  c.local_steps = 2
  c.batch_size = 8
  c.image_size = 64
  c.model.width = 8
  c.model.depth = 3
  c.model.groups = 4
  c.client_optimizer.learning_rate = 3e-3
  c.eval.every = 10
  c.eval.examples_per_site = 32
  c.checkpoint.every = 10
  return c
