"""One client-batched 3x3 convolution, timed per formulation and per pass (JSON lines).

  python -m bench.conv                                  # CPU-sized defaults
  python -m bench.conv --clients 16 --batch 8 --size 256 --cin 32 --cout 32 --dtype bfloat16

The federated round's cost is dominated by UNet's full-resolution 3x3 convs with per-client kernels.
This isolates one such layer: x [clients, batch, size, size, cin], per-client kernels
w [clients, 3, 3, cin, cout], 'SAME' padding, and times

  pass        fwd (y = conv(x, w)), dgrad (x's cotangent from a cotangent of y), wgrad (w's), or
              all (forward and both gradients, as in training);
  formulation centralized (ONE kernel over the clients * batch images: the ceiling), and the engine's
              conv lowerings under jax.vmap (``fedkd.models.conv``): xla (lax.conv: grouped convs,
              batch-grouped for wgrad), wgrad (xla's grouped convs for fwd and dgrad, wgrad as
              patches^T x cotangent batched GEMMs), gemm (im2col patches x kernels, batched matmuls),
              gemm_rc (gemm with the patch matrix rebuilt in the backward pass); taps (nine shifted
              batched matmuls summed), unroll (one conv per client, emitted separately: the unroll
              layout), map (lax.map over clients: chunked with one client per chunk). The former
              names vmap, hybrid, bgemm, bgemm_rc are accepted for xla, wgrad, gemm, gemm_rc.

Each row: ``ms`` (median of ``--reps`` calls after a warm-up), ``tflops`` (2 * clients * batch *
size^2 * 9 * cin * cout per conv-shaped pass, three of them for ``all``), ``ratio`` (centralized ms /
this ms, same pass; the centralized row of a pass is timed first), ``compile_s``, ``reps`` and the
``command``. Every formulation is checked against the (vmapped) xla one before it is timed (``max_rel_err``).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedkd.models.conv import conv_general_dilated as gemm_capable_conv
from fedkd.models.conv import gemm_convs

FORMULATIONS = ("centralized", "xla", "wgrad", "gemm", "gemm_rc", "taps", "unroll", "map")
FORMER_NAMES = {"vmap": "xla", "hybrid": "wgrad", "bgemm": "gemm", "bgemm_rc": "gemm_rc"}
PASSES = ("fwd", "dgrad", "wgrad", "all")
_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def _taps(x, w):
  """sum over the nine kernel taps of (shifted x) @ w[tap]: per-tap batched matmuls."""
  h, wd = x.shape[2:4]
  xp = jnp.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
  out = 0
  for dy in range(3):
    for dx in range(3):
      out = out + jnp.einsum("nbhwc,nco->nbhwo", xp[:, :, dy : dy + h, dx : dx + wd, :], w[:, dy, dx])
  return out.astype(x.dtype)


def client_conv(formulation: str):
  """f(x [C, B, H, W, cin], w [C, 3, 3, cin, cout]) -> y [C, B, H, W, cout] (centralized: w [3, 3,
  cin, cout] shared, x flattened over clients and batch)."""
  if formulation == "centralized":
    return lambda x, w: _conv(x.reshape((-1,) + x.shape[2:]), w).reshape(x.shape[:-1] + w.shape[-1:])
  if formulation == "xla":
    return jax.vmap(_conv)
  if formulation in ("gemm", "gemm_rc", "wgrad"):

    def f(x, w):
      with gemm_convs(
        True, recompute_patches=formulation == "gemm_rc", mode="wgrad" if formulation == "wgrad" else "gemm"
      ):
        return jax.vmap(
          functools.partial(gemm_capable_conv, window_strides=(1, 1), padding="SAME", dimension_numbers=_DN)
        )(x, w)

    return f
  if formulation == "taps":
    return _taps
  if formulation == "unroll":
    return lambda x, w: jnp.stack([_conv(x[i], w[i]) for i in range(x.shape[0])])
  if formulation == "map":
    return lambda x, w: lax.map(lambda a: _conv(*a), (x, w))
  raise ValueError(f"unknown formulation {formulation!r}; choose from {FORMULATIONS}")


def pass_fn(formulation: str, which: str):
  """The function of one pass (named ``<formulation>_<pass>``, as in XLA's dumps)."""
  f = client_conv(formulation)
  if which == "fwd":
    fn = lambda x, w: f(x, w)  # noqa: E731
  elif which == "all":
    fn = lambda x, w, g: jax.grad(lambda x, w: jnp.vdot(f(x, w).astype(jnp.float32), g), (0, 1))(x, w)  # noqa: E731
  elif which == "dgrad":
    fn = lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0]  # noqa: E731
  elif which == "wgrad":
    fn = lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0]  # noqa: E731
  else:
    raise ValueError(f"unknown pass {which!r}; choose from {PASSES}")
  fn.__name__ = fn.__qualname__ = f"{formulation}_{which}"
  return fn


