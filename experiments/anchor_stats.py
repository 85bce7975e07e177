r"""How well a config's anchors cover its ground truth, under both matching strategies.

  python experiments/anchor_stats.py --config=configs/synthetic.py --num_images=1000
  python experiments/anchor_stats.py --config=configs/ssd300_voc.py --num_images=2000 --no_augment \
      --out=runs/anchors_voc.json --draw=4 --draw_dir=runs/anchors_voc

The images are the first ``--num_images`` of the training stream, ``ssdjax.data.make_train_iterator``
(seeded by ``--seed``, default ``config.seed``): the very batches the train step matches, with the
config's augmentation (expand and IoU crops change box sizes, so coverage is measured where the loss
sees it). ``--no_augment`` switches every augmentation off, to measure the data set's own boxes.
Difficult (VOC) and crowd (COCO) boxes are left out, as in training.

For each strategy of ``ssdjax.matching`` (``config.matching.kwargs``), over all gt boxes:
the fraction with at least one positive anchor and the mean number of positive anchors per gt
(``ssdjax.matching.match_stats``). The best IoU of each gt with any anchor does not depend on the
strategy; its mean and histogram (bins 0-0.3, 0.3-0.5, 0.5-0.7, 0.7-1, as fractions of the gts)
are reported once. ``--draw K`` writes K PNGs of the first images with their gt boxes (captioned)
and, thin, the positive anchors of ``config.matching.strategy`` (decoded to xyxy) in the colour of
their gt's class. ``--set FIELD=VALUE`` overrides config fields as in head_ablation.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import ImageDraw

from experiments.head_ablation import load_config
from ssdjax import anchors as anchors_lib
from ssdjax import boxes as box_lib
from ssdjax import data
from ssdjax import matching
from ssdjax import train
from ssdjax import visualize

BINS = (0.0, 0.3, 0.5, 0.7, 1.0)
_MAX_BATCH = 32
_MIN_DRAW_SIDE = 384


def stream(config, num_images: int, seed: int):
  """Training batches with ``num_images`` images in all; rows past them get an all-False gt_mask."""
  config.train.batch_size = min(num_images, _MAX_BATCH)
  it = data.make_train_iterator(config, seed=seed)
  seen = 0
  try:
    while seen < num_images:
      batch = next(it)
      keep = np.arange(len(batch["gt_mask"])) < num_images - seen  # [B]
      batch["gt_mask"] = batch["gt_mask"] & keep[:, None]
      seen += len(keep)
      yield batch, int(keep.sum())
  finally:
    it.close()


def draw_positives(config, image, gt_boxes, gt_labels, gt_mask, anchors, path: str) -> None:
  """One normalized image [S, S, 3] with its gt boxes and positive anchors, as a PNG."""
  kwargs = matching.from_config(config)
  del kwargs["variances"]
  matched_idx, _ = matching.match(gt_boxes, gt_labels, gt_mask, anchors, **kwargs)  # [A]
  matched_idx = np.asarray(matched_idx)
  pixels = image * np.asarray(config.data.std_rgb) + np.asarray(config.data.mean_rgb)  # [S, S, 3]
  pixels = np.clip(pixels, 0, 255)
  # Small inputs are enlarged (boxes are normalized) so one-pixel anchor outlines stay apart.
  scale = max(1, _MIN_DRAW_SIDE // max(pixels.shape[:2]))
  pixels = np.repeat(np.repeat(pixels.astype(np.uint8), scale, axis=0), scale, axis=1)
  valid = gt_mask & (gt_labels > 0)
  img = visualize.draw_detections(pixels, gt_boxes[valid],
                                  gt_labels[valid], None, config.class_names, line_width=2)
  positive = matched_idx >= 0  # [A]
  anchors_xyxy = np.asarray(box_lib.cxcywh_to_xyxy(anchors[positive]))  # [P, 4]
  draw = ImageDraw.Draw(img)
  for box, label in zip(visualize.to_pixels(anchors_xyxy, img.width, img.height),
                        gt_labels[matched_idx[positive]]):
    draw.rectangle(box.tolist(), outline=visualize.class_colour(label), width=1)
  img.save(path)


def strategies(config) -> dict[str, dict]:
  """Matcher keyword arguments per strategy: the built-in ones at the config's IoU threshold,
  and the config's own strategy with ``config.matching.kwargs``."""
  kwargs = matching.from_config(config)
  del kwargs["variances"]
  threshold = config.matching.kwargs.get("iou_threshold", 0.5)
  out = {s: {"strategy": s, "iou_threshold": threshold}
         for s in matching.REGISTRY.builtin_names()}
  out[kwargs["strategy"]] = kwargs
  return out


