"""Per-client state of stateful federated algorithms (SCAFFOLD's control variates c_i), kept between
the rounds in which a client is sampled.

Every client owns one *row*: a pytree shaped like ``init_row`` (for SCAFFOLD: params-shaped zeros).
A client that was never sampled reads as ``init_row``. Two placements (``config.algorithm.client_state``)
with the same API:

``device`` (:class:`DeviceClientState`)
    One pytree with a leading axis of ``num_clients`` rows in accelerator memory, *replicated* on
    every device of the mesh (memory: num_clients x row bytes on each device). The sampled rows are
    gathered inside a jitted function straight into the round's client sharding, and written back
    with ``table.at[ids].set(rows)`` in a jitted function that donates the table, so the update
    happens in place (no second table); checkpoints save and restore it CHUNK_BYTES of rows at a time,
    also without a second table. A table larger than a device's memory (the allocator's limit on GPU /
    TPU, the host's memory over its devices on CPU) is refused with a ClientStateError naming the
    ``host`` placement. Good for up to a few thousand clients of a small model.

``host`` (:class:`HostClientState`)
    numpy rows in host memory, one per client that has ever been sampled (a dict client id -> row);
    only the sampled clients' rows travel to the devices each round (and back). Memory is
    proportional to the clients seen so far, not to ``num_clients``: 10,000 registered clients of
    which 2,000 were sampled cost 2,000 rows.

API (both): ``gather(ids)`` -> the rows of the round's sampled clients ``ids`` (all of them, in
order) as global arrays split over the 'clients' mesh axis, exactly like the round's data
(``sharding.shard_clients``; in a multi-process run each process places only its ``rows``);
``scatter(ids, new_rows, trained=None)`` stores the round's updated rows (global arrays as the round
function returns them; ``trained``: bool per id, False for a client whose row the round kept, one that did
not report or was left out as non-finite, which is then not counted as sampled while its row is still the
initial one); ``state_dict()`` / ``load_state_dict()`` for checkpoints; ``rows_held`` / ``nbytes``;
``host_row(cid)`` / ``was_sampled(cid)`` for evaluating a client's personal model.

The checkpoint format is the same for both placements: ``{"ids": int64 [n], "rows": row pytree with
a leading axis n}`` holding the clients that were ever sampled (sorted ids), so a checkpoint written
with one placement restores into the other with identical numbers.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedkd.errors import UserError
from fedkd.sharding import client_sharding, local_copy, replicate, replicated, shard_clients

Row = Any  # a pytree of arrays: one client's state

# The device placement saves and restores its table this many bytes of rows at a time, so a checkpoint
# costs at most this much extra device memory (per device), not a second table.
CHUNK_BYTES = 64 * 2**20


class ClientStateError(UserError, ValueError):
  """Bad client ids or rows for the client-state store; the message says what is wrong."""


def _as_ids(ids, num_clients: int, what: str = "round's ids") -> np.ndarray:
  """Validated 1-D int64 array of distinct client ids in [0, num_clients)."""
  a = np.asarray(ids)
  if a.ndim != 1:
    raise ClientStateError(f"client {what} must be a 1-D array, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    raise ClientStateError(f"client {what} must be integers, got dtype {a.dtype}")
  a = a.astype(np.int64)
  if a.size and (a.min() < 0 or a.max() >= num_clients):
    bad = int(a[(a < 0) | (a >= num_clients)][0])
    raise ClientStateError(
      f"client id {bad} is out of range: this run has num_clients={num_clients} (ids 0..{num_clients - 1})"
    )
  if len(np.unique(a)) != len(a):
    vals, counts = np.unique(a, return_counts=True)
    raise ClientStateError(
      f"client id {int(vals[counts > 1][0])} appears twice in the {what}; each client has exactly one row"
    )
  return a


def _host(tree):
  """numpy copy of a (possibly multi-process, client-sharded) global pytree, on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class _Store:
  """What both placements share: id and row checks, the checkpoint format. Subclasses add gather,
  scatter, state_dict, load_state_dict, rows_held, nbytes (bytes of rows held: per device for
  'device', in host memory for 'host') and describe()."""

  placement = ""

  def __init__(self, init_row: Row, num_clients: int, mesh, rows: slice | None = None):
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
      raise ClientStateError(f"num_clients={num_clients!r} must be a positive integer")
    self.num_clients = int(num_clients)
    self.mesh = mesh
    self.rows = rows  # this process's rows of a round's client axis (multi-process); None = all
    # host copy, the value of unseen rows, in the dtypes JAX gives the rows on the devices (int64 / float64
    # become int32 / float32 unless jax_enable_x64 is set), so a round's updated rows match the store's
    self._init = jax.tree.map(lambda a: np.array(a, jax.dtypes.canonicalize_dtype(np.asarray(a).dtype)), init_row)
    self._leaves0, self._treedef = jax.tree.flatten(self._init)
    self.row_nbytes = int(sum(a.nbytes for a in self._leaves0))

  def _round_ids(self, ids) -> np.ndarray:
    ids = _as_ids(ids, self.num_clients)
    if len(ids) % self.mesh.size:
      raise ClientStateError(
        f"{len(ids)} client ids cannot be split over the {self.mesh.size} devices of the "
        "'clients' mesh axis; a round's clients are a multiple of the device count"
      )
    return ids

  def _check_rows(self, ids: np.ndarray, new_rows) -> list:
    leaves, treedef = jax.tree.flatten(new_rows)
    if treedef != self._treedef:
      raise ClientStateError(f"new rows have tree structure {treedef}, the store holds {self._treedef}")
    for a, ref in zip(leaves, self._leaves0):
      if tuple(a.shape) != (len(ids),) + ref.shape or a.dtype != ref.dtype:
        raise ClientStateError(
          f"new rows of shape {tuple(a.shape)} {a.dtype} do not match "
          f"{len(ids)} ids x row shape {ref.shape} {ref.dtype}"
        )
    return leaves

  def _check_state_dict(self, sd: dict) -> tuple[np.ndarray, list]:
    if not isinstance(sd, dict) or set(sd) != {"ids", "rows"}:
      raise ClientStateError("a client-state dict has exactly the keys 'ids' and 'rows'")
    ids = _as_ids(np.asarray(sd["ids"]), self.num_clients, "checkpoint ids")
    return ids, [np.asarray(a) for a in self._check_rows(ids, sd["rows"])]

  def empty_state_dict(self, num_rows: int) -> dict:
    """A zero-filled state dict of ``num_rows`` rows: the restore target of a checkpoint."""
    return {
      "ids": np.zeros((num_rows,), np.int64),
      "rows": jax.tree.map(lambda a: np.zeros((num_rows,) + a.shape, a.dtype), self._init),
    }


