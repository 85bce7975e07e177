"""The SSD model: a backbone from ``backbones``, a head from ``heads``, both chosen by name.

  model = ssdjax.models.from_config(config)
  variables = model.init(rng, images)          # {'params'} (+ {'batch_stats'} with BatchNorm)
  loc, logits = model.apply(variables, images)  # [B, A, 4], [B, A, C], anchor order
  (loc, logits), updates = model.apply(variables, images, train=True, mutable=['batch_stats'])

``loc`` holds box offsets against ``ssdjax.anchors.from_config(config)`` (decode with
``ssdjax.boxes.decode``); ``logits`` are raw class scores with class 0 = background.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from ssdjax import anchors as anchors_lib
from ssdjax.errors import UserError
from ssdjax.models import backbones, heads

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Set by SSD itself, so config kwargs may not name them.
_RESERVED = frozenset({"parent", "name", "num_levels", "dtype", "num_classes", "anchors_per_location"})


def kwarg_fields(cls: type[nn.Module]) -> tuple[str, ...]:
  """The fields of a backbone or head class that ``config.model.*_kwargs`` may set."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _RESERVED)


def _check_kwargs(cls: type[nn.Module], kwargs: Mapping[str, Any], field: str, name: str):
  unknown = sorted(set(kwargs) - set(kwarg_fields(cls)))
  if unknown:
    accepted = ", ".join(kwarg_fields(cls)) or "none"
    raise UserError(f"{field} has unknown keys {unknown} for {name!r}; accepted keys: {accepted}")


def _freeze(value):
  """dicts -> FrozenDict, lists -> tuples, recursively."""
  if isinstance(value, Mapping):
    return FrozenDict({k: _freeze(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _fmt_sizes(sizes) -> str:
  return "(" + ", ".join(str(h) if h == w else f"{h}x{w}" for h, w in sizes) + ")"


class SSD(nn.Module):
  """Single Shot MultiBox Detector (Liu et al. 2016) with a pluggable backbone and head.

  Attributes:
    num_classes: C, background (class 0) included.
    anchors_per_location: K_i per level, ``ssdjax.anchors.per_location_from_config``.
    feature_sizes: expected side of each feature map (``config.anchors.feature_sizes``); the
      backbone's maps are checked against it when the model is traced.
    backbone: name in ``backbones.names()`` or an import path ``"package.module:Name"``.
    head: name in ``heads.names()`` or an import path.
    backbone_kwargs, head_kwargs: extra fields of the backbone / head module.
    dtype: compute dtype (float32 or bfloat16); parameters are always float32.
  """
  num_classes: int
  anchors_per_location: tuple[int, ...]
  feature_sizes: tuple[int, ...]
  backbone: str
  head: str
  backbone_kwargs: Mapping[str, Any] = FrozenDict()
  head_kwargs: Mapping[str, Any] = FrozenDict()
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Hashable attributes, so the module can be a static argument of jax.jit.
    for field in ("anchors_per_location", "feature_sizes", "backbone_kwargs", "head_kwargs"):
      object.__setattr__(self, field, _freeze(getattr(self, field)))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: [B, H, W, 3] float32, normalized -> (loc [B, A, 4], logits [B, A, C]) float32.

    A = sum_i f_i^2 * K_i in the order of ``ssdjax.anchors.default_boxes``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"SSD expects images [B, H, W, 3], got shape {images.shape}")
    if len(self.anchors_per_location) != len(self.feature_sizes):
      raise ValueError(
          f"anchors_per_location has {len(self.anchors_per_location)} levels but feature_sizes has "
          f"{len(self.feature_sizes)}; config.anchors.aspect_ratios and config.anchors.feature_sizes "
          "need one entry per level")
    backbone_cls, head_cls = backbones.get(self.backbone), heads.get(self.head)
    _check_kwargs(backbone_cls, self.backbone_kwargs, "config.model.backbone_kwargs", self.backbone)
    _check_kwargs(head_cls, self.head_kwargs, "config.model.head_kwargs", self.head)

    features = backbone_cls(num_levels=len(self.feature_sizes), dtype=self.dtype, name="backbone",
                            **self.backbone_kwargs)(images, train=train)
    got = tuple((f.shape[1], f.shape[2]) for f in features)
    want = tuple((s, s) for s in self.feature_sizes)
    if got != want:
      raise ValueError(
          f"backbone {self.backbone!r} gives feature maps {_fmt_sizes(got)} for "
          f"{images.shape[1]}x{images.shape[2]} images, but config.anchors.feature_sizes is "
          f"{_fmt_sizes(want)}; set config.anchors.feature_sizes (and steps, min_sizes, max_sizes, "
          "aspect_ratios) to the backbone's maps or change config.image_size")
    loc, logits = head_cls(num_classes=self.num_classes,
                           anchors_per_location=self.anchors_per_location, dtype=self.dtype,
                           name="head", **self.head_kwargs)(features, train=train)
    return loc.astype(jnp.float32), logits.astype(jnp.float32)


def _as_dict(kwargs) -> dict:
  if kwargs is None:
    return {}
  return kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)


def check_config(config) -> None:
  """Backbone and head resolve (name or import path), their kwargs exist, the dtype is known.

  Raises:
    UserError: naming the field, before anything is traced.
  """
  m = config.model
  backbone_cls, head_cls = backbones.get(m.backbone), heads.get(m.head)
  _check_kwargs(backbone_cls, _as_dict(m.backbone_kwargs), "config.model.backbone_kwargs", m.backbone)
  _check_kwargs(head_cls, _as_dict(m.head_kwargs), "config.model.head_kwargs", m.head)
  if m.compute_dtype not in _COMPUTE_DTYPES:
    raise UserError(f"config.model.compute_dtype is {m.compute_dtype!r}; valid: "
                    f"{', '.join(_COMPUTE_DTYPES)}")


def from_config(config) -> SSD:
  """The SSD an experiment config describes (``config.class_names``, ``config.anchors``,
  ``config.model``); ``config.class_names`` must be resolved (``ssdjax.data.resolve_classes``).

  Raises UserError for unknown backbone/head names, kwargs the chosen modules do not accept, and
  an unknown ``config.model.compute_dtype``, before anything is traced.
  """
  from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top

  check_config(config)
  m = config.model
  return SSD(
      num_classes=config_lib.num_classes(config),
      anchors_per_location=tuple(anchors_lib.per_location_from_config(config)),
      feature_sizes=tuple(config.anchors.feature_sizes),
      backbone=m.backbone,
      head=m.head,
      backbone_kwargs=_as_dict(m.backbone_kwargs),
      head_kwargs=_as_dict(m.head_kwargs),
      dtype=_COMPUTE_DTYPES[m.compute_dtype])
