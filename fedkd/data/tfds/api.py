"""``build`` / ``load_source``: prepare the fedkd TFDS datasets and read them without TF."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from fedkd.data.tfds import common
from fedkd.data.tfds.cathaction import Cathaction, CathactionConfig
from fedkd.data.tfds.common import DatasetInputError
from fedkd.data.tfds.synthetic_endovascular import SyntheticEndovascular, synthetic_config
from fedkd.data.tfds.xray_folder import XrayFolder, XrayFolderConfig

BUILDERS: dict[str, type] = {
    "synthetic_endovascular": SyntheticEndovascular,
    "cathaction": Cathaction,
    "xray_folder": XrayFolder,
}
_SYNTH_KWARGS = ("site", "image_size", "num_train", "num_test", "seed")
_LABEL_KWARGS = ("label_map", "color_map")


def _builder_cls(name: str) -> type:
    try:
        return BUILDERS[name]
    except KeyError:
        raise DatasetInputError(f"unknown dataset {name!r}; available: {sorted(BUILDERS)}"
                                ) from None


def _check_kwargs(name: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise DatasetInputError(f"{name}: unsupported option(s) {extra}; allowed: "
                                f"{list(allowed)}")


def _registered(cls, config_name: str):
    return next((c for c in cls.BUILDER_CONFIGS if c.name == config_name), None)


def resolve_config(name: str, config=None, manual_dir=None, **kwargs):
    """The BuilderConfig that ``build`` will use (see ``build`` for the rules)."""
    cls = _builder_cls(name)
    if isinstance(config, tfds.core.BuilderConfig):
        if kwargs:
            raise DatasetInputError(f"{name}: pass either a BuilderConfig or options "
                                    f"{sorted(kwargs)}, not both")
        return config
    if config is not None and not isinstance(config, str):
        raise DatasetInputError(f"{name}: config must be a name or BuilderConfig, got "
                                f"{type(config).__name__}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    if cls is SyntheticEndovascular:
        _check_kwargs(name, kwargs, _SYNTH_KWARGS)
        if not kwargs:
            cfg = _registered(cls, config or cls.BUILDER_CONFIGS[0].name)
            if cfg is None:
                raise DatasetInputError(
                    f"{name}: unknown config {config!r}; available: "
                    f"{[c.name for c in cls.BUILDER_CONFIGS]} (or pass site=, image_size=, "
                    f"num_train=, num_test=, seed=)")
            return cfg
        base = _registered(cls, config) if config else None
        if config and base is None:
            raise DatasetInputError(f"{name}: unknown config {config!r} to start from; "
                                    f"available: {[c.name for c in cls.BUILDER_CONFIGS]}")
        fields = {k: getattr(base, k) for k in _SYNTH_KWARGS} if base else {}
        fields.update(kwargs)
        if "site" not in fields:
            raise DatasetInputError(f"{name}: pass site= (one of "
                                    f"{[c.site for c in cls.BUILDER_CONFIGS][::2]}) or config=")
        return synthetic_config(**fields)

    cfg_cls = CathactionConfig if cls is Cathaction else XrayFolderConfig
    allowed = _LABEL_KWARGS + (("site",) if cls is XrayFolder else ())
    _check_kwargs(name, kwargs, allowed)
    registered = _registered(cls, config) if config else None
    if config and registered is None and not kwargs and cls is Cathaction:
        raise DatasetInputError(f"{name}: unknown config {config!r}; available: "
                                f"{[c.name for c in cls.BUILDER_CONFIGS]} (or pass label_map=/"
                                f"color_map= with a new config name)")
    if cls is Cathaction:
        if not kwargs:
            return registered or _registered(cls, "default")
        fields = {k: getattr(registered, k) for k in _LABEL_KWARGS} if registered else {}
        fields.update(kwargs)
        spec = common.LabelSpec.create(fields.get("label_map"), fields.get("color_map"))
        cfg_name = config if (config and not registered) else (
            "custom-" + _short_hash(spec.describe()))
        return cfg_cls(name=common.config_safe_name(cfg_name), description=spec.describe(),
                       **fields)

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
    spec = common.LabelSpec.create(fields.get("label_map"), fields.get("color_map"))
    return cfg_cls(name=common.config_safe_name(cfg_name), site=str(site),
                   description=f"Site {site}; {spec.describe()}.", **fields)


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:8]


def build(name: str, data_dir, manual_dir=None, config=None, *, overwrite: bool = False,
          **kwargs: Any):
    """Prepare dataset ``name`` as array_record files under ``data_dir``; return the builder.

    ``config``: a registered config name, a ``BuilderConfig``, or None (default config).
    Options (``**kwargs``) make a new config:

    * ``synthetic_endovascular``: ``site``, ``image_size``, ``num_train``, ``num_test``,
      ``seed`` (on top of the named config's values);
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
            layout = ("train/images/*.jpg and train/labels/*.png (test/ likewise)"
                      if cls is Cathaction else "images/ and masks/")
            raise DatasetInputError(f"{manual_dir}: manual_dir does not exist; pass the folder "
                                    f"that holds {layout}")
    elif cls is not SyntheticEndovascular:
        raise DatasetInputError(f"{name}: manual_dir is required (the folder with the source "
                                f"files; see {cls.__name__}.MANUAL_DOWNLOAD_INSTRUCTIONS)")
    cfg = resolve_config(name, config, manual_dir=manual_dir, **kwargs)
    data_dir = Path(data_dir)
    builder = cls(data_dir=str(data_dir), config=cfg, file_format="array_record")
    if not overwrite:
        _check_same_settings(builder, cfg)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    dl_config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir is not None else None, download_mode=mode)
    try:
        builder.download_and_prepare(download_config=dl_config)
    except BaseException:
        _remove_empty_dirs(data_dir / name / cfg.name, stop=data_dir)
        raise
    return builder


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
            f"{cfg.description!r}); pass overwrite=True (CLI --overwrite) or another config name")


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


