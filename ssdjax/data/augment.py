"""SSD training augmentations on host-side records (NumPy + PIL), as in the Caffe SSD release.

Every random function takes a ``numpy.random.Generator`` and is deterministic given it. Records follow
:mod:`ssdjax.data.records` (``image`` uint8 [H, W, 3]; ``boxes`` [N, 4] xyxy, normalized); the per-box
fields (boxes, labels, difficult, is_crowd) are always filtered together. The order of
:func:`augment` is Caffe's: photometric distortion -> expand (zoom out) -> random IoU crop ->
horizontal flip; the pipeline then resizes (:func:`resize`) and normalizes (:func:`normalize`).
Boxes that a crop makes thinner than ``MIN_BOX_SIDE`` are dropped: that is augmentation,
not bad data. :func:`augment` is :func:`draw_params` (every random draw, in order) then
:func:`apply_params`; :mod:`ssdjax.augment` is the same augmentation in JAX, on the accelerator,
and its tests feed it the draws of this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image

from ssdjax import augment as device_augment
from ssdjax.data import records

# Caffe's constants are shared with the device path (ssdjax.augment), which mirrors this module.
_DISTORT_PROB = device_augment.DISTORT_PROB
_BRIGHTNESS_DELTA = device_augment.BRIGHTNESS_DELTA
_CONTRAST_RANGE = device_augment.CONTRAST_RANGE
_SATURATION_RANGE = device_augment.SATURATION_RANGE
_HUE_DELTA = device_augment.HUE_DELTA  # Caffe's 18 of OpenCV's 0..180 hue, on PIL's 0..255 scale
MIN_BOX_SIDE = device_augment.MIN_BOX_SIDE
CROP_MIN_IOUS = device_augment.CROP_MIN_IOUS
_CROP_SCALE = device_augment.CROP_SCALE
_CROP_ASPECT = device_augment.CROP_ASPECT


def photometric_distort(image: np.ndarray, rng: np.random.Generator, *,
                        channel_swap_prob: float) -> np.ndarray:
  """Caffe's random brightness, contrast (before or after) saturation and hue, channel swap.

  Args:
    image: uint8 [H, W, 3] RGB.
    rng: the random generator.
    channel_swap_prob: probability of a random permutation of the colour channels.

  Returns:
    uint8 [H, W, 3]; values are clipped to [0, 255] after each step, as Caffe's uint8 images are.
  """
  return apply_photometric(image, photometric_params(rng, channel_swap_prob=channel_swap_prob))


def photometric_params(rng: np.random.Generator, *, channel_swap_prob: float) -> dict:
  """:func:`photometric_distort`'s draws, in its order; a step that is not drawn is None.

  Returns:
    {"brightness": delta, "contrast_first": bool, "contrast": factor, "saturation": factor,
     "hue": shift on PIL's 0..255 hue, "channel_perm": [3] int}.
  """
  draw = lambda low, high: rng.uniform(low, high) if rng.random() < _DISTORT_PROB else None
  params = {"brightness": draw(-_BRIGHTNESS_DELTA, _BRIGHTNESS_DELTA),
            "contrast_first": rng.random() < 0.5}
  if params["contrast_first"]:
    params["contrast"] = draw(*_CONTRAST_RANGE)
  params["saturation"] = draw(*_SATURATION_RANGE)
  params["hue"] = draw(-_HUE_DELTA, _HUE_DELTA)
  if not params["contrast_first"]:
    params["contrast"] = draw(*_CONTRAST_RANGE)
  swap = channel_swap_prob > 0 and rng.random() < channel_swap_prob
  params["channel_perm"] = rng.permutation(3) if swap else None
  return params


def apply_photometric(image: np.ndarray, params: dict) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H, W, 3] with the draws of :func:`photometric_params`."""
  image = image.astype(np.float32)
  if params["brightness"] is not None:
    image = np.clip(image + params["brightness"], 0, 255)
  if params["contrast_first"]:
    image = _contrast(image, params["contrast"])
  image = _saturation_hue(image, params["saturation"], params["hue"])
  if not params["contrast_first"]:
    image = _contrast(image, params["contrast"])
  if params["channel_perm"] is not None:
    image = image[..., params["channel_perm"]]
  return np.rint(image).astype(np.uint8)


def _contrast(image, contrast):
  if contrast is not None:
    image = np.clip(image * np.float32(contrast), 0, 255)
  return image


def _saturation_hue(image, saturation, hue):
  """Saturation scale and hue shift in HSV (PIL: all channels 0..255, hue wraps around)."""
  if saturation is None and hue is None:
    return image
  rgb = PIL.Image.fromarray(np.rint(image).astype(np.uint8), "RGB")
  hsv = np.asarray(rgb.convert("HSV")).astype(np.float32)  # [H, W, 3]
  if saturation is not None:
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(saturation), 0, 255)
  if hue is not None:
    hsv[..., 0] = np.mod(np.rint(hsv[..., 0] + np.float32(hue)), 256.0)
  hsv = np.rint(hsv).astype(np.uint8)
  return np.asarray(PIL.Image.fromarray(hsv, "HSV").convert("RGB")).astype(np.float32)


