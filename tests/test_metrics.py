"""Metrics against hand counts and independent numpy / scipy / skimage references."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.morphology import skeletonize

from fedkd import metrics as M

# ------------------------------------------------------------------ shared synthetic masks


def _curve(rng, h=48, w=48, width=3.0):
  """A random thick sine curve (binary [h, w]), optionally transposed."""
  amp, period, phase = rng.uniform(4, 12), rng.uniform(6, 12), rng.uniform(0, 2 * np.pi)
  xs = np.linspace(4, w - 5, 300)
  ys = h / 2 + amp * np.sin(xs / period + phase)
  yy, xx = np.mgrid[:h, :w]
  d2 = (yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2
  m = d2.min(-1) <= (width / 2) ** 2
  return m.T if rng.uniform() < 0.5 else m


def _blobs(rng, h=24, w=24, n=3):
  yy, xx = np.mgrid[:h, :w]
  m = np.zeros((h, w), bool)
  for _ in range(n):
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.5, 5)
    m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  return m


# ------------------------------------------------------------------ dice / iou


def test_dice_iou_hand_counted():
  # class 1: P = rows 1-2 x cols 1-3 (6 px), G = rows 2-3 x cols 1-3 (6 px), overlap row 2 (3 px)
  pred = np.zeros((5, 5), np.int32)
  target = np.zeros((5, 5), np.int32)
  pred[1:3, 1:4] = 1
  target[2:4, 1:4] = 1
  # class 2: P = 4 px of column 4, G = 2 of those -> dice 2*2/(4+2), iou 2/4
  pred[0:4, 4] = 2
  target[0:2, 4] = 2
  assert float(M.dice(pred, target, 1)) == pytest.approx(2 * 3 / 12)
  assert float(M.iou(pred, target, 1)) == pytest.approx(3 / 9)
  assert float(M.dice(pred, target, 2)) == pytest.approx(4 / 6)
  assert float(M.iou(pred, target, 2)) == pytest.approx(2 / 4)
  # background: P bg = 25-6-4 = 15 px, G bg = 25-6-2 = 17, both bg: not(P fg or G fg)
  both = np.sum((pred == 0) & (target == 0))
  assert float(M.dice(pred, target, 0)) == pytest.approx(2 * both / 32)
  assert float(M.iou(pred, target, 0)) == pytest.approx(both / (15 + 17 - both))


def test_dice_iou_batch_and_empty():
  rng = np.random.default_rng(0)
  pred = rng.integers(0, 3, (4, 8, 8))
  target = rng.integers(0, 3, (4, 8, 8))
  pred[2] = 0
  target[2] = 0  # class 1 absent from both -> 1
  pred[3] = 0  # class 1 only in the target -> 0
  for fn in (M.dice, M.iou):
    batch = np.asarray(fn(pred, target, 1))
    assert batch.shape == (4,)
    np.testing.assert_allclose(batch, [float(fn(p, t, 1)) for p, t in zip(pred, target)], rtol=1e-6)
    assert batch[2] == 1.0 and batch[3] == 0.0
    assert float(fn(target[3], pred[3], 1)) == 0.0


# ------------------------------------------------------------------ hd95 / assd


def _brute_boundary(m):
  """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
  p = np.pad(m, 1)
  inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return m & ~inner


def _brute_dists(p, t, spacing):
  a = np.argwhere(_brute_boundary(p)) * np.asarray(spacing)
  b = np.argwhere(_brute_boundary(t)) * np.asarray(spacing)
  d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  return d.min(1), d.min(0)


@pytest.mark.parametrize("spacing", [0.5, (0.5, 0.8)])
def test_hd95_assd_vs_brute_force(spacing):
  rng = np.random.default_rng(1)
  preds, targets = [], []
  for _ in range(6):
    t = _blobs(rng)
    p = _blobs(rng) if rng.uniform() < 0.5 else ndi.shift(t, rng.integers(-2, 3, 2), order=0) | _blobs(rng, n=1)
    preds.append(np.where(p, 2, 0))
    targets.append(np.where(t, 2, 1))
  preds, targets = np.stack(preds), np.stack(targets)
  hd = M.hd95(preds, targets, 2, spacing_mm=spacing)
  asd = M.assd(preds, targets, 2, spacing_mm=spacing)
  assert hd.shape == asd.shape == (6,)
  for i in range(6):
    d_pt, d_tp = _brute_dists(preds[i] == 2, targets[i] == 2, spacing)
    ref_hd = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    ref_asd = (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)
    assert hd[i] == pytest.approx(ref_hd, rel=1e-9, abs=1e-9)
    assert asd[i] == pytest.approx(ref_asd, rel=1e-9, abs=1e-9)
    assert M.hd95(preds[i], targets[i], 2, spacing) == pytest.approx(hd[i])
    assert M.assd(preds[i], targets[i], 2, spacing) == pytest.approx(asd[i])


def test_hd95_assd_hand_and_empty():
  p = np.zeros((10, 10), np.int32)
  t = np.zeros((10, 10), np.int32)
  p[2, 2] = 1
  t[2, 5] = 1  # single pixels 3 px apart
  assert M.hd95(p, t, 1, 0.5) == pytest.approx(1.5)
  assert M.assd(p, t, 1, 0.5) == pytest.approx(1.5)
  assert M.hd95(p, p, 1, 0.5) == 0.0 and M.assd(p, p, 1, 0.5) == 0.0
  z = np.zeros_like(p)
  assert M.hd95(z, z, 1) == 0.0 and M.assd(z, z, 1) == 0.0
  assert np.isnan(M.hd95(p, z, 1)) and np.isnan(M.assd(z, t, 1))


