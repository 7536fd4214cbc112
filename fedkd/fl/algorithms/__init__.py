"""Federated algorithms, each one small module against :mod:`fedkd.fl.algorithm`'s interface.

``make(name, ...)`` builds one by the name a config gives (``config.algorithm.name``); FedEFM's silo
update lives with the distillation code (:class:`fedkd.distill.fedefm.FedEFMSilo`).
"""

from __future__ import annotations

from fedkd.fl.algorithms.fedavg import FedAvg
from fedkd.fl.algorithms.moon import Moon
from fedkd.fl.algorithms.scaffold import Scaffold

ALGORITHMS = ("fedavg", "scaffold", "moon")


def make(name: str, server_tx, *, client_lr: float, num_clients: int, moon_mu: float = 1.0, moon_tau: float = 0.5):
  """The algorithm ``name`` (one of :data:`ALGORITHMS`) with the server optimizer ``server_tx``."""
  if name == "fedavg":
    return FedAvg(server_tx)
  if name == "scaffold":
    return Scaffold(server_tx, client_lr, num_clients)
  if name == "moon":
    return Moon(server_tx, moon_mu, moon_tau)
  raise ValueError(f"unknown algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")


__all__ = ["ALGORITHMS", "FedAvg", "Moon", "Scaffold", "make"]
