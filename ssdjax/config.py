r"""Experiment configuration: every field with its default and meaning, config files, overrides.

The framework's defaults live here, in :data:`SCHEMA`, and nowhere else: :func:`defaults` builds
the ``ml_collections.ConfigDict`` of the paper's experiment (SSD300 VGG16 on VOC07+12), and every
experiment file in ``configs/`` starts from it and overrides fields::

  from ssdjax import config as config_lib

  def get_config():
    c = config_lib.defaults()
    c.image_size = 512
    return c

Config files are plain Python files with ``get_config()`` (optionally ``get_config(variant)``,
selected as ``path.py:variant``), loaded by path with :func:`load_file`; :func:`apply_overrides`
applies ``field=value`` strings (the CLIs' ``--config.field=value``), :func:`validate` checks every
field before anything is compiled or written, and :func:`describe` lists every field with its
value and meaning (``python -m ssdjax.main --config=... --print_config``).

Parts that a researcher may replace are named in the config: ``model.backbone``, ``model.head``,
``loss.type`` and ``matching.strategy`` take a registered name or an import path
``"package.module:Name"`` (:mod:`ssdjax.registry`); their keyword arguments (``*_kwargs`` /
``kwargs``) are free-form dicts checked against the part's signature.

The class names are a fact of the data: ``class_names`` is None and is read from the data when a
run starts (``ssdjax.data.resolve_classes``), then recorded in the workdir with the category ids;
set it only for a model whose outputs are fixed regardless of the data (converted weights).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from ssdjax.errors import UserError


class ConfigError(UserError):
  """A config field, config file or override that is wrong; the message names it and the fix."""


_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default, what it means, its type and an optional value check.

  ``check(value)`` returns None when the value is fine, else what is wrong ("must be >= 1").
  ``type`` is inferred from the default when not given; ``None`` defaults need it. ``free`` marks
  a dict of keyword arguments whose keys the part it configures defines.
  """
  default: Any
  doc: str
  check: Callable[[Any], str | None] | None = None
  type: type | tuple[type, ...] | None = None
  free: bool = False

  @property
  def types(self) -> tuple[type, ...]:
    if self.type is not None:
      return self.type if isinstance(self.type, tuple) else (self.type,)
    if self.free:
      return (dict,)
    return (type(self.default),)


# ----------------------------------------------------------------------------------------------
# Value checks.


def _at_least(lo):
  return lambda v: None if v >= lo else f"must be >= {lo}"


def _in_range(lo, hi, *, lo_open=False):
  def check(v):
    ok = (lo < v if lo_open else lo <= v) and v <= hi
    return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}]"
  return check


def _one_of(*values):
  return lambda v: None if v in values else f"must be one of {list(values)}"


def _positive_numbers(n=None):
  def check(v):
    if n is not None and len(v) != n:
      return f"must have {n} entries"
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
      return "must hold positive numbers"
    return None
  return check


def _numbers(n):
  def check(v):
    if len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
      return f"must be {n} numbers"
    return None
  return check


def _strings(nonempty=True):
  def check(v):
    if nonempty and not v:
      return "must name at least one entry"
    if not all(isinstance(x, str) and x for x in v):
      return "must hold non-empty strings"
    return None
  return check


def _class_names(v):
  if v is None:
    return None
  if not v or not all(isinstance(x, str) and x for x in v):
    return "must be None (read from the data) or non-empty strings"
  if len(set(v)) != len(v):
    return "must not repeat a name"
  return None


def _category_ids(v):
  if v is None:
    return None
  if not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or len(set(v)) != len(v):
    return "must be None (labels are their own ids) or distinct integers"
  return None


def _template(v):
  return None if "{split}" in v or v else "must not be empty"


_VGG_BOUNDARIES = (80_000, 100_000)

# ----------------------------------------------------------------------------------------------
# The schema: every field of every experiment, with its default (the paper's SSD300 VOC setup).