class HostClientState(_Store):
  """Rows in host memory, one per client ever sampled; see the module docstring."""

  placement = "host"

  def __init__(self, init_row: Row, num_clients: int, mesh, rows: slice | None = None):
    super().__init__(init_row, num_clients, mesh, rows)
    self._rows: dict[int, list[np.ndarray]] = {}

  @property
  def rows_held(self) -> int:
    return len(self._rows)

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for leaves in self._rows.values() for a in leaves)

  def describe(self) -> str:
    return (
      f"on host, rows of sampled clients only: {self.rows_held} of {self.num_clients} held, "
      f"{self.nbytes / 2**20:.1f} MiB at {self.row_nbytes / 2**10:.1f} KiB per row"
    )

  def host_rows(self, ids) -> Row:
    """The rows of ``ids`` as a host pytree with a leading axis len(ids) (unseen ids: the initial row)."""
    ids = _as_ids(ids, self.num_clients)
    stacked = [np.empty((len(ids),) + a.shape, a.dtype) for a in self._leaves0]
    for i, cid in enumerate(ids.tolist()):
      for out, a in zip(stacked, self._rows.get(cid, self._leaves0)):
        out[i] = a
    return jax.tree.unflatten(self._treedef, stacked)

  def host_row(self, cid: int) -> Row:
    """Client ``cid``'s row as a host pytree (its initial row if never sampled)."""
    return jax.tree.map(lambda a: a[0], self.host_rows([cid]))

  def was_sampled(self, cid: int) -> bool:
    """Whether client ``cid`` has a stored row (was sampled in a round of this run or of the one it resumes)."""
    return int(cid) in self._rows

  def gather(self, ids) -> Row:
    ids = self._round_ids(ids)
    local = ids[self.rows] if self.rows is not None else ids
    return shard_clients(self.host_rows(local), self.mesh, self.rows)

  def scatter(self, ids, new_rows, trained=None) -> None:
    ids = _as_ids(ids, self.num_clients)
    self._check_rows(ids, new_rows)
    leaves = jax.tree.leaves(_host(new_rows))  # every process keeps every sampled row
    for i, cid in enumerate(ids.tolist()):
      if trained is not None and not trained[i] and cid not in self._rows:
        continue  # its row is still the initial one: the client is not counted as sampled
      # copies, so a stored row does not keep the whole round's array alive
      self._rows[cid] = [np.array(a[i]) for a in leaves]

  def state_dict(self) -> dict:
    ids = np.array(sorted(self._rows), np.int64)
    return {"ids": ids, "rows": self.host_rows(ids)}

  def load_state_dict(self, sd: dict) -> None:
    ids, leaves = self._check_state_dict(sd)
    self._rows = {cid: [np.array(a[i]) for a in leaves] for i, cid in enumerate(ids.tolist())}


