"""COCO-JSON folders: any detection data set in the COCO annotation format.

Where a split's files are is stated by two config fields, templates relative to
``config.data.data_dir`` in which ``{split}`` is the split name (an entry of ``config.data.train``
or ``config.data.eval``); nothing is guessed:

* ``config.data.coco_json.annotation_file``: the split's annotation file, default
  ``annotations/{split}.json``;
* ``config.data.coco_json.image_dir``: the folder ``images[].file_name`` is relative to, default
  ``images/{split}``.

Common layouts::

  default        annotations/train.json, images/train/...     (splits "train", "val")
  COCO 2017      annotation_file="annotations/instances_{split}.json", image_dir="{split}"
                 (splits "train2017", "val2017")
  one folder     annotation_file="{split}/_annotations.coco.json", image_dir="{split}"
  per split      (splits "train", "valid", "test", as annotation tools export them)
  one file       annotation_file="annotations.json", image_dir="images"

Categories are sorted by ``id`` and mapped to contiguous labels 1..K (0 is background); their
names are the class names (:meth:`CocoJsonSource.class_names`) and their ids the category ids
(:meth:`CocoJsonSource.category_ids`), both recorded in the workdir, so detections can be written
back with the data set's own ids. ``iscrowd`` becomes ``is_crowd``.
Images without annotations are kept (they are negatives).

Everything is validated up front, before training starts: image entries (width/height, duplicate
ids, missing, unreadable or truncated file, file size different from the JSON), annotations
(unknown image or category, bbox of wrong form, zero/negative width or height, bbox outside the
image by more than 1 pixel; within 1 pixel it is clipped). ``bad_records="raise"`` stops at the
first problem with a message naming the file and the annotation id; ``"skip"`` drops the whole
image of a bad entry with all its annotations (kept without one of its objects, the image would
train that object as background; an annotation of no known image is dropped alone), logs a
warning per entry and a final count, kept in :attr:`CocoJsonSource.skipped`. Pixel data that still
fails to decode when drawn raises a ValueError naming the file ("raise"), or is dropped and
logged once per file and process ("skip").
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np

from ssdjax.data import records
from ssdjax.errors import UserError

_BOX_TOLERANCE_PX = 1.0


class CocoJsonSource:
  """Random-access source over one COCO-JSON annotation file and its image folder.

  Args:
    annotation_file: path of the COCO JSON file.
    image_dir: folder that ``images[].file_name`` is relative to.
    bad_records: "raise" or "skip" (see the module docstring).
  """

  def __init__(self, annotation_file: str, image_dir: str, *, bad_records: str):
    self.annotation_file = os.fspath(annotation_file)
    self.image_dir = os.fspath(image_dir)
    self.bad_records = records.check_bad_records_mode(bad_records)
    data = _read_json(self.annotation_file)
    self._categories = _categories(data, self.annotation_file)
    label_of = {cat_id: k + 1 for k, (cat_id, _) in enumerate(self._categories)}
    bad = records.BadEntries(bad_records)
    images, dropped_ids = self._valid_images(data.get("images"), bad)
    boxes = {image_id: [] for image_id in images}  # image id -> [(box, label, is_crowd)]
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
      raise ValueError(f"{self.annotation_file}: 'annotations' must be a list")
    bad_image_ids = set()
    for k, ann in enumerate(annotations):
      image_id = ann.get("image_id") if isinstance(ann, dict) else None
      if _is_key(image_id) and image_id in dropped_ids:
        continue  # its image file or entry was reported and dropped
      entry = self._check_annotation(k, ann, images, label_of)
      if isinstance(entry, str):
        if _is_key(image_id) and image_id in images:
          bad.report(entry, dropped=f"image id {image_id} dropped with all its annotations")
          bad_image_ids.add(image_id)  # its other annotations are still checked and reported
        else:
          bad.report(entry, dropped="annotation dropped")
      else:
        boxes[image_id].append(entry)
    self._images = [images[i] for i in sorted(images) if i not in bad_image_ids]
    self._annotations = []
    for image in self._images:
      entries = boxes[image["id"]]
      self._annotations.append((
          np.array([e[0] for e in entries], np.float32).reshape(-1, 4),
          np.array([e[1] for e in entries], np.int32),
          np.array([e[2] for e in entries], bool)))
    num_images = len(data.get("images"))
    num_kept_annotations = sum(len(labels) for _, labels, _ in self._annotations)
    self.skipped = {"bad_entries": len(bad.messages),
                    "images": num_images - len(self._images), "total_images": num_images,
                    "annotations": len(annotations) - num_kept_annotations,
                    "total_annotations": len(annotations)}
    bad.log_summary(self.annotation_file, self.skipped)

  def class_names(self) -> tuple[str, ...]:
    """Category names in label order (label k = names[k - 1])."""
    return tuple(name for _, name in self._categories)

  def category_ids(self) -> tuple[int, ...]:
    """COCO category id of each label (label k = category_ids[k - 1])."""
    return tuple(cat_id for cat_id, _ in self._categories)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> records.Record | None:
    image_entry = self._images[index]
    path = image_entry["path"]
    try:
      image = records.load_image(path)
    except ValueError as e:
      if self.bad_records == "raise":
        raise ValueError(f"{e} (image id {image_entry['id']} of {self.annotation_file}); "
                         "replace the file or set config.data.bad_records='skip'") from e
      records.warn_once(path, f"{e}; image dropped (config.data.bad_records='skip'; reported once "
                        "per process)")
      return None
    return self._record(index, image)

  def annotation(self, index: int) -> records.Record:
    image_entry = self._images[index]
    return {**self._record(index, None), "height": image_entry["height"],
            "width": image_entry["width"]}

  def _record(self, index, image):
    image_entry = self._images[index]
    boxes, labels, is_crowd = self._annotations[index]
    return records.make_record(image, boxes, labels, is_crowd=is_crowd,
                               image_id=image_entry["id"], file=image_entry["path"])

  def _valid_images(self, entries, bad: records.BadEntries) -> tuple[dict[int, dict], set]:
    """Checks the 'images' list.

    Returns:
      ({id: {id, path, height, width}} of the good images, ids of the dropped ones).
    """
    where = self.annotation_file
    if not isinstance(entries, list):
      raise ValueError(f"{where}: 'images' must be a list of image entries")
    candidates, dropped, seen = [], set(), set()
    for k, entry in enumerate(entries):
      if not isinstance(entry, dict) or not {"id", "file_name", "width", "height"} <= set(entry):
        bad.report(f"{where}: images[{k}] needs the keys id, file_name, width, height")
        continue
      image_id, name = entry["id"], entry["file_name"]
      if image_id in seen:
        bad.report(f"{where}: image id {image_id} ({name}) appears twice in 'images'",
                   dropped="second entry dropped")
        continue
      seen.add(image_id)
      if not (_is_number(entry["width"]) and _is_number(entry["height"])
              and entry["width"] > 0 and entry["height"] > 0):
        bad.report(f"{where}: image id {image_id} ({name}): width/height must be positive, got "
                   f"{entry['width']}x{entry['height']}")
        dropped.add(image_id)
        continue
      candidates.append({"id": image_id, "path": os.path.join(self.image_dir, name),
                         "height": int(entry["height"]), "width": int(entry["width"])})
    readable, rejected = records.split_by_image_size(
        candidates, bad, where=lambda e: f"{where}: image id {e['id']}", annotation_kind="JSON")
    images = {entry["id"]: entry for entry in readable}
    dropped.update(entry["id"] for entry in rejected)
    return images, dropped

  def _check_annotation(self, k, ann, images, label_of) -> tuple | str:
    """One annotation -> (normalized xyxy box, label, is_crowd), or its problem as a message."""
    where = self.annotation_file
    if not isinstance(ann, dict) or not {"id", "image_id", "bbox", "category_id"} <= set(ann):
      return f"{where}: annotations[{k}] needs the keys id, image_id, bbox, category_id"
    ann_id = ann["id"]
    image = images.get(ann["image_id"]) if _is_key(ann["image_id"]) else None
    if image is None:
      return f"{where}: annotation id {ann_id}: unknown image_id {ann['image_id']}"
    prefix = f"{where}: annotation id {ann_id} (image {image['path']})"
    if not _is_key(ann["category_id"]) or ann["category_id"] not in label_of:
      return (f"{prefix}: unknown category_id {ann['category_id']}; categories in the file: "
              f"{sorted(label_of)}")
    bbox = ann["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
      return f"{prefix}: bbox {bbox!r} must be 4 finite numbers [x, y, width, height]"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
      return f"{prefix}: bbox {bbox} has zero or negative width/height"
    width, height = image["width"], image["height"]
    tol = _BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
      return (f"{prefix}: bbox {bbox} [x, y, width, height] lies outside the {width}x{height} "
              f"image by more than {tol:g} pixel")
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
      return f"{prefix}: bbox {bbox} has zero area inside the {width}x{height} image"
    box = (x0 / width, y0 / height, x1 / width, y1 / height)
    return box, label_of[ann["category_id"]], bool(ann.get("iscrowd", 0))

  def __repr__(self) -> str:
    return f"CocoJsonSource({self.annotation_file!r}, {len(self)} images)"


def paths(config, split: str) -> tuple[str, str]:
  """(annotation file, image folder) of a split, from ``config.data.coco_json`` (module docstring)."""
  data_dir = config.data.data_dir
  if not data_dir:
    raise UserError("config.data.data_dir must name the COCO-JSON folder for source='coco_json'")
  layout = config.data.coco_json
  annotation_file = os.path.join(data_dir, layout.annotation_file.format(split=split))
  image_dir = os.path.join(data_dir, layout.image_dir.format(split=split))
  if not os.path.isfile(annotation_file):
    raise UserError(
        f"coco_json split {split!r}: annotation file {annotation_file} not found "
        f"(config.data.coco_json.annotation_file={layout.annotation_file!r} under "
        f"config.data.data_dir={data_dir!r}); set the two config.data.coco_json fields to the "
        "folder's layout (docs/data.md)")
  if not os.path.isdir(image_dir):
    raise UserError(
        f"coco_json split {split!r}: image folder {image_dir} not found "
        f"(config.data.coco_json.image_dir={layout.image_dir!r})")
  return annotation_file, image_dir


def from_config(config, split: str) -> CocoJsonSource:
  """The COCO-JSON source of one split (parsed and validated once per process and file)."""
  annotation_file, image_dir = paths(config, split)
  return _load(annotation_file, os.path.getmtime(annotation_file), image_dir,
               config.data.bad_records)


@functools.lru_cache(maxsize=4)
def _load(annotation_file, mtime, image_dir, bad_records) -> CocoJsonSource:
  """Parses and validates a file once per process (train, eval and class names share it)."""
  del mtime  # part of the cache key only: an edited file is read again
  return CocoJsonSource(annotation_file, image_dir, bad_records=bad_records)


def _read_json(path):
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: a COCO file is a JSON object with images, annotations, categories")
  return data


def _categories(data, where) -> list[tuple[int, str]]:
  """[(category id, name)] sorted by id; a broken category list is never skippable."""
  categories = data.get("categories")
  if not isinstance(categories, list) or not categories:
    raise ValueError(f"{where}: 'categories' must be a non-empty list of {{id, name}}")
  out = {}
  for k, cat in enumerate(categories):
    if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
      raise ValueError(f"{where}: categories[{k}] needs the keys id and name")
    if cat["id"] in out:
      raise ValueError(f"{where}: category id {cat['id']} appears twice")
    out[cat["id"]] = str(cat["name"])
  return sorted(out.items())


def _is_key(v) -> bool:
  """Whether an id from the JSON can be looked up (a list or dict there would raise TypeError)."""
  return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
