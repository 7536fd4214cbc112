"""Prepared hospital folders as training reads them: every training site is evaluated, a resume refuses a dataset
that changed under its checkpoint, a class the model lacks is refused before training starts, and every client's
stream covers its examples once per epoch with disjoint clients. Expected values come from the PNG arrays written
and from counting the examples the batches carry."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fedkd.data import pipeline
from fedkd.data import tfds as fdata
from test_training import tiny_config

SIZE = 32


def _site(root, train, test, label_of=lambda site, i: 2, site_id=0):
  """A folder whose frame i carries (site_id + 1, i + 1) in its first two pixels; its mask holds classes 0 and 1
  and, in rows 20-21, ``label_of(site_id, i)``. Returns {stem: mask} of what was written."""
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  masks = {}
  for i in range(train + test):
    image = np.full((SIZE, SIZE), 128, np.uint8)
    image[0, :2] = site_id + 1, i + 1
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[5:9] = 1
    mask[20:22] = label_of(site_id, i)
    Image.fromarray(image).save(root / "images" / f"x{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"x{i}.png")
    masks[f"x{i}"] = mask
  stems = list(masks)
  if test:
    (root / "splits.json").write_text(json.dumps({"train": stems[:train], "test": stems[train:]}))
  return masks


def _config(data_dir, **kw):
  c = tiny_config(**kw)
  c.data.source, c.data.tfds_data_dir, c.data.augment, c.data.prefetch = "tfds:xray_folder", str(data_dir), False, False
  c.image_size, c.eval.examples_per_site = SIZE, 1
  return c


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
  """Sites a (7 train), b (5) and c (9), 2 test frames each."""
  base = tmp_path_factory.mktemp("h69")
  for k, (site, n) in enumerate([("a", 7), ("b", 5), ("c", 9)]):
    _site(base / site, n, 2, site_id=k)
    fdata.build("xray_folder", base / "tfds", manual_dir=base / site)
  return base


def test_a_training_site_without_a_test_split_is_refused(three_sites, tmp_path):
  """Site b built without a splits.json (all frames train): training scored only a and c, and its 'mean over
  training sites' silently left b out. It is refused when the data opens, naming b and the fix."""
  _site(tmp_path / "b", 5, 0, site_id=1)
  data_dir = tmp_path / "tfds"
  for site in ("a", "c"):
    fdata.build("xray_folder", data_dir, manual_dir=three_sites / site)
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "b")
  with pytest.raises(
    pipeline.DataError, match=r"training site\(s\) \['b'\] have no test split .* or leave them out of config.data"
  ):
    pipeline.make_client_data(_config(data_dir, num_clients=3, clients_per_round=3))
  # without b: trains and evaluates a and c
  c = _config(data_dir, num_clients=2, clients_per_round=2)
  c.data.tfds_configs = "a,c"
  assert sorted(pipeline.make_client_data(c).eval_sets()) == ["a", "c"]


def _two_sites_after_a_round(three_sites, tmp_path):
  """Sites a and b of ``three_sites`` prepared under tmp_path: (data_dir, config, the clients' data after one
  round, its state as the checkpoint stores it (JSON))."""
  data_dir = tmp_path / "tfds"
  for site in ("a", "b"):
    fdata.build("xray_folder", data_dir, manual_dir=three_sites / site)
  c = _config(data_dir, num_clients=2, clients_per_round=2)
  data = pipeline.make_client_data(c)
  data.round_batches(1, np.array([0, 1]))
  return data_dir, c, data, json.loads(json.dumps(data.get_state()))


