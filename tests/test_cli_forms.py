"""The command line as absl also accepts it: ``--config FILE`` and ``--config.KEY VALUE`` (a space instead of
'='), flags read from a ``--flagfile``, a whole group given as ``--config.GROUP=...``, overrides before
``--config``, ``--config`` twice, a config path holding ':' are checked like ``--config=FILE`` and end in one
line (exit 2); output piped into a reader that exits (``| head``) stops quietly with exit 141 instead of a
BrokenPipeError traceback."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
QS = "--config=configs/quickstart.py"
EFM = "--config=configs/fedefm.py:tiny"
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")

# Parses argv as fedkd.main does, then prints the keys given on the command line and the config as JSON.
PARSE = """
import sys
from fedkd import cli
cli.parse(["fedkd.main"] + sys.argv[1:], shared=("workdir",))
print("overridden:", ",".join(sorted(cli.OVERRIDDEN)), file=sys.stderr)
print(cli.CONFIG.value.to_json())
"""


def _parse(*args: str):
  """(exit code, stderr, config dict or None); fedkd.cli is imported with these arguments in sys.argv."""
  r = subprocess.run(
    [sys.executable, "-c", PARSE, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60
  )
  i = r.stdout.find("{")
  return r.returncode, r.stderr, json.loads(r.stdout[i:]) if r.returncode == 0 and i >= 0 else None


def _one_line_error(code: int, stderr: str, *needles: str) -> str:
  assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("fedkd: error: "), stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def test_config_and_overrides_given_with_a_space_are_read_and_checked():
  # absl reads '--config FILE' as '--config=FILE': the overrides are checked against that file's task
  code, err, c = _parse(
    "--config", "configs/fedefm.py:tiny", "--config.fedefm.beta", "0.3", "--config.fedefm.emd_debias"
  )
  assert code == 0, err
  assert c["task"] == "fedefm" and c["image_size"] == 16 and c["fedefm"]["beta"] == 0.3
  assert c["fedefm"]["emd_debias"] is True
  assert "overridden: fedefm.beta,fedefm.emd_debias" in err
  code, err, c = _parse("-config", "configs/quickstart.py", "--config.num_rounds", "7")
  assert code == 0 and c["num_rounds"] == 7 and c["task"] == "fedavg", err
  # ... and refused as the '=' forms are
  code, err, _ = _parse("--config", "configs/quickstart.py:runlocal")
  _one_line_error(code, err, "unknown config argument(s) ['runlocal']", "drop ':runlocal'")
  code, err, _ = _parse("--config", "configs/quickstart.py", "--config.num_rounds", "2.0")
  _one_line_error(code, err, "config.num_rounds takes a whole number", "--config.num_rounds=2")
  code, err, _ = _parse("--config", "configs/nope.py")
  _one_line_error(code, err, "'configs/nope.py' not found")


def test_flags_of_a_flagfile_are_checked(tmp_path):
  good = tmp_path / "good.flags"
  good.write_text("--config=configs/fedefm.py:tiny\n--config.fedefm.beta=0.7\n")
  code, err, c = _parse(f"--flagfile={good}")
  assert code == 0 and c["task"] == "fedefm" and c["fedefm"]["beta"] == 0.7, err
  assert "overridden: fedefm.beta" in err  # the keys a flagfile overrides count as given
  bad = tmp_path / "bad.flags"
  bad.write_text("--config=configs/quickstart.py\n--config.num_rounds=2.0\n")
  code, err, _ = _parse(f"--flagfile={bad}")
  _one_line_error(code, err, "--config.num_rounds=2.0", "--config.num_rounds=2")


def test_a_flagfile_that_cannot_be_read_is_one_line(tmp_path):
  missing = tmp_path / "missing.flags"
  for module in ("fedkd.main", "fedkd.eval"):  # absl's config flag reads the flagfile as fedkd.cli is imported
    r = subprocess.run(
      [sys.executable, "-m", module, f"--flagfile={missing}"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    _one_line_error(r.returncode, r.stderr, "--flagfile", str(missing), "No such file")


MISHANDLED = [
  # a group given a value would replace the whole group (its other keys gone, any key or type let in)
  ("group =", [QS, "--config.eval={'every': 3}"], ["config.eval is a group of keys", "--config.eval."]),
  ("group space", [QS, "--config.eval", "{'every': 3}"], ["config.eval is a group of keys"]),
  ("override first", ["--config.num_rounds=3", QS], ["--config.num_rounds=3 comes before --config=FILE"]),
  ("config twice", [QS, "--config.num_rounds=3", EFM], ["--config is given 2 times", "give one config file"]),
  ("override alone", ["--config.num_rounds=3"], ["--config is required"]),
  ("config typo", ["--confg=configs/quickstart.py", "--config.num_rounds=3"], ["is --confg meant to be --config?"]),
]


@pytest.mark.parametrize("name, args, needles", MISHANDLED, ids=[m[0] for m in MISHANDLED])
def test_command_line_forms_ml_collections_mishandles_are_one_line(name, args, needles):
  code, err, _ = _parse(*args)
  _one_line_error(code, err, *needles)


def test_a_config_path_holding_a_colon_is_one_line(tmp_path):
  folder = tmp_path / "a:b"  # the first ':' starts the config argument, so the file cannot be read from here
  folder.mkdir()
  shutil.copy(ROOT / "configs" / "quickstart.py", folder / "q.py")
  code, err, _ = _parse(f"--config={folder}/q.py")
  _one_line_error(code, err, f"'{folder}/q.py' holds ':'", "without ':'")
  # launch.sweep says the same (it said "config file '.../a' not found")
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the launch/ package lives next to fedkd/
  from launch import sweep as launcher

  with pytest.raises(launcher.InputError, match=r"holds ':'.*without ':'"):
    launcher.load_config_module(f"{folder}/q.py")


def _with_closed_stdout(args: list[str]) -> subprocess.CompletedProcess:
  """Runs ``args`` with stdout a pipe whose reader has already exited (as ``| head`` leaves it)."""
  r, w = os.pipe()
  os.close(r)
  try:
    return subprocess.run(args, cwd=ROOT, env=ENV, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
  finally:
    os.close(w)


def test_output_into_a_closed_pipe_stops_quietly():
  for module in ("fedkd.main", "fedkd.data.preview"):
    p = _with_closed_stdout([sys.executable, "-m", module, "--helpfull"])
    assert p.returncode == 141 and p.stderr == "", (module, p.returncode, p.stderr[-3000:])
  # while the program runs: one line on stderr that says what is kept
  prog = "from fedkd import cli\ncli.run_app(lambda argv: print('x' * 100000), uses_config=False, shared=())"
  p = _with_closed_stdout([sys.executable, "-c", prog])
  assert p.returncode == 141, (p.returncode, p.stderr[-3000:])
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fedkd: output pipe closed; interrupted"), p.stderr[-3000:]
  assert "re-run the same command to resume" in lines[0], lines
  # a BrokenPipeError with stdout still open is a bug: its traceback, exit 1
  prog = "from fedkd import cli\ndef main(argv):\n  raise BrokenPipeError(32, 'a worker pipe')\n"
  prog += "cli.run_app(main, uses_config=False, shared=())"
  p = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1 and "Traceback" in p.stderr and "a worker pipe" in p.stderr, p.stderr[-3000:]


def test_a_line_break_in_a_user_given_path_stays_inside_the_one_line(cli, tmp_path):
  r = cli.run("fedkd.eval", [f"--workdir={tmp_path}/no\nwhere"], timeout=120)
  _one_line_error(r.code, r.stderr, f"--workdir={tmp_path}/no\\nwhere does not exist")
