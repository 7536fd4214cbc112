"""Communication topologies for decentralised (gossip) federated learning.

Conventions
-----------
* A **mixing matrix** W is numpy float32 [N, N]; row i holds the weights silo i gives to every silo
  j's model, so one gossip round is  x_i <- sum_j W_ij x_j  (``fedkd.fl.aggregate.mix``). Rows sum to 1; the
  matrices built here are also column-stochastic (doubly stochastic) wherever the topology allows,
  which makes gossip preserve the average model.
* An **adjacency** A is float32 [N, N] with A[i, j] != 0 iff silo i receives from silo j (j is an
  in-neighbour of i; the link j -> i), the same row convention as W; undirected graphs are
  symmetric. Rows are receivers: in-degree = row sum, out-degree = column sum. The diagonal is
  ignored by the graph helpers.

Topologies: ``star`` (client-server FedAvg), ``ring`` (undirected or directed), ``complete``,
``metropolis_hastings`` (for any undirected graph; it symmetrises a directed one), ``matcha`` (random
matchings of a base graph) and graphs read from text / JSON files (``from_file``, directed files kept
directed). Directed graphs: ``directed_mixing`` picks Metropolis-Hastings (undirected), a doubly
stochastic ``balanced_mixing`` (in-degree == out-degree, e.g. the directed Gaia ring) or push-sum
(``push_sum_matrix``, column-stochastic, used through ``push_sum_round``) for unbalanced digraphs,
after ``check_strongly_connected``. ``neighbours`` / ``neighbour_table`` give the in-neighbour lists
(the silos each silo receives from), the latter padded to fixed shape for use inside ``jax.jit``.

The Gaia network: FedEFM runs 11 silos placed at the 11 AWS regions of the Gaia geo-distributed
network (Hsieh et al., NSDI 2017) as used by Marfoq et al., "Throughput-optimal topology design for
cross-silo federated learning" (NeurIPS 2020, code ``omarfoq/communication-in-cross-silo-fl``,
``graph_utils/data/gaia.gml``). That underlay is the complete graph on the 11 regions (all 55 links,
with distances and capacities); it is stored as ``configs/topologies/gaia.txt``. FedEFM's training
overlay is the directed ring computed by that code (``aioz-ai/FedEFM``,
``graph_utils/results/gaia/med/ring.gml``): 0 -> 10 -> 3 -> 4 -> 9 -> 7 -> 8 -> 6 -> 5 -> 2 -> 1 -> 0
(``GAIA_RING_ORDER``; ``gaia_ring``).
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from typing import Any
from collections.abc import Sequence


import numpy as np

from fedkd import streams
from fedkd.errors import UserError

GAIA_NODES = (
  "Virginia",
  "California",
  "Oregon",
  "Dublin",
  "Frankfurt",
  "Tokyo",
  "Seoul",
  "Singapore",
  "Sydney",
  "Mumbai",
  "Sao Paulo",
)
# Directed ring overlay of FedEFM on Gaia; edge order[k] -> order[k+1] (model sent from order[k]).
GAIA_RING_ORDER = (0, 10, 3, 4, 9, 7, 8, 6, 5, 2, 1)
# Source-tree location; installed copies read the package data fedkd.configs (gaia_adjacency).
GAIA_PATH = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "topologies", "gaia.txt"
)


# ----------------------------------------------------------------------------- fixed topologies


def star(n: int) -> np.ndarray:
  """Client-server (FedAvg with equal weights): every row is uniform 1/n."""
  return np.full((n, n), 1.0 / n, np.float32)


def complete(n: int) -> np.ndarray:
  """Complete graph with uniform (= Metropolis-Hastings) weights: every entry 1/n."""
  return np.full((n, n), 1.0 / n, np.float32)


def ring(n: int, directed: bool = False, order: Sequence[int] | None = None) -> np.ndarray:
  """Ring over the silos visited in ``order`` (default 0, 1, ..., n-1).

  Undirected: each silo keeps 1/3 and takes 1/3 from each of its two ring neighbours (for n = 2 the
  two neighbours coincide and get 2/3). Directed: each silo keeps 1/2 and takes 1/2 from its
  predecessor in ``order`` (the silo that sends to it). Both are doubly stochastic.
  """
  order = list(range(n)) if order is None else [int(o) for o in order]
  if sorted(order) != list(range(n)):
    raise ValueError(f"order must be a permutation of range({n}), got {order}")
  w = np.zeros((n, n), np.float64)
  if n == 1:
    w[0, 0] = 1.0
    return w.astype(np.float32)
  for k, i in enumerate(order):
    prev = order[(k - 1) % n]
    nxt = order[(k + 1) % n]
    if directed:
      w[i, i] += 0.5
      w[i, prev] += 0.5
    else:
      w[i, i] += 1.0 / 3.0
      w[i, prev] += 1.0 / 3.0
      w[i, nxt] += 1.0 / 3.0
  return w.astype(np.float32)


def _support(adjacency, symmetric: bool = True) -> np.ndarray:
  """Boolean [N, N] support without self loops; symmetrised when ``symmetric``."""
  a = np.asarray(adjacency)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"adjacency must be square [N, N], got shape {a.shape}")
  s = a != 0
  if symmetric:
    s = s | s.T
  np.fill_diagonal(s, False)
  return s


def metropolis_hastings(adjacency) -> np.ndarray:
  """Metropolis-Hastings weights of an undirected graph (the support of A, symmetrised).

  W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_{j != i} W_ij: symmetric, non-negative
  and doubly stochastic for any undirected graph.
  """
  s = _support(adjacency)
  deg = s.sum(1)
  w = np.where(s, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
  np.fill_diagonal(w, 1.0 - w.sum(1))
  return w.astype(np.float32)


# ----------------------------------------------------------------------------- MATCHA


def matching_decomposition(adjacency) -> list[list[tuple[int, int]]]:
  """Split the edges of the (symmetrised) graph into matchings by greedy edge colouring.

  Edges (i < j) are visited in lexicographic order and each takes the smallest colour unused at both
  endpoints, so every colour class is a matching; at most 2 * max_degree - 1 matchings (MATCHA uses
  an optimal-ish colouring with about max_degree + 1; greedy is enough for the schedule). The
  result is deterministic.
  """
  edges, colour, count = _colouring(_support(adjacency))
  matchings: list[list[tuple[int, int]]] = [[] for _ in range(count)]
  for (i, j), c in zip(edges.tolist(), colour.tolist()):
    matchings[c].append((i, j))
  return matchings


def _colouring(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Greedy colouring of ``matching_decomposition`` for a symmetric boolean support: the edges (i < j)
  int64 [E, 2] in lexicographic order, each edge's colour int64 [E] and the number of colours.
  Cached on the support (MATCHA asks for the same graph every round)."""
  return _colouring_cached(s.shape[0], np.packbits(s).tobytes())