# ------------------------------------------------------------------ clDice


def _cldice_ref(p, g):
  if not p.any() and not g.any():
    return 1.0
  if not p.any() or not g.any():
    return 0.0
  sp, sg = skeletonize(p), skeletonize(g)
  tprec = (sp & g).sum() / sp.sum()
  tsens = (sg & p).sum() / sg.sum()
  return 0.0 if tprec + tsens == 0 else 2 * tprec * tsens / (tprec + tsens)


def test_cldice_vs_skimage_on_curves():
  rng = np.random.default_rng(2)
  preds, targets = [], []
  for i in range(10):
    w = 1.5 + (i % 5)  # 1-5 px wide
    g = _curve(rng, width=w)
    if i % 2:
      p = ndi.shift(g, rng.integers(-2, 3, 2), order=0)
    else:
      p = _curve(rng, width=max(1.5, w + rng.integers(-1, 2)))
    preds.append(p.astype(np.int32))
    targets.append(g.astype(np.int32))
  preds, targets = np.stack(preds), np.stack(targets)
  got = np.asarray(M.cldice(preds, targets, 1))
  ref = np.array([_cldice_ref(p == 1, t == 1) for p, t in zip(preds, targets)])
  assert got.shape == (10,)
  assert np.max(np.abs(got - ref)) < 0.1, (got, ref)
  assert np.mean(np.abs(got - ref)) < 0.05
  assert float(M.cldice(preds[3], targets[3], 1)) == pytest.approx(got[3], abs=1e-6)
  # identical masks -> exactly 1, for every width and for shapes touching the border
  np.testing.assert_array_equal(np.asarray(M.cldice(targets, targets, 1)), 1.0)
  full = np.ones((1, 12, 12), np.int32)
  assert float(M.cldice(full, full, 1)[0]) == 1.0


def test_cldice_empty_conventions():
  z = np.zeros((2, 16, 16), np.int32)
  m = z.copy()
  m[:, 8, 2:14] = 1
  np.testing.assert_array_equal(np.asarray(M.cldice(z, z, 1)), 1.0)
  np.testing.assert_array_equal(np.asarray(M.cldice(m, z, 1)), 0.0)
  np.testing.assert_array_equal(np.asarray(M.cldice(z, m, 1)), 0.0)


def test_binary_skeleton_thin_line_is_itself():
  m = np.zeros((1, 20, 20), np.float32)
  m[0, 5, 3:17] = 1
  m[0, 5:15, 16] = 1
  np.testing.assert_array_equal(np.asarray(M.binary_skeleton(m)), m)


# ------------------------------------------------------------------ betti0


def test_betti0_error_vs_scipy_label():
  rng = np.random.default_rng(3)
  pred = np.stack([np.where(_blobs(rng, n=4), 1, 0) for _ in range(5)])
  target = np.stack([np.where(_blobs(rng, n=2), 1, 2) for _ in range(5)])
  pred[0] = 0
  eight = np.ones((3, 3))
  got = M.betti0_error(pred, target, 1)
  ref = [abs(ndi.label(p == 1, eight)[1] - ndi.label(t == 1, eight)[1]) for p, t in zip(pred, target)]
  np.testing.assert_array_equal(got, ref)
  # diagonal neighbours are one component (8-connectivity)
  d = np.eye(6, dtype=np.int32)
  assert M.betti0_error(d, np.zeros_like(d), 1) == 1.0
  assert M.betti0_error(np.zeros_like(d), np.zeros_like(d), 1) == 0.0


# ------------------------------------------------------------------ tip error


def test_tip_error_straight_lines():
  p = np.zeros((64, 64), np.int32)
  t = np.zeros((64, 64), np.int32)
  p[20, 0:31] = 1  # enters at the left border, tip at (20, 30)
  t[20, 0:41] = 1  # tip at (20, 40)
  assert M.device_tip(p == 1) == (20, 30)
  assert M.tip_error(p, t, 1, spacing_mm=0.5) == pytest.approx(5.0)
  # a line not touching the border: the entry is the end nearer to the border
  q = np.zeros((64, 64), np.int32)
  q[5:51, 30] = 1  # ends (5, 30) [5 px from the top] and (50, 30) [13 px from the bottom]
  assert M.device_tip(q == 1) == (50, 30)
  # a diagonal line vs the horizontal one: tips (40, 40) and (20, 40) -> 20 px
  r = np.zeros((64, 64), np.int32)
  idx = np.arange(0, 41)
  r[idx, idx] = 1
  assert M.tip_error(r, t, 1) == pytest.approx(20.0)
  # a thick (3 px) line and a small distractor blob: the tip is still at the far end (+-1 px)
  thick = np.zeros((64, 64), np.int32)
  thick[19:22, 0:41] = 1
  thick[50:53, 50:53] = 1
  assert M.tip_error(thick, t, 1) <= 1.5
  batch = M.tip_error(np.stack([p, r]), np.stack([t, t]), 1, spacing_mm=0.5)
  np.testing.assert_allclose(batch, [5.0, 10.0])


def test_tip_error_empty_conventions():
  z = np.zeros((16, 16), np.int32)
  t = z.copy()
  t[8, 0:10] = 1
  assert M.tip_error(z, z, 1) == 0.0
  assert np.isnan(M.tip_error(z, t, 1)) and np.isnan(M.tip_error(t, z, 1))
  assert M.device_tip(z == 1) is None
