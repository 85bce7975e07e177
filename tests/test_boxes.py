"""Tests for ssdjax.boxes: hand-computed values, a NumPy IoU reference and invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdjax import boxes


def random_xyxy(rng, n):
  """[n, 4] valid normalized xyxy boxes."""
  xy = rng.uniform(0.0, 0.7, (n, 2))
  wh = rng.uniform(0.01, 0.3, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def random_anchors(rng, n):
  """[n, 4] cxcywh anchors."""
  return np.concatenate([rng.uniform(0.1, 0.9, (n, 2)),
                         rng.uniform(0.05, 0.6, (n, 2))], -1).astype(np.float32)


def np_iou(a, b):
  """Double loop over pairs, float64."""
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(np.asarray(a, np.float64)):
    for j, q in enumerate(np.asarray(b, np.float64)):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
      out[i, j] = iw * ih / union
  return out


# ---------------------------------------------------------------------------------------------
# IoU.


@pytest.mark.parametrize("a,b,expected", [
    ((0.1, 0.2, 0.5, 0.6), (0.1, 0.2, 0.5, 0.6), 1.0),              # identical
    ((0.0, 0.0, 0.2, 0.2), (0.5, 0.5, 0.9, 0.9), 0.0),              # disjoint
    ((0.0, 0.0, 0.2, 0.2), (0.2, 0.0, 0.4, 0.2), 0.0),              # touching edges
    ((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5), 1.0 / 3.0),      # shifted by half: .125/.375
    ((0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75), 0.25),         # contained: .25/1
    ((0.0, 0.0, 0.4, 0.2), (0.2, 0.0, 0.4, 0.4), 0.04 / 0.12),      # partial, different shapes
])
def test_iou_hand_computed(a, b, expected):
  got = boxes.iou(jnp.asarray([a]), jnp.asarray([b]))
  assert got.shape == (1, 1)
  np.testing.assert_allclose(got[0, 0], expected, atol=1e-6)


def test_iou_matches_numpy_and_is_symmetric():
  rng = np.random.default_rng(0)
  a, b = random_xyxy(rng, 7), random_xyxy(rng, 5)
  ab = np.asarray(boxes.iou(a, b))
  assert ab.shape == (7, 5)
  np.testing.assert_allclose(ab, np_iou(a, b), atol=1e-6)
  np.testing.assert_allclose(ab, np.asarray(boxes.iou(b, a)).T, atol=1e-7)
  np.testing.assert_allclose(np.diag(np.asarray(boxes.iou(a, a))), 1.0, atol=1e-6)
  assert np.all((ab >= 0) & (ab <= 1))


DEGENERATE = np.asarray([
    [0.5, 0.5, 0.5, 0.5],   # a point
    [0.2, 0.3, 0.2, 0.6],   # zero width
    [0.6, 0.6, 0.4, 0.4],   # inverted
    [0.3, 0.7, 0.5, 0.2],   # inverted in y only
    [0.5, 0.3, 0.4, 0.6],   # inverted in x only
], np.float32)
GOOD = np.asarray([[0.0, 0.0, 1.0, 1.0], [0.45, 0.45, 0.55, 0.55]], np.float32)


@pytest.mark.parametrize("use_jit", [False, True])
def test_iou_degenerate_is_zero_not_nan(use_jit):
  fn = jax.jit(boxes.iou) if use_jit else boxes.iou
  for a, b in [(DEGENERATE, DEGENERATE), (DEGENERATE, GOOD), (GOOD, DEGENERATE)]:
    got = np.asarray(fn(a, b))
    np.testing.assert_array_equal(got, np.zeros((len(a), len(b))))


def test_iou_grad_finite_on_degenerate_boxes():
  both = np.concatenate([DEGENERATE, GOOD])
  grad = jax.jit(jax.grad(lambda a: boxes.iou(a, both).sum()))(both)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_iou_empty():
  assert boxes.iou(np.zeros((0, 4), np.float32), GOOD).shape == (0, 2)
  assert boxes.iou(GOOD, np.zeros((0, 4), np.float32)).shape == (2, 0)


def test_area():
  got = boxes.area(jnp.asarray([[0.1, 0.2, 0.5, 0.8], [0.6, 0.6, 0.4, 0.4], [0.6, 0.2, 0.4, 0.4],
                                [0.2, 0.6, 0.4, 0.4]]))
  np.testing.assert_allclose(got, [0.24, 0.0, 0.0, 0.0], atol=1e-7)


def test_clip():
  np.testing.assert_allclose(boxes.clip(jnp.asarray([[-0.1, 0.2, 1.3, 0.8]])),
                             [[0.0, 0.2, 1.0, 0.8]])


# ---------------------------------------------------------------------------------------------
# Formats.


def test_format_hand_values():
  xyxy = jnp.asarray([0.1, 0.2, 0.5, 0.8])
  cxcywh = jnp.asarray([0.3, 0.5, 0.4, 0.6])
  np.testing.assert_allclose(boxes.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-7)
  np.testing.assert_allclose(boxes.cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-7)


def test_format_round_trips_with_batch_axes():
  rng = np.random.default_rng(1)
  xyxy = random_xyxy(rng, 12).reshape(3, 4, 4)
  np.testing.assert_allclose(boxes.cxcywh_to_xyxy(boxes.xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-6)
  cxcywh = random_anchors(rng, 12).reshape(2, 6, 4)
  np.testing.assert_allclose(boxes.xyxy_to_cxcywh(boxes.cxcywh_to_xyxy(cxcywh)), cxcywh, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Encode / decode.


def test_encode_hand_computed():
  anchor = np.asarray([[0.5, 0.5, 0.2, 0.4]], np.float32)  # cxcywh
  box = np.asarray([[0.37, 0.36, 0.67, 0.56]], np.float32)  # cxcywh (0.52, 0.46, 0.3, 0.2)
  expected = [0.02 / 0.2 / 0.1, -0.04 / 0.4 / 0.1, math.log(0.3 / 0.2) / 0.2,
              math.log(0.2 / 0.4) / 0.2]  # = [1, -1, 2.027, -3.466]
  np.testing.assert_allclose(boxes.encode(box, anchor, (0.1, 0.2))[0], expected, atol=1e-5)
  np.testing.assert_allclose(boxes.encode(box, anchor)[0], expected, atol=1e-5)  # same defaults
  np.testing.assert_allclose(boxes.decode(np.asarray([expected], np.float32), anchor)[0], box[0],
                             atol=1e-6)


def test_encode_decode_round_trip():
  rng = np.random.default_rng(2)
  anchors = random_anchors(rng, 50)
  gt = random_xyxy(rng, 2 * 50).reshape(2, 50, 4)  # with a leading batch axis
  for variances in [(0.1, 0.2), (0.2, 0.5)]:
    loc = boxes.encode(gt, anchors, variances)
    assert loc.shape == (2, 50, 4)
    np.testing.assert_allclose(boxes.decode(loc, anchors, variances), gt, atol=1e-5)
  loc = rng.normal(0.0, 1.0, (50, 4)).astype(np.float32)
  np.testing.assert_allclose(boxes.encode(boxes.decode(loc, anchors), anchors), loc, atol=1e-4)


def test_decode_of_zero_offsets_is_the_anchor():
  rng = np.random.default_rng(3)
  anchors = random_anchors(rng, 6)
  np.testing.assert_allclose(boxes.decode(np.zeros((6, 4), np.float32), anchors),
                             boxes.cxcywh_to_xyxy(anchors), atol=1e-7)


def test_encode_degenerate_boxes_finite():
  anchors = np.tile(np.asarray([[0.5, 0.5, 0.2, 0.2]], np.float32), (len(DEGENERATE), 1))
  loc = jax.jit(boxes.encode)(DEGENERATE, anchors)
  assert np.all(np.isfinite(np.asarray(loc)))
  grad = jax.grad(lambda b: boxes.encode(b, anchors).sum())(DEGENERATE)
  assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------------------------------------
# Host-side validation.


def test_validate_boxes_accepts_good_boxes():
  good = [[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]]
  out = boxes.validate_boxes(good)
  assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 4)
  np.testing.assert_allclose(out, good)
  # Float round-off just outside [0, 1] is accepted and clipped.
  np.testing.assert_array_equal(boxes.validate_boxes([[-1e-7, 0.0, 1.0 + 1e-7, 1.0]]),
                                [[0.0, 0.0, 1.0, 1.0]])


@pytest.mark.parametrize("value", [[], np.zeros((0, 4)), np.zeros((0,))])
def test_validate_boxes_empty(value):
  out = boxes.validate_boxes(value)
  assert out.shape == (0, 4) and out.dtype == np.float32


@pytest.mark.parametrize("bad,match", [
    ([[0.1, 0.1, 0.2, 0.2], [0.1, np.nan, 0.2, 0.2]], r"gt_boxes\[1\].*NaN or inf"),
    ([[0.1, 0.1, np.inf, 0.2]], r"gt_boxes\[0\].*NaN or inf"),
    ([[0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 1.5, 0.2]],
     r"gt_boxes\[2\].*outside \[0, 1\]"),
    ([[-0.2, 0.1, 0.2, 0.2]], r"outside \[0, 1\].*divide pixel coordinates"),
    ([[0.5, 0.1, 0.2, 0.2]], r"gt_boxes\[0\].*xmin > xmax"),
    ([[0.1, 0.5, 0.2, 0.2]], r"gt_boxes\[0\].*ymin > ymax"),
    ([[0.1, 0.2, 0.1, 0.5]], r"gt_boxes\[0\].*zero area"),
    ([[0.1, 0.2, 0.3]], r"gt_boxes must have shape \[N, 4\].*\(1, 3\)"),
    ([0.1, 0.2, 0.3, 0.4], r"gt_boxes must have shape \[N, 4\].*\(4,\)"),
    (np.zeros((2, 2, 4)), r"shape \[N, 4\]"),
])
def test_validate_boxes_rejects_with_informative_message(bad, match):
  with pytest.raises(ValueError, match=match):
    boxes.validate_boxes(bad, name="gt_boxes")


def test_validate_boxes_names_where():
  with pytest.raises(ValueError, match=r"^Annotations/000005\.xml: boxes\[0\]"):
    boxes.validate_boxes([[0.3, 0.3, 0.1, 0.1]], where="Annotations/000005.xml")