def _parser():
  from bench import ArgumentParser

  p = ArgumentParser(
    prog="bench.conv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  p.add_argument("--clients", type=int, default=4)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--cin", type=int, default=8)
  p.add_argument("--cout", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--formulations", default=",".join(FORMULATIONS))
  p.add_argument("--passes", default=",".join(PASSES))
  p.add_argument("--reps", type=int, default=10)
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="compile every program (filling JAX_COMPILATION_CACHE_DIR, if set) and time nothing",
  )
  return p


def main(argv=None) -> None:
  from fedkd.cli import line_buffered

  from bench import fail

  line_buffered()
  a = _parser().parse_args(argv)
  forms = [FORMER_NAMES.get(f, f) for f in a.formulations.split(",")]
  forms.sort(key=lambda f: f != "centralized")  # the ceiling first: every other row of a pass gets its ratio
  passes = a.passes.split(",")
  for bad in [f for f in forms if f not in FORMULATIONS] + [q for q in passes if q not in PASSES]:
    fail(
      "bench.conv",
      f"unknown formulation or pass {bad!r} (formulations: {','.join(FORMULATIONS)}; passes: {','.join(PASSES)})",
    )
  for k in ("clients", "batch", "size", "cin", "cout", "reps"):
    if getattr(a, k) <= 0:
      fail("bench.conv", f"--{k}={getattr(a, k)} must be positive")
  dt = jnp.dtype(a.dtype)
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (a.clients, a.batch, a.size, a.size, a.cin), dt)
  w = (jax.random.normal(kw, (a.clients, 3, 3, a.cin, a.cout)) / np.sqrt(9 * a.cin)).astype(dt)
  g = jax.random.normal(kg, (a.clients, a.batch, a.size, a.size, a.cout), dt)
  flop = 2 * a.clients * a.batch * a.size**2 * 9 * a.cin * a.cout
  common = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    clients=a.clients,
    batch=a.batch,
    size=a.size,
    cin=a.cin,
    cout=a.cout,
    dtype=a.dtype,
    reps=a.reps,
    jax=jax.__version__,
    command=shlex.join(["python", "-m", "bench.conv", *(sys.argv[1:] if argv is None else argv)]),
  )
  base_ms, reference = {}, {}
  for which in passes:
    for form in forms:
      args = (x, w[0] if form == "centralized" else w) + (() if which == "fwd" else (g,))
      t = time.perf_counter()
      exe = jax.jit(pass_fn(form, which)).lower(*args).compile()
      compile_s = time.perf_counter() - t
      row = {"name": "conv", "formulation": form, "pass": which, "compile_s": round(compile_s, 2)}
      if a.compile_only:
        print(json.dumps({**row, "name": "compiled", "row": "conv", **common}), flush=True)
        continue
      out = jax.block_until_ready(exe(*args))
      if form != "centralized":  # check it against the vmapped xla formulation (its own output, when timed)
        leaves = [np.asarray(v, np.float32) for v in jax.tree.leaves(out)]
        if form == "xla":
          reference[which] = leaves
        elif which not in reference:
          reference[which] = [np.asarray(v, np.float32) for v in jax.tree.leaves(jax.jit(pass_fn("xla", which))(*args))]
        row["max_rel_err"] = float(
          max(np.max(np.abs(o - r)) / (np.max(np.abs(r)) + 1e-30) for o, r in zip(leaves, reference[which]))
        )
      times = []
      for _ in range(a.reps):
        t = time.perf_counter()
        jax.block_until_ready(exe(*args))
        times.append(time.perf_counter() - t)
      ms = statistics.median(times) * 1e3
      if form == "centralized":
        base_ms[which] = ms
      row.update(ms=round(ms, 4), tflops=float(f"{flop * (3 if which == 'all' else 1) / ms / 1e9:.4g}"))
      if which in base_ms:
        row["ratio"] = round(base_ms[which] / ms, 4)
      print(json.dumps({**row, **common}), flush=True)


if __name__ == "__main__":
  main()
