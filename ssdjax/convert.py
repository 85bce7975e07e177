r"""torchvision's ``ssd300_vgg16`` weights in ssdjax: state dict -> Flax params, and a workdir CLI.

  python -m ssdjax.convert --torchvision=ssd300_vgg16_coco-b556d3b4.pth --workdir=runs/tv_ssd300
  python -m ssdjax.convert --torchvision=FILE.pth --workdir=DIR \
      --config=configs/ssd300_coco_torchvision.py:coco80

The CLI writes a workdir as ``ssdjax.main`` does (``config.json``, ``anchors.npy``,
``version.json``) with the converted weights as the step-0 checkpoint (fresh optimizer state, no
input position), so ``python -m ssdjax.main --mode=eval``, ``python -m ssdjax.predict`` and
fine-tuning (``python -m ssdjax.main --config=... --workdir=DIR``) start from it. The config
(default ``configs/ssd300_coco_torchvision.py``) should reproduce torchvision's model: see that file.

Layer map (torchvision key -> ssdjax ``params`` path; conv kernels OIHW -> HWIO):

  backbone.features.{0,2,5,7,10,12,14,17,19,21}  -> backbone/conv1_1 ... conv4_3
  backbone.scale_weight                           -> backbone/l2norm/scale
  backbone.extra.0.{1,3,5}                        -> backbone/conv5_1, conv5_2, conv5_3
  backbone.extra.0.7.{1,3}                        -> backbone/fc6, fc7 (extra.0.0 / .7.0 are pools)
  backbone.extra.{i}.{0,2}, i >= 1                -> backbone/extras_{i-1}_0, extras_{i-1}_1
  head.regression_head.module_list.{i}            -> head/loc_{i}
  head.classification_head.module_list.{i}        -> head/conf_{i}

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

# torchvision's VGG16 ``features`` indices of conv1_1 ... conv4_3 (ReLUs and pools in between).
_VGG_FEATURES = {0: "conv1_1", 2: "conv1_2", 5: "conv2_1", 7: "conv2_2", 10: "conv3_1",
                 12: "conv3_2", 14: "conv3_3", 17: "conv4_1", 19: "conv4_2", 21: "conv4_3"}
# Inside ``backbone.extra.0`` (maxpool4, conv5_x + ReLUs, then Sequential(pool5, fc6, ReLU, fc7, ReLU)).
_VGG_EXTRA0 = {"1": "conv5_1", "3": "conv5_2", "5": "conv5_3", "7.1": "fc6", "7.3": "fc7"}
_SSD300_FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
_SSD300_IMAGE_SIZE = 300


def _to_numpy(value, key: str) -> np.ndarray:
  """A torch tensor or array-like -> float32 NumPy array (bf16/fp16 tensors included)."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu().float().numpy()
  try:
    return np.asarray(value, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"state dict entry {key!r} is not a numeric array: {type(value).__name__}") from e


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


