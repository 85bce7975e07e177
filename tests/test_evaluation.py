"""Tests for ssdjax.evaluation: against pycocotools called directly, a port of the VOC devkit's
voc_eval written here, and hand-computed precision/recall curves."""

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssdjax import evaluation

NAMES = ("cat", "dog", "bird")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------- random records

def rand_boxes(rng, n, lo=0.02, hi=0.7):
  wh = rng.uniform(lo, hi, (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (1 - wh)
  return np.concatenate([xy, xy + wh], 1)


def rand_records(seed, num_images=12, num_classes=len(NAMES), crowd=True):
  """Ground truth with difficult/crowd flags and empty images; detections that jitter the gt, add
  duplicates, wrong labels and random boxes; some images without a detection record."""
  rng = np.random.default_rng(seed)
  gts, dets = [], []
  for i in range(num_images):
    n = int(rng.integers(0, 6)) if i % 5 else 0  # every 5th image has no gt
    boxes = rand_boxes(rng, n)
    labels = rng.integers(1, num_classes + 1, n)
    gts.append({"image_id": 100 + i, "height": int(rng.integers(80, 640)),
                "width": int(rng.integers(80, 640)), "boxes": boxes, "labels": labels,
                "difficult": rng.random(n) < 0.2,
                "is_crowd": (rng.random(n) < 0.15) if crowd else np.zeros(n, bool)})
    if i % 4 == 3:  # images with gt but no detection record
      continue
    wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)  # [n, 4] jitter relative to the box size
    jitter = boxes + rng.normal(0, 0.1, boxes.shape) * wh
    dup = jitter[: n // 2] + rng.normal(0, 0.1, (n // 2, 4)) * wh[: n // 2]
    extra = rand_boxes(rng, int(rng.integers(0, 4)))
    d_boxes = np.concatenate([jitter, dup, extra])
    d_boxes = np.clip(np.concatenate([np.minimum(d_boxes[:, :2], d_boxes[:, 2:] - 0.01),
                                      d_boxes[:, 2:]], 1), 0, 1)
    d_labels = np.concatenate([labels, labels[: n // 2], rng.integers(1, num_classes + 1, len(extra))])
    flip = rng.random(len(d_labels)) < 0.15
    d_labels = np.where(flip, rng.integers(1, num_classes + 1, len(d_labels)), d_labels)
    dets.append({"image_id": 100 + i, "boxes": d_boxes,
                 "scores": rng.random(len(d_labels)), "labels": d_labels})
  return gts, dets


# ---------------------------------------------------------------- pycocotools, called directly

def direct_cocoeval(gt, results, cat_ids=None):
  """COCOeval on deep copies; an empty result set is built by hand (loadRes rejects [])."""
  gt = copy.deepcopy(gt)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    if results:
      coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    else:
      coco_dt = COCO()
      coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
      coco_dt.createIndex()
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    if cat_ids is not None:
      ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coco_metrics_equals_pycocotools(seed):
  gts, dets = rand_records(seed)
  gt = evaluation.to_coco(gts, NAMES)
  results = evaluation.detections_to_coco(dets, gts)
  assert any(a["iscrowd"] for a in gt["annotations"])
  got = evaluation.coco_metrics(gt, results, per_class=True)
  assert list(got)[:12] == list(STATS)
  np.testing.assert_array_equal([got[k] for k in STATS], direct_cocoeval(gt, results))
  for cat in gt["categories"]:
    assert got[f"AP/{cat['name']}"] == direct_cocoeval(gt, results, cat_ids=[cat["id"]])[0]


def test_coco_metrics_does_not_mutate_inputs():
  gts, dets = rand_records(5)
  gt = evaluation.to_coco(gts, NAMES)
  results = evaluation.detections_to_coco(dets, gts)
  gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
  evaluation.coco_metrics(gt, results)
  assert gt == gt_before and results == results_before


def test_coco_metrics_silent_unless_verbose(capsys):
  gts, dets = rand_records(6)
  gt, results = evaluation.to_coco(gts, NAMES), evaluation.detections_to_coco(dets, gts)
  evaluation.coco_metrics(gt, results)
  assert capsys.readouterr().out == ""
  evaluation.coco_metrics(gt, results, verbose=True)
  assert "Average Precision" in capsys.readouterr().out


def sized_gt():
  """One box per class per image, with small (< 32^2 px), medium and large areas present."""
  gt = {"images": [{"id": 1, "height": 400, "width": 400}, {"id": 2, "height": 300, "width": 500},
                   {"id": 3, "height": 200, "width": 200}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": []}
  for image_id, cat, bbox in [(1, 1, [10, 10, 20, 20]), (1, 2, [100, 100, 60, 50]),
                              (2, 1, [0, 0, 300, 200]), (2, 2, [40, 40, 15, 10]),
                              (3, 1, [50, 60, 100, 120])]:  # image 3: no dog
    gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                              "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
                              "iscrowd": 0})
  return gt


def test_coco_perfect_detections_score_one():
  gt = sized_gt()
  results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 0.9} for a in gt["annotations"]]
  got = evaluation.coco_metrics(gt, results, per_class=True)
  assert all(got[k] == pytest.approx(1.0) for k in STATS), got
  assert got["AP/cat"] == pytest.approx(1.0) and got["AP/dog"] == pytest.approx(1.0)


def test_coco_no_detections_scores_zero():
  gt = sized_gt()
  got = evaluation.coco_metrics(gt, [], per_class=True)
  assert all(got[k] == 0.0 for k in STATS), got
  assert got["AP/cat"] == 0.0 and got["AP/dog"] == 0.0


def test_coco_minus_one_where_no_gt():
  """pycocotools' -1 (no gt in a range or class) is kept and never averaged into AP."""
  gt = sized_gt()
  gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 32 ** 2]  # no small boxes
  gt["categories"].append({"id": 3, "name": "bird"})  # a class without boxes
  results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 0.5} for a in gt["annotations"]]
  for dets in (results, []):
    got = evaluation.coco_metrics(gt, dets, per_class=True)
    np.testing.assert_array_equal([got[k] for k in STATS], direct_cocoeval(gt, dets))
    assert got["APs"] == -1.0 and got["ARs"] == -1.0 and got["AP/bird"] == -1.0
  assert evaluation.coco_metrics(gt, results)["AP"] == pytest.approx(1.0)


