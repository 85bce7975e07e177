r"""SSD300 (VGG16) on PASCAL VOC 07+12 trainval, evaluated on VOC07 test, as in Liu et al. 2016.

Every default of the framework lives here; other configs import this one and override fields.

  python -m ssdjax.main --config=configs/ssd300_voc.py --workdir=runs/ssd300_voc
"""

import ml_collections

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 300
  c.class_names = VOC_CLASSES  # foreground classes; logits have len(class_names) + 1 (background = 0)
  c.num_classes = len(VOC_CLASSES) + 1

  # Caffe SSD300 VOC prior boxes (REFERENCE.md): 8732 boxes.
  c.anchors = ml_collections.ConfigDict(dict(
      feature_sizes=(38, 19, 10, 5, 3, 1),
      steps=(8, 16, 32, 64, 100, 300),
      min_sizes=(30, 60, 111, 162, 213, 264),
      max_sizes=(60, 111, 162, 213, 264, 315),
      aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
      offset=0.5,
      clip=False,
      variances=(0.1, 0.2),
  ))

  c.model = ml_collections.ConfigDict(dict(
      backbone="vgg16",      # ssdjax.models.backbones.names()
      backbone_kwargs={},    # passed to the backbone constructor
      head="ssd",            # ssdjax.models.heads.names(): ssd, conv1x1, dense, shared, ssdlite
      head_kwargs={},        # passed to the head constructor
      compute_dtype="float32",  # "bfloat16" runs the model in bf16 with float32 params
  ))

  c.matching = ml_collections.ConfigDict(dict(
      strategy="bipartite",  # "bipartite" (Caffe) or "per_gt_best" (torchvision)
      iou_threshold=0.5,
  ))

  c.loss = ml_collections.ConfigDict(dict(
      type="multibox",       # "multibox" (smooth L1 + CE with hard negative mining) or "focal"
      neg_pos_ratio=3.0,
      loc_weight=1.0,
      focal_alpha=0.25,      # used by type="focal" only
      focal_gamma=2.0,       # used by type="focal" only
  ))

  # Inference, as in the paper / torchvision: conf 0.01, top 400 per class, NMS 0.45, keep 200.
  c.postprocess = ml_collections.ConfigDict(dict(
      score_threshold=0.01,
      iou_threshold=0.45,
      top_k=400,
      max_detections=200,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="tfds",         # "tfds", "coco_json", "voc_xml" or "synthetic" (ssdjax.data.SOURCES)
      # Split specs, concatenated for training. tfds: "name[:version]:split"; coco_json: split names
      # (data_dir/annotations/<split>.json, else data_dir/annotations.json); voc_xml:
      # "VOC2007:trainval" (folder under data_dir : ImageSets/Main list); synthetic: "train" / "val".
      train=("voc/2007:train+validation", "voc/2012:train+validation"),
      eval="voc/2007:test",
      # tfds data_dir, or the folder root for coco_json / voc_xml (typed None: settable from the CLI)
      data_dir=ml_collections.config_dict.placeholder(str),
      max_boxes=64,          # ground truth padded to this many boxes per image
      mean_rgb=(123.675, 116.28, 103.53),  # pixel mean in [0, 255]
      std_rgb=(1.0, 1.0, 1.0),            # Caffe SSD subtracts the mean only
      bad_records="raise",   # "raise" stops at the first bad record; "skip" drops it and counts it
      num_workers=2,         # parallel input workers (0 = in the main process)
      synthetic=ml_collections.ConfigDict(dict(
          num_train=2000, num_val=200, min_objects=1, max_objects=4,
          min_size=0.1, max_size=0.6, num_classes=4,
          seed=0,            # data seed: the images do not change with the training seed
          # (height, width) of the generated images; None = image_size square
          image_hw=ml_collections.config_dict.placeholder(tuple))),
  ))

  c.augment = ml_collections.ConfigDict(dict(
      photometric=True,      # Caffe: brightness, contrast before or after saturation + hue
      channel_swap_prob=0.0,  # random channel permutation (Caffe's random_order_prob; 0 = off)
      expand=True,
      expand_prob=0.5,
      expand_max_ratio=4.0,
      random_crop=True,
      crop_trials=50,
      hflip=True,
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd",            # "sgd" (momentum), "adam" or "adamw"
      learning_rate=1e-3,
      momentum=0.9,
      weight_decay=5e-4,
      decay_biases=False,    # Caffe decays kernels only; True decays every parameter (torch SGD)
      schedule="piecewise",  # "piecewise" or "cosine"
      boundaries=(80_000, 100_000),
      decay_factor=0.1,
      warmup_steps=0,
      grad_clip_norm=0.0,    # 0 disables clipping
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=32,         # global batch, split over the 'data' mesh axis
      num_steps=120_000,
      log_every=100,
      eval_every=10_000,
      checkpoint_every=5_000,
      keep_checkpoints=3,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=32,
      metrics=("voc07", "voc", "coco"),
      max_images=0,          # 0 = the whole eval split
  ))
  return c
