"""Default (anchor) boxes with the semantics and order of the original Caffe SSD ``PriorBox`` layer.

For feature map ``i`` of size ``f x f`` with step ``s``, every location ``(y, x)`` (row-major) gets
``K_i`` boxes centred at ``((x + offset) * s, (y + offset) * s) / image_size``, in this order:

1. ``min_size`` square,
2. ``sqrt(min_size * max_size)`` square (if ``max_sizes`` is given),
3. for each aspect ratio ``ar``: ``w = min * sqrt(ar), h = min / sqrt(ar)``, then its flip ``1/ar``.

So ``K_i = 2 + 2 * len(aspect_ratios[i])`` (one less without ``max_sizes``). Prediction heads lay
out their outputs in the same (level, y, x, k) order, see ``ssdjax.models.heads``.

Clipping (``clip``, ``config.anchors.clip``) has three modes:

* ``False`` (or ``"none"``): no clipping, the released Caffe models' setting.
* ``True`` (or ``"corners"``): Caffe's ``PriorBox`` ``clip: true``: the ``xyxy`` corners are clipped
  to [0, 1], which also moves the centre of a box that crosses the border.
* ``"wh"``: torchvision's ``DefaultBoxGenerator(clip=True)`` (its default, used by
  ``ssd300_vgg16``): width and height are clamped to [0, 1] while the box is ``cxcywh``; centres
  never move and a box may still cross the border. For SSD300 COCO this only changes the two
  aspect-ratio-2 boxes of the 1x1 map (0.87 * sqrt(2) = 1.23 -> 1).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def num_anchors_per_location(aspect_ratios: Sequence[Sequence[float]],
                             max_sizes: Optional[Sequence[float]] = None) -> list[int]:
  """K_i for every level: 1 (min) + 1 (sqrt(min*max), if max_sizes) + 2 per aspect ratio."""
  extra = 1 if max_sizes else 0
  return [1 + extra + 2 * len(ars) for ars in aspect_ratios]


# Accepted values of ``clip`` -> the mode they select.
_CLIP_MODES = {False: "none", "none": "none", True: "corners", "corners": "corners", "wh": "wh"}


def _clip_mode(clip) -> str:
  # bool is checked by type: 0 and 1 (or numpy scalars) would otherwise hash like False / True.
  if isinstance(clip, bool) or (isinstance(clip, str) and clip in _CLIP_MODES):
    return _CLIP_MODES[clip]
  raise ValueError(f"anchors.clip is {clip!r}; valid values: False or 'none' (no clipping), True "
                   "or 'corners' (Caffe: clip the xyxy corners), 'wh' (torchvision: clamp w and h "
                   "to [0, 1])")


def _check(image_size, feature_sizes, steps, min_sizes, max_sizes, aspect_ratios):
  n = len(feature_sizes)
  fields = {"steps": steps, "min_sizes": min_sizes, "aspect_ratios": aspect_ratios}
  if max_sizes:
    fields["max_sizes"] = max_sizes
  for field, value in fields.items():
    if len(value) != n:
      raise ValueError(f"anchors.{field} has {len(value)} entries but anchors.feature_sizes has {n}; "
                       "give one entry per feature map")
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  for i, (f, s, mn) in enumerate(zip(feature_sizes, steps, min_sizes)):
    if f <= 0 or s <= 0 or mn <= 0:
      raise ValueError(f"anchors level {i}: feature_size={f}, step={s}, min_size={mn} must be positive")
    if max_sizes and max_sizes[i] < mn:
      raise ValueError(f"anchors level {i}: max_size {max_sizes[i]} < min_size {mn}")
    seen = []
    for ar in aspect_ratios[i]:
      if ar <= 0 or ar == 1:
        raise ValueError(f"anchors.aspect_ratios[{i}] contains {ar}; ratios must be > 0 and != 1 "
                         "(the square boxes are always present)")
      # Caffe drops a ratio already in the list (flips included); repeating it would add boxes.
      if any(abs(ar - r) < 1e-6 or abs(1.0 / ar - r) < 1e-6 for r in seen):
        raise ValueError(f"anchors.aspect_ratios[{i}] = {tuple(aspect_ratios[i])} repeats {ar} or "
                         "its flip 1/ar; list each ratio once (its flip is always added)")
      seen.append(ar)


def default_boxes(image_size: int,
                  feature_sizes: Sequence[int],
                  steps: Sequence[float],
                  min_sizes: Sequence[float],
                  max_sizes: Optional[Sequence[float]],
                  aspect_ratios: Sequence[Sequence[float]],
                  offset: float = 0.5,
                  clip: bool | str = False) -> np.ndarray:
  """Default boxes for all feature maps.

  Args:
    image_size: input side in pixels (square inputs).
    feature_sizes: side of each feature map, e.g. (38, 19, 10, 5, 3, 1) for SSD300.
    steps: pixels between neighbouring centres on each map, e.g. (8, 16, 32, 64, 100, 300).
    min_sizes, max_sizes: box sizes in pixels per map (max_sizes may be None or empty).
    aspect_ratios: per map, the ratios other than 1; each is also used flipped.
    offset: centre offset in units of the step (0.5 = cell centre).
    clip: False / "none", True / "corners" (Caffe: clip the xyxy corners to the image) or "wh"
      (torchvision: clamp the normalized width and height to [0, 1]); see the module docstring.

  Returns:
    [A, 4] float32 cxcywh, normalized by image_size, A = sum_i f_i^2 * K_i.
  """
  _check(image_size, feature_sizes, steps, min_sizes, max_sizes, aspect_ratios)
  clip_mode = _clip_mode(clip)
  levels = []
  for i, (f, step) in enumerate(zip(feature_sizes, steps)):
    mn = float(min_sizes[i])
    wh = [(mn, mn)]
    if max_sizes:
      s = math.sqrt(mn * float(max_sizes[i]))
      wh.append((s, s))
    for ar in aspect_ratios[i]:
      r = math.sqrt(float(ar))
      wh.append((mn * r, mn / r))
      wh.append((mn / r, mn * r))
    wh = np.asarray(wh, np.float64) / image_size  # [K, 2]
    if clip_mode == "wh":
      wh = np.clip(wh, 0.0, 1.0)
    centres = (np.arange(f, dtype=np.float64) + offset) * step / image_size  # [f]
    cy, cx = np.meshgrid(centres, centres, indexing="ij")  # [f, f], row-major (y, x)
    cxy = np.stack([cx, cy], -1).reshape(f * f, 1, 2)  # [f*f, 1, 2]
    k = wh.shape[0]
    boxes = np.concatenate([np.broadcast_to(cxy, (f * f, k, 2)),
                            np.broadcast_to(wh[None], (f * f, k, 2))], -1)  # [f*f, K, 4]
    levels.append(boxes.reshape(-1, 4))
  out = np.concatenate(levels, 0)
  if clip_mode == "corners":
    xyxy = np.concatenate([out[:, :2] - out[:, 2:] / 2, out[:, :2] + out[:, 2:] / 2], -1)
    xyxy = np.clip(xyxy, 0.0, 1.0)
    out = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
  return out.astype(np.float32)


def from_config(config) -> np.ndarray:
  """The [A, 4] cxcywh anchors that an experiment config uses (``config.image_size``, ``config.anchors``)."""
  a = config.anchors
  return default_boxes(
      image_size=config.image_size,
      feature_sizes=tuple(a.feature_sizes),
      steps=tuple(a.steps),
      min_sizes=tuple(a.min_sizes),
      max_sizes=tuple(a.max_sizes) if a.max_sizes else None,
      aspect_ratios=tuple(tuple(r) for r in a.aspect_ratios),
      offset=a.offset,
      clip=a.clip)


def per_location_from_config(config) -> list[int]:
  """K_i per feature map for an experiment config."""
  a = config.anchors
  return num_anchors_per_location(a.aspect_ratios, a.max_sizes)
