"""SSD's training augmentation as pure JAX functions, sampled and applied on the accelerator.

The same augmentation as the host path (:mod:`ssdjax.data.augment`, Caffe's order): photometric
distortion -> expand (zoom out on a mean-coloured canvas) -> IoU-constrained random crop ->
horizontal flip, then resize to ``S x S`` and normalize. A host only decodes; everything here has
static shapes, no Python control flow on traced values, and works under ``jit`` and ``vmap``.

Input format (one image; a batch has a leading B axis):
  image: uint8 [Hc, Wc, 3] canvas: the decoded image, resized to fit with its aspect ratio kept, at
    the top-left; the rest is ignored (zeros, say).
  valid_hw: int32 [2], (height, width) in canvas pixels of the real image inside the canvas.
  gt_boxes: float32 [G, 4] xyxy, normalized to the real image; gt_labels: int32 [G] (0 = padding);
  gt_mask: bool [G].

Two steps, so that research code can draw, inspect or replace the random values:
:func:`sample_params` draws one image's :class:`AugmentParams` from a key, :func:`apply_params`
applies them. :func:`augment_batch` is both, vmapped; :func:`resize_normalize_batch` is the eval
input (no augmentation).

Randomness: image ``i`` of :func:`augment_batch` uses ``jax.random.fold_in(key, i)`` and nothing
else, so with ``key = fold_in(fold_in(jax.random.key(seed), step), ...)`` the triple
(seed, step, image index) determines an image's augmentation: a resumed run sees the same batches,
and an image's augmentation does not depend on the batch size or on the other images.

Semantics, as the host's:
  - Photometric (Caffe's distort_param): brightness delta U[-32, 32], contrast U[0.5, 1.5] before or
    after (a coin) saturation U[0.5, 1.5] and hue U[-HUE_DELTA, HUE_DELTA] in PIL's HSV (all
    channels 0..255, hue wraps mod 256), each with p=0.5, then an optional channel permutation;
    values are rounded to whole levels and clipped to [0, 255] after each step, as the host's uint8
    images are. The HSV conversions follow PIL's C code (``rgb2hsv``/``hsv2rgb``) in float32.
  - Geometry is drawn as the host draws it for an image of ``valid_hw`` pixels, rounded to whole
    pixels the same way (expand canvas ``int(side * ratio)``, offsets ``int(U[0, new - side])``,
    crop window ``rint`` with at least one pixel each way). The host draws on the decoded image,
    which the canvas fit may have shrunk: its grid is then finer, the distributions are the same.
  - Crop: each of the 6 samplers of ``CROP_MIN_IOUS`` draws ``crop_trials`` windows at once and keeps
    its first window whose IoU with some valid gt box reaches its minimum (unconstrained: the first);
    one window is picked uniformly among the whole image and the samplers that found one.
  - Boxes (Caffe's CENTER rule, only when the crop step is on, as on the host): a box is kept when
    its centre lies in the crop window and it is at least ``MIN_BOX_SIDE`` wide and high after
    clipping to the window. Kept boxes are normalized to the output and clipped to [0, 1]; dropped
    and padding slots come out as zeros with label 0 and mask False (shape [G] is kept).
  - Image: ONE resample of the canvas. Output pixel (i, j) maps through flip -> crop window ->
    expand canvas -> real image as one axis-aligned affine map (:class:`AugmentParams.window`). The
    filter is PIL's BILINEAR resize filter (a triangle whose support widens with the downscale
    factor, so shrinking is antialiased as on the host), restricted to the crop window and
    renormalized as PIL does at image borders; filter taps that fall outside the real image read
    the mean pixel rounded to uint8 (the host's expand canvas). It is separable, so it runs as two
    small matrix products. Then ``(x - mean_rgb) / std_rgb``.

Measured against the host (tests/test_augment.py: 40 images of 40..160 pixels a side on smooth
test images, the host's drawn parameters fed to :func:`apply_params`, 64 x 64 output):
  - boxes and masks: the same boxes kept, coordinates within 2e-7;
  - images (geometry only): 0.21 mean, 0.99 max absolute difference in levels (0..255); crop only
    0.30 / 1.0, expand only 0.07 / 0.97. That is PIL's rounding to uint8 (after its horizontal
    pass and of its output) and its 22-bit fixed-point weights: the filter itself is the same (a
    plain 2-tap bilinear sampler, without antialiasing, differs by 0.58 mean and 68 max);
  - photometric distortion alone, random colours: 0.09% of pixels differ, 0.0007 mean and 6 max
    levels. :func:`hsv_to_rgb` equals PIL on all 2^24 inputs; :func:`rgb_to_hsv` equals PIL on
    99.84% of the 2^24 colours, the rest have a hue one unit off (PIL rounds through float and
    double its own way: the value 255 * h lands just under or over a whole number). With every
    step on: 0.19 mean, 3 max levels.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssdjax import boxes as boxes_lib

# Caffe SSD's distort_param (brightness / contrast / saturation / hue, each applied with p=0.5).
DISTORT_PROB = 0.5
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0 * 256.0 / 180.0  # Caffe shifts OpenCV's 0..180 hue by up to 18; PIL's is 0..255

# A crop that leaves a box thinner than this (normalized) leaves no object worth training on.
MIN_BOX_SIDE = 1e-3

# Caffe SSD's batch_sampler: the whole image, then crops with at least this IoU with some gt box,
# then an unconstrained crop (None). Crops have scale [0.3, 1] and aspect ratio [0.5, 2].
CROP_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9, None)
CROP_SCALE = (0.3, 1.0)
CROP_ASPECT = (0.5, 2.0)

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """The switches of ``config.augment`` (``AugmentOptions(**config.augment)``); static under jit.

  Attributes:
    photometric: brightness, contrast, saturation and hue distortion.
    channel_swap_prob: probability of a random channel permutation (with ``photometric``).
    expand: zoom out on a mean-coloured canvas, with probability ``expand_prob``.
    expand_prob: probability of expand.
    expand_max_ratio: canvas side / image side ~ U[1, expand_max_ratio].
    random_crop: Caffe's IoU-constrained random crop (and its box rule).
    crop_trials: windows per crop sampler.
    hflip: horizontal flip with probability 0.5.
  """
  photometric: bool
  channel_swap_prob: float
  expand: bool
  expand_prob: float
  expand_max_ratio: float
  random_crop: bool
  crop_trials: int
  hflip: bool

  def __post_init__(self):
    for name in ("channel_swap_prob", "expand_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"AugmentOptions.{name}={getattr(self, name)!r} must be in [0, 1]")
    if not self.expand_max_ratio >= 1.0:
      raise ValueError(f"AugmentOptions.expand_max_ratio={self.expand_max_ratio!r} must be >= 1")
    if isinstance(self.crop_trials, bool) or int(self.crop_trials) != self.crop_trials or \
        self.crop_trials < 1:
      raise ValueError(f"AugmentOptions.crop_trials={self.crop_trials!r} must be an integer >= 1")


# The switches of config.augment that the augmentation itself takes (augment_batch's keywords).
SWITCHES = tuple(f.name for f in dataclasses.fields(AugmentOptions))


class AugmentParams(NamedTuple):
  """One image's augmentation draws (a pytree of arrays; a batch has a leading B axis).

  Attributes:
    brightness_on: bool []; brightness: float32 [], delta in levels (0..255 scale).
    contrast_on: bool []; contrast: float32 [], factor.
    contrast_first: bool [], contrast before (True) or after saturation and hue.
    saturation_on: bool []; saturation: float32 [], factor on PIL's S channel.
    hue_on: bool []; hue: float32 [], shift of PIL's H channel (0..255, wraps mod 256).
    channel_perm: int32 [3], output channel k = input channel channel_perm[k].
    window: float32 [4] xyxy, the output's field of view (before the flip) normalized to the real
      image; it extends beyond [0, 1] where the expand canvas shows.
    crop: bool [], apply the crop box rule (centre inside, MIN_BOX_SIDE); the random_crop switch.
    flip: bool [], mirror the output left-right.
  """
  brightness_on: jax.Array
  brightness: jax.Array
  contrast_on: jax.Array
  contrast: jax.Array
  contrast_first: jax.Array
  saturation_on: jax.Array
  saturation: jax.Array
  hue_on: jax.Array
  hue: jax.Array
  channel_perm: jax.Array
  window: jax.Array
  crop: jax.Array
  flip: jax.Array


def identity_params() -> AugmentParams:
  """Parameters that only resize and normalize: no distortion, the whole image, no flip."""
  off, zero = jnp.array(False), jnp.array(0.0, jnp.float32)
  one = jnp.array(1.0, jnp.float32)
  return AugmentParams(
      brightness_on=off, brightness=zero, contrast_on=off, contrast=one, contrast_first=off,
      saturation_on=off, saturation=one, hue_on=off, hue=zero,
      channel_perm=jnp.arange(3, dtype=jnp.int32),
      window=jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32), crop=off, flip=off)


# ----------------------------------------------------------------------------------------------
# Sampling.


def sample_crop_window(key, gt_boxes, gt_mask, *, trials: int):
  """Caffe's random IoU crop: [4] xyxy window, normalized (as the host's ``sample_crop_window``).

  Args:
    key: a ``jax.random`` key.
    gt_boxes: [G, 4] xyxy normalized gt boxes (G may be 0).
    gt_mask: [G] bool; only valid boxes count for the IoU constraints (none valid: only the
      whole image and the unconstrained sampler qualify).
    trials: windows per sampler (Caffe: 50), all drawn at once.
  """
  k_windows, k_pick = jax.random.split(key)
  windows = _crop_candidates(k_windows, trials)  # [K, T, 4]
  num_samplers = len(CROP_MIN_IOUS)
  iou = boxes_lib.iou(windows.reshape(-1, 4), gt_boxes).reshape(num_samplers, trials, -1)
  min_iou = jnp.array([0.0 if v is None else v for v in CROP_MIN_IOUS], jnp.float32)  # [K]
  constrained = jnp.array([v is not None for v in CROP_MIN_IOUS])  # [K]
  ok = ((iou >= min_iou[:, None, None]) & gt_mask[None, None, :]).any(axis=-1)  # [K, T]
  ok = ok | ~constrained[:, None]
  first = jnp.argmax(ok, axis=1)  # [K]
  found = ok.any(axis=1)  # [K]
  candidates = jnp.concatenate([jnp.array([[0.0, 0.0, 1.0, 1.0]], jnp.float32),
                                windows[jnp.arange(num_samplers), first]])  # [K + 1, 4]
  qualifies = jnp.concatenate([jnp.array([True]), found])  # [K + 1]
  pick = jax.random.categorical(k_pick, jnp.where(qualifies, 0.0, -jnp.inf))
  return candidates[pick]


def _crop_candidates(key, trials: int):
  """[K, T, 4] xyxy windows, K = len(CROP_MIN_IOUS): scale and aspect with Caffe's clamp."""
  k_scale, k_aspect, k_x, k_y = jax.random.split(key, 4)
  shape = (len(CROP_MIN_IOUS), trials)
  scale = jax.random.uniform(k_scale, shape, minval=CROP_SCALE[0], maxval=CROP_SCALE[1])
  aspect = jnp.clip(jax.random.uniform(k_aspect, shape, minval=CROP_ASPECT[0],
                                       maxval=CROP_ASPECT[1]), scale**2, 1.0 / scale**2)
  w = jnp.minimum(scale * jnp.sqrt(aspect), 1.0)
  h = jnp.minimum(scale / jnp.sqrt(aspect), 1.0)
  x0 = jax.random.uniform(k_x, shape) * (1 - w)
  y0 = jax.random.uniform(k_y, shape) * (1 - h)
  return jnp.stack([x0, y0, x0 + w, y0 + h], axis=-1)


