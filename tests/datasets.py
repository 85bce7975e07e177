"""Small data sets in the real formats, written by the tests (and the docs tests) into a folder.

* :func:`prepare` writes a real prepared tfds data set (array_record shards, dataset_info.json,
  features.json) with tfds's own feature specs, so ``tfds.data_source`` reads it through tfds's
  code, no tensorflow needed; :func:`voc_example` / :func:`coco_example` build its examples.
* :func:`coco_json_split` writes a COCO-JSON annotation file and its images; :func:`salt_coco_json`
  adds one bad annotation to some of its images.
* :func:`voc_devkit` writes a PASCAL VOC devkit year folder (Annotations, JPEGImages, ImageSets).
* :func:`truncate` cuts a file short, as an interrupted copy or download does.
"""

import io
import json
import os
import unittest.mock

from array_record.python import array_record_module
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

def jpeg(height, width, value):
  buf = io.BytesIO()
  PIL.Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def prepare(builder, splits):
  """Writes ``{split: [example]}`` as a prepared array_record data set of ``builder``."""
  os.makedirs(builder.data_dir, exist_ok=True)
  features = builder.info.features
  infos = []
  for split, examples in splits.items():
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name,
                                             split=split, filetype_suffix="array_record")
    writer = array_record_module.ArrayRecordWriter(
        os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
    for example in examples:
      writer.write(features.serialize_example(features.encode_example(example)))
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0,
                                     filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(builder.data_dir)


def voc_example(file_name, objects, size=(30, 40), value=50):
  """objects: [(ymin, xmin, ymax, xmax), label 0..19, difficult]."""
  return {
      "image": jpeg(*size, value), "image/filename": file_name,
      "labels": sorted({o[1] for o in objects}),
      "labels_no_difficult": sorted({o[1] for o in objects if not o[2]}),
      "objects": [{"bbox": tfds.features.BBox(*box), "label": label, "is_difficult": difficult,
                   "is_truncated": False, "pose": "frontal"} for box, label, difficult in objects],
  }


def coco_example(image_id, objects):
  """objects: [(ymin, xmin, ymax, xmax), label 0..79, is_crowd]."""
  return {"image": jpeg(24, 32, 90), "image/filename": f"{image_id:012d}.jpg",
          "image/id": image_id,
          "objects": [{"id": 100 + k, "area": 10, "bbox": tfds.features.BBox(*box), "label": label,
                       "is_crowd": crowd} for k, (box, label, crowd) in enumerate(objects)]}




def prepare_coco(data_dir, splits):
  """:func:`prepare` for tfds's ``coco/2017``, whose builder code names ``tf.int64``: without
  tensorflow that stands in as ``np.int64``, which is what it means to tfds."""
  from tensorflow_datasets.object_detection import coco as tfds_coco  # pylint: disable=g-import-not-at-top

  import types  # pylint: disable=g-import-not-at-top
  from ssdjax.data.categories import COCO_CLASSES  # pylint: disable=g-import-not-at-top

  with unittest.mock.patch.object(tfds_coco, "tf", types.SimpleNamespace(int64=np.int64)):
    builder = tfds.builder("coco/2017", data_dir=data_dir, file_format="array_record")
    # tfds's builder names the labels from the annotation files it converts.
    builder.info.features["objects"]["label"].names = list(COCO_CLASSES)
    prepare(builder, splits)


def mock_voc(data_dir):
  """voc/2007 (train, validation, test) and voc/2012 (train, validation), a few images each."""
  box = lambda label, difficult=False: ((0.2, 0.1, 0.7, 0.6), label, difficult)
  for year, splits in (("2007", ("train", "validation", "test")), ("2012", ("train", "validation"))):
    prepare(tfds.builder(f"voc/{year}", data_dir=data_dir, file_format="array_record"), {
        split: [voc_example(f"{year}_{k:06d}.jpg", [box((k * 7) % 20), box(14, k == 1)],
                            size=(60, 80), value=40 + 30 * k) for k in range(3)]
        for split in splits})


def coco_json_split(annotation_file, image_dir, categories, *, num_images=3, size=(48, 64),
                    seed=0):
    """A COCO-JSON split: ``num_images`` noise images, one box of each category per image.

    Args:
      annotation_file: path of the JSON file to write.
      image_dir: folder for the images (``file_name`` is relative to it).
      categories: [{"id", "name"}], ids in any order.
    """
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(annotation_file)), exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns = [], []
    for k in range(num_images):
      name = f"img_{seed}_{k}.jpg"
      PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
          os.path.join(image_dir, name))
      images.append({"id": k + 1, "file_name": name, "height": h, "width": w})
      for j, cat in enumerate(categories):
        x, y = 4 + 20 * j % (w - 20), 4 + 10 * k % (h - 20)
        anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cat["id"],
                     "bbox": [x, y, 16, 14], "area": 224, "iscrowd": 0})
    with open(annotation_file, "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": categories}, f)


def voc_devkit(root, image_sets, class_names=("cat", "dog"), size=(50, 70)):
  """A VOC year folder: ``image_sets`` {name: [ids]}, one object per class in every image."""
  for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  h, w = size
  for name, ids in image_sets.items():
    with open(os.path.join(root, "ImageSets", "Main", f"{name}.txt"), "w") as f:
      f.write("".join(f"{i}\n" for i in ids))
    for i in ids:
      PIL.Image.fromarray(np.full((h, w, 3), 80, np.uint8)).save(
          os.path.join(root, "JPEGImages", f"{i}.jpg"))
      objects = "".join(
          f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{5 + 25 * j}</xmin>"
          f"<ymin>5</ymin><xmax>{25 + 25 * j}</xmax><ymax>30</ymax></bndbox></object>"
          for j, c in enumerate(class_names))
      with open(os.path.join(root, "Annotations", f"{i}.xml"), "w") as f:
        f.write(f"<annotation><filename>{i}.jpg</filename><size><width>{w}</width>"
                f"<height>{h}</height><depth>3</depth></size>{objects}</annotation>")


# The bad annotations salt_coco_json adds, in turn: [x, y, w, h] bbox (pixels) and category id
# (None: the image's first category); each is one problem the source must report.
_SALT = (([-30, 2, 10, 10], None),   # outside the image by more than 1 pixel
         ([5, 5, 0, 8], None),       # zero width
         ([2, 2, 8, 8], 999))        # unknown category


def salt_coco_json(annotation_file, image_ids):
  """Adds one bad annotation to each of ``image_ids`` (cycling through :data:`_SALT`), after the
  image's good annotations; returns the ids of the added annotations."""
  with open(annotation_file) as f:
    data = json.load(f)
  next_id = max([a["id"] for a in data["annotations"]], default=0) + 1
  added = []
  for k, image_id in enumerate(image_ids):
    bbox, category_id = _SALT[k % len(_SALT)]
    data["annotations"].append({
        "id": next_id, "image_id": image_id, "bbox": bbox, "area": 1, "iscrowd": 0,
        "category_id": data["categories"][0]["id"] if category_id is None else category_id})
    added.append(next_id)
    next_id += 1
  with open(annotation_file, "w") as f:
    json.dump(data, f)
  return added


def truncate(path, keep=0.6):
  """Cuts a file to its first ``keep`` fraction (for an image of noise the header still reads)."""
  with open(path, "rb") as f:
    payload = f.read()
  with open(path, "wb") as f:
    f.write(payload[: int(len(payload) * keep)])
