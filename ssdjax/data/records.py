"""The host-side record format shared by every data source, image loading and bad-record handling.

A *record* is one image with its ground truth, as NumPy arrays::

  {"image": uint8 [H, W, 3] RGB,
   "boxes": float32 [N, 4] xyxy, normalized to [0, 1],
   "labels": int32 [N] in 1..num_classes-1 (0 is background / padding, never a label),
   "difficult": bool [N], "is_crowd": bool [N],
   "image_id": int, "file": str (a path or "source:split[index]", for error messages)}

A *source* is random access (``__len__`` + ``__getitem__``), so it can feed ``grain.MapDataset.source``.
Every source here also has ``annotation(index)``: the same record without ``"image"`` and with the
image's ``"height"`` and ``"width"`` in pixels, read without decoding the pixels where the source can.
``__getitem__`` may return ``None`` for an image dropped by ``bad_records="skip"`` when it is drawn
(grain filters ``None`` out; the drop is logged once per file and process).

``bad_records="skip"`` drops the whole image of a bad annotation, never the annotation alone: an
image kept without one of its objects would train that object as background.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import io
import os
import re
import threading
from typing import Any, Sequence

from absl import logging
import numpy as np
import PIL.Image

from ssdjax.errors import UserError

Record = dict[str, Any]

BAD_RECORDS_MODES = ("raise", "skip")

# A complete JPEG ends with its end-of-image marker (zero padding after it is common) and a PNG with
# its IEND chunk; the last bytes of a file tell a cut-off copy without decoding it.
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_TAIL_BYTES = 1024

# Keys already warned about by warn_once in this process (grain's read threads share it).
_warned: set[str] = set()
_warned_lock = threading.Lock()


def make_record(image, boxes, labels, *, difficult=None, is_crowd=None, image_id: int,
                file: str) -> Record:
  """Builds a record with the documented dtypes and shapes.

  Args:
    image: uint8 [H, W, 3] RGB, or None for an annotation-only record.
    boxes: [N, 4] xyxy, normalized.
    labels: [N] int, 1..num_classes-1.
    difficult: [N] bool, default all False.
    is_crowd: [N] bool, default all False.
    image_id: integer id of the image.
    file: path or source name, used in error messages.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = boxes.shape[0]
  record = {
      "boxes": boxes,
      "labels": np.asarray(labels, np.int32).reshape(n),
      "difficult": (np.zeros(n, bool) if difficult is None
                    else np.asarray(difficult, bool).reshape(n)),
      "is_crowd": (np.zeros(n, bool) if is_crowd is None
                   else np.asarray(is_crowd, bool).reshape(n)),
      "image_id": int(image_id),
      "file": str(file),
  }
  if image is not None:
    record["image"] = image
  return record


def select_boxes(record: Record, keep) -> Record:
  """Returns a copy of ``record`` with only the boxes where ``keep`` [N] bool is True."""
  out = dict(record)
  for key in ("boxes", "labels", "difficult", "is_crowd"):
    out[key] = record[key][keep]
  return out


def box_problem(box, label, num_classes: int) -> str | None:
  """Why one normalized xyxy box / label pair is unusable as ground truth, or None if it is fine."""
  box = np.asarray(box, np.float64)
  if not np.isfinite(box).all():
    return f"box {box.tolist()} contains NaN or inf"
  if (box < 0).any() or (box > 1).any():
    return f"box {box.tolist()} is outside [0, 1] (xyxy, normalized)"
  if box[2] <= box[0] or box[3] <= box[1]:
    return f"box {box.tolist()} has zero area or xmin >= xmax / ymin >= ymax"
  if not 1 <= int(label) < num_classes:
    return f"label {int(label)} is outside 1..{num_classes - 1} (num_classes={num_classes})"
  return None


def box_iou(a, b) -> np.ndarray:
  """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes -> [N, M]; degenerate boxes have IoU 0.

  NumPy twin of ``ssdjax.boxes.iou`` for input workers, which should not dispatch JAX ops.
  """
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
  inter = np.prod(np.clip(rb - lt, 0, None), axis=2)  # [N, M]
  area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)  # [N]
  area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)  # [M]
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def check_bad_records_mode(mode: str) -> str:
  if mode not in BAD_RECORDS_MODES:
    raise ValueError(f"config.data.bad_records={mode!r}; valid values: {BAD_RECORDS_MODES}")
  return mode


