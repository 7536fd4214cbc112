"""``build`` / ``load_source``: prepare the fedkd TFDS datasets and read them without TF."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from fedkd.data.tfds import label_maps
from fedkd.data.tfds import records
from fedkd.data.tfds.cathaction import Cathaction, CathactionConfig
from fedkd.data.tfds.records import DatasetInputError, short_list
from fedkd.data.tfds.synthetic_endovascular import SyntheticConfig, SyntheticEndovascular, synthetic_config
from fedkd.data.tfds.xray_folder import XrayFolder, XrayFolderConfig
from fedkd.errors import reason

BUILDERS: dict[str, type] = {
  "synthetic_endovascular": SyntheticEndovascular,
  "cathaction": Cathaction,
  "xray_folder": XrayFolder,
}
_SYNTH_KWARGS = ("site", "image_size", "num_train", "num_test", "seed", "physics")
_LABEL_KWARGS = ("label_map", "color_map")


def _builder_cls(name: str) -> type:
  try:
    return BUILDERS[name]
  except KeyError:
    raise DatasetInputError(f"unknown dataset {name!r}; available: {sorted(BUILDERS)}") from None


def _check_kwargs(name: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
  extra = sorted(set(kwargs) - set(allowed))
  if extra:
    raise DatasetInputError(f"{name}: unsupported option(s) {extra}; allowed: {list(allowed)}")


def _registered(cls, config_name: str):
  return next((c for c in cls.BUILDER_CONFIGS if c.name == config_name), None)


def resolve_config(name: str, config=None, manual_dir=None, **kwargs):
  """The BuilderConfig that ``build`` will use (see ``build`` for the rules)."""
  cls = _builder_cls(name)
  if isinstance(config, tfds.core.BuilderConfig):
    if kwargs:
      raise DatasetInputError(f"{name}: pass either a BuilderConfig or options {sorted(kwargs)}, not both")
    return config
  if config is not None and not isinstance(config, str):
    raise DatasetInputError(f"{name}: config must be a name or BuilderConfig, got {type(config).__name__}")
  kwargs = {k: v for k, v in kwargs.items() if v is not None}

  if cls is SyntheticEndovascular:
    _check_kwargs(name, kwargs, _SYNTH_KWARGS)
    if not kwargs:
      cfg = _registered(cls, config or cls.BUILDER_CONFIGS[0].name)
      if cfg is None:
        raise DatasetInputError(
          f"{name}: unknown config {config!r}; available: "
          f"{[c.name for c in cls.BUILDER_CONFIGS]} (or pass site=, image_size=, "
          f"num_train=, num_test=, seed=, physics=)"
        )
      return cfg
    base = _registered(cls, config) if config else None
    if config and base is None:
      raise DatasetInputError(
        f"{name}: unknown config {config!r} to start from; available: {[c.name for c in cls.BUILDER_CONFIGS]}"
      )
    fields = {k: getattr(base, k) for k in _SYNTH_KWARGS} if base else {}
    fields.update(kwargs)
    if "site" not in fields:
      raise DatasetInputError(f"{name}: pass site= (one of {[c.site for c in cls.BUILDER_CONFIGS][::2]}) or config=")
    return synthetic_config(**fields)

  cfg_cls = CathactionConfig if cls is Cathaction else XrayFolderConfig
  allowed = _LABEL_KWARGS + (("site",) if cls is XrayFolder else ())
  _check_kwargs(name, kwargs, allowed)
  registered = _registered(cls, config) if config else None
  if config and registered is None and not kwargs and cls is Cathaction:
    raise DatasetInputError(
      f"{name}: unknown config {config!r}; available: "
      f"{[c.name for c in cls.BUILDER_CONFIGS]} (or pass label_map=/"
      f"color_map= with a new config name)"
    )
  if cls is Cathaction:
    if not kwargs:
      return registered or _registered(cls, "default")
    fields = {k: getattr(registered, k) for k in _LABEL_KWARGS} if registered else {}
    fields.update(kwargs)
    spec = label_maps.LabelSpec.create(fields.get("label_map"), fields.get("color_map"))
    cfg_name = config if (config and not registered) else ("custom-" + _short_hash(spec.describe()))
    return cfg_cls(name=records.config_safe_name(cfg_name), description=spec.describe(), **fields)

  # xray_folder: one config (= one output folder) per site, so two hospitals built into the
  # same data_dir never overwrite or shadow each other.
  fields = {k: getattr(registered, k) for k in _LABEL_KWARGS} if registered else {}
  fields.update({k: v for k, v in kwargs.items() if k in _LABEL_KWARGS})
  site = kwargs.get("site")
  if site is None:
    if manual_dir is None:
      raise DatasetInputError("xray_folder: pass manual_dir= (the hospital folder)")
    site = Path(manual_dir).resolve().name
  if config and not registered:
    cfg_name = config
  elif registered and registered.name != "default":
    cfg_name = f"{site}-{registered.name}"
  else:
    cfg_name = site
  spec = label_maps.LabelSpec.create(fields.get("label_map"), fields.get("color_map"))
  return cfg_cls(
    name=records.config_safe_name(cfg_name), site=str(site), description=f"Site {site}; {spec.describe()}.", **fields
  )


def _short_hash(text: str) -> str:
  import hashlib

  return hashlib.sha1(text.encode()).hexdigest()[:8]


def build(name: str, data_dir, manual_dir=None, config=None, *, overwrite: bool = False, **kwargs: Any):
  """Prepare dataset ``name`` as array_record files under ``data_dir``; return the builder.

  ``config``: a registered config name, a ``BuilderConfig``, or None (default config).
  Options (``**kwargs``) make a new config:

  * ``synthetic_endovascular``: ``site``, ``image_size``, ``num_train``, ``num_test``,
    ``seed``, ``physics`` (on top of the named config's values);
  * ``cathaction``: ``label_map``, ``color_map`` (config name = ``config`` or ``custom-<hash>``);
  * ``xray_folder``: ``site`` (default: the manual_dir folder name), ``label_map``,
    ``color_map``. The config name is the site name (``<site>-<preset>`` for the ``rgb`` /
    ``gray_0_128_255`` presets), or ``config`` if that is a new name.

  An already prepared dataset is reused (after checking that it was built with the same
  settings) unless ``overwrite=True``, which deletes it first and rebuilds. Bad input raises
  ``DatasetInputError``; nothing is left that ``is_prepared()`` would accept.
  """
  cls = _builder_cls(name)
  if manual_dir is not None:
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
      layout = (
        "train/images/*.jpg and train/labels/*.png (test/ likewise)" if cls is Cathaction else "images/ and masks/"
      )
      raise DatasetInputError(f"{manual_dir}: manual_dir does not exist; pass the folder that holds {layout}")
  elif cls is not SyntheticEndovascular:
    raise DatasetInputError(
      f"{name}: manual_dir is required (the folder with the source "
      f"files; see {cls.__name__}.MANUAL_DOWNLOAD_INSTRUCTIONS)"
    )
  cfg = resolve_config(name, config, manual_dir=manual_dir, **kwargs)
  data_dir = Path(data_dir)
  final = data_dir / name / cfg.name / str(cls.VERSION)
  if not overwrite and (final / "dataset_info.json").is_file():
    check_prepared(name, data_dir, cfg.name)  # before TFDS reads the folder to reuse it
    if manual_dir is not None:
      _check_same_source(final, manual_dir, name, cfg)
  if overwrite and (final / "dataset_info.json").is_file():
    return _rebuild_beside(cls, name, data_dir, manual_dir, cfg, final)
  builder = cls(data_dir=str(data_dir), config=cfg, file_format="array_record")
  if not overwrite:
    _check_same_settings(builder, cfg)
  mode = (
    tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  dl_config = tfds.download.DownloadConfig(
    manual_dir=str(manual_dir) if manual_dir is not None else None, download_mode=mode
  )
  made = [p for p in (data_dir / name / ".config", data_dir / "downloads", data_dir) if not p.exists()]
  try:
    builder.download_and_prepare(download_config=dl_config)
  except BaseException:
    _remove_empty_dirs(data_dir / name / cfg.name, stop=data_dir)
    for path in made:  # what TFDS made for this build: its metadata and empty download folders
      if path.name == ".config":
        shutil.rmtree(path, ignore_errors=True)
        _remove_empty_dirs(path.parent, stop=data_dir)
      else:
        _remove_empty_dirs(path, stop=data_dir.parent if path == data_dir else data_dir)
    raise
  return builder


_REBUILD_PREFIX = ".fedkd-rebuild-"  # + owner: an --overwrite build's temporary folder in data_dir
_OLD_INFIX = ".old-"  # .<version>.old-<owner>: the replaced version beside the new one, until it is deleted
_LOCK_SUFFIX = ".lock"  # data_dir/.fedkd-rebuild-<owner>.lock: locked (flock) while that build runs
_MAKING_PREFIX = ".fedkd-lock-"  # + owner: that lock file while it is made (locked, then renamed)


_TOKEN = re.compile(r"[0-9a-f]{8}")


def _owner_host_pid(owner: str) -> tuple[str, str]:
  """(host, pid) of an owner name: ``<host>-<pid>-<token>``, or ``<host>-<pid>`` (a build from before the token).
  Read from the right: a host name may hold dashes (``worker-b``)."""
  parts = owner.rsplit("-", 2)
  if len(parts) == 3 and parts[1].isdigit() and _TOKEN.fullmatch(parts[2]):
    return parts[0], parts[1]
  host, _, pid = owner.rpartition("-")
  return host, pid


def _rebuild_owner_alive(data_dir: Path, owner: str) -> bool:
  """Whether the --overwrite build ``owner`` may be running. Another host's always may (a file system shared
  between hosts may lock only locally). One of this host name's: while its lock file is locked, which also tells
  apart containers that share a host name and pid numbers; a build from before the lock file, by its pid."""
  from fedkd.workdir import pid_alive

  host, pid = _owner_host_pid(owner)
  if host != socket.gethostname():
    return True
  lock = data_dir / f"{_REBUILD_PREFIX}{owner}{_LOCK_SUFFIX}"
  if lock.exists():
    return not _lock_free(lock)
  return not (pid.isdigit() and not pid_alive(int(pid)))


def _lock_free(path: Path) -> bool:
  """Whether ``path``'s flock can be taken now (it is then released). False where the file is gone or the file
  system has no locks: what cannot be told free is left alone."""
  import fcntl

  try:
    fd = os.open(path, os.O_RDWR)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:  # held by the build; or locks unsupported here
    return False
  finally:
    os.close(fd)  # releases the lock just taken
  return True


def _remove_dead_rebuilds(data_dir: Path, version_dir: Path) -> None:
  """Removes what --overwrite builds left when killed before their cleanup ran (their lock is free): the
  temporary folder in ``data_dir``, the replaced version in ``version_dir`` (the config's folder) and the lock
  file. A running build's are left alone (:func:`_rebuild_owner_alive`). So is the lock file of a build killed while
  it made it (``.fedkd-lock-<owner>``, 0 bytes), when its lock is free and it is over a minute old (a build locks
  it right after creating it, then renames it)."""
  for path in data_dir.glob(f"{_MAKING_PREFIX}*"):
    host, _ = _owner_host_pid(path.name[len(_MAKING_PREFIX) :])
    with contextlib.suppress(OSError):
      if host == socket.gethostname() and time.time() - path.stat().st_mtime > 60 and _lock_free(path):
        path.unlink()
  left = [(p, p.name[len(_REBUILD_PREFIX) :].removesuffix(_LOCK_SUFFIX)) for p in data_dir.glob(f"{_REBUILD_PREFIX}*")]
  left += [(p, p.name.split(_OLD_INFIX, 1)[1]) for p in version_dir.glob(f".*{_OLD_INFIX}*")]
  alive: dict[str, bool] = {}
  for path, owner in sorted(left, key=lambda x: x[0].name.endswith(_LOCK_SUFFIX)):  # lock files last
    if owner not in alive:
      alive[owner] = _rebuild_owner_alive(data_dir, owner)
    if not alive[owner]:
      if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          path.unlink()


@contextlib.contextmanager
def _rebuild_lock(data_dir: Path):
  """The owner name of this --overwrite build (host, pid and a random token), with its lock file locked until the
  build ends; then the lock file is removed. The file is locked under a name no cleanup looks at and then renamed
  into place, so no cleanup ever finds it unlocked while this build runs."""
  import fcntl
  import secrets

  from fedkd.workdir import NO_FLOCK_ERRNOS

  owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
  lock = data_dir / f"{_REBUILD_PREFIX}{owner}{_LOCK_SUFFIX}"
  making = data_dir / f"{_MAKING_PREFIX}{owner}"
  data_dir.mkdir(parents=True, exist_ok=True)
  fd = os.open(making, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:  # a file system without locks: the leftovers are kept, never removed early
      if e.errno not in NO_FLOCK_ERRNOS:
        raise
    os.replace(making, lock)
    yield owner
  finally:
    for path in (making, lock):
      with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


def _rebuild_beside(cls, name: str, data_dir: Path, manual_dir, cfg, final: Path):
  """``overwrite`` of a prepared dataset: build the new one in a temporary folder inside ``data_dir``
  and swap it in only once it is complete. A build refused on its inputs (or killed) leaves the old
  dataset as it was; TFDS' own FORCE_REDOWNLOAD deletes it before it reads the first input file."""
  _remove_dead_rebuilds(data_dir, final.parent)
  with _rebuild_lock(data_dir) as owner:
    tmp = data_dir / f"{_REBUILD_PREFIX}{owner}"
    try:
      fresh = cls(data_dir=str(tmp), config=cfg, file_format="array_record")
      fresh.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir is not None else None)
      )
      old = final.parent / f".{final.name}{_OLD_INFIX}{owner}"
      os.replace(final, old)
      try:
        os.replace(tmp / name / cfg.name / str(cls.VERSION), final)
      except BaseException:
        os.replace(old, final)  # the old dataset back in place
        raise
      shutil.rmtree(old, ignore_errors=True)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return cls(data_dir=str(data_dir), config=cfg, file_format="array_record")


