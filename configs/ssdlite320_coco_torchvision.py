r"""SSDLite320 (MobileNetV3-Large) on COCO as torchvision's ``ssdlite320_mobilenet_v3_large``.

  python -m ssdjax.convert --torchvision=ssdlite320_mobilenet_v3_large_coco-a79551df.pth \
      --workdir=runs/tv_ssdlite
  python -m ssdjax.main --config=configs/ssdlite320_coco_torchvision.py --workdir=runs/tv_ssdlite

The first command writes a workdir with the converted weights as the step-0 checkpoint (the
converter picks this config for an SSDLite state dict, and the ``full_tail`` variant when the
checkpoint has one); the second fine-tunes from it, or trains from scratch in an empty workdir.

Variants (``--config=configs/ssdlite320_coco_torchvision.py:<variant>``; comma-separated to
combine, e.g. ``full_tail,coco80``):

* ``""`` (default): torchvision's 91 outputs indexed by COCO category id (as
  ``configs/ssd300_coco_torchvision.py``) and MobileNetV3's reduced tail (C4 blocks and the last
  conv at half width: 480 channels). torchvision builds the reduced tail whenever no ImageNet
  backbone is loaded, which includes the published COCO checkpoint (``weights=COCO_V1``, 3,440,060
  parameters) and the random-initialised ``ssdlite320_mobilenet_v3_large(weights=None,
  weights_backbone=None)``.
* ``"full_tail"``: the full-width tail (960 channels), the model torchvision builds with an
  ImageNet backbone (``weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1``, the builder's
  default), for ImageNet-initialised training.
* ``"coco80"``: the 80 COCO classes as contiguous labels 1..80 (see the SSD300 config); the
  converter keeps those 81 columns of the classification head.

The model: image 320, normalisation mean 0.5 / std 0.5 on [0, 1] (127.5 / 127.5 on [0, 255]);
``DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)`` on the 20, 10, 5, 3, 2, 1
maps: scales s_k = 0.2 + 0.15 k and s_6 = 1, boxes s_k and sqrt(s_k s_k+1) square plus ratios 2
and 3 (6 per location, 3234 in all), centres (i + 0.5) / f (float steps 320 / f), w and h clamped
to [0, 1] (``clip="wh"``); SSDLite head (depthwise 3x3 + BN + ReLU6, 1x1); matching and loss as
torchvision's ``SSD`` (``SSDMatcher`` 0.5, 3:1 hard negatives, box weights 10, 10, 5, 5);
post-processing ``score_thresh`` 0.001, ``topk_candidates`` 300 per class, ``nms_thresh`` 0.55,
``detections_per_img`` 300.

Training recipe (torchvision ``references/detection``: ``train.py --model
ssdlite320_mobilenet_v3_large --epochs 660 --aspect-ratio-group-factor 3 --lr-scheduler
cosineannealinglr --lr 0.15 --batch-size 24 --weight-decay 0.00004 --data-augmentation ssdlite`` on
8 GPUs), and what this config makes of it:

* SGD momentum 0.9, lr 0.15, weight decay 4e-5 on every parameter (``decay_biases=True``): the same.
* batch 24 x 8 GPUs = 192: ``train.batch_size = 192`` (global).
* 660 epochs of the 117,266 COCO train2017 images with annotations (611 iterations per epoch):
  ``train.num_steps = 403_260``.
* ``CosineAnnealingLR`` stepped per epoch to 0, after torchvision's linear warmup of the first
  1000 iterations from lr / 1000: ``schedule="cosine"`` per step to 0, ``warmup_steps=1000``
  from 0; the per-epoch staircase and the warmup's start differ slightly.
* ``--data-augmentation ssdlite`` = ``RandomIoUCrop`` + horizontal flip, no photometric
  distortion and no zoom out: ``augment.photometric = augment.expand = False``; ssdjax's crop is
  Caffe's IoU-constrained crop, close to but not the same sampler as ``RandomIoUCrop``.
* Not mapped: aspect-ratio grouping of batches (ssdjax resizes every image to 320x320, as
  torchvision's transform does, so it only changes batch composition), and torchvision's
  from-scratch initialisation of the trunk with normal(0, 0.03) (ssdjax keeps kaiming).
"""

from ssdjax import config as config_lib

_VARIANTS = ("coco80", "full_tail")
SIZE = 320
FEATURE_SIZES = (20, 10, 5, 3, 2, 1)


def _scales(min_ratio: float = 0.2, max_ratio: float = 0.95, n: int = 6) -> list[float]:
  """torchvision DefaultBoxGenerator's scales, computed as it computes them (float rounding too)."""
  return [min_ratio + (max_ratio - min_ratio) * k / (n - 1.0) for k in range(n)] + [1.0]


def get_config(variant: str = ""):
  options = [v for v in variant.split(",") if v]
  unknown = [v for v in options if v not in _VARIANTS]
  if unknown:
    raise config_lib.ConfigError(
        f"unknown variant {unknown[0]!r} of configs/ssdlite320_coco_torchvision.py; valid: '' "
        "(reduced tail, 91 outputs), 'full_tail', 'coco80', or both comma-separated")
  c = config_lib.load_file("ssd300_coco_torchvision.py" + (":coco80" if "coco80" in options else ""),
                           relative_to=__file__)
  c.image_size = SIZE
  a = c.anchors
  scales = _scales()
  a.feature_sizes = FEATURE_SIZES
  a.steps = tuple(SIZE / f for f in FEATURE_SIZES)
  a.min_sizes = tuple(s * SIZE for s in scales[:-1])
  a.max_sizes = tuple(s * SIZE for s in scales[1:])
  a.aspect_ratios = ((2, 3),) * len(FEATURE_SIZES)
  a.clip = "wh"
  c.model.backbone = "mobilenet_v3_large"
  c.model.backbone_kwargs = {"reduced_tail": "full_tail" not in options}
  c.model.head = "ssdlite"
  c.data.mean_rgb = (127.5, 127.5, 127.5)
  c.data.std_rgb = (127.5, 127.5, 127.5)
  c.postprocess.score_threshold = 0.001
  c.postprocess.top_k = 300
  c.postprocess.iou_threshold = 0.55
  c.postprocess.max_detections = 300
  c.augment.photometric = False
  c.augment.expand = False
  c.optimizer.learning_rate = 0.15
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 4e-5
  c.optimizer.decay_biases = True
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 1000
  c.train.batch_size = 192
  c.train.num_steps = 403_260
  return c