@functools.lru_cache(maxsize=4)
def _colouring_cached(n: int, packed: bytes) -> tuple[np.ndarray, np.ndarray, int]:
  s = np.unpackbits(np.frombuffer(packed, np.uint8), count=n * n).reshape(n, n).astype(bool)
  edges = np.argwhere(np.triu(s, 1))  # row-major: lexicographic
  used = [0] * n  # bit c set: colour c is taken at that node
  colour = np.empty(len(edges), np.int64)
  for k, (i, j) in enumerate(edges.tolist()):
    taken = used[i] | used[j]
    c = (~taken & (taken + 1)).bit_length() - 1  # the lowest clear bit: the smallest free colour
    used[i] |= 1 << c
    used[j] |= 1 << c
    colour[k] = c
  edges.flags.writeable = colour.flags.writeable = False
  return edges, colour, int(colour.max()) + 1 if len(colour) else 0


def _rng(rng_or_seed, round: int) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return streams.rng("matcha", int(rng_or_seed), int(round))


def matcha_activation(num_matchings: int, budget: float, rng_or_seed: Any = 0, round: int = 0) -> np.ndarray:
  """Bool [num_matchings]: each matching active independently with probability ``budget``.

  With an integer seed the draw is a deterministic function of (seed, round); a
  ``np.random.Generator`` is used (and advanced) as is.
  """
  if not 0.0 <= budget <= 1.0:
    raise ValueError(f"budget must be in [0, 1], got {budget}")
  return _rng(rng_or_seed, round).random(num_matchings) < budget


def matcha(base_adjacency, budget: float, rng_or_seed: Any = 0, round: int = 0) -> np.ndarray:
  """MATCHA-style mixing matrix for one round (Wang et al., "MATCHA", 2019).

  The base graph's edges are decomposed into matchings (``matching_decomposition``); each matching
  is activated independently with probability ``budget`` (the expected fraction of links used per
  round), deterministically from (seed, round). With L_active the Laplacian of the activated edges,

      W = I - alpha * L_active,   alpha = 1 / (1 + max degree of the base graph),

  which is symmetric, doubly stochastic and non-negative in every round (a silo has at most
  max-degree active links, so W_ii >= 1 - max_deg / (1 + max_deg) > 0). Simplifications versus
  MATCHA: uniform activation probabilities (MATCHA optimises one per matching under the budget) and
  this fixed safe alpha (MATCHA tunes alpha for the spectral gap of the expected W).
  """
  s = _support(base_adjacency)
  n = s.shape[0]
  edges, colour, count = _colouring(s)
  active = matcha_activation(count, budget, rng_or_seed, round)
  alpha = 1.0 / (1.0 + float(s.sum(1).max(initial=0)))
  i, j = edges[active[colour]].T  # the active matchings' edges
  lap = np.zeros((n, n), np.float64)
  np.add.at(lap, (i, i), 1.0)
  np.add.at(lap, (j, j), 1.0)
  lap[i, j] = -1.0  # a matching: each edge appears once
  lap[j, i] = -1.0
  return (np.eye(n) - alpha * lap).astype(np.float32)


