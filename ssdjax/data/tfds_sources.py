"""TFDS sources: prepared ``voc`` and ``coco`` data sets read with ``tfds.data_source`` (no tf.data).

A spec is ``"name[:version]:split"``, e.g. ``"voc/2007:train+validation"``, ``"coco/2017:train"``,
``"coco/2017:1.1.0:validation"``; ``config.data.data_dir`` is the tfds data_dir.

``tfds.data_source`` gives random access over the ``array_record`` files of a *prepared* data set and
works with grain. Reading needs no tensorflow: images come as encoded bytes
(``tfds.decode.SkipDecoding``) and are decoded here with PIL, so a broken image names its record.
Two steps of tfds do need tensorflow, so this module says so instead of failing deep inside tfds:

* Preparing (downloading and converting) a data set:
  ``pip install tensorflow`` then ``tfds build voc/2007 --data_dir=DIR --file_format=array_record``.
* Building some data set builders from their code: tfds's ``coco`` builder declares a feature as
  ``tf.int64``. When that fails, the prepared copy in ``data_dir`` is opened from its own files
  (dataset_info.json, features.json), which needs no tensorflow.

Feature mapping (tfds bbox is [ymin, xmin, ymax, xmax] normalized; labels start at 0):

* voc: objects/bbox -> xyxy, objects/label 0..19 -> 1..20, objects/is_difficult -> difficult;
  image_id = the digits of image/filename (000005.jpg -> 5, 2008_000002.jpg -> 2008000002).
* coco: objects/bbox -> xyxy, objects/label 0..79 -> 1..80, objects/is_crowd -> is_crowd,
  image/id -> image_id.

tensorflow_datasets is imported when a source is opened, never at ``import ssdjax.data``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from ssdjax.data import categories, records
from ssdjax.errors import UserError

_SPEC = re.compile(r"^(?P<name>[^:]+(?::\d+\.\d+\.\d+)?):(?P<split>.+)$")

_PREPARE_HINT = (
    "Prepare it once with tensorflow installed (tfds needs tensorflow to download and convert data "
    "sets, not to read them): `pip install tensorflow` then `tfds build {name} --data_dir={data_dir} "
    "--file_format=array_record`.")


def _objects(example, key, dtype) -> np.ndarray:
  """A field of the tfds ``objects`` sequence as an array (tfds gives a list of arrays or an array)."""
  return np.asarray(example["objects"][key], dtype)


def _boxes(example) -> np.ndarray:
  """objects/bbox [N, 4] ymin, xmin, ymax, xmax -> [N, 4] xyxy (both normalized)."""
  return _objects(example, "bbox", np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]


def voc_example_to_record(example: dict[str, Any], *, image, file: str,
                          index: int) -> records.Record:
  """A tfds ``voc`` example (image decoded separately, or None) -> record."""
  name = _as_str(example.get("image/filename", ""))
  return records.make_record(
      image, _boxes(example),
      _objects(example, "label", np.int64) + 1,
      difficult=_objects(example, "is_difficult", bool),
      image_id=records.image_id_from_name(name, index), file=f"{file} ({name})" if name else file)


def coco_example_to_record(example: dict[str, Any], *, image, file: str,
                           index: int) -> records.Record:
  """A tfds ``coco`` example (image decoded separately, or None) -> record."""
  del index  # COCO has its own image ids
  name = _as_str(example.get("image/filename", ""))
  return records.make_record(
      image, _boxes(example),
      _objects(example, "label", np.int64) + 1,
      is_crowd=_objects(example, "is_crowd", bool),
      image_id=int(example["image/id"]), file=f"{file} ({name})" if name else file)


FEATURE_MAPS: dict[str, Callable[..., records.Record]] = {
    "voc": voc_example_to_record,
    "coco": coco_example_to_record,
}


def parse_spec(spec: str) -> tuple[str, str]:
  """'voc/2007:train+validation' -> ('voc/2007', 'train+validation'); version kept in the name."""
  match = _SPEC.match(str(spec))
  if not match:
    raise ValueError(f"tfds spec {spec!r} must be 'name[:version]:split', e.g. "
                     "'voc/2007:train+validation' or 'coco/2017:1.1.0:validation'")
  return match["name"], match["split"]


def feature_map(name: str) -> Callable[..., records.Record]:
  family = name.split("/")[0].split(":")[0]
  if family not in FEATURE_MAPS:
    raise ValueError(f"tfds data set {name!r} has no feature mapping; valid data sets: "
                     f"{sorted(FEATURE_MAPS)}")
  return FEATURE_MAPS[family]


class TfdsSource:
  """Random-access records of one tfds split (``tfds.data_source``, decoded with PIL).

  Args:
    spec: "name[:version]:split".
    data_dir: the tfds data_dir holding the prepared data set (None = tfds's default).
    num_classes: labels must lie in 1..num_classes-1; None = background + the data set's label
      names.
    bad_records: "raise" or "skip": what to do with a bad box or an image that does not decode,
      checked when the record is read (reading every record up front would read the whole data
      set). "skip" drops the whole record (``__getitem__`` returns None) and logs each problem
      once per process; :meth:`annotation` of such a record has no boxes, so evaluation ignores
      it as it ignores an absent image.
  """

  def __init__(self, spec: str, data_dir: str | None, *, num_classes: int | None,
               bad_records: str):
    self.name, self.split = parse_spec(spec)
    self._map = feature_map(self.name)
    self.bad_records = records.check_bad_records_mode(bad_records)
    self._source = open_data_source(self.name, self.split, data_dir)
    self.num_classes = len(self.class_names()) + 1 if num_classes is None else int(num_classes)

  def __len__(self) -> int:
    return len(self._source)

  def class_names(self) -> tuple[str, ...]:
    """Names of labels 1..K, from the data set's ``objects/label`` feature."""
    info = getattr(self._source, "dataset_info", None)
    try:
      names = tuple(info.features["objects"]["label"].names)
    except (AttributeError, KeyError, TypeError) as e:
      raise UserError(f"tfds data set {self.name}: its dataset info has no objects/label names "
                      f"({e}); set config.class_names") from e
    if names == tuple(str(i) for i in range(len(names))):  # a ClassLabel without names
      known = {"voc": categories.VOC_CLASSES, "coco": categories.COCO_CLASSES}.get(
          self.name.split("/")[0])
      if known is not None and len(known) == len(names):
        return known
    return names

  def category_ids(self):
    """COCO's category ids for the COCO family (labels are contiguous 1..80), else None."""
    if self.name.split("/")[0] == "coco" and self.class_names() == categories.COCO_CLASSES:
      return categories.COCO_CATEGORY_IDS
    return None

  def _example(self, index: int):
    index = int(index)
    return self._source[index], f"tfds:{self.name}:{self.split}[{index}]"

  def __getitem__(self, index: int) -> records.Record | None:
    example, file = self._example(index)
    try:
      image = records.decode_image(example["image"], name=file)
    except ValueError as e:
      if self.bad_records == "raise":
        raise ValueError(f"{e}; set config.data.bad_records='skip' to drop it") from e
      records.warn_once(file, f"{e}; image dropped (config.data.bad_records='skip'; reported once "
                        "per process)")
      return None
    record = self._map(example, image=image, file=file, index=int(index))
    return records.clean_boxes(record, num_classes=self.num_classes, bad_records=self.bad_records)

  def annotation(self, index: int) -> records.Record:
    example, file = self._example(index)
    height, width = records.image_size(example["image"], name=file)
    record = self._map(example, image=None, file=file, index=int(index))
    cleaned = records.clean_boxes(record, num_classes=self.num_classes,
                                  bad_records=self.bad_records)
    if cleaned is None:  # dropped: without boxes it counts in no metric, as if absent
      cleaned = records.select_boxes(record, np.zeros(len(record["labels"]), bool))
    return {**cleaned, "height": height, "width": width}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}:{self.split}, {len(self)} records)"


