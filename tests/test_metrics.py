"""Metrics against hand counts and independent numpy / scipy / skimage references."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.draw import line
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


@pytest.mark.parametrize(
  "spacing", [0.0, -0.5, float("nan"), float("inf"), (0.5, 0.0), (0.5, -1.0), (1.0, float("nan"))]
)
@pytest.mark.parametrize("fn", [M.hd95, M.assd, M.tip_error], ids=["hd95", "assd", "tip_error"])
def test_distance_metrics_refuse_a_pixel_size_that_is_not_positive_and_finite(fn, spacing):
  """A zero, negative or NaN pixel size has no meaning: before, 0 mm made every distance 0, a negative
  size gave the |size| result and NaN gave NaN, all silently. Two single pixels 3 px apart: 1.5 mm at 0.5 mm."""
  p = np.zeros((10, 10), np.int32)
  t = np.zeros((10, 10), np.int32)
  p[2, 2] = 1
  t[2, 5] = 1
  assert fn(p, t, 1, 0.5) == pytest.approx(1.5)
  with pytest.raises(ValueError, match="spacing_mm"):
    fn(p, t, 1, spacing)


@pytest.mark.parametrize(
  "fn", [M.dice, M.iou, M.cldice, M.cldice_reference, M.hd95, M.betti0_error], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("shapes", [((2, 8, 8), (8, 8)), ((8, 8), (1, 8, 8)), ((8, 8), (8, 1)), ((8,), (8,))])
def test_mismatched_shapes_are_refused(fn, shapes):
  """pred [2, 8, 8] against target [8, 8] is a caller's mistake: the JAX metrics used to broadcast it
  (one target scored against every prediction, result [2]) instead of refusing it like the host ones."""
  with pytest.raises(ValueError, match=r"must both be \[H, W\] or \[B, H, W\]"):
    fn(np.ones(shapes[0], np.int32), np.ones(shapes[1], np.int32), 1)


# ------------------------------------------------------------------ clDice


def _paper_cldice(v_p, v_l):
  """clDice written from Shit et al. (CVPR 2021) and their reference code (cl_score = sum(v * s) / sum(s),
  s = skimage skeleton), in float arithmetic, with the module's conventions where the paper divides by 0."""
  v_p, v_l = np.asarray(v_p, np.float64), np.asarray(v_l, np.float64)
  if v_p.sum() == 0 or v_l.sum() == 0:
    return float(v_p.sum() == v_l.sum())
  s_p, s_l = skeletonize(v_p > 0).astype(np.float64), skeletonize(v_l > 0).astype(np.float64)
  tprec = np.sum(s_p * v_l) / np.sum(s_p)
  tsens = np.sum(s_l * v_p) / np.sum(s_l)
  return 0.0 if tprec + tsens == 0 else 2 * tprec * tsens / (tprec + tsens)


def _polyline_mask(pts, n, width):
  """The polyline through ``pts`` [(row, col)] on an n x n image: 1 px wide (8-connected Bresenham
  segments) for width 1, else the pixels within (width - 1) / 2 of its rounded densely sampled points."""
  m = np.zeros((n, n), bool)
  if width == 1:
    for a, b in zip(pts[:-1], pts[1:]):
      r, c = line(*np.round(a).astype(int), *np.round(b).astype(int))
      ok = (r >= 0) & (r < n) & (c >= 0) & (c < n)
      m[r[ok], c[ok]] = True
    return m
  s = np.concatenate([np.linspace(a, b, int(np.hypot(*(b - a)) * 2) + 2) for a, b in zip(pts[:-1], pts[1:])])
  r, c = np.round(s).astype(int).T
  ok = (r >= 0) & (r < n) & (c >= 0) & (c < n)
  m[r[ok], c[ok]] = True
  return ndi.distance_transform_edt(~m) <= (width - 1) / 2


def _thin_pair(rng, n):
  """(pred, target) binary n x n: a 1-3 px wide random polyline (2-5 vertices) or sine curve as the
  target; the prediction is the target shifted by an integer (-3..3, -3..3) px, or the curve redrawn
  1-3 px wide and shifted by an integer or a sub-pixel offset in [-3, 3)^2."""
  if rng.uniform() < 0.5:
    pts = rng.uniform(2, n - 3, (int(rng.integers(2, 6)), 2))
  else:
    amp, period, phase = rng.uniform(2, n / 4), rng.uniform(n / 12, n / 3), rng.uniform(0, 2 * np.pi)
    xs = np.linspace(2, n - 3, 4 * n)
    pts = np.stack([n / 2 + amp * np.sin(xs / period + phase), xs], 1)
    pts = pts[:, ::-1] if rng.uniform() < 0.5 else pts
  target = _polyline_mask(pts, n, int(rng.integers(1, 4)))
  mode = rng.integers(0, 3)
  if mode == 0:
    return ndi.shift(target, rng.integers(-3, 4, 2), order=0), target
  shift = rng.integers(-3, 4, 2) if mode == 1 else rng.uniform(-3, 3, 2)
  return _polyline_mask(pts + shift, n, int(rng.integers(1, 4))), target


