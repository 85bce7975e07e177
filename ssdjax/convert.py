r"""torchvision's ``ssd300_vgg16`` and ``ssdlite320_mobilenet_v3_large`` weights in ssdjax: state
dict -> Flax variables, and a workdir CLI.

  python -m ssdjax.convert --torchvision=ssd300_vgg16_coco-b556d3b4.pth --workdir=runs/tv_ssd300
  python -m ssdjax.convert --torchvision=FILE.pth --workdir=DIR \
      --config=configs/ssd300_coco_torchvision.py:coco80
  python -m ssdjax.convert --torchvision=ssdlite320_mobilenet_v3_large_coco-a79551df.pth \
      --workdir=runs/tv_ssdlite

The CLI writes a workdir as ``ssdjax.main`` does (``config.json``, ``anchors.npy``,
``version.json``) with the converted weights as the step-0 checkpoint (fresh optimizer state, no
input position), so ``python -m ssdjax.main --mode=eval``, ``python -m ssdjax.predict`` and
fine-tuning (``python -m ssdjax.main --config=... --workdir=DIR``) start from it. The config
(default ``configs/ssd300_coco_torchvision.py``; for an SSDLite state dict, recognised by its
keys, ``configs/ssdlite320_coco_torchvision.py``, with ``:full_tail`` when its MobileNetV3 tail is
full width) should reproduce torchvision's model: see those files.

Layer map (torchvision key -> ssdjax ``params`` path; conv kernels OIHW -> HWIO):

  backbone.features.{0,2,5,7,10,12,14,17,19,21}  -> backbone/conv1_1 ... conv4_3
  backbone.scale_weight                           -> backbone/l2norm/scale
  backbone.extra.0.{1,3,5}                        -> backbone/conv5_1, conv5_2, conv5_3
  backbone.extra.0.7.{1,3}                        -> backbone/fc6, fc7 (extra.0.0 / .7.0 are pools)
  backbone.extra.{i}.{0,2}, i >= 1                -> backbone/extras_{i-1}_0, extras_{i-1}_1
  head.regression_head.module_list.{i}            -> head/loc_{i}
  head.classification_head.module_list.{i}        -> head/conf_{i}

SSDLite layer map (:func:`from_torchvision_ssdlite`; backbone ``mobilenet_v3_large``, head
``ssdlite``; BatchNorm weight, bias, running mean and variance -> ``params`` scale and bias,
``batch_stats`` mean and var):

  backbone.features.0.{i}..., i < 13         -> backbone/features_{i}/... (torchvision's
                                                mobilenet_v3_large features[i], see
                                                ssdjax.models.mobilenet_v3.torchvision_layer_map)
  backbone.features.0.13.{0,1}               -> backbone/features_13/expand/{conv,bn}
  backbone.features.1.0.{j}..., j >= 1       -> backbone/features_13/{dw,se,project}/...
  backbone.features.1.{n}..., n >= 1         -> backbone/features_{13 + n}/...
  backbone.extra.{i}.{j}.{0,1}               -> backbone/extras_{i}_{j}/{conv,bn}
  head.regression_head.module_list.{i}.0.{0,1}     -> head/loc_{i}_dw/{conv,bn}
  head.regression_head.module_list.{i}.1           -> head/loc_{i}
  head.classification_head.module_list.{i}.0.{0,1} -> head/conf_{i}_dw/{conv,bn}
  head.classification_head.module_list.{i}.1       -> head/conf_{i}

Head channels need no permutation: torchvision reshapes a level's conv output [N, K*C, H, W] with
``view(N, K, C, H, W).permute(0, 3, 4, 1, 2)``, so channel ``k * C + c`` is class ``c`` of box ``k``
at (y, x), and ssdjax reads its NHWC channels as [K, C] (``ssdjax.models.heads``): the same order.

torch is imported only by the functions that read ``.pth`` files, so ``import ssdjax.convert``
stays light; :func:`from_torchvision` also takes NumPy arrays.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssdjax import config as config_lib
from ssdjax import models
from ssdjax.data import categories
from ssdjax.errors import UserError
from ssdjax.models import mobilenet_v3
from ssdjax.pretrained import to_numpy

# torchvision's VGG16 ``features`` indices of conv1_1 ... conv4_3 (ReLUs and pools in between).
_VGG_FEATURES = {0: "conv1_1", 2: "conv1_2", 5: "conv2_1", 7: "conv2_2", 10: "conv3_1",
                 12: "conv3_2", 14: "conv3_3", 17: "conv4_1", 19: "conv4_2", 21: "conv4_3"}
# Inside ``backbone.extra.0`` (maxpool4, conv5_x + ReLUs, then Sequential(pool5, fc6, ReLU, fc7, ReLU)).
_VGG_EXTRA0 = {"1": "conv5_1", "3": "conv5_2", "5": "conv5_3", "7.1": "fc6", "7.3": "fc7"}
_SSD300_FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
_SSD300_IMAGE_SIZE = 300
_SSDLITE_FEATURE_SIZES = (20, 10, 5, 3, 2, 1)
_SSDLITE_IMAGE_SIZE = 320


def _layer_map(keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """torchvision module prefix -> ssdjax params path, for every prefix the layout has.

  The number of extra blocks and head levels is taken from the keys (SSD300 has 4 and 6).
  """
  layers = {f"backbone.features.{i}": ("backbone", name) for i, name in _VGG_FEATURES.items()}
  layers.update({f"backbone.extra.0.{i}": ("backbone", name) for i, name in _VGG_EXTRA0.items()})
  extras = sorted({int(m.group(1)) for k in keys if (m := re.match(r"backbone\.extra\.(\d+)\.", k))
                   and int(m.group(1)) > 0})
  for i in extras:
    layers[f"backbone.extra.{i}.0"] = ("backbone", f"extras_{i - 1}_0")
    layers[f"backbone.extra.{i}.2"] = ("backbone", f"extras_{i - 1}_1")
  head_key = re.compile(r"head\.(?:regression|classification)_head\.module_list\.(\d+)\.")
  levels = sorted({int(m.group(1)) for k in keys if (m := head_key.match(k))})
  for i in levels:
    layers[f"head.regression_head.module_list.{i}"] = ("head", f"loc_{i}")
    layers[f"head.classification_head.module_list.{i}"] = ("head", f"conf_{i}")
  return layers


def _head_layout(state: Mapping[str, np.ndarray], num_levels: int,
                 conv: str = "") -> tuple[tuple[int, ...], int]:
  """(K per level, number of classes) from the head's conv shapes; ``conv`` is the output conv's
  place inside a level's module ("" for SSD300, "1." for SSDLite's depthwise + 1x1 block)."""
  ks, classes = [], set()
  for i in range(num_levels):
    reg_key = f"head.regression_head.module_list.{i}.{conv}weight"
    cls_key = f"head.classification_head.module_list.{i}.{conv}weight"
    for key in (reg_key, cls_key):
      if key not in state:
        raise ValueError(f"state dict is missing key {key!r} (head level {i} of {num_levels})")
    k4 = state[reg_key].shape[0]
    cls_out = state[cls_key].shape[0]
    if k4 % 4 or cls_out % (k4 // 4):
      raise ValueError(
          f"head level {i}: {reg_key} has {k4} outputs and {cls_key} {cls_out}; expected K*4 and "
          "K*C")
    ks.append(k4 // 4)
    classes.add(cls_out // (k4 // 4))
  if len(classes) != 1:
    raise ValueError("the classification head levels disagree on the number of classes: "
                     f"{sorted(classes)}")
  return tuple(ks), classes.pop()


def _check_class_index(class_index: Optional[Sequence[int]], tv_classes: int) -> Optional[list[int]]:
  """``class_index`` as a list of ints, checked against a head with ``tv_classes`` outputs."""
  if class_index is None:
    return None
  class_index = [int(c) for c in class_index]
  in_range = all(0 < c < tv_classes for c in class_index[1:])
  if len(class_index) < 2 or class_index[0] != 0 or not in_range or \
      len(set(class_index)) != len(class_index):
    raise ValueError(f"class_index must start with 0 (background) and list distinct torchvision "
                     f"classes in 1..{tv_classes - 1}; got {class_index}")
  return class_index


def _select_classes(kernel: np.ndarray, bias: np.ndarray, k: int, tv_classes: int,
                    class_index: Sequence[int], prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """The ``class_index`` columns of a classification conv: kernel [h, w, cin, K * C] and bias
  [K * C], both laid out [K, C] -> [h, w, cin, K * len(class_index)], [K * len(class_index)]."""
  if bias.shape != (kernel.shape[-1],):
    raise ValueError(f"state dict key {prefix + '.bias'!r} has shape {bias.shape}; expected "
                     f"({kernel.shape[-1]},) as {prefix + '.weight'!r}")
  h, w, cin, _ = kernel.shape
  kernel = kernel.reshape(h, w, cin, k, tv_classes)[..., list(class_index)]
  bias = bias.reshape(k, tv_classes)[:, list(class_index)].reshape(-1)
  return kernel.reshape(h, w, cin, k * len(class_index)), bias


def expected_params(*, num_classes: int, anchors_per_location: Sequence[int]) -> dict:
  """Shapes of the ``params`` of ssdjax's SSD300 (vgg16 backbone, ssd head): ShapeDtypeStructs."""
  model = models.SSD(num_classes=num_classes, anchors_per_location=tuple(anchors_per_location),
                     feature_sizes=_SSD300_FEATURE_SIZES,
                     backbone="vgg16", head="ssd")
  images = jnp.zeros((1, _SSD300_IMAGE_SIZE, _SSD300_IMAGE_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def from_torchvision(state_dict: Mapping[str, Any], *,
                     class_index: Optional[Sequence[int]] = None) -> dict:
  """Flax params of ``ssdjax.models.SSD`` (vgg16 + ssd head) for a torchvision SSD300-VGG16.

  Args:
    state_dict: ``torchvision.models.detection.ssd300_vgg16(...).state_dict()`` (or a ``.pth`` of
      it loaded with ``torch.load``): torch tensors or NumPy arrays, conv weights OIHW.
    class_index: optional torchvision class (output column) for each ssdjax class, background
      first, e.g. the 81 columns of the 80 real COCO classes; the classification head keeps only
      those columns, in this order. None keeps all of them.

  Returns:
    The ``params`` collection as nested dicts of float32 NumPy arrays, the tree that
    ``models.SSD(num_classes=C, anchors_per_location=K, feature_sizes=(38, 19, 10, 5, 3, 1),
    backbone="vgg16", head="ssd").init`` makes (C = torchvision's classes or ``len(class_index)``,
    K from the head, 4, 6, 6, 6, 4, 4 for SSD300).

  Raises:
    ValueError: naming the key, for a missing key, a key that no layer uses, a tensor whose shape
      does not fit its layer, a non-finite value, or a bad ``class_index``.
  """
  state = {str(k): to_numpy(v, k) for k, v in state_dict.items()}
  layers = _layer_map(list(state))
  num_levels = sum(1 for p in layers if p.startswith("head.regression_head."))
  if num_levels != len(_SSD300_FEATURE_SIZES):
    raise ValueError(f"state dict has head.regression_head.module_list.* keys for {num_levels} levels; "
                     "expected the 6 of torchvision.models.detection.ssd300_vgg16")
  ks, tv_classes = _head_layout(state, num_levels)
  class_index = _check_class_index(class_index, tv_classes)
  num_classes = tv_classes if class_index is None else len(class_index)
  expected = expected_params(num_classes=num_classes, anchors_per_location=ks)

  params: dict = {}
  used = set()

  def put(path, leaf, value, key):
    node = expected
    for p in path:
      if p not in node:
        raise ValueError(f"state dict key {key!r} maps to {'/'.join(path)}, which this model lacks")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"state dict key {key!r} maps to {'/'.join(path + (leaf,))}, which this "
                       "model lacks")
    want = node[leaf].shape
    if value.shape != tuple(want):
      raise ValueError(f"state dict key {key!r} has shape {tuple(state[key].shape)}, which gives "
                       f"{value.shape} for {'/'.join(path + (leaf,))}; expected {tuple(want)}")
    if not np.isfinite(value).all():
      raise ValueError(f"state dict key {key!r} contains NaN or inf")
    target = params
    for p in path:
      target = target.setdefault(p, {})
    target[leaf] = value
    used.add(key)

  def take(key):
    if key not in state:
      raise ValueError(f"state dict is missing key {key!r}")
    return state[key]

  for prefix, path in layers.items():
    w, b = take(f"{prefix}.weight"), take(f"{prefix}.bias")
    if w.ndim != 4:
      raise ValueError(f"state dict key {prefix + '.weight'!r} has shape {w.shape}; expected a conv "
                       "weight [out, in, kh, kw]")
    kernel = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if prefix.startswith("head.classification_head.") and class_index is not None:
      level = int(prefix.rsplit(".", 1)[1])
      kernel, b = _select_classes(kernel, b, ks[level], tv_classes, class_index, prefix)
    put(path, "kernel", kernel, f"{prefix}.weight")
    put(path, "bias", b, f"{prefix}.bias")
  put(("backbone", "l2norm"), "scale", take("backbone.scale_weight"), "backbone.scale_weight")

  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"state dict key {unused[0]!r} is not used by ssdjax's SSD300-VGG16"
                     + (f" (and {len(unused) - 1} more: {unused[1:6]})" if len(unused) > 1 else ""))
  missing = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]
             if _get(params, p) is None]
  if missing:
    raise ValueError(f"no state dict key fills the ssdjax parameters {missing}")
  return params


