"""Drawing detections and ground truth on images (host side, PIL)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A fixed palette so a class keeps its colour across images and runs.
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
            (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def class_colour(label: int) -> tuple[int, int, int]:
  return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def upscale_factor(width: int, height: int, min_side: int) -> int:
  """The integer factor that brings the shorter side to at least ``min_side`` (1 = none)."""
  short = min(width, height)
  return max(1, -(-int(min_side) // short)) if short > 0 and min_side > short else 1


def to_pixels(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
  """[N, 4] normalized xyxy -> [N, 4] pixel xyxy (float)."""
  return np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([width, height, width, height])


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int],
                    scores: Sequence[float] | None, class_names: Sequence[str],
                    line_width: int = 2, min_side: int = 0) -> Image.Image:
  """Draws boxes with "name score" captions.

  An image whose shorter side is below ``min_side`` is first upscaled by the smallest integer
  factor that reaches it (nearest neighbour: pixels stay as they are), so the 11-pixel captions
  stay legible on small images; the boxes are normalized, so they scale with it.

  Args:
    image: [H, W, 3] uint8.
    boxes: [N, 4] xyxy, normalized.
    labels: [N] class ids, 1..len(class_names) (0 = background is never drawn).
    scores: [N] or None (ground truth, drawn in the given order); boxes are drawn lowest score first.
    class_names: foreground class names; label l is class_names[l - 1].
    line_width: outline width in pixels of the drawn image.
    min_side: upscale images with a shorter side below this (0 = never).
  """
  img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  factor = upscale_factor(img.width, img.height, min_side)
  if factor > 1:
    img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  pix = to_pixels(boxes, img.width, img.height)
  # Lowest score first, so where boxes overlap the most confident one is drawn on top.
  order = range(len(pix)) if scores is None else np.argsort(np.asarray(scores), kind="stable")
  for i in order:
    x0, y0, x1, y1 = pix[i]
    label = int(labels[i])
    if label <= 0:
      continue
    colour = class_colour(label)
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=line_width)
    name = class_names[label - 1] if label - 1 < len(class_names) else str(label)
    caption = name if scores is None else f"{name} {float(scores[i]):.2f}"
    tx, ty = x0, max(y0 - 11, 0)
    tw = draw.textlength(caption, font=font)
    draw.rectangle([tx, ty, tx + tw + 2, ty + 11], fill=colour)
    draw.text((tx + 1, ty), caption, fill=(0, 0, 0), font=font)
  return img
