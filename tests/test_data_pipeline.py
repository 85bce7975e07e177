"""Tests for ssdjax.data.pipeline (and the package surface): batches, state, sharding, eval."""

import io
import json
import logging
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from tests.helpers import synthetic as synthetic_config
import ssdjax.data as data
from ssdjax.data import pipeline, records


def _config(**synthetic):
  c = synthetic_config.get_config()
  c.image_size = 32
  c.train.batch_size = 4
  c.eval.batch_size = 4
  c.data.max_boxes = 3
  c.data.num_workers = 0
  c.data.synthetic.num_train = 12
  c.data.synthetic.num_val = 6
  c.data.synthetic.update(synthetic)
  return c


def _augment_off(c):
  for field in ("photometric", "expand", "random_crop", "hflip"):
    c.augment[field] = False
  return c


def _key(image):
  return hash(np.asarray(image).tobytes())


def test_import_hygiene():
  code = ("import sys, ssdjax; assert 'ssdjax.data' not in sys.modules; import ssdjax.data; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stderr


def test_train_batch_shapes_dtypes_padding_and_mask(caplog):
  c = _config(min_objects=2, max_objects=6, num_train=8)
  pipeline._warned_max_boxes = False  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    it = data.make_train_iterator(c, seed=0)
    batches = [next(it) for _ in range(4)]
  for b in batches:
    assert b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == np.float32
    assert b["gt_boxes"].shape == (4, 3, 4) and b["gt_boxes"].dtype == np.float32
    assert b["gt_labels"].shape == (4, 3) and b["gt_labels"].dtype == np.int32
    assert b["gt_mask"].shape == (4, 3) and b["gt_mask"].dtype == bool
    mask = b["gt_mask"]
    # Valid boxes first, then padding (label 0, zero box).
    assert (np.sort(mask, axis=1)[:, ::-1] == mask).all()
    assert (b["gt_labels"][mask] >= 1).all() and (b["gt_labels"][~mask] == 0).all()
    assert (b["gt_boxes"][~mask] == 0).all()
    valid = b["gt_boxes"][mask]
    assert ((valid >= 0) & (valid <= 1)).all() and (valid[:, 2:] > valid[:, :2]).all()
    # Normalized with the synthetic config's mean/std: pixels in [0, 255] -> [-2, 2].
    assert -2.0 <= b["images"].min() and b["images"].max() <= 2.0
  assert sum("more than config.data.max_boxes=3" in m for m in caplog.messages) == 1


def test_images_without_boxes():
  batch = next(data.make_train_iterator(_config(min_objects=0, max_objects=0), seed=0))
  assert not batch["gt_mask"].any() and (batch["gt_labels"] == 0).all()


def test_same_seed_same_batches_other_seed_other_batches():
  c = _config()
  a = [next(it) for it in [data.make_train_iterator(c, seed=3)] for _ in range(2)]
  it = data.make_train_iterator(c, seed=3)
  b = [next(it) for _ in range(2)]
  other = next(data.make_train_iterator(c, seed=4))
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["images"], other["images"])


def test_state_save_and_restore_gives_the_same_next_batches():
  it = data.make_train_iterator(_config(), seed=0)
  for _ in range(5):  # past the first epoch of 12 images
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = data.make_train_iterator(_config(), seed=0)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_worker_processes_resume_from_state():
  c = _config()
  c.data.num_workers = 1
  it = data.make_train_iterator(c, seed=0)
  try:
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it.set_state(state)
    for want in expected:
      got = next(it)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])
  finally:
    it.close()