def _get(tree, path):
  for p in path:
    tree = tree.get(p.key) if isinstance(tree, dict) else None
    if tree is None:
      return None
  return tree


# ----------------------------------------------------------------------------- SSDLite320


def is_ssdlite(keys: Sequence[str]) -> bool:
  """Whether a torchvision detection state dict is SSDLite's (``backbone.features.0`` holding the
  MobileNetV3 trunk as a Sequential, ``backbone.features.0.0.0.weight``) rather than SSD300's
  (``backbone.features.0.weight``, VGG16's first conv)."""
  return any(str(k).startswith("backbone.features.0.0.") for k in keys)


def _ssdlite_backbone_prefix(prefix: str) -> str:
  """A ``mobilenet_v3_large`` classification prefix -> its place in SSDLite's feature extractor.

  ``SSDLiteFeatureExtractorMobileNet`` splits the trunk at the C4 block (features[13]):
  ``features.0`` = features[:13] + features[13].block[0] (the expansion), ``features.1`` =
  features[13].block[1:] (a sliced Sequential, which keeps the block's indices) + features[14:].
  """
  _, i, rest = prefix.split(".", 2)
  i, c4 = int(i), mobilenet_v3.C4_INDEX
  if i < c4:
    return f"backbone.features.0.{i}.{rest}"
  if i == c4:
    _, j, layer = rest.split(".", 2)  # "block", j, the layer inside the block
    return f"backbone.features.0.{c4}.{layer}" if j == "0" else f"backbone.features.1.0.{j}.{layer}"
  return f"backbone.features.1.{i - c4}.{rest}"


