"""Every experiment config builds, and its whole train step traces (shapes only); one real step."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssdjax import anchors as anchors_lib
from ssdjax import data
from ssdjax import train
from ssdjax.data.categories import COCO_CLASSES, VOC_CLASSES
from tests.helpers import REPO, SHAPE_CLASSES, load_config

CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not p.endswith("__init__.py"))

# Anchor counts published with the original models (Caffe SSD prior boxes, REFERENCE.md).
KNOWN_ANCHORS = {"ssd300_voc.py": 8732, "ssd300_coco.py": 8732, "ssd512_voc.py": 24564,
                 "ssd300_resnet50.py": 8732}


# The classes each file's data has (a run reads them from the data; here there is no data).
DATA_CLASSES = {"ssd300_voc.py": VOC_CLASSES, "ssd512_voc.py": VOC_CLASSES,
                "ssd300_coco.py": COCO_CLASSES, "ssd300_resnet50.py": COCO_CLASSES,
                "synthetic.py": SHAPE_CLASSES}


def _module(filename: str):
  spec = importlib.util.spec_from_file_location(filename[:-3], os.path.join(REPO, "configs", filename))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(filename: str):
  config = load_config(filename)
  if config.class_names is None:
    assert filename in DATA_CLASSES, f"add the classes of {filename}'s data to DATA_CLASSES"
    config.class_names = DATA_CLASSES[filename]
  return config


def _expected_anchors(a) -> int:
  """sum_i f_i^2 * K_i with K_i = 1 (min size) + 1 (sqrt(min * max)) + 2 per aspect ratio."""
  per_location = [1 + (1 if a.max_sizes else 0) + 2 * len(ar) for ar in a.aspect_ratios]
  return sum(f * f * k for f, k in zip(a.feature_sizes, per_location))


def test_configs_are_found():
  assert {"synthetic.py", "ssd300_voc.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("filename", CONFIG_FILES)
def test_config_docstring_has_its_run_command(filename):
  doc = _module(filename).__doc__ or ""
  assert f"--config=configs/{filename}" in doc


@pytest.mark.parametrize("filename", CONFIG_FILES)
def test_whole_train_step_traces(filename):
  config = _config(filename)
  assert isinstance(config, ml_collections.ConfigDict)
  config.train.batch_size = config.eval.batch_size = 2
  num_anchors = len(anchors_lib.from_config(config))
  assert num_anchors == _expected_anchors(config.anchors)
  if filename in KNOWN_ANCHORS:
    assert num_anchors == KNOWN_ANCHORS[filename]

  trainer = train.Trainer(config)
  s, g = config.image_size, config.data.max_boxes
  batch = {"images": jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32),
           "gt_boxes": jax.ShapeDtypeStruct((2, g, 4), jnp.float32),
           "gt_labels": jax.ShapeDtypeStruct((2, g), jnp.int32),
           "gt_mask": jax.ShapeDtypeStruct((2, g), jnp.bool_)}
  loc, logits = jax.eval_shape(
      lambda v, x: trainer.model.apply(v, x, train=False),
      trainer.variables(trainer.abstract_state), batch["images"])
  assert loc.shape == (2, num_anchors, 4)
  assert logits.shape == (2, num_anchors, len(config.class_names) + 1)

  new_state, metrics = jax.eval_shape(trainer.train_step, trainer.abstract_state, batch)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  assert jax.tree.structure(new_state) == jax.tree.structure(trainer.abstract_state)
  for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(trainer.abstract_state)):
    assert (new.shape, new.dtype) == (old.shape, old.dtype)


def test_synthetic_config_runs_one_real_step():
  config = _config("synthetic.py")
  config.data.synthetic.num_train = 8
  config.data.num_workers = 0
  config.train.batch_size = config.eval.batch_size = 4
  config.optimizer.warmup_steps = 0  # a warmup starts at learning rate 0: the step would not move
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  before = jax.device_get(state["params"])
  batch = next(data.make_train_iterator(config, seed=0))
  assert batch["images"].shape == (4, config.image_size, config.image_size, 3)
  state, metrics = trainer.train_step(state, trainer.to_device(batch))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert int(state["step"]) == 1 and int(state["nonfinite"]) == 0
  after = jax.device_get(state["params"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
  assert any(changed)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
