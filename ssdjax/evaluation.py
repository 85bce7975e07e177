"""Detection metrics: COCO (pycocotools) and PASCAL VOC (2007 11-point and 2010+ area AP).

Two input layers:

* The public COCO contract, :func:`coco_metrics`: a COCO-format ground truth dict
  (``images``/``annotations``/``categories``, ``bbox`` ``[x, y, w, h]`` in pixels) and a COCO result
  list (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` pixels, ``score``).
* The in-memory records the trainer produces, one dict per image, boxes normalized ``xyxy``:

  - ground truth: ``{"image_id": int, "height": int, "width": int, "boxes": [N, 4] xyxy normalized,
    "labels": [N] int in 1..C-1, "difficult": [N] bool (optional), "is_crowd": [N] bool (optional)}``
  - detections: ``{"image_id": int, "boxes": [D, 4] xyxy normalized, "scores": [D], "labels": [D] int}``

  Label ``l`` is ``class_names[l - 1]`` (0 is background) and is also the COCO category id.
  An image without a detection record has no detections. Pixel boxes appear only when
  :func:`to_coco` / :func:`detections_to_coco` build COCO dicts.

The COCO stats come from pycocotools by default; ``backend="numpy"`` (or ``"faster_coco_eval"``)
gives the same numbers many times faster, see :mod:`ssdjax.coco_backends`.

Undefined values: a metric with no ground truth to measure against (a class without non-difficult
boxes, an area range without boxes) is ``-1``, pycocotools' convention. ``-1`` is never averaged
in: ``mAP`` and the COCO stats are means over the defined entries only (and ``-1`` when none is).

Choices that differ from the reference tools, on purpose:

* VOC IoU is continuous on normalized boxes; the devkit adds 1 to pixel widths
  (``x1 - x0 + 1``), which slightly raises the IoU of small boxes, so numbers can differ a little
  from the MATLAB devkit on the same pixel boxes.
* COCO ``area`` (which decides small/medium/large) is the pixel box area; official COCO annotations
  use the segmentation area, so APs/APm/APl move slightly when records come from COCO.
* ``difficult`` boxes are normal boxes for the COCO metrics (COCO has no such flag); for VOC they
  are ignored as in the devkit. ``is_crowd`` boxes are COCO crowd regions (``iscrowd=1``) for COCO
  and are ignored like ``difficult`` boxes for VOC.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssdjax import coco_backends
from ssdjax.coco_backends import COCO_BACKENDS  # re-exported: the valid `backend` names

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Tolerance for ground truth coordinates outside [0, 1] (float rounding at the data edge).
_BOX_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# In-memory records -> checked NumPy records.


def _array(record, key, where, *, dtype, default_len=None):
  if key not in record:
    if default_len is None:
      raise ValueError(f"{where}: missing field {key!r}")
    return np.zeros((default_len,), dtype)
  return np.asarray(record[key], dtype)


def _image_id(record, where) -> int:
  if "image_id" not in record:
    raise ValueError(f"{where}: missing field 'image_id'")
  image_id = record["image_id"]
  if isinstance(image_id, (bool, np.bool_)) or not isinstance(image_id, (int, np.integer)):
    raise ValueError(f"{where}: image_id must be an int, got {image_id!r}")
  return int(image_id)


def _boxes(record, where) -> np.ndarray:
  boxes = _array(record, "boxes", where, dtype=np.float64)
  if boxes.size == 0:
    return boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{where}: boxes must have shape [N, 4] (xyxy, normalized); got {boxes.shape}")
  if not np.isfinite(boxes).all():
    raise ValueError(f"{where}: boxes[{int(np.argmin(np.isfinite(boxes).all(1)))}] contains NaN or inf")
  return boxes


def _labels(record, where, n, num_classes: Optional[int]) -> np.ndarray:
  labels = _array(record, "labels", where, dtype=np.float64).reshape(-1)
  if labels.shape[0] != n:
    raise ValueError(f"{where}: labels has {labels.shape[0]} entries but boxes has {n}")
  hi = num_classes if num_classes is not None else np.inf
  bad = (labels != np.round(labels)) | (labels < 1) | (labels > hi)
  if bad.any():
    i = int(np.argmax(bad))
    valid = f"1..{num_classes}" if num_classes is not None else "integers >= 1"
    raise ValueError(f"{where}: labels[{i}] = {labels[i]} is not a class; valid labels are {valid} "
                     "(0 is background)")
  return labels.astype(np.int64)


def _flags(record, key, where, n) -> np.ndarray:
  flags = _array(record, key, where, dtype=bool, default_len=n).reshape(-1)
  if flags.shape[0] != n:
    raise ValueError(f"{where}: {key} has {flags.shape[0]} entries but boxes has {n}")
  return flags


def _parse_gt(gt_records: Sequence[Mapping[str, Any]], num_classes: Optional[int]) -> list[dict]:
  """Checks ground truth records; returns them with NumPy fields, in the given order."""
  out, seen = [], set()
  for i, record in enumerate(gt_records):
    where = f"gt_records[{i}]"
    image_id = _image_id(record, where)
    where = f"gt_records[{i}] (image_id {image_id})"
    if image_id in seen:
      raise ValueError(f"{where}: image_id {image_id} appears twice in the ground truth")
    seen.add(image_id)
    size = {}
    for key in ("height", "width"):
      if key not in record or not record[key] > 0:
        raise ValueError(f"{where}: {key} must be a positive pixel size, got {record.get(key)!r}")
      size[key] = int(record[key])
    boxes = _boxes(record, where)
    bad = ((boxes < -_BOX_TOL) | (boxes > 1 + _BOX_TOL)).any(axis=1)
    if bad.any():
      j = int(np.argmax(bad))
      raise ValueError(f"{where}: boxes[{j}] = {boxes[j].tolist()} is outside [0, 1]; boxes must be "
                       "normalized xyxy (divide pixel coordinates by the image width/height)")
    n = boxes.shape[0]
    out.append(dict(image_id=image_id, **size, boxes=boxes,
                    labels=_labels(record, where, n, num_classes),
                    difficult=_flags(record, "difficult", where, n),
                    is_crowd=_flags(record, "is_crowd", where, n)))
  return out


def _parse_dets(det_records: Sequence[Mapping[str, Any]], gt_ids: set,
                num_classes: Optional[int]) -> list[dict]:
  """Checks detection records against the ground truth image ids; returns NumPy records."""
  out, seen = [], set()
  for i, record in enumerate(det_records):
    where = f"det_records[{i}]"
    image_id = _image_id(record, where)
    where = f"det_records[{i}] (image_id {image_id})"
    if image_id not in gt_ids:
      raise ValueError(f"{where}: image_id {image_id} is not in the ground truth; detections must "
                       "belong to evaluated images")
    if image_id in seen:
      raise ValueError(f"{where}: image_id {image_id} has two detection records; merge them")
    seen.add(image_id)
    boxes = _boxes(record, where)
    n = boxes.shape[0]
    scores = _array(record, "scores", where, dtype=np.float64).reshape(-1)
    if scores.shape[0] != n:
      raise ValueError(f"{where}: scores has {scores.shape[0]} entries but boxes has {n}")
    if not np.isfinite(scores).all():
      raise ValueError(f"{where}: scores contains NaN or inf")
    out.append(dict(image_id=image_id, boxes=boxes, scores=scores,
                    labels=_labels(record, where, n, num_classes)))
  return out


def _check_class_names(class_names) -> list[str]:
  names = [str(n) for n in class_names]
  if not names or len(set(names)) != len(names):
    raise ValueError(f"class_names must be non-empty and unique (foreground classes, label l is "
                     f"class_names[l - 1]); got {list(class_names)}")
  return names


# ---------------------------------------------------------------------------------------------
# COCO.


def _xyxy_to_pixel_xywh(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
  """[N, 4] xyxy normalized -> [N, 4] COCO [x, y, w, h] in pixels."""
  scale = np.array([width, height, width, height], np.float64)
  pix = boxes * scale  # [N, 4] xyxy pixels
  return np.concatenate([pix[:, :2], pix[:, 2:] - pix[:, :2]], axis=1)


def to_coco(gt_records: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict:
  """COCO-format ground truth dict from in-memory ground truth records.

  Category ids are the label values (``1..len(class_names)``); ``area`` is the pixel box area;
  ``iscrowd`` comes from ``is_crowd``. ``difficult`` boxes stay normal boxes (COCO has no such flag).
  """
  names = _check_class_names(class_names)
  gts = _parse_gt(gt_records, len(names))
  images, annotations = [], []
  for g in gts:
    images.append({"id": g["image_id"], "height": g["height"], "width": g["width"]})
    xywh = _xyxy_to_pixel_xywh(g["boxes"], g["width"], g["height"])  # [N, 4]
    for box, label, crowd in zip(xywh.tolist(), g["labels"].tolist(), g["is_crowd"].tolist()):
      annotations.append({"id": len(annotations) + 1, "image_id": g["image_id"],
                          "category_id": label, "bbox": box,
                          "area": max(box[2], 0.0) * max(box[3], 0.0), "iscrowd": int(crowd)})
  categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
  return {"images": images, "annotations": annotations, "categories": categories}


def detections_to_coco(det_records: Sequence[Mapping[str, Any]],
                       gt_records: Sequence[Mapping[str, Any]]) -> list[dict]:
  """COCO result list from in-memory detection records (image sizes come from ``gt_records``)."""
  sizes = {g["image_id"]: (g["width"], g["height"]) for g in _parse_gt(gt_records, None)}
  results = []
  for d in _parse_dets(det_records, set(sizes), None):
    xywh = _xyxy_to_pixel_xywh(d["boxes"], *sizes[d["image_id"]])  # [D, 4]
    for box, label, score in zip(xywh.tolist(), d["labels"].tolist(), d["scores"].tolist()):
      results.append({"image_id": d["image_id"], "category_id": label, "bbox": box, "score": score})
  return results


def _coco_gt_copy(gt: Mapping[str, Any]) -> dict:
  """A copy of a COCO gt dict that pycocotools may mutate; fills optional fields, checks ids."""
  for key in ("images", "annotations", "categories"):
    if key not in gt:
      raise ValueError(f"COCO ground truth is missing {key!r}; it needs images, annotations and "
                       "categories")
  annotations, ids = [], set()
  for i, ann in enumerate(gt["annotations"]):
    for key in ("id", "image_id", "category_id", "bbox"):
      if key not in ann:
        raise ValueError(f"gt['annotations'][{i}] is missing {key!r}")
    if ann["id"] in ids:
      raise ValueError(f"gt['annotations'][{i}]: annotation id {ann['id']} is not unique")
    ids.add(ann["id"])
    ann = dict(ann)
    ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    ann.setdefault("iscrowd", 0)
    annotations.append(ann)
  return {"images": [dict(im) for im in gt["images"]], "annotations": annotations,
          "categories": [dict(c) for c in gt["categories"]]}


def _coco_results_copy(detections: Sequence[Mapping[str, Any]], image_ids: set,
                       category_ids: set) -> list[dict]:
  """A checked copy of a COCO result list (pycocotools adds fields to every entry)."""
  out = []
  for i, det in enumerate(detections):
    for key in ("image_id", "category_id", "bbox", "score"):
      if key not in det:
        raise ValueError(f"detections[{i}] is missing {key!r}")
    if det["image_id"] not in image_ids:
      raise ValueError(f"detections[{i}]: image_id {det['image_id']} is not in the ground truth "
                       "images")
    if det["category_id"] not in category_ids:
      raise ValueError(f"detections[{i}]: category_id {det['category_id']} is not a ground truth "
                       f"category; valid ids are {sorted(category_ids)}")
    try:  # plain Python: this runs once per detection (about a million on VOC07 test)
      bbox = [float(v) for v in det["bbox"]]
      score = float(det["score"])
      ok = len(bbox) == 4 and all(map(math.isfinite, bbox)) and math.isfinite(score)
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"detections[{i}]: bbox must be 4 finite numbers [x, y, w, h] (pixels) and "
                       f"score finite; got bbox={det['bbox']!r}, score={det['score']!r}")
    out.append({"image_id": det["image_id"], "category_id": det["category_id"], "bbox": bbox,
                "score": score})
  return out


def _coco_results_arrays(detections: Sequence[Mapping[str, Any]], image_ids: set,
                         category_ids: set) -> tuple[list, list, np.ndarray, np.ndarray]:
  """The checks of :func:`_coco_results_copy` as whole-array operations.

  Returns:
    (image_id [D], category_id [D] as given, bbox [D, 4] [x, y, w, h] pixels float64, score [D]).
  """
  n = len(detections)
  try:
    image_id = [det["image_id"] for det in detections]
    category_id = [det["category_id"] for det in detections]
    bbox = np.asarray([det["bbox"] for det in detections], np.float64)
    score = np.asarray([det["score"] for det in detections], np.float64)
    ok = (bbox.shape == (n, 4) and score.shape == (n,) and np.isfinite(bbox).all()
          and np.isfinite(score).all() and set(image_id) <= image_ids
          and set(category_id) <= category_ids)
  except (KeyError, TypeError, ValueError):
    ok = False
  if not ok:
    # The per-entry checks name the first bad entry; whatever they accept is used as they copy it.
    results = _coco_results_copy(detections, image_ids, category_ids)
    image_id = [det["image_id"] for det in results]
    category_id = [det["category_id"] for det in results]
    bbox = np.array([det["bbox"] for det in results], np.float64).reshape(n, 4)
    score = np.array([det["score"] for det in results], np.float64).reshape(n)
  return image_id, category_id, bbox.reshape(n, 4), score


def coco_metrics(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], *,
                 per_class: bool = False, verbose: bool = False,
                 backend: str = "pycocotools") -> dict[str, float]:
  """The 12 COCO box stats of pycocotools' ``COCOeval``.

  Args:
    gt: COCO-format ground truth: ``images`` (``id``, ``height``, ``width``), ``annotations``
      (``id``, ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels, ``area`` and
      ``iscrowd``, filled from the box / as 0 when absent) and ``categories`` (``id``, ``name``).
    detections: COCO result list, each ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels
      and ``score``. May be empty (every defined stat is then 0).
    per_class: also return ``"AP/<category name>"``: AP at IoU .50:.95, all areas, 100 detections.
    verbose: let pycocotools print its progress and summary table (the other backends: their
      own progress, if any, and the table).
    backend: one of ``COCO_BACKENDS`` (:mod:`ssdjax.coco_backends`), all with pycocotools'
      numbers: "pycocotools" (the reference), "faster_coco_eval" (the faster-coco-eval package, an
      optional dependency) or "numpy" (pycocotools' algorithm vectorized here, the fastest).

  Returns:
    ``{name: value}`` with the keys of ``COCO_STATS`` in order (AP, AP50, ..., ARl), then the
    per-class entries. A value is -1 where there is no ground truth to measure (pycocotools'
    convention, e.g. APs without small boxes, or a class without boxes).

  Raises:
    ValueError: a detection names an image or category that the ground truth does not have, an
      entry misses a field, or ``backend`` is not one of ``COCO_BACKENDS``.
    ImportError: backend "faster_coco_eval" without the faster-coco-eval package.
  """
  coco_backends.check_backend(backend)
  gt = _coco_gt_copy(gt)
  image_ids = {im["id"] for im in gt["images"]}
  category_ids = {c["id"] for c in gt["categories"]}
  if backend == "numpy":
    stats, precision, cat_ids = coco_backends.numpy_coco_stats(
        gt, *_coco_results_arrays(detections, image_ids, category_ids), verbose=verbose)
  elif backend == "faster_coco_eval":
    stats, precision, cat_ids = coco_backends.faster_coco_eval_stats(
        gt, _coco_results_copy(detections, image_ids, category_ids), verbose=verbose)
  else:
    results = _coco_results_copy(detections, image_ids, category_ids)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
      coco_gt = COCO()
      coco_gt.dataset = gt
      coco_gt.createIndex()
      if results:
        coco_dt = coco_gt.loadRes(results)
      else:
        # loadRes cannot take an empty list; an empty result set scores 0 wherever gt exists.
        coco_dt = COCO()
        coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"],
                           "annotations": []}
        coco_dt.createIndex()
      evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    stats, precision = evaluator.stats, evaluator.eval["precision"]
    cat_ids = evaluator.params.catIds
  out = {name: float(v) for name, v in zip(COCO_STATS, stats)}
  if per_class:
    # precision: [T iou thresholds, R recall thresholds, K categories, A areas, M max dets]; -1 = no gt.
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    for k, cat_id in enumerate(cat_ids):
      p = precision[:, :, k, 0, -1]  # area "all", maxDets 100
      out[f"AP/{names[cat_id]}"] = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
  return out


# ---------------------------------------------------------------------------------------------
# PASCAL VOC.


def voc_ap(recall, precision, *, use_07_metric: bool) -> float:
  """Average precision from a precision/recall curve, as the PASCAL VOC devkit defines it.

  Args:
    recall: [D] cumulative recall after each detection (score order).
    precision: [D] cumulative precision after each detection.
    use_07_metric: True: VOC2007 11-point interpolation, the mean over t in {0, 0.1, ..., 1} of the
      best precision at recall >= t. False: VOC2010+ area under the monotone (non-increasing)
      envelope of the precision/recall curve.

  Returns:
    AP in [0, 1]; 0 for an empty curve.
  """
  recall = np.asarray(recall, np.float64).reshape(-1)
  precision = np.asarray(precision, np.float64).reshape(-1)
  if recall.shape != precision.shape:
    raise ValueError(f"recall has {recall.shape[0]} entries but precision has {precision.shape[0]}")
  if use_07_metric:
    ap = 0.0
    # np.arange's thresholds (0.30000000000000004, ...) as in the devkit's Python port, so that a
    # recall of exactly 0.3 scores the same as there.
    for t in np.arange(0.0, 1.1, 0.1):
      above = recall >= t
      ap += (precision[above].max() if above.any() else 0.0) / 11.0
    return float(ap)
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at this recall or more
  steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise IoU, a: [N, 4] xyxy, b: [M, 4] xyxy -> [N, M]; 0 for empty unions.

  ``boxes.iou`` in float64 NumPy: evaluation runs on the host, one small matrix per image.
  """
  lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
  wh = np.clip(rb - lt, 0.0, None)  # [N, M, 2]
  inter = wh[..., 0] * wh[..., 1]  # [N, M]
  area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)  # [N]
  area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)  # [M]
  union = area_a[:, None] + area_b[None, :] - inter  # [N, M]
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _voc_curves(gts: list[dict], dets: list[dict], num_classes: int,
                iou_threshold: float) -> list[Optional[tuple[np.ndarray, np.ndarray]]]:
  """Per class 1..num_classes: (recall [D], precision [D]) in score order, None without positives.

  The devkit's rule, vectorized: a detection goes to its highest-IoU ground truth box of the same
  class in its image (first box on ties). If that IoU >= threshold: a difficult box -> ignored
  (neither TP nor FP); otherwise TP if it is the box's highest-scoring such detection, else FP
  (duplicate). Below the threshold -> FP. A duplicate stays FP even when another box of the class
  would have matched it, as in the devkit. Score ties keep input order (a stable sort).
  """
  npos = np.zeros(num_classes + 1, np.int64)
  gt_by_id, gt_offset = {}, 0  # gt_offset: index of an image's first box among all boxes
  for g in gts:
    dont_care = g["difficult"] | g["is_crowd"]  # [G]
    npos += np.bincount(g["labels"][~dont_care], minlength=num_classes + 1)
    gt_by_id[g["image_id"]] = (g, dont_care, gt_offset)
    gt_offset += g["labels"].shape[0]
  labels, scores, hit, ignored, gt_uid = [], [], [], [], []
  for d in dets:
    g, dont_care, offset = gt_by_id[d["image_id"]]
    num_det, num_gt = d["labels"].shape[0], g["labels"].shape[0]
    if num_gt:
      ov = _iou_np(d["boxes"], g["boxes"])  # [D, G]
      ov = np.where(d["labels"][:, None] == g["labels"][None, :], ov, -np.inf)  # same class only
      best = np.argmax(ov, axis=1)  # [D]
      best_iou = ov[np.arange(num_det), best]  # [D]
      is_hit = best_iou >= iou_threshold
      is_ignored = is_hit & dont_care[best]
    else:
      best = np.zeros(num_det, np.int64)
      is_hit = is_ignored = np.zeros(num_det, bool)
    labels.append(d["labels"])
    scores.append(d["scores"])
    hit.append(is_hit)
    ignored.append(is_ignored)
    gt_uid.append(offset + best)
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
  labels, scores = cat(labels, np.int64), cat(scores, np.float64)
  hit, ignored, gt_uid = cat(hit, bool), cat(ignored, bool), cat(gt_uid, np.int64)

  curves = []
  for c in range(1, num_classes + 1):
    if npos[c] == 0:
      curves.append(None)
      continue
    sel = np.nonzero(labels == c)[0]
    order = sel[np.argsort(-scores[sel], kind="stable")]  # [Dc] best first
    counted = hit[order] & ~ignored[order]  # [Dc] reaches a non-difficult box
    tp = np.zeros(order.shape[0], bool)
    cand = np.nonzero(counted)[0]
    _, first = np.unique(gt_uid[order][cand], return_index=True)  # first detection per gt box
    tp[cand[first]] = True
    fp = ~tp & ~ignored[order]
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_cum / float(npos[c])
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    curves.append((recall, precision))
  return curves


