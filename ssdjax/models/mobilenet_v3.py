"""MobileNetV3-Large (Howard et al. 2019) as torchvision's ``mobilenet_v3_large``, SSDLite extras.

The backbone ``"mobilenet_v3_large"`` (contract: ``ssdjax.models.backbones``) is torchvision's
trunk layer for layer, cut as torchvision's ``SSDLiteFeatureExtractorMobileNet`` cuts it for
``ssdlite320_mobilenet_v3_large``:

* level 1: the output of the C4 block's 1x1 expansion (``features[13].block[0]``, the last
  stride-2 block; 672 ch x width_mult, stride 16: 20x20 at 320),
* level 2: the last 1x1 conv (``features[16]``, 960 ch, 480 with ``reduced_tail``; stride 32:
  10x10 at 320),
* levels 3..L: SSDLite extras (``_extra_block``: 1x1 to out/2, depthwise 3x3 stride 2 pad 1, 1x1
  to out, each BN + ReLU6) with out channels ``extra_channels`` (512, 256, 256, 128; the last
  repeats for more levels): 5, 3, 2, 1 at 320.

Blocks (``features_1`` .. ``features_15``) are 1x1 expansion (``expand``, absent when it would not
change the width), kxk depthwise (``dw``, symmetric padding (k - 1) // 2), squeeze-excitation
(``se``: mean over H, W -> 1x1 ``fc1`` ReLU -> 1x1 ``fc2`` hard sigmoid, squeeze channels
``_make_divisible(expanded // 4, 8)``) and 1x1 linear projection (``project``), with a residual
when the shape is kept; Hardswish or ReLU as torchvision's table. Every conv + BN pair is a
:class:`ConvBNAct` with children ``conv`` and ``bn``. BatchNorm: eps 0.001, momentum 0.03 in torch
terms (Flax 0.97), SSDLite's ``norm_layer``. Initialisation: kaiming normal (fan_out) for the
trunk convs as torchvision's ``MobileNetV3``, normal(0, 0.03) for the extras as SSDLite's
``_normal_init``. (torchvision's ``ssdlite320_mobilenet_v3_large(weights_backbone=None)`` also
re-initialises the trunk with normal(0, 0.03); the trunk here keeps the classification init.)

``reduced_tail`` halves the channels of the C4 blocks and the last conv (MobileNetV3 paper,
table 6). torchvision sets it whenever no ImageNet backbone is loaded, which includes the published
COCO checkpoint ``ssdlite320_mobilenet_v3_large_coco-a79551df.pth`` (3,440,060 parameters).

For loading torchvision weights: :func:`torchvision_layer_map` (classification state dict ->
module paths), :func:`params_from_torchvision` (applies a layer map), :func:`torchvision_stages`
and :func:`torchvision_frozen` (what torchvision's ``trainable_backbone_layers`` freezes).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssdjax.models import backbones
from ssdjax.models import conv as conv_lib
# The helpers every built-in backbone shares.
from ssdjax.models.backbones import (  # pylint: disable=protected-access
    _check_levels, _extra_channels, _make_divisible)
from ssdjax.pretrained import to_numpy

Dtype = Any

# SSDLite's norm_layer: BatchNorm2d(eps=0.001, momentum=0.03); Flax momentum = 1 - torch momentum.
_BN_MOMENTUM, _BN_EPSILON = 0.97, 1e-3
# SSDLite's _normal_init (the extras' convs).
normal_003 = nn.initializers.normal(0.03)
hard_swish = jax.nn.hard_swish


def _settings(reduced_tail: bool) -> tuple[tuple[int, int, int, bool, bool, int], ...]:
  """torchvision's ``_mobilenet_v3_conf("mobilenet_v3_large")`` before ``width_mult``: per block
  (kernel, expanded channels, out channels, squeeze-excitation, hardswish (else ReLU), stride)."""
  d = 2 if reduced_tail else 1
  return (
      (3, 16, 16, False, False, 1),
      (3, 64, 24, False, False, 2),  # C1
      (3, 72, 24, False, False, 1),
      (5, 72, 40, True, False, 2),  # C2
      (5, 120, 40, True, False, 1),
      (5, 120, 40, True, False, 1),
      (3, 240, 80, False, True, 2),  # C3
      (3, 200, 80, False, True, 1),
      (3, 184, 80, False, True, 1),
      (3, 184, 80, False, True, 1),
      (3, 480, 112, True, True, 1),
      (3, 672, 112, True, True, 1),
      (5, 672, 160 // d, True, True, 2),  # C4
      (5, 960 // d, 160 // d, True, True, 1),
      (5, 960 // d, 160 // d, True, True, 1),
  )


# torchvision ``features`` index of every block: the stem is 0, blocks 1..15, the last conv 16.
_NUM_BLOCKS = len(_settings(False))
LAST_INDEX = _NUM_BLOCKS + 1
# Stride-2 blocks (torchvision's ``_is_cn``); the last of them is SSDLite's C4 (``c4_pos``), whose
# expansion is level 1 and where SSDLite's ``features[0]`` / ``features[1]`` split the trunk.
_STRIDED = tuple(i for i, s in enumerate(_settings(False), start=1) if s[-1] == 2)
C4_INDEX = _STRIDED[-1]


class ConvBNAct(nn.Module):
  """torchvision's Conv2dNormActivation: conv (no bias, symmetric padding (k - 1) // 2) ->
  BatchNorm -> activation (None = linear); children ``conv`` and ``bn``."""
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  act: Callable | None = None
  kernel_init: Callable = backbones.kaiming_fan_out
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    p = (self.kernel - 1) // 2
    x = conv_lib.Conv(self.features, (self.kernel, self.kernel), self.stride, ((p, p), (p, p)),
                feature_group_count=self.groups, use_bias=False, kernel_init=self.kernel_init,
                dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                     dtype=self.dtype, name="bn")(x)
    return x if self.act is None else self.act(x)


class SqueezeExcitation(nn.Module):
  """torchvision's SqueezeExcitation with a hard sigmoid: x * hsigmoid(fc2(relu(fc1(mean_hw(x)))))."""
  squeeze: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, name: conv_lib.Conv(f, (1, 1), kernel_init=backbones.kaiming_fan_out,
                                   dtype=self.dtype, name=name)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    s = conv(x.shape[-1], "fc2")(nn.relu(conv(self.squeeze, "fc1")(s)))
    return x * jax.nn.hard_sigmoid(s)