def _check_same_settings(builder, cfg) -> None:
  """Refuse to silently reuse a prepared dataset built with other settings under the same
  config name (e.g. the same site with another label_map)."""
  info_file = Path(os.fspath(builder.data_dir)) / "dataset_info.json"
  if not info_file.is_file():
    return
  try:
    stored = json.loads(info_file.read_text()).get("configDescription", "")
  except (OSError, ValueError):
    return
  if (stored or "") != (cfg.description or ""):
    raise DatasetInputError(
      f"{info_file.parent}: already prepared with other settings ({stored!r}, requested "
      f"{cfg.description!r}); pass overwrite=True (CLI --overwrite) or another config name"
    )


def _check_same_source(final: Path, manual_dir: Path, name: str, cfg) -> None:
  """Refuse to reuse a prepared dataset that its build recorded as made from another folder than ``manual_dir``:
  two hospitals' exports in folders of the same name (``export``, ``DICOM``) make the same site name, and the
  second build would report the first hospital's records as its own. Datasets built before fedkd recorded the
  folder are reused as before."""
  path = final / "metadata.json"
  if not path.is_file():
    return
  data = _read_json(path, f"Rebuild it (python -m fedkd.data.tfds.build --dataset={name} ... --overwrite).")
  stored = data.get(records.SOURCE_KEY) if isinstance(data, dict) else None
  if stored is None or stored == records.source_fingerprint(manual_dir):
    return
  keep = "build this folder as its own site with --site=NAME" if name == "xray_folder" else "pass another --data_dir"
  raise DatasetInputError(
    f"{final}: {name}/{cfg.name} is already prepared from another folder than {manual_dir} (folders with the same "
    f"name give the same config name); to keep both, {keep}; to replace the prepared one with this folder, pass "
    "--overwrite"
  )


