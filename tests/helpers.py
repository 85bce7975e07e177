"""Shared by the test files: the repository root, configs, a shrunk default config, subprocesses."""

import os

from ssdjax import config as config_lib
from ssdjax import data
from ssdjax.data.categories import COCO_CLASSES, VOC_CLASSES

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  """``get_config()`` of ``configs/<name>`` (e.g. "synthetic.py" or "ssd300_coco_torchvision.py:coco80")."""
  return config_lib.load_file(os.path.join(REPO, "configs", name))


class ConfigFile:
  """A config file of configs/ as an object with ``get_config([variant])``; ``classes`` fills
  ``class_names`` where the file leaves them to the data (as a run resolves them)."""

  def __init__(self, name: str, classes=None):
    self.name, self.classes = name, classes

  def get_config(self, variant: str | None = None):
    c = load_config(self.name + (f":{variant}" if variant is not None else ""))
    if self.classes is not None and c.class_names is None:
      c.class_names = tuple(self.classes)
    return c


def small_config(**overrides):
  """The synthetic config, shrunk so a run takes seconds, its class names resolved from the data;
  overrides as {"section.field": value}."""
  c = load_config("synthetic.py")
  c.data.synthetic.num_train = 48
  c.data.synthetic.num_val = 8
  c.data.num_workers = 0
  c.train.batch_size = 8
  c.train.num_steps = 6
  c.train.log_every = 2
  c.train.eval_every = 1000
  c.train.checkpoint_every = 3
  c.eval.batch_size = 8
  c.optimizer.warmup_steps = 2
  for k, v in overrides.items():
    section, name = k.split(".")
    c[section][name] = v
  return data.resolve_classes(c)


def subprocess_env(*, devices: int | None = None, xla_flags: str | None = None) -> dict:
  """Environment for a child Python: CPU JAX, the repo importable, XLA_FLAGS exactly as given.

  devices: simulate this many CPU devices (--xla_force_host_platform_device_count).
  """
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  flags = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  flags += [xla_flags] if xla_flags else []
  env.pop("XLA_FLAGS", None)
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


ssd300_voc = ConfigFile("ssd300_voc.py", VOC_CLASSES)
ssd512_voc = ConfigFile("ssd512_voc.py", VOC_CLASSES)
ssd300_coco = ConfigFile("ssd300_coco.py", COCO_CLASSES)
ssd300_coco_torchvision = ConfigFile("ssd300_coco_torchvision.py")
synthetic = ConfigFile("synthetic.py", SHAPE_CLASSES)
