"""A user's view of the run outputs and the benchmark tools: TensorBoard events after a resume, the output
fields docs/outputs.md promises, and the bench tools' bad-flag lines (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_tb(tb_dir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every scalar in a folder of event files, in file and write order: a plain
  TFRecord + Event-proto parse, independent of fedkd.logs. (Not TensorBoard's EventAccumulator: it purges
  "orphaned" steps itself, which would hide a duplicate the code under test failed to drop.)"""
  from tensorboardX.proto import event_pb2

  out: dict[str, list] = {}
  for name in sorted(os.listdir(tb_dir)):
    data = open(os.path.join(tb_dir, name), "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _session(workdir, resume_from: int, rounds: range, loss_offset: float, evals=()):
  """What fedkd.tasks.fedavg.run does with its RunLog: truncate to the resumed round, then per round a
  rounds.jsonl record and scalars, and evaluation records."""
  from fedkd.logs import RunLog

  log = RunLog(workdir)
  log.truncate_after(resume_from)
  for r in rounds:
    loss = loss_offset + r
    log.round_record({"round": r, "loss": loss})
    log.scalars(r, {"train/loss": loss})
    if r in evals:
      log.record({"round": r, "dice/catheter": loss / 10})
  log.close()


def test_a_resumed_run_leaves_one_tensorboard_value_per_step(tmp_path):
  """A run that logged rounds 1-3 but died after its round-2 checkpoint redoes round 3 on resume: TensorBoard
  then holds round 3 once, with the resumed run's value, as rounds.jsonl and metrics.jsonl do."""
  _session(tmp_path, -1, range(1, 4), 0.0, evals=(2, 3))
  _session(tmp_path, 2, range(3, 5), 100.0, evals=(4,))
  tb = read_tb(tmp_path / "tb")
  assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]
  assert tb["eval/dice/catheter"] == [(2, pytest.approx(0.2)), (4, pytest.approx(10.4))]
  rounds = [json.loads(line) for line in open(tmp_path / "rounds.jsonl")]
  assert [(r["round"], r["loss"]) for r in rounds] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]
  metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [m["round"] for m in metrics] == [2, 4]


def test_event_files_sort_in_the_order_they_were_written_across_a_second_boundary(tmp_path, monkeypatch):
  """tensorboardX names a file by the second it opens it; fedkd added the nanoseconds within the second, read a
  moment before. A file opened as a second began (nanoseconds .999999 of the second before, tensorboardX's second
  the next) then sorted after a file opened later in that second, so TensorBoard, which reads files in name order,
  saw the resumed run's steps before the first run's (the full suite hit it once)."""
  import time

  clock = {}
  monkeypatch.setattr(time, "time_ns", lambda: clock["ns"])
  monkeypatch.setattr(time, "time", lambda: clock["t"])
  second = 1_800_000_000
  clock.update(ns=second * 10**9 + 999_999_000, t=second + 1.000001)  # the first writer, at the boundary
  _session(tmp_path, -1, range(1, 4), 0.0)
  clock.update(ns=(second + 1) * 10**9 + 500_000_000, t=second + 1.5)  # the resumed run's, later that second
  _session(tmp_path, 2, range(3, 5), 100.0)
  assert read_tb(tmp_path / "tb")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]


def test_a_fresh_start_drops_the_events_of_an_attempt_without_a_checkpoint(tmp_path):
  _session(tmp_path, -1, range(1, 3), 0.0)
  _session(tmp_path, -1, range(1, 2), 50.0)  # no checkpoint was kept: the run starts over
  assert read_tb(tmp_path / "tb") == {"train/loss": [(1, 51.0)]}


def test_a_resume_with_nothing_to_drop_leaves_the_event_files_alone(tmp_path):
  _session(tmp_path, -1, range(1, 3), 0.0)
  before = {n: (tmp_path / "tb" / n).read_bytes() for n in os.listdir(tmp_path / "tb")}
  _session(tmp_path, 2, range(3, 3), 0.0)  # resumed at the end: no round left
  assert {n: (tmp_path / "tb" / n).read_bytes() for n in os.listdir(tmp_path / "tb")} == before