def prepared_configs(name: str, data_dir) -> list[str]:
    """Config names of ``name`` that are fully prepared under ``data_dir``."""
    base = Path(data_dir) / name
    if not base.is_dir():
        return []
    return sorted(c.name for c in base.iterdir()
                  if c.is_dir() and any((v / "dataset_info.json").is_file()
                                        for v in c.iterdir() if v.is_dir()))


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
            raise IndexError(f"index {i} out of range for {self.name or 'source'} of "
                             f"length {n}")
        return i

    def __getitem__(self, i) -> dict:
        return self._convert(self._source[self._index(i)])

    def __getitems__(self, indices) -> list[dict]:
        return [self._convert(ex) for ex in
                self._source.__getitems__([self._index(i) for i in indices])]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"SegmentationSource({self.name}, len={len(self)})"


def load_builder(name: str, data_dir, config=None):
    """The prepared builder for ``name`` / ``config`` in ``data_dir`` (read from its files).

    ``config=None`` picks the only prepared config; with several, it must be named."""
    _builder_cls(name)
    if isinstance(config, tfds.core.BuilderConfig):
        config = config.name
    if config is None:
        found = prepared_configs(name, data_dir)
        if len(found) == 1:
            config = found[0]
        elif not found:
            raise DatasetInputError(
                f"{name}: nothing prepared in {data_dir}; build it first: python -m "
                f"fedkd.data.tfds.build --dataset={name} --data_dir={data_dir} ...")
        else:
            raise DatasetInputError(f"{name}: several configs prepared in {data_dir} "
                                    f"({found}); pass config=NAME")
    if config not in prepared_configs(name, data_dir):
        raise DatasetInputError(
            f"{name}/{config}: not prepared in {data_dir} (prepared: "
            f"{prepared_configs(name, data_dir)}); build it first: python -m "
            f"fedkd.data.tfds.build --dataset={name} --config={config} --data_dir={data_dir}")
    # Read from the files (works for configs not registered in code, e.g. xray_folder sites).
    return tfds.builder_from_directory(_latest_version_dir(Path(data_dir) / name / config))


def _latest_version_dir(config_dir: Path) -> str:
    versions = [v for v in config_dir.iterdir() if (v / "dataset_info.json").is_file()]
    best = max(versions, key=lambda v: tuple(int(x) if x.isdigit() else -1
                                             for x in v.name.split(".")))
    return os.fspath(best)


def load_source(name: str, split: str, data_dir, config=None) -> SegmentationSource:
    """Random-access source of split ``split`` (see ``SegmentationSource``)."""
    builder = load_builder(name, data_dir, config)
    cfg = builder.info.config_name
    splits = list(builder.info.splits.keys())
    if split not in splits:
        raise DatasetInputError(f"{name}/{cfg}: no split {split!r}; available: {splits}")
    src = builder.as_data_source(split=split)
    return SegmentationSource(src, name=f"{name}/{cfg}:{split}")


def remove(name: str, data_dir, config: str) -> None:
    """Delete a prepared dataset folder ``data_dir/name/config``."""
    path = Path(data_dir) / name / config
    if path.is_dir():
        shutil.rmtree(path)
