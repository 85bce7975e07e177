"""Backbones: images [B, H, W, 3] -> a list of ``num_levels`` NHWC feature maps, largest first.

Every backbone is a Linen module with a ``num_levels`` field (set by ``ssdjax.models.SSD`` from
``len(config.anchors.feature_sizes)``), a ``dtype`` field (the compute dtype; parameters stay float32)
and its own keyword fields, which come from ``config.model.backbone_kwargs``. Call signature:
``backbone(images, train) -> [f_1, ..., f_L]`` with ``f_i: [B, H_i, W_i, C_i]``. A researcher's
own backbone follows the same contract (docs/extending.md); ``config.model.backbone`` names one
registered with :func:`register` or an import path ``"package.module:Name"``. The SSD model checks
the maps' sizes against ``config.anchors.feature_sizes`` when it traces.

Backbones with BatchNorm keep running statistics in the ``'batch_stats'`` collection and use them
when ``train`` is False; training applies the model with ``mutable=['batch_stats']``.

Submodule names follow the layers of the reference networks (Caffe / torchvision SSD300-VGG16,
torchvision ResNet and MobileNetV2) so pretrained weights can be mapped onto them by name.

Extra levels of the BatchNorm backbones halve the map with a padded stride-2 3x3 conv
(``ceil(n / 2)``); the last ``valid_levels`` of them use an unpadded stride-1 3x3 conv (``n - 2``)
instead, which is how SSD300 reaches 5 -> 3 -> 1.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssdjax import registry
from ssdjax.models import conv as conv_lib

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()
# torchvision's ResNet / MobileNetV2 initialisation (kaiming normal, fan_out).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_PAD1 = ((1, 1), (1, 1))


def _check_valid_conv(x, kernel: int, where: str):
  """Unpadded convs need a map at least as large as the kernel; say which layer and why."""
  h, w = x.shape[1], x.shape[2]
  if h < kernel or w < kernel:
    raise ValueError(
        f"{where}: an unpadded {kernel}x{kernel} conv needs a feature map of at least {kernel}x{kernel}, "
        f"got {h}x{w}; use a larger config.image_size, fewer levels in config.anchors.feature_sizes "
        "or fewer valid (unpadded) extra levels (backbone kwarg valid_levels)")


def _check_levels(num_levels: int, minimum: int, maximum: int | None, backbone: str):
  if num_levels < minimum or (maximum is not None and num_levels > maximum):
    allowed = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
    raise ValueError(
        f"backbone {backbone!r} gives {allowed} feature maps, but config.anchors.feature_sizes "
        f"asks for {num_levels}")


def _extra_channels(channels: Sequence[int], n: int) -> list[int]:
  """Output channels of ``n`` extra levels; the last entry repeats when more levels are asked for."""
  channels = list(channels)
  return channels[:n] + [channels[-1]] * max(0, n - len(channels))


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> activation (None = linear), torchvision's Conv2dNormActivation."""
  features: int
  kernel: int = 3
  stride: int = 1
  padding: Any = _PAD1
  groups: int = 1
  act: Callable | None = nn.relu
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv_lib.Conv(self.features, (self.kernel, self.kernel), self.stride, self.padding,
                feature_group_count=self.groups, use_bias=False, kernel_init=kaiming_fan_out,
                dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)
    return x if self.act is None else self.act(x)


# ----------------------------------------------------------------------------- VGG16 (SSD300/512)


class L2Norm(nn.Module):
  """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet; SSD conv4_3).

  ``y = scale * x / sqrt(sum_c x^2 + eps)``, computed in float32 because bf16 sums of 512 squares
  lose the small activations.
  """
  scale_init: float = 20.0
  eps: float = 1e-10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.scale_init), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + self.eps) * scale
    return y.astype(self.dtype)


# (1x1 channels, 3x3 channels, 3x3 kernel, 3x3 stride, 3x3 padding) per extra level.
_VGG_EXTRAS_300 = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))
_VGG_EXTRAS_512 = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1),
                   (128, 256, 4, 1, 1))


