"""Inference post-processing: decode, per-class top-k, class-aware NMS, all with static shapes.

:func:`detect` follows torchvision's ``SSD.postprocess_detections`` (and Caffe's
``DetectionOutput``): decode the box offsets against the anchors, clip to the image, softmax over
classes, and for each foreground class keep the scores above ``score_threshold``, take that class's
``top_k`` best, run greedy NMS within the class, and finally keep the ``max_detections`` best over
all classes. Everything runs for the whole batch inside one ``jit`` and returns padded,
fixed-size :class:`Detections`, so it runs on device and exports. Non-finite candidates (a NaN or
inf box or score, e.g. from a diverged model) are masked out before the top-k, never detected.

Memory: NMS builds one boolean overlap matrix ``[K, K]`` per image and class, ``K = min(top_k, A)``,
so the batch holds ``B * (C - 1) * K^2`` bytes at once (the float IoU is fused into the comparison).
SSD300 COCO with ``top_k=400``: 12.8 MB per image, 410 MB for a batch of 32. Lower the batch or
``top_k`` if that does not fit.

:func:`nms` is the single-class greedy NMS on its own, for research code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssdjax import boxes as boxes_lib


class Detections(NamedTuple):
  """Padded detections for a batch; the real ones come first, sorted by score (descending).

  Attributes:
    boxes: [B, D, 4] float32 xyxy, normalized, clipped to [0, 1]; padding rows are 0.
    scores: [B, D] float32 class probabilities; padding rows are 0.
    classes: [B, D] int32 in 1..C-1 (0 = background is never detected); padding rows are 0.
    valid: [B] int32, number of real detections per image (rows ``[:valid]``).
  """
  boxes: jax.Array
  scores: jax.Array
  classes: jax.Array
  valid: jax.Array


def _check_unit(name: str, value) -> float:
  """A Python number in [0, 1]; thresholds are static (they pick the compiled program)."""
  try:
    v = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a Python number in [0, 1] (it is static under jit); "
                     f"got {value!r}") from e
  if not 0.0 <= v <= 1.0:  # also rejects NaN
    raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
  return v


def _check_count(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
  return int(value)


def _greedy_keep(boxes_sorted, valid, iou_threshold: float):
  """Greedy NMS over candidates already sorted by decreasing score.

  Args:
    boxes_sorted: [K, 4] xyxy, normalized, in decreasing score order.
    valid: [K] bool; invalid candidates are never kept and suppress nothing.
    iou_threshold: a candidate is suppressed by a kept, higher-scoring one with IoU > this.

  Returns:
    [K] bool keep mask.
  """
  k = boxes_sorted.shape[0]
  # Only a higher-scoring (earlier) box may suppress a later one: keep the strict upper triangle.
  overlaps = jnp.triu(boxes_lib.iou(boxes_sorted, boxes_sorted) > iou_threshold, 1)  # [K, K]

  def body(i, keep):
    # keep[i] is final at step i: every box that could suppress it (j < i) has been visited.
    return keep & ~(overlaps[i] & keep[i])  # [K]

  return lax.fori_loop(0, k, body, valid)


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output"))
def _nms(boxes, scores, valid, *, iou_threshold: float, max_output: int):
  order = jnp.argsort(-scores, stable=True)  # [N], highest score first
  keep = _greedy_keep(boxes[order], valid[order], iou_threshold)  # [N], in sorted order
  pos = jnp.nonzero(keep, size=max_output, fill_value=-1)[0]  # [max_output] sorted positions
  return jnp.where(pos >= 0, order[pos], -1).astype(jnp.int32)


def nms(boxes, scores, *, iou_threshold: float, max_output: int, valid=None):
  """Single-class greedy NMS with static shapes (jit- and vmap-friendly).

  Args:
    boxes: [N, 4] xyxy, normalized.
    scores: [N] scores; higher first (ties: lower index first).
    iou_threshold: a box is dropped if its IoU with a kept higher-scoring box is > this, in [0, 1].
    max_output: length of the output (static).
    valid: optional [N] bool; boxes marked False are never kept (e.g. padding or low scores).

  Returns:
    [max_output] int32 indices into ``boxes`` of the kept boxes in decreasing score order,
    padded with -1 (truncated if more than ``max_output`` are kept).
  """
  iou_threshold = _check_unit("iou_threshold", iou_threshold)
  max_output = _check_count("max_output", max_output)
  if len(jnp.shape(boxes)) != 2 or jnp.shape(boxes)[-1] != 4:
    raise ValueError(f"boxes must have shape [N, 4] (xyxy); got {jnp.shape(boxes)}")
  n = jnp.shape(boxes)[0]
  if jnp.shape(scores) != (n,):
    raise ValueError(f"scores must have shape [N] = ({n},); got {jnp.shape(scores)}")
  if valid is None:
    valid = jnp.ones((n,), bool)
  elif jnp.shape(valid) != (n,):
    raise ValueError(f"valid must have shape [N] = ({n},); got {jnp.shape(valid)}")
  return _nms(jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32),
              jnp.asarray(valid, bool), iou_threshold=iou_threshold, max_output=max_output)


def _detect_one(loc, logits, anchors, *, score_threshold: float, iou_threshold: float,
                top_k: int, max_detections: int, variances: tuple[float, float]):
  """One image: loc [A, 4], logits [A, C], anchors [A, 4] cxcywh -> unbatched Detections."""
  num_anchors, num_classes = logits.shape
  k = min(top_k, num_anchors)
  decoded = boxes_lib.decode(loc, anchors, variances)  # [A, 4] xyxy, unclipped
  # Checked before clipping, which would turn an inf coordinate into a finite edge; loc is checked
  # too because a -inf size offset decodes to a finite zero-width box.
  box_ok = jnp.all(jnp.isfinite(decoded) & jnp.isfinite(loc), axis=-1)  # [A]
  # Zeroed so that no NaN reaches the IoU; the where is the identity on finite boxes.
  boxes = jnp.where(box_ok[:, None], boxes_lib.clip(decoded), 0.0)  # [A, 4] xyxy
  probs = jax.nn.softmax(logits, axis=-1)  # [A, C]; a NaN or +inf logit makes its row NaN
  fg_scores = probs[:, 1:].T  # [C-1, A]
  # top_k ranks NaN above everything: a non-finite candidate must sink below every real one
  # (-inf fails any threshold), or it takes a top-k slot and hides a real detection.
  fg_scores = jnp.where(box_ok[None, :] & jnp.isfinite(fg_scores), fg_scores, -jnp.inf)

  # Per-class candidates. Taking the top k first and masking the sub-threshold ones afterwards
  # selects the same boxes as thresholding first (the survivors are a prefix of the sorted list).
  cand_scores, cand_idx = lax.top_k(fg_scores, k)  # [C-1, K], descending
  cand_boxes = boxes[cand_idx]  # [C-1, K, 4]
  cand_valid = cand_scores > score_threshold  # [C-1, K]
  keep = jax.vmap(functools.partial(_greedy_keep, iou_threshold=iou_threshold))(
      cand_boxes, cand_valid)  # [C-1, K]

  # Best max_detections over all classes; kept scores are > threshold >= 0, the rest rank below.
  pool_scores = jnp.where(keep, cand_scores, -1.0).reshape(-1)  # [(C-1) * K]
  pool_keep = keep.reshape(-1)
  pool_boxes = cand_boxes.reshape(-1, 4)
  pool_classes = jnp.repeat(jnp.arange(1, num_classes, dtype=jnp.int32), k)
  d = min(max_detections, pool_scores.shape[0])
  top_scores, top_idx = lax.top_k(pool_scores, d)  # [d]
  is_det = pool_keep[top_idx]  # [d], real detections first

  pad = max_detections - d
  det_boxes = jnp.pad(jnp.where(is_det[:, None], pool_boxes[top_idx], 0.0), ((0, pad), (0, 0)))
  det_scores = jnp.pad(jnp.where(is_det, top_scores, 0.0), (0, pad))
  det_classes = jnp.pad(jnp.where(is_det, pool_classes[top_idx], 0), (0, pad))
  return Detections(det_boxes, det_scores, det_classes, is_det.sum().astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("score_threshold", "iou_threshold", "top_k",
                                             "max_detections", "variances"))
def _detect(loc, logits, anchors, **kwargs):
  return jax.vmap(functools.partial(_detect_one, **kwargs), in_axes=(0, 0, None))(
      loc, logits, anchors)


def detect(loc, logits, anchors, *, score_threshold: float, iou_threshold: float, top_k: int,
           max_detections: int, variances: Sequence[float] = (0.1, 0.2)) -> Detections:
  """SSD detections for a batch, with the semantics of torchvision's SSD post-processing.

  Per image: decode ``loc`` against the anchors and clip to [0, 1]; softmax over classes; for each
  foreground class ``c`` keep the scores ``> score_threshold``, take the class's
  ``min(top_k, A)`` best and apply greedy NMS (IoU ``> iou_threshold`` suppresses) among them;
  boxes of different classes never suppress each other. Then keep the ``max_detections`` best
  over all classes. Thresholds and counts are static; the whole batch runs in one ``jit``.

  Non-finite inputs: an anchor whose offsets or decoded (unclipped) box have a NaN or inf
  coordinate, or whose probability for class ``c`` is NaN (any NaN or +inf logit makes the
  anchor's whole softmax row NaN), is never a candidate for ``c``: it takes no top-k slot,
  suppresses nothing and is not counted in ``valid``; an all-NaN image gives ``valid == 0``.
  A ``-inf`` logit is probability 0, below any threshold. Inputs whose decoded boxes and
  probabilities are finite give the same output as without this rule.

  Use the experiment's values with ``detect(loc, logits, anchors, **from_config(config))``.

  Args:
    loc: [B, A, 4] predicted offsets (SSD parameterization, see ``boxes.encode``).
    logits: [B, A, C] class logits, C includes background (class 0).
    anchors: [A, 4] cxcywh, normalized.
    score_threshold: per-class probability a detection must exceed, in [0, 1].
    iou_threshold: NMS IoU threshold, in [0, 1].
    top_k: candidates per class before NMS, >= 1.
    max_detections: D, detections kept per image, >= 1.
    variances: (center, size) variances of the box encoding.

  Returns:
    :class:`Detections` with boxes [B, D, 4] xyxy (normalized, clipped), scores [B, D] float32,
    classes [B, D] int32, valid [B] int32; padding rows are zero.
  """
  score_threshold = _check_unit("score_threshold", score_threshold)
  iou_threshold = _check_unit("iou_threshold", iou_threshold)
  top_k = _check_count("top_k", top_k)
  max_detections = _check_count("max_detections", max_detections)
  variances = tuple(float(v) for v in variances)
  if len(variances) != 2 or not all(v > 0 for v in variances):
    raise ValueError(f"variances must be two positive numbers (center, size); got {variances}")
  loc_shape, logits_shape, anchors_shape = jnp.shape(loc), jnp.shape(logits), jnp.shape(anchors)
  if len(loc_shape) != 3 or loc_shape[-1] != 4:
    raise ValueError(f"loc must have shape [B, A, 4]; got {loc_shape}")
  if len(logits_shape) != 3 or logits_shape[:2] != loc_shape[:2]:
    raise ValueError(f"logits must have shape [B, A, C] with [B, A] = {list(loc_shape[:2])} "
                     f"as in loc; got {logits_shape}")
  if logits_shape[-1] < 2:
    raise ValueError(f"logits need C >= 2 classes (background + foreground); got {logits_shape}")
  if anchors_shape != (loc_shape[1], 4):
    raise ValueError(f"anchors must have shape [A, 4] = [{loc_shape[1]}, 4] (cxcywh) to match "
                     f"loc; got {anchors_shape}")
  return _detect(jnp.asarray(loc, jnp.float32), jnp.asarray(logits, jnp.float32),
                 jnp.asarray(anchors, jnp.float32), score_threshold=score_threshold,
                 iou_threshold=iou_threshold, top_k=top_k, max_detections=max_detections,
                 variances=variances)


def from_config(config) -> dict:
  """Keyword arguments of :func:`detect` from ``config.postprocess`` and ``config.anchors``."""
  p = config.postprocess
  return dict(score_threshold=p.score_threshold, iou_threshold=p.iou_threshold, top_k=p.top_k,
              max_detections=p.max_detections, variances=tuple(config.anchors.variances))
