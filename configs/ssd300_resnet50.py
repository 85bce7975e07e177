r"""SSD300-ResNet50 in NVIDIA's layout (DeepLearningExamples, SSD v1.1) on COCO 2017.

  python -m ssdjax.pretrained --torchvision=resnet50-0676ba61.pth --backbone=resnet50 \
      --out=weights/resnet50_imagenet.npz
  python -m ssdjax.main --config=configs/ssd300_resnet50.py --workdir=runs/ssd300_resnet50

The network (``ssdjax.models.backbones.ResNet50``): torchvision's ResNet-50 up to conv4_x
(``layer3``) with that stage's first stride set to 1, so a 300x300 image gives a 38x38 first map
of 1024 channels; five extra blocks, each a 1x1 conv (256, 256, 128, 128, 128 channels), BN, ReLU
and a 3x3 conv (512, 512, 256, 256, 256), BN, ReLU, stride 2 with padding 1 for the first three
and unpadded for the last two: 38, 19, 10, 5, 3, 1. The head is a 3x3 conv with bias per map and
branch (4 and 6 boxes per location: 8732 anchors), xavier-initialised as NVIDIA's.

The trunk starts from torchvision's ImageNet ResNet-50 (``ResNet50_Weights.IMAGENET1K_V1``,
``resnet50-0676ba61.pth``; docs/models.md says how to fetch it), converted once by the first
command; ``--config.model.pretrained=None`` trains from random weights instead, which no published
result does. NVIDIA trains every layer with ordinary BatchNorm; ``model.trainable_backbone_layers``
and ``model.freeze_backbone_bn`` freeze parts as torchvision does.

NVIDIA's recipe, as here: default boxes of ``dboxes300_coco`` (scales 21, 45, 99, 153, 207, 261,
315 at steps 8, 16, 32, 64, 100, 300; clamped to [0, 1]: ``clip="wh"``); a ground truth's best
box is always matched, the others at IoU > 0.5 (``per_gt_best``); smooth L1 + cross-entropy with
3:1 hard negative mining; ImageNet mean and std; SGD, momentum 0.9, weight decay 5e-4 on every
parameter, learning rate 2.6e-3 per 32 images (0.0208 for the global batch of 256 = 8 GPUs x 32),
300 warmup steps, 65 epochs with x0.1 at epochs 43 and 54 (118,287 images: 30,035 steps of 256,
boundaries 19,870 and 24,953); augmentation: IoU crop, colour distortion and flip, no zoom out.
Not the same: NVIDIA normalises the loss per image by its positives before averaging over the
batch (ssdjax divides the batch's sum by all its positives, as Caffe), runs in mixed precision
(``--config.model.compute_dtype=bfloat16`` is the JAX analogue) and uses DALI's colour twist
ranges instead of Caffe's photometric distortion.
"""

from ssdjax import config as config_lib

_EPOCH = 118_287 / 256  # COCO train2017 images per step of the global batch


def get_config():
  c = config_lib.load_file("ssd300_coco.py", relative_to=__file__)
  c.model.backbone = "resnet50"
  c.model.pretrained = "weights/resnet50_imagenet.npz"
  c.anchors.clip = "wh"
  c.matching.strategy = "per_gt_best"
  c.data.mean_rgb = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  c.data.std_rgb = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  c.augment.expand = False
  c.train.batch_size = 256
  c.train.num_steps = round(65 * _EPOCH)
  c.optimizer.learning_rate = 2.6e-3 * 256 / 32
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decay_biases = True
  c.optimizer.warmup_steps = 300
  c.optimizer.boundaries = (round(43 * _EPOCH), round(54 * _EPOCH))
  c.train.eval_every = round(5 * _EPOCH)
  c.train.checkpoint_every = round(_EPOCH)
  return c