def _remove_empty_dirs(path: Path, stop: Path) -> None:
  """Remove ``path`` and empty parents up to (not including) ``stop`` if they are empty."""
  try:
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
      if sub.is_dir() and not any(sub.iterdir()):
        sub.rmdir()
    while path != stop and path.is_dir() and not any(path.iterdir()):
      path.rmdir()
      path = path.parent
  except OSError:
    pass


def build_command(name: str, data_dir, config: str | None = None) -> str:
  """The ``fedkd.data.tfds.build`` command that prepares ``name`` (its site or config ``config``) in ``data_dir``,
  with the flags that dataset needs: a folder of images (``--manual_dir``) for xray_folder and cathaction,
  whose xray_folder sites are named by ``--site``."""
  flags = [f"--dataset={name}"]
  if name == "xray_folder":
    site, preset = config or "<site name>", None
    for p in ("rgb", "gray_0_128_255"):  # <site>-<preset>: a site built with a mask preset
      if site.endswith(f"-{p}") and len(site) > len(p) + 1:
        site, preset = site[: -len(p) - 1], p
    flags += ["--manual_dir=<the site's image/mask folder>", f"--site={site}"]
    flags += [f"--config={preset}"] if preset else []
  elif name == "cathaction":
    flags += ["--manual_dir=<the CathAction download>"] + ([f"--config={config}"] if config else [])
  elif config:
    flags.append(f"--config={config}")
  return f"python -m fedkd.data.tfds.build {' '.join(flags)} --data_dir={data_dir}"


