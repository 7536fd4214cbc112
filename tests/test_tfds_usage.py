"""Prepared (TFDS) data as a user with real exports meets it: a compressed DICOM pydicom cannot decode, a
folder whose frames differ in size, Ctrl-C / SIGTERM reaching the worker processes, and a relative
``data.tfds_data_dir`` read back by ``fedkd.eval`` from another folder. Expected values come from the files
the tests write (PIL / numpy) and from the plain in-process pipeline."""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import procs
import pytest
from PIL import Image

from fedkd.data import pipeline
from fedkd.data import tfds as fdata
from fedkd.tasks import fedavg
from test_training import tiny_config


def _site(root, sizes, n_test=2, seed=0):
  """``images/f<i>.png`` + ``masks/f<i>.png`` of the given (H, W) sizes, the last ``n_test`` in 'test'."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i, (h, w) in enumerate(sizes):
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3 : h // 3 + 3, 2:-2] = 1
    mask[2:-2, w // 2] = 2
    image = (rng.normal(160, 10, (h, w)) - 70 * (mask > 0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"f{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"f{i}.png")
  stems = [f"f{i}" for i in range(len(sizes))]
  (root / "splits.json").write_text(json.dumps({"train": stems[: len(stems) - n_test], "test": stems[-n_test:]}))


def _config(data_dir, **kw):
  c = tiny_config(**kw)
  c.data.source = "tfds:xray_folder"
  c.data.tfds_data_dir = str(data_dir)
  c.eval.max_sites = 0
  return c


# --------------------------------------------------------------------------------------------
# DICOM that pydicom cannot decode
# --------------------------------------------------------------------------------------------


def _jpeg2000_dicom(path, rows=40, cols=48):
  """A JPEG 2000 DICOM whose compressed frame is damaged: no installed pydicom plugin decodes it."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.encaps import encapsulate
  from pydicom.uid import JPEG2000Lossless, generate_uid

  meta = FileMetaDataset()
  meta.TransferSyntaxUID = JPEG2000Lossless
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = encapsulate([b"\xff\x4f\xff\x51damaged codestream" * 8])
  ds["PixelData"].VR = "OB"
  ds.save_as(path, enforce_file_format=True)


def test_an_undecodable_compressed_dicom_is_one_error_line(cli, tmp_path):
  """pydicom logs every failed decoder plugin's traceback before it raises, and its error text spans lines:
  the build printed a traceback and a two-line error. One line, naming the file, the transfer syntax and
  the fix, exit 2, nothing prepared."""
  folder = tmp_path / "hosp"
  _site(folder, [(40, 48)] * 3, n_test=1)
  _jpeg2000_dicom(folder / "images" / "cine.dcm")
  Image.fromarray(np.zeros((40, 48), np.uint8)).save(folder / "masks" / "cine.png")
  splits = json.loads((folder / "splits.json").read_text())
  (folder / "splits.json").write_text(json.dumps({**splits, "train": splits["train"] + ["cine"]}))
  out = tmp_path / "tfds"
  r = cli.run("fedkd.data.tfds.build", ["--dataset=xray_folder", f"--manual_dir={folder}", f"--data_dir={out}"])
  assert r.code == 2 and not r.traceback, r.stderr[-3000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, r.stderr[-3000:]
  line = lines[0]
  assert line.startswith(f"error: {folder / 'images' / 'cine.dcm'}: cannot decode DICOM pixel data"), line
  assert "transfer syntax 1.2.840.10008.1.2.4.90" in line and "gdcmconv --raw" in line, line
  assert fdata.prepared_configs("xray_folder", out) == []


def test_a_broken_image_link_is_named_as_one(tmp_path):
  """A folder of links into a PACS export whose target moved: the build called the link 'an unreadable or
  corrupt image file (FileNotFoundError ...)' and said to re-export it. It names the broken link and its
  target; a working link is read through (its pixels are the target's)."""
  folder = tmp_path / "hosp"
  _site(folder, [(40, 48)] * 3, n_test=1)
  target = tmp_path / "pacs" / "f0.png"
  target.parent.mkdir()
  (folder / "images" / "f0.png").rename(target)
  (folder / "images" / "f0.png").symlink_to(target)
  (folder / "images" / "f1.png").unlink()
  (folder / "images" / "f1.png").symlink_to(tmp_path / "pacs" / "moved.png")
  with pytest.raises(fdata.DatasetInputError) as e:
    fdata.build("xray_folder", tmp_path / "tfds", manual_dir=folder)
  assert e.value.problems == [
    f"{folder / 'images' / 'f1.png'}: broken symbolic link (to {tmp_path / 'pacs' / 'moved.png'}); restore the file "
    "it points to or remove the link"
  ]
  (folder / "images" / "f1.png").unlink()
  (folder / "masks" / "f1.png").unlink()
  (folder / "splits.json").write_text(json.dumps({"train": ["f0"], "test": ["f2"]}))
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=folder)
  src = fdata.load_source("xray_folder", "train", tmp_path / "tfds")
  np.testing.assert_array_equal(src[0]["image"][..., 0], np.asarray(Image.open(target)))