class InvertedResidualV3(nn.Module):
  """MobileNetV3 block; returns (output, expansion output or the input without expansion)."""
  kernel: int
  expanded: int
  features: int
  use_se: bool
  use_hs: bool
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    act = hard_swish if self.use_hs else nn.relu
    cin = x.shape[-1]
    y = x
    if self.expanded != cin:
      y = ConvBNAct(self.expanded, 1, act=act, dtype=self.dtype, name="expand")(y, train)
    expanded = y
    y = ConvBNAct(self.expanded, self.kernel, self.stride, groups=self.expanded, act=act,
                  dtype=self.dtype, name="dw")(y, train)
    if self.use_se:
      squeeze = _make_divisible(self.expanded // 4, 8)
      y = SqueezeExcitation(squeeze, dtype=self.dtype, name="se")(y)
    y = ConvBNAct(self.features, 1, dtype=self.dtype, name="project")(y, train)
    if self.stride == 1 and cin == self.features:
      y = x + y
    return y, expanded


class MobileNetV3Large(nn.Module):
  """MobileNetV3-Large with SSDLite extras, torchvision's layout (see the module docstring).

  Attributes:
    num_levels: feature maps returned, at least 2 (the two trunk levels, then extras).
    width_mult: trunk width multiplier (torchvision's ``width_mult``); the extras keep
      ``extra_channels`` as SSDLite does.
    reduced_tail: halve the C4 blocks and the last conv (torchvision's ``reduced_tail``).
    extra_channels: out channels of the extra levels; the last repeats for more levels.
  """
  num_levels: int
  width_mult: float = 1.0
  reduced_tail: bool = False
  extra_channels: tuple[int, ...] = (512, 256, 256, 128)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_levels(self.num_levels, 2, None, "mobilenet_v3_large")
    if not self.width_mult > 0:
      raise ValueError(f"mobilenet_v3_large: backbone kwarg width_mult must be > 0, got "
                       f"{self.width_mult}")
    ch = lambda c: _make_divisible(c * self.width_mult, 8)
    x = ConvBNAct(ch(16), 3, 2, act=hard_swish, dtype=self.dtype, name="features_0")(x, train)
    feats = []
    for i, (k, expanded, out, se, hs, stride) in enumerate(_settings(self.reduced_tail), start=1):
      x, expansion = InvertedResidualV3(k, ch(expanded), ch(out), se, hs, stride, dtype=self.dtype,
                                        name=f"features_{i}")(x, train)
      if i == C4_INDEX:
        feats.append(expansion)  # the C4 block's input resolution: stride 16
    x = ConvBNAct(6 * x.shape[-1], 1, act=hard_swish, dtype=self.dtype,
                  name=f"features_{LAST_INDEX}")(x, train)
    feats.append(x)
    for i, out in enumerate(_extra_channels(self.extra_channels, self.num_levels - 2)):
      mid = out // 2
      block = lambda f, k, j, **kw: ConvBNAct(f, k, act=nn.relu6, kernel_init=normal_003,
                                              dtype=self.dtype, name=f"extras_{i}_{j}", **kw)
      x = block(mid, 1, 0)(x, train)
      x = block(mid, 3, 1, stride=2, groups=mid)(x, train)
      x = block(out, 1, 2)(x, train)
      feats.append(x)
    return feats


backbones.REGISTRY.register("mobilenet_v3_large", MobileNetV3Large, _builtin=True)


# ----------------------------------------------------------------------------- torchvision weights


def torchvision_layer_map(keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """torch module prefix -> Flax module path inside the backbone, for torchvision's
  ``mobilenet_v3_large`` classification state dict (keys ``features.N....``).

  Every conv and BatchNorm of the trunk is listed, whether ``keys`` has it or not (a missing
  one is the converter's error to report): ``features.0.0`` -> ``("features_0", "conv")``,
  ``features.0.1`` -> ``("features_0", "bn")``, ``features.{i}.block.{j}.{0,1}`` ->
  ``("features_{i}", "expand" | "dw" | "project", "conv" | "bn")``, ``features.{i}.block.{j}.fc1``
  -> ``("features_{i}", "se", "fc1")`` (a conv with bias), ``features.16.{0,1}`` ->
  ``("features_16", "conv" | "bn")``. The layout is the same with ``reduced_tail`` and any
  ``width_mult`` (only the shapes change). ``classifier.*`` (the ImageNet head) is not mapped;
  SSDLite's extras are not in a classification checkpoint. ``keys=()`` gives the map without
  checking any keys.

  Raises:
    ValueError: ``keys`` is not empty and holds no ``features.`` key, so it is not a MobileNetV3
      state dict.
  """
  keys = list(keys)
  if keys and not any(str(k).startswith("features.") for k in keys):
    raise ValueError("state dict has no 'features.*' keys, so it is not torchvision's "
                     f"mobilenet_v3_large (the first is {keys[0]!r})")
  layers = {"features.0.0": ("features_0", "conv"), "features.0.1": ("features_0", "bn"),
            f"features.{LAST_INDEX}.0": (f"features_{LAST_INDEX}", "conv"),
            f"features.{LAST_INDEX}.1": (f"features_{LAST_INDEX}", "bn")}
  cin = 16  # the stem's width
  for i, (_, expanded, out, se, _, _) in enumerate(_settings(False), start=1):
    # torchvision builds block = [expand (if the width changes), dw, se (if used), project].
    names = (["expand"] if expanded != cin else []) + ["dw"] + (["se"] if se else []) + ["project"]
    cin = out
    for j, name in enumerate(names):
      prefix, block = f"features.{i}.block.{j}", f"features_{i}"
      if name == "se":
        layers[f"{prefix}.fc1"] = (block, "se", "fc1")
        layers[f"{prefix}.fc2"] = (block, "se", "fc2")
      else:
        layers[f"{prefix}.0"] = (block, name, "conv")
        layers[f"{prefix}.1"] = (block, name, "bn")
  return layers


def torchvision_stages() -> list[tuple[str, ...]]:
  """The trunk's stages as torchvision's ``_mobilenet_extractor`` counts them, first to last.

  ``stage_indices = [0] + [stride-2 blocks] + [16] = [0, 2, 4, 7, 13, 16]``; stage j holds
  ``features[stage_indices[j] : stage_indices[j + 1]]`` and the last stage ``features[16]``:
  (features_0, features_1), (features_2, features_3), (features_4 .. features_6),
  (features_7 .. features_12), (features_13 .. features_15), (features_16,). Each entry is a
  Flax submodule name inside the backbone; see :func:`torchvision_frozen`.
  """
  bounds = (0,) + _STRIDED + (LAST_INDEX, LAST_INDEX + 1)
  return [tuple(f"features_{i}" for i in range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def torchvision_frozen(trainable_layers: int) -> tuple[str, ...]:
  """Backbone submodules whose parameters torchvision freezes for ``trainable_backbone_layers``.

  ``_mobilenet_extractor`` sets ``requires_grad=False`` on ``features[:freeze_before]`` with
  ``freeze_before = stage_indices[6 - t]`` (``len(features)`` for t = 0), i.e. the first
  ``6 - t`` stages of :func:`torchvision_stages`:

  ====  =============================================
  t     frozen
  ====  =============================================
  6     nothing (torchvision's default for SSDLite)
  5     features_0, features_1
  4     features_0 .. features_3
  3     features_0 .. features_6
  2     features_0 .. features_12
  1     features_0 .. features_15 (only the last conv trains)
  0     the whole trunk, features_0 .. features_16
  ====  =============================================

  The SSDLite extras and the head always train. Only parameters freeze: torchvision keeps the
  frozen layers' ``BatchNorm2d`` in train mode, so their running statistics still update.

  Raises:
    ValueError: ``trainable_layers`` is not in 0..6.
  """
  stages = torchvision_stages()
  if not (isinstance(trainable_layers, int) and 0 <= trainable_layers <= len(stages)):
    raise ValueError(f"trainable_backbone_layers must be an integer in 0..{len(stages)} for "
                     f"mobilenet_v3_large, got {trainable_layers!r}")
  return tuple(name for stage in stages[:len(stages) - trainable_layers] for name in stage)


def params_from_torchvision(state_dict: Mapping[str, Any],
                            layer_map: Mapping[str, tuple[str, ...]]) -> dict:
  """Applies a layer map: ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32 arrays.

  For every ``prefix -> path`` of ``layer_map``: a BatchNorm when ``{prefix}.running_mean`` exists
  (``weight`` -> ``params/path/scale``, ``bias`` -> ``params/path/bias``, ``running_mean`` /
  ``running_var`` -> ``batch_stats/path/mean`` / ``var``; ``num_batches_tracked`` is not needed),
  otherwise a conv: ``{prefix}.weight`` [O, I/groups, kh, kw] -> ``params/path/kernel``
  [kh, kw, I/groups, O], and ``{prefix}.bias`` -> ``params/path/bias`` when present. Keys of the
  state dict outside the map are ignored (:func:`unmapped_keys` lists them); shapes are the
  caller's to check against the model.

  Raises:
    ValueError: naming the key, for a missing weight or statistic, or a conv weight that is not
      4-D.
  """

  def take(key):
    if key not in state_dict:
      raise ValueError(f"state dict is missing key {key!r}")
    return to_numpy(state_dict[key], key)

  out: dict = {"params": {}, "batch_stats": {}}

  def put(collection, path, leaf, value):
    node = out[collection]
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value

  for prefix, path in layer_map.items():
    path = tuple(path)
    if f"{prefix}.running_mean" in state_dict:
      put("params", path, "scale", take(f"{prefix}.weight"))
      put("params", path, "bias", take(f"{prefix}.bias"))
      put("batch_stats", path, "mean", take(f"{prefix}.running_mean"))
      put("batch_stats", path, "var", take(f"{prefix}.running_var"))
      continue
    w = take(f"{prefix}.weight")
    if w.ndim != 4:
      raise ValueError(f"state dict key {prefix + '.weight'!r} has shape {w.shape}; expected a conv "
                       f"weight [out, in, kh, kw] for {'/'.join(path)} (a BatchNorm would have "
                       f"{prefix + '.running_mean'!r})")
    put("params", path, "kernel", w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if f"{prefix}.bias" in state_dict:
      put("params", path, "bias", take(f"{prefix}.bias"))
  return out


def unmapped_keys(keys: Sequence[str], layer_map: Mapping[str, tuple[str, ...]]) -> list[str]:
  """The keys whose module prefix (all but the last dotted part) ``layer_map`` does not list."""
  return sorted(k for k in keys if str(k).rsplit(".", 1)[0] not in layer_map)
