"""Tests for ssdjax.data.voc_xml: devkit 1-based coordinates, difficult flags, image sets, errors."""

import logging

import numpy as np
import PIL.Image
import pytest

from tests.helpers import ssd300_voc
from ssdjax.data import voc_xml

CLASSES = ("cat", "dog")


def _object(name, box, difficult=0):
  xmin, ymin, xmax, ymax = box
  return (f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
          f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
          f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _write(root, file_id, size, objects, *, image=True):
  width, height = size
  (root / "Annotations").mkdir(parents=True, exist_ok=True)
  (root / "JPEGImages").mkdir(exist_ok=True)
  (root / "Annotations" / f"{file_id}.xml").write_text(
      f"<annotation><folder>VOC2007</folder><filename>{file_id}.jpg</filename><size>"
      f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
      + "".join(objects) + "</annotation>")
  if image:
    PIL.Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(
        root / "JPEGImages" / f"{file_id}.jpg")


def test_reads_boxes_with_one_based_inclusive_coordinates(tmp_path):
  _write(tmp_path, "000005", (100, 50), [_object("dog", (1, 1, 100, 50)),
                                         _object("cat", (11, 21, 30, 40), difficult=1)])
  _write(tmp_path, "000007", (20, 10), [])
  src = voc_xml.load_voc_folder(str(tmp_path), CLASSES)
  assert len(src) == 2
  r = src[0]
  # Pixels 1..100 (1-based, inclusive) span the whole 100-pixel-wide image: [0, 1].
  np.testing.assert_allclose(r["boxes"], [[0, 0, 1, 1], [10 / 100, 20 / 50, 30 / 100, 40 / 50]])
  assert r["labels"].tolist() == [2, 1] and r["difficult"].tolist() == [False, True]
  assert r["image_id"] == 5 and r["image"].shape == (50, 100, 3)
  assert r["file"].endswith("JPEGImages/000005.jpg")
  empty = src[1]
  assert empty["boxes"].shape == (0, 4) and empty["image_id"] == 7
  ann = src.annotation(0)
  assert "image" not in ann and (ann["height"], ann["width"]) == (50, 100)


def test_image_sets_and_config(tmp_path):
  root = tmp_path / "VOC2007"
  for file_id in ("000001", "000002", "000003"):
    _write(root, file_id, (10, 10), [_object("cat", (2, 2, 8, 8))])
  (root / "ImageSets" / "Main").mkdir(parents=True)
  (root / "ImageSets" / "Main" / "trainval.txt").write_text("000003\n000001\n")
  src = voc_xml.load_voc_folder(str(root), CLASSES, image_set="trainval")
  assert [src.annotation(i)["image_id"] for i in range(len(src))] == [3, 1]
  with pytest.raises(ValueError, match="test.txt does not exist"):
    voc_xml.load_voc_folder(str(root), CLASSES, image_set="test")
  config = ssd300_voc.get_config()
  config.data.source = "voc_xml"
  config.class_names = CLASSES
  with pytest.raises(ValueError, match="data_dir must name"):
    voc_xml.from_config(config, "VOC2007:trainval")
  config.data.data_dir = str(tmp_path)
  assert len(voc_xml.from_config(config, "VOC2007:trainval")) == 2


_BAD = {
    "unknown_class": ([_object("horse", (2, 2, 8, 8))], True, "unknown class 'horse'"),
    "inverted": ([_object("cat", (8, 2, 3, 8))], True, "zero or negative size"),
    "outside": ([_object("cat", (2, 2, 30, 8))], True, "outside the 10x10 image"),
    "missing_image": ([_object("cat", (2, 2, 8, 8))], False, "image file not found"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_entries_raise_or_skip(tmp_path, case, caplog):
  objects, with_image, fragment = _BAD[case]
  _write(tmp_path, "000001", (10, 10), [_object("dog", (1, 1, 5, 5))])
  _write(tmp_path, "000002", (10, 10), objects, image=with_image)
  with pytest.raises(ValueError, match=fragment) as info:
    voc_xml.load_voc_folder(str(tmp_path), CLASSES)
  assert "000002" in str(info.value)
  with caplog.at_level(logging.WARNING):
    src = voc_xml.load_voc_folder(str(tmp_path), CLASSES, bad_records="skip")
  assert any(fragment in m and "000002" in m for m in caplog.messages)
  if case == "missing_image":
    assert len(src) == 1 and src.skipped["images"] == 1 and src.skipped["annotations"] == 1
  else:
    assert len(src) == 2 and src[1]["boxes"].shape == (0, 4)
    assert src.skipped == {"images": 0, "total_images": 2, "annotations": 1,
                           "total_annotations": 2}


def test_not_a_voc_folder(tmp_path):
  with pytest.raises(ValueError, match="no Annotations"):
    voc_xml.load_voc_folder(str(tmp_path), CLASSES)