def _blob_pair(rng, n, i):
  """(pred, target) unions of 1-3 discs: the target shifted by 0-3 px, other discs, empty, or the same
  (by i % 4); the target is empty for every 7th i."""
  yy, xx = np.mgrid[:n, :n]

  def discs():
    m = np.zeros((n, n), bool)
    for _ in range(int(rng.integers(1, 4))):
      cy, cx, r = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(1.5, n / 5)
      m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m

  target = discs()
  pred = [ndi.shift(target, rng.integers(-3, 4, 2), order=0), discs(), np.zeros_like(target), target][i % 4]
  return pred, (np.zeros_like(target) if i % 7 == 0 else target)


# the bounds measured over the full families (fedkd/metrics.py docstring); the tests run seeded subsets
JAX_VS_REFERENCE_CURVES = 0.625  # max over 20000 thin pairs; mean 0.028


def test_cldice_reference_hand_counted():
  # G: a 1-px horizontal line, row 5, columns 2-13 (12 px); a 1-px line is its own skeleton
  g = np.zeros((16, 20), np.int32)
  g[5, 2:14] = 1
  assert np.array_equal(skeletonize(g == 1), g == 1)
  along = np.roll(g, 3, axis=1)  # columns 5-16: S(P) & G = columns 5-13 = 9 px -> Tprec = Tsens = 9/12
  across = np.roll(g, 1, axis=0)  # row 6: no skeleton pixel of either lies in the other -> 0
  half = g.copy()
  half[5, 8:] = 0  # columns 2-7 (6 px): Tprec = 6/6, Tsens = 6/12 -> 2 * 1 * 0.5 / 1.5 = 2/3
  assert M.cldice_reference(along, g, 1) == pytest.approx(0.75)
  assert M.cldice_reference(across, g, 1) == 0.0
  assert M.cldice_reference(half, g, 1) == pytest.approx(2 / 3)
  assert M.cldice_reference(g, half, 1) == pytest.approx(2 / 3)  # symmetric
  assert M.cldice_reference(g, g, 1) == 1.0
  # a diagonal 1-px line moved one pixel to the right: S(P) & G is empty -> 0
  d = np.zeros((16, 16), np.int32)
  idx = np.arange(2, 14)
  d[idx, idx] = 2
  assert M.cldice_reference(np.roll(d, 1, axis=1), d, 2) == 0.0
  # batch: float64 [B] in input order; class_id picks the mask
  batch = M.cldice_reference(np.stack([along, across, half, g]), np.stack([g, g, g, g]), 1)
  assert batch.dtype == np.float64
  np.testing.assert_allclose(batch, [0.75, 0.0, 2 / 3, 1.0])
  assert M.cldice_reference(g, g, 2) == 1.0  # class 2 absent from both


def test_cldice_reference_vs_paper_formula():
  rng = np.random.default_rng(4)
  pairs = [_thin_pair(rng, int(rng.choice([32, 64]))) for _ in range(12)]
  pairs += [_blob_pair(rng, 32, i) for i in range(8)]
  pairs += [(_curve(rng, width=w), _curve(rng, width=w)) for w in (1.5, 3.0, 5.0)]  # some thicker
  for p, t in pairs:
    pred, target = np.where(p, 3, 1), np.where(t, 3, 0)
    assert M.cldice_reference(pred, target, 3) == pytest.approx(_paper_cldice(p, t), abs=1e-12)
  preds = np.stack([np.where(p, 1, 0) for p, _ in pairs[:12] if p.shape == (32, 32)])
  targets = np.stack([np.where(t, 1, 0) for p, t in pairs[:12] if p.shape == (32, 32)])
  np.testing.assert_allclose(
    M.cldice_reference(preds, targets, 1), [_paper_cldice(p == 1, t == 1) for p, t in zip(preds, targets)], atol=1e-12
  )


def test_cldice_jax_within_measured_bound_of_reference():
  rng = np.random.default_rng(5)
  diffs = []
  for n in (32, 64, 128):  # one compile per size
    pairs = [_thin_pair(rng, n) for _ in range(12)]
    preds = np.stack([p for p, _ in pairs]).astype(np.int32)
    targets = np.stack([t for _, t in pairs]).astype(np.int32)
    got = np.asarray(M.cldice(preds, targets, 1))
    ref = M.cldice_reference(preds, targets, 1)
    assert got.shape == ref.shape == (12,)
    diffs.append(np.abs(got - ref))
    # identical masks -> exactly 1 for both
    np.testing.assert_array_equal(np.asarray(M.cldice(targets, targets, 1)), 1.0)
    np.testing.assert_array_equal(M.cldice_reference(targets, targets, 1), 1.0)
  diffs = np.concatenate(diffs)
  assert diffs.max() <= JAX_VS_REFERENCE_CURVES + 1e-6, diffs
  assert diffs.mean() < 0.06, diffs
  blobs = [_blob_pair(rng, 32, i) for i in range(12)]
  preds = np.stack([p for p, _ in blobs]).astype(np.int32)
  targets = np.stack([t for _, t in blobs]).astype(np.int32)
  got = np.asarray(M.cldice(preds, targets, 1))
  assert np.mean(np.abs(got - M.cldice_reference(preds, targets, 1))) < 0.1  # measured mean 0.014, max 1.0
  assert float(M.cldice(preds[3], targets[3], 1)) == pytest.approx(got[3], abs=1e-6)  # single == batch
  full = np.ones((1, 12, 12), np.int32)
  assert float(M.cldice(full, full, 1)[0]) == 1.0 and M.cldice_reference(full, full, 1)[0] == 1.0


