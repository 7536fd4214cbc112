"""Device mesh over the 'clients' axis and placement of client-stacked arrays.

Works single- and multi-process: in a multi-process run each process supplies only the rows of the
client axis that live on its devices (``local_rows``), and global arrays are assembled with
``jax.make_array_from_callback``.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

CLIENTS = "clients"


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'clients' over the first ``num_devices`` devices (all when None); with several processes,
  the first ``num_devices / process count`` devices of each process (every process drives part of the round)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"asked for {n} devices on the 'clients' axis but only {len(devices)} are visible")
  processes = jax.process_count()
  if processes > 1 and n < len(devices):
    if n % processes:
      raise ValueError(f"{n} devices on the 'clients' axis cannot be spread evenly over {processes} processes")
    own: dict[int, list] = {}
    for d in devices:
      own.setdefault(d.process_index, []).append(d)
    devices = [d for p in sorted(own) for d in own[p][: n // processes]]
  return jax.make_mesh((n,), (CLIENTS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def client_sharding(mesh) -> NamedSharding:
  """Leading axis split over 'clients', the rest replicated."""
  return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_rows(mesh, num_clients: int) -> slice:
  """The contiguous rows of a [num_clients, ...] client-sharded array held by this process."""
  idx = client_sharding(mesh).addressable_devices_indices_map((num_clients,))
  starts = [i[0].start or 0 for i in idx.values()]
  stops = [num_clients if i[0].stop is None else i[0].stop for i in idx.values()]
  return slice(min(starts), max(stops))


def shard_clients(tree, mesh, rows: slice | None = None):
  """Places every leaf (leading axis = clients) split over the 'clients' axis.

  Single process: ``tree`` holds all clients. Multi-process: ``tree`` holds only ``rows`` (this
  process's rows, from :func:`local_rows`) and ``num_clients`` is inferred from the mesh split.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, client_sharding(mesh))
  sharding = client_sharding(mesh)

  def place(x):
    x = np.asarray(x)
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    n = x.shape[0] * mesh.size // n_local
    start = rows.start if rows is not None else 0
    return jax.make_array_from_callback(
      (n,) + x.shape[1:], sharding, lambda idx: x[(slice(idx[0].start - start, idx[0].stop - start),) + tuple(idx[1:])]
    )

  return jax.tree.map(place, tree)


def replicate(tree, mesh):
  """Places a host/local pytree fully replicated on the mesh (every process passes the same values)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated(mesh))
  sharding = replicated(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree
  )


def local_copy(tree):
  """A process-local (single-device) copy of a fully replicated pytree, for host-side work."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: a.addressable_data(0), tree)