def open_data_source(name: str, split: str, data_dir: str | None):
  """``tfds.data_source`` with undecoded images; clear errors when tfds needs tensorflow."""
  tfds = _import_tfds()
  decoders = {"image": tfds.decode.SkipDecoding()}
  hint = _PREPARE_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders)
  except ModuleNotFoundError as e:
    if "tensorflow" not in str(e):
      raise
    # tfds builds this builder from code that imports tensorflow; a prepared copy opens from its
    # own files without it.
    try:
      builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as not_found:
      raise ValueError(f"tfds data set {name!r} is not prepared in data_dir={data_dir} and its "
                       f"builder needs tensorflow ({e}). {hint}") from not_found
    return builder.as_data_source(split=split, decoders=decoders)
  except (NotImplementedError, AssertionError, FileNotFoundError, ValueError,
          tfds.core.DatasetNotFoundError) as e:
    raise ValueError(f"tfds data set {name!r} split {split!r} cannot be read from "
                     f"data_dir={data_dir}: {e}\n{hint}") from e


def from_config(config, spec: str) -> TfdsSource:
  """The source of one split; labels are checked against ``config.class_names`` once resolved,
  else against the data set's own label names."""
  names = config.class_names
  return TfdsSource(spec, config.data.data_dir,
                    num_classes=None if names is None else len(names) + 1,
                    bad_records=config.data.bad_records)


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("config.data.source='tfds' needs tensorflow-datasets: "
                     "`pip install tensorflow-datasets`") from e
  return tfds


def _as_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)