# ----------------------------------------------------------------------------- files


class TopologyError(UserError, ValueError):
  """A topology file that cannot be used; the message names the file and the fix."""


_FILE_HELP = (
  "a topology file is an edge list ('i j' per line, 0-based node ids) or JSON "
  "({\"edges\": [[i, j], ...], \"num_nodes\": N} or a 0/1 adjacency matrix [[...], ...])"
)
_SUPPORT_ONLY = (
  "only the graph's support (which links exist) is used: gossip weights are derived from it (Metropolis-Hastings)"
)


def _read_topology_text(path: str) -> str:
  if not os.path.exists(path):
    raise TopologyError(
      f"{path}: topology file not found (relative paths start at {os.getcwd()}); "
      f"pass an existing file, e.g. --config.fedefm.topology=file:/path/graph.txt; "
      f"{_FILE_HELP}"
    )
  if os.path.isdir(path):
    raise TopologyError(f"{path}: is a directory, not a topology file; pass the file itself; {_FILE_HELP}")
  try:
    with open(path, encoding="utf-8-sig") as fh:  # a byte-order mark (Windows editors) is not part of the text
      return fh.read()
  except (OSError, UnicodeDecodeError) as e:
    raise TopologyError(f"{path}: cannot read it as text ({type(e).__name__}: {e}); {_FILE_HELP}") from None


def _node_id(where: str, value) -> int:
  if isinstance(value, str):
    try:
      value = int(value)
    except ValueError:
      raise TopologyError(f"{where}: node id {value!r} is not an integer; node ids are 0, 1, ..., N-1") from None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TopologyError(f"{where}: node id {value!r} is not an integer; node ids are 0, 1, ..., N-1")
  if value < 0:
    raise TopologyError(f"{where}: negative node id {value}; node ids are 0, 1, ..., N-1")
  return int(value)


def _weight(where: str, value, allowed: tuple[float, ...], token: bool = False) -> float:
  """A weight from a file (a JSON number, or with ``token`` a text line's token), checked: a
  finite number >= 0, and one of ``allowed``."""
  shown = value if token else repr(value)
  fix = "write 1 for a link and 0 for none" if 0.0 in allowed else "drop the weight or write 1"
  if token:
    try:
      value = float(value)
    except ValueError:
      raise TopologyError(f"{where}: weight {shown!r} is not a number; {fix}") from None
  elif isinstance(value, bool) or not isinstance(value, (int, float)):  # JSON true / false too
    raise TopologyError(f"{where}: {shown} is not a number; {fix}")
  w = float(value)
  if not np.isfinite(w):
    raise TopologyError(f"{where}: weight {shown} is not finite; {fix}")
  if w < 0:
    raise TopologyError(f"{where}: negative weight {shown}; {fix}")
  if w not in allowed:
    raise TopologyError(f"{where}: weight {shown}: {_SUPPORT_ONLY}, so other weights would be ignored; {fix}")
  return w


MAX_FILE_NODES = 16384  # a float32 [N, N] matrix of 1 GiB


def _isolated(path: str, ids: list[int], more: bool, n: int) -> TopologyError:
  return TopologyError(
    f"{path}: node(s) {ids[:10]}{' ...' if more or len(ids) > 10 else ''} have no link to any "
    "other node, so gossip never reaches them; add a link for each (or renumber the "
    f"nodes 0..N-1 without gaps); the file has {n} nodes"
  )


def _from_edges(path: str, edges, num_nodes, directed: bool) -> np.ndarray:
  """``edges``: (where, i, j) with checked ids; every edge weight 1. Nodes that no edge links are
  refused before the [N, N] matrix exists (a mistyped id such as 100000 would otherwise ask for 40 GB)."""
  if num_nodes is None:
    num_nodes = 1 + max((max(i, j) for _, i, j in edges), default=-1)
  for where, i, j in edges:
    if not (i < num_nodes and j < num_nodes):
      raise TopologyError(
        f"{where}: edge ({i}, {j}) names a node >= num_nodes={num_nodes}; node ids are 0..{num_nodes - 1}"
      )
  linked = {k for _, i, j in edges if i != j for k in (i, j)}
  if num_nodes > 1 and len(linked) < num_nodes:
    missing = []
    for k in range(num_nodes):  # stops after a few: N may be huge
      if k not in linked:
        missing.append(k)
        if len(missing) > 10:
          break
    raise _isolated(path, missing, num_nodes - len(linked) > 10, num_nodes)
  if num_nodes > MAX_FILE_NODES:
    raise TopologyError(
      f"{path}: {num_nodes} nodes; topologies are dense N x N matrices ({4 * num_nodes**2 / 2**30:.1f} GiB "
      f"each here), so a file may have at most {MAX_FILE_NODES} nodes; use fewer nodes"
    )
  a = np.zeros((num_nodes, num_nodes), np.float32)
  for _, i, j in edges:
    a[j, i] = 1.0  # row = receiver: edge i -> j means j receives from i
    if not directed:
      a[i, j] = 1.0
  return a


