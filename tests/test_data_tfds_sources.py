"""Tests for ssdjax.data.tfds_sources, without tensorflow.

The data sets here are real prepared tfds data sets, written into tmp_path the way ``tfds build``
lays them out (array_record shards + dataset_info.json + features.json), with each example
serialized by tfds's own VOC / COCO feature specs; ``tfds.data_source`` then reads them through
tfds's real code. ``tfds.testing.mock_data`` covers the split-spec plumbing, with examples built
by hand: its random examples cannot be used without tensorflow, because the source asks for
undecoded images and the mock encodes its random images with tensorflow.
"""

import io
import logging
import os
import sys
import types

from array_record.python import array_record_module
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.object_detection import coco as tfds_coco

from tests.datasets import coco_example as _coco_example
from tests.datasets import jpeg as _jpeg
from tests.datasets import prepare as _prepare
from tests.datasets import voc_example as _voc_example
from tests.helpers import ssd300_coco, ssd300_voc
from ssdjax.data import pipeline, tfds_sources


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _prepare(tfds.builder("voc/2007", data_dir=data_dir, file_format="array_record"), {
      "train": [_voc_example("000005.jpg", [((0.1, 0.2, 0.5, 0.6), 0, False),
                                            ((0.0, 0.0, 1.0, 1.0), 19, True)]),
                _voc_example("000007.jpg", [])],
      "validation": [_voc_example("000009.jpg", [((0.3, 0.1, 0.4, 0.9), 14, False)],
                                  size=(20, 16))],
      "test": [_voc_example("000001.jpg", [((0.5, 0.5, 0.7, 0.6), 3, True)])],
  })
  _prepare(tfds.builder("voc/2012", data_dir=data_dir, file_format="array_record"), {
      "train": [_voc_example("2008_000002.jpg", [((0.2, 0.2, 0.8, 0.8), 6, False)])],
      # A zero-width box, which tfds's BBox feature lets through.
      "validation": [_voc_example("2008_000010.jpg", [((0.2, 0.2, 0.8, 0.8), 6, False),
                                                      ((0.1, 0.5, 0.3, 0.5), 2, False)])],
  })
  return data_dir


def _voc_config(data_dir):
  config = ssd300_voc.get_config()
  config.data.data_dir = data_dir
  config.data.train = ("voc/2007:train+validation", "voc/2012:train")
  config.data.eval = "voc/2007:test"
  return config


def test_voc_through_tfds_data_source(voc_dir):
  config = _voc_config(voc_dir)
  src = pipeline.train_source(config)  # 07 train+validation, then 12 train
  assert len(src) == 4
  r = src[0]
  np.testing.assert_allclose(r["boxes"], [[0.2, 0.1, 0.6, 0.5], [0, 0, 1, 1]], atol=1e-6)
  assert r["labels"].tolist() == [1, 20] and r["labels"].dtype == np.int32
  assert r["difficult"].tolist() == [False, True] and r["is_crowd"].tolist() == [False, False]
  assert r["image_id"] == 5 and r["image"].shape == (30, 40, 3) and r["image"].dtype == np.uint8
  assert "voc/2007:train+validation[0]" in r["file"] and "000005.jpg" in r["file"]
  assert src[1]["boxes"].shape == (0, 4) and src[1]["image_id"] == 7
  assert src[2]["image_id"] == 9 and src[2]["labels"].tolist() == [15]
  assert src[3]["image_id"] == 2008000002 and src[3]["labels"].tolist() == [7]
  ann = src.annotation(2)
  assert "image" not in ann and (ann["height"], ann["width"]) == (20, 16)
  gt = pipeline.eval_ground_truth(config)
  assert len(gt) == 1 and gt[0]["image_id"] == 1 and gt[0]["difficult"].tolist() == [True]
  np.testing.assert_allclose(gt[0]["boxes"], [[0.5, 0.5, 0.6, 0.7]], atol=1e-6)
  assert "tensorflow" not in sys.modules


