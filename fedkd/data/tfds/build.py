"""Build a fedkd TFDS dataset (array_record) from the command line.

    python -m fedkd.data.tfds.build --dataset=xray_folder --manual_dir=DIR --data_dir=OUT \\
        [--config=NAME] [--site=NAME] [--label_map=0:0,128:1,255:2] [--color_map='R,G,B:C;...']
    python -m fedkd.data.tfds.build --dataset=cathaction --manual_dir=DIR --data_dir=OUT \\
        [--config=default|gray_0_128_255|rgb]
    python -m fedkd.data.tfds.build --dataset=synthetic_endovascular --data_dir=OUT \\
        [--config=SITE|SITE_tiny] [--site=SITE --image_size=128 --num_train=256 --num_test=64] [--physics=2|3]
    python -m fedkd.data.tfds.build --dataset=synthetic_endovascular --list_configs

Prints the config built, its folder and, per split, the example count and image shapes;
conversion notes (16-bit or colour images converted, ...) go to stderr as ``note: ...`` lines.
Bad input prints one ``error: ...`` line and exits with status 2, and so do I/O failures:
``--data_dir`` an existing file, a read-only folder, a full disk. ``~`` at the start of
``--data_dir`` / ``--manual_dir`` is expanded (the shell does not expand it after ``=``). Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import os
from pathlib import Path
import sys
import time
import types

from fedkd.data.tfds import api
from fedkd.data.tfds.api import BUILDERS, build, load_source  # noqa: F401 (re-exported)
from fedkd.data.tfds.label_maps import parse_color_map, parse_label_map
from fedkd.data.tfds.records import DatasetInputError

_SHAPE_SAMPLE = 64  # records inspected per split for the shape summary


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m fedkd.data.tfds.build", description="Build a fedkd TFDS dataset (array_record)."
  )
  p.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
  p.add_argument("--data_dir", help="output folder (TFDS data_dir)")
  p.add_argument("--manual_dir", help="source folder (cathaction, xray_folder)")
  p.add_argument("--config", help="config name (registered, or a new name for options)")
  p.add_argument("--site", help="site name (xray_folder; synthetic_endovascular site)")
  p.add_argument("--label_map", help="mask value:class pairs, e.g. 0:0,128:1,255:2")
  p.add_argument("--color_map", help="mask colour:class pairs, e.g. '0,0,0:0;255,0,0:1'")
  p.add_argument("--image_size", type=int, help="synthetic_endovascular image size")
  p.add_argument("--num_train", type=int, help="synthetic_endovascular train examples")
  p.add_argument("--num_test", type=int, help="synthetic_endovascular test examples")
  p.add_argument("--seed", type=int, help="synthetic_endovascular seed")
  p.add_argument("--physics", type=int, help="synthetic_endovascular forward model: 1 (default), 2 or 3")
  p.add_argument("--overwrite", action="store_true", help="rebuild if already prepared")
  p.add_argument("--list_configs", action="store_true", help="list registered configs")
  return p


def _summary(builder) -> list[str]:
  from fedkd.data.tfds.api import SegmentationSource

  info = builder.info
  lines = [f"built {info.name}/{info.config_name} version {info.version} in {builder.data_dir}"]
  for split, sinfo in info.splits.items():
    src = SegmentationSource(builder.as_data_source(split=split), name=f"{info.name}/{info.config_name} {split}")
    shapes, sites = {}, set()
    for i in range(min(len(src), _SHAPE_SAMPLE)):
      ex = src[i]
      key = (tuple(ex["image"].shape), tuple(ex["mask"].shape))
      shapes[key] = shapes.get(key, 0) + 1
      sites.add(ex["site"])
    shape_txt = ", ".join(
      f"image {i} mask {m}" + (f" x{n}" if len(shapes) > 1 else "") for (i, m), n in sorted(shapes.items())
    )
    sampled = "" if len(src) <= _SHAPE_SAMPLE else f" (first {_SHAPE_SAMPLE} inspected)"
    lines.append(f"  {split}: {sinfo.num_examples} examples; {shape_txt}; site {', '.join(sorted(sites))}{sampled}")
  if "test" not in info.splits:
    hint = " (xray_folder: a splits.json with a 'test' list of image stems)" if info.name == "xray_folder" else ""
    lines.append(
      f"note: no 'test' split; fedkd.main evaluates each site on its test split, so add one{hint} and rebuild "
      "with --overwrite before training on this dataset"
    )
  return lines


# OS errors that mean "cannot write there" when a writer reports them inside another exception
# (array_record raises RuntimeError("... write() failed: No space left on device; ...")).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _within(path, folder) -> bool:
  """``path`` is ``folder`` or inside it (both made absolute, symlinks not resolved)."""
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _os_error(e: OSError, data_dir: str, manual_dir: str | None) -> str:
  reason = _one_line(e.strerror or e)
  if e.errno == errno.ENOTDIR:
    reason += " (a part of the path is a file)"
  where = os.fspath(e.filename) if isinstance(e.filename, (str, os.PathLike)) else None
  if where and (_within(where, data_dir) or _within(data_dir, where)):
    detail = "" if os.path.abspath(where) == os.path.abspath(data_dir) else f" ({where})"
    return (
      f"cannot write the dataset to --data_dir {data_dir}: {reason}{detail}; check "
      f"that it is a writable folder with free space, or pass another --data_dir"
    )
  if where and manual_dir and _within(where, manual_dir):
    return f"cannot read {where}: {reason}; check the file and its permissions"
  return f"I/O error while building into --data_dir {data_dir}: {reason}" + (f" ({where})" if where else "")


def _write_failure(e: Exception, data_dir: str) -> str | None:
  """The error line for a writer exception that reports an OS write error for a file under
  ``data_dir`` (e.g. a full disk), else None (an unexpected error: keep the traceback)."""
  text = _one_line(e)
  dirs = {data_dir, os.path.abspath(data_dir)}
  reasons = [os.strerror(n) for n in _WRITE_ERRNOS if os.strerror(n) in text]
  if not reasons or not any(d in text for d in dirs):
    return None
  return (
    f"cannot write the dataset to --data_dir {data_dir}: {reasons[0]} ({text}); free space or pass another --data_dir"
  )


def _prepared_since(data_dir: str, dataset: str, since: float) -> list[str]:
  """The folders of ``dataset`` under ``data_dir`` whose preparation completed at ``since`` or later (an
  interrupted --overwrite build may have swapped its new version in before it was stopped)."""
  found = []
  for info in Path(data_dir).glob(f"{dataset}/*/*/dataset_info.json"):
    try:
      if info.stat().st_mtime >= since:
        found.append(str(info.parent))
    except OSError:
      continue
  return found


def main(argv=None) -> int:
  from fedkd.cli import line_buffered

  line_buffered()
  args = _parser().parse_args(argv)
  if args.list_configs:
    for cfg in BUILDERS[args.dataset].BUILDER_CONFIGS:
      print(f"{cfg.name}: {cfg.description or ''}")
    return 0
  if not args.data_dir:
    print("error: --data_dir is required (the output folder)", file=sys.stderr)
    return 2
  # The shell leaves "~" alone after "=": without this, a literal "./~" folder would appear.
  data_dir = os.path.expanduser(args.data_dir)
  manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    print(
      f"error: --data_dir {data_dir} is an existing file, not a folder; pass a folder (it is created if missing)",
      file=sys.stderr,
    )
    return 2
  # TFDS/absl progress bars, notices and "custom config" warnings would drown the summary.
  logging.getLogger("absl").setLevel(logging.ERROR)
  builder, started = None, time.time()
  try:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    opts = {
      "site": args.site,
      "image_size": args.image_size,
      "num_train": args.num_train,
      "num_test": args.num_test,
      "seed": args.seed,
      "physics": args.physics,
    }
    if args.label_map:
      opts["label_map"] = parse_label_map(args.label_map)
    if args.color_map:
      opts["color_map"] = parse_color_map(args.color_map)
    opts = {k: v for k, v in opts.items() if v is not None}
    prepared_before = {str(p) for p in Path(data_dir).glob(f"{args.dataset}/*/*/dataset_info.json")}
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS' "Downloading and preparing"
      builder = build(
        args.dataset, data_dir, manual_dir=manual_dir, config=args.config, overwrite=args.overwrite, **opts
      )
    lines = _summary(builder)
    if not args.overwrite and str(Path(os.fspath(builder.data_dir)) / "dataset_info.json") in prepared_before:
      source = f" from {manual_dir}" if manual_dir else ""
      lines[0] = lines[0].replace("built ", "already prepared (reused): ", 1)
      lines.append(f"note: the source was not read again; pass --overwrite to rebuild it{source}")
  except KeyboardInterrupt:
    made = _prepared_since(data_dir, args.dataset, started) if builder is None else [os.fspath(builder.data_dir)]
    done = f"the dataset in {made[0]} is prepared" if made else None
    print(
      f"interrupted: {done or 'nothing was prepared (a version prepared before is kept as it was)'}; "
      "run the command again" + (" to see its summary" if done else ""),
      file=sys.stderr,
    )
    return 130
  except DatasetInputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {_os_error(e, data_dir, manual_dir)}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    message = _write_failure(e, data_dir)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    return 2
  try:
    print("\n".join(lines), flush=True)
  except BrokenPipeError:  # the summary piped into e.g. `head`: the dataset is built, so not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


class _CallableModule(types.ModuleType):
  """Importing this submodule rebinds the package attribute ``fedkd.data.tfds.build`` (the
  ``build`` function) to this module; calling the module keeps ``fdata.build(...)`` working."""

  def __call__(self, *args, **kwargs):
    return api.build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  sys.exit(main())