def test_resuming_on_a_dataset_that_changed_is_refused(three_sites, tmp_path):
  """Site a rebuilt with one more frame between a checkpoint and its resume: the saved positions were restored into
  other partitions (client sizes 7 -> 8, FedAvg weights, shuffles) without a word. The record counts saved with the
  positions refuse it, naming the site; the same dataset resumes, and a state saved without the counts (an older
  checkpoint) restores its positions."""
  data_dir, c, data, saved = _two_sites_after_a_round(three_sites, tmp_path)
  same = pipeline.make_client_data(c)
  same.set_state(saved)
  assert same.get_state() == saved
  older = pipeline.make_client_data(c)
  older.set_state({"next_batch": [3, 2]})  # a checkpoint written before the counts were saved: positions only
  assert older.get_state()["next_batch"] == [3, 2]

  grown = tmp_path / "a"
  _site(grown, 8, 2, site_id=0)
  fdata.build("xray_folder", data_dir, manual_dir=grown, overwrite=True)
  changed = pipeline.make_client_data(c)
  assert changed.sizes.tolist() == [8, 5]
  with pytest.raises(pipeline.DataError, match=r"changed since the checkpoint was written: .* per site 'a' 7 -> 8;"):
    changed.set_state(saved)
  assert changed.get_state()["next_batch"] == [0, 0]  # nothing restored
  assert saved == {"next_batch": [1, 1], "site_records": {"a": 7, "b": 5}, "site_content": saved["site_content"]}
  # positions that no run writes (a checkpoint edited by hand or damaged) are a damaged step, not a grain error
  for bad in ([-4, 1], ["1", 1], [1.5, 1], [10**30, 1], [True, 1], "11"):
    assert same.damaged({"next_batch": bad}) is not None, bad
    with pytest.raises(pipeline.DataError, match=r"the checkpoint is damaged: its data state's next_batch "):
      same.set_state({"next_batch": bad, "site_records": saved["site_records"]})
  assert same.damaged(saved) is None and same.get_state() == saved


def _content_sha256(data_dir, site):
  """The order-free digest of site ``site``'s training records as TFDS reads them back: the sum modulo 2**256 of
  SHA-256(id NUL site NUL 'image:<dtype>:<shape>' NUL pixels 'mask:<dtype>:<shape>' NUL labels) per record."""
  import hashlib

  import tensorflow_datasets as tfds

  total = 0
  for ex in tfds.builder(f"xray_folder/{site}", data_dir=str(data_dir)).as_data_source(split="train"):
    h = hashlib.sha256()
    for key in ("id", "site"):
      h.update((ex[key] if isinstance(ex[key], bytes) else str(ex[key]).encode()) + b"\0")
    for key in ("image", "mask"):
      a = np.asarray(ex[key])
      h.update(f"{key}:{a.dtype.str}:{a.shape}".encode() + b"\0" + a.tobytes())
    total += int.from_bytes(h.digest(), "big")
  return f"{total % 2**256:064x}"


def test_resuming_on_a_site_rebuilt_from_other_images_of_the_same_number_is_refused(three_sites, tmp_path):
  """Site a rebuilt from another folder of 7 training frames (other pixels; then the same pixels with one mask
  changed): the record counts match, so the resume continued on the new images without a word. Each build records
  a digest of its records' content (checked here against the records TFDS reads back), the checkpoint saves the
  training sites' digests, and a resume on other content is refused, naming the site; a rebuild from the same
  folder resumes, and a state saved with the counts only (an older checkpoint) restores its positions."""
  data_dir, c, data, saved = _two_sites_after_a_round(three_sites, tmp_path)
  assert saved["site_content"] == {site: _content_sha256(data_dir, site) for site in ("a", "b")}

  fdata.build("xray_folder", data_dir, manual_dir=three_sites / "a", overwrite=True)  # the same folder again
  again = pipeline.make_client_data(c)
  again.set_state(saved)
  assert again.get_state() == saved

  def rebuilt(name, **kw):
    _site(tmp_path / name / "a", 7, 2, **kw)
    fdata.build("xray_folder", data_dir, manual_dir=tmp_path / name / "a", overwrite=True)
    return pipeline.make_client_data(c)

  for name, kw in [("pixels", dict(site_id=5)), ("masks", dict(label_of=lambda site, i: 3 if i == 6 else 2))]:
    changed = rebuilt(name, **kw)
    assert changed.sizes.tolist() == [7, 5] and changed.get_state()["site_records"] == saved["site_records"], name
    assert changed.get_state()["site_content"]["a"] == _content_sha256(data_dir, "a") != saved["site_content"]["a"]
    with pytest.raises(pipeline.DataError, match=r"changed since the checkpoint was written: site\(s\) \['a'\] hold "):
      changed.set_state(saved)
    assert changed.get_state()["next_batch"] == [0, 0], name  # nothing restored
    changed.set_state({"next_batch": [1, 1], "site_records": saved["site_records"]})  # counts only: positions
    assert changed.get_state()["next_batch"] == [1, 1], name
  for bad in ({"a": "0" * 63}, {"a": 5}, ["a"]):
    assert data.damaged(dict(saved, site_content=bad)) is not None, bad