def _num_nodes(path: str, value, what: str):
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise TopologyError(f"{path}: {what}={value!r} must be a positive integer (the number of silos)")
  return int(value)


def _directed_key(path: str, obj: dict, directed: bool) -> bool:
  """The file's own ``"directed"`` (it wins over the caller's), else ``directed``."""
  d = obj.get("directed", directed)
  if not isinstance(d, bool):
    raise TopologyError(f"{path}: 'directed' must be true or false, got {d!r}")
  return d


def _json_topology(path: str, obj, directed: bool, num_nodes) -> np.ndarray:
  said_directed = False  # the file's own "directed" decides (a matrix under "adjacency")
  if isinstance(obj, dict):
    keys = set(obj)
    if "adjacency" in keys:
      if not keys <= {"adjacency", "directed"}:
        raise TopologyError(
          f"{path}: unexpected key(s) {sorted(keys - {'adjacency', 'directed'})} next to 'adjacency'; "
          "a matrix file holds only {\"adjacency\": [[...], ...]} (and optionally \"directed\": true / false)"
        )
      directed, said_directed = _directed_key(path, obj, directed), "directed" in keys
      obj = obj["adjacency"]
    else:
      extra = keys - {"edges", "num_nodes", "directed"}
      if "edges" not in keys or extra:
        raise TopologyError(
          f"{path}: JSON object keys {sorted(keys)}: expected 'edges' (and optionally "
          f"'num_nodes', 'directed') or 'adjacency'; {_FILE_HELP}"
        )
      if not isinstance(obj["edges"], list):
        raise TopologyError(f"{path}: 'edges' must be a list of [i, j] pairs")
      d = _directed_key(path, obj, directed)
      edges = []
      for k, e in enumerate(obj["edges"]):
        where = f"{path}: edges[{k}]"
        if not isinstance(e, list) or len(e) not in (2, 3):
          raise TopologyError(f"{where}: expected [i, j] or [i, j, 1], got {e!r}")
        if len(e) == 3:
          _weight(where, e[2], (1.0,))
        edges.append((where, _node_id(where, e[0]), _node_id(where, e[1])))
      n = _num_nodes(path, obj.get("num_nodes"), "'num_nodes'")
      if n is not None and num_nodes is not None and n != num_nodes:
        raise TopologyError(f"{path}: the file says 'num_nodes'={n} but num_nodes={num_nodes} was asked for")
      return _from_edges(path, edges, n or num_nodes, d)
  if not isinstance(obj, list) or not obj:
    raise TopologyError(
      f"{path}: JSON must be an adjacency matrix (a non-empty list of rows) or an object with 'edges'; {_FILE_HELP}"
    )
  for i, row in enumerate(obj):
    if not isinstance(row, list):
      raise TopologyError(f"{path}: adjacency row {i} is {row!r}, not a list; write [[0, 1], [1, 0]]")
    if len(row) != len(obj[0]):
      raise TopologyError(
        f"{path}: ragged adjacency matrix: row {i} has {len(row)} entries, row 0 has "
        f"{len(obj[0])}; every row needs one entry per node"
      )
  if len(obj[0]) != len(obj):
    raise TopologyError(
      f"{path}: adjacency matrix is {len(obj)}x{len(obj[0])}, not square; it needs one row and one column per node"
    )
  a = np.array(
    [[_weight(f"{path}: adjacency[{i}][{j}]", v, (0.0, 1.0)) for j, v in enumerate(row)] for i, row in enumerate(obj)],
    np.float32,
  )
  if num_nodes is not None and num_nodes != a.shape[0]:
    raise TopologyError(f"{path}: adjacency matrix has {a.shape[0]} nodes but num_nodes={num_nodes}")
  one_way = np.argwhere((a != 0) & (a.T == 0) & ~np.eye(len(a), dtype=bool))
  if not directed and len(one_way):
    i, j = one_way[0].tolist()
    how = "write \"directed\": true in the file" if said_directed else "--config.fedefm.directed=True"
    raise TopologyError(
      f"{path}: the adjacency matrix is not symmetric (adjacency[{i}][{j}]=1 but adjacency[{j}][{i}]=0), "
      "i.e. a directed graph, but the file is read as undirected; make the matrix symmetric, or read it as "
      f"directed ({how}; rows are receivers: adjacency[i][j]=1 means i receives from j)"
    )
  return a


