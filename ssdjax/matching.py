"""Anchor matching: which ground-truth box (if any) each anchor is trained to predict.

Everything works on ONE image with padded ground truth and static shapes; :func:`batch_match` and
:func:`batch_targets` ``jax.vmap`` it over a batch (the anchors are shared).

Inputs, for one image:

* ``gt_boxes``: [G, 4] xyxy, normalized, padded to G (``config.data.max_boxes``).
* ``gt_labels``: [G] int, 1..C-1 for objects, 0 for padding.
* ``gt_mask``: [G] bool, True for real boxes.
* ``anchors``: [A, 4] cxcywh, normalized (``ssdjax.anchors.default_boxes``).

A gt box takes part in matching when ``gt_mask`` is True and its label is > 0; padded slots never
match, whatever coordinates they hold (NaN included).

Strategies (``config.matching.strategy``, with ``config.matching.kwargs``): a registered name or
an import path ``"package.module:Name"`` of a *matcher*, a one-image function
``fn(gt_boxes, gt_labels, gt_mask, anchors, **kwargs) -> (matched_idx [A] int32, matched_iou [A])``
(:func:`register`; the contract of :func:`match`). The built-in ones:

* ``"bipartite"``: Caffe SSD's ``MatchBBox`` with ``match_type: PER_PREDICTION``, the matching of
  the paper. First a greedy bipartite step: up to G times, take the globally best (gt, anchor) pair
  among gts not yet matched and anchors not yet taken and assign it, so every gt owns a distinct
  anchor. As in Caffe only overlaps > 1e-6 count, so a gt that overlaps no free anchor gets no
  forced match; exact ties go to the lower anchor index, then the lower gt index (Caffe's loop
  order). Then every anchor still unmatched goes to its best gt if that IoU >= ``iou_threshold``.
* ``"per_gt_best"``: torchvision's ``SSDMatcher``. Every anchor goes to its best gt if that IoU >=
  ``iou_threshold`` (ties -> lower gt index); then every gt forces its own best anchor (ties -> lower
  anchor index) to itself. Two gts can share the same best anchor, and then only one keeps it: here
  the gt with the higher IoU to that anchor (ties -> lower gt index), so the result does not depend
  on the order of the gts (torchvision lets the last-written gt win, which does). Unlike
  torchvision, a gt that overlaps no anchor at all (e.g. a zero-area box) forces nothing, instead
  of claiming anchor 0.

Speed: :func:`batch_match` and :func:`batch_targets` (and so :func:`match_stats`) run a built-in
matcher on the valid gts only. They move them to the front of each image (in slot order, so every
tie still goes to the lower slot) and match on the first G' rows, for the smallest G' of a few
static sizes (8, 16, 32, ... below G, and G) that holds the valid gts of every image of the batch
(``lax.switch``, no host sync); indices map back to the G slots, so the result is exactly that on
all G rows. The one-image functions (:func:`match`, :func:`targets`, the matchers) always use all
G rows: under a ``jax.vmap`` a ``lax.switch`` would run every size. A matcher of your own receives
the padded gt arrays exactly as given.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ssdjax import boxes as box_lib
from ssdjax import registry

# Caffe's MatchBBox only records overlaps above this; pairs at or below it never match.
_MIN_OVERLAP = 1e-6
# The built-in matchers run on G' gt rows, for G' in _MIN_ROWS * 2**i below G, and G.
_MIN_ROWS = 8


def _max_argmax(x, axis: int):
  """(jnp.max, jnp.argmax) of x along axis: argmax is the first index of the maximum, a NaN counts
  as the maximum. Written as a max and a min over float indices because XLA:CPU's argmax (a
  variadic reduction) is ~10x slower than either."""
  top = jnp.max(x, axis=axis)
  size = x.shape[axis]
  if size > 2**24:  # float32 indices would not be exact
    return top, jnp.argmax(x, axis=axis).astype(jnp.int32)
  top_b = jnp.expand_dims(top, axis)
  hit = (x == top_b) | (jnp.isnan(x) & jnp.isnan(top_b))
  index = lax.broadcasted_iota(jnp.float32, x.shape, axis)
  return top, jnp.min(jnp.where(hit, index, float(size)), axis=axis).astype(jnp.int32)


def _match_bipartite(iou, valid, iou_threshold):
  """iou: [G, A] (-1 where the gt is invalid), valid: [G] -> matched_idx [A] int32."""
  iou = lax.stop_gradient(iou)  # only indices come out (and a while_loop has no reverse mode)
  num_gt, num_anchors = iou.shape
  gt = jnp.arange(num_gt)
  no_key = num_anchors * num_gt
  # The greedy step, lazily: each gt remembers its best anchor (ties -> lower index) among those
  # free when it last looked. Taking anchors only lowers a gt's true best, so when the best
  # remembered pair is still free it is the best free pair; when it is taken, that gt looks again.
  # Overlaps at or below _MIN_OVERLAP count as -1, as in Caffe.
  def overlap(x):
    return jnp.where(x > _MIN_OVERLAP, x, -1.0)

  seen_iou, seen_anchor = _max_argmax(iou, axis=1)  # [G], [G]

  def pick(state):
    _, gt_free, seen_iou, seen_anchor = state
    cand = jnp.where(gt_free, overlap(seen_iou), -1.0)  # [G]
    best = jnp.max(cand)
    # Exact ties go to the lower anchor, then the lower gt: the order of Caffe's loops.
    return best, jnp.argmin(jnp.where(cand == best, seen_anchor * num_gt + gt, no_key))

  def body(state):
    matched_idx, gt_free, seen_iou, seen_anchor = state  # [A], [G], [G], [G]
    _, g = pick(state)
    a = seen_anchor[g]
    taken = matched_idx[a] >= 0
    again_iou, again_anchor = _max_argmax(jnp.where(matched_idx >= 0, -1.0, overlap(iou[g])),
                                          axis=0)
    return (matched_idx.at[a].set(jnp.where(taken, matched_idx[a], g).astype(jnp.int32)),
            gt_free.at[g].set(taken),
            seen_iou.at[g].set(jnp.where(taken, again_iou, seen_iou[g])),
            seen_anchor.at[g].set(jnp.where(taken, again_anchor, a)))

  # Until no free gt overlaps a free anchor: Caffe's early break.
  init = (jnp.full((num_anchors,), -1, jnp.int32), valid, seen_iou, seen_anchor)
  matched_idx = lax.while_loop(lambda state: pick(state)[0] > 0, body, init)[0]

  best_iou, best_gt = _max_argmax(iou, axis=0)  # [A], [A], ties -> lower gt index
  by_threshold = (best_iou >= iou_threshold) & (best_iou > _MIN_OVERLAP)
  return jnp.where((matched_idx < 0) & by_threshold, best_gt, matched_idx)


def _match_per_gt_best(iou, valid, iou_threshold):
  """iou: [G, A] (-1 where the gt is invalid), valid: [G] -> matched_idx [A] int32."""
  num_gt, num_anchors = iou.shape
  best_iou, best_gt = _max_argmax(iou, axis=0)  # [A], [A]
  matched_idx = jnp.where(best_iou >= iou_threshold, best_gt, -1)  # [A]

  gt_best_iou, best_anchor = _max_argmax(iou, axis=1)  # [G], [G], ties -> lower anchor index
  forces = valid & (gt_best_iou > 0)  # [G]
  # Among gts claiming the same anchor the one with the higher IoU wins (ties -> lower gt index):
  # gt g loses when another forcing gt h claims its anchor and beats it. [G, G], not [G, A].
  gt = jnp.arange(num_gt)
  rival = forces[None, :] & (best_anchor[None, :] == best_anchor[:, None])  # [G (g), G (h)]
  beats = (gt_best_iou[None, :] > gt_best_iou[:, None]) | (
      (gt_best_iou[None, :] == gt_best_iou[:, None]) & (gt[None, :] < gt[:, None]))  # [G, G]
  wins = forces & ~(rival & beats).any(axis=1)  # [G], at most one winner per anchor
  forced = jnp.full((num_anchors,), -1, jnp.int32).at[
      jnp.where(wins, best_anchor, num_anchors)].set(gt.astype(jnp.int32), mode="drop")  # [A]
  return jnp.where(forced >= 0, forced, matched_idx)


def _check_threshold(iou_threshold):
  if isinstance(iou_threshold, (int, float)) and not 0.0 <= iou_threshold <= 1.0:
    raise ValueError(f"matching iou_threshold must be in [0, 1], got {iou_threshold}")


def _check_args(gt_boxes, gt_labels, gt_mask, anchors, batched=False):
  lead = "B, " if batched else ""
  g_shape = jnp.shape(gt_boxes)[:-1]
  if jnp.ndim(gt_boxes) != 2 + batched or jnp.shape(gt_boxes)[-1] != 4 or g_shape[-1] == 0:
    raise ValueError(f"gt_boxes must have shape [{lead}G, 4] (xyxy, normalized) with G >= 1 padded "
                     f"slots; got {jnp.shape(gt_boxes)}")
  for name, arr in (("gt_labels", gt_labels), ("gt_mask", gt_mask)):
    if jnp.shape(arr) != g_shape:
      raise ValueError(f"{name} must have shape [{lead}G] = {g_shape} to match gt_boxes; "
                       f"got {jnp.shape(arr)}")
  if jnp.ndim(anchors) != 2 or jnp.shape(anchors)[-1] != 4:
    raise ValueError(f"anchors must have shape [A, 4] (cxcywh, normalized); got {jnp.shape(anchors)}")


def _valid(gt_labels, gt_mask):
  """[..., G] bool: the gts that take part in matching."""
  return jnp.asarray(gt_mask, bool) & (jnp.asarray(gt_labels) > 0)


def _iou_matrix(gt_boxes, valid, anchors_xyxy):
  """IoU [G, A] of every gt with every anchor, -1 in rows of invalid gts."""
  iou = box_lib.iou(jnp.asarray(gt_boxes, jnp.float32), anchors_xyxy)  # [G, A]
  return jnp.where(valid[:, None], iou, -1.0)


def _matched(rule, gt_boxes, valid, anchors_xyxy, iou_threshold):
  """(matched_idx [A] into the G rows, matched_iou [A]) of a rule; gt_boxes [G, 4], valid [G]."""
  iou = _iou_matrix(gt_boxes, valid, anchors_xyxy)  # [G, A]
  matched_idx = rule(iou, valid, iou_threshold)  # [A]
  at_match = jnp.take_along_axis(iou, jnp.maximum(matched_idx, 0)[None, :], axis=0)[0]  # [A]
  best = jnp.max(iou, axis=0, initial=0.0)  # [A]
  matched_iou = jnp.where(matched_idx >= 0, at_match, best)
  return matched_idx.astype(jnp.int32), matched_iou.astype(jnp.float32)


def _matched_rows(rule, num_rows, gt_boxes, valid, anchors_xyxy, iou_threshold):
  """:func:`_matched` on the first ``num_rows`` valid gts (all of them if there are no more).

  The valid gts move to the front in slot order, so every tie-break by gt index is unchanged;
  the rows after them are invalid ones. Indices map back to the G slots.
  """
  if num_rows == valid.shape[0]:
    return _matched(rule, gt_boxes, valid, anchors_xyxy, iou_threshold)
  slots = jnp.argsort(~valid, stable=True)[:num_rows]  # [G'], valid slots first
  matched_idx, matched_iou = _matched(rule, gt_boxes[slots], valid[slots], anchors_xyxy,
                                      iou_threshold)
  matched_idx = jnp.where(matched_idx >= 0, slots[jnp.maximum(matched_idx, 0)], -1)
  return matched_idx.astype(jnp.int32), matched_iou


def _row_sizes(num_slots: int) -> tuple[int, ...]:
  """The static numbers of gt rows G' the built-in matchers compile for: the last is G."""
  sizes = [_MIN_ROWS]
  while sizes[-1] < num_slots:
    sizes.append(2 * sizes[-1])
  return (*sizes[:-1], num_slots)