def expand(record: records.Record, rng: np.random.Generator, *, max_ratio: float,
           fill_rgb: Sequence[float]) -> tuple[records.Record, tuple[int, int]]:
  """Zoom out: places the image at a random spot of a canvas up to ``max_ratio`` times larger.

  Args:
    record: the record; its image is uint8 [H, W, 3].
    rng: the random generator.
    max_ratio: the canvas side is ``ratio`` times the image side, ratio ~ U[1, max_ratio].
    fill_rgb: canvas colour in [0, 255] (the mean pixel, so that it normalizes to ~0).

  Returns:
    (record on the canvas, (left, top) pixel offset of the image in the canvas).
  """
  geometry = _expand_geometry(record["image"].shape[:2], rng, max_ratio)
  return _expand_with(record, geometry, fill_rgb), geometry[2:]


def _expand_with(record, geometry, fill_rgb) -> records.Record:
  """:func:`expand` with drawn (canvas height, canvas width, left, top)."""
  image = record["image"]
  new_h, new_w, left, top = geometry
  return dict(record, boxes=_expanded_boxes(record["boxes"], image.shape[:2], new_h, new_w, left, top),
              image=_canvas_window(image, left, top, (0, 0, new_w, new_h), fill_rgb))


def _expand_geometry(image_hw, rng, max_ratio) -> tuple[int, int, int, int]:
  """(canvas height, canvas width, left, top) of a random expansion."""
  height, width = image_hw
  ratio = rng.uniform(1.0, max_ratio)
  new_h, new_w = int(height * ratio), int(width * ratio)
  left = int(rng.uniform(0, new_w - width))
  top = int(rng.uniform(0, new_h - height))
  return new_h, new_w, left, top


def _expanded_boxes(boxes, image_hw, new_h, new_w, left, top) -> np.ndarray:
  """[N, 4] xyxy normalized to the image -> normalized to the canvas."""
  height, width = image_hw
  scale = np.array([width, height, width, height], np.float32)
  offset = np.array([left, top, left, top], np.float32)
  return (boxes * scale + offset) / np.array([new_w, new_h, new_w, new_h], np.float32)


def _canvas_window(image, left, top, window_px, fill_rgb) -> np.ndarray:
  """Pixels [y0:y1, x0:x1] of the canvas holding ``image`` at (left, top) on ``fill_rgb``."""
  x0, y0, x1, y1 = (int(v) for v in window_px)
  height, width = image.shape[:2]
  out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
  out[...] = np.clip(np.rint(np.asarray(fill_rgb, np.float64)), 0, 255).astype(np.uint8)
  ix0, ix1 = max(x0, left), min(x1, left + width)
  iy0, iy1 = max(y0, top), min(y1, top + height)
  if ix1 > ix0 and iy1 > iy0:
    out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0 - top:iy1 - top, ix0 - left:ix1 - left]
  return out


