"""Opening a prepared TFDS dataset never runs code from the data folder.

Prepared datasets travel between hospitals. TFDS' own ``builder_from_directory`` restores the
feature connectors named in ``features.json`` / ``dataset_info.json`` and imports the module of any
type name it does not know, so a dataset folder with a crafted ``features.json`` and a ``.py`` file
next to it (found through a relative data_dir / the current directory on ``sys.path``) would run
that file. These tests craft such folders and check that fedkd refuses them with a one-line
``DatasetInputError`` and that the planted module is never imported.
"""

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import procs
import pytest
from PIL import Image

from fedkd.data import tfds as fdata
from fedkd.errors import UserError

SITE = "north"


def _frames(n=3, size=32):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
  masks = [rng.integers(0, 4, (size, size), dtype=np.uint8) for _ in range(n)]
  return images, masks


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A real prepared dataset (xray_folder, one hospital folder of 3 PNG frames: builds in about a
  second); returns the data_dir."""
  base = tmp_path_factory.mktemp("prepared")
  root = base / SITE
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i, (im, mk) in enumerate(zip(*_frames(), strict=True)):
    Image.fromarray(im).save(root / "images" / f"f{i}.png")
    Image.fromarray(mk).save(root / "masks" / f"f{i}.png")
  fdata.build("xray_folder", base / "tfds", manual_dir=root)
  return base / "tfds"


def _copy(prepared, dest: Path) -> Path:
  shutil.copytree(prepared, dest)
  return dest


def _version_dir(data_dir: Path) -> Path:
  return data_dir / "xray_folder" / SITE / "1.0.0"


def _edit_json(path: Path, edit) -> None:
  obj = json.loads(path.read_text())
  obj = edit(obj) or obj
  path.write_text(json.dumps(obj, indent=2))


def _plant_module(folder: Path, package: str, marker: Path) -> None:
  """``<package>.evilmod``: importing it writes ``marker``."""
  pkg = folder / package
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")


def _tamper_site_type(obj, evil):
  obj["featuresDict"]["features"]["site"]["pythonClassName"] = evil


def _tamper_legacy_format(obj, evil):
  # the older TFDS json form {"type": ..., "content": ...}, which TFDS still reads
  return {
    "type": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
    "content": {"site": {"type": evil, "content": {}}},
  }


def _features_in_info(obj, evil):
  # dataset_info.json may carry the features itself (TFDS then does not read features.json)
  obj["features"] = {"pythonClassName": evil, "text": {}}


_RUN_CASES = textwrap.dedent(
  """
  import json, os, sys
  from fedkd.data.tfds import load_source
  from fedkd.errors import UserError
  for case in sys.argv[1:]:
    os.chdir(case)
    sys.path.insert(0, os.getcwd())  # as `python -m ...` / `python -c` started here would
    try:
      src = load_source("xray_folder", "train", ".", config=%r)
      out = {"result": "loaded", "len": len(src)}
    except UserError as e:
      out = {"result": "refused", "type": type(e).__name__, "message": str(e)}
    except Exception as e:
      out = {"result": "crashed", "type": type(e).__name__, "message": str(e)[:500]}
    sys.path.pop(0)
    print("RESULT " + json.dumps(dict(out, case=case)), flush=True)
