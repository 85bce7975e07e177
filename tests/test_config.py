"""ssdjax.config and ssdjax.cli: the one source of defaults, overrides, validation, one-line errors."""

import inspect
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from ssdjax import anchors, boxes, config as config_lib, losses, matching, postprocess
from ssdjax.errors import UserError
from tests.helpers import REPO, load_config, subprocess_env


def _path(config, path):
  node = config
  for part in path.split("."):
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


# Every keyword default of the core's public functions, and the config field it must equal.
# A new default in the core without an entry here fails test_every_core_default_is_listed.
CORE_DEFAULTS = {
    (boxes.encode, "variances"): "anchors.variances",
    (boxes.decode, "variances"): "anchors.variances",
    (anchors.default_boxes, "offset"): "anchors.offset",
    (anchors.default_boxes, "clip"): "anchors.clip",
    (matching.match, "strategy"): "matching.strategy",
    (matching.batch_match, "strategy"): "matching.strategy",
    (matching.targets, "strategy"): "matching.strategy",
    (matching.batch_targets, "strategy"): "matching.strategy",
    (matching.match_stats, "strategy"): "matching.strategy",
    (matching.targets, "variances"): "anchors.variances",
    (matching.batch_targets, "variances"): "anchors.variances",
    (matching.bipartite, "iou_threshold"): "matching.kwargs.iou_threshold",
    (matching.per_gt_best, "iou_threshold"): "matching.kwargs.iou_threshold",
    (losses.multibox_loss, "neg_pos_ratio"): "loss.kwargs.neg_pos_ratio",
    (losses.multibox_loss, "loc_weight"): "loss.kwargs.loc_weight",
    (losses.focal_loss, "loc_weight"): "loss.kwargs.loc_weight",
    (postprocess.detect, "variances"): "anchors.variances",
}
# Defaults of options that no config field sets (the focal loss is not the default loss: its
# RetinaNet values are documented in ssdjax.config's loss.kwargs doc), and of plain helpers.
NOT_CONFIG = {(losses.focal_loss, "alpha"): 0.25, (losses.focal_loss, "gamma"): 2.0,
              (boxes.clip, "lo"): 0.0, (boxes.clip, "hi"): 1.0,
              (boxes.validate_boxes, "name"): "boxes", (boxes.validate_boxes, "where"): "",
              (boxes.validate_boxes, "tol"): 1e-6, (anchors.num_anchors_per_location,
                                                    "max_sizes"): None,
              (postprocess.nms, "valid"): None}


def _public_defaults():
  for module in (boxes, anchors, matching, losses, postprocess):
    for name, fn in inspect.getmembers(module, inspect.isfunction):
      if name.startswith("_") or name == "register" or fn.__module__ != module.__name__:
        continue
      for p in inspect.signature(fn).parameters.values():
        if p.default is not p.empty:
          yield fn, p.name, p.default


def test_every_core_default_equals_the_config_default():
  defaults = config_lib.defaults()
  for (fn, name), field in CORE_DEFAULTS.items():
    value = inspect.signature(fn).parameters[name].default
    want = _path(defaults, field)
    if name == "clip":  # the config names the mode; the function takes False for it too
      assert anchors._clip_mode(value) == anchors._clip_mode(want)  # pylint: disable=protected-access
    else:
      assert value == want, (fn.__qualname__, name, value, field, want)


def test_every_core_default_is_listed():
  listed = set(CORE_DEFAULTS) | set(NOT_CONFIG)
  unlisted = [(fn.__module__, fn.__qualname__, name) for fn, name, _ in _public_defaults()
              if (fn, name) not in listed]
  assert not unlisted, f"add these defaults to CORE_DEFAULTS (config field) or NOT_CONFIG: {unlisted}"
  for (fn, name), value in NOT_CONFIG.items():
    assert inspect.signature(fn).parameters[name].default == value


