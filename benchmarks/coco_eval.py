r"""COCO box evaluation backends of ``evaluation.coco_metrics``: time on a VOC07-test-sized set.

  python benchmarks/coco_eval.py                         # 4952 images, 3 timed rounds
  python benchmarks/coco_eval.py --rounds=5 --backends=pycocotools,numpy

The set is synthetic, shaped like VOC07 test through an SSD: 4952 images of VOC sizes, 20
classes, 1 + Poisson(1.4) ground truth boxes per image (about 2.4; sizes log-uniform, so all three
COCO area ranges), and exactly 200 detections per image: 1-3 near each gt box (jittered, the right
class, scores 0.3-0.99) and the rest low-score clutter (random boxes and classes, scores mostly
below 0.1). Scores are float32 values, as a model gives them, so a few tie.

Each run is one ``coco_metrics(gt, results, per_class=True, backend=...)`` call, input checks
included. The backends run interleaved (A, B, C, A, B, C, ...) after one untimed warm-up run of
each, so that a change of machine load hits all of them alike. Printed: median, min and max
seconds per backend; the speed-up over pycocotools as the ratio of medians, with the spread of
the per-round ratios; the largest difference of any stat or per-class AP from pycocotools; the
load average before and after; package versions and the machine.
"""

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # pylint: disable=g-import-not-at-top

from ssdjax import evaluation  # pylint: disable=g-import-not-at-top

VOC_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (480, 360))


def synthetic_voc07(num_images=4952, num_classes=20, dets_per_image=200, seed=0):
  """(COCO gt dict, COCO result list) in pixels, [x, y, w, h] boxes; see the module docstring."""
  rng = np.random.default_rng(seed)
  gt = {"images": [], "annotations": [],
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]}
  results = []
  for image_id in range(1, num_images + 1):
    width, height = VOC_SIZES[int(rng.integers(len(VOC_SIZES)))]
    gt["images"].append({"id": image_id, "width": width, "height": height})
    n = 1 + int(rng.poisson(1.4))
    bw = np.exp(rng.uniform(np.log(10), np.log(0.95 * width), n))
    bh = np.clip(bw * np.exp(rng.normal(0, 0.4, n)), 6, 0.95 * height)
    boxes = np.stack([rng.uniform(0, width - bw), rng.uniform(0, height - bh), bw, bh], 1)  # [n, 4]
    labels = rng.integers(1, num_classes + 1, n)
    for box, label in zip(boxes.tolist(), labels.tolist()):
      gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                "category_id": label, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": 0})
    copies = rng.integers(1, 4, n)
    near = np.repeat(boxes, copies, 0)
    near = near + rng.normal(0, 0.08, near.shape) * np.tile(near[:, 2:], 2)
    near[:, 2:] = np.abs(near[:, 2:]) + 1
    near_scores = rng.uniform(0.3, 0.99, len(near))
    m = dets_per_image - len(near)
    cw = np.exp(rng.uniform(np.log(8), np.log(0.9 * width), m))
    ch = np.clip(cw * np.exp(rng.normal(0, 0.5, m)), 4, height)
    clutter = np.stack([rng.uniform(0, width - cw), rng.uniform(0, height - ch), cw, ch], 1)
    clutter_scores = 0.01 + 0.5 * rng.beta(1, 20, m)
    det_boxes = np.concatenate([near, clutter])
    scores = np.concatenate([near_scores, clutter_scores]).astype(np.float32).astype(np.float64)
    det_labels = np.concatenate([np.repeat(labels, copies), rng.integers(1, num_classes + 1, m)])
    for box, label, score in zip(det_boxes.tolist(), det_labels.tolist(), scores.tolist()):
      results.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
  return gt, results


def version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=4952)
  parser.add_argument("--rounds", type=int, default=3,
                      help="timed rounds, each one run of every backend")
  parser.add_argument("--backends", default=",".join(evaluation.COCO_BACKENDS),
                      help="comma-separated, pycocotools first: the reference for ratios")
  args = parser.parse_args()
  backends = args.backends.split(",")
  if backends[0] != "pycocotools":
    parser.error("--backends must start with pycocotools (the reference)")

  print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"os.cpu_count()={os.cpu_count()}, python {platform.python_version()}")
  print("versions: " + ", ".join(f"{p} {version(p)}" for p in
                                 ("numpy", "pycocotools", "faster-coco-eval")))
  t0 = time.perf_counter()
  gt, results = synthetic_voc07(args.images)
  print(f"set: {len(gt['images'])} images, {len(gt['annotations'])} gt boxes "
        f"({len(gt['annotations']) / len(gt['images']):.2f} per image), {len(results)} detections, "
        f"{len(gt['categories'])} classes (built in {time.perf_counter() - t0:.1f} s)")

  run = lambda b: evaluation.coco_metrics(gt, results, per_class=True, backend=b)
  load_before = os.getloadavg()
  stats = {b: run(b) for b in backends}  # warm-up, untimed; also the parity check
  times = {b: [] for b in backends}
  for r in range(args.rounds):
    for b in backends:
      t0 = time.perf_counter()
      run(b)
      times[b].append(time.perf_counter() - t0)
    print(f"round {r + 1}: " + ", ".join(f"{b} {times[b][-1]:.2f} s" for b in backends), flush=True)
  load_after = os.getloadavg()

  ref = backends[0]
  print(f"\nAP {stats[ref]['AP']:.4f}, AP50 {stats[ref]['AP50']:.4f} (pycocotools)")
  for b in backends:
    med = statistics.median(times[b])
    line = f"{b:>17}: median {med:7.2f} s  (min {min(times[b]):.2f}, max {max(times[b]):.2f})"
    if b != ref:
      ratios = [a / t for a, t in zip(times[ref], times[b])]  # per round, same load
      diff = max(abs(stats[b][k] - stats[ref][k]) for k in stats[ref])
      line += (f"  speed-up {statistics.median(times[ref]) / med:5.1f}x "
               f"(per round {min(ratios):.1f}-{max(ratios):.1f}x)  max |diff| {diff:.1e}")
    print(line)
  print("load average (1, 5, 15 min): before " + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after " + ", ".join(f"{x:.2f}" for x in load_after))


if __name__ == "__main__":
  main()