# --------------------------------------------------------------------------------------------
# Frames of different sizes: the smallest, not the first, decides
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """Site 'mixed': 8 train frames of 64x72 but frame f5 of 40x52, 2 test frames of 64x72 and 36x44."""
  base = tmp_path_factory.mktemp("mixed")
  sizes = [(64, 72)] * 5 + [(40, 52)] + [(64, 72)] * 2 + [(64, 72), (36, 44)]
  _site(base / "mixed", sizes)
  fdata.build("xray_folder", base / "tfds", manual_dir=base / "mixed")
  return base / "tfds"


def test_a_frame_smaller_than_the_first_is_refused_when_the_data_opens(mixed, tmp_path):
  """Only the first record's size was checked: frame f5 (40 px) failed image_size=256 (64 px needed) deep
  inside the first round, after the workdir and round 0's evaluation were written. The build records each
  split's smallest frame; opening the data refuses it, naming the frame, before anything is written."""
  with pytest.raises(
    pipeline.DataError,
    match=r"site 'mixed' \(train split\): images are 40x52 \(HxW\) pixels, too small for "
    r"config.image_size=256 \(the minimum is 64 px.*lower config.image_size to at most 160 \(the smallest is "
    r"record 'f5'\)$",
  ):
    pipeline.make_client_data(_config(mixed, num_clients=2, image_size=256))
  # the test split's smallest frame (36x44) is checked too: image_size 160 needs 40 px a side
  with pytest.raises(
    pipeline.DataError,
    match=r"\(test split\): images are 36x44 .*image_size=160.*at most 144 \(the smallest is record 'f9'\)$",
  ):
    pipeline.make_client_data(_config(mixed, num_clients=2, image_size=160))
  # ... but only where it is read: the evaluation reads the first eval.examples_per_site test frames, and f9
  # is the second (f8 is 64x72)
  one = _config(mixed, num_clients=2, image_size=160)
  one.eval.examples_per_site = 1
  assert pipeline.make_client_data(one).eval_sets()["mixed"][0].shape == (1, 160, 160, 1)
  data = pipeline.make_client_data(_config(mixed, num_clients=2, image_size=144))  # 36 px = 144 / 4: accepted
  xs, ys = data.round_batches(0, np.array([0, 1]))
  assert xs.shape[-3:] == (144, 144, 1) and ys.shape[-2:] == (144, 144)
  assert data.eval_sets()["mixed"][0].shape == (2, 144, 144, 1)

  # what the build recorded, against the sizes the PNGs were written with
  meta = json.loads((mixed / "xray_folder" / "mixed" / "1.0.0" / "metadata.json").read_text())
  assert meta["smallest_image"] == {
    "train": {"min_side": 40, "height": 40, "width": 52, "id": "f5"},
    "test": {"min_side": 36, "height": 36, "width": 44, "id": "f9"},
  }

  # a dataset prepared before sizes were recorded (no metadata.json) is checked on its first record
  old = tmp_path / "old"
  shutil.copytree(mixed, old)
  (old / "xray_folder" / "mixed" / "1.0.0" / "metadata.json").unlink()
  pipeline.make_client_data(_config(old, num_clients=2, image_size=256))
  # a damaged entry is named, with the fix
  (old / "xray_folder" / "mixed" / "1.0.0" / "metadata.json").write_text(
    json.dumps({"smallest_image": {"train": {"min_side": "40"}}})
  )
  with pytest.raises(fdata.DatasetInputError, match=r"metadata.json: malformed 'smallest_image' entry.*--overwrite"):
    pipeline.make_client_data(_config(old, num_clients=2, image_size=64))


