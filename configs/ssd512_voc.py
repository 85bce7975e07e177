r"""SSD512 (VGG16) on VOC 07+12, Caffe's released prior boxes (24564 boxes).

  python -m ssdjax.main --config=configs/ssd512_voc.py --workdir=runs/ssd512_voc
"""

from ssdjax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.image_size = 512
  a = c.anchors
  a.feature_sizes = (64, 32, 16, 8, 4, 2, 1)
  a.steps = (8, 16, 32, 64, 128, 256, 512)
  a.min_sizes = (35, 76, 153, 230, 307, 384, 460)
  a.max_sizes = (76, 153, 230, 307, 384, 460, 537)
  a.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))
  return c