def _sample_photometric(key, options: AugmentOptions) -> dict:
  keys = jax.random.split(key, 6)
  coins = jax.random.uniform(keys[0], (6,))
  on = options.photometric
  swap = on and options.channel_swap_prob > 0
  perm = jax.random.permutation(keys[5], 3).astype(jnp.int32)
  return dict(
      brightness_on=on & (coins[0] < DISTORT_PROB),
      brightness=jax.random.uniform(keys[1], minval=-BRIGHTNESS_DELTA, maxval=BRIGHTNESS_DELTA),
      contrast_first=on & (coins[1] < 0.5),
      contrast_on=on & (coins[2] < DISTORT_PROB),
      contrast=jax.random.uniform(keys[2], minval=CONTRAST_RANGE[0], maxval=CONTRAST_RANGE[1]),
      saturation_on=on & (coins[3] < DISTORT_PROB),
      saturation=jax.random.uniform(keys[3], minval=SATURATION_RANGE[0],
                                    maxval=SATURATION_RANGE[1]),
      hue_on=on & (coins[4] < DISTORT_PROB),
      hue=jax.random.uniform(keys[4], minval=-HUE_DELTA, maxval=HUE_DELTA),
      channel_perm=jnp.where(swap & (coins[5] < options.channel_swap_prob), perm,
                             jnp.arange(3, dtype=jnp.int32)))


