r"""The training input on the host and on the device (config.augment.on_device), side by side.

  python benchmarks/input_pipeline.py                 # host CPU per image, device augmentation
  python benchmarks/input_pipeline.py --train         # also end-to-end training images/s
  python benchmarks/input_pipeline.py --workers=0,2   # images/s of the host pipeline per worker count

Input: VOC-like images (500x375, 1-5 objects) kept as JPEG bytes in memory and decoded when read,
as from disk; the SSD300 config (image_size 300, every augmentation on). Figures:

1. Host CPU per image (CPU time of one thread reading, transforming and stacking batches of 32):
   the host path decodes, augments (photometric, expand, IoU crop, flip), resizes and normalizes;
   the device path decodes and fits the image into the uint8 canvas. Interleaved runs (host,
   device, host, ...), median of --runs. Images/s per host core = 1000 / CPU ms.
2. Device time per image of ``ssdjax.augment.augment_batch`` (jit, batch 32, canvas 512 -> 300),
   compile excluded, ``block_until_ready``, median of --runs.
3. --train: end-to-end training images/s (input + step) of configs/synthetic.py and
   configs/ssd300_voc.py (batch 8) with each path, steps interleaved (host, device, ...) after
   warm-up, median of --steps.
"""

import argparse
import io
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import grain  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from ssdjax import augment  # pylint: disable=g-import-not-at-top
from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
from ssdjax import data  # pylint: disable=g-import-not-at-top
from ssdjax import train  # pylint: disable=g-import-not-at-top
from ssdjax.data import pipeline, records  # pylint: disable=g-import-not-at-top


def voc_like_config(batch_size: int, num_workers: int, on_device: bool):
  config = config_lib.defaults()  # configs/ssd300_voc.py
  config.train.batch_size = batch_size
  config.augment.on_device = on_device
  d = config.data
  d.source, d.train, d.num_workers = "synthetic", ("train",), num_workers
  d.synthetic.update(dict(num_train=256, image_hw=(375, 500), min_objects=1, max_objects=5,
                          num_classes=4))
  return data.resolve_classes(config)


class JpegSource:
  """The synthetic images as JPEG bytes in memory, decoded when read (as files from disk)."""

  def __init__(self, source):
    self._items = []
    for i in range(len(source)):
      r = source[i]
      buf = io.BytesIO()
      Image.fromarray(r["image"]).save(buf, format="JPEG", quality=90)
      self._items.append((buf.getvalue(), r))

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    jpeg, r = self._items[i]
    return {**r, "image": records.decode_image(jpeg, name=f"image {i}")}


def batches(config, source, num_workers: int = 0):
  ds = grain.MapDataset.source(source).seed(0).shuffle().repeat()
  ds = ds.map(pipeline.CanvasTransform(config)) if config.augment.on_device else ds.random_map(
      pipeline.TrainTransform(config))
  return iter(pipeline._batched(ds, config.train.batch_size, num_workers,  # pylint: disable=protected-access
                                drop_remainder=True))


def host_cpu_per_image(args, source):
  """CPU time of this thread alone: read (decode) + transform + stack, without grain's read-ahead
  threads, whose work would land in whichever path is being timed."""
  transforms = {False: pipeline.TrainTransform(voc_like_config(args.batch_size, 0, False)),
                True: pipeline.CanvasTransform(voc_like_config(args.batch_size, 0, True))}
  rng = np.random.default_rng(0)

  def one_batch(on, start):
    elements = []
    for i in range(start, start + args.batch_size):
      record = source[i % len(source)]
      elements.append(transforms[on](record, rng) if not on else transforms[on](record))
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}

  for on in (False, True):  # warm-up
    one_batch(on, 0)
  ms = {False: [], True: []}
  start = 0
  for _ in range(args.runs):
    for on in (False, True):
      t0 = time.thread_time()
      for b in range(args.batches):
        one_batch(on, start + b * args.batch_size)
      ms[on].append((time.thread_time() - t0) * 1000 / (args.batches * args.batch_size))
    start += args.batches * args.batch_size
  host, device = statistics.median(ms[False]), statistics.median(ms[True])
  print("\n1. host CPU per image (one thread, batch %d, median of %d interleaved runs of %d "
        "batches)" % (args.batch_size, args.runs, args.batches))
  print(f"   host path   (decode + augment + resize + normalize): {host:.2f} ms/image "
        f"({1000 / host:.0f} images/s per core; runs {', '.join(f'{v:.2f}' for v in ms[False])})")
  print(f"   device path (decode + fit canvas):                   {device:.2f} ms/image "
        f"({1000 / device:.0f} images/s per core; runs {', '.join(f'{v:.2f}' for v in ms[True])})")
  print(f"   host CPU ratio host/device: {host / device:.1f}x")


