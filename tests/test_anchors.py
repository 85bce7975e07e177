"""Tests for ssdjax.anchors against a literal port of Caffe's PriorBoxLayer and hand values."""

import importlib
import math
import pathlib

import numpy as np
import pytest

from tests.helpers import REPO, load_config, ssd300_coco, ssd300_voc, ssd512_voc
from ssdjax import anchors

CONFIG_DIR = pathlib.Path(REPO) / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")

# ---------------------------------------------------------------------------------------------
# Independent reference: Caffe SSD's PriorBoxLayer (LayerSetUp + Forward_cpu), one call per map.


def caffe_prior_box(layer_size, img_size, min_sizes, max_sizes, aspect_ratio, flip, clip, step,
                    offset):
  """Returns [f*f*K, 4] xyxy corners, normalized, in Caffe's output order."""
  # LayerSetUp: aspect_ratios_ starts with 1; a ratio already present (within 1e-6) is skipped.
  aspect_ratios = [1.0]
  for ar in aspect_ratio:
    if any(abs(ar - a) < 1e-6 for a in aspect_ratios):
      continue
    aspect_ratios.append(float(ar))
    if flip:
      aspect_ratios.append(1.0 / ar)
  layer_width = layer_height = layer_size
  img_width = img_height = img_size
  step_w = step_h = step
  top = []
  for h in range(layer_height):
    for w in range(layer_width):
      center_x = (w + offset) * step_w
      center_y = (h + offset) * step_h
      for s in range(len(min_sizes)):
        min_size = min_sizes[s]
        # first prior: aspect_ratio = 1, size = min_size
        box_width = box_height = min_size
        top.append([(center_x - box_width / 2.) / img_width,
                    (center_y - box_height / 2.) / img_height,
                    (center_x + box_width / 2.) / img_width,
                    (center_y + box_height / 2.) / img_height])
        if max_sizes:
          max_size = max_sizes[s]
          # second prior: aspect_ratio = 1, size = sqrt(min_size * max_size)
          box_width = box_height = math.sqrt(min_size * max_size)
          top.append([(center_x - box_width / 2.) / img_width,
                      (center_y - box_height / 2.) / img_height,
                      (center_x + box_width / 2.) / img_width,
                      (center_y + box_height / 2.) / img_height])
        # rest of priors
        for r in range(len(aspect_ratios)):
          ar = aspect_ratios[r]
          if abs(ar - 1.) < 1e-6:
            continue
          box_width = min_size * math.sqrt(ar)
          box_height = min_size / math.sqrt(ar)
          top.append([(center_x - box_width / 2.) / img_width,
                      (center_y - box_height / 2.) / img_height,
                      (center_x + box_width / 2.) / img_width,
                      (center_y + box_height / 2.) / img_height])
  top = np.asarray(top, np.float64)
  if clip:
    top = np.minimum(np.maximum(top, 0.), 1.)
  return top


def caffe_priors_cxcywh(config):
  """All maps of a config, concatenated as the SSD net's mbox_priorbox concat does, -> cxcywh."""
  a = config.anchors
  levels = []
  for i, f in enumerate(a.feature_sizes):
    levels.append(caffe_prior_box(
        layer_size=f, img_size=config.image_size, min_sizes=[a.min_sizes[i]],
        max_sizes=[a.max_sizes[i]] if a.max_sizes else [], aspect_ratio=a.aspect_ratios[i],
        flip=True, clip=a.clip in (True, "corners"), step=a.steps[i], offset=a.offset))
  xyxy = np.concatenate(levels)
  return np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)


def expected_count(config):
  a = config.anchors
  per_loc = [(2 if a.max_sizes else 1) + 2 * len(r) for r in a.aspect_ratios]
  return sum(f * f * k for f, k in zip(a.feature_sizes, per_loc))


def voc300_kwargs(**overrides):
  kw = dict(image_size=300, feature_sizes=(38, 19, 10, 5, 3, 1), steps=(8, 16, 32, 64, 100, 300),
            min_sizes=(30, 60, 111, 162, 213, 264), max_sizes=(60, 111, 162, 213, 264, 315),
            aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), offset=0.5, clip=False)
  kw.update(overrides)
  return kw