def _text_topology(path: str, text: str, directed: bool, num_nodes) -> np.ndarray:
  edges = []
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = raw.split("#", 1)[0].strip()
    if not line:
      continue
    tok = line.split()
    where = f"{path}:{lineno}"
    if len(tok) not in (2, 3):
      raise TopologyError(f"{where}: expected 'i j' (or 'i j 1'), got {raw.strip()!r}; {_FILE_HELP}")
    if len(tok) == 3:
      _weight(where, tok[2], (1.0,), token=True)
    edges.append((where, _node_id(where, tok[0]), _node_id(where, tok[1])))
  return _from_edges(path, edges, num_nodes, directed)


def _check_connected(path: str, a: np.ndarray) -> None:
  """Every node linked, and the graph (ignoring directions) in one piece: gossip must reach all."""
  n = a.shape[0]
  if n == 0:
    raise TopologyError(f"{path}: no edges; {_FILE_HELP}")
  if n == 1:
    return
  s = _support(a)  # symmetrised, no self loops
  isolated = np.flatnonzero(~s.any(1))
  if len(isolated):
    raise _isolated(path, isolated.tolist(), False, n)
  seen = np.zeros(n, bool)
  seen[0] = True
  frontier = [0]
  while frontier:
    nxt = np.flatnonzero(s[frontier].any(0) & ~seen)
    seen[nxt] = True
    frontier = nxt.tolist()
  if not seen.all():
    apart = np.flatnonzero(~seen).tolist()
    raise TopologyError(
      f"{path}: the graph is not connected: node(s) {apart[:10]}"
      f"{' ...' if len(apart) > 10 else ''} cannot reach node 0, so models never mix "
      "between the parts; add links between them"
    )


def from_file(path: str, *, directed: bool = False, num_nodes: int | None = None) -> np.ndarray:
  """0/1 adjacency [N, N] float32 of the graph in a topology file.

  Only the graph's support (which links exist) is used: fedkd derives gossip weights from it
  (``directed_mixing``: Metropolis-Hastings for an undirected graph, a balanced or push-sum matrix for
  a directed one), so the file holds links, not weights. An edge weight other than 1, or a matrix
  entry other than 0/1, is refused rather than silently ignored (write the links; the weights follow
  from the node degrees).

  Text edge list: one edge per line, ``i j`` (0-based node ids; an optional third column must be 1);
  ``#`` starts a comment (whole line or trailing); blank lines are ignored. ``directed=False``
  (default) stores each edge both ways; with ``directed=True`` the line ``i j`` means i sends to j,
  i.e. A[j, i] = 1 (rows are receivers), and the result is NOT symmetrised (only weak connectivity
  is checked here; ``directed_mixing`` / ``check_strongly_connected`` require strong connectivity).

  JSON (``.json`` or text starting with ``[`` / ``{``): either a 0/1 adjacency matrix (a list of
  rows, or ``{"adjacency": [[...], ...]}``, rows = receivers, returned as is; symmetric unless
  ``directed=True``), or
  ``{"edges": [[i, j], ...], "num_nodes": N}`` read like the text format. In either object a
  ``"directed": true / false`` of the file overrides ``directed``. Diagonal entries / self loops are
  allowed and ignored by the graph helpers.

  ``~`` in ``path`` is the user's home directory. N is ``num_nodes`` if given, else 1 + the largest
  node id. Every problem raises ``TopologyError`` naming the file (and line or entry) and the fix: a
  missing file or a directory, unreadable text or JSON, malformed lines, non-integer or negative node
  ids, ids >= N, ragged or non-square matrices, non-numeric entries, negative / NaN / Inf weights,
  weights other than 1 (0/1 in a matrix), an asymmetric matrix read as undirected, a node without any
  link (gossip could never reach it; found before the [N, N] matrix is made, so a mistyped huge id
  costs no memory) and a graph in several pieces.
  """
  path = os.path.expanduser(os.fspath(path))  # file:~/graph.txt, as every other path of fedkd
  text = _read_topology_text(path)
  num_nodes = _num_nodes(path, num_nodes, "num_nodes")
  if path.endswith(".json") or text.lstrip()[:1] in ("[", "{"):
    try:
      obj = json.loads(text)
    except ValueError as e:
      raise TopologyError(f"{path}: invalid JSON ({e}); {_FILE_HELP}") from None
    a = _json_topology(path, obj, directed, num_nodes)
  else:
    a = _text_topology(path, text, directed, num_nodes)
  _check_connected(path, a)
  return a