def sample_params(key, valid_hw, gt_boxes, gt_mask, options: AugmentOptions) -> AugmentParams:
  """Draws one image's augmentation, as the host's ``augment`` draws it.

  Args:
    key: a ``jax.random`` key; its splits, in order: photometric, expand, crop, flip.
    valid_hw: int32 [2], (height, width) of the real image in canvas pixels (the rounding grid).
    gt_boxes: [G, 4] xyxy, normalized to the real image (the IoU constraints of the crop).
    gt_mask: [G] bool.
    options: the switches.

  Returns:
    :class:`AugmentParams`; switched-off steps get their identity values.
  """
  k_photo, k_expand, k_crop, k_flip = jax.random.split(key, 4)
  height, width = (jnp.asarray(valid_hw).astype(jnp.float32)[i] for i in (0, 1))

  u = jax.random.uniform(k_expand, (4,))
  ratio = 1.0 + u[1] * (options.expand_max_ratio - 1.0)
  expanded = options.expand & (u[0] < options.expand_prob)
  new_h = jnp.where(expanded, jnp.floor(height * ratio), height)
  new_w = jnp.where(expanded, jnp.floor(width * ratio), width)
  left = jnp.where(expanded, jnp.floor(u[2] * (new_w - width)), 0.0)
  top = jnp.where(expanded, jnp.floor(u[3] * (new_h - height)), 0.0)

  canvas_px = jnp.stack([new_w, new_h, new_w, new_h])  # [4]
  image_px = jnp.stack([width, height, width, height])
  offset_px = jnp.stack([left, top, left, top])
  if options.random_crop:
    canvas_boxes = (gt_boxes * image_px + offset_px) / canvas_px  # [G, 4]
    window = sample_crop_window(k_crop, canvas_boxes, gt_mask, trials=int(options.crop_trials))
    window_px = _whole_pixels(window, canvas_px)
  else:
    window_px = jnp.stack([0.0, 0.0, new_w, new_h])
  flip = options.hflip & (jax.random.uniform(k_flip) < 0.5)
  return AugmentParams(**_sample_photometric(k_photo, options),
                       window=(window_px - offset_px) / image_px,
                       crop=jnp.array(options.random_crop), flip=flip)


