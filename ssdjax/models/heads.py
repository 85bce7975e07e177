"""Prediction heads: feature maps -> per-anchor box offsets and class logits.

Contract (the built-in heads follow it, and so must a researcher's own; docs/extending.md): a head
is a Linen module class with fields ``num_classes`` (C, background included),
``anchors_per_location`` (K_i per level) and ``dtype`` (all set by ``ssdjax.models.SSD``), plus its
own keyword fields from ``config.model.head_kwargs``. Call signature:

  ``head(features, train) -> (loc [B, A, 4], logits [B, A, C])``, features ``[B, H_i, W_i, C_i]``,

with ``A = sum_i H_i * W_i * K_i`` in the order of ``ssdjax.anchors.default_boxes``: level by level,
row-major (y, x) within a level, then the K_i boxes of a location. A convolutional head writes its
output NHWC with channels laid out ``[K, 4]`` (``[K, C]`` for logits), and :func:`to_anchor_order`
(the plain reshape ``[B, H, W, K * n] -> [B, H * W * K, n]``) maps channels to anchors: channel
``c`` at (y, x) belongs to box ``c // n`` of that location.

``config.model.head`` names a head registered with :func:`register` (the built-ins: ``ssd``,
``conv1x1``, ``dense``, ``shared``, ``ssdlite``) or an import path ``"package.module:Name"``.

``prior_prob`` (None = zero bias; a field of :class:`Head`) initialises the foreground class biases
to ``-log((1 - p) / p)`` as in RetinaNet, so a focal loss starts from a low foreground score.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssdjax import registry
from ssdjax.models import conv as conv_lib
from ssdjax.models.backbones import ConvBN, xavier_uniform

Dtype = Any


def _class_bias_init(num_classes: int, prior_prob: Optional[float], period: int, offset: int):
  """Bias init for outputs whose index ``j`` holds class ``(j % period) - offset`` (others: 0)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    if prior_prob is None:
      return jnp.zeros(shape, dtype)
    cls = jnp.arange(shape[-1]) % period - offset
    foreground = (cls >= 1) & (cls < num_classes)
    return jnp.where(foreground, -math.log((1.0 - prior_prob) / prior_prob), 0.0).astype(dtype)

  return init


