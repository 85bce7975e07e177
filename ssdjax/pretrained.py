r"""ImageNet-pretrained backbones: torchvision classification checkpoints -> ssdjax backbone weights.

  python -m ssdjax.pretrained --torchvision=resnet50-0676ba61.pth --backbone=resnet50 \
      --out=resnet50_imagenet.npz

``config.model.pretrained`` names such a ``.npz`` (no torch needed at training time) or the
``.pth`` itself (torch needed); a fresh run starts its backbone trunk from it, while the extra
levels and the head keep their initialisation (as torchvision's SSD builders do). A resumed run
never reads it again.

Supported (``config.model.backbone``: torchvision builder and checkpoint):

  vgg16               ``vgg16``: ``IMAGENET1K_FEATURES`` (the weights torchvision's ``ssd300_vgg16``
                      starts from) or ``IMAGENET1K_V1``. With a finite classifier (V1), fc6 and
                      fc7 are the paper's "reduced fc": ``classifier.0`` and ``classifier.3``
                      subsampled (every 4th output and input channel, every 3rd tap of fc6's 7x7)
                      to 1024 channels and a dilated 3x3; otherwise they keep their initialisation,
                      as in torchvision.
  resnet18/34/50      ``resnet18`` / ``resnet34`` / ``resnet50`` (conv1 .. layer3; ``layer4`` and
                      ``fc`` are not used: NVIDIA's SSD300 layout stops at conv4_x).
  mobilenet_v2        ``mobilenet_v2`` (every ``features`` layer).
  mobilenet_v3_large  ``mobilenet_v3_large`` (every ``features`` layer).

The map from torchvision names to ssdjax's is derived from the model's own module tree, so it
follows ``backbone_kwargs`` (depth, width); a torchvision key that is missing, left unused (other
than the classification head named above) or of the wrong shape stops the conversion with its
name. Conv kernels go OIHW -> HWIO; a BatchNorm's ``weight``/``bias`` become ``scale``/``bias``
and its running mean and variance the ``batch_stats``.

Freezing (``config.model.trainable_backbone_layers``, ``config.model.freeze_backbone_bn``) counts
the trunk's stages as torchvision does; the stages are in :data:`STAGES` per backbone.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from ssdjax.errors import UserError

Tree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one ssdjax backbone reads a torchvision classification checkpoint.

  Attributes:
    layer_map: (abstract backbone ``params`` tree, backbone kwargs) -> {torch module prefix:
      ssdjax module path inside the backbone}, for every trunk layer the model has.
    unused: torch key prefixes a detector does not use (the classification head).
    stages: (backbone top-level module names) -> the trunk's stages in order, each a tuple of
      top-level module names; ``trainable_backbone_layers=n`` trains the last n of them.
    extra: optional (state dict, converted params) -> extra converted params, for layers built
      from more than one tensor (VGG16's reduced fc6/fc7); returns the keys it used.
  """
  layer_map: Callable[[Tree, Mapping[str, Any]], dict[str, tuple[str, ...]]]
  unused: tuple[str, ...]
  stages: Callable[[Sequence[str]], list[tuple[str, ...]]]
  extra: Optional[Callable[[Mapping[str, np.ndarray], Tree], set[str]]] = None


# ----------------------------------------------------------------------------- VGG16

_VGG_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")


def _vgg_layers(tree: Tree, kwargs) -> dict[str, tuple[str, ...]]:
  del tree, kwargs
  return {f"features.{i}": (name,) for i, name in zip(_VGG_FEATURES, _VGG_NAMES)}


def _vgg_stages(names: Sequence[str]) -> list[tuple[str, ...]]:
  # torchvision's _vgg_extractor: a stage starts at conv1_1 and after each of the first 4 pools.
  return [tuple(n for n in _VGG_NAMES if n.startswith(f"conv{s}_")) for s in range(1, 6)]


