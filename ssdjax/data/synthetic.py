"""Synthetic shapes: a procedural detection data set that needs no download.

Each image is drawn on demand in ``__getitem__`` from
``numpy.random.default_rng([seed, split, index])``, so it is the same on every machine and in every
worker, and nothing is stored. Objects are crisp, single-coloured circles, squares, upright
triangles and crosses (labels 1..4 in that order, see ``configs/synthetic.py``; triangles and
crosses vary in aspect ratio) on solid, gradient, noise, stripe or checker backgrounds. Their
colours keep a clear distance from the background and from the objects they overlap. A placement is
rejected when its box has IoU > 0.3 with an earlier box or when it would hide more than 30% of an
earlier object's pixels, so every object stays visible. Boxes are the exact tight boxes of each
object's visible pixels (pixel ``j`` covers ``[j, j + 1)``), normalized by the image width and
height.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ssdjax.data import records

SHAPES = ("circle", "square", "triangle", "cross")
SPLITS = ("train", "val")

_MAX_BOX_IOU = 0.3          # a new object's box may overlap an earlier one up to this IoU
_MIN_VISIBLE = 0.7          # fraction of an earlier object's pixels that must stay visible
_PLACEMENT_TRIES = 30       # tries to place one object before giving up on it (fewer objects)
_MIN_BG_DISTANCE = 110.0    # RGB distance of an object colour from every background colour
_MIN_OBJECT_DISTANCE = 90.0  # RGB distance from the colours of objects it overlaps
_COLOUR_TRIES = 50
_NOISE_STD = 10.0
_TEXTURE_DELTA = 30         # stripes / checker alternate between two close colours (no false edges)


class SyntheticShapes:
  """Random-access source of synthetic shape images (see the module docstring).

  Args:
    num_examples: number of images in the split.
    split: "train" or "val" (different images for the same index).
    seed: data seed; the same (seed, split, index) always gives the same image.
    image_hw: (height, width) of the generated images in pixels.
    min_objects, max_objects: number of objects per image, uniform in [min, max]; 0 is allowed.
    min_size, max_size: object size as a fraction of the shorter image side, log-uniform.
    num_classes: number of shape kinds used, 1..4 (labels 1..num_classes).
  """

  def __init__(self, *, num_examples: int, split: str, seed: int, image_hw: tuple[int, int],
               min_objects: int, max_objects: int, min_size: float, max_size: float,
               num_classes: int):
    if split not in SPLITS:
      raise ValueError(f"synthetic split {split!r} is unknown; valid splits: {SPLITS}")
    if num_examples < 1:
      raise ValueError(f"synthetic {split}: num_examples={num_examples} must be >= 1")
    if not 0 <= min_objects <= max_objects:
      raise ValueError(f"synthetic: need 0 <= min_objects <= max_objects, got "
                       f"min_objects={min_objects}, max_objects={max_objects}")
    if not 0 < min_size <= max_size <= 1:
      raise ValueError(f"synthetic: need 0 < min_size <= max_size <= 1 (fractions of the image "
                       f"side), got min_size={min_size}, max_size={max_size}")
    if not 1 <= num_classes <= len(SHAPES):
      raise ValueError(f"synthetic: num_classes={num_classes} must be in 1..{len(SHAPES)} "
                       f"(shapes: {SHAPES})")
    height, width = (int(v) for v in image_hw)
    if min(height, width) < 8:
      raise ValueError(f"synthetic: image_hw={image_hw} is too small (min side 8 pixels)")
    self.num_examples = int(num_examples)
    self.split = split
    self.seed = int(seed)
    self.image_hw = (height, width)
    self.min_objects, self.max_objects = int(min_objects), int(max_objects)
    self.min_size, self.max_size = float(min_size), float(max_size)
    self.num_classes = int(num_classes)

  def class_names(self) -> tuple[str, ...]:
    """Names of labels 1..num_classes."""
    return class_names(self.num_classes)

  def category_ids(self):
    """None: the labels are the ids."""
    return None

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> records.Record:
    return self.render(index)[0]

  def annotation(self, index: int) -> records.Record:
    record = dict(self.render(index)[0])
    height, width = record.pop("image").shape[:2]
    return {**record, "height": height, "width": width}

  def render(self, index: int) -> tuple[records.Record, np.ndarray]:
    """Returns (record, visible masks bool [N, H, W]), mask i = the pixels showing object i."""
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"synthetic {self.split}: index {index} outside 0..{self.num_examples - 1}")
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
    height, width = self.image_hw
    image, bg_segment = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)  # index of the object drawn on top, -1 = none
    pixel_counts, boxes, colours, labels = [], [], [], []
    for _ in range(rng.integers(self.min_objects, self.max_objects + 1)):
      placed = self._place(rng, owner, pixel_counts, boxes)
      if placed is None:
        continue
      kind, mask, box = placed
      overlapped = [colours[i] for i in np.unique(owner[mask]) if i >= 0]
      colour = _pick_colour(rng, bg_segment, overlapped)
      image[mask] = colour
      owner[mask] = len(labels)
      pixel_counts.append(int(mask.sum()))
      boxes.append(box)
      colours.append(colour)
      labels.append(kind + 1)
    masks = owner[None] == np.arange(len(labels))[:, None, None]  # [N, H, W]
    visible_boxes = np.array([_tight_box(m) for m in masks], np.float32).reshape(-1, 4)
    visible_boxes /= np.array([width, height, width, height], np.float32)
    record = records.make_record(image, visible_boxes, labels, image_id=index,
                                 file=f"synthetic:{self.split}[{index}]")
    return record, masks

  def _place(self, rng, owner, pixel_counts, boxes):
    """Draws one random shape that respects the overlap limits; (kind, mask, pixel box) or None."""
    height, width = owner.shape
    side = min(height, width)
    for _ in range(_PLACEMENT_TRIES):
      kind = int(rng.integers(self.num_classes))
      size = math.exp(rng.uniform(math.log(self.min_size), math.log(self.max_size))) * side
      aspect = 1.0 if SHAPES[kind] in ("circle", "square") else rng.uniform(0.75, 1.33)
      w = min(size * math.sqrt(aspect), width)
      h = min(size / math.sqrt(aspect), height)
      x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
      mask = _shape_mask(SHAPES[kind], (x0, y0, x0 + w, y0 + h), height, width)
      if not mask.any():
        continue
      box = _tight_box(mask)
      if boxes and records.box_iou(boxes, box).max() > _MAX_BOX_IOU:
        continue
      hidden = np.bincount(owner[mask] + 1, minlength=len(boxes) + 1)[1:]  # pixels covered per object
      still_visible = [(np.sum(owner == i) - hidden[i]) >= _MIN_VISIBLE * pixel_counts[i]
                       for i in np.flatnonzero(hidden)]
      if all(still_visible):
        return kind, mask, box
    return None


def class_names(num_classes: int) -> tuple[str, ...]:
  """The names of labels 1..num_classes: the first ``num_classes`` of :data:`SHAPES`."""
  return SHAPES[:num_classes]


def from_config(config, split: str) -> SyntheticShapes:
  """The synthetic source of ``config.data.synthetic`` for split "train" or "val"."""
  syn = config.data.synthetic
  if split not in SPLITS:
    raise ValueError(f"synthetic split {split!r} is unknown; valid splits: {SPLITS} "
                     "(config.data.train / config.data.eval)")
  image_hw = tuple(syn.image_hw) if syn.image_hw else (config.image_size, config.image_size)
  return SyntheticShapes(
      num_examples=syn.num_train if split == "train" else syn.num_val, split=split,
      seed=syn.seed, image_hw=image_hw, min_objects=syn.min_objects, max_objects=syn.max_objects,
      min_size=syn.min_size, max_size=syn.max_size, num_classes=syn.num_classes)


def _background(rng, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [H, W, 3] background and the [2, 3] colour segment that spans its colours."""
  c1 = rng.uniform(0, 255, 3)
  kind = rng.integers(5)
  yy = np.arange(height, dtype=np.float32)[:, None]  # [H, 1]
  xx = np.arange(width, dtype=np.float32)[None, :]  # [1, W]
  if kind == 1:  # linear gradient in a random direction
    c2 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))  # [H, W]
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    image = c1.astype(np.float32) + t[..., None] * (c2 - c1).astype(np.float32)
  elif kind == 2:  # gaussian noise around one colour
    c2 = c1
    image = c1.astype(np.float32) + rng.standard_normal(
        (height, width, 3), dtype=np.float32) * np.float32(_NOISE_STD)
  elif kind in (3, 4):  # stripes or checker of two close colours
    c2 = np.clip(c1 + rng.uniform(-_TEXTURE_DELTA, _TEXTURE_DELTA, 3), 0, 255)
    period = int(rng.integers(4, 16))
    row, col = (yy // period).astype(np.int32), (xx // period).astype(np.int32)
    phase = (col if rng.integers(2) else row) if kind == 3 else row + col  # [H or 1, W or 1]
    even = np.broadcast_to(phase % 2 == 0, (height, width))
    image = np.where(even[..., None], np.rint(c1), np.rint(c2)).astype(np.uint8)
    return image, np.stack([c1, c2])
  else:  # solid
    c2 = c1
    return np.full((height, width, 3), np.rint(c1), np.uint8), np.stack([c1, c2])
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), np.stack([c1, c2])