"""
  % SITE
)


def test_crafted_folder_never_imports_code(prepared, tmp_path):
  """Three crafted folders, each opened with the relative data_dir "." from inside the folder (the
  folder first on sys.path) in a fresh interpreter, no module cache shared with this process, one
  planted package per case: every one fails with a clean one-line DatasetInputError naming the
  file and the type, and no planted module is ever imported (its marker file never appears)."""
  cases = {
    "features_json": ("features.json", _tamper_site_type),
    "features_json_legacy": ("features.json", _tamper_legacy_format),
    "dataset_info_features": ("dataset_info.json", _features_in_info),
  }
  evil, markers = {}, {}
  for k, (case, (fname, edit)) in enumerate(cases.items()):
    folder = _copy(prepared, tmp_path / case)
    evil[case] = f"evilpkg{k}.evilmod.Evil"
    _edit_json(_version_dir(folder) / fname, lambda obj: edit(obj, evil[case]))
    markers[case] = tmp_path / f"{case}.imported"
    _plant_module(folder, f"evilpkg{k}", markers[case])
  proc = procs.run(
    [sys.executable, "-c", _RUN_CASES, *(str(tmp_path / c) for c in cases)],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  results = {}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      out = json.loads(line[len("RESULT ") :])
      results[Path(out["case"]).name] = out
  assert proc.returncode == 0 and set(results) == set(cases), (proc.stdout[-3000:], proc.stderr[-3000:])
  imported = [case for case in cases if markers[case].exists()]
  assert not imported, f"planted modules were imported: {imported}"
  for case, (fname, _) in cases.items():
    out = results[case]
    assert out["result"] == "refused" and out["type"] == "DatasetInputError", out
    assert fname in out["message"] and evil[case] in out["message"], out
    assert "\n" not in out["message"]


def test_code_builder_never_parses_features_json(prepared, tmp_path, monkeypatch):
  """The second layer alone: with the metadata checks switched off, a features.json naming a
  planted module (importable from sys.path) is still never parsed, because the dataset is opened
  through fedkd's own builder class, whose features are defined in code. The records read back
  are the PNG frames that were written."""
  from fedkd.data.tfds import api

  data_dir = _copy(prepared, tmp_path / "data")
  evil = "evilpkg_layer2.evilmod.Evil"
  _edit_json(_version_dir(data_dir) / "features.json", lambda obj: _tamper_site_type(obj, evil))
  marker = tmp_path / "imported"
  _plant_module(tmp_path, "evilpkg_layer2", marker)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(
    api,
    "check_prepared",
    lambda name, data_dir, config: json.loads((_version_dir(Path(data_dir)) / "dataset_info.json").read_text()),
  )
  src = fdata.load_source("xray_folder", "train", data_dir, config=SITE)
  images, masks = _frames()
  got = sorted((r["id"], r) for r in src)
  assert [i for i, _ in got] == ["f0", "f1", "f2"]
  for (_, rec), im, mk in zip(got, images, masks, strict=True):
    np.testing.assert_array_equal(rec["image"][..., 0], im)
    np.testing.assert_array_equal(rec["mask"], mk)
    assert rec["site"] == SITE
  assert not marker.exists() and "evilpkg_layer2.evilmod" not in sys.modules


def _smuggle_json_feature(obj, evil):
  # an allowed top-level type whose content is legacy JSON inside a string: TFDS would parse it
  # with FeaturesDict.from_json_content and import the inner type
  return {
    "pythonClassName": obj["pythonClassName"],
    "jsonFeature": {"json": json.dumps({"site": {"type": evil, "content": {}}})},
  }


def _shard(split):
  return f"xray_folder-{split}.array_record-00000-of-00001"


# (file to edit, edit, words the one-line message must contain)
_TAMPERED = {
  "json_feature_smuggling": ("features.json", _smuggle_json_feature, ["sneaky.mod.X"]),
  "extra_feature": (
    "features.json",
    lambda o, _: o["featuresDict"]["features"].update(label=o["featuresDict"]["features"]["mask"]),
    ["'label'", "expected"],
  ),
  "float_image": (
    "features.json",
    lambda o, _: o["featuresDict"]["features"]["image"]["tensor"].update(dtype="float32"),
    ["'image'", "float32", "uint8"],
  ),
  "module_name": (
    "dataset_info.json",
    lambda o, _: o.update(moduleName="sneaky.builder"),
    ["moduleName", "sneaky.builder"],
  ),
  "file_template": (
    "dataset_info.json",
    lambda o, _: o["splits"][0].update(filepathTemplate="../../{SPLIT}"),
    ["'../../{SPLIT}'"],
  ),
  "split_name": (
    "dataset_info.json",
    lambda o, _: o["splits"][0].update(name="../train"),
    ["unsafe split name", "'../train'"],
  ),
  "version_field": ("dataset_info.json", lambda o, _: o.update(version="2.0.0"), ["version", "'2.0.0'", "'1.0.0'"]),
  "unknown_field": (
    "dataset_info.json",
    lambda o, _: o.update(pickle="gASV"),
    ["not a TFDS dataset_info.json", "pickle"],
  ),
}


@pytest.mark.parametrize("case", sorted(_TAMPERED))
def test_tampered_metadata_is_refused(prepared, tmp_path, case):
  fname, edit, words = _TAMPERED[case]
  data_dir = _copy(prepared, tmp_path / "data")
  path = _version_dir(data_dir) / fname
  _edit_json(path, lambda obj: edit(obj, "sneaky.mod.X"))
  with pytest.raises(fdata.DatasetInputError) as err:
    fdata.load_source("xray_folder", "train", data_dir, config=SITE)
  msg = str(err.value)
  assert "\n" not in msg and str(path) in msg, msg
  for word in words:
    assert word in msg, (word, msg)
  assert isinstance(err.value, UserError)


def test_broken_copies_are_refused(prepared, tmp_path):
  """Folders damaged in transit: unreadable JSON, a missing shard, another version's folder."""
  data_dir = _copy(prepared, tmp_path / "a")
  info = _version_dir(data_dir) / "dataset_info.json"
  info.write_text("{not json")
  with pytest.raises(fdata.DatasetInputError, match=r"dataset_info\.json: unreadable"):
    fdata.load_source("xray_folder", "train", data_dir, config=SITE)

  data_dir = _copy(prepared, tmp_path / "b")
  (_version_dir(data_dir) / _shard("train")).unlink()
  with pytest.raises(fdata.DatasetInputError, match="split 'train' is incomplete, missing"):
    fdata.load_source("xray_folder", "train", data_dir, config=SITE)

  data_dir = _copy(prepared, tmp_path / "c")
  _version_dir(data_dir).rename(_version_dir(data_dir).parent / "0.9.0")
  with pytest.raises(
    fdata.DatasetInputError,
    match=r"prepared as version\(s\) \['0\.9\.0'\].*"
    r"reads xray_folder version 1\.0\.0",
  ):
    fdata.load_source("xray_folder", "train", data_dir, config=SITE)


