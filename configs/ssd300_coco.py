r"""SSD300 (VGG16) on COCO 2017 (train -> val), Caffe's COCO prior boxes (= torchvision ssd300_vgg16).

The 80 class names and COCO's category ids come from the tfds ``coco`` data set.

  python -m ssdjax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco
"""

from ssdjax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.anchors.min_sizes = (21, 45, 99, 153, 207, 261)
  c.anchors.max_sizes = (45, 99, 153, 207, 261, 315)
  c.data.train = ("coco/2017:train",)
  c.data.eval = "coco/2017:validation"
  c.data.max_boxes = 100
  c.train.num_steps = 400_000
  c.optimizer.boundaries = (280_000, 360_000)
  c.eval.metrics = ("coco",)
  return c
