"""Input pipelines for SSD: data sources, SSD augmentations and grain batching (host side, NumPy).

Sources (``config.data.source``, :data:`SOURCES`), all random access (``len`` + ``[i]``) returning
records (:mod:`ssdjax.data.records`):

* ``"synthetic"``: procedural shapes, generated on demand (:mod:`ssdjax.data.synthetic`).
* ``"coco_json"``: a folder with COCO-format annotations (:mod:`ssdjax.data.coco_json`).
* ``"voc_xml"``: PASCAL VOC devkit folders (:mod:`ssdjax.data.voc_xml`).
* ``"tfds"``: prepared ``voc`` / ``coco`` via ``tfds.data_source`` (:mod:`ssdjax.data.tfds_sources`);
  tensorflow_datasets is imported only when such a source is opened, and tensorflow never.

Entry points: :func:`resolve_classes`, :func:`make_train_iterator`, :func:`make_eval_batches`,
:func:`eval_ground_truth`, and for prediction :func:`load_image` + :func:`preprocess`.
"""

from ssdjax.data.pipeline import (
    SOURCES,
    augment_on_device,
    category_id,
    eval_ground_truth,
    make_eval_batches,
    make_source,
    make_train_iterator,
    preprocess,
    resolve_classes,
)
from ssdjax.data.records import load_image
from ssdjax.data.voc_xml import load_voc_folder

__all__ = [
    "SOURCES",
    "augment_on_device",
    "category_id",
    "eval_ground_truth",
    "load_image",
    "load_voc_folder",
    "make_eval_batches",
    "make_source",
    "make_train_iterator",
    "preprocess",
    "resolve_classes",
]
