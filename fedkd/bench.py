"""``python -m fedkd.bench [flags]`` is ``python -m bench [flags]``: the benchmarks (JSON lines) live in
the checkout's top-level ``bench/`` folder, outside the library; this name runs them from any working
directory of an editable install (``pip install -e .``). ``python -m fedkd.bench --help`` lists the flags;
bench/README.md lists the tools and docs/engine.md#measurements has the measurements."""

from __future__ import annotations

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  if not os.path.isfile(os.path.join(ROOT, "bench", "__main__.py")):
    print(
      f"fedkd: error: the benchmarks are in a source checkout's bench/ folder, and this fedkd ({ROOT}) is not "
      "one; clone the repository, pip install -e . there and run python -m fedkd.bench (or python -m bench)",
      file=sys.stderr,
    )
    sys.exit(2)
  sys.path.insert(0, ROOT)
  runpy.run_module("bench", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
