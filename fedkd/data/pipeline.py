"""Client data for federated rounds, from one config switch ``config.data.source``:

  "synthetic"     examples rendered on device by fedkd.data.synth, a pure function of
                  (seed, split, site, index); nothing to save for resume.
  "tfds:<name>"   a prepared TFDS dataset (array_record, see fedkd.data.tfds), read with grain: one
                  ``MapDataset`` per client (deterministic shuffle, repeat, augmentation, batching);
                  each client's position in it is the iterator state saved in the checkpoint, so
                  resume is exact. In multi-process runs each process reads only the clients whose
                  rows live on its devices (``rows``), while all processes track every position.

Both give ``round_batches(round, clients) -> (images [k, steps, B, H, W, 1] f32, masks [k, steps, B, H, W] i32)``,
``sizes`` (examples per client, the FedAvg weights), ``site_names``, held-out ``eval_sets()``,
``prefetch(round, clients)`` (tfds with ``data.prefetch``: that round's batches are prepared in a
background thread while the current round trains; ``data.workers`` > 0 decodes and augments in that many
worker processes) and ``close()``. Prefetching changes no batch and no saved state: batches are a pure
function of (client, position), and positions advance only when ``round_batches`` hands a round out.
"""

from __future__ import annotations

from fedkd.errors import UserError, reason

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import numpy as np

from fedkd import streams
from fedkd.config import stored_value
from fedkd.data import partition
from fedkd.data import sites as sites_lib
from fedkd.data import synth


class DataError(UserError, ValueError):
  """Data that cannot feed this run; the message names the problem and a fix."""


# --------------------------------------------------------------------------------------------
# Synthetic, on device
# --------------------------------------------------------------------------------------------


def evaluated_sites(config) -> list[int]:
  """The training sites a run evaluates (training, fedkd.eval and the preview alike): every client's, or the
  first ``config.eval.max_sites`` (cross-device runs have thousands of clients); the unseen site besides."""
  n = config.num_clients
  return list(range(min(config.eval.get("max_sites", 0) or n, n)))


def client_sizes(config) -> np.ndarray:
  """Synthetic training-set size of every client (deterministic from the seed)."""
  n = np.full(config.num_clients, config.examples_per_client, dtype=np.int64)
  if config.quantity_skew > 0:
    rng = streams.rng("client_sizes", config.seed, version=stored_value(config, "rng_streams"))
    with np.errstate(over="ignore"):
      f = np.round(n * rng.lognormal(0.0, config.quantity_skew, size=n.shape))
    if not (f < 2**31).all():  # inf would cast to garbage (silently equal sizes); round_indices draws int32 indices
      raise DataError(
        f"config.quantity_skew={config.quantity_skew} is too large: a client's size "
        f"(examples_per_client x lognormal(0, quantity_skew)) reaches {f.max():.3g} >= 2**31 examples; lower it"
      )
    n = f.astype(np.int64)
  return np.maximum(n, config.batch_size)