def decimate(w: np.ndarray, steps: Sequence[Optional[int]]) -> np.ndarray:
  """Every ``steps[d]``-th entry along each axis d (None keeps the axis): Caffe SSD's reduced fc."""
  for d, s in enumerate(steps):
    if s:
      w = np.take(w, np.arange(0, w.shape[d], s), axis=d)
  return w


def _vgg_reduced_fc(state: Mapping[str, np.ndarray], params: Tree) -> set[str]:
  """fc6/fc7 from the ImageNet classifier, subsampled as in the SSD paper (section 3)."""
  keys = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
  if not all(k in state for k in keys) or not all(np.isfinite(state[k]).all() for k in keys):
    return set()  # IMAGENET1K_FEATURES: the classifier holds NaN; fc6/fc7 keep their init
  w6 = state["classifier.0.weight"]
  if w6.shape != (4096, 512 * 7 * 7):
    raise ValueError(f"state dict key 'classifier.0.weight' has shape {w6.shape}; expected "
                     "(4096, 25088) (VGG16's fc6 on a 7x7x512 map)")
  w6 = decimate(w6.reshape(4096, 512, 7, 7), (4, None, 3, 3))  # [1024, 512, 3, 3]
  w7 = decimate(state["classifier.3.weight"].reshape(4096, 4096, 1, 1), (4, 4, None, None))
  params["fc6"] = {"kernel": w6.transpose(2, 3, 1, 0), "bias": decimate(state["classifier.0.bias"], (4,))}
  params["fc7"] = {"kernel": w7.transpose(2, 3, 1, 0), "bias": decimate(state["classifier.3.bias"], (4,))}
  return set(keys)


# ----------------------------------------------------------------------------- ResNet


def _resnet_layers(tree: Tree, kwargs) -> dict[str, tuple[str, ...]]:
  del kwargs
  layers = {"conv1": ("conv1", "conv"), "bn1": ("conv1", "bn")}
  for name, block in tree.items():
    m = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if not m:
      continue
    prefix = f"layer{m.group(1)}.{m.group(2)}"
    for child in block:
      if child == "downsample":
        layers[f"{prefix}.downsample.0"] = (name, child, "conv")
        layers[f"{prefix}.downsample.1"] = (name, child, "bn")
      else:  # conv1 .. conv3: torchvision's conv{j} and bn{j}
        j = child[len("conv"):]
        layers[f"{prefix}.conv{j}"] = (name, child, "conv")
        layers[f"{prefix}.bn{j}"] = (name, child, "bn")
  return layers


def _resnet_stages(names: Sequence[str]) -> list[tuple[str, ...]]:
  # torchvision: ["conv1", "layer1", "layer2", "layer3", "layer4"]; ssdjax's trunk ends at layer3.
  return [("conv1",)] + [tuple(n for n in names if n.startswith(f"layer{s}_")) for s in (1, 2, 3)]


# ----------------------------------------------------------------------------- MobileNetV2


def _mobilenet_v2_layers(tree: Tree, kwargs) -> dict[str, tuple[str, ...]]:
  del kwargs
  layers = {}
  for name, module in tree.items():
    m = re.fullmatch(r"features_(\d+)", name)
    if not m:
      continue
    i = m.group(1)
    if "conv" in module:  # the stem and the last 1x1: Conv2dNormActivation
      layers[f"features.{i}.0"] = (name, "conv")
      layers[f"features.{i}.1"] = (name, "bn")
      continue
    # InvertedResidual.conv: [expand (ConvBNReLU6)], depthwise (ConvBNReLU6), project conv, bn.
    parts = (["expand"] if "expand" in module else []) + ["dw"]
    for j, part in enumerate(parts):
      layers[f"features.{i}.conv.{j}.0"] = (name, part, "conv")
      layers[f"features.{i}.conv.{j}.1"] = (name, part, "bn")
    layers[f"features.{i}.conv.{len(parts)}"] = (name, "project", "conv")
    layers[f"features.{i}.conv.{len(parts) + 1}"] = (name, "project", "bn")
  return layers