# ---------------------------------------------------------------------------------------------
# Counts.


@pytest.mark.parametrize("module,count", [(ssd300_voc, 8732), (ssd300_coco, 8732),
                                          (ssd512_voc, 24564)])
def test_published_box_counts(module, count):
  boxes = anchors.from_config(module.get_config())
  assert boxes.shape == (count, 4)
  assert boxes.dtype == np.float32


def test_all_configs_are_covered():
  assert {"ssd300_voc", "ssd512_voc", "ssd300_coco", "synthetic"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds_anchors(name):
  config = load_config(f"{name}.py")
  boxes = anchors.from_config(config)
  assert boxes.shape == (expected_count(config), 4)
  assert np.all(np.isfinite(boxes)) and np.all(boxes[:, 2:] > 0)
  a = config.anchors
  assert anchors.per_location_from_config(config) == [
      (2 if a.max_sizes else 1) + 2 * len(r) for r in a.aspect_ratios]


def test_per_location_counts_ssd300():
  assert anchors.per_location_from_config(ssd300_voc.get_config()) == [4, 6, 6, 6, 4, 4]
  assert anchors.num_anchors_per_location(((2,), (2, 3)), (60, 111)) == [4, 6]
  assert anchors.num_anchors_per_location(((2,), (2, 3)), None) == [3, 5]
  assert anchors.num_anchors_per_location(((2,), (2, 3)), ()) == [3, 5]


# ---------------------------------------------------------------------------------------------
# Against the Caffe port.


@pytest.mark.parametrize("module", [ssd300_voc, ssd300_coco, ssd512_voc])
def test_matches_caffe_prior_box(module):
  config = module.get_config()
  expected = caffe_priors_cxcywh(config)
  got = anchors.from_config(config)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    dict(clip="corners"),
    dict(offset=0.0),
    dict(max_sizes=None),
    dict(aspect_ratios=((2, 3),) * 6),
])
def test_matches_caffe_prior_box_variants(overrides):
  config = ssd300_voc.get_config()
  for key, value in overrides.items():
    setattr(config.anchors, key, value)
  np.testing.assert_allclose(anchors.from_config(config), caffe_priors_cxcywh(config),
                             rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Hand-checked values.


def test_ssd300_voc_first_location_by_hand():
  boxes = anchors.from_config(ssd300_voc.get_config())
  c = 4 / 300
  r2 = math.sqrt(2)
  expected = [
      [c, c, 30 / 300, 30 / 300],                                      # min
      [c, c, math.sqrt(30 * 60) / 300, math.sqrt(30 * 60) / 300],      # sqrt(min * max)
      [c, c, 30 * r2 / 300, 30 / r2 / 300],                            # ar 2
      [c, c, 30 / r2 / 300, 30 * r2 / 300],                            # ar 1/2 (flip)
  ]
  np.testing.assert_allclose(boxes[:4], expected, atol=1e-7)
  # The next location is one step (8 px) to the right on the same row.
  np.testing.assert_allclose(boxes[4, :2], [12 / 300, 4 / 300], atol=1e-7)


def test_ssd300_last_box_by_hand():
  boxes = anchors.from_config(ssd300_voc.get_config())
  r2 = math.sqrt(2)
  # conv9_2: 1x1 map, step 300 -> centre (0.5, 0.5); its last box is ar 1/2 of min_size 264.
  np.testing.assert_allclose(boxes[-1], [0.5, 0.5, 264 / r2 / 300, 264 * r2 / 300], atol=1e-7)
  np.testing.assert_allclose(boxes[-4], [0.5, 0.5, 264 / 300, 264 / 300], atol=1e-7)
  np.testing.assert_allclose(boxes[-3, 2:], [math.sqrt(264 * 315) / 300] * 2, atol=1e-7)


def test_clip_keeps_corners_inside_image():
  unclipped = anchors.default_boxes(**voc300_kwargs(clip=False))
  clipped = anchors.default_boxes(**voc300_kwargs(clip=True))
  corners = lambda b: np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)
  assert corners(unclipped).min() < -0.1 and corners(unclipped).max() > 1.1
  assert corners(clipped).min() >= -1e-7 and corners(clipped).max() <= 1 + 1e-7
  # First box: corners (4 - 15, 4 + 15) / 300 -> clipped to (0, 19/300).
  np.testing.assert_allclose(clipped[0], [9.5 / 300, 9.5 / 300, 19 / 300, 19 / 300], atol=1e-7)
  # Boxes inside the image are untouched.
  inside = (corners(unclipped).min(1) >= 0) & (corners(unclipped).max(1) <= 1)
  assert inside.any()
  np.testing.assert_array_equal(clipped[inside], unclipped[inside])