def _voc_from_curves(curves, names: Sequence[str], use_07_metric: bool) -> dict[str, float]:
  aps = {n: voc_ap(*c, use_07_metric=use_07_metric) for n, c in zip(names, curves) if c is not None}
  out = {"mAP": float(np.mean(list(aps.values()))) if aps else -1.0}
  out.update({f"AP/{n}": aps.get(n, -1.0) for n in names})
  return out


def voc_metrics(gt_records: Sequence[Mapping[str, Any]], det_records: Sequence[Mapping[str, Any]],
                class_names: Sequence[str], *, iou_threshold: float = 0.5,
                use_07_metric: bool = True) -> dict[str, float]:
  """PASCAL VOC detection AP per class and its mean.

  Follows the devkit (``VOCevaldet``): per class, detections of all images sorted by score; each
  goes to its highest-IoU ground truth box of that class in its image; IoU >= ``iou_threshold`` on
  a box not yet taken -> TP, on a taken box -> FP (duplicate), on a ``difficult`` (or ``is_crowd``)
  box -> ignored; lower IoU -> FP. Difficult boxes do not count as positives. Score ties keep the
  input order (record order, then box order), like MATLAB's stable ``sort``. Unlike the devkit, IoU
  is continuous on normalized boxes (no +1 pixel convention).

  Args:
    gt_records: in-memory ground truth records (module docstring), normalized xyxy boxes.
    det_records: in-memory detection records; every image_id must be in ``gt_records``.
    class_names: foreground class names; label l is ``class_names[l - 1]``.
    iou_threshold: minimum IoU for a match.
    use_07_metric: VOC2007 11-point AP (True) or VOC2010+ area AP (False), see :func:`voc_ap`.

  Returns:
    ``{"mAP": mean AP over classes with at least one non-difficult box, "AP/<name>": AP}``;
    -1 for a class without non-difficult boxes (and for mAP when no class has one).
  """
  if not 0.0 < iou_threshold <= 1.0:
    raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
  names = _check_class_names(class_names)
  gts = _parse_gt(gt_records, len(names))
  dets = _parse_dets(det_records, {g["image_id"] for g in gts}, len(names))
  curves = _voc_curves(gts, dets, len(names), float(iou_threshold))
  return _voc_from_curves(curves, names, use_07_metric)


