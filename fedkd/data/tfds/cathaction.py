"""``cathaction``: the CathAction catheter/guidewire segmentation data (manual download).

CathAction (Huang et al. 2024, arXiv 2408.13126) is licensed CC BY-NC-SA 4.0 and is not
redistributed here. Expected layout under ``manual_dir`` (as in the CathAction docs)::

    train/images/*.jpg     train/labels/*.png     (label <stem>.png for image <stem>.jpg)
    test/images/*.jpg      test/labels/*.png
    val/...                (optional, becomes split "val")

A single wrapper folder (e.g. ``manual_dir/CathAction/train/...``) is also accepted.

Label PNG conventions (pick the config or pass ``label_map`` / ``color_map``):

* ``default``: gray PNG whose values are class indices (0 background, 1 catheter, 2 guidewire);
* ``gray_0_128_255``: gray PNG with 0 background, 128 catheter, 255 guidewire;
* ``rgb``: colour PNG, black background, red (255,0,0) catheter, green (0,255,0) guidewire;
* anything else: ``build("cathaction", ..., label_map={...})`` or ``color_map={...}``.

Check a few label files first (``np.unique(np.array(PIL.Image.open(f)))``); an unknown value
fails the build with the values found and the allowed ones. A label PNG without its image (an
incomplete extraction) is refused like an orphan mask of ``xray_folder``, naming the file. Record ids are
``<split>/images/<file name>``; site is ``"cathaction"``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from fedkd.data.tfds import folders
from fedkd.data.tfds import label_maps
from fedkd.data.tfds import records
from fedkd.data.tfds import xray_folder
from fedkd.data.tfds.folders import Pair
from fedkd.data.tfds.label_maps import LabelSpec
from fedkd.data.tfds.records import DatasetInputError

SITE = "cathaction"
SPLITS = ("train", "val", "test")

_CITATION = """\
@article{huang2024cathaction,
  title={CathAction: A Benchmark for Endovascular Intervention Understanding},
  author={Huang, Baoru and others},
  journal={arXiv preprint arXiv:2408.13126},
  year={2024}
}"""


@dataclasses.dataclass
class CathactionConfig(tfds.core.BuilderConfig):
  """Label conventions of the label PNGs (see the module docstring)."""

  label_map: dict | None = None
  color_map: dict | None = None

  def label_spec(self) -> LabelSpec:
    return LabelSpec.create(self.label_map, self.color_map)


class Cathaction(tfds.core.GeneratorBasedBuilder):
  """CathAction X-ray frames with catheter/guidewire masks (manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (segmentation masks only)."}
  BUILDER_CONFIGS = [
    CathactionConfig(name="default", description="Label PNG values are class indices 0/1/2."),
    CathactionConfig(
      name="gray_0_128_255",
      label_map=dict(label_maps.GRAY_0_128_255_MAP),
      description="Label PNG values 0 bg, 128 catheter, 255 guidewire.",
    ),
    CathactionConfig(
      name="rgb",
      color_map=dict(label_maps.RGB_COLOR_MAP),
      description="RGB label PNGs: black bg, red catheter, green guidewire.",
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    CathAction is CC BY-NC-SA 4.0 (non-commercial, share-alike) and must be requested from
    the authors: https://airvlab.github.io/cathdata (request form; see also arXiv 2408.13126).
    Ask for the segmentation subset (images + catheter/guidewire label masks). Extract it so
    that manual_dir contains:
      train/images/*.jpg   train/labels/*.png   (label <stem>.png for image <stem>.jpg)
      test/images/*.jpg    test/labels/*.png
    Then: python -m fedkd.data.tfds.build --dataset=cathaction --manual_dir=DIR \\
            --data_dir=OUT [--config=gray_0_128_255 | --label_map=0:0,128:1,255:2]
    """

  # Set explicitly: TFDS' own lookup of the code path needs the `importlib_resources`
  # backport for packages outside tensorflow_datasets, which is not a dependency here.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "CathAction catheter/guidewire segmentation (phantom and porcine "
        "X-ray). Labels: " + self.builder_config.label_spec().describe()
      ),
      features=records.features(),
      metadata=records.metadata(),
      homepage="https://airvlab.github.io/cathdata",
      citation=_CITATION,
      license="CC BY-NC-SA 4.0",
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = folders.manual_dir_from(
      dl_manager, "cathaction", "download CathAction (see MANUAL_DOWNLOAD_INSTRUCTIONS) and pass manual_dir"
    )
    spec = self.builder_config.label_spec()
    splits = scan_cathaction(root)
    self.info.metadata[records.SOURCE_KEY] = records.source_fingerprint(root)
    xray_folder.check_folder(root, splits, spec)  # everything (incl. orphan labels) before any split is written
    return {name: self._generate_examples(name, pairs, spec) for name, pairs in splits.items()}

  def _generate_examples(self, split, pairs, spec):
    yield from records.track_split_stats(self.info, split, folders.generate_pairs(pairs, spec, SITE))


def _find_root(root: Path) -> Path:
  if any((root / s).is_dir() for s in SPLITS):
    return root
  subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
  if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
    return subdirs[0]
  return root


def scan_cathaction(manual_dir: Path) -> dict[str, list[Pair]]:
  manual_dir = Path(manual_dir)
  if not manual_dir.is_dir():
    raise DatasetInputError(
      f"{manual_dir}: manual_dir not found; extract CathAction there (train/images, train/labels, test/...)"
    )
  root = _find_root(manual_dir)
  out = {}
  for split in SPLITS:
    sdir = root / split
    if not sdir.is_dir():
      continue
    images = folders.list_images(sdir / "images")
    labels = sdir / "labels"
    if not labels.is_dir():
      raise DatasetInputError(
        f"{labels}: label folder not found; CathAction expects {split}/labels/<stem>.png next to {split}/images/"
      )
    out[split] = [Pair(image=p, mask_dir=labels, stem=p.stem, id_prefix=f"{split}/images/{p.name}") for p in images]
  if not out:
    found = sorted(p.name for p in manual_dir.iterdir())[:10]
    raise DatasetInputError(
      f"{manual_dir}: no CathAction split folders (train/, test/, val/) found (contents: "
      f"{found}); extract the archive so that {manual_dir}/train/images exists"
    )
  return out