def warn_once(key: str, message: str) -> bool:
  """Logs ``message`` as a warning the first time ``key`` is seen in this process.

  A bad image found when it is drawn would otherwise be reported again every epoch.

  Returns:
    Whether the message was logged (False: ``key`` was reported before).
  """
  with _warned_lock:
    if key in _warned:
      return False
    _warned.add(key)
  logging.warning("%s", message)
  return True


class BadEntries:
  """Applies ``config.data.bad_records`` to the problems found while validating a data set.

  ``"raise"``: :meth:`report` raises UserError with the message. ``"skip"``: it logs a warning per
  entry, saying what is dropped, and keeps the message in ``messages``; the caller drops that and
  logs :meth:`log_summary` at the end.
  """

  def __init__(self, mode: str):
    self.mode = check_bad_records_mode(mode)
    self.messages: list[str] = []

  def report(self, message: str, *, dropped: str = "image dropped") -> None:
    """Raises, or logs ``message`` with what is ``dropped`` because of it ("image 3 dropped")."""
    if self.mode == "raise":
      raise UserError(f"{message}; fix the data or set config.data.bad_records='skip' to drop it")
    logging.warning("%s; %s (config.data.bad_records='skip')", message, dropped)
    self.messages.append(message)

  def log_summary(self, where: str, skipped: dict[str, int], *, unit: str = "annotations") -> None:
    """Logs the final count once, if anything was reported; ``skipped`` as ``Source.skipped``."""
    if not self.messages:
      return
    logging.warning(
        "%s: %d bad entries, each logged above; dropped %d of %d images and %d of %d %s (those "
        "of the dropped images included) (config.data.bad_records='skip'). First: %s",
        where, skipped["bad_entries"], skipped["images"], skipped["total_images"],
        skipped["annotations"], skipped["total_annotations"], unit,
        "; ".join(self.messages[:3]) + (" ..." if len(self.messages) > 3 else ""))


def clean_boxes(record: Record, *, num_classes: int, bad_records: str) -> Record | None:
  """Checks every box of a record read lazily (tfds) against :func:`box_problem`.

  Returns:
    ``record`` if every box is fine. Otherwise ``bad_records="raise"`` raises UserError naming the
    record's file and the object index, and ``"skip"`` returns None (the whole image is dropped)
    after logging each bad box the first time this process meets it.
  """
  check_bad_records_mode(bad_records)
  boxes, labels = record["boxes"], record["labels"]
  if (np.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 1).all()
      and (boxes[:, 2:] > boxes[:, :2]).all() and (labels >= 1).all()
      and (labels < num_classes).all()):
    return record  # the common case, without a Python loop over the boxes
  problems = [f"{record['file']}: object {i}: {problem}"
              for i, (box, label) in enumerate(zip(boxes, labels))
              if (problem := box_problem(box, label, num_classes)) is not None]
  if not problems:
    return record
  if bad_records == "raise":
    BadEntries("raise").report(problems[0])
  for message in problems:
    warn_once(message, f"{message}; image dropped (config.data.bad_records='skip'; reported once "
              "per process)")
  return None


def decode_image(data: bytes, *, name: str) -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3] RGB; ValueError naming ``name`` if they do not decode."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
    raise ValueError(f"{name}: cannot decode image ({e})") from e


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3] RGB.

  EXIF orientation is not applied: COCO and VOC annotate the stored pixel grid.

  Raises:
    ValueError: naming the file, if it is missing or cannot be decoded.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: image file not found")
  with open(path, "rb") as f:
    return decode_image(f.read(), name=path)


def image_size(image: str | bytes, *, name: str | None = None) -> tuple[int, int]:
  """(height, width) of an image file (a path) or encoded bytes, from its header only.

  Raises:
    ValueError: naming the file (or ``name``) if it is missing or not a readable image.
  """
  name = name or (image if isinstance(image, str) else "image")
  try:
    with PIL.Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
      width, height = img.size
  except FileNotFoundError as e:
    raise ValueError(f"{name}: image file not found") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{name}: cannot decode image ({e})") from e
  return height, width