def test_every_field_has_a_doc_and_every_config_file_validates():
  for path, field in config_lib.FIELDS.items():
    assert len(field.doc) > 10, path
  listing = config_lib.describe(config_lib.defaults())
  assert len(listing.splitlines()) == len(config_lib.FIELDS)
  assert "train.batch_size = 32  # global batch" in listing
  for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if name.endswith(".py"):
      config_lib.validate(load_config(name))


def test_overrides_parse_by_field_type():
  c = config_lib.defaults()
  config_lib.apply_overrides(c, [
      "train.batch_size=16", "optimizer.learning_rate=2e-3", "augment.hflip=false",
      "data.train=train", "data.mean_rgb=(1, 2, 3)", "data.data_dir=/x", "class_names=('a','b')",
      "model.head_kwargs.width=64", "loss.kwargs={'alpha': 0.25, 'gamma': 2.0}",
      "anchors.aspect_ratios=[[2], [2, 3]]", "eval.metrics=()"])
  assert c.train.batch_size == 16 and c.optimizer.learning_rate == 2e-3
  assert c.augment.hflip is False and c.data.train == ("train",)
  assert c.data.mean_rgb == (1, 2, 3) and c.data.data_dir == "/x" and c.class_names == ("a", "b")
  assert c.model.head_kwargs.to_dict() == {"width": 64}
  assert c.loss.kwargs.to_dict() == {"alpha": 0.25, "gamma": 2.0}
  assert c.anchors.aspect_ratios == ((2,), (2, 3)) and c.eval.metrics == ()
  config_lib.apply_overrides(c, ["data.data_dir=None"])
  assert c.data.data_dir is None


@pytest.mark.parametrize("override,message", [
    ("train.steps=3", "unknown config field config.train.steps.*did you mean num_steps"),
    ("num_classes=6", "class count is len\\(class_names\\) \\+ 1"),
    ("batch_size=8", "did you mean train.batch_size or eval.batch_size"),
    ("trian.batch_size=8", "config.trian.*did you mean train"),
    ("train.batch_size=abc", "expected int"),
    ("augment.hflip=maybe", "expected bool"),
    ("train.batch_size", "expected --config.FIELD=VALUE"),
])
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises(UserError, match=message):
    config_lib.apply_overrides(config_lib.defaults(), [override])


def test_check_fields_finds_typos_types_and_ranges_in_config_files():
  c = config_lib.defaults()
  with c.train.unlocked():
    c.train.num_step = 10  # a typo in a config file adds a field instead of failing
  with pytest.raises(UserError, match="config.train.num_step.*did you mean num_steps"):
    config_lib.check_fields(c)
  c = config_lib.defaults()
  c.train.log_every = 0  # 0 = only at the end: valid
  config_lib.check_fields(c)
  for field, value, message in (("train.keep_checkpoints", 0, "must be >= 1"),
                                ("postprocess.iou_threshold", 1.5, r"must be in \[0.0, 1.0\]"),
                                ("data.source", "parquet", "must be one of"),
                                ("eval.metrics", ("voc07", "map"), "may hold only")):
    c = config_lib.defaults()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(UserError, match=f"config.{field}.*{message}"):
      config_lib.check_fields(c)
  c = config_lib.defaults()
  with c.train.unlocked():  # ConfigDict keeps a field's type; a dict-built config need not
    del c.train["batch_size"]
    c.train.batch_size = 3.5
  with pytest.raises(UserError, match="batch_size=3.5 has type float; expected int"):
    config_lib.check_fields(c)


def test_validate_checks_parts_and_their_kwargs():
  c = config_lib.defaults()
  c.loss.type = "focal"
  with pytest.raises(UserError, match="neg_pos_ratio.*accepted keys: alpha, gamma, loc_weight"):
    config_lib.validate(c)
  c = config_lib.defaults()
  c.matching.kwargs.iou_thresh = 0.4
  with pytest.raises(UserError, match="iou_thresh.*accepted keys: iou_threshold"):
    config_lib.validate(c)
  c = config_lib.defaults()
  c.model.head_kwargs.widht = 3
  with pytest.raises(UserError, match="head_kwargs has unknown keys \\['widht'\\]"):
    config_lib.validate(c)
  c = config_lib.defaults()
  c.anchors.steps = (8, 16)
  with pytest.raises(UserError, match="anchors.steps has 2 entries"):
    config_lib.validate(c)


