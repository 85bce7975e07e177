"""Tests for ssdjax.data.voc_xml: devkit 1-based coordinates, difficult flags, image sets, errors."""

import logging
import os

import numpy as np
import PIL.Image
import pytest

from tests.datasets import truncate, voc_devkit
from tests.helpers import ssd300_voc
from ssdjax.data import records, voc_xml

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
def test_bad_entries_raise_or_skip_the_whole_image(tmp_path, case, caplog):
  objects, with_image, fragment = _BAD[case]
  _write(tmp_path, "000001", (10, 10), [_object("dog", (1, 1, 5, 5))])
  # The bad object comes with a good one: kept without it, the image would train it as background.
  _write(tmp_path, "000002", (10, 10), [_object("dog", (1, 1, 4, 4))] + objects, image=with_image)
  with pytest.raises(ValueError, match=fragment) as info:
    voc_xml.load_voc_folder(str(tmp_path), CLASSES)
  assert "000002" in str(info.value)
  with caplog.at_level(logging.WARNING):
    src = voc_xml.load_voc_folder(str(tmp_path), CLASSES, bad_records="skip")
  per_entry = [m for m in caplog.messages if m.endswith("(config.data.bad_records='skip')")]
  assert len(per_entry) == 1 and fragment in per_entry[0] and "000002" in per_entry[0], per_entry
  assert "image dropped" in per_entry[0] or "image 000002 dropped" in per_entry[0]
  assert len(src) == 1 and src.annotation(0)["image_id"] == 1
  assert src.skipped == {"bad_entries": 1, "images": 1, "total_images": 2, "annotations": 2,
                         "total_annotations": 3}
  assert any(m.startswith(f"{tmp_path}: 1 bad entries") and "dropped 1 of 2 images and 2 of 3 "
             "objects" in m for m in caplog.messages)


def test_every_bad_object_is_reported(tmp_path, caplog):
  _write(tmp_path, "000001", (10, 10), [_object("horse", (2, 2, 8, 8)),
                                        _object("cat", (2, 2, 8, 8)),
                                        _object("cat", (8, 2, 3, 8))])
  with caplog.at_level(logging.WARNING):
    src = voc_xml.load_voc_folder(str(tmp_path), CLASSES, bad_records="skip")
  assert len(src) == 0 and src.skipped["bad_entries"] == 2
  per_entry = [m for m in caplog.messages if m.endswith("(config.data.bad_records='skip')")]
  assert len(per_entry) == 2
  assert "object 0: unknown class" in per_entry[0] and "object 2: bndbox" in per_entry[1]


def test_truncated_jpeg_is_found_up_front(tmp_path, caplog):
  root = tmp_path / "VOC2007"
  voc_devkit(str(root), {"trainval": ["000001", "000002", "000003"]})
  cut = os.path.join(root, "JPEGImages", "000002.jpg")
  # Noise, so that the cut falls in the pixel data and the header still reads.
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)).save(cut)
  truncate(cut)
  assert records.image_size(cut) == (50, 70)
  with pytest.raises(ValueError) as info:
    voc_xml.load_voc_folder(str(root), CLASSES, image_set="trainval")
  for fragment in ("Annotations/000002.xml", cut, "truncated image file", "FF D9",
                   "bad_records='skip'"):
    assert fragment in str(info.value), (fragment, str(info.value))
  with caplog.at_level(logging.WARNING):
    src = voc_xml.load_voc_folder(str(root), CLASSES, image_set="trainval", bad_records="skip")
  assert [src.annotation(i)["image_id"] for i in range(len(src))] == [1, 3]
  assert src.skipped == {"bad_entries": 1, "images": 1, "total_images": 3, "annotations": 2,
                         "total_annotations": 6}
  assert sum(cut in m and "image dropped" in m for m in caplog.messages) == 1
  assert any(m.startswith(f"{root}: 1 bad entries") for m in caplog.messages)
  assert all(src[i]["image"].shape == (50, 70, 3) for i in range(len(src)))


def test_not_a_voc_folder(tmp_path):
  with pytest.raises(ValueError, match="no Annotations"):
    voc_xml.load_voc_folder(str(tmp_path), CLASSES)
