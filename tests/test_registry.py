"""ssdjax.registry: public register(), import paths, and what a workdir records for outside parts."""

import json
import os
import subprocess
import sys

import pytest

from ssdjax import losses, matching, registry, train
from ssdjax.errors import UserError
from ssdjax.models import backbones, heads
from tests.helpers import REPO, small_config, subprocess_env


@pytest.fixture(autouse=True)
def _registries_restored(monkeypatch):
  """What a test registers is gone after it: other test files see the built-in parts only."""
  for module in (heads, backbones, losses, matching):
    monkeypatch.setattr(module.REGISTRY, "_entries", dict(module.REGISTRY._entries))  # pylint: disable=protected-access


def test_every_registry_has_the_same_public_interface():
  for module, builtin in ((heads, "ssd"), (backbones, "vgg16"), (losses, "multibox"),
                          (matching, "bipartite")):
    assert builtin in module.names() and module.get(builtin) is module.REGISTRY.get(builtin)
    assert callable(module.register)
    with pytest.raises(UserError, match="valid names: .*or an import path"):
      module.get("no_such_part")


def test_register_and_import_paths():
  reg = registry.Registry("widget", "config.widget")
  sentinel = object()
  reg.register("w", sentinel)
  assert reg.get("w") is sentinel and reg.names() == ("w",)
  reg.register("w", sentinel)  # the same object again: fine
  with pytest.raises(UserError, match="already registered"):
    reg.register("w", object())
  reg.register("w", object(), overwrite=True)
  with pytest.raises(UserError, match="without ':'"):
    reg.register("a:b", sentinel)
  assert reg.get("os.path:join") is os.path.join
  with pytest.raises(UserError, match="module 'os.path' has no attribute 'nope'"):
    reg.get("os.path:nope")
  with pytest.raises(UserError, match="cannot import module 'no_pkg_here.mod'.*PYTHONPATH"):
    reg.get("no_pkg_here.mod:X")
  with pytest.raises(UserError, match="'package.module:Name'"):
    reg.get(":X")


def test_workdir_records_outside_parts_by_import_path():
  from tests.outside import parts  # pylint: disable=g-import-not-at-top

  heads.register("tiny_two_conv", parts.TinyHead, overwrite=True)
  losses.register("scaled_multibox", parts.scaled_multibox, overwrite=True)
  c = small_config(**{"model.head": "tiny_two_conv", "loss.type": "scaled_multibox"})
  c.loss.kwargs = {"scale": 2.0}
  recorded = train.prepare_config(c)
  assert recorded.model.head == "tests.outside.parts:TinyHead"
  assert recorded.loss.type == "tests.outside.parts:scaled_multibox"
  assert recorded.model.backbone == "tiny" and recorded.matching.strategy == "bipartite"

  class Local(heads.Head):
    pass

  heads.register("local_head", Local, overwrite=True)
  with pytest.raises(UserError, match="a fresh process .*cannot import"):
    train.prepare_config(small_config(**{"model.head": "local_head"}))
  with pytest.raises(UserError, match="flax.linen.Module class with the fields"):
    heads.register("not_a_head", object)


def test_a_registered_head_trains_then_predicts_in_a_fresh_process(tmp_path):
  from tests.outside import parts  # pylint: disable=g-import-not-at-top

  heads.register("tiny_two_conv", parts.TinyHead, overwrite=True)
  workdir = str(tmp_path / "run")
  config = small_config(**{"model.head": "tiny_two_conv", "train.num_steps": 2})
  train.train_and_evaluate(config, workdir, progress=False)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["head"] == "tests.outside.parts:TinyHead"
  # A new process knows nothing of the registration; the recorded import path suffices.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  image = str(tmp_path / "x.png")
  Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
  out = subprocess.run([sys.executable, "-m", "ssdjax.predict", f"--workdir={workdir}", image],
                       env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "written to" in out.stdout