METRICS = ("voc07", "voc", "coco")


def evaluate(gt_records: Sequence[Mapping[str, Any]], det_records: Sequence[Mapping[str, Any]],
             class_names: Sequence[str], metrics: Sequence[str] = METRICS, *,
             backend: str = "pycocotools") -> dict[str, float]:
  """Several metric families on in-memory records, as one flat dict for logging.

  Args:
    gt_records, det_records, class_names: as in :func:`voc_metrics`.
    metrics: any of ``METRICS``: "voc07" (VOC2007 11-point AP at IoU 0.5), "voc" (VOC2010+ area
      AP at IoU 0.5), "coco" (the 12 COCO stats plus per-class AP, as pycocotools gives them).
    backend: the COCO backend, see :func:`coco_metrics`; checked even when "coco" is not asked for,
      so that a typo fails on the first call.

  Returns:
    Keys prefixed by the metric family: ``voc07/mAP``, ``voc07/AP/<name>``, ``voc/mAP``,
    ``voc/AP/<name>``, ``coco/AP``, ``coco/AP50``, ..., ``coco/ARl``, ``coco/AP/<name>``.
    -1 marks undefined values (see the module docstring).
  """
  if isinstance(metrics, str):
    metrics = (metrics,)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise ValueError(f"unknown metrics {unknown}; valid metrics are {list(METRICS)}")
  coco_backends.check_backend(backend)
  names = _check_class_names(class_names)
  gts = _parse_gt(gt_records, len(names))
  dets = _parse_dets(det_records, {g["image_id"] for g in gts}, len(names))
  out = {}
  if "voc07" in metrics or "voc" in metrics:
    curves = _voc_curves(gts, dets, len(names), iou_threshold=0.5)
    for family, use_07 in (("voc07", True), ("voc", False)):
      if family in metrics:
        out.update({f"{family}/{k}": v for k, v in _voc_from_curves(curves, names, use_07).items()})
  if "coco" in metrics:
    stats = coco_metrics(to_coco(gt_records, names), detections_to_coco(det_records, gt_records),
                         per_class=True, backend=backend)
    out.update({f"coco/{k}": v for k, v in stats.items()})
  return out