def mobilenet_stages(names: Sequence[str], strided: Sequence[int]) -> list[tuple[str, ...]]:
  """torchvision's ``_mobilenet_extractor`` stages: ``features[s_j : s_{j+1}]`` for the stage
  starts s = [0] + the strided blocks + [the last layer]; the last layer is a stage of its own."""
  indices = sorted(int(n.split("_")[1]) for n in names if re.fullmatch(r"features_\d+", n))
  starts = [0] + list(strided) + [indices[-1]]
  bounds = starts + [indices[-1] + 1]
  return [tuple(f"features_{i}" for i in indices if bounds[j] <= i < bounds[j + 1])
          for j in range(len(starts))]


def _mobilenet_v2_stages(names: Sequence[str]) -> list[tuple[str, ...]]:
  # The first block of each stride-2 stage of MobileNetV2's table: features 2, 4, 7 and 14.
  return mobilenet_stages(names, (2, 4, 7, 14))


def _mobilenet_v3_layers(tree: Tree, kwargs) -> dict[str, tuple[str, ...]]:
  del tree, kwargs
  from ssdjax.models import mobilenet_v3  # pylint: disable=g-import-not-at-top
  return mobilenet_v3.torchvision_layer_map(())


def _mobilenet_v3_stages(names: Sequence[str]) -> list[tuple[str, ...]]:
  del names
  from ssdjax.models import mobilenet_v3  # pylint: disable=g-import-not-at-top
  return mobilenet_v3.torchvision_stages()


LAYOUTS: dict[str, Layout] = {
    "vgg16": Layout(_vgg_layers, ("classifier.",), _vgg_stages, _vgg_reduced_fc),
    "resnet18": Layout(_resnet_layers, ("layer4.", "fc."), _resnet_stages),
    "resnet34": Layout(_resnet_layers, ("layer4.", "fc."), _resnet_stages),
    "resnet50": Layout(_resnet_layers, ("layer4.", "fc."), _resnet_stages),
    "mobilenet_v2": Layout(_mobilenet_v2_layers, ("classifier.",), _mobilenet_v2_stages),
    "mobilenet_v3_large": Layout(_mobilenet_v3_layers, ("classifier.",), _mobilenet_v3_stages),
}


def register(backbone: str, layout: Layout) -> None:
  """Makes ``config.model.pretrained`` and freezing work for another backbone (e.g. one of a
  researcher's package): ``layout`` says how it reads a torchvision checkpoint."""
  LAYOUTS[backbone] = layout


def layout(backbone: str) -> Layout:
  if backbone not in LAYOUTS:
    raise UserError(f"config.model.backbone={backbone!r} has no pretrained-weight layout; "
                    f"backbones with one: {', '.join(sorted(LAYOUTS))} (ssdjax.pretrained.register "
                    "adds another)")
  return LAYOUTS[backbone]


# ----------------------------------------------------------------------------- conversion


def to_numpy(value, key: str) -> np.ndarray:
  """A torch tensor or array-like -> float32 NumPy array (bf16/fp16 tensors included)."""
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu().float().numpy()
  try:
    return np.asarray(value, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"state dict entry {key!r} is not a numeric array: {type(value).__name__}") from e


