r"""Compile time and steady-state time of one SSD train step (forward, matching, loss, backward, SGD).

  python benchmarks/train_step.py                       # SSD300-VGG16 VOC, batch 8
  python benchmarks/train_step.py --config=synthetic --batch_size=32 --steps=20

Times exclude compilation (reported separately), call block_until_ready() and report the median
of --steps timed runs after 2 warm-up steps. The data are random images with random ground truth,
so only the compute is measured.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
from ssdjax import data, train  # pylint: disable=g-import-not-at-top
from ssdjax.data import categories  # pylint: disable=g-import-not-at-top


def random_batch(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  g = config.data.max_boxes
  xy = rng.uniform(0, 0.6, (batch_size, g, 2))
  wh = rng.uniform(0.05, 0.4, (batch_size, g, 2))
  n = rng.integers(1, min(g, 8) + 1, batch_size)
  mask = np.arange(g)[None] < n[:, None]
  return {
      "images": rng.normal(size=(batch_size, config.image_size, config.image_size, 3)).astype(np.float32),
      "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32) * mask[..., None],
      "gt_labels": np.where(mask, rng.integers(1, len(config.class_names) + 1, (batch_size, g)),
                            0).astype(np.int32),
      "gt_mask": mask,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="ssd300_voc", help="name of a file in configs/")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  config = config_lib.load_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                             f"{args.config}.py"))
  if config.data.source == "synthetic":
    config = data.resolve_classes(config)
  elif config.class_names is None:  # random data: the class count of the config's data set
    config.class_names = (categories.COCO_CLASSES if "coco" in args.config
                          else categories.VOC_CLASSES)
  config.train.batch_size = args.batch_size
  config.eval.batch_size = args.batch_size
  config.model.compute_dtype = args.dtype
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  batch = trainer.to_device(random_batch(config, args.batch_size))

  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"devices {jax.devices()}, jax {jax.__version__}")
  print(f"config {args.config}: {config.model.backbone}/{config.model.head}, image {config.image_size}, "
        f"{len(trainer.anchors)} anchors, {n_params:,} params, batch {args.batch_size}, {args.dtype}")
  print(f"compile: {compile_s:.1f} s")
  print(f"step: median {med * 1e3:.1f} ms over {args.steps} runs "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); {args.batch_size / med:.1f} img/s; "
        f"loss {float(metrics['loss']):.3f}")


if __name__ == "__main__":
  main()