def _gaia_resource():
  """``topologies/gaia.txt`` of the installed ``fedkd.configs`` package, or None when that package
  is not importable (e.g. a source checkout without it)."""
  try:
    res = resources.files("fedkd.configs").joinpath("topologies/gaia.txt")
  except (ImportError, TypeError):  # not installed / not a package
    return None
  return res if res.is_file() else None


def gaia_adjacency(path: str | None = None) -> np.ndarray:
  """The 11-node Gaia underlay (``configs/topologies/gaia.txt``): complete graph, unit weights.

  Read from the package data ``fedkd.configs`` (``importlib.resources``, so it works in a
  non-editable install), else from the source tree (``GAIA_PATH``)."""
  if path is not None:
    return from_file(path)
  res = _gaia_resource()
  if res is not None:
    with resources.as_file(res) as p:
      return from_file(str(p))
  if not os.path.isfile(GAIA_PATH):
    raise TopologyError(
      f"the Gaia topology file is missing from this fedkd installation (looked for "
      f"fedkd.configs/topologies/gaia.txt and {GAIA_PATH}); reinstall fedkd, or pass "
      "--config.fedefm.topology=file:<a copy of configs/topologies/gaia.txt>"
    )
  return from_file(GAIA_PATH)


def gaia_ring(directed: bool = True) -> np.ndarray:
  """FedEFM's ring overlay on Gaia as a mixing matrix (``ring`` over ``GAIA_RING_ORDER``)."""
  return ring(len(GAIA_NODES), directed=directed, order=GAIA_RING_ORDER)


# ----------------------------------------------------------------------------- neighbours


def neighbours(adjacency) -> list[list[int]]:
  """In-neighbours of every silo: row i lists j != i with A[i, j] != 0 (ascending).

  Works on adjacencies and on mixing matrices (the diagonal is ignored).
  """
  s = _support(adjacency, symmetric=False)
  return [[int(j) for j in np.flatnonzero(row)] for row in s]


def neighbour_table(adjacency) -> tuple[np.ndarray, np.ndarray]:
  """Padded in-neighbour table for use inside jit: for a directed graph, the silos each silo RECEIVES
  from (row i of the adjacency), not the ones it sends to.

  Returns idx int32 [N, D] and mask bool [N, D], D = max(1, max in-degree): idx[i, :d_i] are silo
  i's neighbours (as in ``neighbours``) with mask True; padded slots hold i itself (a safe index
  for gathers) with mask False.
  """
  nb = neighbours(adjacency)
  n = len(nb)
  d = max([1] + [len(x) for x in nb])
  idx = np.repeat(np.arange(n, dtype=np.int32)[:, None], d, axis=1)
  mask = np.zeros((n, d), bool)
  for i, x in enumerate(nb):
    idx[i, : len(x)] = x
    mask[i, : len(x)] = True
  return idx, mask


def is_doubly_stochastic(w, atol: float = 1e-5) -> bool:
  """True if w is non-negative with rows and columns summing to 1 (within atol)."""
  w = np.asarray(w, np.float64)
  return bool((w >= -atol).all() and np.allclose(w.sum(0), 1.0, atol=atol) and np.allclose(w.sum(1), 1.0, atol=atol))


def is_column_stochastic(w, atol: float = 1e-5) -> bool:
  """True if w is non-negative with columns summing to 1 (within atol): every node hands out all of its
  mass (push-sum's condition; rows need not sum to 1)."""
  w = np.asarray(w, np.float64)
  return bool(w.ndim == 2 and (w >= -atol).all() and np.allclose(w.sum(0), 1.0, atol=atol))


# ----------------------------------------------------------------------------- directed graphs
#
# Same convention as everywhere in this module: adjacency[i, j] != 0 iff silo i RECEIVES from silo j
# (the link j -> i; rows are receivers, columns senders), so row i lists i's in-neighbours and column j
# lists j's out-neighbours; in-degree = row sum, out-degree = column sum of the support (no self loops).
# ``gaia_ring(directed=True) > 0`` and ``from_file(path, directed=True)`` (line "i j" = i sends to j,
# stored as A[j, i]) follow it. Every matrix W below acts as x_i <- sum_j W[i, j] x_j (``aggregate.mix``).


def gaia_ring_adjacency(directed: bool = True) -> np.ndarray:
  """Bool [11, 11] adjacency (no self loops) of FedEFM's ring overlay on Gaia (``GAIA_RING_ORDER``):
  directed, silo order[k + 1] receives from order[k]; undirected, both ways."""
  a = gaia_ring(directed=directed) != 0
  np.fill_diagonal(a, False)
  return a


def is_symmetric(adjacency) -> bool:
  """True if every link goes both ways (an undirected graph; the diagonal is ignored)."""
  s = _support(adjacency, symmetric=False)
  return bool((s == s.T).all())


