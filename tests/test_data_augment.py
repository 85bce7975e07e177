"""Tests for ssdjax.data.augment: box validity, crop/expand/flip geometry, determinism, toggles."""

import types

import numpy as np
import PIL.Image
import pytest

from ssdjax.data import augment, records

_ALL_OFF = dict(photometric=False, channel_swap_prob=0.0, expand=False, expand_prob=0.5,
                expand_max_ratio=4.0, random_crop=False, crop_trials=50, hflip=False)
_ALL_ON = dict(_ALL_OFF, photometric=True, expand=True, random_crop=True, hflip=True)
_MEAN = (123.675, 116.28, 103.53)


def _aug(**fields):
  return types.SimpleNamespace(**fields)


def _random_record(rng, height=40, width=60, n=None):
  """Random boxes on an image whose every pixel encodes its own (x, y) position."""
  n = rng.integers(0, 6) if n is None else n
  xy = rng.uniform(0, 0.8, (n, 2))
  wh = rng.uniform(0.02, 0.5, (n, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], axis=1)
  yy, xx = np.mgrid[0:height, 0:width]
  image = np.stack([xx * 4 % 256, yy * 6 % 256, np.full_like(xx, 17)], -1).astype(np.uint8)
  return records.make_record(image, boxes, np.arange(1, n + 1), image_id=0, file="t")


def _valid(boxes):
  return (((boxes >= 0) & (boxes <= 1)).all()
          and (boxes[:, 2] - boxes[:, 0] >= augment.MIN_BOX_SIDE).all()
          and (boxes[:, 3] - boxes[:, 1] >= augment.MIN_BOX_SIDE).all())


def test_full_augmentation_keeps_boxes_valid_and_is_deterministic():
  for seed in range(60):
    record = _random_record(np.random.default_rng(seed))
    out = augment.augment(record, np.random.default_rng(seed), _aug(**_ALL_ON), fill_rgb=_MEAN)
    again = augment.augment(record, np.random.default_rng(seed), _aug(**_ALL_ON), fill_rgb=_MEAN)
    assert _valid(out["boxes"]), seed
    assert out["image"].dtype == np.uint8 and out["image"].ndim == 3
    assert len(out["labels"]) == len(out["boxes"]) == len(out["difficult"])
    assert set(out["labels"].tolist()) <= set(record["labels"].tolist())
    np.testing.assert_array_equal(out["image"], again["image"])
    np.testing.assert_array_equal(out["boxes"], again["boxes"])


def test_crop_keeps_exactly_the_boxes_whose_centre_is_inside():
  kept_some = dropped_some = 0
  for seed in range(150):
    rng = np.random.default_rng(seed)
    record = _random_record(rng)
    height, width = record["image"].shape[:2]
    out, window = augment.random_crop(record, rng, trials=50)
    x0, y0, x1, y1 = (int(v) for v in window)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    np.testing.assert_array_equal(out["image"], record["image"][y0:y1, x0:x1])
    # Independent re-computation from the returned window, in pixels.
    expected_labels, expected_boxes = [], []
    for box, label in zip(record["boxes"].astype(np.float64), record["labels"]):
      bx0, by0, bx1, by1 = box * [width, height, width, height]
      cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
      if not (x0 <= cx <= x1 and y0 <= cy <= y1):
        continue
      nb = [(min(max(bx0, x0), x1) - x0) / (x1 - x0), (min(max(by0, y0), y1) - y0) / (y1 - y0),
            (min(max(bx1, x0), x1) - x0) / (x1 - x0), (min(max(by1, y0), y1) - y0) / (y1 - y0)]
      if nb[2] - nb[0] < 1e-3 or nb[3] - nb[1] < 1e-3:
        continue
      expected_labels.append(label)
      expected_boxes.append(nb)
    assert out["labels"].tolist() == expected_labels, seed
    np.testing.assert_allclose(out["boxes"], np.reshape(expected_boxes, (-1, 4)), atol=1e-5)
    kept_some += len(expected_labels) > 0
    dropped_some += len(expected_labels) < len(record["labels"])
  assert kept_some > 50 and dropped_some > 10  # both branches were exercised