def _whole_pixels(window, size_px):
  """[4] normalized window -> [4] whole pixels, at least one each way (the host's rounding)."""
  x0, y0, x1, y1 = jnp.round(window * size_px)
  x1, y1 = jnp.maximum(x1, x0 + 1), jnp.maximum(y1, y0 + 1)
  x0, y0, x1, y1 = jnp.minimum(jnp.stack([x0, y0, x1, y1]), size_px)
  return jnp.stack([jnp.minimum(x0, x1 - 1), jnp.minimum(y0, y1 - 1), x1, y1])


# ----------------------------------------------------------------------------------------------
# Photometric distortion.


def rgb_to_hsv(rgb):
  """PIL's RGB -> HSV on [..., 3] whole levels 0..255 (float); returns [..., 3] whole 0..255."""
  return jnp.stack(_rgb_to_hsv(*(rgb[..., c] for c in range(3))), axis=-1)


def hsv_to_rgb(hsv):
  """PIL's HSV -> RGB on [..., 3] whole levels 0..255 (float); returns [..., 3] whole 0..255."""
  return jnp.stack(_hsv_to_rgb(*(hsv[..., c] for c in range(3))), axis=-1)


# The colour code works on channel planes: XLA fuses it into one loop, which the strided channel
# slices of [..., 3] arrays prevent. Divisions by constants are written as the products with the
# reciprocal that XLA turns them into under jit, so that jit and eager calls round alike.
def _rgb_to_hsv(r, g, b):
  """PIL's ``rgb2hsv`` (Convert.c) in float32 on planes of whole levels; returns (h, s, v)."""
  maxc = jnp.maximum(r, jnp.maximum(g, b))
  minc = jnp.minimum(r, jnp.minimum(g, b))
  grey = maxc == minc
  cr = jnp.where(grey, 1.0, maxc - minc)
  s = cr / jnp.where(maxc > 0, maxc, 1.0)
  # PIL: h = bc - gc (r max), 2 + rc - bc (g max), 4 + gc - rc (b max), xc = (maxc - x) / cr;
  # bracketed as PIL's double-precision sums, which round once.
  r_max, g_max = r == maxc, (g == maxc) & (r != maxc)
  base = jnp.where(r_max, 0.0, jnp.where(g_max, 2.0, 4.0))
  plus = jnp.where(r_max, b, jnp.where(g_max, r, g))
  minus = jnp.where(r_max, g, jnp.where(g_max, b, r))
  h = base + ((maxc - plus) / cr - (maxc - minus) / cr)
  h = h * (1.0 / 6.0)
  h = jnp.where(h < 0, h + 1.0, h)  # PIL's fmod(h / 6 + 1, 1)
  uh = jnp.where(grey, 0.0, jnp.clip(jnp.floor(h * 255.0), 0, 255))
  us = jnp.where(grey, 0.0, jnp.clip(jnp.floor(s * 255.0), 0, 255))
  return uh, us, maxc


