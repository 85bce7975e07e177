"""Tests for ssdjax.matching against a NumPy reference written here (Caffe / torchvision loops)."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import REPO, ssd300_voc, subprocess_env
from ssdjax import boxes as box_lib
from ssdjax import matching

STRATEGIES = ("bipartite", "per_gt_best")


# ---------------------------------------------------------------- independent NumPy reference

def np_iou(a, b):
  """a [N, 4], b [M, 4] xyxy -> [N, M], float64, 0 for degenerate boxes."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  out = np.zeros((len(a), len(b)))
  for i in range(len(a)):
    for j in range(len(b)):
      iw = min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0])
      ih = min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1])
      inter = max(iw, 0.0) * max(ih, 0.0)
      area_a = max(a[i, 2] - a[i, 0], 0.0) * max(a[i, 3] - a[i, 1], 0.0)
      area_b = max(b[j, 2] - b[j, 0], 0.0) * max(b[j, 3] - b[j, 1], 0.0)
      union = area_a + area_b - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def np_xyxy(anchors):
  a = np.asarray(anchors, np.float64)
  return np.concatenate([a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2], axis=1)


def ref_bipartite(gt_boxes, gt_labels, gt_mask, anchors, thr):
  """Caffe MatchBBox, match_type PER_PREDICTION, written as its loops."""
  valid = [g for g in range(len(gt_boxes)) if gt_mask[g] and gt_labels[g] > 0]
  ov = np_iou(gt_boxes, np_xyxy(anchors))
  num_a = len(anchors)
  match = [-1] * num_a
  pool = list(valid)
  while pool:
    best_a, best_g, best = -1, -1, -1.0
    for a in range(num_a):
      if match[a] != -1:
        continue
      for g in pool:
        if ov[g, a] > 1e-6 and ov[g, a] > best:
          best_a, best_g, best = a, g, ov[g, a]
    if best_a == -1:
      break
    match[best_a] = best_g
    pool.remove(best_g)
  for a in range(num_a):
    if match[a] != -1:
      continue
    best_g, best = -1, -1.0
    for g in valid:
      if ov[g, a] > 1e-6 and ov[g, a] >= thr and ov[g, a] > best:
        best_g, best = g, ov[g, a]
    match[a] = best_g
  return np.array(match)


def ref_per_gt_best(gt_boxes, gt_labels, gt_mask, anchors, thr):
  """torchvision SSDMatcher, with conflicts on a shared best anchor won by the higher IoU."""
  valid = [g for g in range(len(gt_boxes)) if gt_mask[g] and gt_labels[g] > 0]
  ov = np_iou(gt_boxes, np_xyxy(anchors))
  num_a = len(anchors)
  match = [-1] * num_a
  for a in range(num_a):
    best_g, best = -1, -1.0
    for g in valid:
      if ov[g, a] > best:
        best_g, best = g, ov[g, a]
    if best_g >= 0 and best >= thr:
      match[a] = best_g
  forced = {}  # anchor -> (iou, gt)
  for g in valid:
    a = int(np.argmax(ov[g]))
    if ov[g, a] <= 0:
      continue
    if a not in forced or ov[g, a] > forced[a][0]:
      forced[a] = (ov[g, a], g)
  for a, (_, g) in forced.items():
    match[a] = g
  return np.array(match)


REFERENCES = {"bipartite": ref_bipartite, "per_gt_best": ref_per_gt_best}