def _set(tree: Tree, path: Sequence[str], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _lookup(tree: Tree, path: Sequence[str]):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def convert(state_dict: Mapping[str, Any], backbone: str, abstract: Mapping[str, Tree],
            backbone_kwargs: Optional[Mapping[str, Any]] = None,
            used_keys: Optional[set[str]] = None) -> dict[str, Tree]:
  """A torchvision classification state dict -> ssdjax backbone variables.

  Args:
    state_dict: e.g. ``torchvision.models.resnet50(weights=...).state_dict()``: torch tensors or
      NumPy arrays.
    backbone: the ssdjax backbone name (a key of :data:`LAYOUTS`).
    abstract: the backbone's variables as the model initialises them (shapes suffice):
      ``{"params": ..., "batch_stats": ...}``, the subtrees under ``"backbone"``.
    backbone_kwargs: the backbone's ``config.model.backbone_kwargs``.
    used_keys: if given, receives the state dict keys the conversion read.

  Returns:
    ``{"params": ..., "batch_stats": ...}``: float32 NumPy arrays for the trunk layers only.

  Raises:
    ValueError: naming the key, for a missing or unused key, a wrongly shaped or non-finite tensor.
  """
  lay = layout(backbone)
  state = {str(k): to_numpy(v, str(k)) for k, v in state_dict.items()}
  params_abs, stats_abs = abstract.get("params", {}), abstract.get("batch_stats", {})
  out: dict[str, Tree] = {"params": {}, "batch_stats": {}}
  used: set[str] = set() if used_keys is None else used_keys

  def take(key: str) -> np.ndarray:
    if key not in state:
      raise ValueError(f"state dict is missing key {key!r} (a {backbone} trunk layer)")
    used.add(key)
    return state[key]

  def put(collection: str, path: tuple[str, ...], value: np.ndarray, key: str) -> None:
    want = _lookup(params_abs if collection == "params" else stats_abs, path)
    where = "/".join(path)
    if want is None or not hasattr(want, "shape"):
      raise ValueError(f"state dict key {key!r} maps to {collection} {where}, which this "
                       f"{backbone} lacks")
    if value.shape != tuple(want.shape):
      raise ValueError(f"state dict key {key!r} has shape {state[key].shape}, which gives "
                       f"{value.shape} for {where}; expected {tuple(want.shape)} (check "
                       "config.model.backbone and backbone_kwargs against the checkpoint)")
    if not np.isfinite(value).all():
      raise ValueError(f"state dict key {key!r} contains NaN or inf")
    _set(out[collection], path, value)

  for prefix, path in lay.layer_map(params_abs, dict(backbone_kwargs or {})).items():
    if f"{prefix}.running_mean" in state or _lookup(stats_abs, path) is not None:  # BatchNorm
      put("params", path + ("scale",), take(f"{prefix}.weight"), f"{prefix}.weight")
      put("params", path + ("bias",), take(f"{prefix}.bias"), f"{prefix}.bias")
      put("batch_stats", path + ("mean",), take(f"{prefix}.running_mean"), f"{prefix}.running_mean")
      put("batch_stats", path + ("var",), take(f"{prefix}.running_var"), f"{prefix}.running_var")
      if f"{prefix}.num_batches_tracked" in state:
        used.add(f"{prefix}.num_batches_tracked")
      continue
    w = take(f"{prefix}.weight")
    if w.ndim != 4:
      raise ValueError(f"state dict key {prefix + '.weight'!r} has shape {w.shape}; expected a "
                       "conv weight [out, in, kh, kw]")
    put("params", path + ("kernel",), w.transpose(2, 3, 1, 0), f"{prefix}.weight")
    if f"{prefix}.bias" in state or _lookup(params_abs, path + ("bias",)) is not None:
      put("params", path + ("bias",), take(f"{prefix}.bias"), f"{prefix}.bias")

  if lay.extra is not None:
    extra: Tree = {}
    for key in lay.extra(state, extra):
      used.add(key)
    for name, leaves in extra.items():
      for leaf, value in leaves.items():
        put("params", (name, leaf), np.asarray(value, np.float32), f"{name}/{leaf}")

  unused = sorted(k for k in set(state) - used if not k.startswith(lay.unused))
  if unused:
    raise ValueError(f"state dict key {unused[0]!r} is not used by ssdjax's {backbone} trunk"
                     + (f" (and {len(unused) - 1} more: {unused[1:6]})" if len(unused) > 1 else "")
                     + "; is it a checkpoint of another network?")
  return out


def fill(variables: Mapping[str, Tree], converted: Mapping[str, Tree]) -> tuple[dict, int]:
  """``variables`` (the model's: ``{"params": {"backbone": ...}, "batch_stats": ...}``) with the
  backbone leaves that ``converted`` holds replaced; returns (new variables, leaves replaced)."""
  count = 0

  def replace(collection):
    nonlocal count
    tree = variables.get(collection, {})
    if "backbone" not in tree:
      return tree
    flat = jax.tree_util.tree_flatten_with_path(tree["backbone"])[0]
    leaves = []
    for path, old in flat:
      new = _lookup(converted.get(collection, {}), [p.key for p in path])
      if new is None:
        leaves.append(old)
        continue
      count += 1
      leaves.append(np.asarray(new, dtype=old.dtype))
    backbone = jax.tree.unflatten(jax.tree.structure(tree["backbone"]), leaves)
    return {**tree, "backbone": backbone}

  return {**variables, "params": replace("params"), "batch_stats": replace("batch_stats")}, count


# ----------------------------------------------------------------------------- files


def load_state_dict(path: str, what: str = "config.model.pretrained") -> dict:
  """A torchvision state dict from a ``.pth`` (torch needed) or a state dict saved as ``.npz``."""
  if not os.path.isfile(path):
    raise UserError(f"{what}={path!r} is not a file; fetch torchvision's ImageNet weights and "
                    "convert them (docs/models.md)" + (
                        ", or give --config.model.pretrained=None to start from random weights"
                        if what == "config.model.pretrained" else ""))
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"reading {path} needs torch (pip install 'ssdjax[convert]'), or convert it "
                    "once with python -m ssdjax.pretrained and give the .npz") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]  # a checkpoint of torchvision's reference scripts
  if not isinstance(obj, Mapping):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {str(k): to_numpy(v, str(k)) for k, v in obj.items()}