def test_crop_sampler_accepts_a_crop_only_when_some_gt_meets_its_iou():
  # A tiny gt box reaches IoU 0.1 with no crop of scale >= 0.3: only the whole image and the
  # unconstrained sampler qualify -> the whole image half of the time. A crop that never
  # rejects would pick it 1/7 of the time.
  tiny = np.array([[0.5, 0.5, 0.505, 0.505]])
  whole = sum(np.array_equal(augment.sample_crop_window(tiny, np.random.default_rng(s), trials=50),
                             [0, 0, 1, 1]) for s in range(400))
  assert 160 <= whole <= 240
  # A gt box covering the image: every sampler finds a crop -> whole image 1/7 of the time.
  full = np.array([[0.0, 0.0, 1.0, 1.0]])
  whole = sum(np.array_equal(augment.sample_crop_window(full, np.random.default_rng(s), trials=50),
                             [0, 0, 1, 1]) for s in range(400))
  assert 30 <= whole <= 85
  # No gt at all: only the unconstrained sampler qualifies besides the whole image.
  none = np.zeros((0, 4))
  whole = sum(np.array_equal(augment.sample_crop_window(none, np.random.default_rng(s), trials=5),
                             [0, 0, 1, 1]) for s in range(400))
  assert 160 <= whole <= 240


def test_crop_windows_follow_caffe_scale_and_aspect():
  for s in range(200):
    w = augment.sample_crop_window(np.zeros((0, 4)), np.random.default_rng(s), trials=1)
    width, height = w[2] - w[0], w[3] - w[1]
    assert 0 <= w[0] and 0 <= w[1] and w[2] <= 1 + 1e-9 and w[3] <= 1 + 1e-9
    assert 0.3**2 - 1e-9 <= width * height <= 1 + 1e-9
    assert 0.5 - 1e-9 <= width / height <= 2 + 1e-9


def test_expand_keeps_object_pixels_at_the_box_location():
  rng = np.random.default_rng(3)
  for seed in range(20):
    record = _random_record(np.random.default_rng(seed), n=3)
    height, width = record["image"].shape[:2]
    out, (left, top) = augment.expand(record, rng, max_ratio=4.0, fill_rgb=_MEAN)
    canvas = out["image"]
    new_h, new_w = canvas.shape[:2]
    assert new_h >= height and new_w >= width
    assert new_h <= 4 * height and new_w <= 4 * width
    np.testing.assert_array_equal(canvas[top:top + height, left:left + width], record["image"])
    outside = np.ones((new_h, new_w), bool)
    outside[top:top + height, left:left + width] = False
    assert (canvas[outside] == np.rint(_MEAN).astype(np.uint8)).all()
    assert _valid(out["boxes"])
    for old, new in zip(record["boxes"], out["boxes"]):
      ox0, oy0, ox1, oy1 = np.rint(old * [width, height, width, height]).astype(int)
      nx0, ny0, nx1, ny1 = np.rint(new * [new_w, new_h, new_w, new_h]).astype(int)
      np.testing.assert_array_equal(canvas[ny0:ny1, nx0:nx1], record["image"][oy0:oy1, ox0:ox1])


def test_expand_then_crop_is_the_same_as_the_two_steps():
  aug = _aug(**dict(_ALL_OFF, expand=True, expand_prob=1.0, random_crop=True))
  for seed in range(40):
    record = _random_record(np.random.default_rng(seed))
    fused = augment.augment(record, np.random.default_rng(seed), aug, fill_rgb=_MEAN)
    rng = np.random.default_rng(seed)
    assert rng.random() < 1.0  # the expand_prob draw
    expanded, _ = augment.expand(record, rng, max_ratio=4.0, fill_rgb=_MEAN)
    steps, _ = augment.random_crop(expanded, rng, trials=50)
    np.testing.assert_array_equal(fused["image"], steps["image"])
    np.testing.assert_array_equal(fused["boxes"], steps["boxes"])
    np.testing.assert_array_equal(fused["labels"], steps["labels"])


def test_hflip_twice_is_identity_and_moves_pixels_with_boxes():
  record = _random_record(np.random.default_rng(0), n=4)
  height, width = record["image"].shape[:2]
  once = augment.hflip(record)
  twice = augment.hflip(once)
  np.testing.assert_array_equal(twice["image"], record["image"])
  np.testing.assert_allclose(twice["boxes"], record["boxes"], atol=1e-6)
  assert _valid(once["boxes"])
  for old, new in zip(record["boxes"], once["boxes"]):
    ox0, oy0, ox1, oy1 = np.rint(old * [width, height, width, height]).astype(int)
    nx0, ny0, nx1, ny1 = np.rint(new * [width, height, width, height]).astype(int)
    np.testing.assert_array_equal(once["image"][ny0:ny1, nx0:nx1],
                                  record["image"][oy0:oy1, ox0:ox1][:, ::-1])