def to_anchor_order(y, n: int):
  """One level's conv output -> per-anchor rows in the order of ``anchors.default_boxes``.

  Args:
    y: [B, H, W, K * n] NHWC output whose channels are laid out [K, n] (box k's n values are
      channels ``k * n .. k * n + n - 1``), e.g. n = 4 box offsets or n = C class logits.
    n: values per anchor.

  Returns:
    [B, H * W * K, n]: row-major (y, x), then the K boxes of a location: the anchors' order.
  """
  b, h, w, c = y.shape
  if c % n:
    raise ValueError(f"to_anchor_order: {c} channels are not a multiple of n={n} (K * n)")
  return y.reshape(b, h * w * (c // n), n)


class Head(nn.Module):
  """Fields and checks shared by every head."""
  num_classes: int
  anchors_per_location: tuple[int, ...]
  prior_prob: Optional[float] = None
  dtype: Dtype = jnp.float32

  def _check(self, features: Sequence[Any]):
    if len(features) != len(self.anchors_per_location):
      raise ValueError(
          f"the head got {len(features)} feature maps but {len(self.anchors_per_location)} anchor "
          "counts per location; config.anchors.feature_sizes and config.anchors.aspect_ratios need "
          "one entry per backbone level")
    if self.prior_prob is not None and not 0.0 < self.prior_prob < 1.0:
      raise ValueError(f"config.model.head_kwargs.prior_prob must be in (0, 1), got {self.prior_prob}")

  def _class_bias(self, period: Optional[int] = None, offset: int = 0):
    return _class_bias_init(self.num_classes, self.prior_prob, period or self.num_classes, offset)


class ConvHead(Head):
  """SSD's head (Liu et al. 2016): per level a 3x3 conv (pad 1) with K*4 filters (``loc_i``) and
  one with K*C filters (``conf_i``); xavier-uniform kernels and zero biases as torchvision."""
  KERNEL: ClassVar[int] = 3

  @nn.compact
  def __call__(self, features, train: bool = False):
    del train
    self._check(features)
    c = self.num_classes
    loc, logits = [], []
    for i, (x, k) in enumerate(zip(features, self.anchors_per_location)):
      conv = lambda f, name, **kw: conv_lib.Conv(f, (self.KERNEL, self.KERNEL), padding=self.KERNEL // 2,
                                           kernel_init=xavier_uniform, dtype=self.dtype, name=name, **kw)
      loc.append(to_anchor_order(conv(k * 4, f"loc_{i}")(x), 4))
      logits.append(to_anchor_order(conv(k * c, f"conf_{i}", bias_init=self._class_bias())(x), c))
    return jnp.concatenate(loc, 1), jnp.concatenate(logits, 1)


class Conv1x1Head(ConvHead):
  """The SSD head with 1x1 convs: each location sees only its own feature vector."""
  KERNEL: ClassVar[int] = 1


class DenseHead(Head):
  """YOLO-v1-style fully connected head: per level, flatten the whole map [B, H*W*C_i] ->
  Dense(hidden) ReLU (``dense_i_hidden``) -> Dense(H*W*K*(4+C)) (``dense_i_out``), whose output is
  laid out [H, W, K, 4 + C]. Every box sees the whole map; the parameter count grows with H*W."""
  hidden: int = 256

  @nn.compact
  def __call__(self, features, train: bool = False):
    del train
    self._check(features)
    c = self.num_classes
    loc, logits = [], []
    for i, (x, k) in enumerate(zip(features, self.anchors_per_location)):
      b, h, w, _ = x.shape
      y = x.reshape(b, -1)
      y = nn.relu(nn.Dense(self.hidden, kernel_init=xavier_uniform, dtype=self.dtype,
                           name=f"dense_{i}_hidden")(y))
      y = nn.Dense(h * w * k * (4 + c), kernel_init=xavier_uniform, dtype=self.dtype,
                   bias_init=self._class_bias(4 + c, 4), name=f"dense_{i}_out")(y)
      y = y.reshape(b, h * w * k, 4 + c)
      loc.append(y[..., :4])
      logits.append(y[..., 4:])
    return jnp.concatenate(loc, 1), jnp.concatenate(logits, 1)


class SharedHead(Head):
  """RetinaNet-style head whose parameters are shared by all levels.

  Each level is first projected to ``width`` channels by its own 1x1 conv (``proj_i``) so the
  levels share a channel count; then one tower of ``depth`` 3x3 convs + ReLU (``tower_j``, with
  GroupNorm ``tower_j_gn`` if ``group_norm``) and 3x3 ``loc`` / ``conf`` convs, the same modules
  applied to every level. Needs the same K on every level.
  """
  depth: int = 2
  width: int = 128
  group_norm: bool = False

  @nn.compact
  def __call__(self, features, train: bool = False):
    del train
    self._check(features)
    ks = set(self.anchors_per_location)
    if len(ks) != 1:
      raise ValueError(
          f"head 'shared' applies one conv to every level, so every level needs the same number of "
          f"anchors per location, got {tuple(self.anchors_per_location)}; give every level the same "
          "number of config.anchors.aspect_ratios (and keep config.anchors.max_sizes for all or none)")
    k, c = ks.pop(), self.num_classes
    conv = lambda f, kernel, name, **kw: conv_lib.Conv(f, (kernel, kernel), padding=kernel // 2,
                                                 kernel_init=xavier_uniform, dtype=self.dtype,
                                                 name=name, **kw)
    # Created once, called on every level: one set of parameters.
    tower = [conv(self.width, 3, f"tower_{j}") for j in range(self.depth)]
    norms = [nn.GroupNorm(num_groups=math.gcd(32, self.width), dtype=self.dtype, name=f"tower_{j}_gn")
             for j in range(self.depth)] if self.group_norm else None
    loc_conv = conv(k * 4, 3, "loc")
    conf_conv = conv(k * c, 3, "conf", bias_init=self._class_bias())
    loc, logits = [], []
    for i, x in enumerate(features):
      y = conv(self.width, 1, f"proj_{i}")(x)
      for j in range(self.depth):
        y = tower[j](y)
        if norms is not None:
          y = norms[j](y)
        y = nn.relu(y)
      loc.append(to_anchor_order(loc_conv(y), 4))
      logits.append(to_anchor_order(conf_conv(y), c))
    return jnp.concatenate(loc, 1), jnp.concatenate(logits, 1)


class SSDLiteHead(Head):
  """SSDLite's head (Sandler et al. 2018; torchvision ``SSDLiteHead``): per level and branch a
  depthwise 3x3 conv (``loc_i_dw`` / ``conf_i_dw``; with ``norm``: no bias, BatchNorm, ReLU6 as
  torchvision; without: plain conv with bias) then a 1x1 conv to K*4 (``loc_i``) / K*C (``conf_i``)."""
  norm: bool = True

  @nn.compact
  def __call__(self, features, train: bool = False):
    self._check(features)
    c = self.num_classes
    loc, logits = [], []
    for i, (x, k) in enumerate(zip(features, self.anchors_per_location)):
      cin = x.shape[-1]
      outs = []
      for branch, n, bias_init in (("loc", 4, nn.initializers.zeros), ("conf", c, self._class_bias())):
        if self.norm:
          y = ConvBN(cin, 3, groups=cin, act=nn.relu6, bn_momentum=0.97, bn_epsilon=1e-3,
                     dtype=self.dtype, name=f"{branch}_{i}_dw")(x, train)
        else:
          y = conv_lib.Conv(cin, (3, 3), padding=1, feature_group_count=cin, kernel_init=xavier_uniform,
                      dtype=self.dtype, name=f"{branch}_{i}_dw")(x)
        y = conv_lib.Conv(k * n, (1, 1), kernel_init=xavier_uniform, bias_init=bias_init, dtype=self.dtype,
                    name=f"{branch}_{i}")(y)
        outs.append(to_anchor_order(y, n))
      loc.append(outs[0])
      logits.append(outs[1])
    return jnp.concatenate(loc, 1), jnp.concatenate(logits, 1)


REQUIRED_FIELDS = ("num_classes", "anchors_per_location", "dtype")


REGISTRY = registry.Registry("head", "config.model.head", registry.must_be_module(
    "head", REQUIRED_FIELDS, "subclass ssdjax.models.heads.Head"))
for _name, _cls in (("ssd", ConvHead), ("conv1x1", Conv1x1Head), ("dense", DenseHead),
                    ("shared", SharedHead), ("ssdlite", SSDLiteHead)):
  REGISTRY.register(_name, _cls, _builtin=True)


def register(name: str, cls: type[nn.Module] | None = None, *, overwrite: bool = False):
  """Registers a head class as ``name`` (usable as ``config.model.head``); a decorator without
  ``cls``. The class follows the contract of the module docstring (docs/extending.md)."""
  return REGISTRY.register(name, cls, overwrite=overwrite)


def names() -> tuple[str, ...]:
  """Registered values of ``config.model.head`` (an import path is valid too)."""
  return REGISTRY.names()


def get(name: str) -> type[nn.Module]:
  """The head class registered as ``name`` or imported from ``"package.module:Name"``;
  UserError listing the valid names."""
  return REGISTRY.get(name)