def test_coco_metrics_rejects_unknown_image_and_category():
  gt = sized_gt()
  with pytest.raises(ValueError, match="image_id 77"):
    evaluation.coco_metrics(gt, [{"image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5],
                                  "score": 0.5}])
  with pytest.raises(ValueError, match="category_id 0"):
    evaluation.coco_metrics(gt, [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 5, 5],
                                  "score": 0.5}])


def test_to_coco_and_detections_to_coco_by_hand():
  gts = [{"image_id": 7, "height": 100, "width": 200,
          "boxes": np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]), "labels": np.array([2, 1]),
          "difficult": np.array([True, False]), "is_crowd": np.array([False, True])},
         {"image_id": 8, "height": 50, "width": 50, "boxes": np.zeros((0, 4)),
          "labels": np.zeros((0,), int)}]
  gt = evaluation.to_coco(gts, ("a", "b"))
  assert gt["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
  assert [im["id"] for im in gt["images"]] == [7, 8]
  assert gt["images"][0]["height"] == 100 and gt["images"][0]["width"] == 200
  a0, a1 = gt["annotations"]
  np.testing.assert_allclose(a0["bbox"], [20, 20, 80, 40])
  assert a0["area"] == pytest.approx(3200) and a0["category_id"] == 2
  assert a0["iscrowd"] == 0  # difficult stays a normal box for COCO
  np.testing.assert_allclose(a1["bbox"], [0, 0, 200, 100])
  assert a1["iscrowd"] == 1 and a0["id"] != a1["id"]
  res = evaluation.detections_to_coco(
      [{"image_id": 7, "boxes": np.array([[0.25, 0.5, 0.75, 1.0]]), "scores": np.array([0.3]),
        "labels": np.array([1])}], gts)
  assert res[0]["image_id"] == 7 and res[0]["category_id"] == 1
  np.testing.assert_allclose(res[0]["bbox"], [50, 50, 100, 50])
  assert res[0]["score"] == pytest.approx(0.3)


# ---------------------------------------------------------------- COCO backends against pycocotools

FAST_BACKENDS = ("numpy", "faster_coco_eval")


def need_backend(backend):
  if backend == "faster_coco_eval":
    pytest.importorskip("faster_coco_eval")


def assert_like_pycocotools(got, gt, results, per_class=True):
  """The 12 stats (and each "AP/<name>") of `got` against pycocotools run here, to 1e-6."""
  want = direct_cocoeval(gt, results)
  np.testing.assert_allclose([got[k] for k in STATS], want, rtol=0, atol=1e-6)
  for cat in gt["categories"] if per_class else ():
    want = direct_cocoeval(gt, results, cat_ids=[cat["id"]])[0]
    assert got[f"AP/{cat['name']}"] == pytest.approx(want, rel=0, abs=1e-6), cat


def coco_random_set(seed, num_images=40):
  """A COCO gt dict and result list in pixels with every case the backends must get right.

  Category ids 3, 7, 90 (non-contiguous) and 50 (detections, no gt); image ids descending and
  non-contiguous; every 6th image without gt, every 5th without detections; crowd boxes with
  detections inside them; sizes of all three COCO area ranges; some gt boxes duplicated (IoU ties
  between gts) and some detections equal to their gt (IoU 1); scores rounded to 0.1 (score ties
  within and across images); one image/category pair with more than 100 detections (maxDets cut).
  """
  rng = np.random.default_rng(seed)
  gt = {"images": [], "annotations": [],
        "categories": [{"id": c, "name": f"c{c}"} for c in (90, 3, 50, 7)]}
  results = []
  for i in range(num_images):
    image_id, width, height = 1000 - 7 * i, int(rng.integers(200, 641)), int(rng.integers(200, 481))
    gt["images"].append({"id": image_id, "height": height, "width": width})
    n = 0 if i % 6 == 0 else int(rng.integers(1, 8))
    side = np.exp(rng.uniform(np.log(4), np.log(300), n))  # sqrt(area): small < 32 <= medium < 96
    aspect = np.exp(rng.normal(0, 0.3, n))
    wh = np.stack([np.minimum(side * aspect, width - 1), np.minimum(side / aspect, height - 1)], 1)
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) - wh)
    boxes = np.concatenate([xy, wh], 1)  # [n, 4] xywh
    if n >= 2 and rng.random() < 0.3:
      boxes[1] = boxes[0]  # two gts the same: ties between gts
    cats = rng.choice([3, 7, 90], n)
    crowd = rng.random(n) < 0.15
    for box, cat, c in zip(boxes.tolist(), cats.tolist(), crowd.tolist()):
      gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                "category_id": cat, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": int(c)})
    if i % 5 == 4:
      continue
    copies = rng.integers(0, 4, n)
    d = np.repeat(boxes, copies, 0)
    d_cats = np.repeat(cats, copies)
    exact = rng.random(len(d)) < 0.2
    jitter = rng.normal(0, 0.15, d.shape) * np.tile(d[:, 2:], 2)
    d = np.where(exact[:, None], d, d + jitter)
    regions = boxes[crowd]  # smaller boxes inside the crowd regions
    offset = rng.uniform(0, 0.5, (len(regions), 2)) * regions[:, 2:]
    inside = np.concatenate([regions[:, :2] + offset, regions[:, 2:] * 0.4], 1)
    clutter_wh = np.exp(rng.uniform(np.log(3), np.log(250), (int(rng.integers(0, 12)), 2)))
    clutter = np.concatenate([rng.uniform(0, 1, clutter_wh.shape) * [width, height], clutter_wh], 1)
    d = np.concatenate([d, inside, clutter])
    d[:, 2:] = np.abs(d[:, 2:]) + 0.5
    d_cats = np.concatenate([d_cats, cats[crowd], rng.choice([3, 7, 90, 50], len(clutter))])
    wrong = rng.random(len(d_cats)) < 0.1
    d_cats = np.where(wrong, rng.choice([3, 7, 90, 50], len(d_cats)), d_cats)
    scores = np.round(rng.uniform(0.05, 1.0, len(d)), 1)
    if i == 1:  # 110 high-score false positives of a gt's category: its true ones fall past 100
      many = np.tile(rng.uniform(20, 60, (1, 2)), (110, 1))
      d = np.concatenate([d, np.concatenate([rng.uniform(0, 150, (110, 2)), many], 1)])
      d_cats = np.concatenate([d_cats, np.full(110, cats[0])])
      scores = np.concatenate([scores, np.round(rng.uniform(0.9, 1.0, 110), 2)])
    for box, cat, score in zip(d.tolist(), d_cats.tolist(), scores.tolist()):
      results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
  return gt, results