def test_load_file_errors_and_variants(tmp_path):
  with pytest.raises(UserError, match="config file .*nope.py not found"):
    config_lib.load_file(str(tmp_path / "nope.py"))
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  with pytest.raises(UserError, match="syntax error"):
    config_lib.load_file(str(tmp_path / "bad.py"))
  (tmp_path / "none.py").write_text("X = 1\n")
  with pytest.raises(UserError, match="defines no get_config"):
    config_lib.load_file(str(tmp_path / "none.py"))
  c = load_config("ssd300_coco_torchvision.py:coco80")
  assert len(c.class_names) == 80 and c.data.category_ids[:2] == (1, 2)
  with pytest.raises(UserError, match="unknown variant"):
    load_config("ssd300_coco_torchvision.py:coco81")


def test_saved_configs_reload_with_new_fields_filled_in():
  c = config_lib.defaults()
  c.class_names = ("a", "b")
  c.model.head_kwargs = {"width": 8}
  raw = json.loads(c.to_json_best_effort())
  del raw["optimizer"]["grad_clip_norm"]
  loaded = config_lib.from_saved(raw)
  assert loaded.optimizer.grad_clip_norm == 0.0 and loaded.class_names == ("a", "b")
  assert loaded.model.head_kwargs.to_dict() == {"width": 8}
  assert loaded.anchors.aspect_ratios == c.anchors.aspect_ratios
  config_lib.check_fields(loaded)


def _main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "ssdjax.main", *args], env=subprocess_env(),
                        cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_user_errors_are_one_line(tmp_path):
  cases = [
      (["--config=configs/synthetic.py", "--config.train.steps=3"], "did you mean num_steps"),
      (["--config=configs/nope.py"], "configs/nope.py not found"),
      (["--config=configs/synthetic.py", "--config.train.batch_size=x"], "expected int"),
      (["--config=configs/synthetic.py", "--config.model.head=nohead"],
       "unknown head 'nohead' .*valid names: conv1x1, dense, shared, ssd, ssdlite"),
      (["--config=configs/synthetic.py", "--config.model.head=mylab.heads:X"],
       "cannot import module 'mylab.heads'.*PYTHONPATH"),
  ]
  for args, message in cases:
    out = _main(*args, f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2, (args, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    assert __import__("re").search(message, errors[0]), (message, errors[0])
  assert not os.path.exists(tmp_path / "w")  # nothing written


def test_print_config_lists_every_field_with_its_meaning():
  out = _main("--config=configs/synthetic.py", "--config.train.num_steps=7", "--print_config")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == len(config_lib.FIELDS)
  assert "train.num_steps = 7  # training steps" in lines
  assert any(line.startswith("model.backbone = 'tiny'  # registered backbone") for line in lines)


def test_installing_ships_no_top_level_configs_package(tmp_path):
  # pyproject's package list, as setuptools computes it from the repository.
  import setuptools  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
  packages = setuptools.find_packages(REPO, **find)
  assert "ssdjax" in packages and not any(p.split(".")[0] != "ssdjax" for p in packages)
  # The framework loads saved configs without any configs/ on the path (run from elsewhere).
  code = ("import importlib.util, json, sys\n"
          "from ssdjax import config, train\n"
          "assert importlib.util.find_spec('configs') is None, 'a configs package is importable'\n"
          "print(train.load_config(sys.argv[1]).train.batch_size)\n")
  (tmp_path / "config.json").write_text(config_lib.defaults().to_json_best_effort())
  env = subprocess_env()
  env["PYTHONPATH"] = ""  # only the installed ssdjax
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "32"