def _batch_matched(rule, gt_boxes, gt_labels, gt_mask, anchors, *, iou_threshold):
  """A built-in rule over a batch: [B, G, ...] -> ([B, A] int32, [B, A] float32), on the fewest
  gt rows that hold every valid gt of the batch (module docstring)."""
  _check_threshold(iou_threshold)
  valid = _valid(gt_labels, gt_mask)  # [B, G]
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)  # [B, G, 4]
  anchors_xyxy = box_lib.cxcywh_to_xyxy(jnp.asarray(anchors, jnp.float32))  # [A, 4]

  def run(num_rows, gt_boxes, valid):
    one = lambda b, v: _matched_rows(rule, num_rows, b, v, anchors_xyxy, iou_threshold)
    return jax.vmap(one)(gt_boxes, valid)

  sizes = _row_sizes(valid.shape[1])
  if len(sizes) == 1:
    return run(sizes[0], gt_boxes, valid)
  most = jnp.max(valid.sum(axis=1), initial=0)  # valid gts in the fullest image
  which = jnp.sum(most > jnp.asarray(sizes[:-1]))  # the first size that holds them
  return lax.switch(which, [functools.partial(run, n) for n in sizes], gt_boxes, valid)


def _one_image(rule, gt_boxes, gt_labels, gt_mask, anchors, iou_threshold):
  _check_threshold(iou_threshold)
  anchors_xyxy = box_lib.cxcywh_to_xyxy(jnp.asarray(anchors, jnp.float32))  # [A, 4]
  return _matched(rule, gt_boxes, _valid(gt_labels, gt_mask), anchors_xyxy, iou_threshold)