def device_ms_per_image(args, source):
  config = voc_like_config(args.batch_size, 0, True)
  batch = next(batches(config, source))
  batch = {k: jax.device_put(v) for k, v in batch.items()}
  switches = {k: config.augment[k] for k in augment.SWITCHES}
  run = jax.jit(lambda key, b: augment.augment_batch(
      key, b["images"], b["valid_hw"], b["gt_boxes"], b["gt_labels"], b["gt_mask"],
      image_size=config.image_size, mean_rgb=tuple(config.data.mean_rgb),
      std_rgb=tuple(config.data.std_rgb), **switches))
  t0 = time.perf_counter()
  jax.block_until_ready(run(jax.random.key(0), batch))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.runs):
    t0 = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(i + 1), batch))
    times.append((time.perf_counter() - t0) * 1000 / args.batch_size)
  print(f"\n2. device augmentation ({jax.devices()[0].platform}, jit, batch {args.batch_size}, "
        f"canvas {config.augment.canvas_size} -> {config.image_size}): "
        f"{statistics.median(times):.2f} ms/image (min {min(times):.2f}, max {max(times):.2f}; "
        f"compile {compile_s:.1f} s)")


def end_to_end(args):
  print(f"\n3. end-to-end training images/s (input + step, {args.steps} interleaved steps per "
        "path after 2 warm-up steps)")
  for name, batch_size in (("synthetic.py", 32), ("ssd300_voc.py", 8)):
    runs = {}
    for on in (False, True):
      if name == "synthetic.py":
        config = config_lib.load_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                   name))
        config.augment.on_device = on
        config = data.resolve_classes(config)
      else:
        config = voc_like_config(batch_size, 2, on)
      config.train.batch_size = batch_size
      trainer = train.Trainer(config)
      feed = train.DevicePrefetch(data.make_train_iterator(config, seed=0), trainer.to_device)
      state = trainer.init_state(0)
      for _ in range(2):
        state, m = trainer.train_step(state, next(feed))
      jax.block_until_ready(m)
      runs[on] = [trainer, feed, state, []]
    for _ in range(args.steps):
      for on, r in runs.items():
        t0 = time.perf_counter()
        r[2], m = r[0].train_step(r[2], next(r[1]))
        jax.block_until_ready(m)
        r[3].append(batch_size / (time.perf_counter() - t0))
    host, device = (statistics.median(runs[on][3]) for on in (False, True))
    print(f"   {name} batch {batch_size}: host path {host:.1f} images/s, device path "
          f"{device:.1f} images/s (device/host {device / host:.2f}x)")


def workers_sweep(args):
  print("\nhost pipeline images/s by num_workers (make_train_iterator, synthetic images drawn on "
        "the fly)")
  for workers in (int(w) for w in args.workers.split(",")):
    config = voc_like_config(args.batch_size, workers, False)
    it = data.make_train_iterator(config, seed=0)
    for _ in range(args.batches):
      next(it)
    rates = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      rates.append(args.batches * args.batch_size / (time.perf_counter() - t0))
    it.close()
    print(f"   num_workers={workers}: {statistics.median(rates):.1f} images/s")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--train", action="store_true", help="also end-to-end training images/s")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per path with --train")
  parser.add_argument("--workers", default="", help="also time the host pipeline per num_workers")
  args = parser.parse_args()

  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
  print(f"machine: {platform.platform()}, python {platform.python_version()}, jax {jax.__version__}"
        f" ({jax.devices()[0].platform}), cpu_count {os.cpu_count()} (usable {affinity}); load "
        f"average {os.getloadavg()[0]:.2f}")
  config = voc_like_config(args.batch_size, 0, False)
  source = JpegSource(pipeline.train_source(config))
  host_cpu_per_image(args, source)
  device_ms_per_image(args, source)
  if args.train:
    end_to_end(args)
  if args.workers:
    workers_sweep(args)
  print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