def _hsv_to_rgb(h, s, v):
  """PIL's ``hsv2rgb`` (Convert.c) in float32 on planes of whole levels; returns (r, g, b)."""
  sector = jnp.floor((h * 6.0) * (1.0 / 255.0))
  f = (h * 6.0 - 255.0 * sector) * (1.0 / 255.0)
  fs = s * (1.0 / 255.0)
  round_half_up = lambda x: jnp.clip(jnp.floor(x + 0.5), 0, 255)  # C's round() on x >= 0
  p = round_half_up(v * (1.0 - fs))
  q = round_half_up(v * (1.0 - fs * f))
  t = round_half_up(v * (1.0 - fs * (1.0 - f)))
  sector = jnp.mod(sector, 6)  # h = 255 is sector 6, i.e. 0

  def pick(*by_sector):
    out = by_sector[0]
    for k in range(1, 6):
      out = jnp.where(sector == k, by_sector[k], out)
    return jnp.where(s == 0, v, out)
  return pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)


def photometric_distort(params: AugmentParams, image):
  """Caffe's photometric distortion with drawn parameters (the host's ``photometric_distort``).

  Args:
    params: the image's :class:`AugmentParams` (its photometric fields).
    image: [H, W, 3] RGB levels 0..255 (uint8 or float).

  Returns:
    float32 [H, W, 3], whole levels in [0, 255]; rounded and clipped after each step as the host's
    uint8 images are. All-off parameters return the (whole-level) input unchanged.
  """
  image = jnp.asarray(image).astype(jnp.float32)
  x = [image[..., c] for c in range(3)]  # planes [H, W]

  def contrast(planes):
    return [jnp.where(params.contrast_on, jnp.clip(y * params.contrast, 0, 255), y)
            for y in planes]

  x = [jnp.where(params.brightness_on, jnp.clip(y + params.brightness, 0, 255), y) for y in x]
  x = [jnp.where(params.contrast_first, a, b) for a, b in zip(contrast(x), x)]
  h, s, v = _rgb_to_hsv(*(jnp.round(y) for y in x))
  s = jnp.where(params.saturation_on, jnp.clip(s * params.saturation, 0, 255), s)
  h = jnp.where(params.hue_on, jnp.mod(jnp.round(h + params.hue), 256.0), h)
  shifted = _hsv_to_rgb(jnp.round(h), jnp.round(s), v)
  x = [jnp.where(params.saturation_on | params.hue_on, a, b) for a, b in zip(shifted, x)]
  x = [jnp.where(params.contrast_first, b, a) for a, b in zip(contrast(x), x)]
  # Selects rather than a gather: channel k reads channel channel_perm[k].
  perm = params.channel_perm
  x = [jnp.where(perm[k] == 2, x[2], jnp.where(perm[k] == 1, x[1], x[0])) for k in range(3)]
  return jnp.round(jnp.stack(x, axis=-1))


