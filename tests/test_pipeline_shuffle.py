"""The TFDS pipeline's per-epoch shuffle: the same permutation as grain's index_shuffle, each epoch computed once."""

import json

import grain
import numpy as np
import pytest
from grain._src.python.dataset.transformations import shuffle as grain_shuffle
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module
from PIL import Image

from fedkd.data import pipeline
from fedkd.data import tfds as fdata
from test_training import tiny_config


def grain_index_shuffle(n: int, seed: int, indices) -> list[int]:
  return [index_shuffle_module.index_shuffle(int(i), max_index=n - 1, seed=seed, rounds=4) for i in indices]


def test_grain_index_shuffle_is_the_published_one():
  """The permutations the published TFDS runs drew (grain 0.2.18's index_shuffle), held here as numbers: a grain
  that shuffles otherwise moves every TFDS result."""
  assert grain_index_shuffle(7, 12345, range(7)) == [0, 4, 5, 1, 3, 6, 2]
  assert grain_index_shuffle(32, 2**32 - 1, range(32)) == [
    15, 31, 5, 29, 0, 4, 13, 8, 7, 27, 17, 24, 2, 6, 12, 26,
    19, 11, 10, 9, 23, 18, 28, 21, 1, 14, 25, 30, 20, 3, 22, 16,
  ]  # fmt: skip
  assert pipeline._epoch_permutation(7, 12345).tolist() == [0, 4, 5, 1, 3, 6, 2]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32, 1000, 2**16])
def test_epoch_permutation_is_grains_index_shuffle(n):
  rng = np.random.default_rng(n)
  for seed in (2**32 - 1, int(rng.integers(2**32))):
    got = pipeline._epoch_permutation(n, seed)
    assert got.dtype == np.int64 and got.shape == (n,)
    idx = np.arange(n) if n <= 1000 else rng.choice(n, 300, replace=False)
    assert got[idx].tolist() == grain_index_shuffle(n, seed, idx), seed
    assert sorted(got.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32, 1000, 2**16 + 2, 2**17 + 1, 2**20 + 3])
def test_client_shuffle_is_grains_across_epochs(n):
  """Three epochs (their first and last indices, and random ones) through the pipeline's shuffle equal grain's
  ``MapDataset.shuffle()``; above 2**16 examples grain's own walk serves."""
  assert pipeline._epoch_shuffle_class() is not None  # the installed grain shuffles as the fast path was written for
  rng = np.random.default_rng(n)
  parent = grain.MapDataset.range(n).seed(2**40 + n)
  ref, fast = parent.shuffle(), pipeline._shuffle(parent)
  edges = [e * n + d for e in range(3) for d in (0, n - 1)]
  idx = sorted(set(edges + rng.integers(0, 3 * n, 10).tolist()))
  assert [fast[i] for i in idx] == [ref[i] for i in idx]


def test_a_client_of_4_to_the_8_plus_1_examples_draws_each_once_an_epoch():
  """grain's shuffle of 2**16 + 1 examples maps index 2**16 onto another index's example and never draws one
  (its cipher's block holds 2**16 values); the pipeline's shuffle draws every example once in each epoch, and is
  grain's for one example more (2**16 + 2)."""
  n = 2**16 + 1
  parent = grain.MapDataset.range(n).seed(5)
  ref, fast = parent.shuffle(), pipeline._shuffle(parent)
  assert len(set(ref[i] for i in range(n))) == n - 1  # grain's own: one example twice, one never
  for epoch in range(2):
    drawn = [fast[epoch * n + i] for i in range(n)]
    assert sorted(drawn) == list(range(n)), epoch
  assert [fast[n + i] for i in range(5)] != [fast[i] for i in range(5)]  # each epoch its own order
  other = grain.MapDataset.range(n + 1).seed(5)
  assert not pipeline._grain_block_is_short(n + 1) and pipeline._grain_block_is_short(4**9 + 1)
  assert [pipeline._shuffle(other)[i] for i in (0, 7, n)] == [other.shuffle()[i] for i in (0, 7, n)]