def ssdlite_layer_map(num_levels: int = len(_SSDLITE_FEATURE_SIZES)) -> dict[str, tuple[str, ...]]:
  """torchvision module prefix -> ssdjax module path (``backbone/...`` or ``head/...``) for
  ``ssdlite320_mobilenet_v3_large``: every conv and BatchNorm (see the module docstring)."""
  layers = {_ssdlite_backbone_prefix(prefix): ("backbone",) + path
            for prefix, path in mobilenet_v3.torchvision_layer_map(()).items()}
  for i in range(num_levels - 2):
    for j in range(3):  # _extra_block: 1x1, depthwise 3x3, 1x1, each Conv2dNormActivation
      layers[f"backbone.extra.{i}.{j}.0"] = ("backbone", f"extras_{i}_{j}", "conv")
      layers[f"backbone.extra.{i}.{j}.1"] = ("backbone", f"extras_{i}_{j}", "bn")
  for i in range(num_levels):
    for branch, name in (("regression", "loc"), ("classification", "conf")):
      prefix = f"head.{branch}_head.module_list.{i}"
      layers[f"{prefix}.0.0"] = ("head", f"{name}_{i}_dw", "conv")
      layers[f"{prefix}.0.1"] = ("head", f"{name}_{i}_dw", "bn")
      layers[f"{prefix}.1"] = ("head", f"{name}_{i}")
  return layers