def sample_crop_window(boxes: np.ndarray, rng: np.random.Generator, *, trials: int) -> np.ndarray:
  """Caffe's random IoU crop: [4] xyxy normalized window.

  Each sampler of ``CROP_MIN_IOUS`` draws up to ``trials`` windows (scale [0.3, 1], aspect [0.5, 2]
  with Caffe's clamp to the image) and keeps its first window whose IoU with at least one gt box is
  >= its minimum (unconstrained: the first window). One window is chosen at random among the kept
  ones and the whole image, which is always a candidate.

  Args:
    boxes: [N, 4] xyxy normalized gt boxes (N may be 0: then only unconstrained crops qualify).
    rng: the random generator.
    trials: tries per sampler (Caffe: 50).
  """
  candidates = [np.array([0.0, 0.0, 1.0, 1.0])]
  for min_iou in CROP_MIN_IOUS:
    scale = rng.uniform(*_CROP_SCALE, trials)
    aspect = np.clip(rng.uniform(*_CROP_ASPECT, trials), scale**2, 1.0 / scale**2)
    # <= 1 up to rounding: the aspect clamp keeps both sides within the image.
    w = np.minimum(scale * np.sqrt(aspect), 1.0)
    h = np.minimum(scale / np.sqrt(aspect), 1.0)
    x0, y0 = rng.uniform(0, 1, trials) * (1 - w), rng.uniform(0, 1, trials) * (1 - h)
    windows = np.stack([x0, y0, x0 + w, y0 + h], axis=1)  # [T, 4]
    if min_iou is None:
      ok = np.ones(trials, bool)
    elif len(boxes):
      ok = (records.box_iou(windows, boxes) >= min_iou).any(axis=1)  # [T]
    else:
      ok = np.zeros(trials, bool)
    if ok.any():
      candidates.append(windows[np.argmax(ok)])
  return candidates[rng.integers(len(candidates))]


def crop(record: records.Record, window_px) -> records.Record:
  """Crops to a pixel window and keeps the boxes whose centre lies inside it (Caffe's CENTER rule).

  Args:
    record: the record; its image is uint8 [H, W, 3].
    window_px: [4] int xyxy pixel window, 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H.

  Returns:
    The cropped record: kept boxes are clipped to the window and re-normalized to it; boxes with a
    side under ``MIN_BOX_SIDE`` after clipping are dropped.
  """
  x0, y0, x1, y1 = (int(v) for v in window_px)
  out = _crop_boxes(record, window_px, record["image"].shape[:2])
  out["image"] = record["image"][y0:y1, x0:x1]
  return out


def _crop_boxes(record, window_px, image_hw) -> records.Record:
  """The box part of :func:`crop` (the image is left as it is)."""
  height, width = image_hw
  x0, y0, x1, y1 = (int(v) for v in window_px)
  size = np.array([width, height, width, height], np.float32)
  boxes_px = record["boxes"] * size  # [N, 4]
  centre = (boxes_px[:, :2] + boxes_px[:, 2:]) / 2  # [N, 2]
  inside = ((centre[:, 0] >= x0) & (centre[:, 0] <= x1) &
            (centre[:, 1] >= y0) & (centre[:, 1] <= y1))
  crop_size = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], np.float32)
  boxes = np.clip((boxes_px - np.array([x0, y0, x0, y0], np.float32)) / crop_size, 0.0, 1.0)
  big_enough = ((boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) &
                (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE))
  return records.select_boxes(dict(record, boxes=boxes), inside & big_enough)


def random_crop(record: records.Record, rng: np.random.Generator, *,
                trials: int) -> tuple[records.Record, np.ndarray]:
  """:func:`sample_crop_window` + :func:`crop`; returns (cropped record, [4] int pixel window)."""
  window_px = _crop_window_px(record["boxes"], rng, trials, record["image"].shape[:2])
  return crop(record, window_px), window_px


def _crop_window_px(boxes, rng, trials, image_hw) -> np.ndarray:
  """:func:`sample_crop_window` in whole pixels: [4] int xyxy, at least one pixel each way."""
  height, width = image_hw
  window = sample_crop_window(boxes, rng, trials=trials)
  size = np.array([width, height, width, height])
  window_px = np.rint(window * size).astype(np.int64)
  window_px[2] = max(window_px[2], window_px[0] + 1)
  window_px[3] = max(window_px[3], window_px[1] + 1)
  window_px = np.minimum(window_px, size)
  window_px[:2] = np.minimum(window_px[:2], window_px[2:] - 1)
  return window_px