def config_names(name: str, data_dir=None) -> list[str]:
  """Config names that act as *sites* of dataset ``name``.

  * ``synthetic_endovascular``: one per simulated site (training sites, then the unseen
    site), at the default size: ``[<site>, ...]``;
  * ``cathaction`` / ``xray_folder``: configs choose label conventions or name one hospital
    folder, so the sites are whatever is prepared in ``data_dir`` (``[]`` without data_dir:
    then ``load_source(..., config=None)`` opens the only prepared config).
  """
  cls = _builder_cls(name)
  if cls is SyntheticEndovascular:
    from fedkd.data.tfds.synthetic_endovascular import site_names

    return site_names()
  return prepared_configs(name, data_dir) if data_dir is not None else []


# A prepared version folder (``1.0.0``); not TFDS' ``incomplete.<id>_1.0.0`` of a build that was killed
# after writing its metadata, nor the ``.1.0.0.old-<pid>`` an interrupted ``--overwrite`` swap leaves.
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


def _version_dirs(config_dir: Path) -> list[Path]:
  """The prepared version folders (``<version>/dataset_info.json``) of one config folder."""
  if not config_dir.is_dir():
    return []
  return sorted(
    v for v in config_dir.iterdir() if _VERSION_DIR.match(v.name) and v.is_dir() and (v / "dataset_info.json").is_file()
  )


def prepared_configs(name: str, data_dir) -> list[str]:
  """Config names of ``name`` that are fully prepared under ``data_dir`` (a folder left by a build
  that was killed part-way is not)."""
  base = Path(data_dir) / name
  if not base.is_dir():
    return []
  return sorted(c.name for c in base.iterdir() if c.is_dir() and _version_dirs(c))


