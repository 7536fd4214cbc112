"""Client of tests/cli_server.py: ``CLI().run("fedkd.main", [...])`` -> Result(code, stdout, stderr)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Result:
  code: int | None
  stdout: str
  stderr: str
  timed_out: bool
  seconds: float

  @property
  def traceback(self) -> bool:
    return "Traceback (most recent call last)" in self.stderr + self.stdout


class CLI:
  """One server process for many CLI runs (each a fork of it; see cli_server.py)."""

  def __init__(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    self.proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "cli_server.py")],
      cwd=ROOT,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    ready = self.proc.stdout.readline()
    assert json.loads(ready)["ready"], ready

  def run(
    self, module: str, args: list[str], cwd: str | None = None, env: dict | None = None, timeout: float = 300
  ) -> Result:
    case = {"module": module, "args": [str(a) for a in args], "cwd": cwd or ROOT, "env": env or {}, "timeout": timeout}
    self.proc.stdin.write(json.dumps(case) + "\n")
    self.proc.stdin.flush()
    return Result(**json.loads(self.proc.stdout.readline()))

  def close(self) -> None:
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a server stuck in a case: do not leave it running
      self.proc.kill()
      self.proc.wait()
