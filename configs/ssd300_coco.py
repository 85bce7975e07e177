r"""SSD300 (VGG16) on COCO 2017 (train -> val), Caffe's COCO prior boxes (= torchvision ssd300_vgg16).

  python -m ssdjax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco
"""

from configs import ssd300_voc

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")


def get_config():
  c = ssd300_voc.get_config()
  c.class_names = COCO_CLASSES
  c.num_classes = len(COCO_CLASSES) + 1
  c.anchors.min_sizes = (21, 45, 99, 153, 207, 261)
  c.anchors.max_sizes = (45, 99, 153, 207, 261, 315)
  c.data.train = ("coco/2017:train",)
  c.data.eval = "coco/2017:validation"
  c.data.max_boxes = 100
  c.train.num_steps = 400_000
  c.optimizer.boundaries = (280_000, 360_000)
  c.eval.metrics = ("coco",)
  return c
