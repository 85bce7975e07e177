r"""SSD300 (VGG16) on COCO with the settings of torchvision's ``ssd300_vgg16``, to load its weights.

  python -m ssdjax.convert --torchvision=ssd300_vgg16_coco-b556d3b4.pth --workdir=runs/tv_ssd300
  python -m ssdjax.main --config=configs/ssd300_coco_torchvision.py --workdir=runs/tv_ssd300

The first command writes a workdir with the converted weights as the step-0 checkpoint; the second
fine-tunes from it (or trains from scratch in an empty workdir); ``--mode=eval`` evaluates it.

Variants (``--config=configs/ssd300_coco_torchvision.py:<variant>``):

* ``""`` (default): torchvision's 91 outputs, indexed by COCO category id (1 = person, ...,
  90 = toothbrush); the 10 ids COCO does not use keep their unused outputs ("N/A" in torchvision,
  here named ``"N/A (<id>)"`` because class names must be unique). Gives torchvision's outputs
  exactly. Use it with data whose labels are COCO category ids.
* ``"coco80"``: the 80 COCO classes as contiguous labels 1..80, the numbering of the ``coco``
  tfds data set and of COCO-JSON folders (``configs/ssd300_coco.py``). The converter keeps only
  those 81 columns of the classification head, so the softmax runs over 81 instead of 91 logits.
  Evaluate and fine-tune on COCO with this variant.

Differences from ``configs/ssd300_coco.py`` (the paper / Caffe), all torchvision's defaults:
per-gt-best matching instead of bipartite, anchor sizes clamped in cxcywh (``clip="wh"``),
torchvision's mean and std, weight decay on every parameter (biases and the L2Norm scale too).
"""

import ml_collections

from configs import ssd300_coco

# torchvision.models._meta._COCO_CATEGORIES: the name of each of ssd300_vgg16's 91 outputs.
TORCHVISION_COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
    "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")

# Foreground names of the 91-output model: label l = COCO category id l.
COCO_V1_CLASSES = tuple(name if name != "N/A" else f"N/A ({i})"
                        for i, name in enumerate(TORCHVISION_COCO_CATEGORIES))[1:]


def get_config(variant: str = ""):
  if variant not in ("", "coco80"):
    raise ValueError(f"unknown variant {variant!r} of configs/ssd300_coco_torchvision.py; "
                     "valid: '' (91 outputs, COCO category ids) or 'coco80'")
  c = ssd300_coco.get_config()
  if variant != "coco80":
    c.class_names = COCO_V1_CLASSES
    c.num_classes = len(COCO_V1_CLASSES) + 1  # 91
  # torchvision's DefaultBoxGenerator(clip=True) clamps w and h, not the corners. The field is
  # rebuilt because a ConfigDict field keeps its type, and the base config's clip is a bool.
  c.anchors = ml_collections.ConfigDict(dict(c.anchors.to_dict(), clip="wh"))
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