class VGG16(nn.Module):
  """SSD's VGG16 (Liu et al. 2016; Caffe release; torchvision ``ssd300_vgg16``).

  conv1_1..conv5_3 (3x3, ReLU) with 2x2/2 max-pools (pool3 in ceil mode: 75 -> 38 at 300),
  pool5 3x3/1 pad 1, fc6 = 3x3 conv dilation 6 with 1024 channels, fc7 = 1x1 1024.
  Levels: L2Norm(conv4_3) (512 ch), fc7 (1024 ch), then the extras ``extras_{i}_0`` (1x1) and
  ``extras_{i}_1`` (3x3): with 6 levels (or fewer, a prefix) SSD300's 38, 19, 10, 5, 3, 1 at 300;
  with 7 levels SSD512's 64, 32, 16, 8, 4, 2, 1 at 512.
  """
  num_levels: int
  dtype: Dtype = jnp.float32

  STAGES: ClassVar = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout
    _check_levels(self.num_levels, 2, 7, "vgg16")
    conv = lambda f, k, name, **kw: conv_lib.Conv(f, (k, k), kernel_init=xavier_uniform, dtype=self.dtype,
                                             name=name, **kw)
    feats = []
    for s, widths in enumerate(self.STAGES, start=1):
      for j, f in enumerate(widths, start=1):
        x = nn.relu(conv(f, 3, f"conv{s}_{j}", padding=_PAD1)(x))
      if s == 4:
        feats.append(L2Norm(dtype=self.dtype, name="l2norm")(x))
      if s < 5:
        # Caffe's pool3 uses ceil mode (75 -> 38); 'SAME' pads only at the end, the same windows.
        x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME" if s == 3 else "VALID")
    x = nn.max_pool(x, (3, 3), (1, 1), padding=_PAD1)  # pool5
    x = nn.relu(conv(1024, 3, "fc6", padding=((6, 6), (6, 6)), kernel_dilation=(6, 6))(x))
    x = nn.relu(conv(1024, 1, "fc7")(x))
    feats.append(x)
    extras = _VGG_EXTRAS_512 if self.num_levels == 7 else _VGG_EXTRAS_300
    for i, (mid, out, k, stride, pad) in enumerate(extras[:self.num_levels - 2]):
      x = nn.relu(conv(mid, 1, f"extras_{i}_0")(x))
      if pad == 0:
        _check_valid_conv(x, k, f"vgg16 extras_{i}_1")
      x = nn.relu(conv(out, k, f"extras_{i}_1", strides=stride, padding=((pad, pad), (pad, pad)))(x))
      feats.append(x)
    return feats