# --------------------------------------------------------------------------------------------
# Worker processes and stop signals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pick", ["spread", "first"])
def test_a_test_split_is_refused_only_for_a_too_small_frame_the_evaluation_reads(tmp_path, pick):
  """Three test frames, the second of them (f5) 36x44: at image_size=160 (40 px a side needed) the data opens when
  the test records the evaluation reads leave f5 out, and is refused, naming f5, when they hold it. Of 3
  records, eval.pick='spread' reads record 0 for 1 example and 0 and 2 for 2; 'first' 0, then 0 and 1."""
  _site(tmp_path / "site", [(64, 72)] * 4 + [(64, 72), (36, 44), (64, 72)], n_test=3)
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=tmp_path / "site")
  ids = [r["id"] for r in fdata.load_source("xray_folder", "test", tmp_path / "tfds")]
  assert ids.index("f5") == 1
  read = {"spread": {1: [0], 2: [0, 2]}, "first": {1: [0], 2: [0, 1]}}[pick]
  for n in (1, 2):
    c = _config(tmp_path / "tfds", num_clients=2, image_size=160)
    c.eval.examples_per_site, c.eval.pick = n, pick
    if 1 in read[n]:
      with pytest.raises(
        pipeline.DataError, match=r"\(test split\): images are 36x44 .*\(the smallest is record 'f5'\)$"
      ):
        pipeline.make_client_data(c)
    else:
      assert pipeline.make_client_data(c).eval_sets()["site"][0].shape == (n, 160, 160, 1)


def test_a_site_is_scored_on_test_records_spread_over_its_split(tmp_path):
  """A folder's cine runs are consecutive test records, so the first eval.examples_per_site of them can all be
  frames of one run. 8 test frames, 3 scored: eval.pick='spread' (the default) reads records 0, 4 and 7
  (0, 3.5, 7 rounded half to even), 'first' 0, 1 and 2, as does a stored config from before the key (the
  images its run scored); a site with no more test records than that reads them all."""
  import ml_collections

  _site(tmp_path / "site", [(64, 72)] * 12, n_test=8)
  fdata.build("xray_folder", tmp_path / "tfds", manual_dir=tmp_path / "site")
  c = _config(tmp_path / "tfds", num_clients=2, image_size=64)
  assert c.eval.pick == "spread"
  c.eval.examples_per_site = 8
  every = pipeline.make_client_data(c).eval_sets()["site"][0]
  c.eval.examples_per_site = 3
  for pick, rows in (("spread", [0, 4, 7]), ("first", [0, 1, 2])):
    c.eval.pick = pick
    np.testing.assert_array_equal(pipeline.make_client_data(c).eval_sets()["site"][0], every[rows])
  stored = c.to_dict()
  del stored["eval"]["pick"]
  old = ml_collections.ConfigDict(stored)
  np.testing.assert_array_equal(pipeline.make_client_data(old).eval_sets()["site"][0], every[[0, 1, 2]])


