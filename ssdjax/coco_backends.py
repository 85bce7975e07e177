"""COCO box evaluation without pycocotools' Python loops: the same 12 stats and precision array.

:func:`ssdjax.evaluation.coco_metrics` picks a backend by name (``COCO_BACKENDS``):

* ``"pycocotools"``: the reference ``COCOeval``, in :mod:`ssdjax.evaluation`. It matches each
  image and category in Python: 35-60 s on a VOC07-test-sized set (4952 images x 200
  detections, ``benchmarks/coco_eval.py``).
* ``"faster_coco_eval"``: :func:`faster_coco_eval_stats`, the ``faster-coco-eval`` package
  (``COCOeval_faster``: C++ matching and accumulation behind pycocotools' API), 2-5x faster; its
  Python loading of the result list is most of what is left. An optional dependency, imported
  only when asked for.
* ``"numpy"``: :func:`numpy_coco_stats`, pycocotools' ``evaluateImg`` / ``accumulate`` /
  ``summarize`` rewritten here with NumPy over all image/category pairs at once, about 20x
  faster. It follows the reference step by step (same IoU formula, same stable sorts, same float
  expressions), so its stats come out equal to pycocotools', ties included (the tests and the
  benchmark find no difference at all).

All backends take pycocotools' default bbox parameters: IoU thresholds .50:.05:.95, 101 recall
thresholds, maxDets (1, 10, 100), area ranges all/small/medium/large on the annotation ``area``
(detections: ``w * h``), both bounds inclusive.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

COCO_BACKENDS = ("pycocotools", "faster_coco_eval", "numpy")

# pycocotools' Params.setDetParams, written the same way so that the floats are the same.
IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)  # [T]
REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)  # [R]
MAX_DETS = (1, 10, 100)  # [M]
AREA_RNG = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))  # [A]
AREA_LBL = ("all", "small", "medium", "large")

# (ap, iouThr, areaRng, maxDets) of the 12 stats, in COCO_STATS order (COCOeval._summarizeDets).
_SUMMARY = ((1, None, "all", 100), (1, .5, "all", 100), (1, .75, "all", 100),
            (1, None, "small", 100), (1, None, "medium", 100), (1, None, "large", 100),
            (0, None, "all", 1), (0, None, "all", 10), (0, None, "all", 100),
            (0, None, "small", 100), (0, None, "medium", 100), (0, None, "large", 100))


def check_backend(backend: str) -> str:
  if backend not in COCO_BACKENDS:
    raise ValueError(f"unknown COCO backend {backend!r}; valid backends are {list(COCO_BACKENDS)}")
  return backend


# ---------------------------------------------------------------------------------------------
# faster-coco-eval.


def faster_coco_eval_stats(gt: dict, results: list[dict], *, verbose: bool = False
                           ) -> tuple[np.ndarray, np.ndarray, list]:
  """The 12 stats with ``faster_coco_eval.COCOeval_faster``.

  Args:
    gt: a checked COCO ground truth dict that may be mutated (``evaluation._coco_gt_copy``).
    results: a checked COCO result list that may be mutated (``evaluation._coco_results_copy``).
    verbose: print faster-coco-eval's progress and summary table.

  Returns:
    (stats [12], precision [T, R, K, A, M] with -1 where no gt, category ids [K] in that order).
  """
  try:
    from faster_coco_eval import COCO, COCOeval_faster  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("backend='faster_coco_eval' needs the faster-coco-eval package: "
                      "pip install 'faster-coco-eval>=1.6' (or use backend='numpy')") from e
  coco_gt = COCO(gt)  # its loading messages go to a debug logger
  if results:
    coco_dt = coco_gt.loadRes(results)
  else:
    # loadRes takes an empty list only from faster-coco-eval 1.8 on.
    coco_dt = COCO({"images": gt["images"], "categories": gt["categories"], "annotations": []})
  say = print if verbose else (lambda *args, **kwargs: None)
  evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=say)
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return (np.asarray(evaluator.stats[:12], np.float64), evaluator.eval["precision"],
          list(evaluator.params.catIds))


# ---------------------------------------------------------------------------------------------
# NumPy.


def _bb_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
  """pycocotools' bbIou (maskApi.c), broadcast: d [..., D, 1, 4], g [..., 1, G, 4] [x, y, w, h]
  pixels, crowd [..., 1, G] bool -> IoU [..., D, G].

  The same operations in the same order as the C code, so the IoUs are bit-identical and
  threshold comparisons and ties come out the same. A crowd box's union is the detection area.
  """
  dx, dy, dw, dh = np.moveaxis(d, -1, 0)
  gx, gy, gw, gh = np.moveaxis(g, -1, 0)
  w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
  h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
  inter = w * h
  union = np.where(crowd, dw * dh, dw * dh + gw * gh - inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _last_argmax(v: np.ndarray) -> np.ndarray:
  """Index of the last maximum along the last axis."""
  return v.shape[-1] - 1 - np.argmax(v[..., ::-1], axis=-1)


def _match(ious, crowd, gt_ignore, gt_zero_id, num_dets):
  """COCOeval.evaluateImg's greedy matching for P image/category pairs, all thresholds and area
  ranges at once.

  Args:
    ious: [P, D, G] IoU of a pair's detections (best score first) with its gt boxes (dataset
      order); padding gt slots are -1 (never reach a threshold).
    crowd: [P, G] bool, iscrowd.
    gt_ignore: [A, P, G] bool, crowd or area outside the range ("_ignore").
    gt_zero_id: [P, G] bool, annotation id 0 (see below).
    num_dets: [P] detections of each pair (<= D), in non-increasing order.

  Returns:
    (matched [A, T, P, D], on_ignored [A, T, P, D]) bool: the detection took a gt (one whose id is
    not 0, see below); the gt it took is an ignored one.

  pycocotools scans the gts with the non-ignored ones first: a detection takes the free
  (unmatched, or crowd) gt of highest IoU >= threshold, the last such on ties, a non-ignored one
  if any qualifies, else an ignored one. Detections go in score order because a taken gt is no
  longer free for the next ones. pycocotools records a match as the gt's id, so a gt with id 0 is
  taken but its detection counts as unmatched; kept here for parity.
  """
  num_pairs, max_dets, _ = ious.shape
  thr = np.minimum(IOU_THRS, 1 - 1e-10)[:, None, None]  # [T, 1, 1] pycocotools' min([t, 1-1e-10])
  shape = (len(AREA_RNG), len(IOU_THRS), num_pairs)
  taken = np.zeros(shape + (ious.shape[2],), bool)  # [A, T, P, G]
  matched = np.zeros(shape + (max_dets,), bool)
  on_ignored = np.zeros(shape + (max_dets,), bool)
  for d in range(max_dets):
    n = int(np.sum(num_dets > d))  # pairs are sorted by detection count: a prefix is active
    iou = ious[:n, d]  # [n, G]
    cand = (iou >= thr) & ~(taken[:, :, :n] & ~crowd[:n])  # [A, T, n, G]
    ignore = gt_ignore[:, None, :n]  # [A, 1, n, G]
    v_reg = np.where(cand & ~ignore, iou, -np.inf)
    v_ign = np.where(cand & ignore, iou, -np.inf)
    has_reg = v_reg.max(-1) > -np.inf  # [A, T, n]
    has_ign = v_ign.max(-1) > -np.inf
    m = np.where(has_reg, _last_argmax(v_reg), _last_argmax(v_ign))  # [A, T, n]
    hit = has_reg | has_ign
    taken[:, :, :n] |= (np.arange(taken.shape[-1]) == m[..., None]) & hit[..., None]
    zero_id = gt_zero_id[np.arange(n), m]  # [A, T, n]
    matched[:, :, :n, d] = hit & ~zero_id
    on_ignored[:, :, :n, d] = ~has_reg & has_ign
  return matched, on_ignored


def _pair_slices(keys: np.ndarray):
  """Sorted keys [N] -> (unique keys [U], start [U], count [U])."""
  uniq, start, count = np.unique(keys, return_index=True, return_counts=True)
  return uniq, start, count


def _area_outside(area: np.ndarray) -> np.ndarray:
  """[N] areas -> [A, N] bool, outside each area range (pycocotools: area < lo or area > hi)."""
  return np.stack([(area < lo) | (area > hi) for lo, hi in AREA_RNG])


def _gt_arrays(gt: Mapping[str, Any], img_index: dict, cat_index: dict):
  """Ground truth annotations of listed images and categories, as arrays in dataset order."""
  rows = [(img_index.get(a["image_id"], -1), cat_index.get(a["category_id"], -1), a)
          for a in gt["annotations"]]
  # pycocotools only evaluates annotations of listed images and categories.
  rows = [r for r in rows if r[0] >= 0 and r[1] >= 0]
  n = len(rows)
  img = np.fromiter((r[0] for r in rows), np.int64, n)
  cat = np.fromiter((r[1] for r in rows), np.int64, n)
  box = np.array([r[2]["bbox"] for r in rows], np.float64).reshape(n, 4)
  area = np.fromiter((r[2]["area"] for r in rows), np.float64, n)
  crowd = np.fromiter((bool(r[2]["iscrowd"]) for r in rows), bool, n)
  zero_id = np.fromiter((r[2]["id"] == 0 for r in rows), bool, n)
  return img, cat, box, area, crowd, zero_id


def _match_all(g_key, g_box, g_area, g_crowd, g_zero, d_key, d_box):
  """Greedy matching of every image/category pair that has both gts and detections.

  Args:
    g_key: [G] sorted pair keys (image index * K + category index) of the gts, dataset order
      within a pair; g_box [G, 4] [x, y, w, h] pixels, g_area [G], g_crowd [G], g_zero [G] (id 0).
    d_key: [D] sorted pair keys of the detections, best first within a pair and at most
      maxDets[-1] per pair; d_box [D, 4] [x, y, w, h] pixels.

  Returns:
    (matched [A, T, D], on_ignored [A, T, D]) as in :func:`_match`; the detections of pairs
    without gt stay unmatched.
  """
  matched = np.zeros((len(AREA_RNG), len(IOU_THRS), d_key.shape[0]), bool)
  on_ignored = np.zeros_like(matched)
  g_keys, g_start, g_count = _pair_slices(g_key)
  d_keys, d_start, d_count = _pair_slices(d_key)
  both = np.isin(d_keys, g_keys)
  if not both.any():
    return matched, on_ignored
  d_keys, d_start, d_count = d_keys[both], d_start[both], d_count[both]
  where = np.searchsorted(g_keys, d_keys)
  g_start, g_count = g_start[where], g_count[where]
  g_outside = _area_outside(g_area)  # [A, G]
  # Pad gts to a power of two per bucket so that a few crowded images do not pad all pairs.
  bucket = np.ceil(np.log2(g_count)).astype(np.int64)
  for b in np.unique(bucket):
    sel = np.nonzero(bucket == b)[0]
    sel = sel[np.argsort(-d_count[sel], kind="stable")]  # most detections first
    n_g, n_d = int(g_count[sel].max()), int(d_count[sel].max())
    gi = g_start[sel, None] + np.arange(n_g)  # [P, n_g]
    g_valid = np.arange(n_g) < g_count[sel, None]
    gi = np.where(g_valid, gi, g_start[sel, None])
    di = d_start[sel, None] + np.arange(n_d)  # [P, n_d]
    d_valid = np.arange(n_d) < d_count[sel, None]
    di = np.where(d_valid, di, d_start[sel, None])
    crowd = g_crowd[gi] & g_valid  # [P, n_g]
    ious = _bb_iou(d_box[di][:, :, None], g_box[gi][:, None], crowd[:, None])  # [P, n_d, n_g]
    ious = np.where(g_valid[:, None], ious, -1.0)
    ignore = (g_crowd[gi] | g_outside[:, gi]) & g_valid  # [A, P, n_g]
    m, ig = _match(ious, crowd, ignore, g_zero[gi] & g_valid, d_count[sel])
    flat = di[d_valid]  # [sum of counts] detection indices, pair-major like m[..., d_valid]
    matched[:, :, flat] = m[:, :, d_valid]
    on_ignored[:, :, flat] = ig[:, :, d_valid]
  return matched, on_ignored


def _accumulate(num_cats, d_cat, d_rank, d_score, d_outside, matched, on_ignored, npig):
  """COCOeval.accumulate: precision [T, R, K, A, M] and recall [T, K, A, M], -1 without gt.

  Args:
    num_cats: K.
    d_cat, d_rank, d_score: [D] category index, rank within its image/category pair, score of the
      kept detections, in image order and best first within a pair (the order in which
      pycocotools concatenates them before its stable score sort).
    d_outside: [A, D] area outside each range; matched, on_ignored: [A, T, D] from :func:`_match`.
    npig: [K, A] gts that count.

  pycocotools builds the whole precision/recall curve of a category over its N detections (about
  50000 a class on VOC07 test) and reads it at the first detection that reaches each recall
  threshold. That detection is always a true positive, and between two true positives precision
  only falls, so the curve's envelope is the same when only evaluated at the "touched" detections
  (matched or on an ignored gt at some threshold and area: a few per gt). The counts there (true
  positives, and non-ignored detections = an area-only count corrected at touched ones) are the
  same integers, and the float expressions are pycocotools', so the numbers are identical.
  """
  T, R, A, M = len(IOU_THRS), len(REC_THRS), len(AREA_RNG), len(MAX_DETS)
  precision = -np.ones((T, R, num_cats, A, M))
  recall = -np.ones((T, num_cats, A, M))
  inside = ~d_outside  # [A, D] not ignored unless matched (dtIgnore's area rule)
  touched = np.nonzero((matched | on_ignored).any(axis=(0, 1)))[0]  # [S]
  touched_index = np.full(d_cat.shape, -1)
  touched_index[touched] = np.arange(touched.shape[0])
  t_matched, t_on_ignored = matched[:, :, touched], on_ignored[:, :, touched]  # [A, T, S]
  t_tp = t_matched & ~t_on_ignored  # dtMatches and not dtIgnore
  # Counted (not dtIgnore), minus what the area-only count assumes.
  t_delta = ((~t_on_ignored & (t_matched | inside[:, None, touched])).astype(np.int64)
             - inside[:, None, touched])  # [A, T, S]
  for k in range(num_cats):
    if not (npig[k] > 0).any():
      continue
    of_cat = np.nonzero(d_cat == k)[0]
    # A stable sort of a subset is the subsequence of the stable sort of the whole: sort once.
    of_cat = of_cat[np.argsort(-d_score[of_cat], kind="mergesort")]
    for m, max_det in enumerate(MAX_DETS):
      sel = of_cat[d_rank[of_cat] < max_det]  # [N] pycocotools' order for this maxDet
      nd = sel.shape[0]
      pos = np.nonzero(touched_index[sel] >= 0)[0]  # [S'] touched positions along the curve
      ti = touched_index[sel[pos]]
      base = np.cumsum(inside[:, sel], axis=1)[:, pos]  # [A, S'] in-range detections so far
      counted = base[:, None] + np.cumsum(t_delta[:, :, ti], axis=2)  # [A, T, S']
      tp_sum = np.cumsum(t_tp[:, :, ti], axis=2).astype(dtype=float)
      fp_sum = counted - tp_sum
      for a in range(A):
        if npig[k, a] == 0:
          continue
        tp, fp = tp_sum[a], fp_sum[a]  # [T, S']
        rc = tp / int(npig[k, a])
        pr = tp / (fp + tp + np.spacing(1))
        # rc[-1]: all true positives are touched; none (or no detection) is recall 0.
        recall[:, k, a, m] = rc[:, -1] if pos.shape[0] else 0.0
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # best precision at >= recall
        for t in range(T):
          pi = np.searchsorted(rc[t], REC_THRS, side="left")  # [R]
          # Thresholds above the last recall keep precision 0, as pycocotools' try/except.
          q = pr[t][np.minimum(pi, pos.shape[0] - 1)] if pos.shape[0] else np.zeros(R)
          precision[t, :, k, a, m] = np.where(pi < pos.shape[0], q, 0.0)
  return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray, *, verbose: bool = False) -> np.ndarray:
  """COCOeval.summarize for bbox: the 12 stats [12] from precision [T, R, K, A, M] and recall
  [T, K, A, M]; the mean over entries > -1, or -1 when none is."""
  stats = np.zeros((len(_SUMMARY),))
  for i, (ap, iou_thr, area, max_dets) in enumerate(_SUMMARY):
    a, m = AREA_LBL.index(area), MAX_DETS.index(max_dets)
    s = precision if ap else recall
    if iou_thr is not None:
      s = s[np.where(iou_thr == IOU_THRS)[0]]
    s = s[:, :, :, a, m] if ap else s[:, :, a, m]
    stats[i] = np.mean(s[s > -1]) if (s > -1).any() else -1
    if verbose:
      iou_str = f"{IOU_THRS[0]:0.2f}:{IOU_THRS[-1]:0.2f}" if iou_thr is None else f"{iou_thr:0.2f}"
      title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
      print(f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] "
            f"= {stats[i]:0.3f}")
  return stats


def numpy_coco_stats(gt: Mapping[str, Any], image_id: Sequence, category_id: Sequence,
                     bbox: np.ndarray, score: np.ndarray, *, verbose: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, list]:
  """pycocotools' bbox COCOeval (evaluate, accumulate, summarize) in NumPy.

  Args:
    gt: a checked COCO ground truth dict (``evaluation._coco_gt_copy``: every annotation has
      ``id``, ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels, ``area``, ``iscrowd``).
    image_id, category_id: [D] ids of the detections, each an image / category of ``gt``.
    bbox: [D, 4] detections [x, y, w, h] pixels, float64.
    score: [D] float64.
    verbose: print the summary table.

  Returns:
    (stats [12], precision [T, R, K, A, M] with -1 where no gt, category ids [K] in that order).
  """
  img_ids = sorted({im["id"] for im in gt["images"]})
  cat_ids = sorted({c["id"] for c in gt["categories"]})
  img_index = {v: i for i, v in enumerate(img_ids)}
  cat_index = {v: i for i, v in enumerate(cat_ids)}
  num_cats = len(cat_ids)

  g_img, g_cat, g_box, g_area, g_crowd, g_zero = _gt_arrays(gt, img_index, cat_index)
  g_order = np.argsort(g_img * num_cats + g_cat, kind="stable")  # pairs, dataset order within
  g_img, g_cat, g_box, g_area, g_crowd, g_zero = (x[g_order] for x in (
      g_img, g_cat, g_box, g_area, g_crowd, g_zero))
  g_key = g_img * num_cats + g_cat
  # npig: [K, A] gts that count (not crowd, area in range).
  counts = ~(g_crowd[None] | _area_outside(g_area))  # [A, G]
  npig = np.stack([np.bincount(g_cat[c], minlength=num_cats) for c in counts], axis=1)  # [K, A]

  n = len(image_id)
  d_img = np.fromiter(map(img_index.__getitem__, image_id), np.int64, n)
  d_cat = np.fromiter(map(cat_index.__getitem__, category_id), np.int64, n)
  bbox = np.asarray(bbox, np.float64).reshape(n, 4)
  score = np.asarray(score, np.float64).reshape(n)
  # Best first within each image/category, ties in input order (pycocotools' two mergesorts).
  order = np.argsort(-score, kind="stable")
  d_key = d_img * num_cats + d_cat
  order = order[np.argsort(d_key[order], kind="stable")]
  d_key = d_key[order]
  _, start, count = _pair_slices(d_key)
  rank = np.arange(n) - np.repeat(start, count)  # [D] position within the pair
  keep = rank < MAX_DETS[-1]  # computeIoU drops the rest of a pair's detections
  order, d_key, rank = order[keep], d_key[keep], rank[keep]
  d_box = bbox[order]
  d_area = d_box[:, 2] * d_box[:, 3]  # loadRes: area = w * h

  matched, on_ignored = _match_all(g_key, g_box, g_area, g_crowd, g_zero, d_key, d_box)
  precision, recall = _accumulate(num_cats, d_cat[order], rank, score[order], _area_outside(d_area),
                                  matched, on_ignored, npig)
  return summarize(precision, recall, verbose=verbose), precision, cat_ids
