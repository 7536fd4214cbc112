"""Partitioners: how a pool of examples (or of data types) is split over clients/silos.

All functions are deterministic given ``seed`` and return, per client, a sorted int64 index array
into the pool (or, for :func:`unseen_label_corpus`, a per-silo mixture over data types).
"""

from __future__ import annotations

import math

import numpy as np

from fedkd.errors import UserError


class PartitionError(UserError, ValueError):
  """A partition request that cannot be met; the message says what to change."""


def _count(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise PartitionError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


def _finite(name: str, value, positive: bool) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    v = float("nan")
  if not np.isfinite(v) or (v <= 0 if positive else v < 0):
    raise PartitionError(f"{name}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")
  return v


def by_site(site_of_example: np.ndarray, num_clients: int | None = None) -> list[np.ndarray]:
  """One client per site (sites in sorted order). With ``num_clients`` > sites, each site's examples
  are dealt round-robin over the clients assigned to it (client k gets site k % n_sites)."""
  site_of_example = np.asarray(site_of_example)
  sites = np.unique(site_of_example)
  n = len(sites) if num_clients is None else _count("num_clients", num_clients)
  if not len(sites):
    raise PartitionError("by_site got no examples to deal out; every training site is empty")
  if n < len(sites):
    raise PartitionError(
      f"by_site needs at least one client per site: {len(sites)} sites but "
      f"num_clients={n}; raise num_clients or use partition 'dirichlet'"
    )
  n_sites = len(sites)
  # each site's examples in ascending order (a stable sort by site): linear in clients + examples
  site_idx = np.searchsorted(sites, site_of_example)
  order = np.argsort(site_idx, kind="stable")
  per_site = np.split(order, np.cumsum(np.bincount(site_idx, minlength=n_sites))[:-1])
  out = []
  for k in range(n):
    j = k % n_sites
    share = len(range(j, n, n_sites))  # clients dealt site j; client k is number k // n_sites of them
    out.append(per_site[j][k // n_sites :: share].astype(np.int64))
  return out


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
  """Label/site/type skew: for every category, its examples are split over clients in proportions
  drawn from Dirichlet(alpha * 1). Small alpha -> each client sees few categories; alpha -> inf ->
  every client gets the same category mix. Redraws (up to 100 times) until every client has
  ``min_size`` examples."""
  try:
    _finite("alpha", alpha, positive=True)
  except PartitionError:
    raise PartitionError(f"dirichlet alpha={alpha} must be > 0 (e.g. 0.1 = strong skew, 100 = near IID)") from None
  num_clients, min_size = _count("num_clients", num_clients), _count("min_size", min_size, 0)
  labels = np.asarray(labels)
  if len(labels) < num_clients * min_size:
    raise PartitionError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each; lower num_clients")
  rng = np.random.default_rng(seed)
  for _ in range(100):
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cat in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == cat))
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
      for k, chunk in enumerate(np.split(idx, cuts)):
        parts[k].extend(chunk.tolist())
    if min(len(p) for p in parts) >= min_size:
      return [np.sort(np.asarray(p, np.int64)) for p in parts]
  raise PartitionError(
    f"dirichlet(alpha={alpha}) left a client with fewer than {min_size} examples "
    "after 100 draws; raise alpha or lower num_clients"
  )


def quantity_skew(num_examples: int, num_clients: int, sigma: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
  """IID content, unequal sizes: client shares proportional to lognormal(0, sigma) draws."""
  num_clients, min_size = _count("num_clients", num_clients), _count("min_size", min_size, 0)
  num_examples = _count("num_examples", num_examples, 0)
  sigma = _finite("quantity_skew sigma", sigma, positive=False)
  if num_examples < num_clients * min_size:
    raise PartitionError(f"{num_examples} examples cannot give {num_clients} clients {min_size} each")
  rng = np.random.default_rng(seed)
  with np.errstate(over="ignore"):
    w = rng.lognormal(0.0, sigma, size=num_clients) if sigma > 0 else np.ones(num_clients)
  if not (np.isfinite(w.sum()) and w.sum() > 0):  # the shares would be NaN: sizes below min_size, silently
    raise PartitionError(
      f"quantity_skew sigma={sigma} is too large (the lognormal client shares overflow or underflow); lower it"
    )
  extra = num_examples - num_clients * min_size
  sizes = min_size + np.floor(w / w.sum() * extra).astype(int)
  sizes[np.argsort(-w)[: num_examples - sizes.sum()]] += 1
  perm = rng.permutation(num_examples)
  return [np.sort(c).astype(np.int64) for c in np.split(perm, np.cumsum(sizes)[:-1])]


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  return quantity_skew(num_examples, num_clients, 0.0, seed)


def unseen_types(num_types: int, percent: float) -> int:
  """How many data types each silo holds at ``percent`` % unseen labels over ``num_types`` types:

      k = T - round(percent / 100 * (T - 1)),   rounding halves up (floor(v + 1/2)),

  so 100 % -> 1 type per silo, 0 % -> all T types, and k never increases with ``percent``."""
  num_types = _count("num_types", num_types)
  try:
    ok = 0 <= percent <= 100
  except TypeError:
    ok = False
  if not ok or isinstance(percent, bool):
    raise PartitionError(f"unseen label corpus percent={percent} must be in [0, 100]")
  return num_types - int(math.floor(float(percent) * (num_types - 1) / 100.0 + 0.5))


def unseen_label_corpus(num_silos: int, num_types: int, percent: float) -> np.ndarray:
  """FedEFM's "x % unseen label corpus": each silo's mixture over data types, float64 [silos, types].

  With T = ``num_types`` and x = ``percent`` in [0, 100], silo i holds

      k = T - round(x / 100 * (T - 1))      (``unseen_types``; halves round up)

  consecutive data types, cyclically from its home type i % T: {i % T, (i + 1) % T, ...,
  (i + k - 1) % T}, in equal parts 1/k (rows sum to 1; every other type is absent, i.e. unseen).
  100 % -> one type per silo (its home type); 0 % -> every silo holds all T types equally; in
  between the type sets shrink from all types to the home type, and a higher x gives a subset of a
  lower x's set. Any number of silos works at every x: silos i and i + T hold the same set (e.g. 11
  silos over 6 data types, as FedEFM's 11 Gaia silos over its data sources).
  """
  num_silos = _count("num_silos", num_silos)
  k = unseen_types(num_types, percent)
  mix = np.zeros((num_silos, num_types))
  for i in range(num_silos):
    mix[i, (i + np.arange(k)) % num_types] = 1.0 / k
  return mix


def assign_by_mixture(types: np.ndarray, mixture: np.ndarray, seed: int) -> list[np.ndarray]:
  """Splits a pool of typed examples over silos so each silo's type proportions follow ``mixture``
  rows (normalised per type: every example goes to exactly one silo)."""
  types = np.asarray(types)
  mixture = np.asarray(mixture, dtype=np.float64)
  if mixture.ndim != 2 or 0 in mixture.shape:
    raise PartitionError(f"mixture must be a [silos, types] matrix, got shape {mixture.shape}")
  if not np.isfinite(mixture).all() or (mixture < 0).any():
    raise PartitionError("mixture entries must be finite and >= 0 (each silo's share of every data type)")
  if types.size and (types.dtype.kind not in "iu" or types.min() < 0 or types.max() >= mixture.shape[1]):
    raise PartitionError(f"types must be integers 0..{mixture.shape[1] - 1} (one per mixture column)")
  unheld = [t for t in range(mixture.shape[1]) if mixture[:, t].sum() == 0 and (types == t).any()]
  if unheld:
    raise PartitionError(
      f"data type(s) {unheld} have examples but every silo's mixture share is 0, so they "
      "would be dropped; give them a share or remove those examples"
    )
  rng = np.random.default_rng(seed)
  parts: list[list[int]] = [[] for _ in range(mixture.shape[0])]
  for t in range(mixture.shape[1]):
    idx = rng.permutation(np.flatnonzero(types == t))
    col = mixture[:, t]
    if col.sum() == 0 or len(idx) == 0:
      continue
    cuts = (np.cumsum(col / col.sum())[:-1] * len(idx)).round().astype(int)
    for k, chunk in enumerate(np.split(idx, cuts)):
      parts[k].extend(chunk.tolist())
  return [np.sort(np.asarray(p, np.int64)) for p in parts]