def test_processes_read_their_rows_of_the_same_global_batches():
  c = _augment_off(_config(num_train=8))
  source = pipeline.train_source(c)
  all_keys = {_key(data.preprocess(source[i]["image"], c)) for i in range(8)}
  one = data.make_train_iterator(c, seed=0)
  single = [next(one) for _ in range(8)]  # 4 images per batch -> 4 epochs of 8 images
  parts = []
  for process in (0, 1):
    it = data.make_train_iterator(c, seed=0, process_index=process, process_count=2)
    parts.append([next(it) for _ in range(8)])
    assert parts[-1][0]["images"].shape[0] == 2
  for k, want in enumerate(single):
    for field in want:  # process 0 holds rows 0-1, process 1 rows 2-3 of the global batch
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][field], parts[1][k][field]]), want[field])
  keys = [_key(image) for b in single for image in b["images"]]
  epochs = [keys[i:i + 8] for i in range(0, 32, 8)]
  assert all(set(e) == all_keys for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1  # a new order in some epoch
  # A stream started at a step is the same stream from there (resuming with another count).
  late = data.make_train_iterator(c, seed=0, process_index=1, process_count=2, start_step=5)
  np.testing.assert_array_equal(next(late)["images"], parts[1][5]["images"])


def test_batch_size_and_process_errors():
  c = _config()
  with pytest.raises(ValueError, match="batch_size=4 must be a positive multiple of the process "
                                       "count 3"):
    data.make_train_iterator(c, seed=0, process_count=3)
  with pytest.raises(ValueError, match="process_index=2"):
    data.make_train_iterator(c, seed=0, process_index=2, process_count=2)
  c.data.source = "imagenet"
  with pytest.raises(ValueError, match=r"valid sources: \['coco_json', 'synthetic', 'tfds', "
                                       r"'voc_xml'\]"):
    data.make_train_iterator(c, seed=0)
  c = _config()
  c.data.bad_records = "ignore"
  with pytest.raises(ValueError, match="bad_records"):
    data.make_train_iterator(c, seed=0)
  with pytest.raises(ValueError, match="bad_records"):
    data.make_eval_batches(c, batch_size=2)  # checked at the call, not at the first batch
  for field, value, valid in (("expand_prob", 1.5, r"in \[0, 1\]"), ("expand_max_ratio", 0.5, ">= 1"),
                              ("crop_trials", 0, ">= 1")):
    c = _config()
    c.augment[field] = value
    with pytest.raises(ValueError, match=f"config.augment.{field}={value} must be {valid}"):
      data.make_train_iterator(c, seed=0)


def test_training_targets_drop_difficult_and_crowd_boxes():
  c = _augment_off(_config())
  record = records.make_record(
      np.zeros((10, 10, 3), np.uint8),
      [[0, 0, .5, .5], [.1, .1, .6, .6], [.2, .2, .7, .7], [.3, .3, .8, .8]], [1, 2, 3, 4],
      difficult=[False, True, False, False], is_crowd=[False, False, True, False],
      image_id=0, file="t")
  out = pipeline.TrainTransform(c)(record, np.random.default_rng(0))
  assert out["gt_labels"].tolist() == [1, 4, 0]
  np.testing.assert_allclose(out["gt_boxes"][1], [.3, .3, .8, .8])


def test_eval_batches_padding_ids_and_ground_truth():
  c = _config()
  batches = list(data.make_eval_batches(c, batch_size=4))
  assert len(batches) == 2
  for b in batches:
    assert b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == np.float32
    assert b["image_id"].dtype == np.int64 and b["valid"].dtype == bool
  assert batches[1]["valid"].tolist() == [True, True, False, False]
  assert (batches[1]["images"][2:] == 0).all()
  ids = np.concatenate([b["image_id"][b["valid"]] for b in batches]).tolist()
  gt = data.eval_ground_truth(c)
  assert ids == [g["image_id"] for g in gt] == list(range(6))
  val = pipeline.make_source(c, "val")
  for g, b_index in zip(gt, range(6)):
    r = val[b_index]
    np.testing.assert_array_equal(g["boxes"], r["boxes"])
    assert (g["height"], g["width"]) == (32, 32)
    assert set(g) == {"image_id", "height", "width", "boxes", "labels", "difficult", "is_crowd"}
  # Eval images are resized + normalized only (no augmentation).
  np.testing.assert_array_equal(batches[0]["images"][1], data.preprocess(val[1]["image"], c))
  c.eval.max_images = 5
  assert len(data.eval_ground_truth(c)) == 5
  assert sum(b["valid"].sum() for b in data.make_eval_batches(c, batch_size=4)) == 5


def test_preprocess_and_load_image(tmp_path):
  c = _config()
  image = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
  PIL.Image.fromarray(image).save(tmp_path / "x.png")
  loaded = data.load_image(tmp_path / "x.png")
  np.testing.assert_array_equal(loaded, image)
  out = data.preprocess(loaded, c)
  ref = np.asarray(PIL.Image.fromarray(image).resize((32, 32), PIL.Image.BILINEAR), np.float32)
  np.testing.assert_allclose(out, (ref - 127.5) / 64.0, rtol=1e-6)
  with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
    data.preprocess(image.astype(np.float32), c)
  with pytest.raises(ValueError, match=r"nope\.jpg: image file not found"):
    data.load_image(tmp_path / "nope.jpg")


def _coco_file(path, categories):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))


