"""Tests for ssdjax.data.synthetic: determinism, tight boxes, visibility, contrast, config."""

import numpy as np
import pytest

from tests.helpers import synthetic as synthetic_config
from ssdjax.data import synthetic


def _source(**overrides):
  kwargs = dict(num_examples=40, split="train", seed=0, image_hw=(64, 64), min_objects=1,
                max_objects=4, min_size=0.1, max_size=0.6, num_classes=4)
  kwargs.update(overrides)
  return synthetic.SyntheticShapes(**kwargs)


def test_deterministic_per_seed_split_index():
  a, b = _source(), _source()
  for i in (0, 7, 39):
    ra, rb = a[i], b[i]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["boxes"], rb["boxes"])
    np.testing.assert_array_equal(ra["labels"], rb["labels"])
  # Access order does not matter (no hidden state).
  np.testing.assert_array_equal(a[3]["image"], _source()[3]["image"])
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  assert not np.array_equal(a[0]["image"], _source(split="val")[0]["image"])
  assert not np.array_equal(a[0]["image"], _source(seed=1)[0]["image"])


def test_boxes_are_tight_around_visible_pixels():
  src = _source(image_hw=(48, 80))
  checked = 0
  for i in range(25):
    record, masks = src.render(i)
    height, width = record["image"].shape[:2]
    assert (height, width) == (48, 80)
    assert masks.shape == (len(record["labels"]), height, width)
    assert not (masks.sum(0) > 1).any()  # each pixel shows at most one object
    for box, mask in zip(record["boxes"], masks):
      ys, xs = np.nonzero(mask)
      assert len(xs) > 0
      x0, y0, x1, y1 = box * [width, height, width, height]
      # Inside the box, and touching its four edges (pixel j spans [j, j + 1)).
      assert xs.min() == pytest.approx(x0) and xs.max() + 1 == pytest.approx(x1)
      assert ys.min() == pytest.approx(y0) and ys.max() + 1 == pytest.approx(y1)
      # Crisp: one colour for the whole object.
      assert len(np.unique(record["image"][mask], axis=0)) == 1
      checked += 1
  assert checked >= 40


def test_objects_contrast_with_their_surroundings():
  src = _source(image_hw=(96, 96))
  for i in range(15):
    record, masks = src.render(i)
    image = record["image"].astype(np.float64)
    anything = masks.any(0)
    for mask in masks:
      grown = mask.copy()
      grown[1:] |= mask[:-1]
      grown[:-1] |= mask[1:]
      grown[:, 1:] |= mask[:, :-1]
      grown[:, :-1] |= mask[:, 1:]
      ring = grown & ~anything  # background pixels touching the object
      if not ring.any():
        continue
      colour = image[mask][0]
      distance = np.linalg.norm(image[ring] - colour, axis=1)
      assert np.median(distance) > 60, (i, colour)


def test_labels_sizes_and_counts():
  src = _source(image_hw=(100, 100), min_size=0.2, max_size=0.4, num_classes=2, max_objects=3)
  counts = []
  for i in range(30):
    r = src[i]
    counts.append(len(r["labels"]))
    assert r["labels"].dtype == np.int32 and set(r["labels"].tolist()) <= {1, 2}
    sides = (r["boxes"][:, 2:] - r["boxes"][:, :2]) * 100  # pixels
    assert (sides.max(axis=1) <= 0.4 * 100 / np.sqrt(0.75) + 1).all()
    assert ((r["boxes"] >= 0) & (r["boxes"] <= 1)).all()
    assert (r["boxes"][:, 2:] > r["boxes"][:, :2]).all()
    assert r["image"].dtype == np.uint8 and r["image"].shape == (100, 100, 3)
    assert r["file"] == f"synthetic:train[{i}]" and r["image_id"] == i
  assert 1 <= min(counts) and max(counts) <= 3 and len(set(counts)) > 1


def test_images_without_objects():
  src = _source(min_objects=0, max_objects=0)
  r = src[0]
  assert r["boxes"].shape == (0, 4) and r["labels"].shape == (0,)
  record, masks = src.render(1)
  assert masks.shape == (0, 64, 64)
  mixed = _source(min_objects=0, max_objects=1)
  assert {len(mixed[i]["labels"]) for i in range(30)} == {0, 1}


def test_annotation_matches_record():
  src = _source()
  ann, rec = src.annotation(5), src[5]
  assert "image" not in ann and (ann["height"], ann["width"]) == (64, 64)
  np.testing.assert_array_equal(ann["boxes"], rec["boxes"])


@pytest.mark.parametrize("overrides,fragment", [
    (dict(split="test"), "split 'test'"),
    (dict(num_examples=0), "num_examples"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(min_size=0.0), "min_size"),
    (dict(max_size=1.5), "max_size"),
    (dict(num_classes=5), "num_classes=5"),
    (dict(image_hw=(4, 64)), "too small"),
])
def test_invalid_arguments(overrides, fragment):
  with pytest.raises(ValueError, match=fragment):
    _source(**overrides)


def test_index_out_of_range():
  with pytest.raises(IndexError):
    _source(num_examples=3)[3]  # pylint: disable=expression-not-assigned


def test_from_config():
  config = synthetic_config.get_config()
  train = synthetic.from_config(config, "train")
  val = synthetic.from_config(config, "val")
  assert len(train) == config.data.synthetic.num_train and len(val) == config.data.synthetic.num_val
  assert train[0]["image"].shape == (config.image_size, config.image_size, 3)
  config.data.synthetic.image_hw = (30, 40)
  assert synthetic.from_config(config, "train")[0]["image"].shape == (30, 40, 3)
  with pytest.raises(ValueError, match="valid splits"):
    synthetic.from_config(config, "validation")
  config.data.synthetic.num_classes = 3
  assert synthetic.from_config(config, "train").class_names() == ("circle", "square", "triangle")
