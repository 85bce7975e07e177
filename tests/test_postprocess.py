"""Tests for ssdjax.postprocess against a plain NumPy port of torchvision's SSD post-processing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ssd300_voc
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