def _memory_per_device(mesh) -> int | None:
  """Bytes one device of ``mesh`` can hold: the allocator's limit on GPU / TPU; on CPU the host's physical
  memory over this process's devices of the mesh (each holds its own copy of a replicated array). None
  when unknown."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  try:
    stats = local[0].memory_stats()
  except Exception:  # noqa: BLE001 (a backend without memory statistics)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if local[0].platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(local)
    except (ValueError, OSError, AttributeError):
      return None
  return None


class DeviceClientState(_Store):
  """All ``num_clients`` rows in device memory, replicated on the mesh; see the module docstring."""

  placement = "device"

  def __init__(self, init_row: Row, num_clients: int, mesh, rows: slice | None = None):
    super().__init__(init_row, num_clients, mesh, rows)
    n = self.num_clients
    rep, split = replicated(mesh), client_sharding(mesh)
    self._fill = jax.jit(
      lambda row: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), row), out_shardings=rep
    )
    self._gather = jax.jit(lambda table, ids: jax.tree.map(lambda t: t[ids], table), out_shardings=split)
    self._gather_rep = jax.jit(lambda table, ids: jax.tree.map(lambda t: t[ids], table), out_shardings=rep)
    self._scatter = jax.jit(
      lambda table, ids, new: jax.tree.map(lambda t, r: t.at[ids].set(r, unique_indices=True), table, new),
      out_shardings=rep,
      donate_argnums=0,
    )
    # every leaf set to the initial row, in place (the table is donated and kept as an argument, so its
    # buffer is reused for the result)
    self._reset = jax.jit(
      lambda table, row: jax.tree.map(lambda t, r: jnp.broadcast_to(r, t.shape), table, row),
      out_shardings=rep,
      donate_argnums=0,
      keep_unused=True,
    )
    self._seen = np.zeros(n, bool)  # host bookkeeping of sampled clients (for compact checkpoints)
    limit = _memory_per_device(mesh)
    if limit is not None and self.nbytes > limit:
      raise ClientStateError(self._too_big(f"more than a device holds ({limit / 2**30:.1f} GiB)"))
    try:  # waited for: an allocation the backend refuses shows here, not in the first round
      self.table = jax.block_until_ready(self._fill(replicate(self._init, mesh)))
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise ClientStateError(self._too_big("more than the devices have free")) from None

  def _too_big(self, why: str) -> str:
    return (
      f"config.algorithm.client_state='device' keeps the rows of all {self.num_clients} clients on each of the "
      f"{self.mesh.size} device(s) of the mesh: {self.nbytes / 2**30:.1f} GiB per device "
      f"({self.row_nbytes / 2**10:.1f} KiB per row), {why}; use --config.algorithm.client_state=host (the rows "
      "of the clients sampled so far, in host memory) or fewer clients"
    )

  def _chunk(self, n: int) -> int:
    """Rows per step when ``n`` rows travel between the table and the host: at most CHUNK_BYTES of them,
    a power of two below that (few distinct programs)."""
    most = max(1, CHUNK_BYTES // max(self.row_nbytes, 1))
    return min(most, 1 << max(n - 1, 0).bit_length())

  @property
  def rows_held(self) -> int:
    return self.num_clients

  @property
  def nbytes(self) -> int:
    return self.num_clients * self.row_nbytes

  def describe(self) -> str:
    return (
      f"on device, all {self.num_clients} rows replicated on each of {self.mesh.size} device(s): "
      f"{self.nbytes / 2**20:.1f} MiB per device, {int(self._seen.sum())} clients sampled so far"
    )

  def _ids(self, ids: np.ndarray):
    return replicate(ids.astype(np.int32), self.mesh)

  def gather(self, ids) -> Row:
    ids = self._round_ids(ids)
    return self._gather(self.table, self._ids(ids))

  def host_row(self, cid: int) -> Row:
    """Client ``cid``'s row as a host pytree (its initial row if never sampled)."""
    ids = _as_ids([cid], self.num_clients)
    return jax.tree.map(lambda a: np.asarray(a)[0], local_copy(self._gather_rep(self.table, self._ids(ids))))

  def was_sampled(self, cid: int) -> bool:
    """Whether client ``cid``'s row was ever stored (sampled in a round of this run or of the one it resumes)."""
    return bool(self._seen[int(cid)])

  def scatter(self, ids, new_rows, trained=None) -> None:
    ids = _as_ids(ids, self.num_clients)
    self._check_rows(ids, new_rows)
    self.table = self._scatter(self.table, self._ids(ids), new_rows)
    self._seen[ids if trained is None else ids[np.asarray(trained, bool)]] = True

  def state_dict(self) -> dict:
    ids = np.flatnonzero(self._seen).astype(np.int64)
    out = [np.empty((len(ids),) + a.shape, a.dtype) for a in self._leaves0]
    k = self._chunk(len(ids))
    for start in range(0, len(ids), k):  # a chunk of rows at a time: no second table on the devices
      part = ids[start : start + k]
      padded = np.concatenate([part, np.full(k - len(part), part[0])])  # every chunk k rows: one program
      rows = local_copy(self._gather_rep(self.table, self._ids(padded)))
      for o, a in zip(out, jax.tree.leaves(rows)):
        o[start : start + len(part)] = np.asarray(a)[: len(part)]
    return {"ids": ids, "rows": jax.tree.unflatten(self._treedef, out)}

  def load_state_dict(self, sd: dict) -> None:
    ids, leaves = self._check_state_dict(sd)
    # the table reset and refilled in place, a chunk of rows at a time: no second table on the devices
    self.table = self._reset(self.table, replicate(self._init, self.mesh))
    k = self._chunk(len(ids))
    for start in range(0, len(ids), k):
      part = slice(start, start + k)
      rows = replicate(jax.tree.unflatten(self._treedef, [a[part] for a in leaves]), self.mesh)
      self.table = self._scatter(self.table, self._ids(ids[part]), rows)
    self._seen = np.zeros(self.num_clients, bool)
    self._seen[ids] = True


PLACEMENTS = {"device": DeviceClientState, "host": HostClientState}


def make_client_state(placement: str, init_row: Row, num_clients: int, mesh, rows: slice | None = None):
  """The store for ``config.algorithm.client_state`` = ``placement`` ('device' | 'host')."""
  if placement not in PLACEMENTS:
    raise ClientStateError(f"unknown client-state placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
  return PLACEMENTS[placement](init_row, num_clients, mesh, rows)
