r"""The default synthetic experiment with the head and the loss of experiments/custom_head/parts.py.

  python -m ssdjax.main --config=experiments/custom_head/config.py --workdir=runs/custom_head

Run from the repository root (the folder that holds ``experiments/``), so that the import paths
below resolve; for a package of your own, install it (``pip install -e .``) or put it on
PYTHONPATH and the same config works from anywhere.
"""

from ssdjax import config as config_lib


def get_config():
  c = config_lib.load_file("../../configs/synthetic.py", relative_to=__file__)
  c.model.head = "experiments.custom_head.parts:TwoConvHead"
  c.model.head_kwargs = {"width": 48, "depth": 1}
  c.loss.type = "experiments.custom_head.parts:balanced_multibox"
  c.loss.kwargs = {"alpha": 0.5, "gamma": 1.5, "neg_pos_ratio": 3.0}
  return c
