"""python -m bench's model FLOP utilisation: the FLOPs XLA's cost analysis gives a compiled matmul / conv against
their closed forms, per device for a program split over devices, none for a rolled loop (XLA counts its body
once), and MFU = FLOPs / time / peak for an injected time and device kind; the round rows carry them."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
  sys.path.insert(0, ROOT)

import bench.__main__ as round_bench  # noqa: E402


def _flops(fn, *args):
  return round_bench.program_flops(jax.jit(fn).lower(*args).compile())


def test_matmul_flops_are_two_m_n_k():
  m, k, n = 24, 40, 12
  flops, source = _flops(jnp.matmul, jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops == 2 * m * n * k and source.startswith("XLA cost analysis")


def _conv(x, w, padding):
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_flops_are_two_h_w_cin_cout_kh_kw_n():
  n, h, w, cin, cout, kh, kw = 2, 9, 7, 3, 5, 3, 2
  x, k = jnp.ones((n, h, w, cin)), jnp.ones((kh, kw, cin, cout))
  ho, wo = h - kh + 1, w - kw + 1  # VALID: every tap of every output pixel is inside the image
  assert _flops(lambda a, b: _conv(a, b, "VALID"), x, k)[0] == 2 * ho * wo * cin * cout * kh * kw * n
  # SAME: XLA counts the taps that land inside the image, not those on the zero padding
  inside = 0
  for i in range(h):
    for j in range(w):
      for di in range(kh):
        for dj in range(kw):
          inside += 0 <= i + di - (kh - 1) // 2 < h and 0 <= j + dj - (kw - 1) // 2 < w
  assert _flops(lambda a, b: _conv(a, b, "SAME"), x, k)[0] == 2 * inside * cin * cout * n


def test_on_one_gpu_the_count_is_the_program_before_optimisation(monkeypatch):
  """XLA:GPU's count of a compiled program leaves out the convolutions it hands to cuDNN, so on one GPU the FLOPs
  come from the program before optimisation, where a conv is still a convolution: its closed form here (the
  backend is reported as 'gpu' to reach that branch on CPU)."""
  n, h, w, cin, cout, kh, kw = 2, 9, 7, 3, 5, 3, 2
  x, k = jnp.ones((n, h, w, cin)), jnp.ones((kh, kw, cin, cout))
  lowered = jax.jit(lambda a, b: _conv(a, b, "VALID")).lower(x, k)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  flops, source = round_bench.program_flops(lowered.compile(), lowered, 1)
  assert flops == 2 * (h - kh + 1) * (w - kw + 1) * cin * cout * kh * kw * n
  assert "before optimisation" in source
  _, source = round_bench.program_flops(lowered.compile(), lowered, 2)  # several GPUs: the compiled count, flagged
  assert "leaves out cuDNN convolutions" in source


def test_a_program_split_over_devices_is_counted_per_device():
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  a = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P("x")))
  assert _flops(jnp.matmul, a, jnp.ones((32, 8)))[0] == 2 * 16 * 32 * 8 / 2


def test_a_rolled_loop_has_no_flop_count_and_an_unrolled_one_counts_every_trip():
  c, xs = jnp.ones((16, 16)), jnp.ones((5, 16, 16))

  def steps(unroll):
    return lambda c, xs: jax.lax.scan(lambda c, x: (c @ x, None), c, xs, unroll=unroll)[0]

  flops, why = _flops(steps(1), c, xs)
  assert flops is None and "1 while loop(s) (lax.scan / lax.map) around matmuls" in why and "--unroll true" in why
  assert _flops(steps(True), c, xs)[0] == 5 * 2 * 16**3


def test_a_matmul_nested_in_a_loops_branch_is_found_and_an_elementwise_loop_is_not():
  c, xs = jnp.ones((16, 16)), jnp.ones((5, 16, 16))

  def step(c, x):  # the dot sits in a conditional's branch computation, called from the loop body
    return jax.lax.cond(x[0, 0] > 0, lambda: c @ x, lambda: c + x), None

  flops, why = _flops(lambda c, xs: jax.lax.scan(step, c, xs)[0], c, xs)
  assert flops is None and "1 while loop(s)" in why
  flops, _ = _flops(lambda c, xs: jax.lax.scan(lambda c, x: (c * x + 1.0, None), c, xs)[0], c, xs)
  assert flops is not None


@pytest.mark.parametrize("devices", [1, 4])
def test_mfu_is_flops_over_time_over_the_devices_peak(devices):
  row = round_bench.utilisation(3.0e12, "src", 0.25, devices, "NVIDIA H200")
  total = 3.0e12 * devices
  assert row["flops_per_call"] == total and row["flops_source"] == "src"
  assert row["tflops_per_s"] == pytest.approx(total / 0.25 / 1e12, rel=1e-3)
  assert row["peak_tflops"] == 989.4 and "dense bf16" in row["peak_source"]
  assert row["mfu"] == pytest.approx(total / 0.25 / (devices * 989.4e12), rel=1e-3)
  assert round_bench.utilisation(1e12, "src", 1.0, 1, "NVIDIA H100 80GB HBM3")["mfu"] == pytest.approx(1 / 989.4, 1e-3)


def test_an_unknown_device_or_count_has_no_mfu():
  cpu = round_bench.utilisation(5e9, "src", 0.5, 2, "cpu")
  assert cpu["tflops_per_s"] == pytest.approx(1e10 / 0.5 / 1e12, rel=1e-3) and cpu["flops_per_call"] == 10**10
  assert cpu["mfu"] is None and cpu["peak_tflops"] is None and "'cpu'" in cpu["peak_source"]
  loop = round_bench.utilisation(None, "a while loop", 0.5, 1, "NVIDIA H200")
  assert loop["flops_per_call"] is loop["tflops_per_s"] is loop["mfu"] is None and loop["peak_tflops"] == 989.4


def test_round_rows_carry_the_utilisation_of_their_own_program(capsys, monkeypatch):
  """The ceiling and the round on 2 devices, with an injected 0.5 TFLOP/s peak for the CPU: every row's numbers
  agree with each other (flops / sec / peak), and the ceiling's FLOPs are the same training steps as the round's
  (the round adds FedAvg and the server step, a small part)."""
  from test_bench_usage import _fake_generator

  _fake_generator(monkeypatch)
  monkeypatch.setitem(round_bench.PEAK_BF16_TFLOPS, jax.devices()[0].device_kind, 0.5)
  argv = "--size 8 --clients 2 --steps 1 --batch 2 --width 2 --depth 1 --rounds 1 --devices 2 --pairs unroll:xla"
  round_bench.main(argv.split())
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows] == ["synth", "centralized", "fed_round"]
  for r in rows[1:]:
    assert r["flops_per_call"] > 0 and r["peak_tflops"] == 0.5, r["flops_source"]
    sec = r["sec_per_round"]
    # the row's rounding: sec_per_round to 5 decimals (a ~1 ms round here: up to 0.5 % of it), the rates to 4
    # significant digits; they are computed from the unrounded seconds
    rel = 5e-6 / sec + 5e-4 + 1e-6
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_call"] / sec / 1e12, rel=rel, abs=1e-9)
    assert r["mfu"] == pytest.approx(r["flops_per_call"] / sec / (2 * 0.5e12), rel=rel, abs=1e-9)
  central, fed = rows[1]["flops_per_call"], rows[2]["flops_per_call"]
  assert central <= fed < 1.05 * central
  assert np.isfinite([r["mfu"] for r in rows[1:]]).all()