def round_indices(config, round_: int, clients: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Example indices each sampled client trains on in ``round_``: [k, local_steps * batch_size]."""
  per = config.local_steps * config.batch_size
  return np.stack(
    [np.random.default_rng([config.seed, round_, int(c)]).integers(0, sizes[c], per) for c in clients]
  ).astype(np.int32)


class SyntheticClients:
  """Client k is hospital profile k of ``sites.make_sites``; the held-out profile is the unseen site. Sites
  show catheters and guidewires (data type ``catheter_guidewire``), and vessels too (``all``) for a 4-class
  model."""

  def __init__(self, config):
    if config.data.unseen_site:
      raise DataError(
        f"config.data.unseen_site={config.data.unseen_site!r} applies to tfds sources only; "
        "synthetic data always evaluates its own unseen hospital profile; set it to '' or use "
        "config.data.source='tfds:<name>'"
      )
    self.config = config
    # a 4-class model (+ vessel) sees every structure labelled; a 3-class one catheter and guidewire only
    kind = "all" if config.model.num_classes == 4 else sites_lib.DEFAULT_DATA_TYPE
    # = site_table(make_sites(...)) bit for bit, at ~200 bytes a client instead of ~3 KB of profiles
    self.site_names = sites_lib.ClientNames(config.num_clients)
    self.unseen_name = sites_lib.UNSEEN_SITE.name
    self.table = sites_lib.client_table(config.num_clients, kind)
    self.physics = stored_value(config, "data.synthetic_physics")  # a stored config from before the key: its images
    self.sizes = client_sizes(config)

  def round_batches(self, round_: int, clients: np.ndarray, rows: slice | None = None):
    """Batches of ``clients[rows]`` (all when None)."""
    c = self.config
    clients = np.asarray(clients)[rows if rows is not None else slice(None)]
    idx = round_indices(c, round_, clients, self.sizes)
    images, masks = synth.generate(
      c.seed,
      self.table,
      np.asarray(clients, np.int32),
      idx,
      c.image_size,
      split=0,
      field_size=c.data.synthetic_field_size,
      physics=self.physics,
    )
    s, b, h = c.local_steps, c.batch_size, c.image_size
    return images.reshape(len(clients), s, b, h, h, 1), masks.reshape(len(clients), s, b, h, h)

  def eval_sets(self, site_ids: list[int] | None = None) -> dict[str, tuple[Any, Any]]:
    """Held-out split (split=1) of the given training sites (default all) and the unseen site (keyed
    ``sites.UNSEEN_KEY``: the same images whatever ``config.num_clients``; with ``data.unseen_key='num_clients'``
    keyed by the client count, as before the key existed)."""
    c = self.config
    ids = list(range(c.num_clients)) if site_ids is None else list(site_ids)
    idx = np.arange(c.eval.examples_per_site, dtype=np.int32)[None]
    out = {}
    # a stored config without data.unseen_key (fedkd.eval of a run made before it existed): its old images
    unseen_key = sites_lib.UNSEEN_KEY if c.data.get("unseen_key", "num_clients") == "fixed" else c.num_clients
    sets = [(i, i, self.site_names[i]) for i in ids] + [(c.num_clients, unseen_key, self.unseen_name)]
    for row, key, name in sets:
      im, m = synth.generate(
        c.seed,
        self.table,
        np.array([row], np.int32),
        idx,
        c.image_size,
        split=1,
        field_size=c.data.synthetic_field_size,
        physics=self.physics,
        key_ids=np.array([key], np.int32),
      )
      out[name] = (im[0], m[0])
    return out

  def get_state(self) -> dict:
    return {}

  def damaged(self, state: dict) -> str | None:
    """Why a checkpoint's data state cannot be one this data wrote (None: it can): synthetic data keeps none."""
    del state

  def set_state(self, state: dict) -> None:
    del state

  def prefetch(self, round_: int, clients: np.ndarray, rows: slice | None = None) -> None:
    """Nothing to prepare: the images are rendered on the device, queued behind the round."""
    del round_, clients, rows

  def close(self) -> None:
    pass


# --------------------------------------------------------------------------------------------
# TFDS + grain
# --------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Square-resizes (bilinear image, nearest mask) when the record is not ``size`` x ``size``."""
  if image.shape[0] == size and image.shape[1] == size:
    return image, mask
  from PIL import Image

  im = Image.fromarray(image[..., 0]).resize((size, size), Image.BILINEAR)
  mk = Image.fromarray(mask).resize((size, size), Image.NEAREST)
  return np.asarray(im)[..., None], np.asarray(mk)


MIN_CROP = 8  # smallest random crop (pixels) Augment takes
MAX_UPSCALE = 4  # records are resized to config.image_size; more than this enlargement is refused


def min_record_side(image_size: int) -> int:
  """Smallest record height/width that feeds ``image_size`` training: at least ``MIN_CROP`` (the crop)
  and at most a ``MAX_UPSCALE``-fold enlargement (a 4x4 frame blown up to 128 px is no X-ray)."""
  return max(MIN_CROP, -(-int(image_size) // MAX_UPSCALE))


def _too_small(what: str, h: int, w: int, image_size: int, smallest: str | None = None) -> DataError:
  return DataError(
    f"{what}: images are {h}x{w} (HxW) pixels, too small for config.image_size={image_size} "
    f"(the minimum is {min_record_side(image_size)} px a side: at most a {MAX_UPSCALE}x "
    f"enlargement, crops of at least {MIN_CROP} px); rebuild the dataset from full-resolution "
    f"images or lower config.image_size to at most {MAX_UPSCALE * min(h, w)}"
    + (f" (the smallest is record {smallest!r})" if smallest else "")
  )


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random crop (scale 0.8-1), flips, 90-degree and small rotations, intensity jitter (gamma,
  contrast, brightness). Geometry is applied identically to image and mask (nearest for the mask).
  Records are resized to ``image_size``; ones smaller than ``min_record_side(image_size)`` a side
  raise ``DataError`` (TfdsClients checks each split's smallest record, as its build recorded it, when it opens
  the data; a dataset built before that was recorded, its first record)."""

  image_size: int
  enabled: bool = True
  max_rotation_deg: float = 15.0

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image = np.asarray(record["image"], np.uint8)
    mask = np.asarray(record["mask"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    h, w = mask.shape
    if min(h, w) < min_record_side(self.image_size):
      where = f"record {record.get('id', '?')!r} of site {record.get('site', '?')!r}"
      raise _too_small(where, h, w, self.image_size)
    if self.enabled:
      scale = rng.uniform(0.8, 1.0)
      ch, cw = max(MIN_CROP, int(h * scale)), max(MIN_CROP, int(w * scale))
      y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      image, mask = image[y0 : y0 + ch, x0 : x0 + cw], mask[y0 : y0 + ch, x0 : x0 + cw]
    image, mask = _resize(np.ascontiguousarray(image), np.ascontiguousarray(mask), self.image_size)
    x = image.astype(np.float32) / 255.0
    y = mask.astype(np.int32)
    if self.enabled:
      if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
      if rng.random() < 0.5:
        x, y = x[::-1], y[::-1]
      k = int(rng.integers(0, 4))
      x, y = np.rot90(x, k), np.rot90(y, k)
      if self.max_rotation_deg > 0:
        from scipy import ndimage

        angle = rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)
        x = ndimage.rotate(x, angle, axes=(1, 0), reshape=False, order=1, mode="reflect")
        y = ndimage.rotate(y, angle, axes=(1, 0), reshape=False, order=0, mode="reflect")
      gamma = np.exp(rng.uniform(-0.3, 0.3))
      x = np.clip(x, 0.0, 1.0) ** gamma
      x = (x - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
      x = np.clip(x, 0.0, 1.0)
    return {"image": np.ascontiguousarray(x, np.float32), "mask": np.ascontiguousarray(y, np.int32)}


class _Concat:
  """Random-access concatenation of data sources (global index -> (source, local index))."""

  def __init__(self, sources):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, i):
    s = int(np.searchsorted(self.offsets, i, side="right") - 1)
    return self.sources[s][int(i - self.offsets[s])]


class _Subset:
  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


# Worker processes of TfdsClients (config.data.workers > 0): each holds the clients' example pools and
# builds a client's grain dataset when first asked, exactly as the main process would.
_WORKER: dict = {}


# Ctrl-C at a terminal (and a SIGTERM sent to every process of a job, as Slurm and Kubernetes do) reaches the
# workers too. The training process owns them: it finishes the round, saves it and then closes the pool; a
# worker that died of the signal would fail that round instead. So workers ignore both, and are started with
# them blocked (a signal mask survives the spawn's exec) until they do, so one arriving while a worker still
# imports is dropped as well.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked():
  """Blocks SIGINT and SIGTERM in the calling thread (the process still gets them: another thread takes them
  and the main thread runs the handler); worker processes started inside inherit the mask."""
  if not hasattr(signal, "pthread_sigmask"):
    yield
    return
  old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exit_with(parent) -> None:
  """Ends this worker process when ``parent`` (the training process) has ended, however it ended: killed
  (SIGKILL, the OOM killer) it cannot close the pool, and a worker would wait for tasks forever, since it
  holds both ends of its own task queue."""
  from multiprocessing.connection import wait

  wait([parent.sentinel])
  os._exit(1)


def _worker_init(pool, parts, seed: int, aug, batch_size: int) -> None:
  for s in _STOP_SIGNALS:
    signal.signal(s, signal.SIG_IGN)
  if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
  parent = multiprocessing.parent_process()
  if parent is not None:
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="fedkd-exit-with-parent").start()
  _WORKER.update(pool=pool, parts=parts, seed=seed, aug=aug, batch_size=batch_size, datasets={})


# grain's shuffle maps index i of an epoch of n examples to index_shuffle(i, n - 1, seed + epoch): a 4-round Simon
# cipher on a block of at least 16 bits, cycle-walked back into [0, n). A client of n examples walks about 65536 / n
# cipher calls per example (2,048 at n = 32: about 1 ms an example), most of a cross-device round's host time.
# _epoch_permutation computes the same permutation for a whole epoch at once from the cipher's 65536-entry table, in
# numpy; a client of more than 2**16 examples walks about 4 calls or fewer an example, and keeps grain's own, except
# where grain's block is too small for it (_grain_block_is_short).
_TABLE_EXAMPLES = 2**16  # epochs of at most this many examples: a 16-bit block, computed as a table
_EPOCHS_KEPT = 2  # per-epoch permutations a client's dataset keeps (a batch may straddle two epochs)
_M32 = 0xFFFFFFFF


def _seed_seq(seed: int, count: int) -> list[int]:
  """``std::seed_seq{seed}.generate`` of ``count`` 32-bit words (C++ [rand.util.seedseq]): the cipher's round keys."""
  v, n, s = [seed & _M32], count, 1
  b = [0x8B8B8B8B] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q = p + t
  m = max(s + 1, n)

  def mix(x: int) -> int:
    return x ^ (x >> 27)

  for k in range(m):
    r1 = (1664525 * mix(b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n])) & _M32
    r2 = (r1 + (s if k == 0 else k % n + v[k - 1] if k <= s else k % n)) & _M32
    b[(k + p) % n] = (b[(k + p) % n] + r1) & _M32
    b[(k + q) % n] = (b[(k + q) % n] + r2) & _M32
    b[k % n] = r2
  for k in range(m, m + n):
    r3 = (1566083941 * mix((b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & _M32)) & _M32
    r4 = (r3 - k % n) & _M32
    b[(k + p) % n] ^= r3
    b[(k + q) % n] ^= r4
    b[k % n] = r4
  return b


_BYTE = np.arange(256, dtype=np.uint8)
# Simon's round function on 8-bit words: (x <<< 1 & x <<< 8) ^ x <<< 2, where x <<< 8 = x
_SIMON8_F = (((_BYTE << 1) | (_BYTE >> 7)) & _BYTE) ^ ((_BYTE << 2) | (_BYTE >> 6))


def _epoch_permutation(n: int, seed: int) -> np.ndarray:
  """``[index_shuffle(i, max_index=n - 1, seed=seed, rounds=4) for i in range(n)]`` of grain (0 < n <= 2**16).

  The cipher permutes [0, 2**16) (two 8-bit words, four rounds keyed by ``std::seed_seq{seed}``); grain re-encrypts
  until the value lands in [0, n). Here the cipher is a table ``e`` of all 65536 values, and ``nxt[x]`` the first
  of e(x), e(e(x)), ... e^(2^j)(x) that is below n (else e^(2^j)(x)), doubled j times until every start
  0 .. n - 1 has landed: at most 16 passes over the table."""
  if not 0 < n <= _TABLE_EXAMPLES:
    raise ValueError(f"_epoch_permutation covers epochs of 1 .. {_TABLE_EXAMPLES} examples, not {n}")
  if n == 1:
    return np.zeros(1, np.int64)
  keys = [np.uint8(k & 0xFF) for k in _seed_seq(seed, 4)]
  left, right = np.repeat(_BYTE, 256), np.tile(_BYTE, 256)  # the block value is left * 256 + right
  for i in range(0, len(keys), 2):
    left = left ^ _SIMON8_F[right] ^ keys[i]
    right = right ^ _SIMON8_F[left] ^ keys[i + 1]
  nxt = (left.astype(np.intp) << 8) | right
  starts = np.arange(n)
  while True:
    head = nxt[:n].copy()
    if (head < n).all():
      return head.astype(np.int64)
    # landed values map to themselves in the lookup, so one gather moves every other value on by its own nxt
    nxt[:n] = starts
    jumped = np.take(nxt, nxt)
    jumped[:n] = np.take(nxt, head)
    nxt = jumped


def _grain_block_is_short(n: int) -> bool:
  """Whether grain's shuffle of an epoch of ``n`` examples misses one: its cipher's block is 2**B values, B =
  max(16, ceil(log2(n - 1))) rounded up to even, which is fewer than n where n - 1 is a power of 4 from 2**16 on
  (n = 4**k + 1, k >= 8). There index n - 1 lands on another index's example, and example n - 1 is never drawn."""
  m = n - 1
  return m >= _TABLE_EXAMPLES and m & (m - 1) == 0 and m.bit_length() % 2 == 1


def _walked_past(i: int, n: int, seed: int) -> int:
  """Position ``i`` of a permutation of [0, n) where grain's block is short (``_grain_block_is_short``): grain's
  cipher walk over one value more ([0, n], a block that holds it), walked on past the value n."""
  from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

  x = index_shuffle_module.index_shuffle(i, max_index=n, seed=seed, rounds=4)
  while x == n:  # n lies on i's cycle of the permutation of [0, n], so the walk reaches a value below n
    x = index_shuffle_module.index_shuffle(x, max_index=n, seed=seed, rounds=4)
  return x


@functools.cache
def _epoch_shuffle_class():
  """A subclass of grain's ``MapDataset.shuffle()`` dataset whose clients of at most 2**16 examples compute each
  epoch's permutation once (``_epoch_permutation``) instead of cycle-walking the cipher for every example; None
  where this grain's shuffle is not what it was written against (the first epochs of a probe differ), so a client
  keeps grain's own. Built and checked once per process."""
  import grain

  base = type(grain.MapDataset.range(2).seed(0).shuffle())

  class EpochShuffle(base):
    def __init__(self, parent):
      super().__init__(parent)
      self._epochs: dict[int, np.ndarray] = {}
      self._epochs_lock = threading.Lock()  # the prefetch thread and the main thread read the same client

    def _shuffled_index(self, index: int) -> int:
      n = len(self._parent)
      if n > _TABLE_EXAMPLES and not _grain_block_is_short(n):
        return super()._shuffled_index(index)
      epoch, i = divmod(index, n)
      if n > _TABLE_EXAMPLES:
        return _walked_past(i, n, (self._seed + epoch) % 2**32) + epoch * n
      with self._epochs_lock:
        perm = self._epochs.get(epoch)
        if perm is None:
          perm = self._epochs[epoch] = _epoch_permutation(n, (self._seed + epoch) % 2**32)
          while len(self._epochs) > _EPOCHS_KEPT:
            del self._epochs[min(self._epochs)]
      return int(perm[i]) + epoch * n

  probe = grain.MapDataset.range(1000).seed(76)
  try:
    ref, fast = probe.shuffle(), EpochShuffle(probe)
    same = all(ref[i] == fast[i] for i in (0, 1, 998, 999, 1000, 2500))
  except AttributeError:  # a grain without the _seed / _shuffled_index this overrides
    same = False
  return EpochShuffle if same else None


def _shuffle(dataset):
  """``dataset.shuffle()``: the same examples in the same order, at a small fraction of grain's cost for small
  clients (see ``_epoch_shuffle_class``)."""
  cls = _epoch_shuffle_class()
  return dataset.shuffle() if cls is None else cls(dataset)


def _client_dataset(pool, parts, seed: int, aug, batch_size: int, k: int):
  """Client k's batches, random access: ``dataset[t]`` is its t-th batch (a pure function of seed, k
  and its examples)."""
  import grain

  return (
    _shuffle(grain.MapDataset.source(_Subset(pool, parts[k])).seed(seed * 100_003 + k))
    .repeat(None)
    .random_map(aug)
    .batch(batch_size, drop_remainder=True)
  )


def _steps(dataset, start: int, steps: int):
  """Batches start .. start + steps - 1 of a client's dataset: (images [steps, B, ...], masks [steps, B, ...])."""
  items = [dataset[start + s] for s in range(steps)]
  return np.stack([i["image"] for i in items]), np.stack([i["mask"] for i in items])


def _worker_batches(k: int, start: int, steps: int):
  w = _WORKER
  if k not in w["datasets"]:
    w["datasets"][k] = _client_dataset(w["pool"], w["parts"], w["seed"], w["aug"], w["batch_size"], k)
  return _steps(w["datasets"][k], start, steps)


def _stop_pool(ex: concurrent.futures.ProcessPoolExecutor, timeout: float = 10.0) -> None:
  """Shuts the worker pool down and waits for its processes, killing any still there after ``timeout`` s. A
  worker killed while it held the task queue's lock (the OOM killer, ``kill -9``) leaves the others waiting for
  that lock forever, and they ignore the SIGTERM the executor ends a broken pool with (see _worker_init), so
  ``shutdown(wait=True)`` alone would never return."""
  procs = list((getattr(ex, "_processes", None) or {}).values())
  ex.shutdown(wait=False, cancel_futures=True)
  deadline = time.monotonic() + timeout
  for p in procs:
    p.join(max(0.0, deadline - time.monotonic()))
  for p in procs:
    if p.is_alive():
      p.kill()
      p.join()


def eval_records(num_records: int, config) -> np.ndarray:
  """The indices of the test records a site is scored on: all of them when it has at most
  ``config.eval.examples_per_site``, else that many, ``eval.pick='spread'`` evenly over the split (first and last
  included; a folder's cine runs are consecutive records, so the first ones could all be frames of one run) or
  ``'first'`` the first ones (a stored config from before the key: what its run scored)."""
  n = min(num_records, config.eval.examples_per_site)
  if stored_value(config, "eval.pick") == "first" or n == num_records:
    return np.arange(n)
  return np.round(np.linspace(0, num_records - 1, n)).astype(np.int64)  # distinct: the step is at least 1


def _relative_local(path: str) -> bool:
  """``path`` names a local folder relative to the current one (not absolute, not ``~/...``, not a URL)."""
  return bool(path) and "://" not in path and not path.startswith("~") and not os.path.isabs(path)


def _parse_source(source: str) -> str:
  if not source.startswith("tfds:") or len(source) <= 5:
    raise DataError(f"config.data.source={source!r}: use 'synthetic' or 'tfds:<dataset name>'")
  return source[5:]


class TfdsClients:
  """Clients over a prepared TFDS dataset. Sites are builder configs (``data.tfds_configs``, default
  all of the dataset's configs) or a single site for single-config datasets; ``data.unseen_site``
  names a config kept out of training and evaluated as the unseen hospital. ``training=False`` (``fedkd.eval``, the
  preview) opens the data to evaluate only: the checks that guard training alone (every training site has a test
  split, no training label beyond ``model.num_classes``) are left to training, so that a finished run on a dataset
  built before they existed can still be evaluated."""

  def __init__(self, config, training: bool = True):
    from fedkd.data import tfds as fedkd_tfds

    self.config = config
    self.training = training
    d = config.data
    name = _parse_source(d.source)
    if _relative_local(d.tfds_data_dir):
      # stored absolute in the run's config (config.json, checkpoints): a relative folder would name another
      # one for a later fedkd.eval or resume started from another folder
      d.tfds_data_dir = os.path.abspath(d.tfds_data_dir)
    data_dir = os.path.expanduser(d.tfds_data_dir)
    try:
      prepared = fedkd_tfds.prepared_configs(name, data_dir)
    except Exception as e:  # unknown dataset name
      raise DataError(f"config.data.source={d.source!r}: {str(e).splitlines()[0][:200]}") from None
    configs = [s.strip() for s in d.tfds_configs.split(",") if s.strip()] or prepared
    if not configs:
      raise DataError(
        f"no prepared TFDS dataset {name!r} in data_dir={data_dir!r}; build it first "
        f"with {fedkd_tfds.build_command(name, data_dir)}, "
        "or point config.data.tfds_data_dir at the folder that holds it (fedkd.eval: --tfds_data_dir=DIR)"
      )
    dup = sorted({c for c in configs if configs.count(c) > 1})
    if dup:
      raise DataError(f"config.data.tfds_configs={d.tfds_configs!r} lists {dup} more than once; list every site once")
    unseen = d.unseen_site or None
    if unseen and unseen not in configs:
      raise DataError(
        f"config.data.unseen_site={unseen!r} is not one of the dataset configs "
        f"{configs}; pick one of them or set it to ''"
      )
    train_cfgs = [c for c in configs if c != unseen]
    if not train_cfgs:
      raise DataError(
        f"config.data.unseen_site={unseen!r} leaves no site to train on; list more configs in config.data.tfds_configs"
      )
    build_hint = f"python -m fedkd.data.tfds.build --dataset={name} --data_dir={data_dir}"

    def open_site(cfg):
      """The prepared builder of site ``cfg`` (a UserError keeps its own message and fix)."""
      try:
        return fedkd_tfds.load_builder(name, data_dir, config=cfg)
      except UserError as e:
        raise DataError(f"TFDS dataset {name!r}, site {cfg!r}: {e}") from None
      except Exception as e:
        raise DataError(
          f"cannot open TFDS dataset {name!r}/{cfg} in data_dir={data_dir!r} "
          f"({reason(e)}); build it "
          f"first with {build_hint}"
        ) from None

    def open_split(builder, cfg, split):
      """The split's records, refused when its smallest image (recorded by the build; for a dataset built
      before fedkd recorded it, the first record's) cannot feed ``config.image_size``. Of a test split only
      ``config.eval.examples_per_site`` records are ever read (:func:`eval_records`): a too small image
      elsewhere is no reason to refuse, so those are checked one by one instead."""
      # a damaged record file fails on the first read: SegmentationSource makes that one line
      src = fedkd_tfds.SegmentationSource(builder.as_data_source(split=split), name=f"{name}/{cfg}:{split}")
      small = fedkd_tfds.smallest_image(builder, split)
      if small is not None:
        h, w, smallest = small["height"], small["width"], small["id"]
      elif len(src):
        (h, w), smallest = np.asarray(src[0]["mask"]).shape[:2], None
      else:
        return src
      side = min_record_side(config.image_size)
      if min(h, w) < side and split == "test" and len(src) > config.eval.examples_per_site:
        for i in eval_records(len(src), config):
          record = src[int(i)]
          h, w = np.asarray(record["mask"]).shape[:2]
          if min(h, w) < side:
            smallest = record.get("id")
            break
        else:
          return src
      if min(h, w) < side:
        raise _too_small(f"TFDS dataset {name!r}, site {cfg!r} ({split} split)", h, w, config.image_size, smallest)
      return src

    def num_records(cfg, split):  # None: no such split
      splits = builders[cfg].info.splits
      return splits[split].num_examples if split in splits.keys() else None

    builders = {c: open_site(c) for c in configs}
    # every training site is scored on its test split: one without would silently be left out of the per-site
    # table and of the mean over training sites
    untested = [c for c in train_cfgs if num_records(c, "train") and not num_records(c, "test")]
    self.untested = untested  # opened to evaluate only: these sites get no row (fedkd.eval says so)
    if untested and training:
      raise DataError(
        f"TFDS dataset {name!r}: training site(s) {untested} have no test split to evaluate on (training scores "
        "every training site on its test split; the mean over training sites would leave them out); rebuild them "
        f"with test examples (xray_folder: a 'test' list in splits.json) with {build_hint} "
        "--manual_dir=<the site's folder> --site=<its name> --overwrite, or leave them out of config.data.tfds_configs"
      )
    train_sources = []
    for c in train_cfgs:
      n_train = num_records(c, "train")
      if not n_train:
        have = f"its splits: {list(builders[c].info.splits.keys())}" if n_train is None else "its train split is empty"
        raise DataError(
          f"TFDS dataset {name!r}, site {c!r} has no training records ({have}); evaluate it "
          f"only with config.data.unseen_site={c!r}, leave it out of config.data.tfds_configs, "
          "or rebuild it with training examples (xray_folder: list them under 'train' in "
          f"splits.json) with {build_hint}"
        )
      train_sources.append(open_split(builders[c], c, "train"))
    self._test = {}
    for c in train_cfgs + ([unseen] if unseen else []):
      if num_records(c, "test"):
        self._test[c] = open_split(builders[c], c, "test")
      elif c == unseen:  # the unseen site exists only for evaluation
        raise DataError(
          f"TFDS dataset {name!r}: the unseen site {c!r} has no test records (its splits: "
          f"{list(builders[c].info.splits.keys())}); pick another config.data.unseen_site "
          "or rebuild it with test examples"
        )
    self.unseen_name = unseen
    self._site_records = {c: len(src) for c, src in zip(train_cfgs, train_sources)}
    # what the records hold, as the build recorded it (None: built before fedkd recorded it)
    self._site_content = {c: fedkd_tfds.content_digest(builders[c], "train") for c in train_cfgs}
    # the highest class in each training split, as the build recorded it (None: built before fedkd recorded it)
    self._train_labels = {c: fedkd_tfds.largest_label(builders[c], "train") for c in train_cfgs}
    pool = _Concat(train_sources)
    site_of = np.repeat(np.arange(len(train_sources)), [len(s) for s in train_sources])
    n = config.num_clients
    if d.partition == "by_site":
      parts = partition.by_site(site_of, n)
    elif d.partition == "dirichlet":
      parts = partition.dirichlet(site_of, n, d.dirichlet_alpha, config.seed, min_size=config.batch_size)
    elif d.partition == "iid":
      parts = partition.quantity_skew(len(pool), n, config.quantity_skew, config.seed, min_size=config.batch_size)
    else:
      raise DataError(f"config.data.partition={d.partition!r}: use by_site, dirichlet or iid")
    cfg_names = list(train_cfgs)
    # training only: evaluating (fedkd.eval, the preview) draws no training batch
    small = [k for k, p in enumerate(parts) if len(p) < config.batch_size] if training else []
    if small:
      k = small[0]
      held = sorted({cfg_names[int(s)] for s in site_of[parts[k]]})
      where = f" (site {held[0]!r})" if len(held) == 1 else f" (sites {held})" if held else ""
      raise DataError(
        f"client {k}{where} got {len(parts[k])} training examples, fewer than batch_size={config.batch_size}"
        f"{f' ({len(small)} such clients)' if len(small) > 1 else ''}; lower config.batch_size or "
        "config.num_clients, or add training images to that site"
      )
    self.site_names = [cfg_names[int(np.bincount(site_of[p]).argmax())] for p in parts]
    self.sizes = np.array([len(p) for p in parts], np.int64)
    self._aug = Augment(config.image_size, enabled=bool(d.augment))
    self._pool, self._parts = pool, parts
    # Random access: batch t of client k is dataset(k)[t]; the state is each client's next t, kept
    # identical on every process so any process can serve any client in any round. The per-client
    # grain datasets are built when a client is first sampled (10,000 registered clients need not
    # build 10,000 pipelines up front); each is a pure function of (seed, k, its examples).
    self._datasets: dict[int, Any] = {}
    self._lock = threading.Lock()  # the prefetch thread and the main thread build datasets
    self._next = np.zeros(n, np.int64)
    # Decode + augmentation in worker processes (data.workers), and the next round's batches prepared
    # in a background thread while this round trains (data.prefetch): (key, future) of that round.
    self._pool_exec = None
    self._prefetch_exec = None
    self._pending = None
    self.prefetched = 0  # rounds served from a prefetch

  def _dataset(self, k: int):
    with self._lock:
      if k not in self._datasets:
        c = self.config
        self._datasets[k] = _client_dataset(self._pool, self._parts, c.seed, self._aug, c.batch_size, k)
      return self._datasets[k]

  def _workers(self):
    if self._pool_exec is None and self.config.data.workers > 0:
      c = self.config
      # spawn, not fork: the parent holds JAX's threads, which fork would copy mid-state
      self._pool_exec = concurrent.futures.ProcessPoolExecutor(
        c.data.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(self._pool, self._parts, c.seed, self._aug, c.batch_size),
      )
    return self._pool_exec

  def _batches(self, clients: np.ndarray, starts: np.ndarray):
    """(images [k, steps, B, H, W, 1], masks [k, steps, B, H, W]) of ``clients`` from batch positions
    ``starts``: a pure function of (clients, starts), in this process or in the worker processes."""
    steps = self.config.local_steps
    pool = self._workers()
    if pool is not None:
      with _stop_signals_blocked():  # submit starts the worker processes, as they are needed
        futures = [pool.submit(_worker_batches, int(k), int(t), steps) for k, t in zip(clients, starts)]
      parts = [f.result() for f in futures]
    else:
      parts = [_steps(self._dataset(int(k)), int(t), steps) for k, t in zip(clients, starts)]
    return np.stack([x for x, _ in parts]), np.stack([y for _, y in parts])

  def _request(self, round_: int, clients: np.ndarray, rows: slice | None):
    """(the clients served here, their batch positions now, the key a prefetch is matched by)."""
    sel = np.asarray(clients)[rows if rows is not None else slice(None)]
    starts = self._next[sel].copy()
    return sel, starts, (round_, tuple(int(k) for k in sel), tuple(int(t) for t in starts))

  def prefetch(self, round_: int, clients: np.ndarray, rows: slice | None = None) -> None:
    """Starts preparing ``round_batches(round_, clients, rows)`` in a background thread (with
    ``data.prefetch``), from the clients' positions now; nothing advances until that call takes it."""
    if not self.config.data.prefetch:
      return
    sel, starts, key = self._request(round_, clients, rows)
    if self._prefetch_exec is None:
      self._prefetch_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedkd-prefetch")
    self._pending = (key, self._prefetch_exec.submit(self._batches, sel, starts))

  def close(self) -> None:
    """Stops the worker processes and the prefetch thread (the training loop calls it when the run ends)."""
    if self._prefetch_exec is not None:
      self._prefetch_exec.shutdown(wait=True, cancel_futures=True)
    if self._pool_exec is not None:
      _stop_pool(self._pool_exec)
    self._prefetch_exec = self._pool_exec = self._pending = None

  def round_batches(self, round_: int, clients: np.ndarray, rows: slice | None = None):
    """Batches of ``clients[rows]`` (all when None); every sampled client's position advances. A
    prefetched result is used when it was made for this round, these clients and their positions now."""
    c = self.config
    sel, starts, key = self._request(round_, clients, rows)
    pending, self._pending = self._pending, None
    if pending is not None and pending[0] == key:
      xs, ys = pending[1].result()  # re-raises a DataError of the background thread here
      self.prefetched += 1
    else:
      xs, ys = self._batches(sel, starts)
    self._next[np.asarray(clients)] += c.local_steps
    if ys.max() >= c.model.num_classes:
      raise DataError(
        f"dataset {c.data.source!r} has label value {int(ys.max())} but "
        f"config.model.num_classes={c.model.num_classes}; raise model.num_classes"
      )
    return xs, ys

  def eval_sets(self, site_ids: list[int] | None = None) -> dict[str, tuple[Any, Any]]:
    """``eval.examples_per_site`` test examples of every site (:func:`eval_records`; no augmentation). Refuses a
    test label, or (data opened for training) a training label the build recorded, that ``model.num_classes`` has
    no output for: training reads these sets before it writes anything, while a training batch would meet such a
    label only in the round that first draws its record."""
    del site_ids
    aug = Augment(self.config.image_size, enabled=False)
    out = {}
    for site, src in self._test.items():
      picked = eval_records(len(src), self.config)
      if not len(picked):
        continue
      recs = [aug(src[int(i)], np.random.default_rng(0)) for i in picked]
      out[site] = (np.stack([r["image"] for r in recs]), np.stack([r["mask"] for r in recs]))
      top = int(out[site][1].max())
      if top >= self.config.model.num_classes:
        raise DataError(
          f"dataset {self.config.data.source!r}, site {site!r}: test label value {top} but "
          f"config.model.num_classes={self.config.model.num_classes}; raise model.num_classes"
        )
    if not out:
      raise DataError(
        f"dataset {self.config.data.source!r} has no test split to evaluate on; "
        "add one (for xray_folder: a splits.json with a 'test' list) and rebuild"
      )
    for site, top in self._train_labels.items() if self.training else ():
      if top is not None and top["label"] >= self.config.model.num_classes:
        raise DataError(
          f"dataset {self.config.data.source!r}, site {site!r}: training record {top['id']!r} has label value "
          f"{top['label']} but config.model.num_classes={self.config.model.num_classes}; raise model.num_classes"
        )
    return out

  def get_state(self) -> dict:
    """Every client's next batch position, and the number and content digest of every site's training records
    (what the positions index)."""
    return {
      "next_batch": self._next.tolist(),
      "site_records": dict(self._site_records),
      "site_content": {site: d for site, d in self._site_content.items() if d is not None},
    }

  def damaged(self, state: dict) -> str | None:
    """Why a checkpoint's data state cannot be one this data wrote (None: it can): its positions (``next_batch``)
    must be a list of whole numbers >= 0 (their count is checked by :meth:`set_state`)."""
    nxt = state.get("next_batch")
    if nxt is None:
      return None
    if not isinstance(nxt, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in nxt):
      return f"its data state's next_batch is {json.dumps(nxt)[:60]}, not a list of batch counts"
    bad = [v for v in nxt if not 0 <= v < 2**62]
    if bad:
      return f"its data state's next_batch holds {bad[0]}, not a batch count >= 0"
    digests = state.get("site_content", {})
    from fedkd.data.tfds.records import is_content_digest

    if not isinstance(digests, dict) or not all(is_content_digest(d) for d in digests.values()):
      return f"its data state's site_content is {json.dumps(digests)[:60]}, not a site -> digest mapping"
    return None

  def set_state(self, state: dict) -> None:
    """Restores the positions of ``get_state``; refused when the training sites now hold other numbers of records
    than when it was saved (a site rebuilt with more or fewer images): the positions would index other
    examples, and the partition and the FedAvg weights would change in the middle of the run; and when a site holds
    other records of the same number (its content digest, recorded by the build, differs). A state saved before
    the record counts were stored restores the positions only; one saved before the digests, or data built before
    fedkd recorded them, has the counts checked only."""
    why = self.damaged(state)
    if why is not None:
      raise DataError(f"the checkpoint is damaged: {why}; move that checkpoint away or use a new --workdir")
    nxt = state.get("next_batch")
    if nxt is None or len(nxt) != len(self._next):
      held = "no positions" if nxt is None else f"positions of {len(nxt)} clients"
      raise DataError(  # the configs matched (resume checks them first): the data or the checkpoint changed
        f"the checkpoint's data state holds {held}, but this dataset gives {len(self._next)} clients: the dataset's "
        "sites changed since it was written, or the checkpoint is damaged; restore the dataset the run was started "
        "with, or move that checkpoint away (or use a new --workdir)"
      )
    saved = state.get("site_records")
    if saved is not None and saved != self._site_records:
      changed = [
        f"{site!r} {saved.get(site, 0)} -> {self._site_records.get(site, 0)}"
        for site in sorted(set(saved) | set(self._site_records))
        if saved.get(site) != self._site_records.get(site)
      ]
      raise DataError(
        f"dataset {self.config.data.source!r} changed since the checkpoint was written: training records per "
        f"site {', '.join(changed)}; resuming would continue on other examples, partitions and client weights. "
        "Restore the dataset the run was started with, or start a new --workdir"
      )
    # a site whose build recorded its content then and now (a state saved before the digests were stored, or a
    # dataset built before fedkd recorded them, has only the counts checked)
    digests = state.get("site_content") or {}
    other = sorted(s for s, d in digests.items() if self._site_content.get(s) not in (None, d))
    if other:
      raise DataError(
        f"dataset {self.config.data.source!r} changed since the checkpoint was written: site(s) {other} hold "
        "other training records than then (the same number, other images, masks or ids: a site rebuilt from "
        "another folder or export); resuming would continue on other examples. Restore the dataset the run was "
        "started with, or start a new --workdir"
      )
    self._next = np.asarray(nxt, np.int64)


def make_client_data(config, training: bool = True):
  """The clients' data; ``training=False`` opens it to evaluate only (see ``TfdsClients``)."""
  if config.data.source == "synthetic":
    return SyntheticClients(config)
  return TfdsClients(config, training=training)
