"""TFDS builders for fedkd segmentation data (array_record files, read without TensorFlow).

Builders (importing this package registers them with TFDS):

* ``synthetic_endovascular``: snapshots of ``fedkd.data.synth``; configs ``<site>`` and
  ``<site>_tiny`` for every ``fedkd.data.sites.make_sites(5)`` site plus the unseen site.
* ``cathaction``: CathAction (manual download, CC BY-NC-SA 4.0); configs ``default``,
  ``gray_0_128_255``, ``rgb``.
* ``xray_folder``: a hospital's own ``images/`` + ``masks/`` folder (PNG/JPEG/DICOM incl. cine).

Every record: ``image`` uint8 [H, W, 1], ``mask`` uint8 [H, W] (0 bg, 1 catheter,
2 guidewire, 3 vessel), ``site`` str, ``id`` str.

Modules: ``records`` (the record format, ``DatasetInputError``), ``label_maps`` (stored mask values ->
classes), ``decode`` (PNG/JPEG/DICOM image and mask files -> uint8 arrays), ``folders`` (image/mask
folders -> checked records), ``api`` (build, find and read prepared datasets), ``build`` (the CLI),
and one module per builder.

    from fedkd.data import tfds as fdata
    fdata.build("xray_folder", "/data/tfds", manual_dir="/data/hospital_a")
    src = fdata.load_source("xray_folder", "train", "/data/tfds", config="hospital_a")
    ds = grain.MapDataset.source(src)
"""

from fedkd.data.tfds.api import (
  BUILDERS,
  SegmentationSource,
  build,
  build_command,
  config_names,
  content_digest,
  largest_label,
  load_builder,
  load_source,
  prepared_configs,
  resolve_config,
  smallest_image,
)
from fedkd.data.tfds.cathaction import Cathaction, CathactionConfig
from fedkd.data.tfds.label_maps import GRAY_0_128_255_MAP, RGB_COLOR_MAP, parse_color_map, parse_label_map
from fedkd.data.tfds.records import CLASS_NAMES, NUM_CLASSES, DatasetInputError
from fedkd.data.tfds.synthetic_endovascular import SyntheticConfig, SyntheticEndovascular, synthetic_config
from fedkd.data.tfds.xray_folder import XrayFolder, XrayFolderConfig

__all__ = [
  "BUILDERS",
  "build_command",
  "CLASS_NAMES",
  "Cathaction",
  "CathactionConfig",
  "DatasetInputError",
  "GRAY_0_128_255_MAP",
  "NUM_CLASSES",
  "RGB_COLOR_MAP",
  "SegmentationSource",
  "SyntheticConfig",
  "SyntheticEndovascular",
  "XrayFolder",
  "XrayFolderConfig",
  "build",
  "config_names",
  "content_digest",
  "largest_label",
  "load_builder",
  "load_source",
  "parse_color_map",
  "parse_label_map",
  "prepared_configs",
  "resolve_config",
  "smallest_image",
  "synthetic_config",
]