def test_coco_random_set_has_the_cases():
  """The parity test below is only as strong as the set: check that each case is in it."""
  for seed in range(5):
    gt, results = coco_random_set(seed)
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32 ** 2).any() and ((areas > 32 ** 2) & (areas < 96 ** 2)).any()
    assert (areas > 96 ** 2).any()
    assert any(a["iscrowd"] for a in gt["annotations"])
    with_gt = {a["image_id"] for a in gt["annotations"]}
    with_dets = {r["image_id"] for r in results}
    image_ids = {im["id"] for im in gt["images"]}
    assert image_ids - with_gt and with_gt - with_dets
    assert 50 not in {a["category_id"] for a in gt["annotations"]}
    assert 50 in {r["category_id"] for r in results}
    scores = [r["score"] for r in results]
    assert len(set(scores)) < len(scores) / 5  # many ties
    pairs = {}
    for r in results:
      pairs[r["image_id"], r["category_id"]] = pairs.get((r["image_id"], r["category_id"]), 0) + 1
    assert max(pairs.values()) > 100


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_coco_backends_equal_pycocotools(seed, backend):
  need_backend(backend)
  gt, results = coco_random_set(seed)
  got = evaluation.coco_metrics(gt, results, per_class=True, backend=backend)
  assert list(got)[:12] == list(STATS)
  assert_like_pycocotools(got, gt, results)
  assert got["AP/c50"] == -1.0  # no gt: undefined, not 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coco_backends_on_record_sets_and_edge_cases(backend):
  """The sets of the pycocotools tests (crowd, difficult, empty images), no detections, no small
  boxes, a class without boxes, perfect detections."""
  need_backend(backend)
  cases = []
  for seed in range(4):
    gts, dets = rand_records(seed)
    cases.append((evaluation.to_coco(gts, NAMES), evaluation.detections_to_coco(dets, gts)))
  gt = sized_gt()
  perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 0.9} for a in gt["annotations"]]
  cases += [(gt, perfect), (gt, [])]
  no_small = sized_gt()
  no_small["annotations"] = [a for a in no_small["annotations"] if a["area"] >= 32 ** 2]
  no_small["categories"].append({"id": 3, "name": "bird"})
  cases += [(no_small, perfect[1:]), (no_small, [])]
  for gt, results in cases:
    assert_like_pycocotools(evaluation.coco_metrics(gt, results, per_class=True, backend=backend),
                            gt, results)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coco_backends_break_iou_ties_like_pycocotools(backend):
  """A detection with the same IoU (9/11) with two gts takes the last one in dataset order; the
  next detection then takes the other at IoU 1, not the leftover one at IoU 2/3 (which would be a
  false positive at IoU .75)."""
  need_backend(backend)
  gt = {"images": [{"id": 1, "height": 100, "width": 100}], "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 0, 10, 10]}]}
  results = [{"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.9},
             {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}]
  filled = evaluation._coco_gt_copy(gt)  # area and iscrowd, which pycocotools needs
  assert direct_cocoeval(filled, results)[2] == pytest.approx(1.0)  # AP75: two true positives
  assert_like_pycocotools(evaluation.coco_metrics(gt, results, per_class=True, backend=backend),
                          filled, results)


@pytest.mark.filterwarnings("ignore:Found annotation id 0")  # faster-coco-eval warns about it
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coco_backends_follow_pycocotools_quirks(backend):
  """Cases no random set hits: annotations of unlisted images or categories (pycocotools skips
  them), annotation id 0 (pycocotools' match marker: such a gt is taken but never a true
  positive), a detection on a crowd region that also fits a box, a detection with zero area."""
  need_backend(backend)
  gt = sized_gt()
  gt["annotations"][0]["id"] = 0
  gt["annotations"].append({"id": 50, "image_id": 99, "category_id": 1, "bbox": [0, 0, 50, 50],
                            "area": 2500, "iscrowd": 0})
  gt["annotations"].append({"id": 51, "image_id": 1, "category_id": 8, "bbox": [0, 0, 50, 50],
                            "area": 2500, "iscrowd": 0})
  gt["annotations"].append({"id": 52, "image_id": 2, "category_id": 1, "bbox": [0, 0, 300, 200],
                            "area": 60000, "iscrowd": 1})
  results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 0.9} for a in gt["annotations"] if a["id"] < 50 or a["id"] == 52]
  results += [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 20], "score": 0.95},
              {"image_id": 2, "category_id": 1, "bbox": [1, 1, 290, 190], "score": 0.3}]
  assert_like_pycocotools(evaluation.coco_metrics(gt, results, per_class=True, backend=backend),
                          gt, results)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coco_backends_silent_unless_verbose_and_do_not_mutate(backend, capsys):
  need_backend(backend)
  gt, results = coco_random_set(7, num_images=10)
  gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
  evaluation.coco_metrics(gt, results, backend=backend)
  assert capsys.readouterr().out == ""
  assert gt == gt_before and results == results_before
  evaluation.coco_metrics(gt, results, backend=backend, verbose=True)
  assert "Average Precision" in capsys.readouterr().out


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coco_backends_reject_bad_detections_like_pycocotools(backend):
  need_backend(backend)
  gt = sized_gt()
  ok = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
  for bad, match in [(dict(ok, image_id=77), "image_id 77"),
                     (dict(ok, category_id=0), "category_id 0"),
                     (dict(ok, bbox=[0, 0, float("nan"), 5]), "bbox must be 4 finite"),
                     (dict(ok, bbox=[0, 0, 5]), "bbox must be 4 finite"),
                     (dict(ok, score=float("inf")), "score finite"),
                     ({k: v for k, v in ok.items() if k != "score"}, "missing 'score'")]:
    for fn_backend in ("pycocotools", backend):
      with pytest.raises(ValueError, match=match) as info:
        evaluation.coco_metrics(gt, [ok, bad], backend=fn_backend)
      assert "detections[1]" in str(info.value)