def test_training_batches_from_tfds_drop_difficult(voc_dir):
  config = _voc_config(voc_dir)
  config.data.num_workers = 0
  config.train.batch_size = 4
  config.image_size = 32
  config.data.max_boxes = 3
  for field in ("photometric", "expand", "random_crop", "hflip"):
    config.augment[field] = False
  batch = next(pipeline.make_train_iterator(config, seed=0))
  assert batch["images"].shape == (4, 32, 32, 3)
  # One epoch holds the 4 images; the difficult box of 000005.jpg is not a training target.
  assert sorted(batch["gt_mask"].sum(1).tolist()) == [0, 1, 1, 1]
  assert sorted(batch["gt_labels"][batch["gt_mask"]].tolist()) == [1, 7, 15]


def test_bad_boxes_raise_or_drop_the_whole_record(voc_dir, caplog):
  config = _voc_config(voc_dir)
  src = pipeline.make_source(config, "voc/2012:validation")
  with pytest.raises(ValueError, match=r"(?s)voc/2012:validation\[0\].*2008_000010.jpg.*object 1.*"
                                       r"zero area.*bad_records='skip'"):
    src[0]  # pylint: disable=pointless-statement
  config.data.bad_records = "skip"
  src = pipeline.make_source(config, "voc/2012:validation")
  with caplog.at_level(logging.WARNING):
    # Its good box (label 7) goes too: kept alone it would train the bad object as background.
    assert [src[0] for _ in range(3)] == [None] * 3  # three epochs, logged once
    ann = src.annotation(0)
  assert ann["boxes"].shape == (0, 4) and (ann["height"], ann["width"]) == (30, 40)
  logged = [m for m in caplog.messages if "2008_000010.jpg" in m]
  assert len(logged) == 1 and "object 1" in logged[0] and "image dropped" in logged[0]


def test_coco_prepared_copy_opens_without_tensorflow(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  # tfds's coco builder declares image/id as tf.int64: building it from code needs tensorflow.
  # Preparing here stands in np.int64, which is what tf.int64 means to tfds.
  with monkeypatch.context() as patch:
    patch.setattr(tfds_coco, "tf", types.SimpleNamespace(int64=np.int64))
    _prepare(tfds.builder("coco/2017", data_dir=data_dir, file_format="array_record"), {
        "validation": [_coco_example(139, [((0.1, 0.2, 0.3, 0.4), 0, False),
                                           ((0.0, 0.0, 0.9, 0.5), 79, True)]),
                       _coco_example(285, [])]})
  assert "tensorflow" not in sys.modules
  config = ssd300_coco.get_config()
  config.data.data_dir = data_dir
  src = pipeline.make_source(config, "coco/2017:validation")
  assert len(src) == 2
  r = src[0]
  np.testing.assert_allclose(r["boxes"], [[0.2, 0.1, 0.4, 0.3], [0, 0, 0.5, 0.9]], atol=1e-6)
  assert r["labels"].tolist() == [1, 80] and r["is_crowd"].tolist() == [False, True]
  assert r["difficult"].tolist() == [False, False] and r["image_id"] == 139
  assert src[1]["image_id"] == 285 and src[1]["boxes"].shape == (0, 4)
  # An explicit version reads the files directly.
  assert len(pipeline.make_source(config, "coco/2017:1.1.0:validation")) == 2
  assert "tensorflow" not in sys.modules


def test_unprepared_data_sets_say_how_to_prepare(tmp_path):
  config = ssd300_voc.get_config()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"(?s)voc/2007.*pip install tensorflow.*tfds build voc/2007 "
                                       r"--data_dir=.*--file_format=array_record"):
    pipeline.make_source(config, "voc/2007:test")
  with pytest.raises(ValueError, match=r"(?s)'coco/2017' is not prepared.*needs tensorflow.*tfds build"):
    pipeline.make_source(config, "coco/2017:train")
  with pytest.raises(ValueError, match="name\\[:version\\]:split"):
    pipeline.make_source(config, "voc/2007")
  with pytest.raises(ValueError, match=r"no feature mapping; valid data sets: \['coco', 'voc'\]"):
    pipeline.make_source(config, "mnist:train")