def _head_layout(state: Mapping[str, np.ndarray], num_levels: int) -> tuple[tuple[int, ...], int]:
  """(K per level, number of classes) from the head's conv shapes."""
  ks, classes = [], set()
  for i in range(num_levels):
    for key in (f"head.regression_head.module_list.{i}.weight",
                f"head.classification_head.module_list.{i}.weight"):
      if key not in state:
        raise ValueError(f"state dict is missing key {key!r} (head level {i} of {num_levels})")
    k4 = state[f"head.regression_head.module_list.{i}.weight"].shape[0]
    cls_out = state[f"head.classification_head.module_list.{i}.weight"].shape[0]
    if k4 % 4 or cls_out % (k4 // 4):
      raise ValueError(
          f"head level {i}: head.regression_head.module_list.{i}.weight has {k4} outputs and "
          f"head.classification_head.module_list.{i}.weight {cls_out}; expected K*4 and K*C")
    ks.append(k4 // 4)
    classes.add(cls_out // (k4 // 4))
  if len(classes) != 1:
    raise ValueError("the classification head levels disagree on the number of classes: "
                     f"{sorted(classes)}")
  return tuple(ks), classes.pop()


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
  state = {str(k): _to_numpy(v, k) for k, v in state_dict.items()}
  layers = _layer_map(list(state))
  num_levels = sum(1 for p in layers if p.startswith("head.regression_head."))
  if num_levels != len(_SSD300_FEATURE_SIZES):
    raise ValueError(f"state dict has head.regression_head.module_list.* keys for {num_levels} levels; "
                     "expected the 6 of torchvision.models.detection.ssd300_vgg16")
  ks, tv_classes = _head_layout(state, num_levels)
  if class_index is not None:
    class_index = [int(c) for c in class_index]
    in_range = all(0 < c < tv_classes for c in class_index[1:])
    if len(class_index) < 2 or class_index[0] != 0 or not in_range or \
        len(set(class_index)) != len(class_index):
      raise ValueError(f"class_index must start with 0 (background) and list distinct torchvision "
                       f"classes in 1..{tv_classes - 1}; got {class_index}")
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
      if b.shape != (w.shape[0],):
        raise ValueError(f"state dict key {prefix + '.bias'!r} has shape {b.shape}; expected "
                         f"({w.shape[0]},) as {prefix + '.weight'!r}")
      h, wd, cin, _ = kernel.shape
      kernel = kernel.reshape(h, wd, cin, ks[level], tv_classes)[..., class_index]
      kernel = kernel.reshape(h, wd, cin, ks[level] * num_classes)
      b = b.reshape(ks[level], tv_classes)[:, class_index].reshape(-1)
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


def write_workdir(config, params: Mapping[str, Any], workdir: str) -> int:
  """Writes ``workdir`` as ``ssdjax.main`` would, with ``params`` as the step-0 checkpoint.

  The state is the trainer's fresh state (``config.seed``) with its params replaced; the
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
  want = trainer.abstract_state["params"]
  if jax.tree.structure(want) != jax.tree.structure(dict(params)) or any(
      w.shape != np.shape(p) for w, p in zip(jax.tree.leaves(want), jax.tree.leaves(dict(params)))):
    raise UserError("the converted parameters do not fit the model of the config (backbone "
                    f"{config.model.backbone}, head {config.model.head}, "
                    f"{config_lib.num_classes(config)} classes): use a config like "
                    "configs/ssd300_coco_torchvision.py")
  state = trainer.init_state(config.seed)
  state["params"] = jax.tree.map(
      lambda old, new: jax.device_put(np.asarray(new, old.dtype), old.sharding),
      state["params"], dict(params))
  train.write_run_records(config, workdir, trainer.anchors)
  mngr = checkpoints.manager(workdir, config.train.keep_checkpoints)
  try:
    checkpoints.save(mngr, 0, {"state": ocp.args.StandardSave(state)}, state=state)
  finally:
    mngr.close()
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "ssd300_coco_torchvision.py")


def _cli():
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ssdjax import cli  # pylint: disable=g-import-not-at-top

  tv_flag = flags.DEFINE_string("torchvision", None, "torchvision ssd300_vgg16 state dict (.pth).")
  workdir_flag = flags.DEFINE_string("workdir", None, "Empty directory to write the run into.")

  def main(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {argv[1:]}")
    if not tv_flag.value or not workdir_flag.value:
      raise UserError("--torchvision=FILE.pth and --workdir=DIR are required")
    _check_no_checkpoints(workdir_flag.value)
    # Default: configs/ssd300_coco_torchvision.py of the repository ssdjax was installed from.
    config = cli.parsed_config(default=DEFAULT_CONFIG)
    state_dict = load_state_dict(tv_flag.value)
    _, tv_classes = _head_layout({k: _to_numpy(v, k) for k, v in state_dict.items()
                                  if k.startswith("head.")}, 1)
    index = class_index_for(config, tv_classes, categories.COCO_V1_CLASSES)
    params = from_torchvision(state_dict, class_index=index)
    n = write_workdir(config, params, workdir_flag.value)
    print(f"converted {tv_flag.value} ({n:,} parameters, {config_lib.num_classes(config)} "
          f"classes) into {workdir_flag.value} as step 0. Next:\n"
          f"  python -m ssdjax.main --mode=eval --workdir={workdir_flag.value}\n"
          f"  python -m ssdjax.predict --workdir={workdir_flag.value} IMAGES...")

  cli.run(main)


if __name__ == "__main__":
  _cli()