def test_cldice_documented_extremes():
  # P: a 2 px wide 45-degree band (21 px) around G, the 1 px diagonal (11 px). skimage thins P to one
  # pixel off the diagonal -> reference 0; the JAX skeleton is all of P: Tprec 10/21, Tsens 10/11
  p = np.zeros((16, 16), np.int32)
  i = np.arange(1, 12)
  p[i, i - 1] = 1
  p[i[:-1], i[:-1]] = 1
  g = np.zeros_like(p)
  g[np.arange(11), np.arange(11)] = 1
  assert p.sum() == 21 and skeletonize(p == 1).sum() == 1
  assert M.cldice_reference(p, g, 1) == 0.0
  tprec, tsens = 10 / 21, 10 / 11
  assert float(M.cldice(p, g, 1)) == pytest.approx(2 * tprec * tsens / (tprec + tsens), abs=1e-6)  # 0.625
  assert 2 * tprec * tsens / (tprec + tsens) == pytest.approx(JAX_VS_REFERENCE_CURVES)


def test_cldice_empty_conventions():
  z = np.zeros((2, 16, 16), np.int32)
  m = z.copy()
  m[:, 8, 2:14] = 1
  for fn in (lambda p, t: np.asarray(M.cldice(p, t, 1)), lambda p, t: M.cldice_reference(p, t, 1)):
    np.testing.assert_array_equal(fn(z, z), 1.0)  # both empty -> 1
    np.testing.assert_array_equal(fn(m, z), 0.0)  # exactly one empty -> 0
    np.testing.assert_array_equal(fn(z, m), 0.0)
  assert M.cldice_reference(z[0], z[0], 1) == 1.0 and M.cldice_reference(m[0], z[0], 1) == 0.0


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


def test_the_tip_is_the_farthest_end_along_the_device_not_in_pixel_steps():
  """A wire entering at the left border that forks at (30, 20): one branch straight on to (30, 40) (20 steps of
  1 px), one diagonal to (50, 40) (20 steps of sqrt 2 px). Both are 20 pixel steps from the fork; along the wire
  the diagonal end is 40 + 8.3 px from the entry and the straight one 40 px, so the tip is (50, 40)."""
  m = np.zeros((64, 64), bool)
  m[30, 0:41] = True
  k = np.arange(21)
  m[30 + k, 20 + k] = True
  assert M.device_tip(m) == (50, 40)


def test_tip_with_a_pixel_spacing_of_its_own_per_axis():
  """spacing_mm = (row, col) mm: a line from (3, 30) to (30, 4) at (2.0, 0.5) mm is 6 mm from the top border at
  one end and 2 mm from the left border at the other, so it enters at (30, 4) and its tip is (3, 30) (with the
  spacings swapped the entry would be the other end); a tip 5 columns off is 5 x 0.5 mm away, 3 rows off 3 x 2."""
  from skimage.draw import line

  m = np.zeros((64, 64), bool)
  m[line(3, 30, 30, 4)] = True
  assert M.device_tip(m, spacing_mm=(2.0, 0.5)) == (3, 30)
  assert M.device_tip(m, spacing_mm=(0.5, 2.0)) == (30, 4)
  t = np.zeros((64, 64), np.int32)
  t[20, 0:41] = 1  # tip (20, 40)
  for tip, want in (((20, 35), 2.5), ((23, 40), 6.0)):
    p = np.zeros((64, 64), np.int32)
    p[20, 0 : tip[1] + 1] = 1
    p[20 : tip[0] + 1, tip[1]] = 1
    assert M.device_tip(p == 1, spacing_mm=(2.0, 0.5)) == tip
    assert M.tip_error(p, t, 1, spacing_mm=(2.0, 0.5)) == pytest.approx(want)


def test_tip_error_empty_conventions():
  z = np.zeros((16, 16), np.int32)
  t = z.copy()
  t[8, 0:10] = 1
  assert M.tip_error(z, z, 1) == 0.0
  assert np.isnan(M.tip_error(z, t, 1)) and np.isnan(M.tip_error(t, z, 1))
  assert M.device_tip(z == 1) is None
