r"""SSD300 (VGG16) on COCO with the settings of torchvision's ``ssd300_vgg16``, to load its weights.

  python -m ssdjax.convert --torchvision=ssd300_vgg16_coco-b556d3b4.pth --workdir=runs/tv_ssd300
  python -m ssdjax.main --config=configs/ssd300_coco_torchvision.py --workdir=runs/tv_ssd300

The first command writes a workdir with the converted weights as the step-0 checkpoint; the second
fine-tunes from it (or trains from scratch in an empty workdir); ``--mode=eval`` evaluates it.

Variants (``--config=configs/ssd300_coco_torchvision.py:<variant>``):

* ``""`` (default): torchvision's 91 outputs, indexed by COCO category id (1 = person, ...,
  90 = toothbrush); the 10 ids COCO does not use keep their unused outputs ("N/A" in torchvision,
  here named ``"N/A (<id>)"`` because class names must be unique). Gives torchvision's outputs
  exactly: for converting, predicting and exporting (data sets number their labels 1..80).
* ``"coco80"``: the 80 COCO classes as contiguous labels 1..80 with COCO's category ids, the
  numbering of the ``coco`` tfds data set and of COCO-JSON folders (``configs/ssd300_coco.py``).
  The converter keeps only those 81 columns of the classification head, so the softmax runs over
  81 instead of 91 logits.
  Evaluate and fine-tune on COCO with this variant.

Differences from ``configs/ssd300_coco.py`` (the paper / Caffe), all torchvision's defaults:
per-gt-best matching instead of bipartite, anchor sizes clamped in cxcywh (``clip="wh"``),
torchvision's mean and std, weight decay on every parameter (biases and the L2Norm scale too).
"""

from ssdjax import config as config_lib
from ssdjax.data import categories


def get_config(variant: str = ""):
  if variant not in ("", "coco80"):
    raise config_lib.ConfigError(
        f"unknown variant {variant!r} of configs/ssd300_coco_torchvision.py; valid: '' (91 "
        "outputs, COCO category ids) or 'coco80'")
  c = config_lib.load_file("ssd300_coco.py", relative_to=__file__)
  # The converted weights fix the outputs, so the class names are stated here and checked
  # against the data's when a run starts.
  if variant == "coco80":
    c.class_names = categories.COCO_CLASSES
    c.data.category_ids = categories.COCO_CATEGORY_IDS
  else:
    c.class_names = categories.COCO_V1_CLASSES  # label l = COCO category id l
  # torchvision's DefaultBoxGenerator(clip=True) clamps w and h, not the corners.
  c.anchors.clip = "wh"
  c.matching.strategy = "per_gt_best"  # torchvision's SSDMatcher
  # image_mean (0.48235, 0.45882, 0.40784) and std 1/255 on [0, 1] images = this mean on [0, 255].
  c.data.mean_rgb = (0.48235 * 255, 0.45882 * 255, 0.40784 * 255)
  c.data.std_rgb = (1.0, 1.0, 1.0)
  # SSD.postprocess_detections: score_thresh 0.01, topk_candidates 400, nms_thresh 0.45, 200 kept.
  c.postprocess.score_threshold = 0.01
  c.postprocess.top_k = 400
  c.postprocess.iou_threshold = 0.45
  c.postprocess.max_detections = 200
  # torch.optim.SGD(weight_decay=...) in torchvision's reference script decays every parameter.
  c.optimizer.decay_biases = True
  return c