def random_case(rng, num_gt_slots=6, num_anchors=40):
  """Random padded ground truth (padding slots hold garbage) and anchors; some gts near anchors."""
  anchors = np.concatenate([rng.uniform(0.1, 0.9, (num_anchors, 2)),
                            rng.uniform(0.05, 0.5, (num_anchors, 2))], 1).astype(np.float32)
  n = rng.integers(0, num_gt_slots + 1)
  slots = rng.permutation(num_gt_slots)[:n]
  boxes = rng.uniform(-5, 5, (num_gt_slots, 4)).astype(np.float32)  # garbage in padding
  labels = np.zeros(num_gt_slots, np.int32)
  mask = np.zeros(num_gt_slots, bool)
  for s in slots:
    if rng.uniform() < 0.5:  # jittered copy of an anchor: threshold matches and shared best anchors
      cx, cy, w, h = anchors[rng.integers(num_anchors)] * rng.uniform(0.8, 1.2, 4)
    else:
      cx, cy = rng.uniform(0.1, 0.9, 2)
      w, h = rng.uniform(0.02, 0.6, 2)
    boxes[s] = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 1)
    labels[s] = rng.integers(1, 5)
    mask[s] = True
  return boxes, labels, mask, anchors


def cxcywh(xyxy):
  x0, y0, x1, y1 = np.asarray(xyxy, np.float32).T
  return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def stack_cases(cases):
  return tuple(np.stack(x) for x in zip(*cases))


# ---------------------------------------------------------------- reference comparison

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("thr", [0.5, 0.3])
def test_matches_numpy_reference_on_random_cases(strategy, thr):
  rng = np.random.default_rng(0)
  num_anchors = 40
  anchors = random_case(rng, num_anchors=num_anchors)[3]
  cases = [random_case(rng, num_anchors=num_anchors)[:3] for _ in range(60)]
  boxes, labels, mask = stack_cases(cases)
  fn = jax.jit(functools.partial(matching.batch_match, iou_threshold=thr, strategy=strategy))
  idx, iou = jax.device_get(fn(boxes, labels, mask, anchors))
  num_pos = 0
  for i, (b, l, m) in enumerate(cases):
    expected = REFERENCES[strategy](b, l, m, anchors, thr)
    np.testing.assert_array_equal(idx[i], expected, err_msg=f"case {i}")
    ov = np_iou(b, np_xyxy(anchors))
    valid = m & (l > 0)
    best = ov[valid].max(axis=0) if valid.any() else np.zeros(num_anchors)
    expected_iou = np.where(expected >= 0, ov[np.maximum(expected, 0), np.arange(num_anchors)], best)
    np.testing.assert_allclose(iou[i], expected_iou, atol=1e-5, err_msg=f"case {i}")
    num_pos += (expected >= 0).sum()
  assert num_pos > 60  # the cases exercise matching, not only background