# ----------------------------------------------------------------------------------------------
# Geometry.


def transform_boxes(params: AugmentParams, gt_boxes, gt_labels, gt_mask):
  """The boxes' side of :func:`apply_params` (Caffe's CENTER rule when ``params.crop``).

  Args:
    params: the image's :class:`AugmentParams` (window, crop, flip).
    gt_boxes: [G, 4] xyxy, normalized to the real image.
    gt_labels: [G] int32 (0 = padding).
    gt_mask: [G] bool.

  Returns:
    (boxes [G, 4] xyxy normalized to the output, clipped to [0, 1]; labels [G]; mask [G]), with
    dropped and padding slots zero, label 0, mask False.
  """
  x0, y0, x1, y1 = params.window
  offset = jnp.stack([x0, y0, x0, y0])
  size = jnp.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
  b = (gt_boxes - offset) / size  # [G, 4]
  centre = (b[:, :2] + b[:, 2:]) / 2  # [G, 2]
  inside = ((centre >= 0) & (centre <= 1)).all(axis=1)  # [G]
  b = jnp.clip(b, 0.0, 1.0)
  big_enough = (b[:, 2] - b[:, 0] >= MIN_BOX_SIDE) & (b[:, 3] - b[:, 1] >= MIN_BOX_SIDE)
  keep = gt_mask & (~params.crop | (inside & big_enough))  # [G]
  flipped = jnp.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], axis=1)
  b = jnp.where(params.flip, flipped, b)
  return (jnp.where(keep[:, None], b, 0.0), jnp.where(keep, gt_labels, 0).astype(gt_labels.dtype),
          keep)


def _triangle_sum(m, support, first, last):
  """sum over whole x in [first, last] of max(0, 1 - |x - m| / support); all [S] float."""
  def arm(lo, hi, sign):
    n = jnp.maximum(hi - lo + 1, 0.0)
    return n + sign * n * ((lo - m) + (hi - m)) / 2 / support
  left = arm(jnp.maximum(first, jnp.floor(m - support) + 1), jnp.minimum(last, jnp.floor(m)), 1.0)
  right = arm(jnp.maximum(first, jnp.floor(m) + 1), jnp.minimum(last, jnp.ceil(m + support) - 1),
              -1.0)
  return left + right