def bipartite(gt_boxes, gt_labels, gt_mask, anchors, *, iou_threshold: float = 0.5):
  """Caffe SSD's matching (module docstring), one image; the ``"bipartite"`` matcher."""
  return _one_image(_match_bipartite, gt_boxes, gt_labels, gt_mask, anchors, iou_threshold)


def per_gt_best(gt_boxes, gt_labels, gt_mask, anchors, *, iou_threshold: float = 0.5):
  """torchvision's ``SSDMatcher`` (module docstring), one image; the ``"per_gt_best"`` matcher."""
  return _one_image(_match_per_gt_best, gt_boxes, gt_labels, gt_mask, anchors, iou_threshold)


# The built-in matchers and their rules on the IoU matrix (by identity: a name re-registered to
# another function is that function).
_RULES = ((bipartite, _match_bipartite), (per_gt_best, _match_per_gt_best))


def _builtin_batched(strategy, kwargs):
  """The batch form of a built-in matcher with ``kwargs`` bound; None for any other matcher."""
  fn = get(strategy)
  rule = next((r for f, r in _RULES if f is fn), None)
  if rule is None:
    return None
  args = inspect.signature(fn).bind(None, None, None, None, **kwargs)  # TypeError as fn(**kwargs)
  args.apply_defaults()
  return functools.partial(_batch_matched, rule, **args.kwargs)


