"""config.augment.on_device: the host decodes into uint8 canvases, the train step augments them
(ssdjax.augment), batches are prefetched to the devices, and a resumed run sees the same batches.
The augmentation itself (parity with the host path, distributions) is tested in test_augment.py."""

import json
import os

import chex
import jax
import numpy as np
from PIL import Image
import pytest

from ssdjax import data
from ssdjax import train
from ssdjax.data import pipeline
from tests.helpers import small_config


def _config(**overrides):
  return small_config(**{"augment.on_device": True, "augment.canvas_size": 160, **overrides})


def test_canvas_keeps_the_aspect_and_never_enlarges():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (100, 300, 3), np.uint8)
  out = pipeline.fit_canvas(wide, 120)
  assert out["images"].shape == (120, 120, 3) and out["images"].dtype == np.uint8
  assert out["valid_hw"].tolist() == [40, 120]
  expected = np.asarray(Image.fromarray(wide).resize((120, 40), Image.BILINEAR))
  np.testing.assert_array_equal(out["images"][:40], expected)
  assert not out["images"][40:].any()
  small = rng.integers(0, 256, (30, 20, 3), np.uint8)
  out = pipeline.fit_canvas(small, 120)
  assert out["valid_hw"].tolist() == [30, 20]
  np.testing.assert_array_equal(out["images"][:30, :20], small)


def test_device_path_batches_travel_as_uint8_canvases():
  config = _config()
  batch = next(data.make_train_iterator(config, seed=0))
  b, g = config.train.batch_size, config.data.max_boxes
  assert batch["images"].dtype == np.uint8 and batch["images"].shape == (b, 160, 160, 3)
  # The synthetic images are 128x128: they fit unscaled, the rest of the canvas stays empty.
  assert (batch["valid_hw"] == 128).all()
  assert not batch["images"][:, 128:].any() and not batch["images"][:, :, 128:].any()
  assert batch["gt_boxes"].shape == (b, g, 4) and batch["gt_mask"].any()
  host = next(data.make_train_iterator(_config(**{"augment.on_device": False}), seed=0))
  assert host["images"].dtype == np.float32 and "valid_hw" not in host


def test_on_device_none_means_the_accelerator_and_is_recorded_resolved(tmp_path):
  config = small_config()
  assert config.augment.on_device is None
  assert data.augment_on_device(config) == (jax.default_backend() != "cpu")
  resolved = train.prepare_config(config)
  assert resolved.augment.on_device is (jax.default_backend() != "cpu")


@pytest.mark.parametrize("on_device", [False, True])
def test_the_step_makes_no_hidden_host_round_trip(on_device):
  config = _config(**{"augment.on_device": on_device})
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  feed = train.DevicePrefetch(data.make_train_iterator(config, seed=0), trainer.to_device)
  state, _ = trainer.train_step(state, next(feed))  # compiles
  batch = next(feed)
  with jax.transfer_guard("disallow"):
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready((state, metrics))
  assert np.isfinite(float(metrics["loss"]))


def test_device_augmentation_changes_with_the_step_and_the_image_only():
  config = _config()
  trainer = train.Trainer(config)
  batch = trainer.to_device(next(data.make_train_iterator(config, seed=0)))
  key = lambda t: train.augment_key(config.seed, t)
  from ssdjax import augment  # pylint: disable=g-import-not-at-top
  switches = {k: config.augment[k] for k in augment.SWITCHES}
  run = jax.jit(lambda k, b: augment.augment_batch(
      k, b["images"], b["valid_hw"], b["gt_boxes"], b["gt_labels"], b["gt_mask"],
      image_size=config.image_size, mean_rgb=tuple(config.data.mean_rgb),
      std_rgb=tuple(config.data.std_rgb), **switches))
  a, again, other = run(key(3), batch), run(key(3), batch), run(key(4), batch)
  chex.assert_trees_all_equal(a, again)
  assert not np.array_equal(a["images"], other["images"])
  # Image i's augmentation does not depend on the other images of the batch.
  half = jax.tree.map(lambda x: x[:4], batch)
  np.testing.assert_array_equal(run(key(3), half)["images"], np.asarray(a["images"])[:4])


def test_prefetch_records_the_position_of_the_batches_taken():
  config = _config()
  it = data.make_train_iterator(config, seed=0)
  feed = train.DevicePrefetch(it, lambda b: b, depth=2)
  first = [next(feed) for _ in range(3)]
  state = json.loads(feed.get_state())
  fourth = next(feed)
  fresh = data.make_train_iterator(config, seed=0)
  fresh.set_state(state)
  chex.assert_trees_all_equal(next(fresh), fourth)
  plain = data.make_train_iterator(config, seed=0)
  chex.assert_trees_all_equal([next(plain) for _ in range(3)], first)


@pytest.mark.slow
def test_a_resumed_device_path_run_ends_bitwise_equal(tmp_path):
  config = _config(**{"train.num_steps": 4, "train.checkpoint_every": 2, "eval.max_images": 4})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  final = train.train_and_evaluate(config, straight, progress=False)
  assert "voc07/mAP" in final  # evaluation works next to the device path
  config.train.num_steps = 2
  train.train_and_evaluate(config, resumed, progress=False)
  config.train.num_steps = 4
  train.train_and_evaluate(config, resumed, progress=False)
  a, b = (jax.device_get(train.restore_for_inference(w)[2]) for w in (straight, resumed))
  chex.assert_trees_all_equal(a, b)
  with open(os.path.join(straight, "config.json")) as f:
    assert json.load(f)["augment"]["on_device"] is True