def test_coco_backends_accept_numpy_scalars_and_int_boxes():
  gt = sized_gt()
  results = [{"image_id": np.int64(a["image_id"]), "category_id": np.int32(a["category_id"]),
              "bbox": np.array(a["bbox"]), "score": np.float32(0.25 * (a["id"] % 4))}
             for a in gt["annotations"]]
  want = evaluation.coco_metrics(gt, results, per_class=True)
  assert evaluation.coco_metrics(gt, results, per_class=True, backend="numpy") == want


def test_unknown_coco_backend_raises_naming_the_valid_ones():
  gt = sized_gt()
  for fn in (lambda: evaluation.coco_metrics(gt, [], backend="torchmetrics"),
             lambda: evaluation.evaluate(*hand_case(), ("cat",), backend="torchmetrics"),
             lambda: evaluation.evaluate(*hand_case(), ("cat",), metrics=("voc",),
                                         backend="torchmetrics")):
    with pytest.raises(ValueError, match="torchmetrics") as info:
      fn()
    for name in ("pycocotools", "faster_coco_eval", "numpy"):
      assert repr(name) in str(info.value)
  assert evaluation.COCO_BACKENDS == ("pycocotools", "faster_coco_eval", "numpy")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_evaluate_passes_backend_through(backend, monkeypatch):
  need_backend(backend)
  gts, dets = rand_records(31)
  seen, real = [], evaluation.coco_metrics

  def spy(*args, **kwargs):
    seen.append(kwargs.get("backend"))
    return real(*args, **kwargs)

  monkeypatch.setattr(evaluation, "coco_metrics", spy)
  out = evaluation.evaluate(gts, dets, NAMES, metrics=("coco",), backend=backend)
  assert seen == [backend]
  gt = evaluation.to_coco(gts, NAMES)
  results = evaluation.detections_to_coco(dets, gts)
  assert_like_pycocotools({k[len("coco/"):]: v for k, v in out.items()}, gt, results)
  evaluation.evaluate(gts, dets, NAMES, metrics=("coco",))
  assert seen == [backend, "pycocotools"]  # the default


