"""PASCAL VOC folders (the devkit layout) read directly: Annotations/*.xml + JPEGImages/.

``load_voc_folder(root, class_names)`` reads ``root/Annotations/<id>.xml`` for every id of
``root/ImageSets/Main/<image_set>.txt`` (or every XML file when no image set is given) and finds the
image at ``root/JPEGImages/<filename>``. The devkit's pixel coordinates are 1-based and inclusive
(a box ``xmin..xmax`` covers pixels ``xmin - 1 .. xmax - 1`` of a 0-based grid), so the normalized
box is ``[(xmin - 1) / width, (ymin - 1) / height, xmax / width, ymax / height]``. ``<difficult>``
becomes ``difficult``; image ids are the digits of the file id (``2008_000002`` -> 2008000002).

As config.data.source="voc_xml", ``config.data.data_dir`` holds the year folders and the split
specs are ``"<folder>:<image set>"``, e.g. ``"VOC2007:trainval"``; a spec without a folder reads
``data_dir`` itself. The class names are the object names the training splits' annotations use,
sorted (:func:`class_names_in`; for the 20 VOC classes that is the devkit's order).

Everything is validated up front as for COCO-JSON folders (see :mod:`ssdjax.data.coco_json`),
following ``bad_records``: ``"skip"`` drops the whole image of a bad object, logs each bad entry
and a final count, kept in :attr:`VocXmlSource.skipped`.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence
import xml.etree.ElementTree as ET

import numpy as np

from ssdjax.data import records
from ssdjax.errors import UserError

_BOX_TOLERANCE_PX = 1.0


class VocXmlSource:
  """Random-access records of a VOC devkit folder; see :func:`load_voc_folder`."""

  def __init__(self, root: str, class_names: Sequence[str], *, image_set: str | None,
               bad_records: str):
    self.root = os.fspath(root)
    self.class_names = tuple(class_names)
    self.bad_records = records.check_bad_records_mode(bad_records)
    ids = _image_ids(self.root, image_set)
    bad = records.BadEntries(bad_records)
    parsed = []
    num_objects = 0
    for image_id in ids:
      xml_path = os.path.join(self.root, "Annotations", f"{image_id}.xml")
      entry, n = self._parse(xml_path, image_id, bad)
      num_objects += n
      if entry is not None:
        parsed.append(entry)
    self._entries, _ = records.split_by_image_size(
        parsed, bad, where=lambda e: e["xml"], annotation_kind="XML")
    num_kept_objects = sum(len(entry["labels"]) for entry in self._entries)
    self.skipped = {"bad_entries": len(bad.messages),
                    "images": len(ids) - len(self._entries), "total_images": len(ids),
                    "annotations": num_objects - num_kept_objects, "total_annotations": num_objects}
    bad.log_summary(self.root, self.skipped, unit="objects")

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> records.Record | None:
    entry = self._entries[index]
    try:
      image = records.load_image(entry["path"])
    except ValueError as e:
      if self.bad_records == "raise":
        raise ValueError(f"{e}; replace the file or set config.data.bad_records='skip'") from e
      records.warn_once(entry["path"], f"{e}; image dropped (config.data.bad_records='skip'; "
                        "reported once per process)")
      return None
    return self._record(entry, image)

  def annotation(self, index: int) -> records.Record:
    entry = self._entries[index]
    return {**self._record(entry, None), "height": entry["height"], "width": entry["width"]}

  @staticmethod
  def _record(entry, image):
    return records.make_record(image, entry["boxes"], entry["labels"],
                               difficult=entry["difficult"], image_id=entry["image_id"],
                               file=entry["path"])

  def _parse(self, xml_path: str, file_id: str,
             bad: records.BadEntries) -> tuple[dict | None, int]:
    """One annotation file -> (entry dict, or None if the image is dropped; its object count).

    Every bad object is reported; one is enough to drop the image.
    """
    try:
      root = ET.parse(xml_path).getroot()
      objects = root.findall("object")
      width = int(float(root.findtext("size/width")))
      height = int(float(root.findtext("size/height")))
    except (OSError, ET.ParseError, TypeError, ValueError) as e:
      bad.report(f"{xml_path}: cannot read the annotation ({type(e).__name__}: {e})")
      return None, 0
    if width <= 0 or height <= 0:
      bad.report(f"{xml_path}: image size {width}x{height} must be positive")
      return None, len(objects)
    boxes, labels, difficult, problems = [], [], [], []
    for k, obj in enumerate(objects):
      where = f"{xml_path}: object {k}"
      name = (obj.findtext("name") or "").strip()
      if name not in self.class_names:
        problems.append(f"{where}: unknown class {name!r}; classes: {self.class_names}")
        continue
      try:
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{t}"))
                          for t in ("xmin", "ymin", "xmax", "ymax"))
      except (TypeError, ValueError):
        problems.append(f"{where}: bndbox needs numeric xmin, ymin, xmax, ymax")
        continue
      x0, y0 = x0 - 1, y0 - 1  # 1-based inclusive pixels -> continuous 0-based edges
      if x1 <= x0 or y1 <= y0:
        problems.append(f"{where}: bndbox {[x0 + 1, y0 + 1, x1, y1]} has zero or negative size")
        continue
      tol = _BOX_TOLERANCE_PX
      if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        problems.append(f"{where}: bndbox {[x0 + 1, y0 + 1, x1, y1]} lies outside the "
                        f"{width}x{height} image by more than {tol:g} pixel")
        continue
      boxes.append([max(x0, 0) / width, max(y0, 0) / height,
                    min(x1, width) / width, min(y1, height) / height])
      labels.append(self.class_names.index(name) + 1)
      difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    for problem in problems:
      bad.report(problem, dropped=f"image {file_id} dropped with all its objects")
    if problems:
      return None, len(objects)
    filename = root.findtext("filename") or f"{file_id}.jpg"
    return {"xml": xml_path, "path": os.path.join(self.root, "JPEGImages", filename.strip()),
            "image_id": records.image_id_from_name(file_id, 0), "height": height,
            "width": width, "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "labels": np.array(labels, np.int32),
            "difficult": np.array(difficult, bool)}, len(objects)

  def __repr__(self) -> str:
    return f"VocXmlSource({self.root!r}, {len(self)} images)"


def load_voc_folder(root: str, class_names: Sequence[str], *, image_set: str | None = None,
                    bad_records: str = "raise") -> VocXmlSource:
  """Reads a VOC devkit year folder (e.g. ``VOCdevkit/VOC2007``) as a random-access source.

  Args:
    root: folder with Annotations/, JPEGImages/ and (with ``image_set``) ImageSets/Main/.
    class_names: the foreground class names; label k is ``class_names[k - 1]``.
    image_set: name of an ImageSets/Main list ("trainval", "test", ...), or None for every XML.
    bad_records: "raise" (first problem raises ValueError naming the file) or "skip".
  """
  return VocXmlSource(root, class_names, image_set=image_set, bad_records=bad_records)


def _root(config, spec: str) -> tuple[str, str]:
  if not config.data.data_dir:
    raise UserError("config.data.data_dir must name the folder of the VOC year folders "
                    "(e.g. VOCdevkit) for source='voc_xml'")
  folder, image_set = records.split_spec(spec)
  return os.path.join(config.data.data_dir, folder), image_set


def class_names_in(config, spec: str) -> tuple[str, ...]:
  """The class names the annotations of a split use, sorted (for VOC: the devkit's order).

  Annotation files that cannot be read are left to the source, which reports them.
  """
  root, image_set = _root(config, spec)
  found = set()
  for image_id in _image_ids(root, image_set):
    try:
      tree = ET.parse(os.path.join(root, "Annotations", f"{image_id}.xml")).getroot()
    except (OSError, ET.ParseError):
      continue
    found.update((obj.findtext("name") or "").strip() for obj in tree.findall("object"))
  found.discard("")
  return tuple(sorted(found))


def from_config(config, spec: str) -> VocXmlSource:
  """The source of one split; ``config.class_names`` must be resolved (label order)."""
  if config.class_names is None:
    raise UserError("config.class_names is not resolved: ssdjax.data.resolve_classes(config) "
                    "reads it from the annotations")
  root, image_set = _root(config, spec)
  return load_voc_folder(root, config.class_names, image_set=image_set,
                         bad_records=config.data.bad_records)


def _image_ids(root: str, image_set: str | None) -> list[str]:
  if image_set:
    list_file = os.path.join(root, "ImageSets", "Main", f"{image_set}.txt")
    if not os.path.isfile(list_file):
      raise ValueError(f"VOC image set {image_set!r}: {list_file} does not exist")
    with open(list_file) as f:
      return [line.split()[0] for line in f if line.strip()]
  paths = sorted(glob.glob(os.path.join(root, "Annotations", "*.xml")))
  if not paths:
    raise ValueError(f"{root}: no Annotations/*.xml files (is it a VOC year folder?)")
  return [os.path.splitext(os.path.basename(p))[0] for p in paths]
