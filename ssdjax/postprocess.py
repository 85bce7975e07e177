"""Inference post-processing: decode, per-class top-k, class-aware NMS, all with static shapes.

:func:`detect` follows torchvision's ``SSD.postprocess_detections`` (and Caffe's
``DetectionOutput``): decode the box offsets against the anchors, clip to the image, softmax over
classes, and for each foreground class keep the scores above ``score_threshold``, take that class's
``top_k`` best, run greedy NMS within the class, and finally keep the ``max_detections`` best over
all classes. Everything runs for the whole batch inside one ``jit`` and returns padded,
fixed-size :class:`Detections`, so it runs on device and exports. Non-finite candidates (a NaN or
inf box or score, e.g. from a diverged model) are masked out before the top-k, never detected.

Cost: an image whose candidates ((anchor, class) pairs scoring above ``score_threshold``) fit in
the slots of a sparse path (``_CAPACITIES``: 256, else 4096) gathers just those, sorts them by
(class, score, anchor) and runs the greedy NMS over them alone, each against the rest of its
class's top k, so its cost follows the number of candidates: a trained detector has a few dozen.
An image with more (an untrained model has hundreds of thousands) takes the dense path: per class
a top-k over all A anchors and NMS over a boolean overlap matrix ``[K, K]``, ``K = min(top_k, A)``.
Both paths give the same output, bit for bit; tests/test_postprocess.py holds the dense-only
implementation as the reference. SSD300 with torchvision's COCO classes (A = 8732, C = 91,
``top_k=400``), batch 1, on a 2-core CPU: about 1.5 ms per image with 40 candidates, 5 ms with
1000, 10 ms with 4000 and 20 ms on the dense path.

On CPU the images are processed one after the other (``lax.map``), each on the path its own
candidates need; other platforms run the whole batch (``vmap``) on the path its fullest image
needs. Memory: the softmax, ``B * A * C`` float32, plus the dense path's ``(C - 1) * K^2`` bytes
for one image on CPU (12.8 MB for COCO's 80 classes and ``top_k=400``) or for the whole batch
elsewhere (410 MB for a batch of 32: lower the batch or ``top_k`` if that does not fit); a
sparse path holds two ``[N, C - 1]`` float32 arrays per image, N its capacity (2.9 MB for 4096).

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


# Slot counts of the sparse paths, smallest first; an image with more candidates than the last
# takes the dense path. 256 holds a trained detector's few dozen candidates with room to spare.
# The sparse path's loop grows with the candidates: with 4000 it still costs half what the dense
# path does (SSD300 COCO, CPU).
_CAPACITIES = (256, 4096)


def _boxes_one(loc, anchors, *, variances: tuple[float, float]):
  """One image: loc [A, 4], anchors [A, 4] cxcywh -> (boxes [A, 4] xyxy clipped, box_ok [A]).

  Rows of boxes whose offsets or decoded (unclipped) coordinates are not finite are 0.
  """
  decoded = boxes_lib.decode(loc, anchors, variances)  # [A, 4] xyxy, unclipped
  # Checked before clipping, which would turn an inf coordinate into a finite edge; loc is checked
  # too because a -inf size offset decodes to a finite zero-width box.
  box_ok = jnp.all(jnp.isfinite(decoded) & jnp.isfinite(loc), axis=-1)  # [A]
  # Zeroed so that no NaN reaches the IoU; the where is the identity on finite boxes.
  boxes = jnp.where(box_ok[:, None], boxes_lib.clip(decoded), 0.0)  # [A, 4] xyxy
  return boxes, box_ok


def _fg_scores_one(probs, box_ok):
  """One image: probs [A, C] (softmax), box_ok [A] -> [A, C-1] foreground probabilities.

  -inf where the box or the probability is not finite, so that such a pair passes no threshold.
  """
  fg_scores = probs[:, 1:]  # [A, C-1]
  # top_k ranks NaN above everything: a non-finite candidate must sink below every real one
  # (-inf fails any threshold), or it takes a top-k slot and hides a real detection.
  return jnp.where(box_ok[:, None] & jnp.isfinite(fg_scores), fg_scores, -jnp.inf)


def _candidates_per_anchor(fg_scores, score_threshold: float):
  """[..., A, C-1] -> [..., A] float32 number of scores above the threshold (exact, < 2^24).

  A float sum: XLA's CPU backend sums booleans or integers over the class axis two to ten times
  slower.
  """
  return jnp.sum((fg_scores > score_threshold).astype(jnp.float32), axis=-1)


def _pad_detections(keep, scores, boxes, classes, max_detections: int) -> Detections:
  """The ``max_detections`` best kept candidates, best first, score ties to the lower index.

  keep [P] bool, scores [P] (> 0 where kept), boxes [P, 4], classes [P] int32 -> Detections.
  """
  pool_scores = jnp.where(keep, scores, -1.0)  # [P]; kept scores are > threshold >= 0
  d = min(max_detections, pool_scores.shape[0])
  top_scores, top_idx = lax.top_k(pool_scores, d)  # [d]
  is_det = keep[top_idx]  # [d], real detections first
  pad = max_detections - d
  det_boxes = jnp.pad(jnp.where(is_det[:, None], boxes[top_idx], 0.0), ((0, pad), (0, 0)))
  det_scores = jnp.pad(jnp.where(is_det, top_scores, 0.0), (0, pad))
  det_classes = jnp.pad(jnp.where(is_det, classes[top_idx], 0), (0, pad))
  return Detections(det_boxes, det_scores, det_classes, is_det.sum().astype(jnp.int32))


def _select_dense(boxes, fg_scores, per_anchor, *, score_threshold: float, iou_threshold: float,
                  top_k: int, max_detections: int) -> Detections:
  """One image, any number of candidates: per class a top-k over all A anchors and NMS on [K, K].

  Args:
    boxes: [A, 4] xyxy, clipped.
    fg_scores: [A, C-1] foreground scores, -inf where not finite.
    per_anchor: unused (the signature of :func:`_select_sparse`).
  """
  del per_anchor
  num_anchors, num_fg = fg_scores.shape
  k = min(top_k, num_anchors)
  # Per-class candidates. Taking the top k first and masking the sub-threshold ones afterwards
  # selects the same boxes as thresholding first (the survivors are a prefix of the sorted list).
  cand_scores, cand_idx = lax.top_k(fg_scores.T, k)  # [C-1, K], descending
  cand_boxes = boxes[cand_idx]  # [C-1, K, 4]
  cand_valid = cand_scores > score_threshold  # [C-1, K]
  keep = jax.vmap(functools.partial(_greedy_keep, iou_threshold=iou_threshold))(
      cand_boxes, cand_valid)  # [C-1, K]
  # The pool is class-major, each class in its top-k order: score ties between classes go to the
  # lower class, within a class to the lower anchor.
  classes = jnp.repeat(jnp.arange(1, num_fg + 1, dtype=jnp.int32), k)  # [(C-1) * K]
  return _pad_detections(keep.reshape(-1), cand_scores.reshape(-1), cand_boxes.reshape(-1, 4),
                         classes, max_detections)


def _select_sparse(boxes, fg_scores, per_anchor, *, capacity: int, score_threshold: float,
                   iou_threshold: float, top_k: int, max_detections: int) -> Detections:
  """:func:`_select_dense`'s output at a cost that grows with the number of candidates.

  Requires at most N = ``capacity`` candidates ((anchor, class) pairs scoring above the
  threshold). Gathers them into N slots and sorts these by (class, score descending, anchor):
  each class becomes a run in its dense top-k order, so a candidate's rank in its run says
  whether it is in its class's top k, and the pool handed to :func:`_pad_detections` orders ties
  as the dense pool does. The greedy NMS then visits the real candidates only, each against the
  next ``min(top_k, N) - 1`` slots (the rest of its class's top k).

  Args:
    boxes: [A, 4] xyxy, clipped.
    fg_scores: [A, C-1] foreground scores, -inf where not finite.
    per_anchor: [A] float32 number of the anchor's candidates (:func:`_candidates_per_anchor`).
  """
  num_anchors, num_fg = fg_scores.shape
  n = capacity
  per_anchor = per_anchor.astype(jnp.int32)  # [A]
  ends = jnp.cumsum(per_anchor)  # [A]: anchor a fills slots [ends[a] - per_anchor[a], ends[a])
  count = ends[-1]
  slot = jnp.arange(n, dtype=jnp.int32)  # [N]
  anchor = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), num_anchors - 1)  # [N]
  ordinal = slot - (ends[anchor] - per_anchor[anchor])  # [N], which of the anchor's candidates
  # The class of the anchor's ordinal-th candidate. The matmul is a cumulative sum over classes
  # (exact: small integers in float32), much cheaper than jnp.cumsum's scan on CPU.
  rows = (fg_scores[anchor] > score_threshold).astype(jnp.float32)  # [N, C-1]
  at_or_before = jnp.dot(rows, jnp.triu(jnp.ones((num_fg, num_fg), jnp.float32)),
                         precision=lax.Precision.HIGHEST)  # [N, C-1]
  fg_class = jnp.sum((at_or_before <= ordinal[:, None]).astype(jnp.float32), axis=1
                     ).astype(jnp.int32)  # [N], 0-based
  in_use = slot < count  # [N]
  fg_class = jnp.where(in_use, fg_class, num_fg)  # empty slots sort last
  score = jnp.where(in_use, fg_scores[anchor, jnp.minimum(fg_class, num_fg - 1)], -jnp.inf)
  # Slots are in (anchor, class) order, so the stable sort breaks score ties by anchor.
  fg_class, neg_score, anchor = lax.sort((fg_class, -score, anchor), num_keys=2, is_stable=True)
  score = -neg_score  # [N], exact
  # Rank within the class: the slot minus the number of slots of lower classes.
  run_start = jnp.sum((fg_class[None, :] < jnp.arange(num_fg)[:, None]).astype(jnp.float32),
                      axis=1).astype(jnp.int32)  # [C-1]
  rank = slot - run_start[jnp.minimum(fg_class, num_fg - 1)]  # [N]
  eligible = (fg_class < num_fg) & (rank < top_k)  # [N], in its class's top k

  cand_boxes = boxes[anchor]  # [N, 4] xyxy
  w = max(min(top_k, n) - 1, 1)  # a candidate can only suppress the rest of its class's top k
  boxes_pad = jnp.pad(cand_boxes, ((0, w), (0, 0)))  # [N + w, 4]
  class_pad = jnp.pad(fg_class, (0, w), constant_values=num_fg)  # [N + w]

  def visit(i, keep):  # keep: [N + w] bool; keep[i] is final when i is visited
    def suppress(keep):
      later = lax.dynamic_slice_in_dim(boxes_pad, i + 1, w)  # [w, 4]
      # The same IoU as the dense [K, K] matrix's entry (higher-scoring box first).
      hit = boxes_lib.iou(boxes_pad[i][None], later)[0] > iou_threshold  # [w]
      hit &= lax.dynamic_slice_in_dim(class_pad, i + 1, w) == class_pad[i]
      later_keep = lax.dynamic_slice_in_dim(keep, i + 1, w)
      return lax.dynamic_update_slice_in_dim(keep, later_keep & ~hit, i + 1, 0)
    return lax.cond(keep[i], suppress, lambda keep: keep, keep)

  keep = lax.fori_loop(0, count, visit, jnp.pad(eligible, (0, w)))[:n]  # [N]
  return _pad_detections(keep, score, cand_boxes, fg_class + 1, max_detections)


def _paths(capacities: tuple[int, ...], num_pairs: int, **kwargs):
  """The one-image paths, cheapest first, and the capacities of their sparse ones.

  When the largest capacity holds all ``num_pairs = A * (C - 1)`` pairs, one sparse path with
  ``num_pairs`` slots serves every image (small problems: one path to compile). Otherwise the
  sparse paths come first, then the dense one.
  """
  if capacities and capacities[-1] >= num_pairs:
    capacities = (num_pairs,)
  paths = [functools.partial(_select_sparse, capacity=c, **kwargs) for c in capacities]
  if not capacities or capacities[-1] < num_pairs:
    paths.append(functools.partial(_select_dense, **kwargs))
  return capacities, paths


def _path_index(count, capacities: tuple[int, ...]):
  """Index of the cheapest path that holds ``count`` candidates (the dense one: all capacities)."""
  return jnp.sum(count > jnp.asarray(capacities, count.dtype))


def _detect_per_image(loc, logits, anchors, *, variances, capacities, **kwargs) -> Detections:
  """One image after the other, each on the path its own candidates need. For CPUs."""
  boxes, box_ok = jax.vmap(functools.partial(_boxes_one, variances=variances),
                           in_axes=(0, None))(loc, anchors)  # [B, A, 4], [B, A]
  probs = jax.nn.softmax(logits, axis=-1)  # [B, A, C]; a NaN or +inf logit makes its row NaN
  capacities, paths = _paths(capacities, anchors.shape[0] * (logits.shape[-1] - 1), **kwargs)

  def one(args):
    boxes, box_ok, probs = args
    fg_scores = _fg_scores_one(probs, box_ok)  # [A, C-1]
    per_anchor = _candidates_per_anchor(fg_scores, kwargs["score_threshold"])  # [A]
    index = _path_index(jnp.sum(per_anchor), capacities)
    return lax.switch(index, paths, boxes, fg_scores, per_anchor)

  return lax.map(one, (boxes, box_ok, probs))


def _detect_batched(loc, logits, anchors, *, variances, capacities, **kwargs) -> Detections:
  """The whole batch at once, on the path its fullest image needs. For accelerators."""
  boxes, box_ok = jax.vmap(functools.partial(_boxes_one, variances=variances),
                           in_axes=(0, None))(loc, anchors)  # [B, A, 4], [B, A]
  probs = jax.nn.softmax(logits, axis=-1)  # [B, A, C]; a NaN or +inf logit makes its row NaN
  fg_scores = jax.vmap(_fg_scores_one)(probs, box_ok)  # [B, A, C-1]
  per_anchor = _candidates_per_anchor(fg_scores, kwargs["score_threshold"])  # [B, A]
  capacities, paths = _paths(capacities, anchors.shape[0] * (logits.shape[-1] - 1), **kwargs)
  index = _path_index(jnp.max(jnp.sum(per_anchor, axis=-1)), capacities)
  return lax.switch(index, [jax.vmap(path) for path in paths], boxes, fg_scores, per_anchor)


@functools.partial(jax.jit, static_argnames=("score_threshold", "iou_threshold", "top_k",
                                             "max_detections", "variances", "capacities"))
def _detect(loc, logits, anchors, *, capacities: tuple[int, ...] = _CAPACITIES, **kwargs):
  # Chosen when lowering, per platform (an export for several platforms holds both).
  return lax.platform_dependent(
      loc, logits, anchors,
      cpu=functools.partial(_detect_per_image, capacities=capacities, **kwargs),
      default=functools.partial(_detect_batched, capacities=capacities, **kwargs))


def detect(loc, logits, anchors, *, score_threshold: float, iou_threshold: float, top_k: int,
           max_detections: int, variances: Sequence[float] = (0.1, 0.2)) -> Detections:
  """SSD detections for a batch, with the semantics of torchvision's SSD post-processing.

  Per image: decode ``loc`` against the anchors and clip to [0, 1]; softmax over classes; for each
  foreground class ``c`` keep the scores ``> score_threshold``, take the class's
  ``min(top_k, A)`` best and apply greedy NMS (IoU ``> iou_threshold`` suppresses) among them;
  boxes of different classes never suppress each other. Then keep the ``max_detections`` best
  over all classes. Thresholds and counts are static; the whole batch runs in one ``jit``, at a
  cost that follows the number of candidates (scores above the threshold; see the module
  docstring).

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