# ---------------------------------------------------------------- VOC devkit port

def devkit_voc_ap(rec, prec, use_07_metric):
  """voc_ap from the devkit's Python port (py-faster-rcnn voc_eval.py), as written there."""
  if use_07_metric:
    ap = 0.
    for t in np.arange(0., 1.1, 0.1):
      if np.sum(rec >= t) == 0:
        p = 0
      else:
        p = np.max(prec[rec >= t])
      ap = ap + p / 11.
  else:
    mrec = np.concatenate(([0.], rec, [1.]))
    mpre = np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1):
      mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
  return ap


def devkit_voc_eval(gts, dets, label, ovthresh=0.5, use_07_metric=True):
  """voc_eval's loop for one class; continuous IoU (no +1) and >= as in the MATLAB devkit."""
  class_recs, npos = {}, 0
  for g in gts:
    m = np.asarray(g["labels"]) == label
    difficult = np.asarray(g.get("difficult", np.zeros(len(m), bool)))[m]
    npos += int(np.sum(~difficult))
    class_recs[g["image_id"]] = {"bbox": np.asarray(g["boxes"])[m], "difficult": difficult,
                                 "det": [False] * int(m.sum())}
  image_ids, confidence, bb_list = [], [], []
  for d in dets:
    for b, s, l in zip(d["boxes"], d["scores"], d["labels"]):
      if l == label:
        image_ids.append(d["image_id"])
        confidence.append(s)
        bb_list.append(b)
  if npos == 0:
    return None
  confidence = np.array(confidence)
  BB = np.array(bb_list).reshape(-1, 4)
  sorted_ind = np.argsort(-confidence)
  BB = BB[sorted_ind, :]
  image_ids = [image_ids[x] for x in sorted_ind]
  nd = len(image_ids)
  tp, fp = np.zeros(nd), np.zeros(nd)
  for d in range(nd):
    R = class_recs[image_ids[d]]
    bb = BB[d, :].astype(float)
    ovmax = -np.inf
    BBGT = R["bbox"].astype(float)
    if BBGT.size > 0:
      ixmin = np.maximum(BBGT[:, 0], bb[0])
      iymin = np.maximum(BBGT[:, 1], bb[1])
      ixmax = np.minimum(BBGT[:, 2], bb[2])
      iymax = np.minimum(BBGT[:, 3], bb[3])
      iw = np.maximum(ixmax - ixmin, 0.)
      ih = np.maximum(iymax - iymin, 0.)
      inters = iw * ih
      uni = ((bb[2] - bb[0]) * (bb[3] - bb[1]) +
             (BBGT[:, 2] - BBGT[:, 0]) * (BBGT[:, 3] - BBGT[:, 1]) - inters)
      overlaps = inters / uni
      ovmax = np.max(overlaps)
      jmax = np.argmax(overlaps)
    if ovmax >= ovthresh:
      if not R["difficult"][jmax]:
        if not R["det"][jmax]:
          tp[d] = 1.
          R["det"][jmax] = 1
        else:
          fp[d] = 1.
    else:
      fp[d] = 1.
  fp = np.cumsum(fp)
  tp = np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return devkit_voc_ap(rec, prec, use_07_metric)