REGISTRY = registry.Registry("matcher", "config.matching.strategy", registry.must_be_function(
    "matcher", "fn(gt_boxes, gt_labels, gt_mask, anchors, **kwargs) -> (matched_idx, matched_iou)"))
REGISTRY.register("bipartite", bipartite, _builtin=True)
REGISTRY.register("per_gt_best", per_gt_best, _builtin=True)


def register(name: str, fn=None, *, overwrite: bool = False):
  """Registers a matcher as ``name`` (usable as ``config.matching.strategy``); a decorator
  without ``fn``. A matcher is the one-image function of :func:`match`'s contract:
  ``fn(gt_boxes [G, 4], gt_labels [G], gt_mask [G], anchors [A, 4], **config.matching.kwargs)
  -> (matched_idx [A] int32, -1 = background; matched_iou [A] float32)``."""
  return REGISTRY.register(name, fn, overwrite=overwrite)


def names() -> tuple[str, ...]:
  """The registered matching strategies (an import path is valid too)."""
  return REGISTRY.names()


def get(name: str):
  """The matcher registered as ``name`` or imported from ``"package.module:Name"``."""
  return REGISTRY.get(name)


def match(gt_boxes, gt_labels, gt_mask, anchors, *, strategy: str = "bipartite", **kwargs):
  """Matches the anchors of one image to its ground truth (see the module docstring).

  Args:
    gt_boxes: [G, 4] xyxy, normalized, padded.
    gt_labels: [G] int, 0 = padding.
    gt_mask: [G] bool, True for real boxes.
    anchors: [A, 4] cxcywh, normalized.
    strategy: a registered matcher name (``"bipartite"``, ``"per_gt_best"``) or an import path.
    **kwargs: the matcher's keyword arguments; the built-in ones take ``iou_threshold`` (default
      0.5): an anchor whose best IoU reaches it is matched to that gt.

  Returns:
    matched_idx: [A] int32, index into the G gts, -1 for background.
    matched_iou: [A] float32, IoU of the anchor with its matched gt; for background anchors, its
      best IoU over the valid gts (0 if there are none), as Caffe's ``match_overlaps``.
  """
  _check_args(gt_boxes, gt_labels, gt_mask, anchors)
  matched_idx, matched_iou = get(strategy)(gt_boxes, gt_labels, gt_mask, anchors, **kwargs)
  num_anchors = jnp.shape(anchors)[0]
  for name, arr in (("matched_idx", matched_idx), ("matched_iou", matched_iou)):
    if jnp.shape(arr) != (num_anchors,):
      raise ValueError(f"matcher {strategy!r} returned {name} of shape {jnp.shape(arr)}; the "
                       f"contract is [A] = ({num_anchors},) per image")
  return jnp.asarray(matched_idx, jnp.int32), jnp.asarray(matched_iou, jnp.float32)


