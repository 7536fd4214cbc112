"""Named numpy random streams, apart from the per-round sampling streams.

The batches of round r are drawn from ``np.random.default_rng([seed, r, client])`` (``fedkd.data.pipeline``,
``fedkd.data.silos``). numpy's ``SeedSequence`` pads a seed of up to four words with zeros, so a stream seeded
``[seed, 7]`` for another purpose was client 0's round-7 stream, and ``[seed, 11, i]`` silo i's round-11 stream:
two draws meant to be independent were the same numbers (MATCHA's activations in round r were silo 0's batch draws
of round r). A named stream puts its purpose in the ``SeedSequence``'s spawn key (a fixed number per purpose after
the seed's four padded words), which no seed list of fewer than five words reaches.

``config.rng_streams`` picks them: 2 (the default) the named streams, 1 the seeds these draws had before, with
which earlier runs were made (they resume and tabulate with it; ``fedkd.config.ADDED_KEYS``).
"""

from __future__ import annotations

import numpy as np

VERSIONS = (1, 2)  # config.rng_streams

# purpose: (spawn-key tag, the seed list of rng_streams = 1 from (seed, *ids))
_PURPOSES = {
  "client_sizes": (1, lambda seed: [seed, 7]),  # FedAvg synthetic clients' quantity_skew sizes
  "silo_sources": (2, lambda seed, silo: [seed, 11, silo]),  # FedEFM: the source of each example of a silo
  "matcha": (3, lambda seed, round_: [seed, round_]),  # MATCHA's activated matchings in a round
  "finetune": (4, lambda seed, n: [seed, 99, n]),  # FedEFM downstream: fine-tuning batches on n images
  "teacher_adapt": (5, lambda seed, n: [seed, 98, n]),  # FedEFM downstream: the teacher's adaptation batches
  "probe": (6, lambda seed: [seed, 97]),  # FedEFM downstream: the frozen-encoder probe's batches
}
PURPOSES = tuple(_PURPOSES)


def rng(purpose: str, seed: int, *ids: int, version: int = 2) -> np.random.Generator:
  """The generator of ``purpose`` (one of :data:`PURPOSES`) for ``seed`` and the purpose's ids (a silo, a round,
  a number of images), as ``config.rng_streams = version`` draws it."""
  tag, legacy = _PURPOSES[purpose]
  if version == 1:
    return np.random.default_rng(legacy(int(seed), *(int(i) for i in ids)))
  if version != 2:
    raise ValueError(f"rng_streams version {version!r} is unknown; use one of {VERSIONS}")
  return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(tag, *(int(i) for i in ids))))