def devkit_metrics(gts, dets, names, use_07_metric, ovthresh=0.5):
  out, aps = {}, []
  for label, name in enumerate(names, start=1):
    ap = devkit_voc_eval(gts, dets, label, ovthresh, use_07_metric)
    out[f"AP/{name}"] = -1.0 if ap is None else ap
    if ap is not None:
      aps.append(ap)
  out["mAP"] = float(np.mean(aps)) if aps else -1.0
  return out


@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("seed", [10, 11, 12, 13, 14])
def test_voc_metrics_equal_devkit_port(seed, use_07):
  gts, dets = rand_records(seed, num_images=15, crowd=False)
  thr = 0.5 if seed % 2 else 0.3
  got = evaluation.voc_metrics(gts, dets, NAMES, iou_threshold=thr, use_07_metric=use_07)
  want = devkit_metrics(gts, dets, NAMES, use_07, ovthresh=thr)
  assert set(got) == set(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_voc_ap_by_hand():
  # TP, FP, TP on 2 gts: recall (.5, .5, 1), precision (1, .5, 2/3).
  rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
  # 11-point: t = 0..0.5 -> 1 (6 points), t = 0.6..1 -> 2/3 (5 points).
  assert evaluation.voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
  # Envelope (1 up to recall .5, 2/3 up to 1): 0.5 * 1 + 0.5 * 2/3.
  assert evaluation.voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 6)
  assert evaluation.voc_ap([], [], use_07_metric=True) == 0.0
  assert evaluation.voc_ap([], [], use_07_metric=False) == 0.0


A_BOX, B_BOX, C_BOX = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0.6, 0.0, 0.9, 0.3]
AP07, AP_AREA = (6 + 5 * 2 / 3) / 11, 5 / 6


def hand_case(extra_gt=(), extra_det=(), c_difficult=True):
  """Image 1: gts A, B (class 1); image 2: nothing. Detections TP (.9 on A), FP (.8 on image 2),
  TP (.7 on B). extra_gt/extra_det: (image index, box, label, score/difficult) added."""
  gts = [{"image_id": 1, "height": 100, "width": 100, "boxes": [A_BOX, B_BOX], "labels": [1, 1],
          "difficult": [False, False]},
         {"image_id": 2, "height": 100, "width": 100, "boxes": np.zeros((0, 4)), "labels": []}]
  dets = [{"image_id": 1, "boxes": [A_BOX, B_BOX], "scores": [0.9, 0.7], "labels": [1, 1]},
          {"image_id": 2, "boxes": [[0.2, 0.2, 0.4, 0.4]], "scores": [0.8], "labels": [1]}]
  for box in extra_gt:
    gts[0]["boxes"] = gts[0]["boxes"] + [box]
    gts[0]["labels"] = gts[0]["labels"] + [1]
    gts[0]["difficult"] = gts[0]["difficult"] + [c_difficult]
  for box, label, score in extra_det:
    dets[0]["boxes"] = dets[0]["boxes"] + [box]
    dets[0]["labels"] = dets[0]["labels"] + [label]
    dets[0]["scores"] = dets[0]["scores"] + [score]
  return gts, dets


def voc_both(gts, dets, names=("cat",)):
  return (evaluation.voc_metrics(gts, dets, names, use_07_metric=True),
          evaluation.voc_metrics(gts, dets, names, use_07_metric=False))


def test_voc_metrics_by_hand():
  v07, v = voc_both(*hand_case())
  assert v07["AP/cat"] == pytest.approx(AP07) and v07["mAP"] == pytest.approx(AP07)
  assert v["AP/cat"] == pytest.approx(AP_AREA)


def test_voc_difficult_is_ignored():
  # A detection on a difficult box, ranked between the TP and the FP: neither helps nor hurts.
  v07, v = voc_both(*hand_case(extra_gt=[C_BOX], extra_det=[(C_BOX, 1, 0.85)]))
  assert v07["AP/cat"] == pytest.approx(AP07) and v["AP/cat"] == pytest.approx(AP_AREA)
  # A missed difficult box is not a miss.
  v07, v = voc_both(*hand_case(extra_gt=[C_BOX]))
  assert v07["AP/cat"] == pytest.approx(AP07) and v["AP/cat"] == pytest.approx(AP_AREA)
  # The same box not difficult: TP, TP, FP, TP on 3 gts -> (1, 1, 2/3) up to recall 2/3, then 3/4.
  v07, v = voc_both(*hand_case(extra_gt=[C_BOX], extra_det=[(C_BOX, 1, 0.85)], c_difficult=False))
  assert v["AP/cat"] == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)
  assert v07["AP/cat"] == pytest.approx((7 + 4 * 3 / 4) / 11)  # t = 0..0.6 -> 1; 0.7..1 -> 3/4


