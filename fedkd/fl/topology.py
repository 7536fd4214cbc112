"""Communication topologies for decentralised (gossip) federated learning.

Conventions
-----------
* A **mixing matrix** W is numpy float32 [N, N]; row i holds the weights silo i gives to every silo
  j's model, so one gossip round is  x_i <- sum_j W_ij x_j  (``gossip``). Rows sum to 1; the
  matrices built here are also column-stochastic (doubly stochastic) wherever the topology allows,
  which makes gossip preserve the average model.
* An **adjacency** A is float32 [N, N] with A[i, j] != 0 iff silo i receives from silo j (j is an
  in-neighbour of i), the same row convention as W; undirected graphs are symmetric. The diagonal
  is ignored by the graph helpers.

Topologies: ``star`` (client-server FedAvg), ``ring`` (undirected or directed), ``complete``,
``metropolis_hastings`` (for any undirected graph), ``matcha`` (random matchings of a base graph)
and graphs read from text / JSON files (``from_file``). ``neighbours`` / ``neighbour_table`` give the
in-neighbour lists, the latter padded to fixed shape for use inside ``jax.jit``.

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

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GAIA_NODES = ("Virginia", "California", "Oregon", "Dublin", "Frankfurt", "Tokyo", "Seoul",
              "Singapore", "Sydney", "Mumbai", "Sao Paulo")
# Directed ring overlay of FedEFM on Gaia; edge order[k] -> order[k+1] (model sent from order[k]).
GAIA_RING_ORDER = (0, 10, 3, 4, 9, 7, 8, 6, 5, 2, 1)
GAIA_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "configs", "topologies", "gaia.txt")


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
  s = _support(adjacency)
  n = s.shape[0]
  used: list[set[int]] = [set() for _ in range(n)]
  matchings: list[list[tuple[int, int]]] = []
  for i in range(n):
    for j in range(i + 1, n):
      if not s[i, j]:
        continue
      c = 0
      while c in used[i] or c in used[j]:
        c += 1
      if c == len(matchings):
        matchings.append([])
      matchings[c].append((i, j))
      used[i].add(c)
      used[j].add(c)
  return matchings


def _rng(rng_or_seed, round: int) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return np.random.default_rng([int(rng_or_seed), int(round)])


def matcha_activation(num_matchings: int, budget: float, rng_or_seed: Any = 0,
                      round: int = 0) -> np.ndarray:
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
  matchings = matching_decomposition(s)
  active = matcha_activation(len(matchings), budget, rng_or_seed, round)
  alpha = 1.0 / (1.0 + float(s.sum(1).max(initial=0)))
  lap = np.zeros((n, n), np.float64)
  for m, on in zip(matchings, active):
    if not on:
      continue
    for i, j in m:
      lap[i, i] += 1.0
      lap[j, j] += 1.0
      lap[i, j] -= 1.0
      lap[j, i] -= 1.0
  return (np.eye(n) - alpha * lap).astype(np.float32)


# ----------------------------------------------------------------------------- files

def _from_edges(edges, num_nodes: int | None, directed: bool) -> np.ndarray:
  if num_nodes is None:
    num_nodes = 1 + max((max(i, j) for i, j, _ in edges), default=-1)
  a = np.zeros((num_nodes, num_nodes), np.float32)
  for i, j, w in edges:
    if not (0 <= i < num_nodes and 0 <= j < num_nodes):
      raise ValueError(f"edge ({i}, {j}) out of range for {num_nodes} nodes")
    a[j, i] = w  # row = receiver: edge i -> j means j receives from i
    if not directed:
      a[i, j] = w
  return a


def from_file(path: str, *, directed: bool = False, num_nodes: int | None = None) -> np.ndarray:
  """Adjacency [N, N] float32 from a topology file.

  Text edge list: one edge per line, ``i j [weight]`` (0-based node ids, weight defaults to 1);
  ``#`` starts a comment (whole line or trailing); blank lines are ignored. ``directed=False``
  (default) stores each edge both ways; with ``directed=True`` the line ``i j`` means i sends to j,
  i.e. A[j, i] = weight (rows are receivers).

  JSON (``.json`` or text starting with ``[`` / ``{``): either an adjacency matrix (a list of rows,
  or ``{"adjacency": [[...], ...]}``, returned as is), or ``{"edges": [[i, j], [i, j, w], ...],
  "num_nodes": N}`` read like the text format (``"directed": true`` in the file overrides).

  N is ``num_nodes`` if given, else 1 + the largest node id.
  """
  with open(path) as fh:
    text = fh.read()
  if path.endswith(".json") or text.lstrip()[:1] in ("[", "{"):
    obj = json.loads(text)
    if isinstance(obj, dict) and "adjacency" in obj:
      obj = obj["adjacency"]
    if isinstance(obj, list):
      a = np.asarray(obj, np.float32)
      if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{path}: adjacency must be square, got shape {a.shape}")
      return a
    if not isinstance(obj, dict) or "edges" not in obj:
      raise ValueError(f"{path}: JSON must be an adjacency matrix or have an 'edges' list")
    edges = [(int(e[0]), int(e[1]), float(e[2]) if len(e) > 2 else 1.0) for e in obj["edges"]]
    return _from_edges(edges, obj.get("num_nodes", num_nodes), bool(obj.get("directed", directed)))
  edges = []
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = raw.split("#", 1)[0].strip()
    if not line:
      continue
    tok = line.split()
    if len(tok) not in (2, 3):
      raise ValueError(f"{path}:{lineno}: expected 'i j [weight]', got {raw!r}")
    edges.append((int(tok[0]), int(tok[1]), float(tok[2]) if len(tok) == 3 else 1.0))
  return _from_edges(edges, num_nodes, directed)


def gaia_adjacency(path: str | None = None) -> np.ndarray:
  """The 11-node Gaia underlay (``configs/topologies/gaia.txt``): complete graph, unit weights."""
  return from_file(GAIA_PATH if path is None else path)


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
  """Padded in-neighbour table for use inside jit.

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
    idx[i, :len(x)] = x
    mask[i, :len(x)] = True
  return idx, mask


def is_doubly_stochastic(w, atol: float = 1e-5) -> bool:
  """True if w is non-negative with rows and columns summing to 1 (within atol)."""
  w = np.asarray(w, np.float64)
  return bool((w >= -atol).all() and np.allclose(w.sum(0), 1.0, atol=atol)
              and np.allclose(w.sum(1), 1.0, atol=atol))


# ----------------------------------------------------------------------------- gossip

def gossip(stacked_params, W):
  """One gossip round: new_i = sum_j W_ij x_j on the leading (client) axis of every leaf.

  ``stacked_params``: a pytree whose floating leaves are [N, ...]; W: [N, N]. The contraction runs
  in float32 at full matmul precision (no TF32/bf16 passes on accelerators) and is cast back to each
  leaf's dtype; non-floating leaves (e.g. integer step counters) are returned unchanged. jit-able.
  """
  w = jnp.asarray(W, jnp.float32)

  def mix(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    y = jnp.tensordot(w, x.astype(jnp.float32), axes=(1, 0), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)

  return jax.tree.map(mix, stacked_params)