# torchvision's mobilenet_v3_large last 1x1 conv (features[16]) inside SSDLite's features.1.
_SSDLITE_LAST_CONV = _ssdlite_backbone_prefix(f"features.{mobilenet_v3.LAST_INDEX}.0") + ".weight"


def ssdlite_reduced_tail(state_dict: Mapping[str, Any]) -> bool:
  """Whether an SSDLite state dict has MobileNetV3's reduced tail (last conv 480 channels, not
  960)."""
  if _SSDLITE_LAST_CONV not in state_dict:
    raise ValueError(f"state dict is missing key {_SSDLITE_LAST_CONV!r} (MobileNetV3's last conv)")
  out = int(np.shape(state_dict[_SSDLITE_LAST_CONV])[0])
  if out not in (480, 960):
    raise ValueError(f"state dict key {_SSDLITE_LAST_CONV!r} has {out} output channels; expected "
                     "480 (reduced tail) or 960 (full tail), torchvision's mobilenet_v3_large")
  return out == 480


def expected_ssdlite_variables(*, num_classes: int, anchors_per_location: Sequence[int],
                               reduced_tail: bool) -> dict:
  """Shapes of ``{params, batch_stats}`` of ssdjax's SSDLite320 (mobilenet_v3_large + ssdlite)."""
  model = models.SSD(num_classes=num_classes, anchors_per_location=tuple(anchors_per_location),
                     feature_sizes=_SSDLITE_FEATURE_SIZES, backbone="mobilenet_v3_large",
                     head="ssdlite", backbone_kwargs={"reduced_tail": reduced_tail})
  images = jnp.zeros((1, _SSDLITE_IMAGE_SIZE, _SSDLITE_IMAGE_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)


# Flax leaf -> torch tensor name of the same layer.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_TORCH_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def from_torchvision_ssdlite(state_dict: Mapping[str, Any], *,
                             class_index: Optional[Sequence[int]] = None) -> dict:
  """Flax variables of ssdjax's SSDLite320 for torchvision's ``ssdlite320_mobilenet_v3_large``.

  Args:
    state_dict: ``ssdlite320_mobilenet_v3_large(...).state_dict()`` (torch tensors or NumPy
      arrays), reduced or full MobileNetV3 tail (:func:`ssdlite_reduced_tail` tells which).
    class_index: as for :func:`from_torchvision`.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32 NumPy arrays, the trees
    that ``models.SSD(num_classes=C, anchors_per_location=(6,) * 6, feature_sizes=(20, 10, 5, 3,
    2, 1), backbone="mobilenet_v3_large", head="ssdlite", backbone_kwargs={"reduced_tail": ...})
    .init`` makes at 320x320 (``configs/ssdlite320_coco_torchvision.py``).

  Raises:
    ValueError: naming the key, for a missing key, a key that no layer uses, a tensor whose shape
      does not fit its layer, a non-finite value, or a bad ``class_index``.
  """
  state = {str(k): to_numpy(v, k) for k, v in state_dict.items()}
  num_levels = len(_SSDLITE_FEATURE_SIZES)
  ks, tv_classes = _head_layout(state, num_levels, "1.")
  class_index = _check_class_index(class_index, tv_classes)
  num_classes = tv_classes if class_index is None else len(class_index)
  reduced_tail = ssdlite_reduced_tail(state)
  layers = ssdlite_layer_map(num_levels)
  unused = sorted(k for k in state if k.rsplit(".", 1)[0] not in layers
                  or k.rsplit(".", 1)[1] not in _TORCH_LEAVES)
  if unused:
    raise ValueError(f"state dict key {unused[0]!r} is not used by ssdjax's SSDLite320-MobileNetV3"
                     + (f" (and {len(unused) - 1} more: {unused[1:6]})" if len(unused) > 1 else ""))
  variables = mobilenet_v3.params_from_torchvision(state, layers)
  if class_index is not None:
    for i, k in enumerate(ks):
      conf = variables["params"]["head"].get(f"conf_{i}", {})
      if "bias" not in conf:
        raise ValueError("state dict is missing key "
                         f"'head.classification_head.module_list.{i}.1.bias'")
      conf["kernel"], conf["bias"] = _select_classes(
          conf["kernel"], conf["bias"], k, tv_classes, class_index,
          f"head.classification_head.module_list.{i}.1")

  expected = expected_ssdlite_variables(num_classes=num_classes, anchors_per_location=ks,
                                        reduced_tail=reduced_tail)
  prefixes = {path: prefix for prefix, path in layers.items()}

  def torch_key(path):
    return f"{prefixes.get(path[:-1], '/'.join(path[:-1]))}.{_TORCH_LEAF.get(path[-1], path[-1])}"

  for collection in ("params", "batch_stats"):
    flat = lambda tree: {tuple(p.key for p in path): v
                         for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got, want = flat(variables[collection]), flat(expected[collection])
    for path, value in got.items():
      key, where = torch_key(path), f"{collection}/{'/'.join(path)}"
      if path not in want:
        raise ValueError(f"state dict key {key!r} maps to {where}, which this model lacks")
      if value.shape != want[path].shape:
        raise ValueError(f"state dict key {key!r} has shape {tuple(state[key].shape)}, which gives "
                         f"{value.shape} for {where}; expected {tuple(want[path].shape)}")
      if not np.isfinite(value).all():
        raise ValueError(f"state dict key {key!r} contains NaN or inf")
    missing = [path for path in want if path not in got]
    if missing:
      raise ValueError(f"state dict is missing key {torch_key(missing[0])!r} (for "
                       f"{collection}/{'/'.join(missing[0])})")
  return variables


def load_state_dict(path: str) -> dict:
  """A torchvision state dict from a ``.pth`` file (``torch.load(weights_only=True)``).

  Accepts a bare state dict or a training checkpoint ``{"model": state_dict, ...}`` as
  torchvision's reference scripts save it.
  """
  import torch  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise UserError(f"--torchvision: {path} is not a file")
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return dict(obj)


def class_index_for(config, tv_classes: int, categories: Sequence[str]) -> Optional[tuple[int, ...]]:
  """The ``class_index`` that maps a torchvision head with ``tv_classes`` outputs onto a config.

  None when the config has as many classes (kept as they are); otherwise every name of
  ``config.class_names`` is looked up in ``categories`` (the torchvision output names without
  background, e.g. ``ssdjax.data.categories.COCO_V1_CLASSES``).
  """
  num_classes = config_lib.num_classes(config)
  if num_classes == tv_classes:
    return None
  if len(categories) + 1 != tv_classes:
    raise UserError(f"the config has {num_classes} classes (background + config.class_names), "
                    f"the checkpoint {tv_classes}, and {len(categories)} category names cannot "
                    "map them")
  index = [0]
  for name in config.class_names:
    if name not in categories:
      raise UserError(f"config.class_names has {name!r}, which is not one of the checkpoint's "
                       f"classes; valid names: {', '.join(categories)}")
    index.append(list(categories).index(name) + 1)
  return tuple(index)


def _check_no_checkpoints(workdir: str) -> None:
  existing = os.path.join(workdir, "checkpoints")
  if os.path.isdir(existing) and os.listdir(existing):
    raise ValueError(f"{existing} already holds checkpoints; give an empty --workdir")


def write_workdir(config, params: Mapping[str, Any], workdir: str, *,
                  batch_stats: Optional[Mapping[str, Any]] = None) -> int:
  """Writes ``workdir`` as ``ssdjax.main`` would, with ``params`` as the step-0 checkpoint.

  The state is the trainer's fresh state (``config.seed``) with its params replaced, and its
  BatchNorm statistics by ``batch_stats`` when given (None keeps the fresh ones); the
  checkpoint holds the ``state`` item only (no input position: training starts the input from
  its beginning). Returns the number of parameters.

  Raises:
    ValueError: the workdir already holds checkpoints, or ``params`` does not fit the config's model.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from ssdjax import checkpoints  # pylint: disable=g-import-not-at-top
  from ssdjax import train  # pylint: disable=g-import-not-at-top

  _check_no_checkpoints(workdir)
  config_lib.validate(config)
  config = config_lib.parts_as_recorded(config)
  trainer = train.Trainer(config)
  replace = {"params": params} if batch_stats is None else {"params": params,
                                                             "batch_stats": batch_stats}
  for collection, new in replace.items():
    want = trainer.abstract_state[collection]
    if jax.tree.structure(want) != jax.tree.structure(dict(new)) or any(
        w.shape != np.shape(p) for w, p in zip(jax.tree.leaves(want), jax.tree.leaves(dict(new)))):
      raise UserError(f"the converted {collection} do not fit the model of the config (backbone "
                      f"{config.model.backbone} {dict(config.model.backbone_kwargs)}, head "
                      f"{config.model.head}, {config_lib.num_classes(config)} classes): use a "
                      "config like configs/ssd300_coco_torchvision.py or "
                      "configs/ssdlite320_coco_torchvision.py (:full_tail for a full-width tail)")
  state = trainer.init_state(config.seed)
  for collection, new in replace.items():
    state[collection] = jax.tree.map(
        lambda old, new: jax.device_put(np.asarray(new, old.dtype), old.sharding),
        state[collection], dict(new))
  train.write_run_records(config, workdir, trainer.anchors)
  mngr = checkpoints.manager(workdir, config.train.keep_checkpoints)
  try:
    checkpoints.save(mngr, 0, {"state": ocp.args.StandardSave(state)}, state=state)
  finally:
    mngr.close()
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "ssd300_coco_torchvision.py")
DEFAULT_SSDLITE_CONFIG = os.path.join(os.path.dirname(DEFAULT_CONFIG),
                                      "ssdlite320_coco_torchvision.py")


def default_config(state_dict: Mapping[str, Any]) -> str:
  """The config spec that reproduces a torchvision state dict's model: ``DEFAULT_CONFIG`` for
  SSD300, ``DEFAULT_SSDLITE_CONFIG`` for SSDLite (``:full_tail`` for a full-width MobileNetV3
  tail), in the repository ssdjax was installed from."""
  if not is_ssdlite(state_dict):
    return DEFAULT_CONFIG
  return DEFAULT_SSDLITE_CONFIG + ("" if ssdlite_reduced_tail(state_dict) else ":full_tail")


def _cli():
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ssdjax import cli  # pylint: disable=g-import-not-at-top

  tv_flag = flags.DEFINE_string("torchvision", None, "torchvision ssd300_vgg16 or "
                                "ssdlite320_mobilenet_v3_large state dict (.pth).")
  workdir_flag = flags.DEFINE_string("workdir", None, "Empty directory to write the run into.")

  def main(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {argv[1:]}")
    if not tv_flag.value or not workdir_flag.value:
      raise UserError("--torchvision=FILE.pth and --workdir=DIR are required")
    _check_no_checkpoints(workdir_flag.value)
    state_dict = load_state_dict(tv_flag.value)
    ssdlite = is_ssdlite(state_dict)
    config = cli.parsed_config(default=default_config(state_dict))
    _, tv_classes = _head_layout({k: to_numpy(v, k) for k, v in state_dict.items()
                                  if k.startswith("head.")}, 1, "1." if ssdlite else "")
    index = class_index_for(config, tv_classes, categories.COCO_V1_CLASSES)
    if ssdlite:
      variables = from_torchvision_ssdlite(state_dict, class_index=index)
      n = write_workdir(config, variables["params"], workdir_flag.value,
                        batch_stats=variables["batch_stats"])
    else:
      n = write_workdir(config, from_torchvision(state_dict, class_index=index), workdir_flag.value)
    print(f"converted {tv_flag.value} ({n:,} parameters, {config_lib.num_classes(config)} "
          f"classes) into {workdir_flag.value} as step 0. Next:\n"
          f"  python -m ssdjax.main --mode=eval --workdir={workdir_flag.value}\n"
          f"  python -m ssdjax.predict --workdir={workdir_flag.value} IMAGES...")

  cli.run(main)


if __name__ == "__main__":
  _cli()