def targets(gt_boxes, gt_labels, gt_mask, anchors, *, strategy: str = "bipartite",
            variances: Sequence[float] = (0.1, 0.2), **kwargs):
  """Training targets for one image.

  Args: as :func:`match`, plus ``variances`` for :func:`ssdjax.boxes.encode`.

  Returns:
    loc_targets: [A, 4] float32, ``boxes.encode(matched gt box, anchors, variances)``; 0 for
      background anchors.
    cls_targets: [A] int32, the matched gt's label; 0 (background) for background anchors.
  """
  matched_idx, _ = match(gt_boxes, gt_labels, gt_mask, anchors, strategy=strategy, **kwargs)
  return _encoded(matched_idx, gt_boxes, gt_labels, anchors, tuple(variances))


def _encoded(matched_idx, gt_boxes, gt_labels, anchors, variances):
  """:func:`targets` of one image from its matched_idx [A]."""
  anchors = jnp.asarray(anchors, jnp.float32)
  positive = matched_idx >= 0  # [A]
  safe_idx = jnp.maximum(matched_idx, 0)
  # Background anchors encode themselves, so padded slots (whatever they hold) never reach the log.
  matched_boxes = jnp.where(positive[:, None], jnp.asarray(gt_boxes, jnp.float32)[safe_idx],
                            box_lib.cxcywh_to_xyxy(anchors))  # [A, 4] xyxy
  loc = box_lib.encode(matched_boxes, anchors, variances)  # [A, 4]
  loc_targets = jnp.where(positive[:, None], loc, 0.0)
  cls_targets = jnp.where(positive, jnp.asarray(gt_labels, jnp.int32)[safe_idx], 0)
  return loc_targets.astype(jnp.float32), cls_targets.astype(jnp.int32)