def test_photometric_is_deterministic_and_keeps_gray_gray():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 20, 3)).astype(np.uint8)
  a = augment.photometric_distort(image, np.random.default_rng(5), channel_swap_prob=0.5)
  b = augment.photometric_distort(image, np.random.default_rng(5), channel_swap_prob=0.5)
  np.testing.assert_array_equal(a, b)
  changed = sum(not np.array_equal(
      augment.photometric_distort(image, np.random.default_rng(s), channel_swap_prob=0.0), image)
                for s in range(20))
  assert changed >= 15  # (1 - 0.5^4) of the draws change something
  # Brightness and contrast move gray levels; saturation, hue and channel swaps keep them gray.
  gray = np.repeat(rng.integers(0, 256, (16, 20, 1)), 3, axis=2).astype(np.uint8)
  for s in range(20):
    out = augment.photometric_distort(gray, np.random.default_rng(s), channel_swap_prob=1.0)
    assert out.dtype == np.uint8 and out.shape == gray.shape
    assert (np.ptp(out.astype(int), axis=2) <= 1).all()


def test_channel_swap_only_permutes_channels():
  image = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  swapped = 0
  for s in range(30):
    out = augment.photometric_distort(image, np.random.default_rng(s), channel_swap_prob=1.0)
    ref = augment.photometric_distort(image, np.random.default_rng(s), channel_swap_prob=0.0)
    # Same distortion draws; the swap permutes the distorted channels.
    perms = [p for p in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0])
             if np.array_equal(out, ref[..., p])]
    assert perms, s
    swapped += [0, 1, 2] not in perms
  assert swapped >= 15


def test_all_toggles_off_is_identity():
  for seed in range(10):
    record = _random_record(np.random.default_rng(seed))
    out = augment.augment(record, np.random.default_rng(seed), _aug(**_ALL_OFF), fill_rgb=_MEAN)
    np.testing.assert_array_equal(out["image"], record["image"])
    np.testing.assert_array_equal(out["boxes"], record["boxes"])
    np.testing.assert_array_equal(out["labels"], record["labels"])
  record = _random_record(np.random.default_rng(0))
  out = augment.augment(record, np.random.default_rng(0),
                        _aug(**dict(_ALL_OFF, expand=True, expand_prob=0.0)), fill_rgb=_MEAN)
  np.testing.assert_array_equal(out["image"], record["image"])


@pytest.mark.parametrize("step", ["photometric", "expand", "random_crop", "hflip"])
def test_each_toggle_alone(step):
  record = _random_record(np.random.default_rng(1), n=3)
  colours = {tuple(c) for c in record["image"].reshape(-1, 3)} | {tuple(np.rint(_MEAN).astype(int))}
  changed = recoloured = 0
  for seed in range(12):
    out = augment.augment(record, np.random.default_rng(seed),
                          _aug(**dict(_ALL_OFF, **{step: True})), fill_rgb=_MEAN)
    changed += not (np.array_equal(out["image"], record["image"])
                    and np.array_equal(out["boxes"], record["boxes"]))
    recoloured += bool({tuple(c) for c in out["image"].reshape(-1, 3)} - colours)
    assert _valid(out["boxes"])
    if step == "photometric":  # geometry untouched
      np.testing.assert_array_equal(out["boxes"], record["boxes"])
  assert changed >= 4
  # Only the photometric step creates colours; the geometric ones move and fill pixels.
  assert (recoloured >= 4) if step == "photometric" else (recoloured == 0)


def test_resize_and_normalize_match_pil_and_the_formula():
  image = np.random.default_rng(2).integers(0, 256, (30, 50, 3)).astype(np.uint8)
  out = augment.resize(image, 20)
  ref = np.asarray(PIL.Image.fromarray(image).resize((20, 20), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(out, ref)
  assert augment.resize(out, 20) is out
  norm = augment.normalize(out, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0))
  assert norm.dtype == np.float32
  np.testing.assert_allclose(norm, (ref - np.array([10, 20, 30])) / np.array([2, 4, 8]),
                             rtol=1e-6)