def _coco_config(tmp_path):
  c = synthetic_config.get_config()
  c.class_names = None
  c.data.source, c.data.data_dir = "coco_json", str(tmp_path)
  c.data.train, c.data.eval = ("train",), "val"
  return c


def test_resolve_classes_reads_names_and_ids_from_the_data(tmp_path):
  c = synthetic_config.get_config()
  c.class_names = None
  c.data.synthetic.num_classes = 3
  assert data.resolve_classes(c).class_names == ("circle", "square", "triangle")
  assert c.class_names is None  # a copy is resolved

  cats = [{"id": 9, "name": "b"}, {"id": 2, "name": "a"}]
  for split in ("train", "val"):
    _coco_file(tmp_path / "annotations" / f"{split}.json", cats)
    (tmp_path / "images" / split).mkdir(parents=True)
  c = _coco_config(tmp_path)
  r = data.resolve_classes(c)
  assert r.class_names == ("a", "b") and r.data.category_ids == (2, 9)
  assert [data.category_id(r, label) for label in (1, 2)] == [2, 9]
  assert data.category_id(synthetic_config.get_config(), 3) == 3  # no ids: labels are ids

  # A config that states names must agree with the data; so must every split.
  c.class_names = ("a", "c")
  with pytest.raises(ValueError, match=r"config.class_names \['a', 'c'\] differs .*\['a', 'b'\]"):
    data.resolve_classes(c)
  c.class_names = ("a", "b")
  assert data.resolve_classes(c).data.category_ids == (2, 9)
  c.class_names = None
  _coco_file(tmp_path / "annotations" / "val.json", cats + [{"id": 4, "name": "z"}])
  with pytest.raises(ValueError, match="splits disagree on their classes"):
    data.resolve_classes(c)


def test_skip_mode_images_that_fail_to_decode_are_left_out(tmp_path, caplog):
  (tmp_path / "images").mkdir()
  entries = []
  for image_id in range(1, 6):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(image_id).integers(0, 256, (16, 16, 3), np.uint8)
                       ).save(buf, format="PNG")
    payload = buf.getvalue()
    if image_id == 3:  # header fine, pixels cut off
      payload = payload[: len(payload) // 2]
    (tmp_path / "images" / f"{image_id}.png").write_bytes(payload)
    entries.append({"id": image_id, "file_name": f"{image_id}.png", "height": 16, "width": 16})
  (tmp_path / "annotations.json").write_text(json.dumps({
      "images": entries, "categories": [{"id": 1, "name": "thing"}],
      "annotations": [{"id": k, "image_id": k, "bbox": [2, 2, 8, 8], "category_id": 1}
                      for k in range(1, 6)]}))
  c = _augment_off(_config())
  c.data.source, c.data.data_dir, c.class_names = "coco_json", str(tmp_path), ("thing",)
  c.data.coco_json.annotation_file, c.data.coco_json.image_dir = "annotations.json", "images"
  c.data.train, c.data.eval = ("train",), "val"
  c.data.bad_records = "skip"
  with caplog.at_level(logging.WARNING):
    batches = list(data.make_eval_batches(c, batch_size=4))
  ids = np.concatenate([b["image_id"][b["valid"]] for b in batches]).tolist()
  assert ids == [1, 2, 4, 5]
  assert any("3.png" in m and "image dropped" in m for m in caplog.messages)
  it = data.make_train_iterator(c, seed=0)
  for _ in range(3):  # full batches of the 4 good images, each with its one box
    assert next(it)["gt_mask"].sum(axis=1).tolist() == [1, 1, 1, 1]