def is_balanced(adjacency) -> bool:
  """True if every node's in-degree equals its out-degree (row sums == column sums of the support).

  Then ``balanced_mixing`` is doubly stochastic, so plain gossip keeps the average, and push-sum's
  weights would stay 1 (its matrix for a *regular* balanced digraph is doubly stochastic too)."""
  s = _support(adjacency, symmetric=False)
  return bool((s.sum(1) == s.sum(0)).all())


def _reach(s: np.ndarray, start: int) -> np.ndarray:
  """Bool [N]: the nodes reachable from ``start`` along the links of ``s`` (s[i, j]: j -> i)."""
  seen = np.zeros(s.shape[0], bool)
  seen[start] = True
  frontier = np.array([start])
  while frontier.size:
    nxt = np.flatnonzero(s[:, frontier].any(1) & ~seen)  # receivers of the frontier
    seen[nxt] = True
    frontier = nxt
  return seen


def is_strongly_connected(adjacency) -> bool:
  """True if every silo reaches every other along the links' directions (for an undirected graph:
  connected). A single silo is strongly connected."""
  s = _support(adjacency, symmetric=False)
  return bool(_reach(s, 0).all() and _reach(s.T, 0).all())


def check_strongly_connected(adjacency, what: str = "the topology") -> None:
  """Raises ``TopologyError`` unless the (directed) graph is strongly connected: otherwise gossip or
  push-sum cannot reach consensus (a silo that no path leads to never receives the others' models;
  one with no path out never spreads its own). The message names the silos and the fix."""
  s = _support(adjacency, symmetric=False)
  if s.shape[0] <= 1:
    return
  cut_off = np.flatnonzero(~_reach(s, 0)).tolist()  # node 0's models never reach them
  silent = np.flatnonzero(~_reach(s.T, 0)).tolist()  # their models never reach node 0

  def show(ids):
    return f"{ids[:10]}{' ...' if len(ids) > 10 else ''}"

  if cut_off or silent:
    parts = []
    if cut_off:
      parts.append(f"node(s) {show(cut_off)} never receive node 0's model")
    if silent:
      parts.append(f"node 0 never receives the model of node(s) {show(silent)}")
    raise TopologyError(
      f"{what} is a directed graph that is not strongly connected ({'; '.join(parts)}), so the silos "
      "cannot reach consensus; add links so that every silo has a directed path to every other (e.g. "
      "close the chain into a ring), or list the links as undirected"
    )


def push_sum_matrix(adjacency) -> np.ndarray:
  """Column-stochastic push-sum mixing matrix of a directed graph (float32 [N, N]).

  Every silo j splits its mass equally over itself and its out-neighbours (the silos that receive
  from it): A[i, j] = 1 / (1 + out_degree(j)) for i = j and every link j -> i, else 0. Columns sum
  to 1, rows in general do not. Push-sum (Kempe, Dobra & Gehrke 2003; Nedic & Olshevsky 2015,
  "stochastic gradient-push"; Assran et al. 2019, SGP) iterates numerators and weights with the same
  matrix, x <- A x, w <- A w (w = 1 at the start), and reads the estimate z = x / w, which converges
  to the plain average of the initial x on any strongly connected digraph. Raises ``TopologyError``
  for a graph that is not strongly connected.
  """
  s = _support(adjacency, symmetric=False)
  check_strongly_connected(s, "the push-sum topology")
  share = 1.0 / (1.0 + s.sum(0))  # per sender j
  a = np.where(s, share[None, :], 0.0)
  np.fill_diagonal(a, share)
  return a.astype(np.float32)


def balanced_mixing(adjacency) -> np.ndarray:
  """Doubly stochastic gossip matrix of a balanced digraph (in-degree == out-degree everywhere):

      W = I - L / (1 + max in-degree),   L = D_in - S   (S[i, j] = 1 for the link j -> i),

  rows sum to 1 (L 1 = 0) and, because the graph is balanced, columns too (1^T L = d_in - d_out = 0);
  non-negative with W_ii > 0. The directed ring gets W = (I + P) / 2 (= ``ring(n, directed=True)``).
  Note the uniform in-neighbour average (1 / (1 + d_in(i)) over i and its in-neighbours) is doubly
  stochastic only for *regular* balanced digraphs, hence this matrix."""
  s = _support(adjacency, symmetric=False)
  if not is_balanced(s):
    raise TopologyError("balanced_mixing needs in-degree == out-degree at every node; use push_sum_matrix")
  d_in = s.sum(1)
  alpha = 1.0 / (1.0 + float(d_in.max(initial=0)))
  w = alpha * s.astype(np.float64)
  np.fill_diagonal(w, 1.0 - alpha * d_in)
  return w.astype(np.float32)


