"""Summarises XLA's optimized HLO dumps: does the im2col concatenate land inside the GEMM?

  XLA_FLAGS=--xla_dump_to=/tmp/xdump JAX_ENABLE_COMPILATION_CACHE=false \
      python -m bench.conv --formulations gemm --passes fwd,all --reps 2
  python bench/hlo_report.py /tmp/xdump

For every ``*after_optimizations.txt`` module: the number of GEMMs by kind (Triton GEMM fusions,
cuBLAS / cuBLASLt custom calls, CPU dots), cuDNN convolutions, and, for the Triton GEMM fusions,
how many have a concatenate / slice / pad inside their fused computation (i.e. the patch matrix is
built on the fly, not written to memory first); and all dots and concatenates. One JSON line per
module.

Checked on XLA:CPU dumps only. The GPU patterns follow XLA:GPU's names (custom-call targets
``__cublas$gemm`` / ``__cublas$lt$matmul`` / ``__cudnn$conv...``, fusions whose backend config names a
``__triton...`` kind); no GPU dump has been read with it yet.
"""

import glob
import json
import os
import re
import sys


def computations(text: str) -> dict:
  """name -> body of each HLO computation in a module's text."""
  out, name, body = {}, None, []
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m and not line.startswith(" "):
      name, body = m.group(1), []
      continue
    if line.startswith("}") and name is not None:
      out[name] = "\n".join(body)
      name = None
      continue
    if name is not None:
      body.append(line)
  return out


def report(path: str) -> dict:
  text = open(path).read()
  comps = computations(text)
  triton, triton_fused_im2col = 0, 0
  for line in text.splitlines():
    if " fusion(" not in line:
      continue
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = comps.get(called.group(1), "") if called else ""
    if "__triton" in line and " dot(" in body:
      triton += 1
      if re.search(r" (concatenate|slice|pad)\(", body):
        triton_fused_im2col += 1
  return dict(
    module=os.path.basename(path).split(".")[1] if "." in os.path.basename(path) else path,
    file=os.path.basename(path),
    triton_gemm_fusions=triton,
    triton_gemm_with_im2col_inside=triton_fused_im2col,
    cublas_gemms=len(re.findall(r'custom_call_target="__cublas', text)),
    cudnn_convs=len(re.findall(r'custom_call_target="__cudnn\$conv', text)),
    dots=len(re.findall(r" dot\(", text)),
    concatenates=len(re.findall(r" concatenate\(", text)),
  )


def main(argv=None) -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bench import ArgumentParser, fail

  p = ArgumentParser(prog="hlo_report", description=__doc__.split("\n\n")[0])
  p.add_argument("dump_dir", help="the folder XLA_FLAGS=--xla_dump_to=DIR wrote")
  a = p.parse_args(argv)
  if not os.path.isdir(a.dump_dir):
    fail("hlo_report", f"{a.dump_dir} is not a folder; give the one XLA_FLAGS=--xla_dump_to=DIR wrote")
  files = sorted(glob.glob(os.path.join(a.dump_dir, "*after_optimizations.txt")))
  if not files:
    fail(
      "hlo_report",
      f"no *after_optimizations.txt module in {a.dump_dir}; dump one with XLA_FLAGS=--xla_dump_to={a.dump_dir} "
      "(and JAX_ENABLE_COMPILATION_CACHE=false, so that the programs are compiled, not loaded)",
    )
  for f in files:
    print(json.dumps(report(f)), flush=True)


if __name__ == "__main__":
  main()
