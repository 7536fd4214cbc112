"""Writes tests/file_seconds.json, the seconds of test time per test file that tests/conftest.py orders the
files by, from the output of a whole-suite run with per-test durations:

  PYTEST_ADDOPTS="--durations=0" pytest > durations.log; python tests/file_seconds.py durations.log
"""

import collections
import json
import os
import re
import sys


def main() -> None:
  if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
    sys.exit("usage: python tests/file_seconds.py DURATIONS_LOG (pytest output with --durations=0)")
  seconds: collections.Counter = collections.Counter()
  with open(sys.argv[1]) as f:
    for line in f:
      m = re.match(r"([\d.]+)s (?:call|setup|teardown)\s+tests/([^:\s]+\.py)::", line)
      if m:
        seconds[m.group(2)] += float(m.group(1))
  if not seconds:
    sys.exit(f"{sys.argv[1]}: no per-test durations in it; run pytest with --durations=0")
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_seconds.json")
  with open(out, "w") as f:
    json.dump({name: round(s, 1) for name, s in seconds.most_common()}, f, indent=0)
    f.write("\n")
  print(f"wrote {out}: {len(seconds)} files, {sum(seconds.values()):.0f} s of test time")


if __name__ == "__main__":
  main()
