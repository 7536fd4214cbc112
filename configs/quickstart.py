"""Quickstart: 4 simulated hospitals + 1 unseen, FedAvg, small UNet, 64px synthetic X-rays.

About 2 minutes on 2 CPU cores (150 rounds x 4 clients x 4 local steps x batch 8):
  python -m fedkd.main --config=configs/quickstart.py --workdir=runs/quickstart
"""
from fedkd.config import base_config


def get_config(arg=None):
  del arg
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