def directed_mixing(adjacency) -> tuple[np.ndarray, bool]:
  """Gossip matrix for a topology that may be directed: ``(W, push_sum)``.

  * undirected (symmetric support): ``(metropolis_hastings(adjacency), False)``, as before;
  * directed and balanced (e.g. FedEFM's directed Gaia ring): ``(balanced_mixing(adjacency), False)``,
    doubly stochastic, so plain gossip x_i <- sum_j W[i, j] x_j keeps the average (push-sum's
    weights would stay 1 for it, so no weights are needed);
  * directed and unbalanced: ``(push_sum_matrix(adjacency), True)``, column-stochastic: mix with
    push-sum weights (``push_sum_round``); plain gossip with it (or with any row-normalised average
    over in-neighbours) reaches consensus on a *weighted* average, not the average.

  The graph must be strongly connected (connected when undirected); else ``TopologyError``.
  """
  s = _support(adjacency, symmetric=False)
  check_strongly_connected(s, "the gossip topology")
  if is_symmetric(s):
    return metropolis_hastings(s), False
  if is_balanced(s):
    return balanced_mixing(s), False
  return push_sum_matrix(s), True


def push_sum_weights(a, rounds: int) -> np.ndarray:
  """Push-sum weights after ``rounds`` mixings with the column-stochastic ``a``: w = a^rounds 1 (float64
  [N]; they sum to N, up to the rounding of a's float32 column sums). A function of the round only, so nothing needs to be checkpointed.

  The last result is kept, so asking round after round (``push_sum_round``) costs one matrix-vector
  product per round, and the numbers are those of the plain loop from w = 1."""
  a = np.asarray(a, np.float64)
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
    raise ValueError(f"rounds={rounds!r} must be an integer >= 0")
  key = (a.shape, a.tobytes())
  done, w = _PUSH_SUM_LAST.get(key, (0, None))
  if w is None or done > rounds:
    done, w = 0, np.ones(a.shape[0])
  for _ in range(int(rounds) - done):
    w = a @ w
  _PUSH_SUM_LAST.clear()  # one matrix at a time: bounded memory
  _PUSH_SUM_LAST[key] = (int(rounds), w)
  return w.copy()


_PUSH_SUM_LAST: dict = {}


def push_sum_peak_scale(a, rounds: int) -> tuple[float, int, int]:
  """(the largest 1 / w_i, its silo i, its round r) over the push-sum weights w = a^r 1 of rounds r = 0 ..
  ``rounds`` - 1 (the scales stochastic gradient-push gives the silos' local steps; the weights need not fall
  monotonically, so the last round's is not the peak). Computed in float64; inf where a weight reaches 0."""
  a = np.asarray(a, np.float64)
  w, peak = np.ones(a.shape[0]), (1.0, 0, 0)
  for r in range(max(int(rounds), 1)):
    if r:
      w = a @ w
    i = int(np.argmin(w))
    scale = float(1.0 / w[i]) if w[i] > 0 else float("inf")
    if scale > peak[0]:
      peak = (scale, i, r)
  return peak


def push_sum_round(a, rounds_done: int) -> np.ndarray:
  """Row-stochastic matrix (float32 [N, N]) of one push-sum step in de-biased form.

  With w = ``push_sum_weights(a, rounds_done)`` (the weights before this mixing, rounds_done = number
  of earlier mixings, 0 for the first) and w' = a w:

      W[i, j] = a[i, j] * w[j] / w'[i],

  so mixing the silos' de-biased models z = x / w with ``aggregate.mix`` (z_i <- sum_j W[i, j] z_j)
  is exactly push-sum's x <- a x, w <- a w followed by z = x / w. A function of
  (``a``, ``rounds_done``) only, like MATCHA's per-round matrices. For a balanced digraph's doubly
  stochastic ``a`` it is ``a`` itself in every round.

  Local training between mixings: the models mixed are the trained z's, so silo j's local update
  enters the numerator as w_j * (its change of z); w tends to N times the stationary distribution of
  ``a``, so on an unbalanced digraph silos with more incoming mass would weigh more in the consensus.
  Stochastic gradient-push adds the raw update to x_j instead: silo j trains with its steps scaled by
  1 / w_j (``local_sgd``'s ``step_scale``, which the FedEFM task passes), and the consensus is the
  plain average's optimum. With w = 1 (balanced graphs) the two agree.
  """
  a64 = np.asarray(a, np.float64)
  if a64.ndim != 2 or a64.shape[0] != a64.shape[1]:
    raise ValueError(f"push-sum matrix must be square [N, N], got shape {a64.shape}")
  if not is_column_stochastic(a64):
    raise ValueError("push_sum_round needs a column-stochastic matrix (push_sum_matrix)")
  w = push_sum_weights(a64, rounds_done)
  return (a64 * w[None, :] / (a64 @ w)[:, None]).astype(np.float32)
