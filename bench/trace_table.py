"""Device time per op category from a ``jax.profiler`` trace: where a round's time goes.

  python bench/trace_table.py TRACE_DIR [--hlo FILE] [--top 15]

TRACE_DIR is what ``jax.profiler.trace(TRACE_DIR, create_perfetto_trace=True)`` wrote (the newest
``*.trace.json.gz`` under it is read; ``python -m bench --profile DIR`` writes one per row). Prints one
JSON object: milliseconds per category, the busy and idle time of the device timeline, and the
``--top`` ops by time.

Which events: on a GPU/TPU the device process's op line (``XLA Ops``; else its stream lines: kernels);
on CPU the XLA executor threads' op events (not the host-side dispatch or the Python frames). An op
is put in a category by its HLO instruction when the optimized HLO text is given (``--hlo``, or
``exe.as_text()`` from Python): convolutions by pass (cuDNN custom-call targets: forward, backward input
= dgrad, backward filter = wgrad; XLA convolutions by their dimension labels), dot/GEMM (cuBLAS and Triton
GEMM fusions too), reductions and norms, transposes/copies, collectives, elementwise fusions; without it
by the op or kernel name alone (coarser). ``idle`` is the part of the timeline's span (first op start to
last op end) with no op running: launch gaps, host waits, synchronisation.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
from collections import defaultdict

CATEGORIES = (
  "conv fwd",
  "conv dgrad",
  "conv wgrad",
  "conv",
  "gemm",
  "reduction/norm",
  "transpose/copy",
  "collective",
  "elementwise/fusion",
  "other",
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def newest_trace(trace_dir: str) -> str:
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(
      f"no *.trace.json.gz under {trace_dir}: write one with jax.profiler.trace(dir, create_perfetto_trace=True)"
    )
  return max(files, key=os.path.getmtime)


def parse_hlo(text: str) -> dict[str, dict]:
  """Instruction name -> {"opcode", "shape", "target" (custom-call target), "op_name" (the JAX op it came
  from), "window", "dims" (convolution dim_labels), "inner" (the instructions of a called fusion
  computation)} from optimized HLO text."""
  comps: dict[str, list[dict]] = {}
  instrs: dict[str, dict] = {}
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    info = {"opcode": opcode, "shape": shape.strip()}
    for key, pattern in (
      ("target", r'custom_call_target="([^"]+)"'),
      ("called", r"calls=%?([\w.\-]+)"),
      ("dims", r"dim_labels=([\w>\-]+)"),
      ("window", r"window=\{size=([\dx]+)"),
      ("op_name", r'op_name="([^"]+)"'),
    ):
      if found := re.search(pattern, rest):
        info[key] = found.group(1)
    instrs[name] = info
    if current is not None:
      comps[current].append(info)
  for info in instrs.values():
    if "called" in info:
      info["inner"] = comps.get(info["called"], [])
  return instrs


def _spatial(shape: str, labels: str) -> list[int]:
  """The spatial sizes ('0', '1', ... in ``labels``) of an HLO array shape like f32[8,3,3,8]{...}."""
  m = re.search(r"\[([\d,]*)\]", shape)
  dims = [int(d) for d in m.group(1).split(",") if d] if m else []
  return [dims[i] for i, ch in enumerate(labels) if ch.isdigit() and i < len(dims)]


def _conv_pass(info: dict) -> str:
  """fwd / dgrad / wgrad of a convolution: cuDNN custom calls by target; XLA convolutions by the window
  (a filter gradient slides the whole activation: a window larger than its kernel-sized output), else by
  the JAX op they came from (the backward pass is under ``transpose(...)``); "conv" when neither says."""
  t = info.get("target", "").lower()
  if "backwardinput" in t or "dgrad" in t:
    return "conv dgrad"
  if "backwardfilter" in t or "wgrad" in t:
    return "conv wgrad"
  if "forward" in t or "fprop" in t:
    return "conv fwd"
  if info.get("opcode") != "convolution":
    return "conv"
  window = [int(v) for v in info.get("window", "").split("x") if v]
  out = _spatial(info["shape"], info.get("dims", "->").split("->")[-1])
  if window and out and len(window) == len(out) and all(w > o for w, o in zip(window, out)):
    return "conv wgrad"
  if "op_name" not in info:
    return "conv"
  return "conv dgrad" if "transpose(" in info["op_name"] else "conv fwd"


def categorize(op: str, hlo: dict[str, dict] | None = None) -> str:
  """The category of one op event (``op``: the HLO instruction or kernel name)."""
  info = (hlo or {}).get(op)
  if info:
    code, target, inner = info["opcode"], info.get("target", "").lower(), info.get("inner", [])
    codes = {i["opcode"] for i in inner}
    if code == "convolution" or "conv" in target:
      return _conv_pass(info)
    conv = next((i for i in inner if i["opcode"] == "convolution" or "conv" in i.get("target", "").lower()), None)
    if conv is not None:
      return _conv_pass(conv)
    if code == "dot" or "gemm" in target or "matmul" in target or "dot" in codes:
      return "gemm"
    if code in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute") or code.endswith(
      ("-start", "-done")
    ):
      return "collective"
    if code in ("transpose", "copy") or (
      codes and codes <= {"transpose", "copy", "parameter", "bitcast", "reshape", "tuple", "get-tuple-element"}
    ):
      return "transpose/copy"
    if code in ("reduce", "reduce-window") or "reduce" in codes or "reduce-window" in codes:
      return "reduction/norm"
    if code == "fusion" or inner:
      return "elementwise/fusion"
    return "other"
  n = op.lower()
  # by kernel name: cuDNN's convolution kernels name their pass (xmma / cutlass kernels also serve GEMMs, and
  # XLA's "convert" fusions are not convolutions)
  if any(k in n for k in ("fprop", "dgrad", "wgrad")) or ("conv" in n.replace("convert", "") and "fusion" not in n):
    return _conv_pass({"target": n})
  if any(k in n for k in ("gemm", "matmul", "dot", "cublas", "cutlass", "nvjet", "xmma")):  # nvjet: cuBLASLt, Hopper
    return "gemm"
  if any(k in n for k in ("nccl", "all-reduce", "allreduce", "all-gather", "collective")):
    return "collective"
  if any(k in n for k in ("transpose", "copy", "nchwtonhwc", "nhwctonchw")):  # cuDNN's layout changes
    return "transpose/copy"
  if "reduce" in n or "norm" in n:
    return "reduction/norm"
  if "fusion" in n or "loop" in n:
    return "elementwise/fusion"
  return "other"


_HLO_OP_ARG = re.compile(r"hlo_op=([^,#\s]+)")


def hlo_op_of(event: dict, hlo: dict[str, dict] | None = None) -> str:
  """The HLO instruction an op event ran: its ``hlo_op`` argument, else an ``hlo_op=NAME`` inside any string
  argument (a GPU kernel's thunk annotation), else its name; a kernel name XLA spelt with '_' for the
  instruction's '.' (``fusion_12`` for ``fusion.12``) is mapped back where the HLO has that instruction."""
  args = event.get("args") or {}
  if args.get("hlo_op"):
    return str(args["hlo_op"])
  for value in args.values():
    if isinstance(value, str) and (m := _HLO_OP_ARG.search(value)):
      return m.group(1)
  name = event["name"]
  if hlo and name not in hlo and (m := re.fullmatch(r"(.+)_(\d+)", name)) and f"{m.group(1)}.{m.group(2)}" in hlo:
    return f"{m.group(1)}.{m.group(2)}"
  return name


def op_events(trace: dict) -> tuple[list[dict], str]:
  """(the op events of the device timeline, which line they came from)."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  proc = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {
    (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  complete = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
  device = {pid for pid, name in proc.items() if name.startswith("/device:")}
  if device:
    ops = [e for e in complete if e["pid"] in device and thread.get((e["pid"], e["tid"]), "") == "XLA Ops"]
    if ops:
      return ops, "device XLA Ops"
    streams = [e for e in complete if e["pid"] in device and "stream" in thread.get((e["pid"], e["tid"]), "").lower()]
    return streams, "device streams"
  host_skip = ("ThunkExecutor", "end: ", "PjRt", "Pjit", "Execute")
  # XLA:CPU runs a thunk on the calling (python) thread or on its pool threads: an op event of either names its
  # HLO op (``args.hlo_op``); a trace whose events carry none falls back to the pool threads' events
  tagged = [e for e in complete if "hlo_op" in (e.get("args") or {}) and not e["name"].startswith(host_skip)]
  if tagged:
    return tagged, "host XLA ops (every thread)"
  ops = [
    e
    for e in complete
    if thread.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
    and not e["name"].startswith(host_skip)
    and not e["name"].startswith("$")
  ]
  return ops, "host XLA threads"


def _busy(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, -float("inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def summarize(trace_dir: str, hlo_text: str | None = None, top: int = 15) -> dict:
  path = newest_trace(trace_dir)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  ops, source = op_events(trace)
  hlo = parse_hlo(hlo_text) if hlo_text else None
  per_cat: dict[str, float] = defaultdict(float)
  per_op: dict[str, list] = {}
  for e in ops:
    name = hlo_op_of(e, hlo)
    cat = categorize(name, hlo)
    ms = e["dur"] / 1e3
    per_cat[cat] += ms
    rec = per_op.setdefault(name, [0.0, 0, cat])
    rec[0] += ms
    rec[1] += 1
  spans = [(e["ts"], e["ts"] + e["dur"]) for e in ops]
  span_ms = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e3 if spans else 0.0
  busy_ms = _busy(spans) / 1e3
  total = sum(per_cat.values()) or 1.0
  shape = lambda n: (hlo or {}).get(n, {}).get("shape")  # noqa: E731
  return {
    "trace": path,
    "events": source,
    "ops": len(ops),
    "op_ms": round(sum(per_cat.values()), 3),
    "span_ms": round(span_ms, 3),
    "busy_ms": round(busy_ms, 3),
    "idle_ms": round(max(span_ms - busy_ms, 0.0), 3),
    "categories": {
      c: {"ms": round(per_cat[c], 3), "share": round(per_cat[c] / total, 4)} for c in CATEGORIES if c in per_cat
    },
    "top": [
      {"op": n, "category": r[2], "ms": round(r[0], 3), "count": r[1], "shape": shape(n)}
      for n, r in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
    ],
  }


def main(argv=None) -> None:
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bench import ArgumentParser, fail

  ap = ArgumentParser(prog="trace_table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("trace_dir")
  ap.add_argument("--hlo", help="optimized HLO text of the traced program (exe.as_text())")
  ap.add_argument("--top", type=int, default=15)
  a = ap.parse_args(argv)
  if a.top < 0:
    fail("trace_table", f"--top={a.top} must be >= 0")
  try:
    hlo = open(a.hlo).read() if a.hlo else None
  except OSError as e:
    fail("trace_table", f"--hlo={a.hlo}: {e.strerror or e}; give the file exe.as_text() was written to")
  try:
    print(json.dumps(summarize(a.trace_dir, hlo, a.top)))
  except FileNotFoundError as e:  # no trace under trace_dir (newest_trace names the fix)
    fail("trace_table", str(e))


if __name__ == "__main__":
  main()
