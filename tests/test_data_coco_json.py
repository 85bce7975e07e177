"""Tests for ssdjax.data.coco_json: label mapping, validation in raise and skip modes, layouts."""

import io
import json
import logging
import os

import numpy as np
import PIL.Image
import pytest

from tests.datasets import coco_json_split, truncate
from tests.helpers import ssd300_voc
from ssdjax import data
from ssdjax.data import coco_json, records

# Category ids deliberately not contiguous nor sorted: labels follow the sorted ids 3, 7, 11.
_CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "bird"}]


def _write_png(path, height, width, value=0):
  image = np.full((height, width, 3), value, np.uint8)
  image[: height // 2, : width // 2] = 255 - value  # something to decode
  PIL.Image.fromarray(image).save(path, format="PNG")
  return image


def _folder(tmp_path, images, annotations, *, name="annotations.json", split_dir=None):
  (tmp_path / "images").mkdir(exist_ok=True)
  image_dir = tmp_path / "images" / split_dir if split_dir else tmp_path / "images"
  image_dir.mkdir(exist_ok=True)
  entries = []
  for image_id, (file_name, height, width, kind) in images.items():
    path = image_dir / file_name
    if kind == "good":
      _write_png(path, height, width, value=image_id)
    elif kind == "garbage":
      path.write_bytes(b"\x00garbage, not an image")
    elif kind == "truncated":
      buf = io.BytesIO()
      PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
                         ).save(buf, format="PNG")
      path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    entries.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
  ann_path = tmp_path / name
  ann_path.parent.mkdir(exist_ok=True)
  ann_path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                  "categories": _CATEGORIES}))
  return str(ann_path), str(image_dir)


def _ann(ann_id, image_id, bbox, category_id=3, iscrowd=0):
  return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id,
          "iscrowd": iscrowd, "area": 1.0}


_GOOD_IMAGES = {1: ("a.png", 40, 80, "good"), 2: ("b.png", 20, 10, "good"),
                3: ("empty.png", 8, 8, "good")}


def test_good_folder_maps_labels_boxes_and_crowd(tmp_path):
  ann_file, image_dir = _folder(tmp_path, _GOOD_IMAGES, [
      _ann(10, 1, [8, 4, 40, 20], category_id=7),
      _ann(11, 1, [0, 0, 80, 40], category_id=11, iscrowd=1),
      _ann(12, 2, [-0.5, 1, 10.6, 19], category_id=3),  # within 1 px: clipped, not rejected
  ])
  src = coco_json.CocoJsonSource(ann_file, image_dir, bad_records="raise")
  assert src.class_names() == ("cat", "dog", "bird") and src.category_ids() == (3, 7, 11)
  assert len(src) == 3  # the image without annotations is kept
  r1 = src[0]
  assert r1["image_id"] == 1 and r1["image"].shape == (40, 80, 3) and r1["image"].dtype == np.uint8
  np.testing.assert_allclose(r1["boxes"], [[8 / 80, 4 / 40, 48 / 80, 24 / 40], [0, 0, 1, 1]])
  assert r1["labels"].tolist() == [2, 3] and r1["is_crowd"].tolist() == [False, True]
  assert r1["file"].endswith("a.png")
  r2 = src[1]
  np.testing.assert_allclose(r2["boxes"], [[0, 1 / 20, 1, 1]], atol=1e-6)
  assert r2["labels"].tolist() == [1]
  r3 = src[2]
  assert r3["boxes"].shape == (0, 4) and r3["labels"].shape == (0,)
  ann = src.annotation(0)
  assert "image" not in ann and (ann["height"], ann["width"]) == (40, 80)
  np.testing.assert_array_equal(ann["boxes"], r1["boxes"])
  assert src.skipped == {"bad_entries": 0, "images": 0, "total_images": 3, "annotations": 0,
                         "total_annotations": 3}