def _axis_weights(out_size: int, in_size: int, valid_len, lo, hi, flip):
  """PIL's bilinear resize filter along one axis, as a dense matrix over the canvas.

  The crop covers [lo, hi) in pixels of the real image (which occupies [0, valid_len)); its pixels
  are the whole x with centre x + 0.5 in (lo, hi), past the image edges too (those read the fill).

  Returns:
    ([out_size, in_size] weights of the canvas pixels, [out_size] weight of the fill); per output
    pixel they sum to 1.
  """
  scale = (hi - lo) / out_size
  support = jnp.maximum(scale, 1.0)
  j = jnp.arange(out_size, dtype=jnp.float32)
  j = jnp.where(flip, out_size - 1 - j, j)
  centre = lo + (j + 0.5) * scale  # [S], in image pixels
  first, last = jnp.floor(lo + 0.5), jnp.ceil(hi - 0.5) - 1  # the crop's pixels
  x = jnp.arange(in_size, dtype=jnp.float32)
  in_crop = (x >= first) & (x <= last) & (x < valid_len)  # [in]
  w = jnp.maximum(0.0, 1.0 - jnp.abs(x[None, :] + 0.5 - centre[:, None]) / support)  # [S, in]
  w = jnp.where(in_crop[None, :], w, 0.0)
  norm = _triangle_sum(centre - 0.5, support, first, last)  # [S]
  w = w / jnp.maximum(norm, 1e-6)[:, None]
  return w, 1.0 - w.sum(axis=1)


def resample(image, valid_hw, window, flip, *, image_size: int, fill_rgb):
  """One resample of the canvas's real image to [S, S, 3] through a window and an optional flip.

  Args:
    image: [Hc, Wc, 3] float levels; only the real image [:h, :w] is read.
    valid_hw: int32 [2], (h, w).
    window: [4] xyxy normalized to the real image (may extend beyond it: the fill shows there).
    flip: bool [], mirror the output left-right.
    image_size: S.
    fill_rgb: [3] levels read outside the real image.

  Returns:
    float32 [S, S, 3] levels: PIL's BILINEAR resize of the window (unrounded).
  """
  height, width = (jnp.asarray(valid_hw).astype(jnp.float32)[i] for i in (0, 1))
  x0, y0, x1, y1 = window
  wy, fill_y = _axis_weights(image_size, image.shape[0], height, y0 * height, y1 * height, False)
  wx, fill_x = _axis_weights(image_size, image.shape[1], width, x0 * width, x1 * width, flip)
  rows = jnp.einsum("ir,rcz->icz", wy, image, precision=_HIGHEST)  # [S, Wc, 3]
  out = jnp.einsum("icz,jc->ijz", rows, wx, precision=_HIGHEST)  # [S, S, 3]
  fill = 1.0 - (1.0 - fill_y)[:, None] * (1.0 - fill_x)[None, :]  # [S, S]
  return out + fill[..., None] * jnp.asarray(fill_rgb, jnp.float32)


def _fill_levels(mean_rgb) -> np.ndarray:
  """The expand canvas colour: the mean pixel rounded to uint8, as the host paints it."""
  return np.clip(np.rint(np.asarray(mean_rgb, np.float64)), 0, 255).astype(np.float32)


def _normalize(x, mean_rgb, std_rgb):
  return (x - jnp.asarray(mean_rgb, jnp.float32)) * (1.0 / np.asarray(std_rgb, np.float32))


def apply_params(params: AugmentParams, image, valid_hw, gt_boxes, gt_labels, gt_mask, *,
                 image_size: int, mean_rgb: Sequence[float], std_rgb: Sequence[float]) -> dict:
  """Applies one image's :class:`AugmentParams`: distortion, one resample, normalization, boxes.

  Args:
    params: the image's draws (:func:`sample_params`, or set by hand).
    image: uint8 [Hc, Wc, 3] canvas; valid_hw: int32 [2] (h, w) of the real image in it.
    gt_boxes: [G, 4] xyxy normalized to the real image; gt_labels: [G] int32; gt_mask: [G] bool.
    image_size: S, the output side.
    mean_rgb, std_rgb: [3] normalization, levels 0..255; mean_rgb (rounded) is also the fill.

  Returns:
    {"image": float32 [S, S, 3] normalized, "gt_boxes": [G, 4] xyxy normalized to the output,
     "gt_labels": [G], "gt_mask": [G] bool}.
  """
  distorted = photometric_distort(params, image)
  out = resample(distorted, valid_hw, params.window, params.flip, image_size=image_size,
                 fill_rgb=_fill_levels(mean_rgb))
  boxes, labels, mask = transform_boxes(params, jnp.asarray(gt_boxes, jnp.float32),
                                        jnp.asarray(gt_labels), jnp.asarray(gt_mask, bool))
  return {"image": _normalize(out, mean_rgb, std_rgb), "gt_boxes": boxes, "gt_labels": labels,
          "gt_mask": mask}


