"""FedEFM silo data: the sources behind every training image, the held-out set, the labelled classes."""

import numpy as np
import pytest

from fedkd.config import fedefm_base_config
from fedkd.data import partition, silos, synth
from fedkd.data import sites as sites_lib

SILOS, PER_SILO, SEED = 3, 8, 5


@pytest.fixture(scope="module")
def data():
  c = fedefm_base_config()
  c.image_size = c.teacher.image_size = 16
  c.pretrain.num_silos, c.pretrain.examples_per_silo = SILOS, PER_SILO
  c.pretrain.local_steps, c.pretrain.batch_size = 2, 2
  return silos.SiloData(c)


@pytest.fixture(scope="module")
def grid(data):
  """Every training example any silo can draw, rendered for EVERY source: [S, SILOS * PER_SILO] images
  and masks (generator split 0, example i * PER_SILO + e for silo i's example e)."""
  n = SILOS * PER_SILO
  im, m = synth.generate(
    SEED,
    data.table,
    np.asarray(silos.SOURCE_ROWS),
    np.tile(np.arange(n), (silos.NUM_SOURCES, 1)),
    16,
    physics=data.physics,
  )
  return np.asarray(im), np.asarray(m)


def test_sources_extend_the_original_four():
  assert silos.DATA_TYPES[:4] == (
    ("flatpanel_1024_cine", "vessel"),
    ("animal_porcine", "catheter"),
    ("silicone_phantom", "catheter_guidewire"),
    ("simulator_clean", "all"),
  )
  assert silos.NUM_SOURCES == len(silos.DATA_TYPES) >= 6
  assert len({p for p, _ in silos.DATA_TYPES}) == silos.NUM_SOURCES  # distinct hospital profiles
  assert silos.TARGET not in silos.DATA_TYPES and silos.TARGET[0] not in {p for p, _ in silos.DATA_TYPES}
  assert all(t in sites_lib.DATA_TYPES for _, t in silos.DATA_TYPES)


def test_table_rows_are_the_sources_and_the_target(data):
  """Row SOURCE_ROWS[s] of the generator table is source s's profile and labels; the target stays row 4."""
  profiles = {p.name: p for p in sites_lib.make_sites(5)[0]}
  profiles[sites_lib.UNSEEN_SITE.name] = sites_lib.UNSEEN_SITE
  # the sixth source: the flat panel with the pediatric knobs written here again
  ped = {"dose": (500.0, 1000.0), "anatomy_scale": (0.5, 0.65)}
  profiles["pediatric_flatpanel_low_dose"] = type("P", (), {**vars(profiles["flatpanel_1024_cine"]), **ped})
  assert data.num_sources == silos.NUM_SOURCES and data.target_row == 4
  named = [(silos.SOURCE_ROWS[s], silos.DATA_TYPES[s]) for s in range(silos.NUM_SOURCES)] + [(4, silos.TARGET)]
  assert sorted(r for r, _ in named) == list(range(silos.NUM_SOURCES + 1))
  for row, (profile, labels) in named:
    assert int(data.table["data_type"][row]) == sites_lib.DATA_TYPES.index(labels)
    for knob in ("dose", "anatomy_scale", "vignetting"):
      np.testing.assert_allclose(np.asarray(data.table[knob][row]), getattr(profiles[profile], knob), rtol=1e-6)


def test_round_sources_name_the_source_of_every_image(data, grid):
  """Each image of round_batches is exactly one rendered (source, example) of the grid: that source is
  round_sources' entry, the example is one of the silo's own, and the silo's types say that source."""
  types = data.silo_types(50, SEED)
  assert types.shape == (SILOS, PER_SILO)
  mix = partition.unseen_label_corpus(SILOS, silos.NUM_SOURCES, 50)
  for i in range(SILOS):
    assert set(types[i].tolist()) <= set(np.flatnonzero(mix[i]).tolist())
  ims, masks = data.round_batches(types, SEED, 3)
  src = data.round_sources(types, SEED, 3)
  assert src.dtype == np.int32 and src.shape == (SILOS, 2, 2) == ims.shape[:3]
  g_im, g_m = grid
  flat = g_im.reshape(silos.NUM_SOURCES * SILOS * PER_SILO, -1)
  ims, masks = np.asarray(ims), np.asarray(masks)
  assert len(set(src.reshape(-1).tolist())) > 1  # the check below tells sources apart
  for i, t, b in np.ndindex(src.shape):
    hits = np.flatnonzero((flat == ims[i, t, b].reshape(-1)).all(1))
    assert len(hits) == 1, (i, t, b, hits)
    s, g = divmod(int(hits[0]), SILOS * PER_SILO)
    assert s == src[i, t, b] and g // PER_SILO == i and types[i, g % PER_SILO] == s
    np.testing.assert_array_equal(masks[i, t, b], g_m[s, g])
  np.testing.assert_array_equal(data.round_sources(types, SEED, 3), src)  # deterministic


def test_heldout_is_balanced_deterministic_and_never_trained_on(data, grid):
  im, m, src = data.heldout(SEED, 4)
  im, m = np.asarray(im), np.asarray(m)
  s_n = silos.NUM_SOURCES
  assert im.shape == (4 * s_n, 16, 16, 1) and m.shape == (4 * s_n, 16, 16) and src.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(src, minlength=s_n), np.full(s_n, 4))
  np.testing.assert_array_equal(src, np.repeat(np.arange(s_n), 4))
  again = data.heldout(SEED, 4)
  np.testing.assert_array_equal(np.asarray(again[0]), im)
  np.testing.assert_array_equal(np.asarray(again[1]), m)
  assert not np.array_equal(np.asarray(data.heldout(SEED + 1, 4)[0]), im)
  # disjoint from training: no held-out image equals a training image of its source (same index or any)
  g_im = grid[0]
  for k in range(len(src)):
    s = src[k]
    assert not np.array_equal(im[k], g_im[s, k % 4])
    assert np.abs(g_im[s] - im[k][None]).reshape(g_im.shape[1], -1).max(1).min() > 0
  for s in range(s_n):  # held-out images of one source differ from each other too
    block = im[4 * s : 4 * s + 4].reshape(4, -1)
    assert len({row.tobytes() for row in block}) == 4


def test_labelled_classes_agree_with_the_masks(data, grid):
  """Classes outside a source's labelled set never appear in its masks (training and held-out); the
  labelled ones appear over its examples."""
  want = {
    "vessel": (3,),
    "catheter": (1,),
    "catheter_guidewire": (1, 2),
    "all": (1, 2, 3),
  }
  _, hm, hsrc = data.heldout(SEED, 4)
  hm = np.asarray(hm)
  for s in range(silos.NUM_SOURCES):
    labelled = data.labelled_classes(s)
    assert labelled == want[silos.DATA_TYPES[s][1]]
    seen = set(np.unique(grid[1][s]).tolist()) | set(np.unique(hm[hsrc == s]).tolist())
    assert seen - {0} == set(labelled), (s, seen, labelled)
  assert data.labelled_classes(np.int64(0)) == (3,)
  for bad in (-1, silos.NUM_SOURCES, True, 1.0):
    with pytest.raises(ValueError, match="must be a source id"):
      data.labelled_classes(bad)