def test_a_resume_falls_back_over_a_step_whose_data_state_is_damaged(three_sites, tmp_path):
  """The newest step's data positions edited to -4 (grain raised OverflowError with a traceback): that step is
  damaged, so the resume warns and continues from the one before, as for any unreadable item, and ends with the
  parameters of an uninterrupted run. The prepared data moved meanwhile: the resume reads it from its new
  data.tfds_data_dir (a changed key that was refused)."""
  import jax

  from fedkd.tasks import fedavg

  data_dir = tmp_path / "tfds"
  for site in ("a", "b"):
    fdata.build("xray_folder", data_dir, manual_dir=three_sites / site)
  c = _config(data_dir, num_clients=2, clients_per_round=2, num_rounds=3)
  c.checkpoint.every, c.checkpoint.max_to_keep = 1, 3
  full = fedavg.run(c, str(tmp_path / "full"), log=lambda _: None)
  work = tmp_path / "w"
  first = _config(data_dir, num_clients=2, clients_per_round=2, num_rounds=2)
  first.checkpoint.every = 1
  fedavg.run(first, str(work), log=lambda _: None)
  meta = work / "checkpoints" / "2" / "data" / "metadata"
  state = json.loads(meta.read_text())
  meta.write_text(json.dumps(dict(state, next_batch=[-4] * len(state["next_batch"]))))
  moved = tmp_path / "moved"
  shutil.move(data_dir, moved)
  lines = []
  resumed = fedavg.run(_config(moved, num_clients=2, clients_per_round=2, num_rounds=3), str(work), log=lines.append)
  assert any("the checkpoint for round 2 is damaged (its data state's next_batch holds -4" in ln for ln in lines), lines
  assert any("resuming from round 1" in ln for ln in lines), lines
  for x, y in zip(jax.tree.leaves(full["state"]["params"]), jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_training_class_the_model_lacks_is_refused_before_training(three_sites, tmp_path, cli):
  """A vessel label (3) in one training mask, a 3-class model: the run failed only in the round whose batch first
  drew that frame (with thousands of frames, hours into training). The build records each split's highest class;
  the held-out sets, read before anything is written, refuse it naming the frame."""
  masks = _site(tmp_path / "v", 6, 2, label_of=lambda site, i: 3 if i == 4 else 2)
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=tmp_path / "v")
  data = pipeline.make_client_data(_config(tmp_path / "tfds", num_clients=2, clients_per_round=2))
  with pytest.raises(
    pipeline.DataError, match=r"site 'v': training record 'x4' has label value 3 but config.model.num_classes=3;"
  ):
    data.eval_sets()
  # what the build recorded, against the masks written: each split's highest class and its first frame
  meta = json.loads((tmp_path / "tfds" / "xray_folder" / "v" / "1.0.0" / "metadata.json").read_text())
  train, test = list(masks)[:6], list(masks)[6:]
  top = {s: max(int(masks[k].max()) for k in split) for s, split in (("train", train), ("test", test))}
  first = {s: next(k for k in split if masks[k].max() == top[s]) for s, split in (("train", train), ("test", test))}
  assert meta["largest_label"] == {s: {"label": top[s], "id": first[s]} for s in ("train", "test")}
  assert top == {"train": 3, "test": 2}
  c = _config(tmp_path / "tfds", num_clients=2, clients_per_round=2)
  c.model.num_classes = 4
  assert set(pipeline.make_client_data(c).eval_sets()) == {"v"}
  # evaluating and previewing do not train: the training label does not stop them (test labels go up to 2)
  three = _config(tmp_path / "tfds", num_clients=2, clients_per_round=2)
  assert set(pipeline.make_client_data(three, training=False).eval_sets()) == {"v"}
  overrides = {"data.source": "tfds:xray_folder", "data.tfds_data_dir": tmp_path / "tfds", "image_size": SIZE}
  overrides.update({"num_clients": 1, "clients_per_round": 1, "batch_size": 1, "data.augment": False})
  args = ["--config=configs/quickstart.py", "--frames=2", f"--out={tmp_path / 'p.png'}"]
  r = cli.run("fedkd.data.preview", args + [f"--config.{k}={v}" for k, v in overrides.items()])
  assert r.code == 0, r.stderr[-2000:]
  assert "1 sites x 2 frames" in r.stdout, r.stdout
  # a damaged entry is named, with the fix
  meta["largest_label"] = {"train": {"label": "3"}}
  (tmp_path / "tfds" / "xray_folder" / "v" / "1.0.0" / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(fdata.DatasetInputError, match=r"malformed 'largest_label' entry for split 'train'.*--overwrite"):
    pipeline.make_client_data(c)


@pytest.mark.parametrize("partition", ["by_site", "dirichlet", "iid"])
def test_clients_are_disjoint_and_each_epoch_covers_a_client_once(three_sites, partition):
  """7 clients over 3 sites (21 training frames), batch 2 across epoch boundaries: counted from the frames the
  batches carry, every frame belongs to exactly one client, the sizes are those counts, by_site deals site
  k % 3 to client k, and every window of a client's stream one epoch long holds each of its frames once."""
  c = _config(three_sites / "tfds", num_clients=7, clients_per_round=7, batch_size=2, local_steps=3)
  c.data.partition, c.data.dirichlet_alpha = partition, 1.0
  data = pipeline.make_client_data(c)
  streams = [[] for _ in range(7)]
  for r in range(3):  # 18 frames a client: at least two epochs of a 9-frame client, batches straddling them
    xs, _ = data.round_batches(r + 1, np.arange(7))
    pix = np.round(xs[..., 0, :2, 0] * 255).astype(int).reshape(7, -1, 2)
    for k in range(7):
      streams[k] += [(int(s) - 1, int(i) - 1) for s, i in pix[k]]
  owned = [set(s) for s in streams]
  every = [(s, i) for s, n in enumerate([7, 5, 9]) for i in range(n)]
  assert sorted(f for o in owned for f in o) == every  # disjoint, and nothing left out
  assert data.sizes.tolist() == [len(o) for o in owned]
  assert max(data.sizes) <= 9
  for k, s in enumerate(streams):
    n = len(owned[k])
    assert all(set(s[t : t + n]) == owned[k] for t in range(0, len(s) - n + 1, n)), (k, s)
  if partition == "by_site":
    assert [sorted({f[0] for f in o}) for o in owned] == [[k % 3] for k in range(7)]
    assert data.site_names == ["a", "b", "c", "a", "b", "c", "a"]


def test_a_second_hospital_folder_of_the_same_name_is_not_taken_for_the_first(three_sites, tmp_path):
  """Two exports both called 'export' (the site name defaults to the folder name): the second build printed
  'already prepared (reused)' with the first hospital's records and exit 0, and the note's --overwrite would
  have deleted the first hospital. It is refused, naming --site; the first stays; the same folder is reused."""
  for hospital, site in (("h1", "a"), ("h2", "b")):
    shutil.copytree(three_sites / site, tmp_path / hospital / "export")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "h1" / "export")
  with pytest.raises(fdata.DatasetInputError, match=r"already prepared from another folder .*--site=NAME.*--overwrite"):
    fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "h2" / "export")
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "h1" / "export")  # the same folder: reused
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "h2" / "export", site="h2")
  assert fdata.prepared_configs("xray_folder", data_dir) == ["export", "h2"]
  frames = {c: fdata.load_source("xray_folder", "train", data_dir, config=c) for c in ("export", "h2")}
  assert [len(frames["export"]), len(frames["h2"])] == [7, 5]  # a's 7 training frames and b's 5
  assert frames["export"][0]["image"][0, 0, 0] == 1 and frames["h2"][0]["image"][0, 0, 0] == 2  # site a, site b