# ------------------------------------------------------------------------------ docs/outputs.md fields


def _doc_patterns(file: str) -> list[re.Pattern]:
  """The backticked names in docs/outputs.md's FedAvg-family row of ``file``, as full-match patterns
  (``*`` and ``<name>`` match any run of characters)."""
  text = open(os.path.join(ROOT, "docs", "outputs.md")).read()
  section = text.split("## `python -m fedkd.main` with a FedAvg-family config", 1)[1].split("\n## ", 1)[0]
  row = next(line for line in section.splitlines() if line.startswith(f"| `{file}` |"))
  names = re.findall(r"`([^`]+)`", row.split("|", 2)[2])
  return [
    re.compile(re.sub(r"\\\*|<[a-z]+>", ".+", re.escape(n).replace(r"\<", "<").replace(r"\>", ">"))) for n in names
  ]


def test_every_metrics_record_key_is_documented():
  from fedkd.evaluate import summarize

  per_site = {
    s: {"dice/catheter": 0.5, "dice/guidewire": 0.4, "iou/catheter": 0.3, "iou/guidewire": 0.2}
    for s in ("site_a", "site_b", "unseen_site")
  }
  rec = summarize(5, per_site, "unseen_site")
  rec.update({"comm/bytes_up_total": 1.0, "comm/bytes_down_total": 2.0, "dp/epsilon": 0.5})
  patterns = _doc_patterns("metrics.jsonl")
  missing = [k for k in rec if not any(p.fullmatch(k) for p in patterns)]
  assert not missing, f"metrics.jsonl keys not in docs/outputs.md: {missing}"


def test_every_tensorboard_tag_is_documented(tmp_path):
  """The tags a round and an evaluation write (fedkd.tasks.fedavg's scalars and RunLog.record's eval/ tags)."""
  from fedkd.logs import RunLog
  from fedkd.tasks import fedavg

  tags = set(fedavg.speed_scalars(0.5, 1.0, 8, 0.1)) | set(fedavg.round_logs(1, 0.5, [0], 1, 1.0, 1.0, 1.0, 1.0)[1])
  tags |= {"train/dropped_clients", "dp/epsilon", "dp/median_norm", "dp/clipped_fraction"}
  log = RunLog(tmp_path)
  log.record({"round": 0, "dice/catheter": 0.5, "site/a/iou/guidewire": 0.1, "unseen/iou/catheter": 0.2})
  log.close()
  tags |= set(read_tb(tmp_path / "tb"))
  patterns = _doc_patterns("tb/")
  missing = sorted(t for t in tags if not any(p.fullmatch(t) for p in patterns))
  assert not missing, f"TensorBoard tags not in docs/outputs.md: {missing}"


# ------------------------------------------------------------------------------ the bench tools' bad flags


def _run(cli, args, timeout=120):
  """``python *args`` (``-m module ...`` or ``script.py ...``) as a fresh process: a fork of the CLI server."""
  if args[0] == "-m":
    module, rest = args[1], args[2:]
    if os.path.isdir(os.path.join(ROOT, *module.split("."))):  # a package: python -m runs its __main__
      module += ".__main__"
  else:
    module, rest = args[0], args[1:]
  r = cli.run(module, rest, timeout=timeout)
  return subprocess.CompletedProcess(args, r.code, r.stdout, r.stderr)


def _one_line(r, prefix: str, *needles: str) -> None:
  assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), r.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert not r.stdout.strip(), r.stdout  # refused before anything was timed


TINY = ["--size=32", "--clients=2", "--steps=1", "--batch=2", "--width=4", "--depth=1", "--rounds=1"]