def hflip(record: records.Record) -> records.Record:
  """Mirrors the image left-right; boxes: x0' = 1 - x1, x1' = 1 - x0."""
  boxes = record["boxes"]
  flipped = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
  return dict(record, image=record["image"][:, ::-1], boxes=flipped.astype(np.float32))


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], PIL bilinear (normalized boxes are unchanged)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(PIL.Image.fromarray(np.ascontiguousarray(image)).resize(
      (size, size), PIL.Image.BILINEAR))


def normalize(image: np.ndarray, mean_rgb: Sequence[float], std_rgb: Sequence[float]) -> np.ndarray:
  """uint8 [..., 3] -> float32 (image - mean_rgb) / std_rgb."""
  mean = np.asarray(mean_rgb, np.float32)
  inv_std = 1.0 / np.asarray(std_rgb, np.float32)
  return (image.astype(np.float32) - mean) * inv_std


def augment(record: records.Record, rng: np.random.Generator, aug, *,
            fill_rgb: Sequence[float]) -> records.Record:
  """The SSD training augmentation, each step switched by a field of ``config.augment``.

  Args:
    record: the record (uint8 image of any size).
    rng: the random generator.
    aug: ``config.augment`` (photometric, channel_swap_prob, expand, expand_prob, expand_max_ratio,
      random_crop, crop_trials, hflip).
    fill_rgb: expand canvas colour, ``config.data.mean_rgb``.

  Returns:
    The augmented record (uint8 image, not yet resized).
  """
  return apply_params(record, draw_params(record, rng, aug), fill_rgb=fill_rgb)


def draw_params(record: records.Record, rng: np.random.Generator, aug) -> dict:
  """:func:`augment`'s random draws, in its order (they need the boxes and image size only).

  Returns:
    {"photometric": :func:`photometric_params` or None, "expand": (canvas height, canvas width,
     left, top) in pixels or None, "crop_px": [4] int xyxy window in pixels of the (expanded)
     image or None, "hflip": bool}.
  """
  params = {"photometric": (photometric_params(rng, channel_swap_prob=aug.channel_swap_prob)
                            if aug.photometric else None)}
  image_hw = record["image"].shape[:2]
  expanded = aug.expand and rng.random() < aug.expand_prob
  params["expand"] = _expand_geometry(image_hw, rng, aug.expand_max_ratio) if expanded else None
  params["crop_px"] = None
  if aug.random_crop:
    boxes, crop_hw = record["boxes"], image_hw
    if expanded:
      new_h, new_w, left, top = params["expand"]
      boxes, crop_hw = _expanded_boxes(boxes, image_hw, new_h, new_w, left, top), (new_h, new_w)
    params["crop_px"] = _crop_window_px(boxes, rng, aug.crop_trials, crop_hw)
  params["hflip"] = bool(aug.hflip and rng.random() < 0.5)
  return params


def apply_params(record: records.Record, params: dict, *,
                 fill_rgb: Sequence[float]) -> records.Record:
  """Applies the draws of :func:`draw_params`: photometric -> expand -> crop -> flip."""
  if params["photometric"] is not None:
    record = dict(record, image=apply_photometric(record["image"], params["photometric"]))
  expansion, window_px = params["expand"], params["crop_px"]
  if expansion is not None and window_px is not None:
    # expand() then crop() without building the whole canvas (up to expand_max_ratio**2 times the
    # image): only the crop window of the canvas is painted.
    image = record["image"]
    new_h, new_w, left, top = expansion
    boxes = _expanded_boxes(record["boxes"], image.shape[:2], new_h, new_w, left, top)
    record = _crop_boxes(dict(record, boxes=boxes), window_px, (new_h, new_w))
    record["image"] = _canvas_window(image, left, top, window_px, fill_rgb)
  elif expansion is not None:
    record = _expand_with(record, expansion, fill_rgb)
  elif window_px is not None:
    record = crop(record, window_px)
  if params["hflip"]:
    record = hflip(record)
  return record
