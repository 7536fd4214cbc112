"""Federated algorithms, each one small module against :mod:`fedkd.fl.algorithm`'s interface.

``make(name, ...)`` builds one by the name a config gives (``config.algorithm.name``); FedEFM's silo
update lives with the distillation code (:class:`fedkd.distill.fedefm.FedEFMSilo`). docs/algorithms.md
states each method's update, its config keys, its reference and its test.
"""

from __future__ import annotations

from fedkd.fl.algorithms.ditto import Ditto
from fedkd.fl.algorithms.fedavg import FedAvg
from fedkd.fl.algorithms.fedbn import FedBN
from fedkd.fl.algorithms.fednova import FedNova
from fedkd.fl.algorithms.fedprox import FedProx
from fedkd.fl.algorithms.moon import Moon
from fedkd.fl.algorithms.scaffold import WEIGHTINGS as SCAFFOLD_WEIGHTINGS
from fedkd.fl.algorithms.scaffold import Scaffold

ALGORITHMS = ("fedavg", "scaffold", "moon", "fedprox", "fednova", "fedbn", "ditto")


def make(
  name: str,
  server_tx,
  *,
  client_lr: float,
  num_clients: int,
  moon_mu: float = 1.0,
  moon_tau: float = 0.5,
  prox_mu: float = 0.01,
  scaffold_weighting: str = "uniform",
  ditto_lambda: float = 0.1,
):
  """The algorithm ``name`` (one of :data:`ALGORITHMS`) with the server optimizer ``server_tx``."""
  if name == "fedavg":
    return FedAvg(server_tx)
  if name == "scaffold":
    return Scaffold(server_tx, client_lr, num_clients, scaffold_weighting)
  if name == "moon":
    return Moon(server_tx, moon_mu, moon_tau)
  if name == "fedprox":
    return FedProx(server_tx, prox_mu)
  if name == "fednova":
    return FedNova(server_tx)
  if name == "fedbn":
    return FedBN(server_tx)
  if name == "ditto":
    return Ditto(server_tx, ditto_lambda)
  raise ValueError(f"unknown algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")


__all__ = [
  "ALGORITHMS",
  "SCAFFOLD_WEIGHTINGS",
  "Ditto",
  "FedAvg",
  "FedBN",
  "FedNova",
  "FedProx",
  "Moon",
  "Scaffold",
  "make",
]
