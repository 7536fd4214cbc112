"""Benchmarks, printed as JSON lines (one object per measurement).

  python -m fedkd.bench                      # CPU-sized defaults
  python -m fedkd.bench --size 256 --clients 16 --steps 4 --batch 8 --width 32 --depth 4   # GPU

Measures, side by side in one process:
  fed_round    one federated round (every client's local steps + FedAvg + server step), images/s,
               for each client parallelism asked for (vmap / unroll / chunked / map);
  centralized  one model trained on batch = clients * batch for the same number of steps: the
               throughput ceiling for the same FLOPs without federated overhead;
  ratio        fed_round images/s divided by centralized images/s;
  synth        on-device synthetic X-ray generation, images/s.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedkd.data import sites as sites_lib
from fedkd.data import synth
from fedkd.fl import engine
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_params
from fedkd.sharding import client_mesh, replicated, shard_clients


def _time(fn, reps: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--rounds", type=int, default=3, help="timed repetitions after one warm-up")
  p.add_argument("--parallelism", default="auto", help="comma list of vmap,unroll,chunked,map,auto")
  p.add_argument("--chunk", type=int, default=4, help="clients per chunk for --parallelism chunked")
  p.add_argument("--unroll", default="auto", choices=["auto", "true", "false"],
                 help="unroll the local-step scan (auto: on CPU)")
  p.add_argument("--devices", type=int, default=0, help="devices on the clients axis (0: gcd rule)")
  a = p.parse_args(argv)

  backend = jax.default_backend()
  unroll = backend == "cpu" if a.unroll == "auto" else a.unroll == "true"
  common = dict(backend=backend, device=str(jax.devices()[0].device_kind), size=a.size, clients=a.clients,
                steps=a.steps, batch=a.batch, width=a.width, depth=a.depth, unroll=unroll,
                jax=jax.__version__)
  emit = lambda d: print(json.dumps({**d, **common}), flush=True)
  images = a.clients * a.steps * a.batch

  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=a.width, depth=a.depth,
                                             groups=min(8, a.width), num_classes=3))
  apply, params = init_params(model_cfg, 0)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  tx = optax.adam(1e-3)

  profiles, unseen = sites_lib.make_sites(a.clients)
  table = sites_lib.site_table(list(profiles) + [unseen])
  ids = jnp.arange(a.clients, dtype=jnp.int32)
  counter = iter(range(10 ** 9))

  def gen():
    start = next(counter) * a.steps * a.batch
    idx = start + jnp.arange(a.steps * a.batch, dtype=jnp.int32)[None].repeat(a.clients, 0)
    return synth.generate(0, table, ids, idx, a.size)

  sec = _time(gen, a.rounds)
  emit(dict(name="synth", sec_per_call=round(sec, 5), images_per_s=round(images / sec, 1)))

  x, y = gen()
  xs = x.reshape(a.clients, a.steps, a.batch, a.size, a.size, 1)
  ys = y.reshape(a.clients, a.steps, a.batch, a.size, a.size)
  w = jnp.ones((a.clients,), jnp.float32)

  central = jax.jit(functools.partial(engine.client_update, apply, loss_fn, tx,
                                      unroll=True if unroll else 1))
  cx = jnp.swapaxes(xs, 0, 1).reshape(a.steps, a.clients * a.batch, a.size, a.size, 1)
  cy = jnp.swapaxes(ys, 0, 1).reshape(a.steps, a.clients * a.batch, a.size, a.size)
  sec_c = _time(lambda: central(params, cx, cy), a.rounds)
  emit(dict(name="centralized", sec_per_round=round(sec_c, 5), images_per_s=round(images / sec_c, 1)))

  n_dev = a.devices or __import__("math").gcd(a.clients, jax.device_count())
  mesh = client_mesh(n_dev)
  data = shard_clients((xs, ys, w), mesh)
  server_tx = optax.sgd(1.0)
  for par in a.parallelism.split(","):
    par = ("unroll" if backend == "cpu" else "vmap") if par == "auto" else par
    fn = engine.make_round_fn(apply, loss_fn, tx, server_tx, mesh, client_parallelism=par,
                              unroll_local_steps=unroll, client_chunk=a.chunk)
    state = [jax.device_put(engine.init_server_state(params, server_tx, jax.random.key(0)),
                            replicated(mesh))]

    def one_round():
      state[0], m = fn(state[0], *data)
      return m["loss"]

    sec_f = _time(one_round, a.rounds)
    emit(dict(name="fed_round", parallelism=par, devices=n_dev, sec_per_round=round(sec_f, 5),
              images_per_s=round(images / sec_f, 1)))
    emit(dict(name="ratio", parallelism=par, fed_over_centralized=round(sec_c / sec_f, 4)))


if __name__ == "__main__":
  main()