def test_build_does_not_reuse_a_tampered_folder(prepared, tmp_path):
  """build() reuses a prepared folder only after the same checks (it would otherwise let TFDS
  read it); overwrite=True rebuilds it from the source files."""
  data_dir = _copy(prepared, tmp_path / "data")
  _edit_json(_version_dir(data_dir) / "features.json", lambda obj: _tamper_site_type(obj, "sneaky.mod.X"))
  manual = prepared.parent / SITE
  with pytest.raises(fdata.DatasetInputError, match="sneaky.mod.X"):
    fdata.build("xray_folder", data_dir, manual_dir=manual)
  fdata.build("xray_folder", data_dir, manual_dir=manual, overwrite=True)
  assert len(fdata.load_source("xray_folder", "train", data_dir, config=SITE)) == 3


def test_remove_takes_config_names_only(prepared, tmp_path):
  from fedkd.data.tfds import api

  data_dir = _copy(prepared, tmp_path / "data")
  for bad in ("..", ".", "../xray_folder", "", "a/b"):
    with pytest.raises(fdata.DatasetInputError, match="not a config name"):
      api.remove("xray_folder", data_dir, bad)
  assert (data_dir / "xray_folder" / SITE).is_dir()
  api.remove("xray_folder", data_dir, SITE)
  assert not (data_dir / "xray_folder" / SITE).exists()
