"""Training from a TFDS dataset through grain: same training code, exact resume, augmentation."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from fedkd.data import pipeline
from fedkd.data import tfds as fdata
from fedkd.tasks import fedavg
from test_training import Interrupt, tiny_config


def _hospital_folder(root, seed, n_train=6, n_test=3, size=40):
  """A folder of PNG frames with a dark thick 'catheter' and a thin 'guidewire' line."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  stems = []
  for i in range(n_train + n_test):
    img = rng.normal(170, 12, (size, size)).clip(0, 255)
    mask = np.zeros((size, size), np.uint8)
    r = rng.integers(5, size - 8)
    mask[r:r + 4, 3:size - 3] = 1
    c = rng.integers(3, size - 3)
    mask[2:size - 2, c] = 2
    img[mask == 1] -= 80
    img[mask == 2] -= 60
    Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"f{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"f{i}.png")
    stems.append(f"f{i}")
  (root / "splits.json").write_text(json.dumps({"train": stems[:n_train], "test": stems[n_train:]}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp("hospitals")
  out = base / "tfds"
  for k, site in enumerate(["north", "south", "east"]):
    _hospital_folder(base / site, seed=k)
    fdata.build("xray_folder", out, manual_dir=base / site, site=site)
  return str(out)


def tfds_config(data_dir, **kw):
  c = tiny_config(**kw)
  c.data.source = "tfds:xray_folder"
  c.data.tfds_data_dir = data_dir
  c.data.unseen_site = "east"
  c.eval.max_sites = 0
  return c


def test_clients_by_site_and_batches(data_dir):
  c = tfds_config(data_dir)
  data = pipeline.make_client_data(c)
  assert sorted(set(data.site_names)) == ["north", "south"]
  assert data.unseen_name == "east"
  assert data.sizes.tolist() == [3, 3, 3, 3]  # 2 clients per site, 6 train frames each
  xs, ys = data.round_batches(1, np.array([0, 3]))
  assert xs.shape == (2, c.local_steps, c.batch_size, 32, 32, 1) and xs.dtype == np.float32
  assert ys.shape == (2, c.local_steps, c.batch_size, 32, 32)
  assert set(np.unique(ys)) <= {0, 1, 2} and (ys == 2).any()
  sets = data.eval_sets()
  assert set(sets) == {"north", "south", "east"} and sets["east"][0].shape[0] == 2


def test_tfds_training_resumes_exactly(tmp_path, data_dir):
  full = fedavg.run(tfds_config(data_dir), str(tmp_path / "full"), log=lambda _: None)

  def crash(line):
    if line.startswith("round    3/"):
      raise Interrupt

  work = str(tmp_path / "resumed")
  with pytest.raises(Interrupt):
    fedavg.run(tfds_config(data_dir), work, log=crash)
  lines = []
  resumed = fedavg.run(tfds_config(data_dir), work, log=lines.append)
  assert any("resuming from round 2" in l for l in lines)
  for a, b in zip(jax.tree.leaves(full["state"]["params"]), jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_augmentation_is_deterministic_and_keeps_labels_aligned():
  rng = np.random.default_rng(0)
  mask = np.zeros((48, 48), np.uint8)
  mask[20:28, :] = 1
  image = np.where(mask[..., None] == 1, 40, 200).astype(np.uint8)
  aug = pipeline.Augment(32)
  a = aug({"image": image, "mask": mask}, np.random.default_rng(5))
  b = aug({"image": image, "mask": mask}, np.random.default_rng(5))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["mask"], b["mask"])
  for seed in range(5):
    out = aug({"image": image, "mask": mask}, np.random.default_rng(seed))
    assert out["image"].shape == (32, 32, 1) and out["mask"].shape == (32, 32)
    dark = out["image"][..., 0][out["mask"] == 1]
    bright = out["image"][..., 0][out["mask"] == 0]
    assert dark.mean() < bright.mean()  # geometry applied identically to image and mask
  plain = pipeline.Augment(32, enabled=False)({"image": image, "mask": mask}, rng)
  assert plain["mask"][16, 5] == 1 and plain["mask"][5, 5] == 0  # rows 20-27 of 48 -> 13-18 of 32


def test_missing_dataset_is_a_clear_error(tmp_path):
  c = tfds_config(str(tmp_path / "empty"))
  with pytest.raises(pipeline.DataError, match="build it first"):
    pipeline.make_client_data(c)


def test_tfds_10000_clients_by_site(tmp_path):
  """10,000 registered clients over a prepared TFDS dataset (2 sites x 5,000 frames, one frame per
  client): the partition and the per-client pipelines scale, client k's batch is exactly the record
  by_site deals it (site k % 2, record k // 2), and a federated run samples from them."""
  from fedkd.data.tfds import synthetic_endovascular as se

  sites = se.site_names()[:2]
  out = tmp_path / "tfds"
  for site in sites:
    fdata.build("synthetic_endovascular", out, site=site, image_size=32, num_train=5000, num_test=2)
  cfgs = [se.synthetic_config(s, image_size=32, num_train=5000, num_test=2).name for s in sites]
  c = tiny_config(num_clients=10_000, clients_per_round=8, batch_size=1, num_rounds=2)
  c.data.source = "tfds:synthetic_endovascular"
  c.data.tfds_data_dir = str(out)
  c.data.tfds_configs = ",".join(cfgs)
  c.data.augment = False
  c.eval.max_sites = 0
  data = pipeline.make_client_data(c)
  assert data.sizes.tolist() == [1] * 10_000
  assert data.site_names[:4] == [cfgs[0], cfgs[1], cfgs[0], cfgs[1]]
  clients = np.array([9_999, 0, 4_321, 1_234])
  xs, _ = data.round_batches(0, clients)
  assert len(data._datasets) == 4  # pipelines only for the clients sampled so far
  aug = pipeline.Augment(32, enabled=False)
  for k, x in zip(clients, xs):
    rec = fdata.load_source("synthetic_endovascular", "train", str(out), config=cfgs[k % 2])[int(k // 2)]
    np.testing.assert_array_equal(x[0, 0], aug(rec, np.random.default_rng(0))["image"])
  result = fedavg.run(c, str(tmp_path / "run"), log=lambda _: None)
  assert int(result["state"]["round"]) == 2