def backbone_variables(config, variables: Mapping[str, Tree]) -> dict[str, Tree]:
  """The converted trunk of ``config.model.pretrained`` for the model's ``variables``."""
  m = config.model
  abstract = {c: variables.get(c, {}).get("backbone", {}) for c in ("params", "batch_stats")}
  state = load_state_dict(m.pretrained)
  try:
    kwargs = m.backbone_kwargs.to_dict() if hasattr(m.backbone_kwargs, "to_dict") else m.backbone_kwargs
    return convert(state, m.backbone, abstract, kwargs)
  except ValueError as e:
    raise UserError(f"config.model.pretrained={m.pretrained}: {e}") from e


def abstract_backbone(backbone: str, backbone_kwargs: Optional[Mapping[str, Any]] = None,
                      image_size: int = 320) -> dict[str, Tree]:
  """Shapes of a backbone's variables with two levels (the trunk whatever the level count)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ssdjax.models import backbones  # pylint: disable=g-import-not-at-top

  module = backbones.get(backbone)(num_levels=2, **dict(backbone_kwargs or {}))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))


def _cli():
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ssdjax import cli  # pylint: disable=g-import-not-at-top

  tv = flags.DEFINE_string("torchvision", None, "torchvision classification state dict (.pth).")
  backbone = flags.DEFINE_enum("backbone", None, sorted(LAYOUTS), "ssdjax backbone it is for.")
  out = flags.DEFINE_string("out", None, "The .npz to write (torch is then not needed to train).")

  def main(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {argv[1:]}")
    if not (tv.value and backbone.value and out.value):
      raise UserError("--torchvision=FILE.pth, --backbone=NAME and --out=FILE.npz are required")
    state = load_state_dict(tv.value, "--torchvision")
    used: set[str] = set()
    try:
      convert(state, backbone.value, abstract_backbone(backbone.value), used_keys=used)
    except ValueError as e:
      raise UserError(f"{tv.value}: {e}") from e
    kept = {k: state[k] for k in sorted(used)}
    os.makedirs(os.path.dirname(os.path.abspath(out.value)), exist_ok=True)
    np.savez(out.value, **kept)
    print(f"wrote {len(kept)} tensors of {tv.value} to {out.value}; train with "
          f"--config.model.backbone={backbone.value} --config.model.pretrained={out.value}")

  cli.run(main)


if __name__ == "__main__":
  _cli()