class SegmentationSource:
  """Random-access source of records (``len``, ``[i]`` -> dict: ``image`` uint8 [H, W, 1],
  ``mask`` uint8 [H, W], ``site`` str, ``id`` str). Works with ``grain.MapDataset.source``."""

  def __init__(self, source, name: str = ""):
    self._source = source
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _convert(ex: dict) -> dict:
    out = {}
    for k, v in ex.items():
      if isinstance(v, bytes):
        v = v.decode("utf-8")
      elif isinstance(v, np.ndarray) and v.dtype.kind in "SO" and v.ndim == 0:
        v = v.item()
        v = v.decode("utf-8") if isinstance(v, bytes) else v
      out[k] = v
    return out

  def _index(self, i) -> int:
    n = len(self)
    i = int(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"index {i} out of range for {self.name or 'source'} of length {n}")
    return i

  def _damaged(self, e: RuntimeError) -> DatasetInputError | None:
    """A damaged record file (array_record / riegeli report it as a RuntimeError) as a one-line error."""
    text = str(e)
    if not any(k in text for k in ("ArrayRecord", "Riegeli", "riegeli", "array_record")):
      return None
    return DatasetInputError(
      f"{self.name or 'a prepared dataset'}: its record file is damaged ({text.splitlines()[0][:160]}); "
      "rebuild the dataset with python -m fedkd.data.tfds.build ... --overwrite"
    )

  def _read(self, fetch, what: str):
    """``fetch()``'s records, read and decoded by TFDS. A record that reads but does not decode (TFDS' feature
    decoding fails on it: a record file cut inside a chunk reads back records without their features) is a
    damaged file too."""
    try:
      return fetch()
    except RuntimeError as e:
      raise (self._damaged(e) or e) from None
    except (TypeError, ValueError, KeyError) as e:
      raise DatasetInputError(
        f"{self.name or 'a prepared dataset'}: {what} cannot be decoded ({reason(e)[:160]}): its record file is "
        "damaged; rebuild the dataset with python -m fedkd.data.tfds.build ... --overwrite"
      ) from None

  def __getitem__(self, i) -> dict:
    i = self._index(i)
    return self._convert(self._read(lambda: self._source[i], f"record {i}"))

  def __getitems__(self, indices) -> list[dict]:
    indices = [self._index(i) for i in indices]
    records = self._read(lambda: self._source.__getitems__(indices), f"records {short_list(indices)}")
    return [self._convert(ex) for ex in records]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __getstate__(self) -> dict:
    import pickle

    return {"name": self.name, "source": pickle.dumps(self._source)}

  def __setstate__(self, state: dict) -> None:
    """Unpickled in a ``data.workers`` process: TFDS rebuilds the builder of an unregistered config (an
    xray_folder site) and would log "Using custom data configuration" there, once per site and worker."""
    import pickle

    self.name = state["name"]
    with _quiet_custom_config_notice():
      self._source = pickle.loads(state["source"])

  def __repr__(self) -> str:
    return f"SegmentationSource({self.name}, len={len(self)})"


def load_builder(name: str, data_dir, config=None):
  """The prepared builder for ``name`` / ``config`` in ``data_dir``, ready to read.

  ``config=None`` picks the only prepared config; with several, it must be named.

  Opening a prepared dataset never runs code from the data folder. TFDS' generic
  ``builder_from_directory`` restores the feature connectors named in ``features.json`` /
  ``dataset_info.json`` and imports the module of any type it does not know, so a crafted
  folder (prepared datasets are exchanged between hospitals) with a ``.py`` file next to it
  could execute it. Instead:

  1. ``check_prepared`` first reads the metadata files as plain JSON and refuses any feature
     type other than the exact TFDS types fedkd writes (``records.features()``), any other
     feature layout, feature definitions inside ``dataset_info.json``, another builder module,
     version or file format, unsafe split names or file templates, and missing shard files;
  2. the builder is fedkd's own class (``BUILDERS``) constructed with ``data_dir=`` and a
     config, so its features come from code: TFDS then reads split sizes and descriptions
     from ``dataset_info.json`` and never parses ``features.json``. Configs not registered in
     code (e.g. xray_folder sites) are recreated by name (``_reading_config``).
  """
  cls = _builder_cls(name)
  if isinstance(config, tfds.core.BuilderConfig):
    config = config.name
  if config is None:
    found = prepared_configs(name, data_dir)
    if len(found) == 1:
      config = found[0]
    elif not found:
      raise DatasetInputError(
        f"{name}: nothing prepared in {data_dir}; build it first: {build_command(name, data_dir)}"
      )
    else:
      raise DatasetInputError(f"{name}: several configs prepared in {data_dir} ({found}); pass config=NAME")
  if config not in prepared_configs(name, data_dir):
    raise DatasetInputError(
      f"{name}/{config}: not prepared in {data_dir} (prepared: "
      f"{prepared_configs(name, data_dir)}); build it first: {build_command(name, data_dir, config)}"
    )
  info = check_prepared(name, data_dir, config)
  with _quiet_custom_config_notice():
    return cls(data_dir=os.fspath(data_dir), config=_reading_config(cls, config, info), file_format="array_record")


