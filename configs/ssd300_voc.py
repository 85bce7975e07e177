r"""SSD300 (VGG16) on PASCAL VOC 07+12 trainval, evaluated on VOC07 test, as in Liu et al. 2016.

The framework's defaults (ssdjax.config.defaults()) are this experiment; the file only names it.
The 20 class names come from the tfds ``voc`` features.

  python -m ssdjax.main --config=configs/ssd300_voc.py --workdir=runs/ssd300_voc
"""

from ssdjax import config as config_lib


def get_config():
  return config_lib.defaults()
