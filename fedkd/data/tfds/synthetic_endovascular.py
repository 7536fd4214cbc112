"""``synthetic_endovascular``: fixed, versioned snapshots of the on-device X-ray generator.

One config per simulated site: the ``fedkd.data.sites.make_sites(NUM_CLIENTS)`` training sites
plus the unseen site, named after the site (names are read from ``make_sites`` at import, so
renamed sites are picked up automatically). Each site has two registered configs:

* ``<site>``:       image_size 128, 256 train / 64 test examples;
* ``<site>_tiny``:  image_size 32, 8 train / 4 test examples (tests, smoke runs).

Other sizes: ``synthetic_config(site, image_size=..., num_train=..., num_test=..., seed=...,
physics=...)`` (or ``build("synthetic_endovascular", data_dir, site=..., image_size=...)``) makes a config
named ``<site>-<size>px-<train>-<test>-seed<seed>``, with ``-physics<p>`` appended where the generator's
forward model (``synth.PHYSICS``; config.data.synthetic_physics) is not 1, as every registered config's is.

Example ``i`` of split ``train`` (``test``) is ``synth.generate(seed, table, [site_id], [[i]],
image_size, split=0 (1), physics=physics)`` with ``table = sites.site_table(train_sites + [unseen])`` and
``site_id`` the site's position in that list; image -> ``uint8(round(255 * clip(x, 0, 1)))``,
mask -> uint8 (0 bg, 1 catheter, 2 guidewire, 3 vessel). Record ``i`` of a split is example
``i`` (no shuffling), id ``<site>/<split>/<i:05d>``. Rendering runs on the CPU backend so the
same version + config give identical records on any machine; the records change only if the
generator code or the site list changes (bump VERSION when that happens).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fedkd.config import SYNTHETIC_PHYSICS
from fedkd.data import sites as _sites
from fedkd.data.tfds import records
from fedkd.data.tfds.records import DatasetInputError

NUM_CLIENTS = 5
DEFAULT_IMAGE_SIZE, DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST = 128, 256, 64
TINY_IMAGE_SIZE, TINY_NUM_TRAIN, TINY_NUM_TEST = 32, 8, 4
_CHUNK = 32  # examples rendered per generate() call
_SPLITS = (("train", 0), ("test", 1))


def site_profiles() -> list:
  """Training sites followed by the unseen site, as passed to ``site_table``."""
  train, unseen = _sites.make_sites(NUM_CLIENTS)
  return list(train) + [unseen]


def site_names() -> list[str]:
  return [p.name for p in site_profiles()]


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  site: str = ""
  image_size: int = DEFAULT_IMAGE_SIZE
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST
  seed: int = 0
  physics: int = 1  # the generator's forward model (fedkd.data.synth.PHYSICS)


def synthetic_config(
  site: str,
  image_size: int = DEFAULT_IMAGE_SIZE,
  num_train: int = DEFAULT_NUM_TRAIN,
  num_test: int = DEFAULT_NUM_TEST,
  seed: int = 0,
  physics: int = 1,
) -> SyntheticConfig:
  """The registered config for these settings, or a new one with a descriptive name."""
  names = site_names()
  if site not in names:
    raise DatasetInputError(f"synthetic_endovascular: unknown site {site!r}; available sites: {names}")
  if isinstance(physics, bool) or physics not in SYNTHETIC_PHYSICS:
    raise DatasetInputError(
      f"synthetic_endovascular: physics={physics!r} is unknown; use one of {list(SYNTHETIC_PHYSICS)} "
      "(the generator's forward model, as config.data.synthetic_physics)"
    )
  image_size, num_train, num_test, seed = map(int, (image_size, num_train, num_test, seed))
  if image_size < 8 or num_train < 0 or num_test < 0 or num_train + num_test == 0 or seed < 0:
    raise DatasetInputError(
      f"synthetic_endovascular: need image_size >= 8, num_train/num_test >= 0 (not both "
      f"0) and seed >= 0; got {image_size}, {num_train}, {num_test}, {seed}"
    )
  for cfg in SyntheticEndovascular.BUILDER_CONFIGS:
    if (cfg.site, cfg.image_size, cfg.num_train, cfg.num_test, cfg.seed, cfg.physics) == (
      site,
      image_size,
      num_train,
      num_test,
      seed,
      physics,
    ):
      return cfg
  model = "" if physics == 1 else f", physics {physics}"
  return SyntheticConfig(
    name=f"{site}-{image_size}px-{num_train}-{num_test}-seed{seed}" + ("" if physics == 1 else f"-physics{physics}"),
    site=site,
    image_size=image_size,
    num_train=num_train,
    num_test=num_test,
    seed=seed,
    physics=physics,
    description=f"Site {site}, {image_size}px, {num_train} train / {num_test} test, seed {seed}{model}.",
  )


def _registered_configs() -> list[SyntheticConfig]:
  out = []
  for name in site_names():
    out.append(
      SyntheticConfig(
        name=name,
        site=name,
        description=f"Site {name}, {DEFAULT_IMAGE_SIZE}px, "
        f"{DEFAULT_NUM_TRAIN} train / {DEFAULT_NUM_TEST} test, seed 0.",
      )
    )
    out.append(
      SyntheticConfig(
        name=f"{name}_tiny",
        site=name,
        image_size=TINY_IMAGE_SIZE,
        num_train=TINY_NUM_TRAIN,
        num_test=TINY_NUM_TEST,
        description=f"Site {name}, {TINY_IMAGE_SIZE}px, {TINY_NUM_TRAIN} train / "
        f"{TINY_NUM_TEST} test, seed 0 (for tests).",
      )
    )
  return out


def quantize(images: np.ndarray) -> np.ndarray:
  """float [0, 1] -> uint8 ``round(255 * clip(x, 0, 1))`` (numpy half-to-even)."""
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


class SyntheticEndovascular(tfds.core.GeneratorBasedBuilder):
  """Synthetic catheter/guidewire fluoroscopy frames from ``fedkd.data.synth``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First snapshot of fedkd.data.synth.generate (CPU rendering)."}
  BUILDER_CONFIGS = _registered_configs()

  # Set explicitly: TFDS' own lookup of the code path needs the `importlib_resources`
  # backport for packages outside tensorflow_datasets, which is not a dependency here.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Synthetic endovascular X-ray frames (catheter, guidewire, vessels) "
        f"from fedkd.data.synth; site {cfg.site}, {cfg.image_size}px, "
        f"seed {cfg.seed}" + ("." if cfg.physics == 1 else f", physics {cfg.physics}.")
      ),
      features=records.features(),
      metadata=records.metadata(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    profiles = site_profiles()
    names = [p.name for p in profiles]
    if cfg.site not in names:
      raise DatasetInputError(
        f"synthetic_endovascular/{cfg.name}: site {cfg.site!r} is not produced by "
        f"fedkd.data.sites.make_sites({NUM_CLIENTS}) any more; available sites: {names}"
      )
    site_id = names.index(cfg.site)
    counts = {"train": cfg.num_train, "test": cfg.num_test}
    return {
      name: self._generate_examples(profiles, site_id, name, split, counts[name])
      for name, split in _SPLITS
      if counts[name] > 0
    }

  def _generate_examples(self, profiles, site_id, split_name, split, count):
    yield from records.track_split_stats(
      self.info, split_name, self._examples(profiles, site_id, split_name, split, count)
    )

  def _examples(self, profiles, site_id, split_name, split, count):
    cfg = self.builder_config
    chunk = min(_CHUNK, max(cfg.num_train, cfg.num_test))  # one batch shape per config
    frames = render(profiles, site_id, split, count, cfg.image_size, cfg.seed, chunk=chunk, physics=cfg.physics)
    for start, images, masks in frames:
      for j in range(images.shape[0]):
        i = start + j
        ex_id = f"{cfg.site}/{split_name}/{i:05d}"
        yield i, records.record(images[j], masks[j], cfg.site, ex_id)


def render(
  profiles, site_id: int, split: int, count: int, image_size: int, seed: int, chunk: int = _CHUNK, physics: int = 1
):
  """Yield ``(start, uint8 images [n, H, W, 1], uint8 masks [n, H, W])`` chunks covering
  examples ``0 .. count-1``, rendered on the CPU backend in batches of ``chunk`` examples
  (``synth.generate`` renders an example identically whatever batch it is in) with forward model ``physics``."""
  import contextlib

  import jax

  from fedkd.data import synth

  chunk = max(1, int(chunk))
  # On a CPU-default process, no device context: it would key a separate compilation.
  on_cpu = contextlib.nullcontext() if jax.default_backend() == "cpu" else jax.default_device(jax.devices("cpu")[0])
  with on_cpu:
    table = _sites.site_table(profiles)
    for start in range(0, count, chunk):
      idx = np.arange(start, start + chunk, dtype=np.int32)  # fixed shape: one compile
      images, masks = synth.generate(
        seed, table, np.array([site_id], np.int32), idx[None], image_size, split=split, physics=physics
      )
      n = min(chunk, count - start)
      yield (start, quantize(np.asarray(images)[0, :n]), np.asarray(masks)[0, :n].astype(np.uint8))
