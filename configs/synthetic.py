r"""The default experiment: a small SSD trained from scratch on the built-in synthetic shapes data.

Runs on a laptop CPU in minutes; this is what `make demo` trains and what the tests exercise.
Its 4 classes (circle, square, triangle, cross) come from the synthetic data.

  python -m ssdjax.main --config=configs/synthetic.py --workdir=runs/synthetic
"""

from ssdjax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.image_size = 128
  a = c.anchors
  a.feature_sizes = (16, 8, 4, 2, 1)
  a.steps = (8, 16, 32, 64, 128)
  a.min_sizes = (10, 24, 44, 72, 100)
  a.max_sizes = (24, 44, 72, 100, 128)
  a.aspect_ratios = ((2,), (2,), (2,), (2,), (2,))
  c.model.backbone = "tiny"
  c.model.backbone_kwargs = {"width": 32}
  c.data.source = "synthetic"
  c.data.train = ("train",)
  c.data.eval = "val"
  c.data.max_boxes = 8
  c.data.mean_rgb = (127.5, 127.5, 127.5)
  c.data.std_rgb = (64.0, 64.0, 64.0)
  # The validation images are neither zoomed out nor colour-shifted, and a 2000-step CPU schedule
  # learns them fastest without those two; crops and flips stay (see BENCHMARKS.md for the effect).
  c.augment.expand = False
  c.augment.photometric = False
  c.augment.canvas_size = 128  # the images are 128x128: a larger canvas would only move zeros
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 32
  c.train.num_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 500
  c.eval.batch_size = 50
  c.eval.metrics = ("voc07", "voc", "coco")
  return c
