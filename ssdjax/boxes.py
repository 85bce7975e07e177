"""Box formats, pairwise IoU and the SSD box parameterization.

Conventions (see DESIGN.md): ground truth and outputs are normalized ``xyxy`` in [0, 1];
anchors are normalized ``cxcywh``. Every jitted function here is NaN-free on degenerate
(zero-area or inverted) boxes: their area is 0 and their IoU with anything is 0.

Host-side validation (:func:`validate_boxes`) runs on NumPy arrays at the data edge, outside
jit, and raises ``ValueError`` naming the offending field and entry.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

# Boxes narrower than this (in normalized units) are treated as this wide inside the box
# encoding, so that log(w / anchor_w) stays finite for degenerate boxes under jit.
_MIN_SIZE = 1e-6


def xyxy_to_cxcywh(boxes):
  """[..., 4] xyxy -> [..., 4] cxcywh."""
  x0, y0, x1, y1 = jnp.split(boxes, 4, axis=-1)
  return jnp.concatenate([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def cxcywh_to_xyxy(boxes):
  """[..., 4] cxcywh -> [..., 4] xyxy."""
  cx, cy, w, h = jnp.split(boxes, 4, axis=-1)
  return jnp.concatenate([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def area(boxes):
  """[..., 4] xyxy -> [...] area; inverted boxes have area 0."""
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def clip(boxes, lo: float = 0.0, hi: float = 1.0):
  """Clips [..., 4] xyxy boxes to [lo, hi]."""
  return jnp.clip(boxes, lo, hi)


def iou(a, b):
  """Pairwise IoU. a: [N, 4] xyxy, b: [M, 4] xyxy -> [N, M].

  Degenerate boxes (zero or negative area) have IoU 0 with everything, never NaN.
  """
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
  wh = jnp.maximum(rb - lt, 0.0)  # [N, M, 2]
  inter = wh[..., 0] * wh[..., 1]  # [N, M]
  union = area(a)[:, None] + area(b)[None, :] - inter  # [N, M]
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def encode(boxes, anchors, variances: Sequence[float] = (0.1, 0.2)):
  """SSD regression targets of xyxy boxes w.r.t. cxcywh anchors.

  Args:
    boxes: [..., A, 4] xyxy, normalized (one box per anchor).
    anchors: [A, 4] cxcywh, normalized.
    variances: (center variance, size variance); Caffe's 0.1 and 0.2.

  Returns:
    [..., A, 4] offsets (dcx, dcy, dw, dh) as in the Caffe SSD code:
    ((cx - acx) / aw / v0, (cy - acy) / ah / v0, log(w / aw) / v1, log(h / ah) / v1).
  """
  v_center, v_size = variances
  b = xyxy_to_cxcywh(boxes)  # [..., A, 4]
  wh = jnp.maximum(b[..., 2:], _MIN_SIZE)
  dxy = (b[..., :2] - anchors[..., :2]) / anchors[..., 2:] / v_center
  dwh = jnp.log(wh / anchors[..., 2:]) / v_size
  return jnp.concatenate([dxy, dwh], axis=-1)


def decode(loc, anchors, variances: Sequence[float] = (0.1, 0.2)):
  """Inverse of :func:`encode`: [..., A, 4] offsets -> [..., A, 4] xyxy boxes (normalized)."""
  v_center, v_size = variances
  cxy = loc[..., :2] * v_center * anchors[..., 2:] + anchors[..., :2]
  wh = jnp.exp(loc[..., 2:] * v_size) * anchors[..., 2:]
  return cxcywh_to_xyxy(jnp.concatenate([cxy, wh], axis=-1))


def validate_boxes(boxes, *, name: str = "boxes", where: str = "", tol: float = 1e-6) -> np.ndarray:
  """Checks host-side normalized xyxy boxes and returns them as float32 [N, 4].

  Raises ValueError naming ``where`` (a file or record), the field and the first bad entry for:
  wrong shape, NaN or inf, coordinates outside [0, 1], and zero-area or inverted boxes.
  """
  arr = np.asarray(boxes, dtype=np.float32)
  prefix = f"{where}: " if where else ""
  if arr.size == 0:
    return arr.reshape(0, 4)
  if arr.ndim != 2 or arr.shape[-1] != 4:
    raise ValueError(f"{prefix}{name} must have shape [N, 4] (xyxy, normalized); got {arr.shape}")
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{prefix}{name}[{i}] = {arr[i].tolist()} contains NaN or inf")
  bad = ((arr < -tol) | (arr > 1 + tol)).any(axis=1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"{prefix}{name}[{i}] = {arr[i].tolist()} is outside [0, 1]; boxes must be normalized xyxy "
        "(divide pixel coordinates by the image width/height)")
  bad = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"{prefix}{name}[{i}] = {arr[i].tolist()} has zero area or xmin > xmax / ymin > ymax; "
        "boxes must be xyxy with xmin < xmax and ymin < ymax")
  return np.clip(arr, 0.0, 1.0)
