"""Tests for ssdjax.postprocess against a plain NumPy port of torchvision's SSD post-processing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ssd300_voc
from ssdjax import boxes as boxes_lib
from ssdjax import postprocess

# ---------------------------------------------------------------------------------------------
# Independent NumPy reference (float64, per-class Python loops, torchvision semantics).


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_decode_clip(loc, anchors_cxcywh, variances):
  """[A, 4] offsets, [A, 4] cxcywh anchors -> [A, 4] xyxy clipped to [0, 1]."""
  acx, acy, aw, ah = anchors_cxcywh.T
  cx = acx + loc[:, 0] * variances[0] * aw
  cy = acy + loc[:, 1] * variances[0] * ah
  w = aw * np.exp(loc[:, 2] * variances[1])
  h = ah * np.exp(loc[:, 3] * variances[1])
  return np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1), 0.0, 1.0)


def np_iou_one(box, others):
  """IoU of one xyxy box with [N, 4] xyxy boxes -> [N]."""
  iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
  ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
  inter = iw * ih
  area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
  union = area(box) + area(others) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def np_nms(boxes, scores, iou_threshold):
  """Textbook greedy NMS; returns kept indices in decreasing score order."""
  order = np.argsort(-scores)
  kept = []
  while order.size:
    i = order[0]
    kept.append(i)
    rest = order[1:]
    order = rest[np_iou_one(boxes[i], boxes[rest]) <= iou_threshold]
  return np.asarray(kept, np.int64)


def np_detect_one(loc, logits, anchors, *, score_threshold, iou_threshold, top_k, max_detections,
                  variances=(0.1, 0.2), stats=None):
  """One image, like torchvision SSD.postprocess_detections; returns (boxes, scores, classes)."""
  loc, logits, anchors = (np.asarray(x, np.float64) for x in (loc, logits, anchors))
  boxes = np_decode_clip(loc, anchors, variances)
  probs = np_softmax(logits)
  out_b, out_s, out_c = [], [], []
  for c in range(1, logits.shape[-1]):
    s = probs[:, c]
    idx = np.nonzero(s > score_threshold)[0]
    idx = idx[np.argsort(-s[idx])][:top_k]
    keep = idx[np_nms(boxes[idx], s[idx], iou_threshold)]
    if stats is not None:
      stats["topk_binds"] |= np.sum(s > score_threshold) > top_k
      stats["nms_suppressed"] |= len(keep) < len(idx)
    out_b.append(boxes[keep])
    out_s.append(s[keep])
    out_c.append(np.full(len(keep), c))
  b, s, c = np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_c)
  if stats is not None:
    stats["max_det_binds"] |= len(s) > max_detections
  order = np.argsort(-s)[:max_detections]
  return b[order], s[order], c[order]


# ---------------------------------------------------------------------------------------------
# Helpers.


def logits_from_probs(probs):
  return np.log(np.asarray(probs, np.float32))


def random_problem(seed, batch, num_anchors, num_classes):
  """Clustered anchors (so NMS has work to do) and random offsets/logits, float32."""
  rng = np.random.default_rng(seed)
  anchors = np.concatenate([rng.uniform(0.2, 0.8, (num_anchors, 2)),
                            rng.uniform(0.1, 0.5, (num_anchors, 2))], -1).astype(np.float32)
  loc = rng.normal(0.0, 1.0, (batch, num_anchors, 4)).astype(np.float32)
  logits = rng.normal(0.0, 2.0, (batch, num_anchors, num_classes)).astype(np.float32)
  return loc, logits, anchors


def assert_matches_reference(det, b, ref, max_detections):
  ref_boxes, ref_scores, ref_classes = ref
  n = len(ref_scores)
  assert int(det.valid[b]) == n
  np.testing.assert_allclose(np.asarray(det.scores[b, :n]), ref_scores, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(det.classes[b, :n]), ref_classes)
  np.testing.assert_allclose(np.asarray(det.boxes[b, :n]), ref_boxes, atol=1e-5)
  # Padding rows are all zero.
  assert np.all(np.asarray(det.scores[b, n:]) == 0)
  assert np.all(np.asarray(det.classes[b, n:]) == 0)
  assert np.all(np.asarray(det.boxes[b, n:]) == 0)
  assert det.boxes.shape[1] == max_detections


def box_cxcywh(x0, y0, x1, y1):
  return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


KW = dict(score_threshold=0.15, iou_threshold=0.5, top_k=10, max_detections=8)

# ---------------------------------------------------------------------------------------------
# detect vs the NumPy reference.


@pytest.mark.parametrize("seed,num_anchors,num_classes,iou_threshold", [
    (0, 60, 4, 0.5), (1, 120, 5, 0.45), (2, 200, 6, 0.3), (3, 90, 4, 0.7)])
def test_detect_matches_numpy_reference(seed, num_anchors, num_classes, iou_threshold):
  kw = dict(score_threshold=0.2, iou_threshold=iou_threshold, top_k=25, max_detections=30)
  loc, logits, anchors = random_problem(seed, 2, num_anchors, num_classes)
  det = postprocess.detect(loc, logits, anchors, **kw)
  stats = dict(topk_binds=False, nms_suppressed=False, max_det_binds=False)
  for b in range(loc.shape[0]):
    ref = np_detect_one(loc[b], logits[b], anchors, stats=stats, **kw)
    assert_matches_reference(det, b, ref, kw["max_detections"])
  # The inputs exercise every stage (else the comparison would prove less than it claims).
  assert stats == dict(topk_binds=True, nms_suppressed=True, max_det_binds=True)


def test_detect_variances_are_used():
  kw = dict(KW, variances=(0.2, 0.3))
  loc, logits, anchors = random_problem(7, 1, 80, 4)
  det = postprocess.detect(loc, logits, anchors, **kw)
  assert_matches_reference(det, 0, np_detect_one(loc[0], logits[0], anchors, **kw),
                           kw["max_detections"])


def test_detect_output_shapes_and_dtypes():
  loc, logits, anchors = random_problem(0, 3, 50, 5)
  det = postprocess.detect(loc, logits, anchors, **KW)
  assert isinstance(det, postprocess.Detections)
  assert det.boxes.shape == (3, 8, 4) and det.boxes.dtype == jnp.float32
  assert det.scores.shape == (3, 8) and det.scores.dtype == jnp.float32
  assert det.classes.shape == (3, 8) and det.classes.dtype == jnp.int32
  assert det.valid.shape == (3,) and det.valid.dtype == jnp.int32
  assert np.all(np.diff(np.asarray(det.scores), axis=1) <= 0)  # sorted, padding (0) last
  assert np.all((np.asarray(det.boxes) >= 0) & (np.asarray(det.boxes) <= 1))


# ---------------------------------------------------------------------------------------------
# Hand cases. Offsets are zero, so the decoded boxes are the anchors.

BOX_A = box_cxcywh(0.3, 0.3, 0.7, 0.7)
BOX_B = box_cxcywh(0.32, 0.3, 0.72, 0.7)  # IoU with A = 0.152 / 0.168 = 0.905
BOX_FAR = box_cxcywh(0.0, 0.8, 0.2, 1.0)  # disjoint from both


def run_hand(anchor_list, probs, **kw):
  anchors = np.asarray(anchor_list, np.float32)
  loc = np.zeros((1, len(anchors), 4), np.float32)
  return postprocess.detect(loc, logits_from_probs(probs)[None], anchors, **dict(KW, **kw))


def test_overlapping_boxes_same_class_keep_one():
  det = run_hand([BOX_A, BOX_B], [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
  assert int(det.valid[0]) == 1
  np.testing.assert_allclose(det.scores[0, 0], 0.8, atol=1e-6)
  assert int(det.classes[0, 0]) == 1
  np.testing.assert_allclose(det.boxes[0, 0], [0.3, 0.3, 0.7, 0.7], atol=1e-6)


def test_overlapping_boxes_below_nms_threshold_both_kept():
  det = run_hand([BOX_A, BOX_B], [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]], iou_threshold=0.95)
  assert int(det.valid[0]) == 2


def test_overlapping_boxes_different_classes_both_kept():
  det = run_hand([BOX_A, BOX_B], [[0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])
  assert int(det.valid[0]) == 2
  np.testing.assert_allclose(det.scores[0, :2], [0.8, 0.7], atol=1e-6)
  np.testing.assert_array_equal(det.classes[0, :2], [1, 2])
  np.testing.assert_allclose(det.boxes[0, :2], [[0.3, 0.3, 0.7, 0.7], [0.32, 0.3, 0.72, 0.7]],
                             atol=1e-6)


def test_score_threshold_honoured():
  probs = [[0.1, 0.8, 0.1], [0.2, 0.1, 0.7]]
  det = run_hand([BOX_A, BOX_B], probs, score_threshold=0.75)
  assert int(det.valid[0]) == 1
  np.testing.assert_allclose(det.scores[0, 0], 0.8, atol=1e-6)
  # Every other probability (0.1, 0.2, 0.1) is also above 0.05, yet background is never detected.
  det = run_hand([BOX_A, BOX_B], probs, score_threshold=0.05, iou_threshold=1.0)
  assert int(det.valid[0]) == 4
  assert set(np.asarray(det.classes[0, :4]).tolist()) == {1, 2}


def test_top_k_applies_before_nms():
  # Class 1: A (0.9) and B (0.8) overlap, FAR (0.7) is disjoint. With top_k=2 the candidates are
  # A and B; NMS removes B and FAR never gets in. With top_k=3 FAR survives.
  anchors = [BOX_A, BOX_B, BOX_FAR]
  probs = [[0.05, 0.9, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]
  det = run_hand(anchors, probs, top_k=2)
  assert int(det.valid[0]) == 1
  det = run_hand(anchors, probs, top_k=3)
  assert int(det.valid[0]) == 2
  np.testing.assert_allclose(det.scores[0, :2], [0.9, 0.7], atol=1e-6)
  np.testing.assert_allclose(det.boxes[0, 1], [0.0, 0.8, 0.2, 1.0], atol=1e-6)


def test_max_detections_honoured_and_padding():
  anchors = [box_cxcywh(0.0, 0.0, 0.2, 0.2), box_cxcywh(0.4, 0.4, 0.6, 0.6),
             box_cxcywh(0.8, 0.8, 1.0, 1.0)]
  probs = [[0.2, 0.7, 0.1], [0.05, 0.9, 0.05], [0.3, 0.1, 0.6]]
  det = run_hand(anchors, probs, max_detections=2)
  assert det.scores.shape == (1, 2)
  assert int(det.valid[0]) == 2
  np.testing.assert_allclose(det.scores[0], [0.9, 0.7], atol=1e-6)
  np.testing.assert_array_equal(det.classes[0], [1, 1])
  # More slots than the whole candidate pool ((C-1) * top_k = 6): padded with zeros.
  det = run_hand(anchors, probs, max_detections=10)
  assert det.scores.shape == (1, 10)
  assert int(det.valid[0]) == 3
  np.testing.assert_allclose(det.scores[0, :3], [0.9, 0.7, 0.6], atol=1e-6)
  np.testing.assert_array_equal(det.classes[0], [1, 1, 2] + [0] * 7)
  assert np.all(np.asarray(det.boxes[0, 3:]) == 0)


def test_top_k_larger_than_num_anchors():
  det = run_hand([BOX_A, BOX_FAR], [[0.1, 0.8, 0.1], [0.1, 0.7, 0.2]], top_k=400)
  assert int(det.valid[0]) == 3


def test_boxes_are_clipped_to_image():
  anchors = [[0.05, 0.5, 0.2, 0.2], [0.9, 0.95, 0.4, 0.2]]
  det = run_hand(anchors, [[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], score_threshold=0.5)
  assert int(det.valid[0]) == 2
  got = {int(c): np.asarray(b) for c, b in zip(det.classes[0, :2], det.boxes[0, :2])}
  np.testing.assert_allclose(got[1], [0.0, 0.4, 0.15, 0.6], atol=1e-6)
  np.testing.assert_allclose(got[2], [0.7, 0.85, 1.0, 1.0], atol=1e-6)


def test_all_below_threshold_is_empty_and_finite():
  loc, _, anchors = random_problem(0, 2, 40, 4)
  logits = np.zeros((2, 40, 4), np.float32)  # every probability is exactly 1/4
  # A score must exceed the threshold (torchvision: score > score_thresh).
  det = postprocess.detect(loc, logits, anchors, **dict(KW, score_threshold=0.25))
  np.testing.assert_array_equal(det.valid, [0, 0])
  for x in det:
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.asarray(det.scores) == 0) and np.all(np.asarray(det.classes) == 0)
  assert np.all(np.asarray(det.boxes) == 0)
  det = postprocess.detect(loc, logits, anchors, **dict(KW, score_threshold=0.24))
  assert np.all(np.asarray(det.valid) > 0)


def test_nms_threshold_is_strict():
  # Identical boxes have IoU exactly 1: suppressed only when IoU > iou_threshold.
  probs = [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]
  assert int(run_hand([BOX_A, BOX_A], probs, iou_threshold=1.0).valid[0]) == 2
  assert int(run_hand([BOX_A, BOX_A], probs, iou_threshold=0.99).valid[0]) == 1


def test_jit_equals_no_jit():
  loc, logits, anchors = random_problem(3, 2, 30, 3)  # small: the eager loop runs op by op
  fn = functools.partial(postprocess.detect, **dict(KW, top_k=6))
  jitted = jax.jit(fn)(loc, logits, anchors)
  with jax.disable_jit():
    eager = fn(loc, logits, anchors)
  np.testing.assert_array_equal(jitted.valid, eager.valid)
  np.testing.assert_array_equal(jitted.classes, eager.classes)
  np.testing.assert_allclose(jitted.scores, eager.scores, atol=1e-6)
  np.testing.assert_allclose(jitted.boxes, eager.boxes, atol=1e-6)


def test_batch_equals_per_image():
  loc, logits, anchors = random_problem(4, 3, 70, 5)
  det = postprocess.detect(loc, logits, anchors, **KW)
  for b in range(3):
    one = postprocess.detect(loc[b:b + 1], logits[b:b + 1], anchors, **KW)
    for x, y in zip(det, one):
      np.testing.assert_allclose(np.asarray(x[b]), np.asarray(y[0]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: such a candidate is dropped, never detected and never takes a top-k slot.


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_offsets_are_never_detected(bad_value):
  kw = dict(score_threshold=0.2, iou_threshold=0.5, top_k=25, max_detections=30)
  loc, logits, anchors = random_problem(0, 2, 60, 4)
  # Image 0's anchors with the highest foreground probability, i.e. its likely top detections;
  # each gets one bad offset, every coordinate in turn (-inf on a size decodes to a zero-width box).
  fg_best = np_softmax(logits[0].astype(np.float64))[:, 1:].max(-1)
  bad = np.argsort(-fg_best)[:6]
  bad_loc = loc.copy()
  bad_loc[0, bad, np.arange(len(bad)) % 4] = bad_value
  det = postprocess.detect(bad_loc, logits, anchors, **kw)

  # Independent removal: the same anchors with (finite offsets and) no foreground probability.
  removed_logits = logits.copy()
  removed_logits[0, bad, 0] = 0.0
  removed_logits[0, bad, 1:] = -1e4  # exp(-1e4) is exactly 0 in float32
  want = postprocess.detect(loc, removed_logits, anchors, **kw)
  for got, expected in zip(det, want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

  n = int(det.valid[0])
  assert n > 0
  assert np.all(np.isfinite(np.asarray(det.boxes))) and np.all(np.isfinite(np.asarray(det.scores)))
  # The test bites: on the clean input some of those anchors are detections.
  clean = postprocess.detect(loc, logits, anchors, **kw)
  bad_boxes = np_decode_clip(loc[0, bad].astype(np.float64), anchors[bad].astype(np.float64),
                             (0.1, 0.2))
  clean_boxes = np.asarray(clean.boxes[0, :int(clean.valid[0])])
  assert np.any(np.abs(clean_boxes[:, None] - bad_boxes[None]).max(-1) < 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_non_finite_logits_do_not_hide_real_detections(seed):
  kw = dict(score_threshold=0.2, iou_threshold=0.5, top_k=5, max_detections=30)
  num_anchors, c = 80, 2
  loc, logits, anchors = random_problem(seed, 1, num_anchors, 4)
  # Class c's strongest anchors get non-finite logits. A NaN or +inf logit makes the anchor's whole
  # softmax row NaN, so it drops out of every class; -inf is probability exactly 0 for class c.
  order = np.argsort(-logits[0, :, c])
  nan_idx, pos_inf_idx, neg_inf_idx = order[0:3], order[3:6], order[6:9]
  bad_logits = logits.copy()
  bad_logits[0, nan_idx, c] = np.nan
  bad_logits[0, pos_inf_idx, c] = np.inf
  bad_logits[0, neg_inf_idx, c] = -np.inf
  det = postprocess.detect(loc, bad_logits, anchors, **kw)

  undefined = np.concatenate([nan_idx, pos_inf_idx])
  rest = np.setdiff1d(np.arange(num_anchors), undefined)
  stats = dict(topk_binds=False, nms_suppressed=False, max_det_binds=False)
  ref = np_detect_one(loc[0, rest], bad_logits[0, rest], anchors[rest], stats=stats, **kw)
  assert_matches_reference(det, 0, ref, kw["max_detections"])
  assert stats["topk_binds"]  # else a stolen top-k slot would hide nothing
  # Class c's real detections come out: those of the input without any of the nine anchors.
  rest = np.setdiff1d(rest, neg_inf_idx)
  ref_boxes, ref_scores, ref_classes = np_detect_one(loc[0, rest], logits[0, rest], anchors[rest],
                                                     **kw)
  assert np.sum(ref_classes == c) > 0
  is_c = np.asarray(det.classes[0]) == c
  np.testing.assert_allclose(np.asarray(det.scores[0])[is_c], ref_scores[ref_classes == c],
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(det.boxes[0])[is_c], ref_boxes[ref_classes == c],
                             atol=1e-5)


@pytest.mark.parametrize("which", ["loc", "logits", "anchors", "all"])
def test_all_nan_input_detects_nothing(which):
  loc, logits, anchors = random_problem(0, 2, 40, 4)
  args = dict(loc=loc, logits=logits, anchors=anchors)
  for name in (args if which == "all" else [which]):
    args[name] = np.full_like(args[name], np.nan)
  det = postprocess.detect(args["loc"], args["logits"], args["anchors"], **KW)
  np.testing.assert_array_equal(det.valid, [0, 0])
  for x in det:
    assert np.all(np.asarray(x) == 0)


def test_non_finite_jit_equals_no_jit():
  loc, logits, anchors = random_problem(5, 2, 30, 3)  # small: the eager loop runs op by op
  best = np.argsort(-np_softmax(logits[0].astype(np.float64))[:, 1:].max(-1))[:4]
  loc[0, best, 0] = np.nan
  loc[1, 5:8, 3] = np.inf
  logits[0, 10:14, 1] = np.nan
  logits[1, :3, 2] = np.inf
  logits[1, 20:24, 1] = -np.inf
  fn = functools.partial(postprocess.detect, **dict(KW, top_k=6))
  jitted = jax.jit(fn)(loc, logits, anchors)
  with jax.disable_jit():
    eager = fn(loc, logits, anchors)
  assert np.all(np.asarray(jitted.valid) > 0)
  np.testing.assert_array_equal(jitted.valid, eager.valid)
  np.testing.assert_array_equal(jitted.classes, eager.classes)
  np.testing.assert_allclose(jitted.scores, eager.scores, atol=1e-6)  # fusion changes the last ulp
  np.testing.assert_allclose(jitted.boxes, eager.boxes, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(jitted.boxes)))


# ---------------------------------------------------------------------------------------------
# Bit-identity with the dense implementation. detect gathers the candidates of an image with few
# of them into a sparse path; reference_detect is detect's code from before that (one dense path
# for every image), whose output every path must reproduce bit for bit.


def _reference_greedy_keep(boxes_sorted, valid, iou_threshold: float):
  k = boxes_sorted.shape[0]
  overlaps = jnp.triu(boxes_lib.iou(boxes_sorted, boxes_sorted) > iou_threshold, 1)  # [K, K]

  def body(i, keep):
    return keep & ~(overlaps[i] & keep[i])  # [K]

  return jax.lax.fori_loop(0, k, body, valid)


def _reference_detect_one(loc, logits, anchors, *, score_threshold, iou_threshold, top_k,
                          max_detections, variances):
  num_anchors, num_classes = logits.shape
  k = min(top_k, num_anchors)
  decoded = boxes_lib.decode(loc, anchors, variances)  # [A, 4] xyxy, unclipped
  box_ok = jnp.all(jnp.isfinite(decoded) & jnp.isfinite(loc), axis=-1)  # [A]
  boxes = jnp.where(box_ok[:, None], boxes_lib.clip(decoded), 0.0)  # [A, 4] xyxy
  probs = jax.nn.softmax(logits, axis=-1)  # [A, C]
  fg_scores = probs[:, 1:].T  # [C-1, A]
  fg_scores = jnp.where(box_ok[None, :] & jnp.isfinite(fg_scores), fg_scores, -jnp.inf)
  cand_scores, cand_idx = jax.lax.top_k(fg_scores, k)  # [C-1, K], descending
  cand_boxes = boxes[cand_idx]  # [C-1, K, 4]
  cand_valid = cand_scores > score_threshold  # [C-1, K]
  keep = jax.vmap(functools.partial(_reference_greedy_keep, iou_threshold=iou_threshold))(
      cand_boxes, cand_valid)  # [C-1, K]
  pool_scores = jnp.where(keep, cand_scores, -1.0).reshape(-1)  # [(C-1) * K]
  pool_keep = keep.reshape(-1)
  pool_boxes = cand_boxes.reshape(-1, 4)
  pool_classes = jnp.repeat(jnp.arange(1, num_classes, dtype=jnp.int32), k)
  d = min(max_detections, pool_scores.shape[0])
  top_scores, top_idx = jax.lax.top_k(pool_scores, d)  # [d]
  is_det = pool_keep[top_idx]  # [d], real detections first
  pad = max_detections - d
  det_boxes = jnp.pad(jnp.where(is_det[:, None], pool_boxes[top_idx], 0.0), ((0, pad), (0, 0)))
  det_scores = jnp.pad(jnp.where(is_det, top_scores, 0.0), (0, pad))
  det_classes = jnp.pad(jnp.where(is_det, pool_classes[top_idx], 0), (0, pad))
  return postprocess.Detections(det_boxes, det_scores, det_classes,
                                is_det.sum().astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("score_threshold", "iou_threshold", "top_k",
                                             "max_detections", "variances"))
def reference_detect(loc, logits, anchors, *, variances=(0.1, 0.2), **kwargs):
  return jax.vmap(functools.partial(_reference_detect_one, variances=variances, **kwargs),
                  in_axes=(0, 0, None))(loc, logits, anchors)


def assert_bitwise_equal(got, want):
  for name, g, w in zip(postprocess.Detections._fields, got, want):
    g, w = np.atleast_1d(np.asarray(g)), np.atleast_1d(np.asarray(w))
    assert (g.shape, g.dtype) == (w.shape, w.dtype), name
    np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=name)


# Image backgrounds raised by these logits: from many candidates (151 at threshold 0.2) to none.
MIXED_BACKGROUND = (0.0, 2.5, 7.0, 1.5, 2.0, 50.0)


def mixed_batch(seed=0, num_anchors=120, num_classes=5):
  """Six images from many candidates to none; image 3 has exact ties, image 4 NaN and inf."""
  loc, logits, anchors = random_problem(seed, len(MIXED_BACKGROUND), num_anchors, num_classes)
  rng = np.random.default_rng(seed + 100)
  logits[:, :, 0] += np.asarray(MIXED_BACKGROUND, np.float32)[:, None]
  # Image 3: integer logits; anchors 100-109 repeat 0-9 with their offsets and logits (equal
  # boxes and scores), anchors 60-69 the logits of 10-19 (equal scores, other boxes), and classes
  # 1 and 2 score alike on anchors 20-39 (equal scores, same box).
  anchors[100:110] = anchors[:10]
  logits[3] = np.round(logits[3])
  logits[3, 100:110] = logits[3, :10]
  loc[3, 100:110] = loc[3, :10]
  logits[3, 60:70] = logits[3, 10:20]
  logits[3, 20:40, 2] = logits[3, 20:40, 1]
  # Image 4: non-finite offsets and logits.
  bad = rng.choice([np.nan, np.inf, -np.inf], 20)
  loc[4, rng.choice(num_anchors, 10, replace=False), rng.integers(0, 4, 10)] = bad[:10]
  logits[4, rng.choice(num_anchors, 10, replace=False), rng.integers(0, num_classes, 10)] = bad[10:]
  return loc, logits, anchors


def candidate_counts(logits, loc, score_threshold):
  """[B] number of (anchor, class >= 1) pairs scoring above the threshold, NumPy.

  For offsets that decode to finite boxes wherever they are finite (true of mixed_batch's).
  """
  with np.errstate(invalid="ignore"):
    probs = np_softmax(logits.astype(np.float64))[..., 1:]  # NaN rows where a logit is NaN or inf
  box_ok = np.all(np.isfinite(loc), axis=-1)
  return np.sum((probs > score_threshold) & box_ok[..., None], axis=(1, 2))


KW_BINDING = dict(score_threshold=0.2, iou_threshold=0.5, top_k=6, max_detections=10)


@pytest.mark.parametrize("kw,capacities", [
    (KW_BINDING, (16, 128)),  # every path; top_k and max_detections bind
    (KW_BINDING, ()),  # the dense path alone
    (KW_BINDING, None),  # the default capacities
    # max_detections above the smaller capacity: the sparse paths pad.
    (dict(score_threshold=0.05, iou_threshold=0.3, top_k=40, max_detections=100), (16, 128)),
    # Every pair a candidate, nothing suppressed (IoU > 1 is impossible): the number of detections
    # counts the top-k slots exactly. Default capacities: one sparse path for all 480 pairs.
    (dict(score_threshold=0.0, iou_threshold=1.0, top_k=7, max_detections=50), None),
    (dict(score_threshold=0.0, iou_threshold=1.0, top_k=1, max_detections=3), None),
])
def test_every_path_reproduces_the_dense_implementation(kw, capacities):
  loc, logits, anchors = mixed_batch()
  want = reference_detect(loc, logits, anchors, **kw)
  if capacities is None:
    assert_bitwise_equal(postprocess.detect(loc, logits, anchors, **kw), want)
    return
  # CPU: image by image, each on the path its own candidates need.
  assert_bitwise_equal(postprocess._detect(loc, logits, anchors, variances=(0.1, 0.2),
                                           capacities=capacities, **kw), want)
  if not capacities:
    return
  # Accelerators: the whole batch on the path of its fullest image.
  batched = jax.jit(functools.partial(postprocess._detect_batched, variances=(0.1, 0.2),
                                      capacities=capacities, **kw))
  assert_bitwise_equal(batched(loc, logits, anchors), want)
  if kw is KW_BINDING:
    counts = candidate_counts(logits, loc, kw["score_threshold"])
    paths = np.searchsorted(np.asarray(capacities), counts)  # index of the path each image takes
    assert set(paths.tolist()) == set(range(len(capacities) + 1)), counts
    assert counts.min() == 0 and 0 < counts[2] <= capacities[0]
    for b in range(len(loc)):  # each image alone, on its own path
      one = (loc[b:b + 1], logits[b:b + 1], anchors)
      assert_bitwise_equal(batched(*one), reference_detect(*one, **kw))


def test_sparse_path_at_its_capacity_and_over_top_k():
  """One image whose candidate count equals the capacity; one class holds most of them."""
  rng = np.random.default_rng(3)
  num_anchors, num_fg = 50, 3
  xy = rng.uniform(0.0, 0.6, (num_anchors, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (num_anchors, 2))], -1)
  boxes[30:40] = boxes[:10]  # duplicate boxes
  # Quantized scores: many exact ties; class 0 has 40 candidates, more than top_k.
  scores = rng.integers(0, 8, (num_anchors, num_fg)) / 8.0
  scores[:40, 0] = rng.integers(3, 8, 40) / 8.0
  scores[rng.uniform(size=scores.shape) < 0.05] = -np.inf
  boxes, scores = jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32)
  kw = dict(score_threshold=0.3, iou_threshold=0.4, top_k=12, max_detections=20)
  per_anchor = postprocess._candidates_per_anchor(scores, kw["score_threshold"])
  count = int(per_anchor.sum())
  assert count > kw["top_k"]
  dense = jax.jit(functools.partial(postprocess._select_dense, **kw))(boxes, scores, per_anchor)
  assert int(dense.valid) > 0
  for capacity in (count, count + 1):
    sparse = jax.jit(functools.partial(postprocess._select_sparse, capacity=capacity, **kw))
    assert_bitwise_equal(sparse(boxes, scores, per_anchor), dense)


def test_sparse_path_suppresses_across_the_whole_top_k():
  # Class 1 ranks anchors 0..7; top_k = 5 keeps anchors 0-4, and anchor 4 repeats anchor 0's box
  # (the farthest apart two candidates of one top k can be); the other boxes are disjoint.
  top_k = 5
  boxes = np.asarray([[0.1 * i, 0.0, 0.1 * i + 0.05, 0.05] for i in range(8)], np.float32)
  boxes[4] = boxes[0]
  scores = np.full((8, 2), -np.inf, np.float32)
  scores[:, 0] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.44, 0.43]
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  kw = dict(score_threshold=0.1, iou_threshold=0.5, top_k=top_k, max_detections=6)
  per_anchor = postprocess._candidates_per_anchor(scores, kw["score_threshold"])
  dense = jax.jit(functools.partial(postprocess._select_dense, **kw))(boxes, scores, per_anchor)
  np.testing.assert_array_equal(dense.scores, np.float32([0.9, 0.8, 0.7, 0.6, 0, 0]))
  for capacity in (8, 16):
    sparse = jax.jit(functools.partial(postprocess._select_sparse, capacity=capacity, **kw))
    assert_bitwise_equal(sparse(boxes, scores, per_anchor), dense)


def test_ssd300_coco_sizes_take_each_path():
  """A = 8732 anchors, 91 classes: a trained-like image, one with thousands of candidates, and
  random logits (the dense path)."""
  loc, logits, anchors = random_problem(0, 3, 8732, 91)
  logits[:, :, 0] += np.asarray([15.0, 12.0, 0.0], np.float32)[:, None]
  kw = dict(score_threshold=0.01, iou_threshold=0.45, top_k=400, max_detections=200)
  counts = candidate_counts(logits, loc, kw["score_threshold"])
  paths = np.searchsorted(np.asarray(postprocess._CAPACITIES), counts)
  assert paths.tolist() == [0, 1, 2], counts
  assert_bitwise_equal(postprocess.detect(loc, logits, anchors, **kw),
                       reference_detect(loc, logits, anchors, **kw))


def test_under_vmap_and_jit():
  loc, logits, anchors = mixed_batch(seed=1)
  loc, logits = np.stack([loc, loc[::-1]]), np.stack([logits, logits[::-1]])  # [2, B, ...]
  fn = lambda ref: jax.jit(jax.vmap(lambda l, g: ref(l, g, anchors, **KW_BINDING)))
  assert_bitwise_equal(fn(postprocess.detect)(loc, logits), fn(reference_detect)(loc, logits))


def test_exported_for_cpu_and_cuda_with_symbolic_batch():
  loc, logits, anchors = mixed_batch(seed=2)
  batch = jax.export.symbolic_shape("b")[0]
  exported = jax.export.export(
      jax.jit(lambda l, g, a: tuple(postprocess.detect(l, g, a, **KW_BINDING))),
      platforms=("cpu", "cuda"))(
          jax.ShapeDtypeStruct((batch,) + loc.shape[1:], jnp.float32),
          jax.ShapeDtypeStruct((batch,) + logits.shape[1:], jnp.float32),
          jax.ShapeDtypeStruct(anchors.shape, jnp.float32))
  exported = jax.export.deserialize(exported.serialize())
  assert_bitwise_equal(exported.call(loc, logits, anchors),
                       reference_detect(loc, logits, anchors, **KW_BINDING))


def test_paths_for_small_and_large_problems():
  kw = KW_BINDING
  capacities, paths = postprocess._paths((256, 4096), 10**6, **kw)
  assert capacities == (256, 4096) and len(paths) == 3  # then the dense path
  capacities, paths = postprocess._paths((256, 4096), 500, **kw)
  assert capacities == (500,) and len(paths) == 1  # 500 slots hold every pair
  capacities, paths = postprocess._paths((256, 4096), 4096, **kw)
  assert capacities == (4096,) and len(paths) == 1
  capacities, paths = postprocess._paths((), 500, **kw)
  assert capacities == () and len(paths) == 1
  index = [int(postprocess._path_index(jnp.float32(c), (256, 4096)))
           for c in (0, 256, 257, 4096, 4097)]
  assert index == [0, 0, 1, 1, 2]


# ---------------------------------------------------------------------------------------------
# Argument validation and config.


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_detections=0), "max_detections"),
    (dict(score_threshold=-0.1), "score_threshold"),
    (dict(score_threshold=float("nan")), "score_threshold"),
    (dict(iou_threshold=1.5), "iou_threshold"),
    (dict(variances=(0.1,)), "variances"),
])
def test_detect_rejects_bad_arguments(kw, match):
  loc, logits, anchors = random_problem(0, 1, 20, 3)
  with pytest.raises(ValueError, match=match):
    postprocess.detect(loc, logits, anchors, **dict(KW, **kw))


@pytest.mark.parametrize("which,shape,match", [
    ("loc", (1, 20, 3), "loc"),
    ("loc", (20, 4), "loc"),
    ("logits", (1, 21, 3), "logits"),
    ("logits", (1, 20, 1), "C >= 2"),
    ("anchors", (19, 4), "anchors"),
    ("anchors", (20, 2), "anchors"),
])
def test_detect_rejects_inconsistent_shapes(which, shape, match):
  args = dict(zip(("loc", "logits", "anchors"), random_problem(0, 1, 20, 3)))
  args[which] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match=match):
    postprocess.detect(args["loc"], args["logits"], args["anchors"], **KW)


def test_from_config():
  config = ssd300_voc.get_config()
  kw = postprocess.from_config(config)
  assert kw == dict(score_threshold=config.postprocess.score_threshold,
                    iou_threshold=config.postprocess.iou_threshold,
                    top_k=config.postprocess.top_k,
                    max_detections=config.postprocess.max_detections,
                    variances=tuple(config.anchors.variances))
  loc, logits, anchors = random_problem(0, 1, 30, 3)
  det = postprocess.detect(loc, logits, anchors, **kw)
  assert det.scores.shape == (1, config.postprocess.max_detections)


# ---------------------------------------------------------------------------------------------
# Single-class nms.


def test_nms_hand_case():
  boxes = np.asarray([[0.3, 0.3, 0.7, 0.7], [0.0, 0.8, 0.2, 1.0], [0.32, 0.3, 0.72, 0.7]],
                     np.float32)
  scores = np.asarray([0.8, 0.6, 0.9], np.float32)
  idx = postprocess.nms(boxes, scores, iou_threshold=0.5, max_output=4)
  assert idx.dtype == jnp.int32
  np.testing.assert_array_equal(idx, [2, 1, -1, -1])
  idx = postprocess.nms(boxes, scores, iou_threshold=0.95, max_output=2)  # truncated
  np.testing.assert_array_equal(idx, [2, 0])
  idx = postprocess.nms(boxes, scores, iou_threshold=0.5, max_output=4,
                        valid=np.asarray([True, True, False]))
  np.testing.assert_array_equal(idx, [0, 1, -1, -1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0.0, 0.6, (60, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (60, 2))], -1).astype(np.float32)
  scores = rng.uniform(size=60).astype(np.float32)
  ref = np_nms(boxes.astype(np.float64), scores.astype(np.float64), 0.4)
  assert 1 < len(ref) < 60
  idx = np.asarray(jax.jit(functools.partial(postprocess.nms, iou_threshold=0.4,
                                             max_output=60))(boxes, scores))
  np.testing.assert_array_equal(idx[:len(ref)], ref)
  assert np.all(idx[len(ref):] == -1)


def test_nms_vmaps():
  rng = np.random.default_rng(5)
  xy = rng.uniform(0.0, 0.6, (3, 20, 2))
  boxes = np.concatenate([xy, xy + 0.3], -1).astype(np.float32)
  scores = rng.uniform(size=(3, 20)).astype(np.float32)
  fn = functools.partial(postprocess.nms, iou_threshold=0.3, max_output=20)
  batched = jax.vmap(fn)(boxes, scores)
  for b in range(3):
    np.testing.assert_array_equal(batched[b], fn(boxes[b], scores[b]))


@pytest.mark.parametrize("kw,match", [
    (dict(iou_threshold=-1.0), "iou_threshold"),
    (dict(max_output=0), "max_output"),
    (dict(boxes=np.zeros((5, 3))), "boxes"),
    (dict(scores=np.zeros(4)), "scores"),
    (dict(valid=np.ones(3, bool)), "valid"),
])
def test_nms_rejects_bad_arguments(kw, match):
  args = dict(boxes=np.zeros((5, 4), np.float32), scores=np.zeros(5, np.float32),
              iou_threshold=0.5, max_output=3)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    postprocess.nms(**args)