# Each case: extra image entries, annotations, and what the raise-mode message must name.
_BAD_CASES = {
    "bbox_outside": ({}, [_ann(20, 1, [70, 5, 20, 10])], ["annotation id 20", "a.png", "outside"]),
    "zero_width": ({}, [_ann(21, 1, [5, 5, 0, 10])], ["annotation id 21", "zero or negative"]),
    "negative_height": ({}, [_ann(22, 1, [5, 5, 3, -1])], ["annotation id 22", "negative"]),
    "unknown_category": ({}, [_ann(23, 1, [5, 5, 3, 3], category_id=99)],
                         ["annotation id 23", "unknown category_id 99"]),
    "unknown_image": ({}, [_ann(24, 42, [5, 5, 3, 3])], ["annotation id 24", "unknown image_id 42"]),
    "bad_bbox_form": ({}, [_ann(25, 1, [5, 5, 3])], ["annotation id 25", "4 finite numbers"]),
    "missing_file": ({4: ("gone.png", 10, 10, "missing")}, [],
                     ["image id 4", "gone.png", "image file not found"]),
    "garbage_file": ({5: ("junk.png", 10, 10, "garbage")}, [],
                     ["image id 5", "junk.png", "cannot decode image"]),
    "size_mismatch": ({6: ("small.png", 99, 10, "good")}, [], ["image id 6", "small.png", "JSON says"]),
    "truncated_file": ({7: ("cut.png", 30, 30, "truncated")}, [],
                       ["image id 7", "cut.png", "truncated image file", "PNG IEND chunk"]),
}


@pytest.mark.parametrize("case", sorted(_BAD_CASES))
def test_raise_mode_names_file_and_entry(tmp_path, case):
  extra_images, annotations, fragments = _BAD_CASES[case]
  images = {**_GOOD_IMAGES, **extra_images}
  if case == "size_mismatch":  # the file on disk is 10x10, the JSON says 10 wide, 99 high
    ann_file, image_dir = _folder(tmp_path, images, [_ann(1, 1, [1, 1, 5, 5])] + annotations)
    _write_png(tmp_path / "images" / "small.png", 10, 10)
  else:
    ann_file, image_dir = _folder(tmp_path, images, [_ann(1, 1, [1, 1, 5, 5])] + annotations)
  with pytest.raises(ValueError) as info:
    coco_json.CocoJsonSource(ann_file, image_dir, bad_records="raise")
  message = str(info.value)
  assert ann_file in message and "bad_records='skip'" in message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


def test_skip_mode_drops_whole_images_counts_and_logs_every_entry(tmp_path, caplog):
  images = {**_GOOD_IMAGES, 4: ("gone.png", 10, 10, "missing"), 5: ("junk.png", 10, 10, "garbage"),
            6: ("cut.png", 30, 30, "truncated"), 7: ("fine.png", 10, 10, "good")}
  annotations = [
      _ann(1, 1, [1, 1, 5, 5]), _ann(2, 2, [1, 1, 5, 5]),            # good
      _ann(20, 1, [70, 5, 20, 10]),                                   # outside
      _ann(21, 1, [5, 5, 0, 10]),                                     # zero width
      _ann(23, 2, [5, 5, 3, 3], category_id=99),                      # unknown category
      _ann(24, 42, [5, 5, 3, 3]),                                     # unknown image
      _ann(30, 4, [1, 1, 2, 2]), _ann(31, 4, [2, 2, 2, 2]),           # on the missing image
      _ann(32, 5, [1, 1, 2, 2]),                                      # on the garbage image
      _ann(33, 6, [1, 1, 2, 2]),                                      # on the truncated image
      _ann(40, 7, [1, 1, 5, 5]),                                      # good, image kept
  ]
  ann_file, image_dir = _folder(tmp_path, images, annotations)
  with caplog.at_level(logging.WARNING):
    src = coco_json.CocoJsonSource(ann_file, image_dir, bad_records="skip")
  # Images 1 and 2 have good annotations too: kept without their bad objects they would train
  # those objects as background, so they go whole.
  assert [src.annotation(i)["image_id"] for i in range(len(src))] == [3, 7]
  assert [len(src.annotation(i)["labels"]) for i in range(len(src))] == [0, 1]
  assert src.skipped == {"bad_entries": 7, "images": 5, "total_images": 7, "annotations": 10,
                         "total_annotations": 11}
  per_entry = [m for m in caplog.messages if m.endswith("(config.data.bad_records='skip')")]
  assert len(per_entry) == 7  # 4 annotations + 3 image files, each once
  for fragment, dropped in (("annotation id 20", "image id 1 dropped with all its annotations"),
                            ("annotation id 21", "image id 1 dropped"),
                            ("annotation id 23", "image id 2 dropped with all its annotations"),
                            ("annotation id 24", "annotation dropped"),
                            ("gone.png", "image dropped"), ("junk.png", "image dropped"),
                            ("cut.png: truncated image file", "image dropped")):
    hits = [m for m in per_entry if fragment in m]
    assert len(hits) == 1 and dropped in hits[0], (fragment, hits)
  summary = [m for m in caplog.messages if "bad entries" in m]
  assert len(summary) == 1 and summary[0].startswith(
      f"{ann_file}: 7 bad entries, each logged above; dropped 5 of 7 images and 10 of 11 "
      "annotations"), summary