class _DropCustomConfigNotice(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config_notice():
  """TFDS logs a warning for every config not registered in code; reading one (an xray_folder
  site) is routine, so that notice is dropped while the builder is constructed."""
  logger, notice = logging.getLogger("absl"), _DropCustomConfigNotice()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


# --------------------------------------------------------------------------------------------
# Checks on a prepared dataset folder, before TFDS reads anything from it
# --------------------------------------------------------------------------------------------
_DEFAULT_FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_SAFE_SPLIT = re.compile(r"^[A-Za-z0-9][\w\-]*$")
_TYPE_KEYS = ("pythonClassName", "python_class_name", "type")
_JSON_FEATURE_KEYS = ("jsonFeature", "json_feature")
_DOC_KEYS = ("description", "valueRange")
_CONTENT_KEY = {"Tensor": "tensor", "Text": "text"}


def _class_name(obj) -> str:
  return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _expected_features() -> tuple[str, dict[str, Any]]:
  """(FeaturesDict type name, {feature name: connector}) of ``records.features()``."""
  feats = records.features()
  return _class_name(feats), {k: feats[k] for k in feats.keys()}


def allowed_feature_types() -> frozenset[str]:
  """The fully qualified TFDS feature types fedkd's builders write: the only ones a prepared
  dataset may name."""
  top, feats = _expected_features()
  return frozenset([top] + [_class_name(f) for f in feats.values()])


def _type_names(tree) -> list[str]:
  """Every feature type name in a features JSON tree: proto-JSON ``pythonClassName``, legacy
  ``type``, and legacy JSON embedded as a string in ``jsonFeature.json``."""
  out = []
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k in _TYPE_KEYS:
        out.append(v if isinstance(v, str) else repr(v))
      elif k in _JSON_FEATURE_KEYS and isinstance(v, dict) and isinstance(v.get("json"), str):
        try:
          out += _type_names(json.loads(v["json"]))
        except ValueError:
          out.append(repr(v["json"])[:80])
      else:
        out += _type_names(v)
  elif isinstance(tree, list):
    for v in tree:
      out += _type_names(v)
  return out


def _read_json(path: Path, fix: str) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise DatasetInputError(f"{path}: unreadable ({reason(e, 120)}); {fix}") from None


def _refuse_foreign_types(path: Path, tree, fix: str) -> None:
  allowed = allowed_feature_types()
  bad = [t for t in _type_names(tree) if t not in allowed]
  if bad:
    raise DatasetInputError(
      f"{path}: names feature type {bad[0]!r}, which fedkd never writes (only TFDS' "
      f"{', '.join(sorted(t.rsplit('.', 1)[-1] for t in allowed))}); not opened, as TFDS "
      f"would import that module. {fix}"
    )


def _check_features_json(path: Path, fix: str) -> None:
  """``features.json`` must be exactly the layout of ``records.features()``: a FeaturesDict of
  the same feature names, types, dtypes, shapes and encodings, in TFDS' proto-JSON form."""
  data = _read_json(path, fix)
  _refuse_foreign_types(path, data, fix)
  top, feats = _expected_features()

  def refuse(what: str):
    raise DatasetInputError(
      f"{path}: {what}; fedkd writes a FeaturesDict of image/mask (uint8 zlib tensors) and site/id (text). {fix}"
    )

  def keys_ok(d, allowed) -> bool:
    return isinstance(d, dict) and set(d) <= set(allowed)

  if not keys_ok(data, ("pythonClassName", "featuresDict") + _DOC_KEYS) or data.get("pythonClassName") != top:
    refuse("not the layout fedkd writes (a top-level FeaturesDict in TFDS' proto-JSON form)")
  found = data.get("featuresDict")
  found = found.get("features") if keys_ok(found, ("features",)) else None
  if not isinstance(found, dict) or set(found) != set(feats):
    refuse(f"features {sorted(found) if isinstance(found, dict) else found!r}, expected {sorted(feats)}")
  for key, feature in feats.items():
    entry, kind = found[key], type(feature).__name__
    content_key = _CONTENT_KEY[kind]
    if (
      not keys_ok(entry, ("pythonClassName", content_key) + _DOC_KEYS)
      or entry.get("pythonClassName") != _class_name(feature)
      or not isinstance(entry.get(content_key), dict)
    ):
      refuse(f"feature {key!r} is not a {kind} in TFDS' proto-JSON form")
    content = entry[content_key]
    if kind == "Tensor":
      shape = content.get("shape")
      try:
        dims = [int(d) for d in shape["dimensions"]]
      except (KeyError, TypeError, ValueError):
        dims = None
      want = (
        np.dtype(feature.np_dtype).name,
        [-1 if d is None else int(d) for d in feature.shape],
        feature._encoding.value,
      )
      got = (content.get("dtype"), dims, content.get("encoding"))
      if got != want:
        refuse(f"feature {key!r} is (dtype, shape, encoding) {got}, expected {want}")
    elif content:
      refuse(f"feature {key!r} has text options {sorted(content)}")


def check_prepared(name: str, data_dir, config: str) -> dict:
  """Check the prepared folder ``data_dir/name/config/<version>`` as plain JSON before TFDS
  reads anything from it (see ``load_builder``); return its ``dataset_info.json`` contents.

  Raises ``DatasetInputError`` naming the file and what is wrong."""
  cls = _builder_cls(name)
  config_dir = Path(data_dir) / name / config
  version = str(cls.VERSION)
  vdir = config_dir / version
  fix = f"Rebuild it (python -m fedkd.data.tfds.build --dataset={name} ... --overwrite) or get a fresh copy."
  info_file, features_file = vdir / "dataset_info.json", vdir / "features.json"
  if not info_file.is_file():
    others = [v.name for v in _version_dirs(config_dir)]
    raise DatasetInputError(
      f"{config_dir}: prepared as version(s) {others}, but this fedkd reads {name} "
      f"version {version}; rebuild it with python -m fedkd.data.tfds.build "
      f"--dataset={name} ... --overwrite"
    )

  # fedkd's datasets keep feature definitions in features.json only; TFDS would restore (and
  # import) any it finds in dataset_info.json.
  info = _read_json(info_file, fix)
  if not isinstance(info, dict):
    raise DatasetInputError(f"{info_file}: not a JSON object. {fix}")
  if "features" in info:
    _refuse_foreign_types(info_file, info["features"], fix)
    raise DatasetInputError(f"{info_file}: carries feature definitions, which fedkd keeps in features.json only. {fix}")
  from google.protobuf import json_format
  from tensorflow_datasets.core.proto import dataset_info_pb2

  try:
    proto = json_format.ParseDict(info, dataset_info_pb2.DatasetInfo())
  except (json_format.ParseError, TypeError, ValueError) as e:
    raise DatasetInputError(
      f"{info_file}: not a TFDS dataset_info.json ({str(e).splitlines()[0][:160] if str(e) else e!r}). {fix}"
    ) from None
  if proto.HasField("features"):  # e.g. spelled in another JSON case
    raise DatasetInputError(f"{info_file}: carries feature definitions, which fedkd keeps in features.json only. {fix}")
  expected = {
    "name": (proto.name, name),
    "configName": (proto.config_name, config),
    "version": (proto.version, version),
    "fileFormat": (proto.file_format, "array_record"),
  }
  if proto.module_name:  # TFDS never imports it, but it names who wrote the dataset
    expected["moduleName"] = (proto.module_name, cls.__module__)
  for key, (got, want) in expected.items():
    if got != want:
      raise DatasetInputError(
        f"{info_file}: {key} is {got!r}, expected {want!r} (not a {name}/{config} dataset written by fedkd). {fix}"
      )
  for split in proto.splits:
    if not _SAFE_SPLIT.match(split.name):
      raise DatasetInputError(f"{info_file}: unsafe split name {split.name!r} (letters, digits, _ and - only). {fix}")
    if split.filepath_template not in ("", _DEFAULT_FILE_TEMPLATE):
      raise DatasetInputError(
        f"{info_file}: split {split.name!r} names its files "
        f"{split.filepath_template!r}; fedkd datasets use {_DEFAULT_FILE_TEMPLATE!r} "
        f"inside their own folder. {fix}"
      )
    n = len(split.shard_lengths)
    missing = [
      f for f in (f"{name}-{split.name}.array_record-{i:05d}-of-{n:05d}" for i in range(n)) if not (vdir / f).is_file()
    ]
    if missing:
      raise DatasetInputError(
        f"{vdir}: split {split.name!r} is incomplete, missing {missing[:3]}"
        f"{' ...' if len(missing) > 3 else ''}; copy the whole folder again or rebuild it"
      )
  if not features_file.is_file():
    raise DatasetInputError(f"{features_file}: missing. {fix}")
  _check_features_json(features_file, fix)
  return info


def _reading_config(cls, config: str, info: dict):
  """The BuilderConfig to read prepared config ``config`` with: the registered one, else one
  recreated from its name and stored description. Reading needs only the name (it picks the
  folder); the other fields matter when generating, and records carry their own site."""
  registered = _registered(cls, config)
  if registered is not None:
    return registered
  description = info.get("configDescription") or None
  if cls is SyntheticEndovascular:
    m = re.fullmatch(
      r"(?P<site>.+)-(?P<image_size>\d+)px-(?P<num_train>\d+)-"
      r"(?P<num_test>\d+)-seed(?P<seed>\d+)(?:-physics(?P<physics>\d+))?",
      config,
    )
    fields = {k: (v if k == "site" else int(v)) for k, v in m.groupdict().items() if v is not None} if m else {}
    return SyntheticConfig(name=config, description=description, **fields)
  if cls is XrayFolder:
    return XrayFolderConfig(name=config, description=description)
  return CathactionConfig(name=config, description=description)


def _split_metadata(builder, key: str, split: str):
  """(``metadata.json`` entry ``key`` of ``split`` as stored, the file, the fix line) of a prepared dataset; the
  entry is None for a dataset built before fedkd recorded ``key``, or a split without records. Read as plain JSON;
  a file or ``key`` that is not a mapping is refused."""
  path = Path(os.fspath(builder.data_dir)) / "metadata.json"
  fix = f"Rebuild it (python -m fedkd.data.tfds.build --dataset={builder.name} ... --overwrite) or get a fresh copy."
  if not path.is_file():
    return None, path, fix
  data = _read_json(path, fix)
  entries = data.get(key) if isinstance(data, dict) else data
  if not isinstance(data, dict) or (entries is not None and not isinstance(entries, dict)):
    raise DatasetInputError(f"{path}: malformed {key!r} entry for split {split!r} ({str(entries)[:120]}). {fix}")
  return (entries or {}).get(split), path, fix


def smallest_image(builder, split: str) -> dict | None:
  """The smallest image of ``split`` of a prepared dataset, as its build recorded it in ``metadata.json``
  (``records.SMALLEST_IMAGE_KEY``): ``{"min_side", "height", "width", "id"}``; None for a dataset built
  before fedkd recorded it, or a split without records. Read as plain JSON; a malformed entry is refused."""
  entry, path, fix = _split_metadata(builder, records.SMALLEST_IMAGE_KEY, split)
  if entry is None:
    return None
  ints = ("min_side", "height", "width")
  if not (
    isinstance(entry, dict)
    and all(type(entry.get(k)) is int and entry[k] > 0 for k in ints)
    and entry["min_side"] == min(entry["height"], entry["width"])
    and isinstance(entry.get("id"), str)
  ):
    raise DatasetInputError(
      f"{path}: malformed {records.SMALLEST_IMAGE_KEY!r} entry for split {split!r} ({str(entry)[:120]}). {fix}"
    )
  return {k: entry[k] for k in ints + ("id",)}


def content_digest(builder, split: str) -> str | None:
  """The content digest of ``split`` of a prepared dataset (``records.CONTENT_KEY``: 64 hex digits that change
  with any record's id, image or mask, whatever their order); None for a dataset built before fedkd recorded it,
  or a split without records. Read as plain JSON; a malformed entry is refused."""
  entry, path, fix = _split_metadata(builder, records.CONTENT_KEY, split)
  if entry is None:
    return None
  if not records.is_content_digest(entry):
    raise DatasetInputError(
      f"{path}: malformed {records.CONTENT_KEY!r} entry for split {split!r} ({entry!r:.120}). {fix}"
    )
  return entry


def largest_label(builder, split: str) -> dict | None:
  """The highest mask class of ``split`` of a prepared dataset and the first record holding it, as its build
  recorded them in ``metadata.json`` (``records.LARGEST_LABEL_KEY``): ``{"label", "id"}``; None for a dataset built
  before fedkd recorded it, or a split without records. Read as plain JSON; a malformed entry is refused."""
  entry, path, fix = _split_metadata(builder, records.LARGEST_LABEL_KEY, split)
  if entry is None:
    return None
  if not (
    isinstance(entry, dict)
    and type(entry.get("label")) is int
    and 0 <= entry["label"] <= 255
    and isinstance(entry.get("id"), str)
  ):
    raise DatasetInputError(
      f"{path}: malformed {records.LARGEST_LABEL_KEY!r} entry for split {split!r} ({str(entry)[:120]}). {fix}"
    )
  return {"label": entry["label"], "id": entry["id"]}


def load_source(name: str, split: str, data_dir, config=None) -> SegmentationSource:
  """Random-access source of split ``split`` (see ``SegmentationSource``)."""
  builder = load_builder(name, data_dir, config)
  cfg = builder.info.config_name
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise DatasetInputError(f"{name}/{cfg}: no split {split!r}; available: {splits}")
  if builder.info.splits[split].num_examples == 0:  # TFDS cannot open a split without shards
    raise DatasetInputError(f"{name}/{cfg}: split {split!r} has no records; rebuild it with examples in that split")
  src = builder.as_data_source(split=split)
  return SegmentationSource(src, name=f"{name}/{cfg}:{split}")


def remove(name: str, data_dir, config: str) -> None:
  """Delete a prepared dataset folder ``data_dir/name/config``."""
  _builder_cls(name)
  if not config or config in (".", "..") or Path(config).name != config or "\\" in config:
    raise DatasetInputError(
      f"{name}: config {config!r} is not a config name (a folder name under {Path(data_dir) / name})"
    )
  path = Path(data_dir) / name / config
  if path.is_dir():
    shutil.rmtree(path)