def test_voc_is_crowd_acts_as_difficult():
  gts, dets = rand_records(21, crowd=True)
  as_difficult = [dict(g, difficult=g["difficult"] | g["is_crowd"],
                       is_crowd=np.zeros_like(g["is_crowd"])) for g in gts]
  assert evaluation.voc_metrics(gts, dets, NAMES) == evaluation.voc_metrics(as_difficult, dets, NAMES)


def test_voc_duplicates_and_misses_are_false_positives():
  # A second detection on A (.85, after the TP) is a duplicate: TP, FP, FP, TP.
  v07, v = voc_both(*hand_case(extra_det=[(A_BOX, 1, 0.85)]))
  # rec (.5, .5, .5, 1), prec (1, .5, 1/3, 1/2).
  assert v["AP/cat"] == pytest.approx(0.5 + 0.5 * 0.5)
  assert v07["AP/cat"] == pytest.approx((6 + 5 * 0.5) / 11)
  # IoU just under 0.5 with A (a 0.2 x 0.2 box shifted by 0.07: IoU = 0.13 * 0.2 / 0.054 = 0.48).
  near = [0.17, 0.1, 0.37, 0.3]
  v07_near, v_near = voc_both(*hand_case(extra_det=[(near, 1, 0.85)]))
  assert v_near["AP/cat"] == pytest.approx(v["AP/cat"])
  # The right box with the wrong class is a false positive of that class, and no help to the right one.
  v07_cls, _ = voc_both(*hand_case(extra_det=[(C_BOX, 2, 0.99)]), names=("cat", "dog"))
  assert v07_cls["AP/cat"] == pytest.approx(AP07)
  assert v07_cls["AP/dog"] == -1.0 and v07_cls["mAP"] == pytest.approx(AP07)  # dog has no gt


def test_voc_duplicate_stays_fp_when_another_box_overlaps():
  # Devkit rule: a detection goes to its best box; if that box is taken it is a FP, even though a
  # second, free box of the class overlaps it above the threshold.
  a1, a2 = [0.0, 0.0, 0.4, 0.4], [0.1, 0.0, 0.5, 0.4]  # IoU(a1, a2) = 0.6
  gts = [{"image_id": 1, "height": 10, "width": 10, "boxes": [a1, a2], "labels": [1, 1]}]
  second = [0.02, 0.0, 0.42, 0.4]  # IoU 0.9 with a1, 0.67 with a2
  dets = [{"image_id": 1, "boxes": [a1, second], "scores": [0.9, 0.8], "labels": [1, 1]}]
  v07, v = voc_both(gts, dets)
  assert v["AP/cat"] == pytest.approx(0.5)  # TP, FP: rec (.5, .5), prec (1, .5)
  assert v07["AP/cat"] == pytest.approx(6 / 11)


def test_voc_iou_at_threshold_matches():
  gts = [{"image_id": 1, "height": 10, "width": 10, "boxes": [[0.0, 0.0, 1.0, 0.5]], "labels": [1]}]
  dets = [{"image_id": 1, "boxes": [[0.0, 0.0, 1.0, 0.25]], "scores": [0.9], "labels": [1]}]
  assert evaluation.voc_metrics(gts, dets, ("cat",))["mAP"] == pytest.approx(1.0)  # IoU 0.5 (>=)
  assert evaluation.voc_metrics(gts, dets, ("cat",), iou_threshold=0.51)["mAP"] == 0.0


def test_voc07_thresholds_are_the_devkit_arange():
  # The devkit's np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 > 0.3: recall 3/10 misses it.
  assert evaluation.voc_ap([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], use_07_metric=True) == pytest.approx(3 / 11)


def test_voc_no_detections_and_no_gt():
  gts, _ = hand_case()
  v07, v = voc_both(gts, [])
  assert v07 == {"mAP": 0.0, "AP/cat": 0.0} and v == {"mAP": 0.0, "AP/cat": 0.0}
  empty = [{"image_id": 1, "height": 10, "width": 10, "boxes": np.zeros((0, 4)), "labels": []}]
  assert evaluation.voc_metrics(empty, [], ("cat",)) == {"mAP": -1.0, "AP/cat": -1.0}