def test_a_client_epoch_is_computed_once_without_grains_per_example_walk(monkeypatch):
  """Reading three epochs of a 32-example client, batch by batch, makes no cipher walk per example (grain's shuffle
  made 96, ~1 ms each) and computes each epoch's permutation once."""
  pipeline._epoch_shuffle_class()  # its one-time check against grain's own shuffle runs before the counting
  walks, epochs = [], []
  real_walk, real_epoch = index_shuffle_module.index_shuffle, pipeline._epoch_permutation

  class CountingIndexShuffle:
    @staticmethod
    def index_shuffle(*args, **kw):
      walks.append(args)
      return real_walk(*args, **kw)

  monkeypatch.setattr(grain_shuffle, "index_shuffle", CountingIndexShuffle)
  monkeypatch.setattr(pipeline, "_epoch_permutation", lambda n, seed: epochs.append(seed) or real_epoch(n, seed))
  data = pipeline._client_dataset(list(range(100)), [np.arange(40, 72)], 3, lambda x, rng: x, 4, 0)
  drawn = [data[t].tolist() for t in range(24)]  # 24 batches of 4: three epochs of 32
  assert walks == [] and len(epochs) == 3
  assert [sorted(sum(drawn[8 * e : 8 * e + 8], [])) for e in range(3)] == [list(range(40, 72))] * 3


def _hospital(root, seed, n_train, n_test=2, size=32):
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  stems = []
  for i in range(n_train + n_test):
    mask = np.zeros((size, size), np.uint8)
    mask[rng.integers(2, size - 4), 2:-2] = 1
    mask[2:-2, rng.integers(2, size - 2)] = 2
    img = rng.normal(170, 12, (size, size)).clip(0, 255) - 70 * (mask > 0)
    Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"f{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"f{i}.png")
    stems.append(f"f{i}")
  (root / "splits.json").write_text(json.dumps({"train": stems[:n_train], "test": stems[n_train:]}))


def _grains_own_client_dataset(pool, parts, seed, aug, batch_size, k):
  """The pipeline's client dataset with grain's own shuffle (each example's index cycle-walked by
  index_shuffle): the chain the published TFDS runs used."""
  return (
    grain.MapDataset.source(pipeline._Subset(pool, parts[k]))
    .seed(seed * 100_003 + k)
    .shuffle()
    .repeat(None)
    .random_map(aug)
    .batch(batch_size, drop_remainder=True)
  )


def test_tfds_batches_are_bitwise_those_of_grains_shuffle(tmp_path, monkeypatch):
  """Augmented TFDS batches of clients of 3 to 5 examples, over rounds that straddle their epochs, equal the ones
  of grain's own shuffle bit for bit (the example order and every augmentation draw)."""
  out = tmp_path / "tfds"
  for k, (site, n_train) in enumerate([("north", 7), ("south", 5)]):
    _hospital(tmp_path / site, k, n_train)
    fdata.build("xray_folder", out, manual_dir=tmp_path / site, site=site)
  c = tiny_config(num_clients=3, local_steps=2, batch_size=2, image_size=16, quantity_skew=0.5, seed=0)
  c.data.source, c.data.tfds_data_dir, c.data.partition = "tfds:xray_folder", str(out), "iid"

  def batches():
    data = pipeline.make_client_data(c)
    return data.sizes.tolist(), [data.round_batches(r, np.array(k)) for r, k in enumerate([[0, 1, 2], [2, 1], [1, 2]])]

  sizes, fast = batches()
  with monkeypatch.context() as m:
    m.setattr(pipeline, "_client_dataset", _grains_own_client_dataset)
    ref_sizes, ref = batches()
  assert sizes == ref_sizes == [4, 3, 5]  # 4 examples a round: batches that straddle epochs 0-1 and 1-2
  for (x, y), (rx, ry) in zip(fast, ref):
    assert x.dtype == rx.dtype and y.dtype == ry.dtype
    np.testing.assert_array_equal(x, rx, strict=True)
    np.testing.assert_array_equal(y, ry, strict=True)