def grid_case(rng, num_gt_slots, num_anchors):
  """Boxes on a 1/16 grid (exact in float32): many exact IoU ties, duplicate anchors and gts."""
  def grid_boxes(n):
    lo = rng.integers(0, 12, (n, 2))
    return (np.concatenate([lo, lo + rng.integers(1, 5, (n, 2))], 1) / 16).astype(np.float32)
  anchors = cxcywh(grid_boxes(num_anchors))
  anchors[rng.integers(num_anchors, size=num_anchors // 4)] = anchors[0]  # duplicates
  boxes = grid_boxes(num_gt_slots)
  boxes[-1] = boxes[0]
  labels = rng.integers(1, 4, num_gt_slots).astype(np.int32)
  mask = rng.uniform(size=num_gt_slots) < 0.8
  return boxes, labels, mask, anchors


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_gt_slots,num_anchors", [(6, 24), (7, 4)])
def test_matches_numpy_reference_with_exact_ties(strategy, num_gt_slots, num_anchors):
  # (7, 4): more gts than anchors, so some gts find every anchor taken.
  rng = np.random.default_rng(10)
  fn = jax.jit(functools.partial(matching.match, strategy=strategy, iou_threshold=0.25))
  for i in range(40):
    b, l, m, anchors = grid_case(rng, num_gt_slots, num_anchors)
    expected = REFERENCES[strategy](b, l, m, anchors, 0.25)
    np.testing.assert_array_equal(fn(b, l, m, anchors)[0], expected, err_msg=f"case {i}")


def test_bipartite_exact_ties_follow_caffe_loop_order():
  # Two identical anchors and two identical gts, all IoU 1: Caffe takes (a0, g0), then (a1, g1).
  anchors = cxcywh([[.5, .5, .75, .75], [0, 0, .25, .25], [.5, .5, .75, .75]])
  gt = np.array([[.5, .5, .75, .75], [.5, .5, .75, .75]], np.float32)
  idx, _ = matching.match(gt, np.array([1, 2]), np.array([True, True]), anchors, strategy="bipartite")
  np.testing.assert_array_equal(idx, [0, -1, 1])


# ---------------------------------------------------------------- hand-computed

# a0 = gt0 exactly; gt1 overlaps a0 by 2/3 and a1 by 1/9; a2 overlaps nothing.
TINY_ANCHORS = cxcywh([[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1]])
TINY_GT = np.array([[0, 0, .5, .5], [.1, 0, .6, .5]], np.float32)
TINY_LABELS = np.array([3, 7], np.int32)
TINY_MASK = np.array([True, True])


def test_tiny_bipartite_gives_both_gts_an_anchor():
  idx, iou = matching.match(TINY_GT, TINY_LABELS, TINY_MASK, TINY_ANCHORS, strategy="bipartite")
  np.testing.assert_array_equal(idx, [0, 1, -1])
  np.testing.assert_allclose(iou, [1.0, 1 / 9, 0.0], atol=1e-6)


def test_tiny_per_gt_best_shared_best_anchor_trap():
  # Both gts have a0 as best anchor; gt0 (IoU 1) beats gt1 (IoU 2/3), and gt1 is left unmatched.
  idx, iou = matching.match(TINY_GT, TINY_LABELS, TINY_MASK, TINY_ANCHORS, strategy="per_gt_best")
  np.testing.assert_array_equal(idx, [0, -1, -1])
  np.testing.assert_allclose(iou, [1.0, 1 / 9, 0.0], atol=1e-6)
  # Same winner with the gts in the other order (torchvision's last-written rule would flip it).
  idx, _ = matching.match(TINY_GT[::-1], TINY_LABELS[::-1], TINY_MASK, TINY_ANCHORS,
                          strategy="per_gt_best")
  np.testing.assert_array_equal(idx, [1, -1, -1])


def test_tiny_threshold_stage_and_greedy_order():
  # a3 = [0, 0, .5, .45]: IoU .9 with gt0, .61 with gt1. Bipartite: gt0 takes a0, then gt1 takes
  # a3 (its best free anchor). per_gt_best: a3 goes to gt0 by threshold, gt1 loses a0.
  anchors = np.concatenate([TINY_ANCHORS, cxcywh([[0, 0, .5, .45]])])
  idx, iou = matching.match(TINY_GT, TINY_LABELS, TINY_MASK, anchors, strategy="bipartite")
  np.testing.assert_array_equal(idx, [0, -1, -1, 1])
  np.testing.assert_allclose(iou, [1.0, 1 / 9, 0.0, 0.18 / 0.295], atol=1e-6)
  idx, _ = matching.match(TINY_GT, TINY_LABELS, TINY_MASK, anchors, strategy="per_gt_best")
  np.testing.assert_array_equal(idx, [0, -1, -1, 0])
  # A threshold above 0.9 leaves a3 as background under per_gt_best.
  idx, _ = matching.match(TINY_GT, TINY_LABELS, TINY_MASK, anchors, strategy="per_gt_best",
                          iou_threshold=0.95)
  np.testing.assert_array_equal(idx, [0, -1, -1, -1])


def test_gt_without_overlap_gets_no_forced_match():
  gt = np.array([[.9, .9, .95, .95]], np.float32)  # overlaps none of the tiny anchors
  for strategy in STRATEGIES:
    idx, iou = matching.match(gt, np.array([1]), np.array([True]), TINY_ANCHORS, strategy=strategy)
    np.testing.assert_array_equal(idx, [-1, -1, -1])
    np.testing.assert_array_equal(iou, [0, 0, 0])


def test_overlaps_below_caffe_minimum_force_no_bipartite_match():
  # IoU 2.5e-7 <= 1e-6: Caffe records no overlap, so no forced match; torchvision forces any > 0.
  anchors = cxcywh([[0, 0, 1, 1]])
  gt, labels, mask = np.array([[.9995, .9995, 1, 1]], np.float32), np.array([1]), np.array([True])
  for strategy, expected in (("bipartite", [-1]), ("per_gt_best", [0])):
    idx, _ = matching.match(gt, labels, mask, anchors, strategy=strategy)
    np.testing.assert_array_equal(idx, expected, err_msg=strategy)
    idx, _ = matching.batch_match(gt[None], labels[None], mask[None], anchors, strategy=strategy)
    np.testing.assert_array_equal(idx, [expected], err_msg=strategy)


def test_padding_never_matches():
  # The padded slot holds a box equal to a0 (IoU 1); with mask False or label 0 it must be ignored.
  gt = np.array([[0, 0, .5, .5], [.1, 0, .6, .5]], np.float32)
  for labels, mask in (([3, 7], [False, True]), ([0, 7], [True, True])):
    for strategy in STRATEGIES:
      idx, _ = matching.match(gt, np.array(labels), np.array(mask), TINY_ANCHORS, strategy=strategy)
      assert (np.asarray(idx) != 0).all()
      assert (np.asarray(idx) == 1).any()


# ---------------------------------------------------------------- invariants and edge cases

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invariant_to_gt_order_and_padding_positions(strategy):
  rng = np.random.default_rng(1)
  fn = jax.jit(functools.partial(matching.match, strategy=strategy))
  for _ in range(10):
    boxes, labels, mask, anchors = random_case(rng, num_gt_slots=6, num_anchors=40)
    perm = rng.permutation(6)
    idx_a, iou_a = fn(boxes, labels, mask, anchors)
    idx_b, iou_b = fn(boxes[perm], labels[perm], mask[perm], anchors)
    idx_a, idx_b = np.asarray(idx_a), np.asarray(idx_b)
    np.testing.assert_array_equal(idx_a >= 0, idx_b >= 0)
    pos = idx_a >= 0
    np.testing.assert_array_equal(boxes[idx_a[pos]], boxes[perm][idx_b[pos]])
    np.testing.assert_array_equal(labels[idx_a[pos]], labels[perm][idx_b[pos]])
    np.testing.assert_allclose(iou_a, iou_b, atol=1e-7)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_gt_is_all_background(strategy):
  rng = np.random.default_rng(2)
  anchors = random_case(rng)[3]
  boxes = np.full((4, 4), np.nan, np.float32)  # padding may hold anything
  labels, mask = np.zeros(4, np.int32), np.zeros(4, bool)
  idx, iou = jax.jit(functools.partial(matching.match, strategy=strategy))(boxes, labels, mask, anchors)
  np.testing.assert_array_equal(idx, -1)
  np.testing.assert_array_equal(iou, 0.0)
  loc, cls = jax.jit(functools.partial(matching.targets, strategy=strategy))(
      boxes, labels, mask, anchors)
  np.testing.assert_array_equal(loc, 0.0)
  np.testing.assert_array_equal(cls, 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_degenerate_gt_boxes_under_jit_are_finite_and_unmatched(strategy):
  anchors = TINY_ANCHORS
  gt = np.array([[.2, .2, .2, .4],     # zero width
                 [.3, .3, .1, .1],     # inverted
                 [0, 0, .5, .5]], np.float32)
  labels, mask = np.array([1, 2, 3]), np.array([True, True, True])
  idx, iou = jax.jit(functools.partial(matching.match, strategy=strategy))(gt, labels, mask, anchors)
  loc, cls = jax.jit(functools.partial(matching.targets, strategy=strategy, iou_threshold=0.0))(
      gt, labels, mask, anchors)
  assert np.isfinite(iou).all() and np.isfinite(loc).all()
  np.testing.assert_array_equal(idx, [2, -1, -1])
  np.testing.assert_array_equal(cls[0], 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_jit_equals_no_jit(strategy):
  boxes, labels, mask, anchors = random_case(np.random.default_rng(3))
  eager = matching.targets(boxes, labels, mask, anchors, strategy=strategy)
  jitted = jax.jit(functools.partial(matching.targets, strategy=strategy))(boxes, labels, mask, anchors)
  for e, j in zip(eager, jitted):
    np.testing.assert_array_equal(e, j)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_equals_per_image_loop(strategy):
  rng = np.random.default_rng(4)
  anchors = random_case(rng)[3]
  cases = [random_case(rng)[:3] for _ in range(5)]
  boxes, labels, mask = stack_cases(cases)
  b_idx, b_iou = matching.batch_match(boxes, labels, mask, anchors, strategy=strategy)
  b_loc, b_cls = matching.batch_targets(boxes, labels, mask, anchors, strategy=strategy)
  match_fn = jax.jit(functools.partial(matching.match, strategy=strategy))
  targets_fn = jax.jit(functools.partial(matching.targets, strategy=strategy))
  for i, (b, l, m) in enumerate(cases):
    idx, iou = match_fn(b, l, m, anchors)
    loc, cls = targets_fn(b, l, m, anchors)
    np.testing.assert_array_equal(b_idx[i], idx)
    np.testing.assert_allclose(b_iou[i], iou, atol=1e-7)
    np.testing.assert_allclose(b_loc[i], loc, atol=1e-6)
    np.testing.assert_array_equal(b_cls[i], cls)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_targets_decode_back_to_matched_gt(strategy):
  rng = np.random.default_rng(5)
  variances = (0.1, 0.2)
  match_fn = jax.jit(functools.partial(matching.match, strategy=strategy))
  targets_fn = jax.jit(functools.partial(matching.targets, strategy=strategy, variances=variances))
  for _ in range(5):
    boxes, labels, mask, anchors = random_case(rng)
    idx, _ = match_fn(boxes, labels, mask, anchors)
    loc, cls = targets_fn(boxes, labels, mask, anchors)
    idx, loc, cls = np.asarray(idx), np.asarray(loc), np.asarray(cls)
    pos = idx >= 0
    np.testing.assert_array_equal(cls, np.where(pos, labels[np.maximum(idx, 0)], 0))
    np.testing.assert_array_equal(loc[~pos], 0.0)
    decoded = np.asarray(box_lib.decode(loc, anchors, variances))
    np.testing.assert_allclose(decoded[pos], boxes[idx[pos]], atol=1e-5)
    # The offsets themselves follow the SSD formula with the given variances.
    a = anchors[pos].astype(np.float64)
    g = boxes[idx[pos]].astype(np.float64)
    g_c = (g[:, :2] + g[:, 2:]) / 2
    g_wh = g[:, 2:] - g[:, :2]
    expected = np.concatenate([(g_c - a[:, :2]) / a[:, 2:] / 0.1, np.log(g_wh / a[:, 2:]) / 0.2], 1)
    np.testing.assert_allclose(loc[pos], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- batch functions: valid gts only

def padded_batch(rng, anchors, num_valid, num_gt_slots, grid=False):
  """[B, G] gt with num_valid[b] valid gts at random slots of image b (ties: duplicate gts, gts
  equal to anchors, grid boxes). The padding is interleaved and holds traps that would match if
  used: copies of anchors and of valid boxes with a label but mask False, or mask True but label
  0; and NaN garbage."""
  batch = len(num_valid)
  anchors_xyxy = np_xyxy(anchors).astype(np.float32)
  boxes = rng.uniform(0, 1, (batch, num_gt_slots, 4)).astype(np.float32)
  if grid:
    lo = rng.integers(0, 12, (batch, num_gt_slots, 2))
    boxes = (np.concatenate([lo, lo + rng.integers(1, 5, lo.shape)], -1) / 16).astype(np.float32)
  else:
    boxes = np.concatenate([np.minimum(boxes[..., :2], boxes[..., 2:]),
                            np.maximum(boxes[..., :2], boxes[..., 2:])], -1)
  copies = rng.uniform(size=(batch, num_gt_slots)) < 0.3
  boxes[copies] = anchors_xyxy[rng.integers(len(anchors), size=copies.sum())]
  labels = rng.integers(1, 5, (batch, num_gt_slots)).astype(np.int32)
  mask = np.zeros((batch, num_gt_slots), bool)
  for b, n in enumerate(num_valid):
    slots = rng.permutation(num_gt_slots)
    mask[b, slots[:n]] = True
    if n:
      boxes[b, slots[n:n + 3]] = boxes[b, slots[0]]  # padding traps holding a valid box
      boxes[b, slots[min(n, 2) - 1]] = boxes[b, slots[0]]  # a duplicate valid gt (a tie)
  label0 = rng.uniform(size=mask.shape) < 0.15  # mask True, label 0: padding too
  labels[label0 & mask] = 0
  mask |= label0
  boxes[~mask & (rng.uniform(size=mask.shape) < 0.2)] = np.nan
  return boxes, labels, mask


def assert_trees_equal(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(g, w)  # bit for bit (NaN-free)


def test_row_sizes():
  assert matching._row_sizes(100) == (8, 16, 32, 64, 100)
  assert matching._row_sizes(64) == (8, 16, 32, 64)
  assert matching._row_sizes(9) == (8, 9)
  assert matching._row_sizes(8) == (8,)
  assert matching._row_sizes(1) == (1,)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grid", [False, True])
def test_batch_functions_on_valid_gts_equal_all_rows(strategy, grid):
  # batch_match / batch_targets match on the smallest G' that holds the valid gts; the one-image
  # functions always use all G = 100 rows: the same results, bit for bit, for batches whose
  # fullest image picks each G' in (8, 16, 32, 64, 100); and the NumPy reference.
  rng = np.random.default_rng(20)
  num_gt_slots, num_anchors, batch = 100, 150, 4
  if grid:
    anchors = grid_case(rng, 1, num_anchors)[3]
    thr = 0.25
  else:
    anchors = random_case(rng, num_anchors=num_anchors)[3]
    thr = 0.5
  kw = dict(strategy=strategy, iou_threshold=thr)
  batch_fn = jax.jit(lambda b, l, m: (matching.batch_match(b, l, m, anchors, **kw),
                                      matching.batch_targets(b, l, m, anchors, **kw)))
  one_image = lambda b, l, m: (matching.match(b, l, m, anchors, **kw),
                               matching.targets(b, l, m, anchors, **kw))
  all_rows = jax.jit(jax.vmap(one_image))
  for most in (0, 1, 8, 9, 16, 17, 40, 64, 65, 100):
    num_valid = rng.integers(0, most + 1, batch)
    num_valid[rng.integers(batch)] = most
    boxes, labels, mask = padded_batch(rng, anchors, num_valid, num_gt_slots, grid)
    got = jax.device_get(batch_fn(boxes, labels, mask))
    assert_trees_equal(got, all_rows(boxes, labels, mask))
    for b in np.flatnonzero(num_valid <= 9):  # the loops of the reference are slow
      expected = REFERENCES[strategy](boxes[b], labels[b], mask[b], anchors, thr)
      np.testing.assert_array_equal(got[0][0][b], expected, err_msg=f"{most} image {b}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_functions_with_small_row_sizes(strategy, monkeypatch):
  # Row sizes 1, 2, 4, G: few gt slots (G = 1 included), exact ties, more gts than anchors, no or
  # one valid gt.
  monkeypatch.setattr(matching, "_MIN_ROWS", 1)
  rng = np.random.default_rng(21)
  for num_gt_slots, num_anchors in ((1, 5), (3, 4), (6, 24), (7, 4)):
    anchors = grid_case(rng, num_gt_slots, num_anchors)[3]
    kw = dict(strategy=strategy, iou_threshold=0.25)
    batch_fn = jax.jit(lambda b, l, m: (matching.batch_match(b, l, m, anchors, **kw),
                                        matching.batch_targets(b, l, m, anchors, **kw)))
    all_rows = jax.jit(jax.vmap(lambda b, l, m: (matching.match(b, l, m, anchors, **kw),
                                                 matching.targets(b, l, m, anchors, **kw))))
    for i in range(8):
      cases = [grid_case(rng, num_gt_slots, num_anchors)[:3] for _ in range(3)]
      boxes, labels, mask = (np.array(x) for x in stack_cases(cases))
      mask[0] = False  # no valid gt
      mask[1] = np.arange(num_gt_slots) == rng.integers(num_gt_slots)  # one
      labels[2, rng.integers(num_gt_slots)] = 0  # a masked-in slot with label 0
      got = jax.device_get(batch_fn(boxes, labels, mask))
      assert_trees_equal(got, all_rows(boxes, labels, mask))
      for b in range(3):
        expected = REFERENCES[strategy](boxes[b], labels[b], mask[b], anchors, 0.25)
        np.testing.assert_array_equal(got[0][0][b], expected, err_msg=f"{num_gt_slots} {i} {b}")


def first_padded_slot(gt_boxes, gt_labels, gt_mask, anchors):
  """A matcher that shows what it received: every anchor matched to the first slot with mask
  False; as IoU, the sum of the x0 of all G slots."""
  del gt_labels
  num_anchors = jnp.shape(anchors)[0]
  return (jnp.full((num_anchors,), jnp.argmin(gt_mask), jnp.int32),
          jnp.full((num_anchors,), jnp.sum(gt_boxes[:, 0]), jnp.float32))


def test_own_matcher_receives_the_padded_gt_as_given():
  rng = np.random.default_rng(22)
  anchors = random_case(rng)[3]
  boxes, labels, mask = padded_batch(rng, anchors, [3, 0, 1], 10)
  boxes = np.nan_to_num(boxes, nan=0.25)
  idx, iou = jax.jit(functools.partial(matching.batch_match, anchors=anchors,
                                       strategy="tests.test_matching:first_padded_slot"))(
                                           boxes, labels, mask)
  np.testing.assert_array_equal(idx, np.argmin(mask, axis=1)[:, None].repeat(len(anchors), 1))
  np.testing.assert_allclose(iou[:, 0], boxes[:, :, 0].sum(1), rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_match_under_vmap_and_grad(strategy):
  # An outer vmap makes the size choice per batch: every size runs, the right one is kept. The
  # matched IoU stays differentiable with respect to the gt boxes.
  rng = np.random.default_rng(23)
  anchors = random_case(rng)[3]
  batches = [padded_batch(rng, anchors, n, 20) for n in ([1, 2], [20, 3])]
  boxes, labels, mask = (np.stack(x) for x in zip(*batches))
  fn = functools.partial(matching.batch_match, anchors=anchors, strategy=strategy)
  outer = jax.jit(jax.vmap(fn))(boxes, labels, mask)
  for i, batch in enumerate(batches):
    assert_trees_equal([x[i] for x in outer], jax.jit(fn)(*batch))
  boxes = np.nan_to_num(boxes[0], nan=0.0)
  one_image = functools.partial(matching.match, anchors=anchors, strategy=strategy)
  grad = jax.jit(jax.grad(lambda b: fn(b, labels[0], mask[0])[1].sum()))(boxes)
  one = jax.jit(jax.grad(lambda b: jax.vmap(one_image)(b, labels[0], mask[0])[1].sum()))(boxes)
  np.testing.assert_array_equal(grad, one)
  assert np.abs(grad).sum() > 0


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, ".")
from tests.test_matching import padded_batch, random_case
from ssdjax import matching
rng = np.random.default_rng(24)
anchors = random_case(rng, num_anchors=60)[3]
gt = padded_batch(rng, anchors, [3, 9, 0, 20], 32)
out = {}
for strategy in ("bipartite", "per_gt_best"):
  fn = jax.jit(lambda b, l, m: matching.batch_targets(b, l, m, anchors, strategy=strategy))
  single = jax.device_get(fn(*gt))
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(gt, jax.NamedSharding(mesh, jax.P("data")))
  got = fn(*sharded)
  equal = all(bool(np.array_equal(a, b)) for a, b in zip(jax.device_get(got), single))
  out[strategy] = dict(devices=len(got[0].sharding.device_set), equal=equal)
print(json.dumps(out))
"""


def test_batch_targets_sharded_over_devices():
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=subprocess_env(devices=2),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {s: {"devices": 2, "equal": True} for s in STRATEGIES}


# ---------------------------------------------------------------- config, errors, stats

def test_from_config_feeds_batch_targets():
  config = ssd300_voc.get_config()
  config.matching.strategy = "per_gt_best"
  config.matching.kwargs.iou_threshold = 0.4
  kwargs = matching.from_config(config)
  assert kwargs == {"iou_threshold": 0.4, "strategy": "per_gt_best", "variances": (0.1, 0.2)}
  boxes, labels, mask, anchors = random_case(np.random.default_rng(6))
  loc, cls = matching.batch_targets(boxes[None], labels[None], mask[None], anchors, **kwargs)
  assert loc.shape == (1, len(anchors), 4) and cls.shape == (1, len(anchors))


def test_bad_arguments_raise():
  args = (TINY_GT, TINY_LABELS, TINY_MASK, TINY_ANCHORS)
  with pytest.raises(ValueError, match="bipartite.*per_gt_best"):
    matching.match(*args, strategy="hungarian")
  with pytest.raises(ValueError, match="iou_threshold"):
    matching.match(*args, iou_threshold=1.5)
  with pytest.raises(ValueError, match="gt_labels"):
    matching.match(TINY_GT, TINY_LABELS[:1], TINY_MASK, TINY_ANCHORS)
  with pytest.raises(ValueError, match="anchors"):
    matching.match(TINY_GT, TINY_LABELS, TINY_MASK, TINY_ANCHORS[:, :2])
  with pytest.raises(ValueError, match=r"\[B, G, 4\]"):
    matching.batch_targets(*args)
  assert matching.names() == ("bipartite", "per_gt_best")


def test_match_stats_hand_computed():
  # Image 0: the tiny case (bipartite: both gts matched, one anchor each). Image 1: one gt that
  # overlaps nothing, plus a padded slot.
  boxes = np.stack([TINY_GT, np.array([[.9, .9, .95, .95], [0, 0, .5, .5]], np.float32)])
  labels = np.array([[3, 7], [1, 0]], np.int32)
  mask = np.array([[True, True], [True, False]])
  stats = jax.jit(matching.match_stats)(boxes, labels, mask, TINY_ANCHORS)
  np.testing.assert_allclose(stats["num_gt"], 3)
  np.testing.assert_allclose(stats["matched_gt_fraction"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(stats["positives_per_gt"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(stats["best_iou"], (1 + 2 / 3 + 0) / 3, rtol=1e-6)
  empty = matching.match_stats(boxes, labels, np.zeros_like(mask), TINY_ANCHORS)
  assert all(float(v) == 0.0 for v in empty.values())