def batch_match(gt_boxes, gt_labels, gt_mask, anchors, *, strategy: str = "bipartite", **kwargs):
  """:func:`match` over a batch: gt arrays [B, G, ...], anchors [A, 4] -> ([B, A], [B, A])."""
  _check_args(gt_boxes, gt_labels, gt_mask, anchors, batched=True)
  builtin = _builtin_batched(strategy, kwargs)
  if builtin is not None:
    return builtin(gt_boxes, gt_labels, gt_mask, anchors)
  fn = lambda b, l, m: match(b, l, m, anchors, strategy=strategy, **kwargs)
  return jax.vmap(fn)(gt_boxes, gt_labels, gt_mask)


def batch_targets(gt_boxes, gt_labels, gt_mask, anchors, *, strategy: str = "bipartite",
                  variances: Sequence[float] = (0.1, 0.2), **kwargs):
  """:func:`targets` over a batch: gt arrays [B, G, ...] -> loc [B, A, 4] float32, cls [B, A] int32."""
  matched_idx, _ = batch_match(gt_boxes, gt_labels, gt_mask, anchors, strategy=strategy, **kwargs)
  encode = lambda i, b, l: _encoded(i, b, l, anchors, tuple(variances))
  return jax.vmap(encode)(matched_idx, gt_boxes, gt_labels)


def from_config(config) -> dict:
  """Keyword arguments of :func:`targets` / :func:`batch_targets` for an experiment config:
  ``strategy``, ``variances`` and ``config.matching.kwargs`` (checked against the matcher).

  ``batch_targets(boxes, labels, mask, anchors, **matching.from_config(config))``.
  """
  m = config.matching
  kwargs = m.kwargs.to_dict() if hasattr(m.kwargs, "to_dict") else dict(m.kwargs)
  registry.check_kwargs(get(m.strategy), kwargs, field="config.matching.kwargs", name=m.strategy,
                        positional=4)
  return dict(strategy=str(m.strategy), variances=tuple(float(v) for v in config.anchors.variances),
              **kwargs)


def match_stats(gt_boxes, gt_labels, gt_mask, anchors, *, strategy: str = "bipartite",
                **kwargs) -> dict:
  """How well a set of anchors covers a batch of ground truth (for anchor research). Jit-able.

  Args: as :func:`batch_match` (gt arrays [B, G, ...], anchors [A, 4] cxcywh, the matcher's
  ``strategy`` and keyword arguments).

  Returns:
    dict of float32 scalars over all valid gts of the batch:
      ``num_gt``: number of valid gts;
      ``matched_gt_fraction``: fraction of them that got at least one anchor;
      ``positives_per_gt``: mean number of anchors matched to a gt;
      ``best_iou``: mean over gts of the best IoU with any anchor (whether matched or not).
    Ratios are 0 when the batch has no valid gt.
  """
  _check_args(gt_boxes, gt_labels, gt_mask, anchors, batched=True)
  matched_idx, _ = batch_match(gt_boxes, gt_labels, gt_mask, anchors, strategy=strategy,
                               **kwargs)  # [B, A]
  num_gt_slots = jnp.shape(gt_boxes)[1]
  valid = _valid(gt_labels, gt_mask)  # [B, G]
  anchors_xyxy = box_lib.cxcywh_to_xyxy(jnp.asarray(anchors, jnp.float32))  # [A, 4]
  iou = jax.vmap(_iou_matrix, in_axes=(0, 0, None))(gt_boxes, valid, anchors_xyxy)  # [B, G, A]
  per_gt = jax.nn.one_hot(matched_idx, num_gt_slots, dtype=jnp.float32).sum(axis=1)  # [B, G]
  validf = valid.astype(jnp.float32)  # [B, G]
  num_gt = validf.sum()
  denom = jnp.maximum(num_gt, 1.0)
  return {
      "num_gt": num_gt,
      "matched_gt_fraction": ((per_gt > 0) * validf).sum() / denom,
      "positives_per_gt": (per_gt * validf).sum() / denom,
      "best_iou": (jnp.max(iou, axis=2) * validf).sum() / denom,
  }