def test_mock_data_split_plumbing():
  calls = []

  def as_data_source(builder, split, decoders=None, deserialize_method=None):
    del deserialize_method
    calls.append((builder.name, builder.builder_config.name, split))
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    # Shaped like tfds's VOC examples read with SkipDecoding: encoded image, per-field object lists.
    example = {"image": _jpeg(8, 8, 10), "image/filename": f"{split}.jpg",
               "labels": np.array([2]), "labels_no_difficult": np.array([2]),
               "objects": {"bbox": [np.array([0.1, 0.2, 0.3, 0.4], np.float32)],
                           "label": [np.int64(2)], "is_difficult": [np.False_],
                           "is_truncated": [np.False_], "pose": [np.int64(0)]}}
    return [example] * (3 if builder.builder_config.name == "2007" else 2)

  config = ssd300_voc.get_config()
  config.data.data_dir = "/nonexistent"
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    src = pipeline.train_source(config)
  assert calls == [("voc", "2007", "train+validation"), ("voc", "2012", "train+validation")]
  assert len(src) == 5
  np.testing.assert_allclose(src[4]["boxes"], [[0.2, 0.1, 0.4, 0.3]], atol=1e-6)
  assert src[4]["labels"].tolist() == [3]


def test_feature_maps_on_hand_built_examples():
  # Objects as tfds's numpy reader returns them (lists of per-object arrays) and as stacked arrays.
  voc = {"image/filename": b"000123.jpg",
         "objects": {"bbox": [np.array([0.0, 0.5, 0.25, 1.0], np.float32)], "label": [np.int64(0)],
                     "is_difficult": [np.True_]}}
  r = tfds_sources.voc_example_to_record(voc, image=None, file="f", index=4)
  np.testing.assert_allclose(r["boxes"], [[0.5, 0.0, 1.0, 0.25]])
  assert r["labels"].tolist() == [1] and r["difficult"].tolist() == [True] and r["image_id"] == 123
  coco = {"image/filename": "x.jpg", "image/id": np.int64(77),
          "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64),
                      "is_crowd": np.zeros((0,), bool)}}
  r = tfds_sources.coco_example_to_record(coco, image=None, file="f", index=0)
  assert r["boxes"].shape == (0, 4) and r["image_id"] == 77
  assert tfds_sources.parse_spec("coco/2017:1.1.0:train[:10%]") == ("coco/2017:1.1.0", "train[:10%]")


def test_class_names_and_category_ids_come_from_the_tfds_features(voc_dir, tmp_path):
  from ssdjax import data  # pylint: disable=g-import-not-at-top
  from ssdjax.data import categories  # pylint: disable=g-import-not-at-top
  from tests.datasets import prepare_coco  # pylint: disable=g-import-not-at-top

  config = _voc_config(voc_dir)
  config.class_names = None
  resolved = data.resolve_classes(config)
  assert resolved.class_names == categories.VOC_CLASSES and resolved.data.category_ids is None
  prepare_coco(str(tmp_path), {"train": [_coco_example(1, [((0.1, 0.1, 0.5, 0.5), 3, False)])],
                               "validation": [_coco_example(2, [])]})
  config = ssd300_coco.get_config()
  config.class_names, config.data.data_dir = None, str(tmp_path)
  resolved = data.resolve_classes(config)
  assert resolved.class_names == categories.COCO_CLASSES
  assert resolved.data.category_ids == categories.COCO_CATEGORY_IDS
  assert data.category_id(resolved, 12) == 13 and data.category_id(resolved, 80) == 90