@pytest.mark.parametrize(
  "args, needles",
  [
    (["--workload", "D"], ["invalid choice: 'D'"]),
    (["--size", "x"], ["invalid int value: 'x'"]),
    (["--scale", "4", "--layouts", "none"], ["--scale needs a layout"]),
    (["--measure", "--config=configs/quickstart.py", "--rounds", "0"], ["--rounds=0 must be positive"]),
    (["--profile", "{file}/traces"], ["--profile=", "cannot write traces there"]),
  ],
)
def test_round_bench_bad_flag_is_one_line(cli, tmp_path, args, needles):
  (tmp_path / "file").write_text("")
  args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
  _one_line(_run(cli, ["-m", "bench", *TINY, *args]), "bench", *needles)


@pytest.mark.parametrize(
  "args, prefix, needles",
  [
    (["-m", "bench.conv", "--reps", "0"], "bench.conv", ["--reps=0 must be positive"]),
    (["-m", "bench.conv", "--dtype", "f16"], "bench.conv", ["invalid choice: 'f16'"]),
    (["bench/hlo_report.py"], "hlo_report", ["dump_dir"]),
    (["bench/hlo_report.py", "{tmp}"], "hlo_report", ["no *after_optimizations.txt module"]),
    (["bench/hlo_report.py", "{tmp}/none"], "hlo_report", ["is not a folder"]),
    (["bench/trace_table.py", "{tmp}"], "trace_table", ["no *.trace.json.gz under", "create_perfetto_trace=True"]),
    (["bench/replicas.py", "--seeds", "0"], "replicas", ["--seeds=0"]),
    (["bench/replicas.py", "--seeds", "0,1", "--rounds", "1"], "replicas", ["--rounds=1"]),
    (["bench/replicas.py", "--seeds", "0,1", "--layout", "bogus"], "replicas", ["unknown replica layout"]),
    (["bench/pipeline.py", "--data_dir", "{tmp}/d", "--rounds", "2"], "pipeline", ["--rounds=2"]),
    (["bench/pipeline.py", "--data_dir", "{tmp}/d", "--workers", "a"], "pipeline", ["--workers=a"]),
    (["bench/fedefm_stack.py", "--methods", "bogus"], "fedefm_stack", ["unknown method 'bogus'"]),
    (["bench/fedefm_stack.py", "--rounds", "2"], "fedefm_stack", ["--rounds=2 leaves no round to time"]),
    (["bench/fedefm_grid.py", "--betas", "x"], "fedefm_grid", ["--config.fedefm.beta=x"]),
    (["bench/vs_torch.py", "--anchor", "{tmp}/none.py"], "vs_torch", ["no anchor script"]),
    (["bench/vs_torch.py", "--anchor", "{anchor}", "--torch-python", "{tmp}/py"], "vs_torch", ["cannot be run"]),
    (["bench/vs_torch.py", "--anchor", "{anchor}"], "vs_torch", ["torch is not installed in", "--torch-python"]),
    # a flag of neither vs_torch nor bench, before and after --: was forwarded, and failed after a PyTorch run
    (["bench/vs_torch.py", "--anchor", "{anchor}", "--bogus"], "vs_torch", ["unrecognized arguments: --bogus"]),
    (["bench/vs_torch.py", "--anchor", "{anchor}", "--", "--rounds", "x"], "vs_torch", ["--rounds: invalid int"]),
    (["bench/fedefm_torch.py", "--bogus"], "fedefm_torch", ["unrecognized arguments: --bogus"]),
    (["-m", "bench", "--bogus"], "bench", ["unrecognized arguments: --bogus (--help lists the flags)"]),
  ],
)
def test_bench_tool_bad_input_is_one_line(cli, tmp_path, args, prefix, needles):
  anchor = tmp_path / "anchor.py"  # a stand-in for the anchor script in a Python without torch
  anchor.write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
  args = [a.replace("{anchor}", str(anchor)).replace("{tmp}", str(tmp_path)) for a in args]
  _one_line(_run(cli, args), prefix, *needles)
  assert not (tmp_path / "d").exists()  # pipeline.py refused before building a dataset


