"""Training from a TFDS dataset through grain: same training code, exact resume, augmentation."""

import functools
import json
import shutil

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
    mask[r : r + 4, 3 : size - 3] = 1
    c = rng.integers(3, size - 3)
    mask[2 : size - 2, c] = 2
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


def test_a_data_state_of_another_client_count_names_both_causes(data_dir):
  """A checkpoint's data state with positions for another number of clients, under the same config (the resume
  compares configs first): the advice was 'resume with the config the checkpoint was written with', which it
  already is; the sites changed or the checkpoint is damaged."""
  data = pipeline.make_client_data(tfds_config(data_dir))
  state = data.get_state()
  with pytest.raises(pipeline.DataError) as e:
    data.set_state(dict(state, next_batch=state["next_batch"][:3]))
  msg = str(e.value)
  assert "holds positions of 3 clients, but this dataset gives 4 clients" in msg and "damaged" in msg, msg
  assert "resume with the config" not in msg
  data.set_state(state)


def test_tfds_training_resumes_exactly(tmp_path, data_dir, monkeypatch):
  """With the next round's batches prefetched (the default) and, for the uninterrupted run, two worker
  processes: every round after the first is served from the prefetch, and the resumed run ends with the
  same parameters."""
  made = []
  monkeypatch.setattr(fedavg, "make_client_data", lambda c: made.append(pipeline.make_client_data(c)) or made[-1])
  c = tfds_config(data_dir)
  c.data.workers = 2
  full = fedavg.run(c, str(tmp_path / "full"), log=lambda _: None)
  assert made[0].prefetched == c.num_rounds - 1

  def crash(line):
    if line.startswith("round    3/"):
      raise Interrupt

  work = str(tmp_path / "resumed")
  with pytest.raises(Interrupt):
    fedavg.run(tfds_config(data_dir), work, log=crash)
  lines = []
  resumed = fedavg.run(tfds_config(data_dir), work, log=lines.append)
  assert any("resuming from round 2" in l for l in lines)
  # eval.examples_per_site is 2; each test split holds 3 (the fixture), so 2 are evaluated
  assert any("(2 images per site):" in l for l in lines)
  c = tfds_config(data_dir, num_rounds=1)
  c.eval.examples_per_site = 5  # more than the 3 test images each site has: the summary says 3
  lines = []
  fedavg.run(c, str(tmp_path / "few"), log=lines.append)
  assert any("(3 images per site):" in l for l in lines), [l for l in lines if "images per site" in l]
  for a, b in zip(jax.tree.leaves(full["state"]["params"]), jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefetch_and_worker_processes_change_no_batch_and_no_state(data_dir):
  """Against the plain in-process pipeline (no prefetch, no workers): the same batches and positions
  with prefetching (also when the prefetched round is not the one asked for: then it is not used) and
  with two spawned worker processes decoding and augmenting."""
  rounds = [np.array([0, 3]), np.array([3, 1]), np.array([3, 0]), np.array([2, 1])]

  def run(prefetch, workers, wrong_guess=False):
    c = tfds_config(data_dir)
    c.local_steps = 2
    c.data.prefetch, c.data.workers = prefetch, workers
    data = pipeline.make_client_data(c)
    out = []
    try:
      for r, clients in enumerate(rounds, 1):
        out.append(data.round_batches(r, clients) + (data.get_state()["next_batch"],))
        if r < len(rounds):
          data.prefetch(r + 1, rounds[r][::-1] if wrong_guess and r == 2 else rounds[r])
    finally:
      data.close()
    assert data.prefetched == (0 if not prefetch else 2 if wrong_guess else 3)
    return out

  ref = run(False, 0)
  assert ref[1][2] == [2, 2, 0, 4]  # client 3 sampled twice: its position advanced by 2 local steps each time
  for got in (run(True, 0), run(True, 0, wrong_guess=True), run(True, 2)):
    for (x, y, pos), (rx, ry, rpos) in zip(got, ref):
      np.testing.assert_array_equal(x, rx)
      np.testing.assert_array_equal(y, ry)
      assert pos == rpos


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
  by_site deals it (site k % 2, record k // 2), and a federated run samples from them. Each client is
  tiny: one 8 px frame (the smallest that feeds 32 px training, pipeline.min_record_side), 2 clients
  per round."""
  from fedkd.data.tfds import synthetic_endovascular as se

  sites = se.site_names()[:2]
  out = tmp_path / "tfds"
  assert pipeline.min_record_side(32) == 8
  for site in sites:
    fdata.build("synthetic_endovascular", out, site=site, image_size=8, num_train=5000, num_test=2)
  cfgs = [se.synthetic_config(s, image_size=8, num_train=5000, num_test=2).name for s in sites]
  c = tiny_config(num_clients=10_000, clients_per_round=2, batch_size=1, num_rounds=2)
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


@pytest.fixture(scope="module")
def odd_sites(tmp_path_factory):
  """'north' (6 train / 3 test frames of 40 px), 'evalonly' (3 test frames, no train split) and 'small'
  (32 px frames) in one data_dir."""
  base = tmp_path_factory.mktemp("odd")
  out = base / "tfds"
  _hospital_folder(base / "north", seed=0)
  _hospital_folder(base / "evalonly", seed=1, n_train=0, n_test=3)
  _hospital_folder(base / "small", seed=2, size=32)
  for site in ("north", "evalonly", "small"):
    fdata.build("xray_folder", out, manual_dir=base / site, site=site)
  return out


def _odd_config(data_dir, configs, unseen="", **kw):
  c = tfds_config(str(data_dir), **kw)
  c.data.tfds_configs = configs
  c.data.unseen_site = unseen
  return c


def test_site_without_training_records(odd_sites, tmp_path):
  c = _odd_config(odd_sites, " north , evalonly", num_clients=2)
  with pytest.raises(
    pipeline.DataError,
    match=r"site 'evalonly' has no training records \(its splits: "
    r"\['test'\]\); evaluate it only with "
    r"config.data.unseen_site='evalonly'",
  ):
    pipeline.make_client_data(c)
  # the suggested fix works: the site is evaluated, not trained on
  data = pipeline.make_client_data(_odd_config(odd_sites, "north,evalonly", "evalonly", num_clients=2))
  assert data.site_names == ["north", "north"] and set(data.eval_sets()) == {"north", "evalonly"}
  # a train split with no records (shard lengths edited to 0 in a copy)
  copy = tmp_path / "tfds"
  shutil.copytree(odd_sites, copy)
  info = copy / "xray_folder" / "north" / "1.0.0" / "dataset_info.json"
  meta = json.loads(info.read_text())
  for split in meta["splits"]:
    if split["name"] == "train":
      split["shardLengths"] = ["0"]
  info.write_text(json.dumps(meta))
  with pytest.raises(
    pipeline.DataError,
    match=r"site 'north' has no training records \(its train split "
    r"is empty",
  ):
    pipeline.make_client_data(_odd_config(copy, "north", num_clients=2))
  with pytest.raises(fdata.DatasetInputError, match="split 'train' has no records"):
    fdata.load_source("xray_folder", "train", copy, config="north")


def test_images_smaller_than_the_crop_are_refused(odd_sites):
  """32 px frames feed image_size 128 (4x enlargement) but not 256 (the minimum side is 256 / 4 = 64)."""
  with pytest.raises(
    pipeline.DataError,
    match=r"site 'small' \(train split\): images are 32x32 \(HxW\) "
    r"pixels, too small for config.image_size=256 "
    r"\(the minimum is 64 px",
  ):
    pipeline.make_client_data(_odd_config(odd_sites, "small", num_clients=2, image_size=256))
  data = pipeline.make_client_data(_odd_config(odd_sites, "small", num_clients=2, image_size=128))
  xs, ys = data.round_batches(0, np.array([0, 1]))
  assert xs.shape[-3:] == (128, 128, 1) and ys.shape[-2:] == (128, 128)
  # record-level guard (datasets whose frames differ in size): a 4x4 record, named by its id
  tiny = {"image": np.zeros((4, 4, 1), np.uint8), "mask": np.zeros((4, 4), np.uint8), "site": "s", "id": "x7"}
  for enabled in (True, False):
    with pytest.raises(
      pipeline.DataError,
      match=r"record 'x7' of site 's': images are 4x4 .*image_size=32 "
      r"\(the minimum is 8 px",
    ):
      pipeline.Augment(32, enabled=enabled)(tiny, np.random.default_rng(0))
  # minimum side = max(8, ceil(image_size / 4))
  assert [pipeline.min_record_side(s) for s in (20, 32, 128, 130, 256)] == [8, 8, 32, 33, 64]


def test_bad_site_lists_and_label_counts(data_dir):
  with pytest.raises(pipeline.DataError, match=r"lists \['north'\] more than once"):
    pipeline.make_client_data(_odd_config(data_dir, "north,south,north"))
  c = tfds_config(data_dir)
  c.model.num_classes = 2  # the hospital masks hold classes 0, 1, 2
  data = pipeline.make_client_data(c)
  with pytest.raises(
    pipeline.DataError,
    match=r"site '\w+': test label value 2 but "
    r"config.model.num_classes=2",
  ):
    data.eval_sets()


def test_tampered_dataset_error_reaches_the_user(data_dir, tmp_path):
  """A refused data folder (see test_tfds_safety) surfaces as a DataError with the reason, not a 'build it
  first' hint."""
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  feats = copy / "xray_folder" / "south" / "1.0.0" / "features.json"
  obj = json.loads(feats.read_text())
  obj["featuresDict"]["features"]["id"]["pythonClassName"] = "somepkg.mod.Feature"
  feats.write_text(json.dumps(obj))
  with pytest.raises(pipeline.DataError) as err:
    pipeline.make_client_data(tfds_config(str(copy)))
  assert "site 'south'" in str(err.value) and "somepkg.mod.Feature" in str(err.value)
  assert "build it first" not in str(err.value)


def test_unseen_site_with_synthetic_data():
  c = tiny_config()
  c.data.unseen_site = "east"
  with pytest.raises(pipeline.DataError, match="unseen_site='east' applies to tfds sources only"):
    pipeline.make_client_data(c)


def test_a_dataset_without_test_split_is_refused_before_anything_is_written(tmp_path):
  """docs/reliability.md: a run refused before it wrote anything leaves no files (config.json,
  checkpoints/, tb/) behind; the held-out sets are read before the checkpointer and logs exist."""
  from fedkd.data.pipeline import DataError

  site = tmp_path / "north"
  _hospital_folder(site, seed=0)
  (site / "splits.json").unlink()  # every image in train
  out = tmp_path / "tfds"
  fdata.build("xray_folder", out, manual_dir=site, site="north")
  c = tfds_config(str(out))
  c.data.unseen_site = ""
  work = tmp_path / "run"
  with pytest.raises(DataError, match="no test split"):
    fedavg.run(c, str(work), log=lambda _: None)
  assert not work.exists() or not list(work.iterdir())


def test_client_sizes_with_an_overflowing_quantity_skew_is_refused():
  """examples_per_client x lognormal(0, 1000) is inf; before, inf cast to int64 came out as the minimum and
  np.maximum made every client batch_size: equal sizes, silently. A sane skew stays a pure function of the seed
  (numpy's lognormal on the documented rng, then at least batch_size)."""
  import ml_collections

  def cfg(q, **kw):
    return ml_collections.ConfigDict(
      dict(num_clients=4, examples_per_client=64, quantity_skew=q, seed=0, batch_size=8, **kw)
    )

  # rng_streams 2: the stream named apart from the round sampling streams (spawn key 1); a stored config from
  # before the key (no rng_streams): the seed [0, 7] it ran with
  for c, rng in [
    (cfg(0.5, rng_streams=2), np.random.default_rng(np.random.SeedSequence(0, spawn_key=(1,)))),
    (cfg(0.5), np.random.default_rng([0, 7])),
  ]:
    want = np.maximum(np.round(64 * rng.lognormal(0.0, 0.5, 4)), 8).astype(np.int64)
    np.testing.assert_array_equal(pipeline.client_sizes(c), want)
  with pytest.raises(pipeline.DataError, match="quantity_skew=1000.0 is too large"):
    pipeline.client_sizes(cfg(1000.0))


def test_the_unseen_site_draws_the_same_images_whatever_the_client_count():
  """The held-out hospital is a fixed test set: its images do not move with config.num_clients (they were
  keyed by the client count), and each one is the renderer's own example keyed sites.UNSEEN_KEY."""
  from fedkd.data import sites, synth

  sets = {}
  for n in (4, 9):
    c = tiny_config(num_clients=n, clients_per_round=2)
    c.eval.examples_per_site = 3
    data = pipeline.SyntheticClients(c)
    sets[n] = data.eval_sets([0])
  name = sites.UNSEEN_SITE.name
  np.testing.assert_array_equal(np.asarray(sets[4][name][0]), np.asarray(sets[9][name][0]))
  np.testing.assert_array_equal(np.asarray(sets[4][name][1]), np.asarray(sets[9][name][1]))
  row = {k: jax.numpy.asarray(v[0]) for k, v in sites.site_table([sites.UNSEEN_SITE]).items()}
  key = synth.example_key(jax.numpy.uint32(c.seed), sites.UNSEEN_KEY, 2, 1)
  # jitted: as one program (~5 s of CPU) instead of op by op (~10 s: every operation compiled on its own)
  render = functools.partial(synth.render, physics=c.data.synthetic_physics)  # the config's forward model
  image, mask = jax.jit(render, static_argnums=2)(key, row, c.image_size)
  np.testing.assert_allclose(np.asarray(sets[9][name][0][2]), np.asarray(image), atol=1e-5)
  assert (np.asarray(sets[9][name][1][2]) == np.asarray(mask)).mean() > 0.999
  # a training site keeps its own key (client 0 draws the same images in both runs)
  first = data.site_names[0]
  np.testing.assert_array_equal(np.asarray(sets[4][first][0]), np.asarray(sets[9][first][0]))


def test_fedbn_on_tfds_sites_says_its_scores_use_untrained_norm_layers(data_dir, tmp_path):
  """Sites of prepared data are not one client each, so FedBN's sites are scored with the server model, whose
  normalisation leaves FedBN never aggregates: after training they still equal the initial ones (checked here),
  and the run's note says the scores do not measure FedBN."""
  from fedkd.fl.algorithms.fedbn import norm_leaves
  from fedkd.models import init_params

  c = tfds_config(data_dir, num_rounds=2)
  c.algorithm.name = "fedbn"
  lines = []
  out = fedavg.run(c, str(tmp_path / "w"), log=lines.append)
  note = [ln for ln in lines if "are not one client each" in ln]
  assert len(note) == 1 and "normalisation layers FedBN never trains" in note[0], lines[:8]
  _, init = init_params(c.model, c.seed)
  for a, b in zip(jax.tree.leaves(norm_leaves(out["state"]["params"])), jax.tree.leaves(norm_leaves(init))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_runs_made_before_the_fixed_unseen_key_keep_their_unseen_images(tmp_path):
  """data.unseen_key='num_clients' (and a stored config without the key, as fedkd.eval reads a run made before it
  existed) draws the unseen site keyed by the client count, as those runs did; resuming such a run asks for it."""
  import ml_collections

  from fedkd.checkpoint import ResumeRefused
  from fedkd.data import sites, synth
  from fedkd.tasks.fedavg import _check_resumable

  c = tiny_config(num_clients=5, clients_per_round=2)
  c.eval.examples_per_site = 2
  name = sites.UNSEEN_SITE.name
  table = sites.site_table([sites.UNSEEN_SITE] * 6)
  old = synth.generate(
    c.seed, table, np.array([5]), np.arange(2)[None], c.image_size, split=1, physics=c.data.synthetic_physics
  )[0][0]
  fixed = pipeline.SyntheticClients(c).eval_sets([0])[name][0]
  assert not np.array_equal(np.asarray(old), np.asarray(fixed))
  c.data.unseen_key = "num_clients"
  np.testing.assert_array_equal(np.asarray(pipeline.SyntheticClients(c).eval_sets([0])[name][0]), np.asarray(old))
  stored = c.to_dict()
  del stored["data"]["unseen_key"]
  got = pipeline.SyntheticClients(ml_collections.ConfigDict(stored)).eval_sets([0])[name][0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(old))
  c.data.unseen_key = "fixed"
  with pytest.raises(
    ResumeRefused, match=r"before config.data.unseen_key existed .* --config.data.unseen_key=num_clients"
  ):
    _check_resumable(stored, c.to_dict(), str(tmp_path))
  c.data.unseen_key = "num_clients"
  _check_resumable(stored, c.to_dict(), str(tmp_path))