def augment_image(key, image, valid_hw, gt_boxes, gt_labels, gt_mask, *, image_size: int,
                  mean_rgb: Sequence[float], std_rgb: Sequence[float],
                  options: AugmentOptions) -> dict:
  """:func:`sample_params` + :func:`apply_params` for one image (same arguments and result)."""
  params = sample_params(key, valid_hw, gt_boxes, gt_mask, options)
  return apply_params(params, image, valid_hw, gt_boxes, gt_labels, gt_mask,
                      image_size=image_size, mean_rgb=mean_rgb, std_rgb=std_rgb)


def augment_batch(key, images_uint8, valid_hw, gt_boxes, gt_labels, gt_mask, *, image_size: int,
                  mean_rgb: Sequence[float], std_rgb: Sequence[float], photometric: bool,
                  channel_swap_prob: float, expand: bool, expand_prob: float,
                  expand_max_ratio: float, random_crop: bool, crop_trials: int,
                  hflip: bool) -> dict:
  """The SSD training augmentation of a batch, on device (``**config.augment`` gives the switches).

  Args:
    key: a ``jax.random`` key for this batch, e.g. ``fold_in(key(seed), step)``; image i uses
      ``fold_in(key, i)`` only.
    images_uint8: uint8 [B, Hc, Wc, 3] canvases; valid_hw: int32 [B, 2] (h, w) of the real images.
    gt_boxes: [B, G, 4] xyxy normalized to the real image; gt_labels: [B, G] int32 (0 = padding);
    gt_mask: [B, G] bool.
    image_size: S; mean_rgb, std_rgb: [3] normalization (levels); the fill is the rounded mean.
    photometric, channel_swap_prob, expand, expand_prob, expand_max_ratio, random_crop,
      crop_trials, hflip: the switches of ``config.augment`` (:class:`AugmentOptions`).

  Returns:
    {"images": float32 [B, S, S, 3] normalized, "gt_boxes": [B, G, 4] xyxy normalized to the
     output, "gt_labels": [B, G], "gt_mask": [B, G] bool}. Static arguments: jit it with
    ``functools.partial`` or ``static_argnames``.
  """
  options = AugmentOptions(photometric=photometric, channel_swap_prob=channel_swap_prob,
                           expand=expand, expand_prob=expand_prob,
                           expand_max_ratio=expand_max_ratio, random_crop=random_crop,
                           crop_trials=crop_trials, hflip=hflip)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images_uint8.shape[0]))
  per_image = lambda k, *args: augment_image(k, *args, image_size=image_size, mean_rgb=mean_rgb,
                                             std_rgb=std_rgb, options=options)
  out = jax.vmap(per_image)(keys, images_uint8, valid_hw, gt_boxes, gt_labels, gt_mask)
  out["images"] = out.pop("image")
  return out


def resize_normalize_batch(images_uint8, valid_hw, *, image_size: int, mean_rgb: Sequence[float],
                           std_rgb: Sequence[float]):
  """Eval input: each real image resized to [S, S] (PIL's bilinear filter) and normalized.

  Args:
    images_uint8: uint8 [B, Hc, Wc, 3] canvases; valid_hw: int32 [B, 2] (h, w) of the real images.
    image_size: S; mean_rgb, std_rgb: [3] normalization, levels 0..255.

  Returns:
    float32 [B, S, S, 3]; gt boxes normalized to the real image need no change.
  """
  whole = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)

  def one(image, hw):
    out = resample(jnp.asarray(image).astype(jnp.float32), hw, whole, False,
                   image_size=image_size, fill_rgb=_fill_levels(mean_rgb))
    return _normalize(out, mean_rgb, std_rgb)
  return jax.vmap(one)(images_uint8, valid_hw)