def test_hlo_report_reads_a_dump(cli, tmp_path):
  """One JSON line per optimized module, its counts those of the text (two dots, one concatenate)."""
  text = (
    "HloModule jit_f\n\nENTRY %main (a: f32[2,2]) -> f32[2,2] {\n"
    "  %a = f32[2,2] parameter(0)\n  %c = f32[4,2] concatenate(%a, %a), dimensions={0}\n"
    "  %d = f32[2,2] dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n"
    "  ROOT %e = f32[2,2] dot(%d, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n}\n"
  )
  (tmp_path / "module_0001.jit_f.cpu_after_optimizations.txt").write_text(text)
  (tmp_path / "module_0001.jit_f.before_optimizations.txt").write_text(text)
  r = _run(cli, ["bench/hlo_report.py", str(tmp_path)])
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in r.stdout.splitlines()]
  assert len(rows) == 1 and rows[0]["dots"] == 2 and rows[0]["concatenates"] == 1, rows


def test_evaluations_left_counts_the_rounds_a_run_evaluates():
  """The ETA adds the evaluations still to come: every ``every``-th round after r and the last round."""
  from fedkd.logs import evaluations_left

  for last in range(1, 30):
    for every in range(1, 12):
      for r in range(0, last + 1):
        expected = sum(1 for q in range(r + 1, last + 1) if q % every == 0 or q == last)
        assert evaluations_left(r, last, every) == expected, (r, last, every)


# round lines as a run prints them (fedkd.tasks.fedavg; the replicas with one loss per replica), and the
# (round, rounds, seconds as printed) a reader of the progress output takes from each
ROUND_LINES = [
  ("round    5/150 [#...................]   3%  loss 0.4321    1.23s  (includes compilation)", (5, 150, 1.23)),
  (
    "round   12/12 [####################] 100%  loss   none (no sampled client reported)    4.2ms    250.0 img/s  "
    "eta     0s  | held-out dice catheter 0.5000 guidewire 0.2500",
    (12, 12, 0.0042),
  ),
  ("round    2/4 [##########..........]  50%  loss 0.1234 stopped 0.5678   12.35s     88.1 img/s", (2, 4, 12.35)),
]


def test_round_lines_are_written_and_read_back_in_one_format():
  """fedkd.logs.round_line writes the progress line (fedavg and the replicas); parse_round_line reads round,
  rounds and the printed seconds back (bench/replicas.py, bench/pipeline.py) and skips every other line."""
  from fedkd.logs import parse_round_line, round_line

  written = [
    round_line(5, 150, "0.4321", 1.234, "(includes compilation)"),
    round_line(12, 12, "  none (no sampled client reported)", 0.00421, "  250.0 img/s  eta     0s")
    + "  | held-out dice catheter 0.5000 guidewire 0.2500",
    round_line(2, 4, "0.1234 stopped 0.5678", 12.349, "   88.1 img/s"),
  ]
  assert written == [line for line, _ in ROUND_LINES]
  for line, parsed in ROUND_LINES:
    got = parse_round_line(line)
    assert got[:2] == parsed[:2] and got[2] == pytest.approx(parsed[2], rel=1e-12), (line, got)
  for other in (
    "round 0 (untrained): dice catheter 0.1615  guidewire 0.0313",
    "round 1: compiling the round program; later rounds reuse it",
    "round 3: dropped client(s) [1] (non-finite update)",
    "round 3, seed-1: dropped client(s) [1] (non-finite update)",
    "resuming from round 4 (checkpoint in /w/checkpoints)",
  ):
    assert parse_round_line(other) is None, other


def test_a_round_time_below_a_tenth_of_a_second_is_in_milliseconds():
  """The progress line's round time: '12.35s' from 0.1 s up, milliseconds below (a 4 ms GPU round
  printed as '0.00s' before)."""
  from fedkd.logs import duration

  for seconds, shown in (
    (12.345, " 12.35s"),
    (1.0, "  1.00s"),
    (0.53, "  0.53s"),
    (0.1, "  0.10s"),
    (0.0999, " 99.9ms"),
    (0.0042, "  4.2ms"),
    (0.0, "  0.0ms"),
  ):
    assert duration(seconds) == shown, (seconds, duration(seconds))