def _distance_to_segment(colour, segment) -> float:
  a, b = segment
  ab = b - a
  t = np.clip(np.dot(colour - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0)
  return float(np.linalg.norm(colour - (a + t * ab)))


def _pick_colour(rng, bg_segment, overlapped) -> np.ndarray:
  """An RGB colour far from the background and from the objects it overlaps (best of the tries)."""
  best, best_score = None, -1.0
  for _ in range(_COLOUR_TRIES):
    colour = rng.integers(0, 256, 3).astype(np.float64)
    score = min([_distance_to_segment(colour, bg_segment) / _MIN_BG_DISTANCE]
                + [np.linalg.norm(colour - c) / _MIN_OBJECT_DISTANCE for c in overlapped])
    if score > best_score:
      best, best_score = colour, score
    if score >= 1.0:
      break
  return best.astype(np.uint8)


def _shape_mask(shape: str, box, height: int, width: int) -> np.ndarray:
  """bool [H, W] pixels of one shape drawn (without anti-aliasing) in the pixel box x0, y0, x1, y1."""
  x0, y0, x1, y1 = box
  canvas = PIL.Image.new("L", (width, height), 0)
  draw = PIL.ImageDraw.Draw(canvas)
  # PIL's bounding boxes are inclusive of the last pixel, hence the -1.
  right, bottom = max(x0, x1 - 1), max(y0, y1 - 1)
  if shape == "circle":
    draw.ellipse([x0, y0, right, bottom], fill=1)
  elif shape == "square":
    draw.rectangle([x0, y0, right, bottom], fill=1)
  elif shape == "triangle":  # isosceles, pointing up
    draw.polygon([(x0, bottom), (right, bottom), ((x0 + right) / 2, y0)], fill=1)
  elif shape == "cross":  # a plus sign with arms a third of the shorter side thick
    cx, cy = (x0 + right) / 2, (y0 + bottom) / 2
    half = max(min(x1 - x0, y1 - y0) / 6, 1.0)
    draw.rectangle([x0, cy - half, right, cy + half], fill=1)
    draw.rectangle([cx - half, y0, cx + half, bottom], fill=1)
  else:
    raise ValueError(f"unknown shape {shape!r}; valid shapes: {SHAPES}")
  return np.asarray(canvas, bool)


def _tight_box(mask) -> np.ndarray:
  """bool [H, W] -> [4] pixel xyxy box of its True pixels (pixel j spans [j, j + 1))."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)