def test_truncated_jpeg_is_found_up_front(tmp_path, caplog):
  cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
  ann_file, image_dir = str(tmp_path / "train.json"), str(tmp_path / "images")
  coco_json_split(ann_file, image_dir, cats, num_images=4)
  cut = os.path.join(image_dir, "img_0_2.jpg")  # image id 3
  truncate(cut)
  assert records.image_size(cut) == (48, 64)  # the header still reads
  with pytest.raises(ValueError) as info:
    coco_json.CocoJsonSource(ann_file, image_dir, bad_records="raise")
  for fragment in (ann_file, "image id 3", cut, "truncated image file", "FF D9",
                   "bad_records='skip'"):
    assert fragment in str(info.value), (fragment, str(info.value))
  with caplog.at_level(logging.WARNING):
    src = coco_json.CocoJsonSource(ann_file, image_dir, bad_records="skip")
  assert [src.annotation(i)["image_id"] for i in range(len(src))] == [1, 2, 4]
  assert src.skipped == {"bad_entries": 1, "images": 1, "total_images": 4, "annotations": 2,
                         "total_annotations": 8}
  assert sum(cut in m and "image dropped" in m for m in caplog.messages) == 1
  assert any(m.startswith(f"{ann_file}: 1 bad entries") for m in caplog.messages)
  assert all(src[i]["image"].shape == (48, 64, 3) for i in range(len(src)))


def test_decode_failure_when_drawn_is_logged_once(tmp_path, caplog):
  # A file that breaks after the source checked it (replaced while training runs, say).
  ann_file, image_dir = _folder(tmp_path, _GOOD_IMAGES, [_ann(1, 1, [1, 1, 5, 5])])
  for mode in ("raise", "skip"):
    src = coco_json.CocoJsonSource(ann_file, image_dir, bad_records=mode)
    assert len(src) == 3
    truncate(os.path.join(image_dir, "a.png"), keep=0.5)
    if mode == "raise":
      with pytest.raises(ValueError, match=r"a\.png: cannot decode image.*image id 1"):
        src[0]  # pylint: disable=pointless-statement
      _write_png(tmp_path / "images" / "a.png", 40, 80, value=1)
  with caplog.at_level(logging.WARNING):
    assert [src[0] for _ in range(3)] == [None] * 3  # three epochs
  assert src[1]["image_id"] == 2
  dropped = [m for m in caplog.messages if "a.png" in m]
  assert len(dropped) == 1 and "image dropped" in dropped[0] and "once per process" in dropped[0]


