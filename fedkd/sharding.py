"""Device mesh over the 'clients' axis and placement of client-stacked arrays."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

CLIENTS = "clients"


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'clients' over the first ``num_devices`` devices (all when None)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"asked for {n} devices on the 'clients' axis but only {len(devices)} are visible")
  return jax.make_mesh((n,), (CLIENTS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def client_sharding(mesh) -> NamedSharding:
  """Leading axis split over 'clients', the rest replicated."""
  return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_clients(tree, mesh):
  """Places every leaf (leading axis = clients) split over the 'clients' axis."""
  return jax.device_put(tree, client_sharding(mesh))
