"""bench/trace_table.py: op categories from optimized HLO, and device time from a trace, against hand counts."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import trace_table as tt  # noqa: E402


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_passes_of_a_two_layer_gradient():
  """d/dx and d/dw of sum(conv(relu(conv(x, w1)), w2)): the backward pass needs the first layer's output
  (1 forward conv; the second layer's output only feeds the sum, whose gradient is ones), two filter
  gradients (w1, w2) and two input gradients (through layer 2 to layer 1's output, through layer 1 to x)."""

  def f(x, w1, w2):
    return _conv(jax.nn.relu(_conv(x, w1)), w2).sum()

  args = (jnp.ones((4, 16, 16, 8)), jnp.ones((3, 3, 8, 8)), jnp.ones((3, 3, 8, 8)))
  text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().as_text()
  hlo = tt.parse_hlo(text)
  convs = [n for n, i in hlo.items() if i["opcode"] == "convolution"]
  cats = sorted(tt.categorize(n, hlo) for n in convs)
  assert cats == ["conv dgrad", "conv dgrad", "conv fwd", "conv wgrad", "conv wgrad"], cats
  for n in convs:  # a filter gradient is kernel-shaped
    assert (tt.categorize(n, hlo) == "conv wgrad") == ("[8,3,3,8]" in hlo[n]["shape"])


def test_kernel_names_without_hlo():
  assert tt.categorize("sm90_xmma_fprop_implicit_gemm_bf16") == "conv fwd"
  assert tt.categorize("sm80_xmma_dgrad_implicit_gemm") == "conv dgrad"
  assert tt.categorize("sm80_xmma_wgrad_implicit_gemm") == "conv wgrad"
  assert tt.categorize("cutlass_80_tensorop_gemm") == "gemm"
  assert tt.categorize("ncclDevKernel_AllReduce") == "collective"
  assert tt.categorize("transpose_copy_fusion.3") == "transpose/copy"
  assert tt.categorize("loop_add_fusion") == "elementwise/fusion"
  # names that hold a conv-like word but are not convolutions: bf16 casts, cuBLAS GEMMs on xmma, cuDNN layouts
  assert tt.categorize("loop_convert_fusion") == "elementwise/fusion"
  assert tt.categorize("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
  assert tt.categorize("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNN") == "gemm"
  assert tt.categorize("nchwToNhwcKernel") == "transpose/copy" == tt.categorize("nhwcToNchwKernel")
  assert tt.categorize("implicit_convolve_sgemm") == "conv"


def test_a_kernel_event_names_its_hlo_instruction():
  """GPU stream events carry the instruction as an hlo_op argument, inside a thunk annotation, or only as a
  kernel name that spells its '.' as '_'."""
  hlo = tt.parse_hlo(
    "ENTRY %main (p: f32[2]) -> f32[2] {\n"
    '  %conv.4 = f32[4,16,16,8]{3,2,1,0} custom-call(%p), custom_call_target="__cudnn$convBackwardInput"\n'
    "  ROOT %fusion.12 = f32[2]{0} fusion(%p), kind=kLoop, calls=%fused_add\n"
    "}\n"
  )
  assert tt.hlo_op_of({"name": "k", "args": {"hlo_op": "conv.4"}}, hlo) == "conv.4"
  event = {"name": "sm90_xmma_dgrad", "args": {"long_name": "Thunk:#hlo_op=conv.4,hlo_module=jit_f,program_id=3#"}}
  assert tt.hlo_op_of(event, hlo) == "conv.4" and tt.categorize("conv.4", hlo) == "conv dgrad"
  assert tt.hlo_op_of({"name": "fusion_12"}, hlo) == "fusion.12"
  assert tt.hlo_op_of({"name": "fusion_13"}, hlo) == "fusion_13"  # no such instruction: the name as it is


def _write(tmp_path, events):
  d = tmp_path / "plugins" / "profile" / "run"
  d.mkdir(parents=True)
  with gzip.open(d / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  return str(tmp_path)


def test_device_time_busy_and_idle_from_a_trace(tmp_path):
  """A GPU-shaped trace: the device process's "XLA Ops" line is read (not its stream line, not the host);
  overlapping ops count once in busy time; idle = span - busy."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "XLA Ops"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 11, "args": {"name": "Stream #7(Compute)"}},
    {"ph": "M", "name": "thread_name", "pid": 2, "tid": 20, "args": {"name": "python"}},
  ]
  ops = [  # (name, start us, duration us)
    ("conv.1", 0, 100),
    ("fusion.2", 50, 100),  # overlaps conv.1 by 50
    ("conv.1", 400, 100),
    ("transpose.3", 600, 50),
  ]
  events = meta + [{"ph": "X", "pid": 1, "tid": 10, "name": n, "ts": s, "dur": d} for n, s, d in ops]
  events += [{"ph": "X", "pid": 1, "tid": 11, "name": "kernel", "ts": 0, "dur": 9999}]
  events += [{"ph": "X", "pid": 2, "tid": 20, "name": "PjitFunction", "ts": 0, "dur": 9999}]
  hlo = tt.parse_hlo(
    "ENTRY %main (p: f32[2]) -> f32[2] {\n"
    '  %conv.1 = f32[4,16,16,8]{3,2,1,0} custom-call(%p), custom_call_target="__cudnn$convForward"\n'
    "  %fusion.2 = f32[2]{0} fusion(%p), kind=kLoop, calls=%fused_add\n"
    "  ROOT %transpose.3 = f32[2]{0} transpose(%p), dimensions={0}\n"
    "}\n"
  )
  out = tt.summarize(_write(tmp_path, events), hlo_text=None)
  assert out["events"] == "device XLA Ops" and out["ops"] == 4
  assert out["op_ms"] == pytest.approx(0.35)
  assert out["span_ms"] == pytest.approx(0.65)
  assert out["busy_ms"] == pytest.approx((150 + 100 + 50) / 1e3)
  assert out["idle_ms"] == pytest.approx(0.35)
  assert out["top"][0]["op"] == "conv.1" and out["top"][0]["count"] == 2 and out["top"][0]["ms"] == pytest.approx(0.2)
  cats = {n: tt.categorize(n, hlo) for n in ("conv.1", "fusion.2", "transpose.3")}
  assert cats == {"conv.1": "conv fwd", "fusion.2": "elementwise/fusion", "transpose.3": "transpose/copy"}


def test_a_cpu_trace_counts_the_ops_run_on_the_calling_thread(tmp_path):
  """XLA:CPU runs some thunks on the calling (python) thread, not on its tf_XLA pool threads: the centralized
  step's convolutions were left out (reviewer: 82 % of its op time, reported as idle). Every event naming its HLO
  op counts, on whichever thread; 'end:' markers and the executor's own spans do not."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "thread_name", "pid": 2, "tid": 20, "args": {"name": "python"}},
    {"ph": "M", "name": "thread_name", "pid": 2, "tid": 21, "args": {"name": "tf_XLAEigen/123"}},
  ]

  def op(tid, name, ts, dur):
    return {"ph": "X", "pid": 2, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": {"hlo_op": name}}

  events = meta + [
    op(20, "conv_general_dilated.3", 0, 1000),  # on the python thread
    {"ph": "X", "pid": 2, "tid": 20, "name": "PjitFunction(jit(f))", "ts": 0, "dur": 5000},
    {"ph": "X", "pid": 2, "tid": 20, "name": "end: conv_general_dilated.3", "ts": 1000, "dur": 1, "args": {}},
    op(21, "add_fusion", 1200, 300),
    {"ph": "X", "pid": 2, "tid": 21, "name": "ThunkExecutor::Execute", "ts": 1100, "dur": 600},
    op(20, "conv_general_dilated.4", 2000, 500),
  ]
  out = tt.summarize(_write(tmp_path, events), hlo_text=None)
  assert out["events"] == "host XLA ops (every thread)" and out["ops"] == 3
  assert out["op_ms"] == pytest.approx(1.8)
  assert out["busy_ms"] == pytest.approx(1.8) and out["idle_ms"] == pytest.approx(2.5 - 1.8)


def test_missing_trace_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
    tt.summarize(str(tmp_path))