F = Field
SCHEMA: dict[str, Any] = {
    "seed": F(0, "training seed: parameter initialisation, shuffling and augmentation",
              _at_least(0)),
    "image_size": F(300, "side of the square network input in pixels", _at_least(1)),
    "class_names": F(None, "foreground class names, label l = class_names[l - 1]; None = read from "
                     "the data and recorded in the workdir (set it only for fixed outputs, e.g. "
                     "converted weights)", _class_names, type=tuple),
    "anchors": {
        "feature_sizes": F((38, 19, 10, 5, 3, 1), "side of each feature map, largest first",
                           _positive_numbers()),
        "steps": F((8, 16, 32, 64, 100, 300), "pixels between neighbouring anchor centres per map",
                   _positive_numbers()),
        "min_sizes": F((30, 60, 111, 162, 213, 264), "smallest square anchor per map, in pixels",
                       _positive_numbers()),
        "max_sizes": F((60, 111, 162, 213, 264, 315), "with min_sizes, the sqrt(min * max) square "
                       "per map; () = none", _positive_numbers()),
        "aspect_ratios": F(((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
                           "per map, aspect ratios other than 1 (each is also used flipped)"),
        "offset": F(0.5, "anchor centre offset in units of the step (0.5 = cell centre)",
                    _in_range(0.0, 1.0)),
        "clip": F("none", "'none' (released Caffe models), 'corners' (Caffe clip: true) or 'wh' "
                  "(torchvision: clamp w and h)", _one_of("none", "corners", "wh")),
        "variances": F((0.1, 0.2), "(centre, size) variances of the box encoding (Caffe)",
                       _positive_numbers(2)),
    },
    "model": {
        "backbone": F("vgg16", "registered backbone name (ssdjax.models.backbones.names()) or "
                      "'package.module:Name'"),
        "backbone_kwargs": F({}, "keyword fields of the backbone module", free=True),
        "head": F("ssd", "registered head name (ssdjax.models.heads.names(): ssd, conv1x1, dense, "
                  "shared, ssdlite) or 'package.module:Name'"),
        "head_kwargs": F({}, "keyword fields of the head module", free=True),
        "compute_dtype": F("float32", "'float32', or 'bfloat16' (params stay float32)",
                           _one_of("float32", "bfloat16")),
        "pretrained": F(None, "ImageNet backbone weights a fresh run starts from: a torchvision "
                        "classification .pth or its .npz from python -m ssdjax.pretrained "
                        "(docs/models.md); None = random initialisation", type=str),
        "trainable_backbone_layers": F(None, "trunk stages that train, counted from the top as "
                                       "torchvision's trainable_backbone_layers (the rest are "
                                       "frozen); None = all", _at_least(0), type=int),
        "freeze_backbone_bn": F(False, "every BatchNorm of the trunk keeps its statistics and "
                                "affine parameters (torchvision's FrozenBatchNorm2d)"),
    },
    "matching": {
        "strategy": F("bipartite", "registered matcher (ssdjax.matching.names(): bipartite = "
                      "Caffe, per_gt_best = torchvision) or 'package.module:Name'"),
        "kwargs": F({"iou_threshold": 0.5}, "keyword arguments of the matcher", free=True),
    },
    "loss": {
        "type": F("multibox", "registered loss (ssdjax.losses.names(): multibox = smooth L1 + CE "
                  "with hard negative mining, focal) or 'package.module:Name'"),
        "kwargs": F({"neg_pos_ratio": 3.0, "loc_weight": 1.0},
                    "keyword arguments of the loss function (focal: alpha, gamma, loc_weight)",
                    free=True),
    },
    "postprocess": {
        "score_threshold": F(0.01, "a detection's class probability must exceed this",
                             _in_range(0.0, 1.0)),
        "iou_threshold": F(0.45, "NMS: IoU above this suppresses the lower-scoring box",
                           _in_range(0.0, 1.0)),
        "top_k": F(400, "candidates per class before NMS", _at_least(1)),
        "max_detections": F(200, "detections kept per image", _at_least(1)),
    },
    "data": {
        "source": F("tfds", "'tfds', 'coco_json', 'voc_xml' or 'synthetic'",
                    _one_of("tfds", "coco_json", "voc_xml", "synthetic")),
        "train": F(("voc/2007:train+validation", "voc/2012:train+validation"),
                   "training split specs, concatenated (tfds 'name[:version]:split'; coco_json a "
                   "split name; voc_xml 'VOC2007:trainval'; synthetic 'train')", _strings()),
        "eval": F("voc/2007:test", "evaluation split spec", lambda v: None if v else "is empty"),
        "data_dir": F(None, "tfds data_dir, or the folder of a coco_json / voc_xml data set",
                      type=str),
        "category_ids": F(None, "data category id of each label (COCO ids); None = read from "
                          "the data, or labels are their own ids", _category_ids, type=tuple),
        "coco_json": {
            "annotation_file": F("annotations/{split}.json", "coco_json: annotation file of a "
                                 "split, relative to data_dir ({split} = the split name)",
                                 _template),
            "image_dir": F("images/{split}", "coco_json: folder that file_name is relative to, "
                           "relative to data_dir", _template),
        },
        "max_boxes": F(64, "ground truth padded (or cut) to this many boxes per image",
                       _at_least(1)),
        "mean_rgb": F((123.675, 116.28, 103.53), "pixel mean subtracted, RGB in [0, 255]",
                      _numbers(3)),
        "std_rgb": F((1.0, 1.0, 1.0), "pixel std divided by after the mean (Caffe SSD: 1)",
                     _positive_numbers(3)),
        "bad_records": F("raise", "'raise' stops at the first bad record; 'skip' drops the "
                         "whole image with a bad annotation (or a damaged image file), logs and "
                         "counts it, and goes on", _one_of("raise", "skip")),
        "num_workers": F(2, "input worker processes (0 = in the main process)", _at_least(0)),
        "synthetic": {
            "num_train": F(2000, "synthetic: images in the train split", _at_least(1)),
            "num_val": F(200, "synthetic: images in the val split", _at_least(1)),
            "min_objects": F(1, "synthetic: fewest objects per image", _at_least(0)),
            "max_objects": F(4, "synthetic: most objects per image", _at_least(0)),
            "min_size": F(0.1, "synthetic: smallest object, fraction of the image side",
                          _in_range(0.0, 1.0, lo_open=True)),
            "max_size": F(0.6, "synthetic: largest object, fraction of the image side",
                          _in_range(0.0, 1.0, lo_open=True)),
            "num_classes": F(4, "synthetic: shape kinds used (circle, square, triangle, cross)",
                             _in_range(1, 4)),
            "seed": F(0, "synthetic: data seed (the images do not change with the training "
                      "seed)", _at_least(0)),
            "image_hw": F(None, "synthetic: (height, width) of the images; None = image_size "
                          "square", type=tuple),
        },
    },
    "augment": {
        "on_device": F(None, "where the training augmentation runs: True = on the accelerator, "
                       "inside the jitted step (ssdjax.augment; the host only decodes and fits "
                       "each image into the canvas, batches travel as uint8), False = on the host "
                       "(input workers); None = True on GPU/TPU, False on CPU (recorded resolved "
                       "in the workdir)", type=bool),
        "canvas_size": F(512, "on_device: side of the uint8 canvas each decoded image is fitted "
                         "into on the host (aspect kept, never enlarged)", _at_least(1)),
        "photometric": F(True, "Caffe's brightness, contrast, saturation and hue distortion"),
        "channel_swap_prob": F(0.0, "probability of a random channel permutation",
                               _in_range(0.0, 1.0)),
        "expand": F(True, "zoom out: place the image on a larger mean-coloured canvas"),
        "expand_prob": F(0.5, "probability of expand", _in_range(0.0, 1.0)),
        "expand_max_ratio": F(4.0, "largest canvas side / image side", _at_least(1.0)),
        "random_crop": F(True, "Caffe's IoU-constrained random crop (7 samplers)"),
        "crop_trials": F(50, "trials per crop sampler", _at_least(1)),
        "hflip": F(True, "horizontal flip with probability 0.5"),
    },
    "optimizer": {
        "name": F("sgd", "'sgd' (momentum), 'adam' or 'adamw'", _one_of("sgd", "adam", "adamw")),
        "learning_rate": F(1e-3, "peak learning rate", _at_least(0.0)),
        "momentum": F(0.9, "SGD momentum (0 = none)", _in_range(0.0, 1.0)),
        "weight_decay": F(5e-4, "L2 weight decay (adamw: decoupled decay)", _at_least(0.0)),
        "decay_biases": F(False, "decay every parameter (torch SGD) instead of kernels only "
                          "(Caffe)"),
        "schedule": F("piecewise", "'piecewise' (x decay_factor at boundaries) or 'cosine'",
                      _one_of("piecewise", "cosine")),
        "boundaries": F(_VGG_BOUNDARIES, "piecewise: steps where the rate is multiplied by "
                        "decay_factor", lambda v: None if all(
                            isinstance(b, int) and b > 0 for b in v) else "must be steps > 0"),
        "decay_factor": F(0.1, "piecewise: rate multiplier at each boundary",
                          _in_range(0.0, 1.0, lo_open=True)),
        "warmup_steps": F(0, "linear warmup from 0 over this many steps", _at_least(0)),
        "grad_clip_norm": F(0.0, "global-norm gradient clipping; 0 = off", _at_least(0.0)),
    },
    "train": {
        "batch_size": F(32, "global batch, split over the 'data' mesh axis", _at_least(1)),
        "num_steps": F(120_000, "training steps", _at_least(0)),
        "log_every": F(100, "steps between log lines and metrics; 0 = only at the end",
                       _at_least(0)),
        "eval_every": F(10_000, "steps between evaluations; 0 = only at the end", _at_least(0)),
        "checkpoint_every": F(5_000, "steps between checkpoints; 0 = only at the end",
                              _at_least(0)),
        "keep_checkpoints": F(3, "checkpoints kept (the newest)", _at_least(1)),
        "on_nonfinite": F("stop", "a step whose loss, gradients, updated parameters or "
                          "optimizer state hold NaN/inf is never applied; 'stop' ends the run "
                          "naming the step, 'skip' goes on without it (up to max_skipped_steps)",
                          _one_of("stop", "skip")),
        "max_skipped_steps": F(10, "on_nonfinite='skip': the run stops when more steps than "
                               "this were skipped", _at_least(0)),
        "conv_weight_grad": F("auto", "how the train step computes convolution weight "
                              "gradients: 'taps' (a matrix product per kernel tap, faster on "
                              "XLA:CPU), 'xla' (XLA's backward-filter convolution); 'auto' = "
                              "taps on CPU, xla elsewhere", _one_of("auto", "taps", "xla")),
        # Multi-process runs (docs/multihost.md).
        "process_timeout_s": F(60.0, "several processes: one not heard from for this many "
                               "seconds is lost and the others exit naming it; also the longest "
                               "wait at a checkpoint barrier", _in_range(1.0, 86400.0)),
    },
    "eval": {
        "batch_size": F(32, "evaluation batch", _at_least(1)),
        "metrics": F(("voc07", "voc", "coco"), "metric families: 'voc07' (11-point), 'voc' "
                     "(area), 'coco'; () = no evaluation", lambda v: None if set(v) <= {
                         "voc07", "voc", "coco"} else "may hold only 'voc07', 'voc', 'coco'"),
        "max_images": F(0, "evaluate the first this many images; 0 = the whole split",
                        _at_least(0)),
        "coco_backend": F("numpy", "COCO scorer: 'numpy' (vectorized, equal to pycocotools), "
                          "'pycocotools' or 'faster_coco_eval' (needs that package)",
                          _one_of("numpy", "pycocotools", "faster_coco_eval")),
        "overlap": F(True, "during training, score an evaluation (on the host) in a background "
                     "thread while the next steps train; the detections are made first, and the "
                     "final evaluation is waited for"),
    },
}
del F


def _walk(schema: Mapping[str, Any], prefix: str = ""):
  """(dotted path, Field) of every field of ``schema``."""
  for name, node in schema.items():
    path = f"{prefix}{name}"
    if isinstance(node, Field):
      yield path, node
    else:
      yield from _walk(node, path + ".")


FIELDS: dict[str, Field] = dict(_walk(SCHEMA))


def defaults() -> ml_collections.ConfigDict:
  """A new ConfigDict holding every field at its default (the paper's SSD300 VOC experiment)."""

  def build(schema):
    c = ml_collections.ConfigDict()
    for name, node in schema.items():
      if not isinstance(node, Field):
        c[name] = build(node)
      elif node.default is None:
        c[name] = config_dict.placeholder(node.types[0])
      elif node.free:
        c[name] = ml_collections.ConfigDict(dict(node.default))
      else:
        c[name] = node.default
    return c

  return build(SCHEMA)


def num_classes(config) -> int:
  """C, the model's class count: background + ``len(config.class_names)``."""
  if config.class_names is None:
    raise ConfigError(
        "config.class_names is not resolved yet: it is read from the data when a run starts "
        "(ssdjax.data.resolve_classes(config)), or set it in the config")
  return len(config.class_names) + 1


# ----------------------------------------------------------------------------------------------
# Config files.


def load_file(spec: str, *, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file; ``"path.py:variant"`` calls ``get_config("variant")``.

  ``relative_to`` (a file path) resolves a relative ``spec`` next to it, so one config file can
  build on another: ``load_file("ssd300_coco.py", relative_to=__file__)``.
  """
  path, sep, variant = str(spec).partition(":")
  if relative_to is not None and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found (--config takes a path such as "
                      "configs/synthetic.py, optionally followed by :variant)")
  name = "ssdjax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path} has a syntax error: line {e.lineno}: {e.msg}") from e
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ConfigError(f"config file {path} defines no get_config()")
  config = get_config(variant) if sep else get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() of {path} returned a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict (start from ssdjax.config.defaults())")
  return config


# ----------------------------------------------------------------------------------------------
# Overrides: "field=value" strings, parsed by the type of the field.


def _unknown(path: str, parent: str, keys: Sequence[str]) -> ConfigError:
  name = path.rsplit(".", 1)[-1]
  # The name may belong to another section; else a close name in this one.
  elsewhere = [p for p in FIELDS if p.rsplit(".", 1)[-1] == name and p != path]
  close = difflib.get_close_matches(name, list(keys), n=3, cutoff=0.5)
  # A top-level name is most likely a field of a section (batch_size -> train.batch_size).
  names = elsewhere + close if "." not in path else close + elsewhere
  hint = f"; did you mean {' or '.join(names)}?" if names else ""
  if not hint:
    hint = f"; its fields: {', '.join(sorted(keys))}"
  if path == "num_classes":
    hint = "; the class count is len(class_names) + 1, and class_names come from the data"
  where = f"config.{parent}" if parent else "the config"
  return ConfigError(f"unknown config field config.{path}: {where} has no field {name!r}{hint} "
                     "(--print_config lists every field)")


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_value(path: str, text: str, field: Field | None, current):
  """The value of ``--config.<path>=<text>`` for a field of the schema (or a kwargs entry)."""
  if field is None:  # an entry of a free kwargs dict: a Python literal, else a string
    return _literal(text)
  types = field.types
  if text == "None" and field.default is None:
    return None
  if bool in types:
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
  if int in types and bool not in types:
    try:
      return int(text)
    except ValueError:
      pass
  if float in types:
    try:
      return float(text)
    except ValueError:
      pass
  if tuple in types:
    value = _literal(text)
    if isinstance(value, (list, tuple)):
      return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(current, tuple) and all(isinstance(v, str) for v in current) or (
        current is None and isinstance(value, str)):
      return (value,) if isinstance(value, str) else (value,)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return (value,)
  if dict in types:
    value = _literal(text)
    if isinstance(value, dict):
      return value
  if str in types:
    return text
  want = " or ".join(t.__name__ for t in types)
  raise ConfigError(f"--config.{path}={text}: expected {want} (the field is now {current!r})")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]):
  """Applies ``"field=value"`` strings in order (dotted fields; values parsed by field type).

  Entries of a kwargs dict (``model.head_kwargs.width=64``) may be added; every other field must
  exist. A whole dict can be given as a Python literal (``loss.kwargs='{"alpha": 0.25}'``).

  Raises:
    ConfigError: unknown field (with the closest names), or a value of the wrong type.
  """
  for item in overrides:
    path, sep, text = item.partition("=")
    if not sep or not path:
      raise ConfigError(f"--config.{item}: expected --config.FIELD=VALUE")
    parts = path.split(".")
    node, free = config, False
    for i, part in enumerate(parts[:-1]):
      sub = ".".join(parts[:i + 1])
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise _unknown(sub, ".".join(parts[:i]), keys)
      free = free or (sub in FIELDS and FIELDS[sub].free)
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{item}: config.{'.'.join(parts[:-1])} is a value, not a "
                        "section")
    name = parts[-1]
    if not free and name not in node:
      raise _unknown(path, ".".join(parts[:-1]), list(node.keys()))
    field = None if free else FIELDS.get(path)
    current = node.get(name)
    if field is None and not free and isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{item}: config.{path} is a section; set its fields")
    value = _parse_value(path, text, field, current)
    _set(node, name, value)
  return config


def _set(node: ml_collections.ConfigDict, name: str, value) -> None:
  if isinstance(value, dict):
    value = ml_collections.ConfigDict(value)
  try:
    node[name] = value
  except TypeError:
    # ConfigDict keeps a field's first type; the schema, not ConfigDict, decides what is valid.
    with node.unlocked():
      del node[name]
      node[name] = value


# ----------------------------------------------------------------------------------------------
# Validation.


def _type_ok(value, field: Field) -> bool:
  if value is None:
    return field.default is None
  for t in field.types:
    if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return True
    if t is int and isinstance(value, int) and not isinstance(value, bool):
      return True
    if t is dict and isinstance(value, (dict, ml_collections.ConfigDict)):
      return True
    if t not in (int, float, dict) and isinstance(value, t):
      return True
  return False


def check_fields(config) -> None:
  """Every field of ``config`` is known, present, of its type and in its range.

  Raises:
    ConfigError: naming the first bad field, what is wrong and (for unknown fields) the closest
      valid names.
  """
  def walk(node, schema, prefix):
    for name in node.keys():
      if name not in schema:
        raise _unknown(prefix + name, prefix[:-1], list(schema))
    for name, spec in schema.items():
      path = prefix + name
      if name not in node:
        raise ConfigError(f"config.{path} is missing; start the config from "
                          "ssdjax.config.defaults()")
      value = node[name]
      if isinstance(spec, Field):
        if not _type_ok(value, spec):
          want = " or ".join(t.__name__ for t in spec.types)
          raise ConfigError(f"config.{path}={value!r} has type {type(value).__name__}; "
                            f"expected {want}")
        problem = spec.check(value) if (spec.check is not None and value is not None) else None
        if problem:
          raise ConfigError(f"config.{path}={_show(value)} {problem}")
      elif not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config.{path} must be a section with fields {sorted(spec)}")
      else:
        walk(value, spec, path + ".")

  walk(config, SCHEMA, "")


def _show(value) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def validate(config) -> None:
  """All checks that need no data and no devices: fields, registry names, kwargs, anchors.

  Called by the CLIs and the trainer before anything is compiled or written.

  Raises:
    UserError: naming the field and the fix.
  """
  # pylint: disable=g-import-not-at-top
  from ssdjax import anchors as anchors_lib
  from ssdjax import losses, matching, models

  check_fields(config)
  if config.data.synthetic.min_objects > config.data.synthetic.max_objects:
    raise ConfigError("config.data.synthetic.min_objects must be <= max_objects")
  if config.data.synthetic.min_size > config.data.synthetic.max_size:
    raise ConfigError("config.data.synthetic.min_size must be <= max_size")
  if config.class_names is not None and config.data.category_ids is not None and len(
      config.data.category_ids) != len(config.class_names):
    raise ConfigError(f"config.data.category_ids has {len(config.data.category_ids)} ids but "
                      f"config.class_names {len(config.class_names)} names; give one id per class")
  try:
    anchors_lib.from_config(config)
  except ValueError as e:
    raise ConfigError(f"config.anchors: {e}") from e
  losses.from_config(config)
  matching.from_config(config)
  models.check_config(config)


def parts_as_recorded(config) -> ml_collections.ConfigDict:
  """A copy of ``config`` with every replaceable part named so that a fresh process rebuilds it.

  Built-in names stay; a name registered by outside code becomes its import path
  ``"module:Name"`` (:meth:`ssdjax.registry.Registry.import_path`), so eval, predict, export and
  the experiments need only that module importable, not the code that registered it.
  """
  # pylint: disable=g-import-not-at-top
  from ssdjax import losses, matching
  from ssdjax.models import backbones, heads

  out = config.copy_and_resolve_references()
  for section, name, reg in (("model", "backbone", backbones.REGISTRY),
                             ("model", "head", heads.REGISTRY), ("loss", "type", losses.REGISTRY),
                             ("matching", "strategy", matching.REGISTRY)):
    out[section][name] = reg.import_path(config[section][name])
  return out


# ----------------------------------------------------------------------------------------------
# Listing.


def describe(config) -> str:
  """Every field as ``field = value  # meaning``, in schema order (extra kwargs entries too)."""
  lines = []

  def value_of(path):
    node = config
    for part in path.split("."):
      node = node[part]
    return node

  for path, field in FIELDS.items():
    value = value_of(path)
    if field.free:
      entries = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value)
      lines.append(f"{path} = {entries!r}  # {field.doc}")
    else:
      lines.append(f"{path} = {value!r}  # {field.doc}")
  return "\n".join(lines)


def to_dict(config) -> dict:
  """Plain nested dicts and tuples (for comparisons and JSON)."""
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def from_saved(raw: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config recorded as JSON (lists for tuples) -> ConfigDict; fields added to the framework
  since it was written take their defaults."""

  def to_tuples(x):
    if isinstance(x, dict):
      return {k: to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(to_tuples(v) for v in x)
    return x

  def merge(schema, base: ml_collections.ConfigDict, saved: Mapping[str, Any]):
    for name, value in saved.items():
      spec = schema.get(name) if isinstance(schema, dict) else None
      if isinstance(spec, dict) and isinstance(value, dict):
        merge(spec, base[name], value)
      elif isinstance(spec, Field) and spec.free:
        _set(base, name, dict(value))
      elif name in base:
        _set(base, name, value)
      else:
        with base.unlocked():
          base[name] = value  # an unknown field: check_fields names it

  config = defaults()
  merge(SCHEMA, config, to_tuples(dict(raw)))
  return config