# ----------------------------------------------------------------------------- ResNet (NVIDIA SSD300)


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = ConvBN(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x, train)
    y = ConvBN(self.features, 3, dtype=self.dtype, act=None, name="conv2")(y, train)
    if x.shape[-1] != self.features or self.stride != 1:
      x = ConvBN(self.features, 1, self.stride, padding=0, act=None, dtype=self.dtype,
                 name="downsample")(x, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = self.features * self.expansion
    y = ConvBN(self.features, 1, padding=0, dtype=self.dtype, name="conv1")(x, train)
    y = ConvBN(self.features, 3, self.stride, dtype=self.dtype, name="conv2")(y, train)
    y = ConvBN(out, 1, padding=0, act=None, dtype=self.dtype, name="conv3")(y, train)
    if x.shape[-1] != out or self.stride != 1:
      x = ConvBN(out, 1, self.stride, padding=0, act=None, dtype=self.dtype, name="downsample")(x, train)
    return nn.relu(x + y)


def _conv_extras(x, train, *, num_extras, mid_channels, out_channels, valid_levels, dtype, prefix):
  """NVIDIA SSD300's extra blocks: 1x1 (mid) BN ReLU, then 3x3 (out) BN ReLU, stride 2 pad 1 or
  unpadded stride 1 for the last ``valid_levels`` blocks."""
  feats = []
  mids = _extra_channels(mid_channels, num_extras)
  outs = _extra_channels(out_channels, num_extras)
  for i in range(num_extras):
    valid = i >= num_extras - valid_levels
    x = ConvBN(mids[i], 1, padding=0, dtype=dtype, name=f"extras_{i}_0")(x, train)
    if valid:
      _check_valid_conv(x, 3, f"{prefix} extras_{i}_1")
    x = ConvBN(outs[i], 3, 1 if valid else 2, padding=0 if valid else _PAD1, dtype=dtype,
               name=f"extras_{i}_1")(x, train)
    feats.append(x)
  return feats


class ResNet(nn.Module):
  """ResNet trunk as in NVIDIA's SSD300 v1.1: stem, layer1..layer3, with layer3 at stride 1.

  Level 1 is layer3's output (stride 16 in ImageNet ResNet, here stride 8: 38x38 at 300; 1024
  channels for ResNet-50, 256 for ResNet-18/34). Levels 2..L are extras (see ``_conv_extras``);
  the defaults are NVIDIA's (mid 256, 256, 128, 128, 128; out 512, 512, 256, 256, 256; the last 2
  unpadded), which give 38, 19, 10, 5, 3, 1 at 300.
  """
  num_levels: int
  extra_mid_channels: tuple[int, ...] = (256, 256, 128, 128, 128)
  extra_channels: tuple[int, ...] = (512, 512, 256, 256, 256)
  valid_levels: int = 2
  dtype: Dtype = jnp.float32

  STAGE_SIZES: ClassVar[tuple[int, ...]] = (3, 4, 6)
  BLOCK: ClassVar[type] = Bottleneck

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_levels(self.num_levels, 1, None, type(self).__name__.lower())
    x = ConvBN(64, 7, 2, padding=((3, 3), (3, 3)), dtype=self.dtype, name="conv1")(x, train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_PAD1)
    for s, n in enumerate(self.STAGE_SIZES):
      for b in range(n):
        # Only layer2 downsamples: NVIDIA keeps layer3 at stride 1 for a 38x38 first map.
        stride = 2 if (s == 1 and b == 0) else 1
        x = self.BLOCK(64 * 2**s, stride, dtype=self.dtype, name=f"layer{s + 1}_{b}")(x, train)
    return [x] + _conv_extras(
        x, train, num_extras=self.num_levels - 1, mid_channels=self.extra_mid_channels,
        out_channels=self.extra_channels, valid_levels=self.valid_levels, dtype=self.dtype,
        prefix=type(self).__name__.lower())


class ResNet18(ResNet):
  STAGE_SIZES: ClassVar[tuple[int, ...]] = (2, 2, 2)
  BLOCK: ClassVar[type] = BasicBlock


class ResNet34(ResNet):
  STAGE_SIZES: ClassVar[tuple[int, ...]] = (3, 4, 6)
  BLOCK: ClassVar[type] = BasicBlock


class ResNet50(ResNet):
  STAGE_SIZES: ClassVar[tuple[int, ...]] = (3, 4, 6)
  BLOCK: ClassVar[type] = Bottleneck


# ----------------------------------------------------------------------------- MobileNetV2 (SSDLite)

# torchvision MobileNetV2 BatchNorm as used by SSDLite (eps 0.001, torch momentum 0.03).
_MBN = dict(bn_momentum=0.97, bn_epsilon=1e-3)


def _make_divisible(v: float, divisor: int = 8) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand (if t > 1), 3x3 depthwise, 1x1 linear projection.

  Returns (output, expansion output); the expansion is SSDLite's stride-16 feature.
  """
  features: int
  stride: int
  expand_ratio: int
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    cin = x.shape[-1]
    bn = dict(_MBN, bn_epsilon=self.bn_epsilon)
    hidden = cin * self.expand_ratio
    y = x
    if self.expand_ratio != 1:
      y = ConvBN(hidden, 1, padding=0, act=nn.relu6, dtype=self.dtype, name="expand", **bn)(y, train)
    expanded = y
    y = ConvBN(hidden, 3, self.stride, groups=hidden, act=nn.relu6, dtype=self.dtype, name="dw",
               **bn)(y, train)
    y = ConvBN(self.features, 1, padding=0, act=None, dtype=self.dtype, name="project", **bn)(y, train)
    if self.stride == 1 and cin == self.features:
      y = x + y
    return y, expanded


class MobileNetV2(nn.Module):
  """MobileNetV2 with SSDLite extras (Sandler et al. 2018; torchvision ``ssdlite320``'s layout).

  Levels: with ``first_level_stride=16`` (SSDLite) the expansion of the first stride-32 block
  (576 ch x width_mult) and the final 1x1 conv output (1280 ch), then SSDLite extras (1x1 to
  out/2, depthwise 3x3 stride 2, 1x1 to out; BN + ReLU6): 20, 10, 5, 3, 2, 1 at 320.
  ``first_level_stride=8`` adds the expansion of the first stride-16 block (192 ch) in front, so
  ``valid_levels=1`` gives SSD300's 38, 19, 10, 5, 3, 1 at 300. ``bn_epsilon``: SSDLite's 0.001;
  torchvision's ImageNet ``mobilenet_v2`` weights were trained with 1e-5 (set it when starting
  from them, ``ssdjax.pretrained``).
  """
  num_levels: int
  width_mult: float = 1.0
  first_level_stride: int = 16
  extra_channels: tuple[int, ...] = (512, 256, 256, 128)
  valid_levels: int = 0
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32

  # (expand ratio t, channels c, repeats n, first stride s), the MobileNetV2 paper's table 2.
  SETTINGS: ClassVar = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.first_level_stride not in (8, 16):
      raise ValueError(f"mobilenet_v2: backbone kwarg first_level_stride must be 8 or 16, "
                       f"got {self.first_level_stride}")
    n_trunk = 2 if self.first_level_stride == 16 else 3
    _check_levels(self.num_levels, n_trunk, None, "mobilenet_v2")
    bn = dict(_MBN, bn_epsilon=self.bn_epsilon)
    x = ConvBN(_make_divisible(32 * self.width_mult), 3, 2, act=nn.relu6, dtype=self.dtype,
               name="features_0", **bn)(x, train)
    feats, index, stride = [], 1, 2
    for t, c, n, s in self.SETTINGS:
      for b in range(n):
        block_stride = s if b == 0 else 1
        x, expanded = InvertedResidual(_make_divisible(c * self.width_mult), block_stride, t,
                                       bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                                       name=f"features_{index}")(x, train)
        if block_stride == 2 and stride in (8, 16) and stride >= self.first_level_stride:
          feats.append(expanded)  # the block's input resolution: stride 8 or 16
        stride *= block_stride
        index += 1
    last = _make_divisible(1280 * max(1.0, self.width_mult))
    x = ConvBN(last, 1, padding=0, act=nn.relu6, dtype=self.dtype, name=f"features_{index}", **bn)(
        x, train)
    feats.append(x)
    num_extras = self.num_levels - n_trunk
    outs = _extra_channels(self.extra_channels, num_extras)
    for i, out in enumerate(outs):
      valid = i >= num_extras - self.valid_levels
      mid = out // 2
      x = ConvBN(mid, 1, padding=0, act=nn.relu6, dtype=self.dtype, name=f"extras_{i}_0", **bn)(
          x, train)
      if valid:
        _check_valid_conv(x, 3, f"mobilenet_v2 extras_{i}_1")
      x = ConvBN(mid, 3, 1 if valid else 2, padding=0 if valid else _PAD1, groups=mid, act=nn.relu6,
                 dtype=self.dtype, name=f"extras_{i}_1", **bn)(x, train)
      x = ConvBN(out, 1, padding=0, act=nn.relu6, dtype=self.dtype, name=f"extras_{i}_2", **bn)(
          x, train)
      feats.append(x)
    return feats


# ----------------------------------------------------------------------------- tiny (CPU experiments)


class Tiny(nn.Module):
  """A small conv-BN-ReLU network for CPU experiments (190k parameters at width 32 with 5 levels).

  Stride-8 trunk (channels width/2, width, width, 2*width, 2*width, 2*width) gives level 1
  (16x16 at 128); every further level is a 1x1 (width) then 3x3 stride 2 (2*width) block:
  16, 8, 4, 2, 1 at 128.
  """
  num_levels: int
  width: int = 32
  valid_levels: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_levels(self.num_levels, 1, None, "tiny")
    w = self.width
    trunk = ((w // 2, 2), (w, 2), (w, 1), (2 * w, 2), (2 * w, 1), (2 * w, 1))
    for i, (f, s) in enumerate(trunk):
      x = ConvBN(f, 3, s, dtype=self.dtype, name=f"conv{i}")(x, train)
    return [x] + _conv_extras(
        x, train, num_extras=self.num_levels - 1, mid_channels=(w,), out_channels=(2 * w,),
        valid_levels=self.valid_levels, dtype=self.dtype, prefix="tiny")


REQUIRED_FIELDS = ("num_levels", "dtype")


REGISTRY = registry.Registry("backbone", "config.model.backbone", registry.must_be_module(
    "backbone", REQUIRED_FIELDS, "see ssdjax.models.backbones"))
for _name, _cls in (("vgg16", VGG16), ("resnet18", ResNet18), ("resnet34", ResNet34),
                    ("resnet50", ResNet50), ("mobilenet_v2", MobileNetV2), ("tiny", Tiny)):
  REGISTRY.register(_name, _cls, _builtin=True)


def register(name: str, cls: type[nn.Module] | None = None, *, overwrite: bool = False):
  """Registers a backbone class as ``name`` (usable as ``config.model.backbone``); a decorator
  without ``cls``. The class follows the contract of the module docstring."""
  return REGISTRY.register(name, cls, overwrite=overwrite)


def names() -> tuple[str, ...]:
  """Registered values of ``config.model.backbone`` (an import path is valid too)."""
  return REGISTRY.names()


def get(name: str) -> type[nn.Module]:
  """The backbone class registered as ``name`` or imported from ``"package.module:Name"``;
  UserError listing the valid names."""
  return REGISTRY.get(name)