def test_a_tfds_run_from_before_eval_pick_resumes_only_with_the_first_records():
  """A run on prepared data written before config.eval.pick scored the first records: its resume at the new
  default would switch the scored images mid-run, so it is refused, naming --config.eval.pick=first, and goes on
  with it. A synthetic run (the key unused) resumes at the default."""
  from fedkd import checkpoint as ckpt_lib
  from fedkd.config import base_config

  for source, refused in (("tfds:xray_folder", True), ("synthetic", False)):
    old = base_config().to_dict()
    old["data"]["source"] = source
    del old["eval"]["pick"]
    new = base_config().to_dict()
    new["data"]["source"] = source
    if refused:
      with pytest.raises(ckpt_lib.ResumeRefused, match=r"config.eval.pick existed .*--config.eval.pick=first"):
        fedavg._check_resumable(old, new, "w")
      new["eval"]["pick"] = "first"
    fedavg._check_resumable(old, new, "w")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _stop(pids):
  for pid in pids:
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)


def test_ctrl_c_and_sigterm_reaching_the_workers_change_no_batch(mixed):
  """A terminal's Ctrl-C goes to the whole process group, and Slurm / Kubernetes send SIGTERM to every
  process: the workers died of it (KeyboardInterrupt / a broken pool), so the round being finished failed
  and its checkpoint was lost. They ignore both, also while they still start up (here: signalled as soon as
  the prefetch of round 0 has spawned them); the training process stops them (close) and none is left."""
  rounds = [np.array([0, 1]), np.array([1, 0]), np.array([1, 1]), np.array([0, 1])]

  def batches(workers, signal_workers=False):
    c = _config(mixed, num_clients=2, image_size=32, local_steps=2)
    c.data.workers, c.data.prefetch = workers, signal_workers
    data = pipeline.make_client_data(c)
    out, pids = [], []
    try:
      if signal_workers:
        data.prefetch(0, rounds[0])  # spawns the workers in the background thread
        deadline = time.time() + 30
        while not (data._pool_exec and data._pool_exec._processes) and time.time() < deadline:
          time.sleep(0.01)
        pids = list(data._pool_exec._processes)
        _stop(pids)  # while they import
      for r, clients in enumerate(rounds):
        out.append(data.round_batches(r, clients))
        if signal_workers and r == 0:
          pids = list(data._pool_exec._processes)
          _stop(pids)
          time.sleep(0.5)  # time for a worker to die of it
          assert all(_alive(pid) for pid in pids)
    finally:
      data.close()
    if signal_workers:
      assert data.prefetched == 1
    return out, pids

  ref, _ = batches(0)
  got, pids = batches(2, signal_workers=True)
  assert pids
  for (x, y), (rx, ry) in zip(got, ref):
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)
  deadline = time.time() + 10
  while any(_alive(pid) for pid in pids) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(_alive(pid) for pid in pids), "worker processes left after close()"


