r"""The model table of docs/models.md: parameters and GFLOPs of each config's network.

  python experiments/model_table.py

Parameters are counted from the model's initialised shapes; FLOPs come from XLA's cost analysis of
the jitted forward pass (one image at the config's size, float32, no post-processing), which
counts a multiply-add as 2 FLOPs and only the taps of a convolution that fall on the input, not on
its zero padding. torchvision's published "GFLOPS" count each multiply-add once and every tap,
padding included, and nothing but convolutions and matrix products. The table gives XLA's figure,
half of it, the multiply-adds of the conv and dense layers counted torchvision's way (from each
layer's output size and fan-in) and torchvision's published figures.
Prints the markdown table; tests/test_model_table.py checks docs/models.md holds it.
"""

from __future__ import annotations

import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssdjax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssdjax.data import categories  # pylint: disable=g-import-not-at-top,wrong-import-position

# (name, config, class names where the data would give them, torchvision's params and GFLOPS).
MODELS = (
    ("SSD300-VGG16 (torchvision)", "ssd300_coco_torchvision.py", None, (35.641826, 34.858)),
    ("SSDLite320-MobileNetV3-Large (torchvision)", "ssdlite320_coco_torchvision.py", None,
     (3.440060, 0.583)),
    ("SSD300-VGG16, VOC (paper)", "ssd300_voc.py", categories.VOC_CLASSES, None),
    ("SSD512-VGG16, VOC (paper)", "ssd512_voc.py", categories.VOC_CLASSES, None),
    ("SSD300-VGG16, COCO (paper)", "ssd300_coco.py", categories.COCO_CLASSES, None),
    ("SSD300-ResNet50, COCO (NVIDIA layout)", "ssd300_resnet50.py", categories.COCO_CLASSES, None),
    ("Tiny, synthetic shapes (the demo)", "synthetic.py", ("circle", "square", "triangle", "cross"),
     None),
)


def layer_multiply_adds(model, variables, image) -> int:
  """Multiply-adds of every conv and dense layer, every tap counted (padding included): the
  count torchvision's figures use. Each layer's output size times its fan-in."""
  total = 0

  def count(next_fun, args, kwargs, context):
    nonlocal total
    y = next_fun(*args, **kwargs)
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Conv, nn.Dense)):
      cin = args[0].shape[-1]
      fan_in = (math.prod(m.kernel_size) * cin // m.feature_group_count
                if isinstance(m, nn.Conv) else cin)
      total += math.prod(y.shape) * fan_in
    return y

  with nn.intercept_methods(count):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, image)
  return total


def measure(config) -> tuple[int, float, int]:
  """(parameters, XLA FLOPs, layer multiply-adds) of one forward pass at ``config.image_size``."""
  model = models.from_config(config)
  size = config.image_size
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image).cost_analysis()
  return params, float(cost["flops"]), layer_multiply_adds(model, variables, image)


def rows() -> list[str]:
  out = ["| model | config | classes | input | parameters | XLA GFLOPs | XLA GFLOPs / 2 "
         "| G multiply-adds, every tap | torchvision: parameters, GFLOPS |",
         "|---|---|---|---|---|---|---|---|---|"]
  for name, file, classes, tv in MODELS:
    config = config_lib.load_file(os.path.join(REPO, "configs", file))
    if config.class_names is None:
      config.class_names = tuple(classes)
    params, flops, macs = measure(config)
    ref = f"{tv[0]:.2f}M, {tv[1]:.3f}" if tv else "-"
    out.append(f"| {name} | `configs/{file}` | {config_lib.num_classes(config)} | "
               f"{config.image_size} | {params / 1e6:.2f}M | {flops / 1e9:.2f} | "
               f"{flops / 2e9:.2f} | {macs / 1e9:.3f} | {ref} |")
  return out


def main():
  print("\n".join(rows()))


if __name__ == "__main__":
  main()
