"""Distillation carries a class across silos: a silo that never has a label for it learns to score it.

Two silos of the FedEFM experiment at 100 % unseen: silo 0 holds the vessel source (vessels labelled),
silo 1 the live-pig source (catheter labelled; its faint vessels are labelled background). Silo 1 runs
FedEFM's silo update (``FedEFMSilo.client``, the function the round calls) with silo 0 as its only
neighbour, and NO parameter mixing, so the overseas expert (silo 1's model trained on silo 0's data) and
the KD towards it are the only path by which vessel knowledge can reach it. Scored on held-out images of
the vessel source: the AUROC of silo 1's vessel probability for vessel vs other pixels (scipy's Mann-Whitney
U as the reference), with and without distillation, over three seeds. The argmax Dice stays 0 either way
(silo 1's own labels call vessels background); the ranking moves. docs/fedefm.md reports the same contrast
under gossip (FedEFM-DFL vs RING), where mixing already carries the class and KD adds nothing measurable.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import test_fedefm_endpoints as te

ROUNDS, SEEDS, VESSEL = 20, (0, 1, 2), 3


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
  u = stats.mannwhitneyu(score[positive], score[~positive]).statistic
  return float(u / (positive.sum() * (~positive).sum()))


def test_distillation_transfers_a_class_the_silo_never_labels(tmp_path):
  _, exp = te._experiment(
    tmp_path,
    **{"pretrain.num_silos": 2, "pretrain.local_steps": 2, "pretrain.batch_size": 4, "fedefm.expert_steps": 2},
  )
  exp.build_models()
  programs = {}
  for distill in (False, True):
    alg, ctx = exp._program("fedefm_dfl", distill)[1](exp.hparams())

    def rounds(row, xs, ys, alg=alg, ctx=ctx):
      def body(row, inp):
        r, x, y = inp
        batch = {"x": x[1], "y": y[1], "nbr": jnp.array([0]), "nbr_mask": jnp.array([True])}
        out = alg.client(ctx, {"round": r}, row, batch, alg.gather({"x": x, "y": y}))
        return out.row, out.loss

      return jax.lax.scan(body, row, (jnp.arange(ROUNDS, dtype=jnp.int32), xs, ys))

    programs[distill] = (jax.jit(rounds), alg)

  gains = []
  for seed in SEEDS:
    types = exp.data.silo_types(100.0, seed)
    assert set(types[0]) == {0} and set(types[1]) == {1}  # vessel source; pig source (catheter only)
    assert VESSEL in exp.data.labelled_classes(0) and VESSEL not in exp.data.labelled_classes(1)
    batches = [exp.data.round_batches(types, seed, r) for r in range(1, ROUNDS + 1)]
    xs, ys = jnp.stack([b[0] for b in batches]), jnp.stack([b[1] for b in batches])
    hx, hy, hs = exp.heldout(types, seed)
    x0, vessel = hx[hs == 0], np.asarray(hy)[hs == 0] == VESSEL
    auc = {}
    for distill, (fn, alg) in programs.items():
      row, losses = fn(alg.init_row(exp.init_foundation(seed)), xs, ys)
      assert np.isfinite(np.asarray(losses)).all()
      p_vessel = jax.nn.softmax(exp.f_apply_wf(row["params"], x0)[0].astype(jnp.float32), -1)[..., VESSEL]
      auc[distill] = _auroc(np.asarray(p_vessel).ravel(), vessel.ravel())
    gains.append(auc[True] - auc[False])
  # measured (tiny config): +0.10, +0.05, +0.14 over seeds 0, 1, 2
  assert min(gains) > 0.0, gains
  assert np.mean(gains) > 0.05, gains
