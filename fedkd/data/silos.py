"""FedEFM's synthetic silo data: pretraining silos whose data types (do not) overlap, and the target site.

Pretraining data types (hospital profile x labelled structures, from ``fedkd.data.sites``): vessel
angiography (flat-panel, human-like anatomy), catheter-only (animal), catheter+guidewire (silicone
phantom), everything labelled (clean simulator). Each silo holds a mixture of types given by
``partition.unseen_label_corpus(num_silos, len(DATA_TYPES), unseen_percent)`` (100 % = no shared type).
Downstream: the held-out hospital profile ``TARGET`` with catheter+guidewire labels.

Every batch is a function of (seed, round) only (the draws are seeded by them), so a resumed run sees
the images an uninterrupted one saw.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedkd.data import partition
from fedkd.data import sites as sites_lib
from fedkd.data import synth

# (hospital profile, labelled structures) of each pretraining data type.
DATA_TYPES = (
  ("flatpanel_1024_cine", "vessel"),
  ("animal_porcine", "catheter"),
  ("silicone_phantom", "catheter_guidewire"),
  ("simulator_clean", "all"),
)
# (hospital profile, labelled structures) of the downstream site the foundation is fine-tuned for.
TARGET = ("unseen_mobile_c_arm", "catheter_guidewire")


class SiloData:
  """On-device synthetic data for the pretraining silos and the downstream target site.

  ``c``: a FedEFM config (``fedkd.config.fedefm_base_config``); reads ``pretrain.num_silos``,
  ``examples_per_silo``, ``local_steps``, ``batch_size``, ``image_size`` and ``teacher.num_classes``."""

  def __init__(self, c):
    self.c = c
    bases = {s.name: s for s in list(sites_lib.make_sites(5)[0]) + [sites_lib.make_sites(1)[1]]}
    rows = [sites_lib.with_data_type(bases[s], t) for s, t in DATA_TYPES + (TARGET,)]
    self.table = sites_lib.site_table(rows)
    self.target_row = len(DATA_TYPES)

  def silo_types(self, percent: float, seed: int) -> np.ndarray:
    """Data type of every example of every silo: [num_silos, examples_per_silo]."""
    p = self.c.pretrain
    mix = partition.unseen_label_corpus(p.num_silos, len(DATA_TYPES), percent)
    return np.stack(
      [
        np.random.default_rng([seed, 11, i]).choice(len(DATA_TYPES), p.examples_per_silo, p=mix[i])
        for i in range(p.num_silos)
      ]
    )

  def round_batches(self, types: np.ndarray, seed: int, round_: int):
    """Round ``round_``'s batches of every silo: images [silos, local_steps, batch, H, W, 1] and labels
    [silos, local_steps, batch, H, W] (clipped to the teacher's classes)."""
    p, h = self.c.pretrain, self.c.image_size
    per = p.local_steps * p.batch_size
    idx = np.stack(
      [np.random.default_rng([seed, round_, i]).integers(0, p.examples_per_silo, per) for i in range(p.num_silos)]
    )
    rows = np.take_along_axis(types, idx, axis=1)
    gidx = idx + np.arange(p.num_silos)[:, None] * p.examples_per_silo
    im, m = synth.generate(
      seed, self.table, jnp.asarray(rows.reshape(-1), jnp.int32), jnp.asarray(gidx.reshape(-1, 1), jnp.int32), h
    )
    shape = (p.num_silos, p.local_steps, p.batch_size, h, h)
    return im.reshape(shape + (1,)), jnp.minimum(m.reshape(shape), self.c.teacher.num_classes - 1)

  def target(self, seed: int, split: int, n: int):
    """``n`` images [n, H, W, 1] and masks [n, H, W] of the target site (split 0: train, 1: test)."""
    im, m = synth.generate(
      seed,
      self.table,
      jnp.asarray([self.target_row], jnp.int32),
      jnp.arange(n, dtype=jnp.int32)[None],
      self.c.image_size,
      split=split,
    )
    return im[0], m[0]