def test_voc_ties_keep_input_order():
  # Same score on the FP (image 2) and the second TP: input order decides, like a stable sort.
  gts, dets = hand_case()
  dets[1]["scores"] = [0.7]
  dets = [dets[0], dets[1]]  # TP(.9), TP(.7), FP(.7) -> AP 1
  assert evaluation.voc_metrics(gts, dets, ("cat",))["mAP"] == pytest.approx(1.0)
  assert evaluation.voc_metrics(gts, dets[::-1], ("cat",))["mAP"] == pytest.approx(AP07)
  # Many ties (long enough that an unstable sort would reorder them): the TP given last ranks last.
  rng = np.random.default_rng(0)
  fp_scores = np.where(rng.random(100) < 0.6, 0.5, rng.uniform(0.1, 0.4, 100))  # ties interleaved
  fps = {"image_id": 2, "boxes": [[0.2, 0.2, 0.4, 0.4]] * 100, "scores": fp_scores, "labels": [1] * 100}
  gts = [dict(gts[0], boxes=[A_BOX], labels=[1], difficult=[False]), gts[1]]
  tp = {"image_id": 1, "boxes": [A_BOX], "scores": [0.5], "labels": [1]}
  ties = int(np.sum(fp_scores == 0.5))
  assert evaluation.voc_metrics(gts, [fps, tp], ("cat",))["mAP"] == pytest.approx(1 / (ties + 1))
  assert evaluation.voc_metrics(gts, [tp, fps], ("cat",))["mAP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- evaluate and bad input

def test_evaluate_keys_and_values():
  gts, dets = rand_records(30)
  gts_voc = [dict(g, is_crowd=np.zeros_like(g["is_crowd"])) for g in gts]
  out = evaluation.evaluate(gts_voc, dets, NAMES)
  per_class = [f"AP/{n}" for n in NAMES]
  want_keys = ([f"voc07/{k}" for k in ["mAP"] + per_class] + [f"voc/{k}" for k in ["mAP"] + per_class]
               + [f"coco/{k}" for k in list(STATS) + per_class])
  assert sorted(out) == sorted(want_keys)
  for prefix, use_07 in (("voc07", True), ("voc", False)):
    for k, v in devkit_metrics(gts_voc, dets, NAMES, use_07).items():
      assert out[f"{prefix}/{k}"] == pytest.approx(v, abs=1e-12)
  gt = evaluation.to_coco(gts_voc, NAMES)
  stats = direct_cocoeval(gt, evaluation.detections_to_coco(dets, gts_voc))
  np.testing.assert_array_equal([out[f"coco/{k}"] for k in STATS], stats)
  only = evaluation.evaluate(gts_voc, dets, NAMES, metrics=("voc",))
  assert sorted(only) == sorted(k for k in want_keys if k.startswith("voc/"))


def test_evaluate_rejects_unknown_metric():
  gts, dets = hand_case()
  with pytest.raises(ValueError, match="voc07"):
    evaluation.evaluate(gts, dets, ("cat",), metrics=("voc", "map50"))


def test_bad_records_raise():
  gts, dets = hand_case()
  stray = dets + [{"image_id": 42, "boxes": [A_BOX], "scores": [0.5], "labels": [1]}]
  for fn in (lambda: evaluation.voc_metrics(gts, stray, ("cat",)),
             lambda: evaluation.evaluate(gts, stray, ("cat",), metrics=("coco",)),
             lambda: evaluation.detections_to_coco(stray, gts)):
    with pytest.raises(ValueError, match="image_id 42"):
      fn()
  short = [dict(dets[0], labels=[1])] + dets[1:]
  with pytest.raises(ValueError, match="labels has 1 entries but boxes has 2"):
    evaluation.voc_metrics(gts, short, ("cat",))
  short = [dict(dets[0], scores=[0.5])] + dets[1:]
  with pytest.raises(ValueError, match="scores"):
    evaluation.voc_metrics(gts, short, ("cat",))
  bad_gt = [dict(gts[0], difficult=[True])] + gts[1:]
  with pytest.raises(ValueError, match="difficult"):
    evaluation.voc_metrics(bad_gt, dets, ("cat",))
  background = [dict(dets[0], labels=[0, 1])] + dets[1:]
  with pytest.raises(ValueError, match="1..1"):
    evaluation.voc_metrics(gts, background, ("cat",))
  with pytest.raises(ValueError, match="twice"):
    evaluation.to_coco(gts + gts[:1], ("cat",))
  pixels = [dict(gts[0], boxes=[[10, 10, 30, 30], B_BOX])] + gts[1:]
  with pytest.raises(ValueError, match="normalized"):
    evaluation.voc_metrics(pixels, dets, ("cat",))
  with pytest.raises(ValueError, match="iou_threshold"):
    evaluation.voc_metrics(gts, dets, ("cat",), iou_threshold=0.0)
