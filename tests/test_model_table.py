"""experiments/model_table.py: its figures against torchvision's, and docs/models.md holds its table."""

import os
import runpy

from tests.helpers import REPO


def _script():
  return runpy.run_path(os.path.join(REPO, "experiments", "model_table.py"))


def test_docs_hold_the_generated_table():
  rows = _script()["rows"]()
  with open(os.path.join(REPO, "docs", "models.md")) as f:
    doc = f.read()
  assert "\n".join(rows) in doc, "docs/models.md is stale: paste python experiments/model_table.py"


def test_counts_equal_torchvision_published_figures():
  script = _script()
  for name, file, _, published in script["MODELS"]:
    if published is None:
      continue
    from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.load_file(os.path.join(REPO, "configs", file))
    params, flops, macs = script["measure"](config)
    # torchvision's figures (ssd300_vgg16: 35,641,826 parameters, 34.858 GFLOPS; ssdlite320:
    # 3,440,060, 0.583) count multiply-adds of every conv tap.
    assert abs(params / 1e6 - published[0]) < 5e-6, (name, params)
    assert abs(macs / 1e9 - published[1]) < 1e-3, (name, macs)
    # XLA counts 2 FLOPs per multiply-add, skipping padding taps: below 2x torchvision's count
    # for the big convs of VGG, within 10% of it either way.
    assert 0.9 < flops / (2 * macs) < 1.1, (name, flops, macs)