def test_offset_moves_centres():
  boxes = anchors.default_boxes(**voc300_kwargs(offset=0.0))
  np.testing.assert_allclose(boxes[0, :2], [0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(boxes[-1, :2], [0.0, 0.0], atol=1e-7)
  boxes = anchors.default_boxes(**voc300_kwargs(offset=0.25))
  np.testing.assert_allclose(boxes[0, :2], [2 / 300, 2 / 300], atol=1e-7)


def test_head_order_contract_is_level_y_x_k():
  """Anchor index start_l + (y * f + x) * K + k holds box k of location (y, x) of level l."""
  kw = voc300_kwargs()
  boxes = anchors.default_boxes(**kw)
  ks = anchors.num_anchors_per_location(kw["aspect_ratios"], kw["max_sizes"])
  start = 0
  for level, (f, step, k_count) in enumerate(zip(kw["feature_sizes"], kw["steps"], ks)):
    grid = boxes[start:start + f * f * k_count].reshape(f, f, k_count, 4)  # [y, x, k, 4]
    centres = (np.arange(f) + 0.5) * step / 300
    shape = (f, f, k_count)
    # cx varies with x (axis 1), cy with y (axis 0).
    np.testing.assert_allclose(grid[..., 0], np.broadcast_to(centres[None, :, None], shape),
                               atol=1e-6)
    np.testing.assert_allclose(grid[..., 1], np.broadcast_to(centres[:, None, None], shape),
                               atol=1e-6)
    # Sizes depend on k only, in Caffe order: min, sqrt(min*max), ar, 1/ar, ...
    mn, mx = kw["min_sizes"][level], kw["max_sizes"][level]
    sizes = [(mn, mn), (math.sqrt(mn * mx),) * 2]
    for ar in kw["aspect_ratios"][level]:
      sizes += [(mn * math.sqrt(ar), mn / math.sqrt(ar)), (mn / math.sqrt(ar), mn * math.sqrt(ar))]
    sizes = np.broadcast_to(np.asarray(sizes) / 300, shape + (2,))
    np.testing.assert_allclose(grid[..., 2:], sizes, atol=1e-6)
    y, x, k = f - 1, f // 2, k_count - 1
    np.testing.assert_allclose(boxes[start + (y * f + x) * k_count + k],
                               [(x + 0.5) * step / 300, (y + 0.5) * step / 300, *sizes[y, x, k]],
                               atol=1e-6)
    start += f * f * k_count
  assert start == len(boxes)


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("overrides,match", [
    (dict(steps=(8, 16, 32, 64, 100)), "steps"),
    (dict(min_sizes=(30, 60)), "min_sizes"),
    (dict(max_sizes=(60, 111, 162)), "max_sizes"),
    (dict(aspect_ratios=((2,),)), "aspect_ratios"),
    (dict(aspect_ratios=((2,), (1, 3), (2, 3), (2, 3), (2,), (2,))), r"aspect_ratios\[1\]"),
    (dict(aspect_ratios=((2,), (2, 3), (-2,), (2, 3), (2,), (2,))), r"aspect_ratios\[2\]"),
    (dict(aspect_ratios=((2, 0.5), (2, 3), (2, 3), (2, 3), (2,), (2,))), "repeats"),
    (dict(aspect_ratios=((2, 2), (2, 3), (2, 3), (2, 3), (2,), (2,))), "repeats"),
    (dict(min_sizes=(0, 60, 111, 162, 213, 264)), "min_size"),
    (dict(min_sizes=(30, -60, 111, 162, 213, 264)), "min_size"),
    (dict(steps=(8, 16, 0, 64, 100, 300)), "step"),
    (dict(feature_sizes=(38, 19, 10, 5, 3, 0)), "feature_size"),
    (dict(max_sizes=(20, 111, 162, 213, 264, 315)), "max_size"),
    (dict(image_size=0), "image_size"),
])
def test_invalid_specs_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    anchors.default_boxes(**voc300_kwargs(**overrides))


# ---------------------------------------------------------------------------------------------
# torchvision's DefaultBoxGenerator (clip="wh").


def torchvision_default_boxes(image_size, feature_sizes, aspect_ratios, scales, steps, clip):
  """NumPy port of torchvision's DefaultBoxGenerator._grid_default_boxes -> [A, 4] cxcywh."""
  levels = []
  for k, f in enumerate(feature_sizes):
    s_k = scales[k]
    wh = [[s_k, s_k], [math.sqrt(s_k * scales[k + 1])] * 2]
    for ar in aspect_ratios[k]:
      wh.extend([[s_k * math.sqrt(ar), s_k / math.sqrt(ar)], [s_k / math.sqrt(ar), s_k * math.sqrt(ar)]])
    wh = np.asarray(wh)
    if clip:
      wh = np.clip(wh, 0, 1)  # on cxcywh: centres stay, sizes are clamped
    shifts = (np.arange(f) + 0.5) / (image_size / steps[k])
    sy, sx = np.meshgrid(shifts, shifts, indexing="ij")
    centres = np.stack([sx.reshape(-1), sy.reshape(-1)], -1)  # [f*f, 2]
    levels.append(np.concatenate([np.repeat(centres, len(wh), 0), np.tile(wh, (f * f, 1))], 1))
  return np.concatenate(levels)


def test_wh_clip_matches_torchvision_default_box_generator():
  # ssd300_vgg16: scales 0.07 ... 1.05 are the COCO sizes 21 ... 315 of 300.
  kw = voc300_kwargs(min_sizes=(21, 45, 99, 153, 207, 261), max_sizes=(45, 99, 153, 207, 261, 315))
  ref = torchvision_default_boxes(300, kw["feature_sizes"], kw["aspect_ratios"],
                                  [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], kw["steps"], clip=True)
  got = anchors.default_boxes(**dict(kw, clip="wh"))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
  # Only the two ratio-2 boxes of the 1x1 map change: 0.87 * sqrt(2) = 1.23 is clamped to 1.
  unclipped = anchors.default_boxes(**kw)
  changed = np.flatnonzero(np.any(got != unclipped, axis=1))
  assert changed.tolist() == [len(got) - 2, len(got) - 1]
  np.testing.assert_allclose(got[-2:], [[0.5, 0.5, 1.0, 0.87 / math.sqrt(2)],
                                        [0.5, 0.5, 0.87 / math.sqrt(2), 1.0]], atol=1e-6)
  # Unlike Caffe's corner clip, centres never move and border boxes keep their size.
  corner = anchors.default_boxes(**dict(kw, clip=True))
  assert np.abs(corner - got).max() > 0.01
  np.testing.assert_array_equal(got[:, :2], unclipped[:, :2])


@pytest.mark.parametrize("alias,same_as", [("none", False), ("corners", True)])
def test_clip_string_aliases(alias, same_as):
  np.testing.assert_array_equal(anchors.default_boxes(**voc300_kwargs(clip=alias)),
                                anchors.default_boxes(**voc300_kwargs(clip=same_as)))


@pytest.mark.parametrize("clip", ["xy", 1, None, "WH"])
def test_invalid_clip_raises(clip):
  with pytest.raises(ValueError, match="anchors.clip"):
    anchors.default_boxes(**voc300_kwargs(clip=clip))
