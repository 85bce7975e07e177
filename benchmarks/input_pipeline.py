r"""Images per second of the training input pipeline alone, with the SSD300 augmentation.

  python benchmarks/input_pipeline.py                      # workers 0 and 2, batch 32
  python benchmarks/input_pipeline.py --workers=0,4,8 --batches=20 --runs=5

The pipeline is ssdjax.data.make_train_iterator with configs/ssd300_voc.py (image_size 300, every
augmentation on: photometric, expand, IoU crop, flip, resize, normalize) on VOC-like synthetic
images (500x375, 1-5 objects), which are drawn on the fly (~10 ms each, part of the figure).
For each worker count: one warm-up run (worker start-up included), then the median of --runs
timed runs of --batches batches each.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
from ssdjax import data  # pylint: disable=g-import-not-at-top


def voc_like_config(batch_size: int, num_workers: int):
  config = config_lib.defaults()  # configs/ssd300_voc.py
  config.train.batch_size = batch_size
  d = config.data
  d.source, d.train, d.num_workers = "synthetic", ("train",), num_workers
  d.synthetic.update(dict(num_train=5000, image_hw=(375, 500), min_objects=1, max_objects=5,
                          num_classes=4))
  return data.resolve_classes(config)


def images_per_second(config, *, batches: int, runs: int) -> tuple[float, list[float]]:
  it = data.make_train_iterator(config, seed=0)
  try:
    for _ in range(batches):  # warm-up: worker start-up, first imports, buffers
      next(it)
    rates = []
    for _ in range(runs):
      t0 = time.perf_counter()
      for _ in range(batches):
        next(it)
      rates.append(batches * config.train.batch_size / (time.perf_counter() - t0))
  finally:
    it.close()
  return statistics.median(rates), rates


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=8, help="batches per timed run")
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()

  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
  print(f"machine: {platform.platform()}, python {platform.python_version()}, "
        f"cpu_count {os.cpu_count()} (usable {affinity}), processor {platform.processor() or 'n/a'}")
  print(f"input: synthetic 500x375, 1-5 objects -> SSD300 augmentation -> batch "
        f"{args.batch_size} x 300x300x3 float32")
  for workers in (int(w) for w in args.workers.split(",")):
    median, rates = images_per_second(voc_like_config(args.batch_size, workers),
                                      batches=args.batches, runs=args.runs)
    print(f"num_workers={workers}: {median:.1f} images/s (median of {args.runs} runs of "
          f"{args.batches} batches: {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
  main()