def test_structural_errors_always_raise(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    coco_json.CocoJsonSource(str(path), str(tmp_path), bad_records="skip")
  path.write_text(json.dumps({"images": [], "annotations": [], "categories": [
      {"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}))
  with pytest.raises(ValueError, match="category id 1 appears twice"):
    coco_json.CocoJsonSource(str(path), str(tmp_path), bad_records="skip")
  path.write_text(json.dumps({"images": [], "annotations": []}))
  with pytest.raises(ValueError, match="'categories' must be a non-empty list"):
    coco_json.CocoJsonSource(str(path), str(tmp_path), bad_records="skip")


def test_folder_layouts_and_config(tmp_path):
  config = ssd300_voc.get_config()
  config.data.source = "coco_json"
  with pytest.raises(ValueError, match="data_dir must name"):
    coco_json.from_config(config, "train")
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"annotations/train\.json not found .*annotation_file="):
    coco_json.from_config(config, "train")
  # The default layout: one file per split, images in images/<split>/.
  _folder(tmp_path, {1: ("a.png", 10, 10, "good")}, [_ann(1, 1, [1, 1, 5, 5])],
          name="annotations/train.json", split_dir="train")
  assert coco_json.paths(config, "train") == (
      str(tmp_path / "annotations" / "train.json"), str(tmp_path / "images" / "train"))
  src = coco_json.from_config(config, "train")
  assert len(src) == 1 and src[0]["labels"].tolist() == [1]
  assert coco_json.from_config(config, "train") is src  # parsed once per process
  # Nothing is guessed: a single annotations.json needs the fields that say so.
  _folder(tmp_path, {2: ("b.png", 10, 10, "good")}, [], name="annotations.json")
  with pytest.raises(ValueError, match="annotations/val.json not found"):
    coco_json.from_config(config, "val")
  config.data.coco_json.annotation_file = "annotations.json"
  config.data.coco_json.image_dir = "images"
  assert coco_json.paths(config, "val") == (
      str(tmp_path / "annotations.json"), str(tmp_path / "images"))
  assert coco_json.from_config(config, "val")[0]["image_id"] == 2
  config.data.coco_json.image_dir = "pictures/{split}"
  with pytest.raises(ValueError, match="image folder .*pictures/val not found"):
    coco_json.from_config(config, "val")


def _write_split(folder, annotation_file, image_dir, file_names, categories):
  """A COCO-JSON split: 10x10 PNGs and one 4x4 box of the first category per image."""
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.dirname(annotation_file), exist_ok=True)
  images = []
  for k, name in enumerate(file_names, start=1):
    PIL.Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(os.path.join(image_dir, name))
    images.append({"id": k, "file_name": name, "height": 10, "width": 10})
  anns = [{"id": k, "image_id": k, "bbox": [2, 2, 4, 4], "category_id": categories[0]["id"],
           "area": 16, "iscrowd": 0} for k in range(1, len(images) + 1)]
  with open(annotation_file, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": categories}, f)


@pytest.mark.parametrize("layout", ["coco2017", "one_folder_per_split"])
def test_real_world_layouts_load_by_config_fields(tmp_path, layout):
  cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
  config = ssd300_voc.get_config()
  config.class_names = None
  config.data.source, config.data.data_dir = "coco_json", str(tmp_path)
  if layout == "coco2017":  # the COCO 2017 release
    for split in ("train2017", "val2017"):
      _write_split(tmp_path, str(tmp_path / "annotations" / f"instances_{split}.json"),
                   str(tmp_path / split), [f"0000{split[0]}1.jpg"], cats)
    config.data.train, config.data.eval = ("train2017",), "val2017"
    config.data.coco_json.annotation_file = "annotations/instances_{split}.json"
    config.data.coco_json.image_dir = "{split}"
  else:  # an annotation tool's export: each split folder holds its file and images
    for split in ("train", "valid"):
      _write_split(tmp_path, str(tmp_path / split / "_annotations.coco.json"),
                   str(tmp_path / split), ["x.jpg", "y.jpg"], cats)
    config.data.train, config.data.eval = ("train",), "valid"
    config.data.coco_json.annotation_file = "{split}/_annotations.coco.json"
    config.data.coco_json.image_dir = "{split}"
  resolved = data.resolve_classes(config)
  assert resolved.class_names == ("person", "dog") and resolved.data.category_ids == (1, 18)
  source = coco_json.from_config(resolved, config.data.eval)
  assert len(source) >= 1 and source[0]["labels"].tolist() == [2]  # dog: the second id
