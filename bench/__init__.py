"""Benchmarks of the federated round and its convolutions; not part of the installed ``fedkd`` package.

Run them from the repository root (bench/README.md):

  python -m bench                                  # the round against the centralized ceiling (JSON lines)
  python -m bench --measure --config=configs/quickstart.py   # the fastest layout x lowering for a config
  python -m bench.conv                             # one client-batched conv layer, per formulation and pass
  bash bench/gpu.sh                                # the GPU measurements in one device call
  python bench/hlo_report.py DUMP_DIR              # does XLA:GPU fuse the im2col patches into its GEMMs?
"""

import argparse
import sys


def fail(prog: str, msg: str, code: int = 2):
  """A user error of a bench tool: one line ``PROG: error: MSG`` on stderr, exit ``code`` (2), no traceback."""
  print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose bad flag is one line ``PROG: error: ...`` and exit 2 (not the usage block); ``--help`` as usual."""

  def error(self, message: str):
    fail(self.prog, f"{message} (--help lists the flags)")