def anchor_stats(config, *, num_images: int, seed: int, draw: int = 0, draw_dir: str = ".") -> dict:
  """The statistics of the module docstring, as a JSON-ready dict."""
  anchors = anchors_lib.from_config(config)  # [A, 4] cxcywh
  stats_fns = {s: jax.jit(functools.partial(matching.match_stats, anchors=anchors, **kw))
               for s, kw in strategies(config).items()}
  threshold = config.matching.kwargs.get("iou_threshold")
  anchors_xyxy = box_lib.cxcywh_to_xyxy(anchors)  # [A, 4]
  best_iou_fn = jax.jit(jax.vmap(lambda g: box_lib.iou(g, anchors_xyxy).max(axis=1)))  # [B, G]
  sums = {s: {"matched_gt_fraction": 0.0, "positives_per_gt": 0.0} for s in stats_fns}
  best, drawn, num_gt = [], [], 0
  for batch, n in stream(config, num_images, seed):
    gt = (batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"])
    for s, fn in stats_fns.items():
      out = jax.device_get(fn(*gt))
      for k in sums[s]:
        sums[s][k] += float(out[k]) * float(out["num_gt"])  # per-batch means -> sums over gts
    valid = batch["gt_mask"] & (batch["gt_labels"] > 0)  # [B, G]
    num_gt += int(valid.sum())
    best.append(np.asarray(best_iou_fn(batch["gt_boxes"]))[valid])
    for i in range(min(draw - len(drawn), n)):
      os.makedirs(draw_dir, exist_ok=True)
      path = os.path.join(draw_dir, f"anchors_{len(drawn):03d}.png")
      draw_positives(config, batch["images"][i], *(g[i] for g in gt), anchors, path)
      drawn.append(path)
  best = np.concatenate(best)
  counts, _ = np.histogram(best, bins=BINS)  # the last bin includes 1.0
  denom = max(num_gt, 1)
  return {
      "num_images": num_images, "num_gt": num_gt, "num_anchors": len(anchors),
      "iou_threshold": threshold, "seed": seed,
      "strategies": {s: {k: v / denom for k, v in d.items()} for s, d in sums.items()},
      "best_iou": {"mean": float(best.mean()) if num_gt else 0.0,
                   "histogram": {f"{lo}-{hi}": c / denom for lo, hi, c in
                                 zip(BINS[:-1], BINS[1:], counts.tolist())}},
      "drawn": drawn,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--seed", type=int, default=None, help="default: config.seed")
  parser.add_argument("--no_augment", action="store_true",
                      help="switch the training augmentation off (the data set's own boxes)")
  parser.add_argument("--draw", type=int, default=0, help="PNGs of positive anchors to write")
  parser.add_argument("--draw_dir", default="runs/anchor_stats")
  parser.add_argument("--out", default=None, help="JSON file for the statistics")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args(argv)
  if args.num_images < 1 or args.draw < 0:
    parser.error("--num_images must be >= 1 and --draw >= 0")
  try:
    config = train.prepare_config(load_config(args.config, args.set))
  except ValueError as e:
    parser.error(str(e))
  if args.no_augment:
    config.augment.update(dict(photometric=False, expand=False, random_crop=False, hflip=False))
  seed = config.seed if args.seed is None else args.seed
  stats = anchor_stats(config, num_images=args.num_images, seed=seed, draw=args.draw,
                       draw_dir=args.draw_dir)
  stats.update(config=args.config, augment=not args.no_augment, overrides=args.set)

  print(f"{args.config}: {stats['num_gt']} gt boxes in {args.num_images} images "
        f"(augment={stats['augment']}), {stats['num_anchors']} anchors, IoU threshold "
        f"{stats['iou_threshold']}")
  print(f"{'strategy':<12} {'gt with >= 1 positive':>22} {'positives per gt':>17}")
  for s, d in stats["strategies"].items():
    print(f"{s:<12} {d['matched_gt_fraction']:>22.4f} {d['positives_per_gt']:>17.2f}")
  print(f"best IoU of a gt with any anchor (both strategies): mean {stats['best_iou']['mean']:.4f}")
  for name, frac in stats["best_iou"]["histogram"].items():
    print(f"  {name:<8} {frac:.4f}")
  for path in stats["drawn"]:
    print(f"wrote {path}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(stats, f, indent=2)
  return stats


if __name__ == "__main__":
  main()