def truncation_problem(path: str) -> str | None:
  """Why a JPEG or PNG file is cut short, naming it; None if it is complete or of another format.

  Reads the first and last bytes only: a JPEG must end with its end-of-image marker FF D9 (zero
  padding after it allowed), a PNG with its IEND chunk. The header that :func:`image_size` reads
  says nothing of a copy or download that stopped early. A file with other bytes after its end
  marker (some cameras append a trailer) is decoded once to tell the two apart.
  """
  with open(path, "rb") as f:
    head = f.read(len(_PNG_START))
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _TAIL_BYTES))
    tail = f.read()
  if head.startswith(_JPEG_START):
    complete, end = tail.rstrip(b"\0").endswith(_JPEG_END), "the JPEG end-of-image marker FF D9"
  elif head.startswith(_PNG_START):
    complete, end = tail.endswith(_PNG_END), "the PNG IEND chunk"
  else:
    return None
  if complete:
    return None
  try:
    load_image(path)
  except ValueError as e:
    return (f"{path}: truncated image file (it does not end with {end} and does not decode: "
            f"{e.__cause__})")
  return None


def read_image_sizes(paths: Sequence[str]) -> list[tuple[int, int] | str]:
  """(height, width) of each image from its header, or the problem naming the file as a string.

  A JPEG or PNG file that is cut short is a problem too (:func:`truncation_problem`).
  """

  def one(path):
    try:
      size = image_size(path)
      return truncation_problem(path) or size
    except ValueError as e:
      return str(e)
    except OSError as e:  # removed or made unreadable since its header was read
      return f"{path}: cannot read the image file ({e})"

  # Reading headers is I/O bound: threads overlap it.
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return list(pool.map(one, paths))


def split_by_image_size(entries: Sequence[dict], bad: "BadEntries", *, where, annotation_kind: str):
  """Splits entries {"path", "height", "width", ...} into (readable, rejected) by their image file.

  An entry is rejected (and reported to ``bad``) when its file is missing, unreadable or cut short
  (:func:`read_image_sizes`), or when its size differs from what the annotation
  (``annotation_kind``: "JSON", "XML") says. ``where(entry)`` names the entry in the message.
  """
  readable, rejected = [], []
  for entry, size in zip(entries, read_image_sizes([e["path"] for e in entries])):
    if isinstance(size, str):
      bad.report(f"{where(entry)}: {size}")
    elif size != (entry["height"], entry["width"]):
      bad.report(f"{where(entry)}: {entry['path']} is {size[1]}x{size[0]} pixels but the "
                 f"{annotation_kind} says {entry['width']}x{entry['height']}")
    else:
      readable.append(entry)
      continue
    rejected.append(entry)
  return readable, rejected


def image_id_from_name(name: str, default: int) -> int:
  """The digits of a file name as an id ('000005.jpg' -> 5, '2008_000002' -> 2008000002)."""
  digits = re.sub(r"\D", "", os.path.basename(name))
  return int(digits) if digits else int(default)


class ConcatSource:
  """Random access over several sources in order (e.g. VOC 2007 trainval + VOC 2012 trainval)."""

  def __init__(self, sources: Sequence[Any]):
    if not sources:
      raise ValueError("ConcatSource needs at least one source")
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self._ends[-1]

  def _locate(self, index: int) -> tuple[Any, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a source of {len(self)} records")
    k = bisect.bisect_right(self._ends, index)
    start = self._ends[k - 1] if k else 0
    return self.sources[k], index - start

  def __getitem__(self, index: int) -> Record | None:
    source, i = self._locate(int(index))
    return source[i]

  def annotation(self, index: int) -> Record:
    source, i = self._locate(int(index))
    return source.annotation(i)

  def __repr__(self) -> str:
    return f"ConcatSource({self.sources!r})"


def split_spec(spec: str) -> tuple[str, str]:
  """'name:split' -> ('name', 'split') at the first ':'; a spec without ':' is ('', spec)."""
  name, sep, split = str(spec).partition(":")
  return (name, split) if sep else ("", name)