_TRAINER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from fedkd.data import pipeline
from test_tfds_usage import _config
c = _config({data_dir!r}, num_clients=2, image_size=32)
c.data.workers, c.data.prefetch = 2, False
data = pipeline.make_client_data(c)
data.round_batches(0, np.array([0, 1]))
print(" ".join(str(p) for p in data._pool_exec._processes), flush=True)
time.sleep(600)
"""


def test_workers_end_when_the_training_process_is_killed(mixed):
  """The OOM killer (or kill -9) ends the training process without closing its pool: the workers waited
  for tasks forever (each holds both ends of its task queue), minutes later still there. They end with it."""
  tests = os.path.dirname(os.path.abspath(__file__))
  code = _TRAINER.format(tests=tests, data_dir=str(mixed))
  with procs.group() as popen:
    trainer = popen([sys.executable, "-c", code], cwd=os.path.dirname(tests))
    line = trainer.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert pids, trainer.stderr.read()[-3000:] if trainer.poll() is not None else line
    assert all(_alive(pid) for pid in pids)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    try:
      deadline = time.time() + procs.timeout(20)
      while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
      assert not any(_alive(pid) for pid in pids), "worker processes outlived the killed training process"
    finally:  # the group's cleanup skips a reaped child: end what is left here
      for pid in pids:
        if _alive(pid):
          os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# data.tfds_data_dir relative to the folder training started in
# --------------------------------------------------------------------------------------------


def test_a_relative_tfds_data_dir_is_stored_absolute(cli, mixed, tmp_path, monkeypatch):
  """Trained with --config.data.tfds_data_dir=tfds from the data's parent folder: config.json kept 'tfds', so
  fedkd.eval started anywhere else found no dataset. It stores the absolute folder; '~/...' and URLs stay as
  given (the same folder from anywhere)."""
  base = tmp_path / "project"
  shutil.copytree(mixed, base / "tfds")
  monkeypatch.chdir(base)
  c = _config("tfds", num_clients=2, num_rounds=2, image_size=32)
  work = base / "run"
  fedavg.run(c, str(work), log=lambda _: None)
  stored = json.loads((work / "config.json").read_text())["data"]["tfds_data_dir"]
  assert stored == str(base / "tfds"), stored
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--examples=2", "--frames=0"], cwd=str(elsewhere))
  assert r.code == 0 and not r.traceback, r.stderr[-3000:]
  assert (work / "eval" / "eval.json").is_file()

  monkeypatch.setenv("HOME", str(base))
  c = _config("~/tfds", num_clients=2, image_size=32)
  pipeline.make_client_data(c)
  assert c.data.tfds_data_dir == "~/tfds"


def test_the_data_folder_may_change_on_resume_and_the_sites_may_not(tmp_path):
  """config.data.tfds_data_dir may change on resume (an older run's relative folder, prepared data that moved: the
  record counts saved with the checkpoint check the sites there); the sites read are part of the run."""
  from fedkd.config import base_config
  from fedkd.tasks.fedavg import resume_differences

  old = base_config().to_dict()
  old["data"]["source"] = "tfds:xray_folder"
  old["data"]["tfds_data_dir"] = "data"
  new = json.loads(json.dumps(old))
  new["data"]["tfds_data_dir"] = str(tmp_path / "elsewhere")
  assert resume_differences(old, new) == []
  new["data"]["tfds_configs"] = "hospital_b"
  assert resume_differences(old, new) == ["data.tfds_configs"]


def test_closing_the_pool_after_a_worker_was_killed_does_not_hang():
  """A worker SIGKILLed while idle may hold the task queue's lock: the others then wait for it forever and
  ignore the executor's SIGTERM (workers ignore it, so a job-wide SIGTERM does not break the round), so
  ProcessPoolExecutor.shutdown(wait=True) hung. close()'s _stop_pool returns within its timeout, every worker
  gone, whichever worker was killed (each worker of a two-worker pool in turn: one of them holds the lock; every
  spawned worker costs a Python start-up and the pipeline's imports)."""
  import concurrent.futures
  import contextlib
  import multiprocessing
  import threading

  from _pool_worker import worker_pid

  workers_per_pool = 2
  for victim in range(workers_per_pool):
    ex = concurrent.futures.ProcessPoolExecutor(
      workers_per_pool,
      mp_context=multiprocessing.get_context("spawn"),
      initializer=pipeline._worker_init,
      initargs=(None, None, 0, None, 2),
    )
    with pipeline._stop_signals_blocked():
      futures = [ex.submit(worker_pid, i) for i in range(6)]
    [f.result() for f in futures]
    time.sleep(0.5)
    workers = list(ex._processes.values())
    os.kill(workers[victim].pid, signal.SIGKILL)
    time.sleep(1.0)
    t = threading.Thread(target=pipeline._stop_pool, args=(ex, 5.0), daemon=True)
    t.start()
    t.join(30)
    alive = [p.pid for p in workers if p.is_alive()]
    for pid in alive:
      with contextlib.suppress(ProcessLookupError):  # it may exit between is_alive() and the kill
        os.kill(pid, signal.SIGKILL)
    assert not t.is_alive() and not alive, (victim, alive)
