"""Freezing the backbone trunk, as torchvision's ``trainable_backbone_layers`` and FrozenBatchNorm2d.

``config.model.trainable_backbone_layers = n`` trains the last ``n`` stages of the trunk
(``ssdjax.pretrained`` lists the stages of each backbone, torchvision's count: 5 for VGG16 with
fc6/fc7 outside the trunk, 4 for ResNet (conv1, layer1..layer3), 6 for MobileNets) and freezes
the rest; None trains every stage. A frozen stage's parameters get zero updates (an optax mask:
``optax.multi_transform`` with ``optax.set_to_zero``; no momentum or weight decay reaches them)
and its BatchNorm layers normalise with their running statistics, which stay as they are.
``config.model.freeze_backbone_bn = True`` treats every BatchNorm of the trunk so (torchvision's
``FrozenBatchNorm2d``: statistics and affine parameters fixed), whatever ``n``. The extra levels,
the head and the L2Norm scale always train.

The frozen BatchNorm is put in place at trace time by a Flax method interceptor
(:func:`frozen_batchnorm`), so it works for every backbone built from ``flax.linen.BatchNorm``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import flax.linen as nn
import jax
import optax

from ssdjax.errors import UserError

FROZEN, TRAINED = "frozen", "trained"


def _top_level(tree) -> list[str]:
  return list(tree.get("backbone", {})) if hasattr(tree, "get") else []


def frozen_modules(config, params) -> tuple[frozenset[str], frozenset[str]]:
  """(backbone modules whose parameters are frozen, backbone modules whose BatchNorms are frozen):
  top-level module names inside ``params["backbone"]``."""
  from ssdjax import pretrained  # pylint: disable=g-import-not-at-top

  m = config.model
  n, freeze_bn = m.trainable_backbone_layers, bool(m.freeze_backbone_bn)
  if n is None and not freeze_bn:
    return frozenset(), frozenset()
  names = _top_level(params)
  stages = pretrained.layout(m.backbone).stages(names)
  if n is not None and not 0 <= n <= len(stages):
    raise UserError(f"config.model.trainable_backbone_layers={n}: backbone {m.backbone!r} has "
                    f"{len(stages)} trunk stages; give 0..{len(stages)} or None (all train)")
  frozen = set()
  if n is not None:
    for stage in stages[:len(stages) - n]:
      frozen.update(stage)
  trunk = {name for stage in stages for name in stage}
  return frozenset(frozen), frozenset(trunk if freeze_bn else frozen)


def labels(config, params, batch_stats) -> Any:
  """A tree like ``params`` of FROZEN / TRAINED: what :func:`wrap` trains."""
  frozen, frozen_bn = frozen_modules(config, params)
  bn_modules = {tuple(p.key for p in path[:-1])
                for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]}

  def label(path, _):
    keys = tuple(p.key for p in path)
    if len(keys) < 2 or keys[0] != "backbone":
      return TRAINED
    if keys[1] in frozen or (keys[1] in frozen_bn and keys[:-1] in bn_modules):
      return FROZEN
    return TRAINED

  return jax.tree_util.tree_map_with_path(label, params)


def enabled(config) -> bool:
  return config.model.trainable_backbone_layers is not None or bool(config.model.freeze_backbone_bn)


def wrap(tx: optax.GradientTransformation, config, abstract_params,
         abstract_batch_stats) -> optax.GradientTransformation:
  """``tx`` for the trained parameters, zero updates for the frozen ones; ``tx`` itself when
  nothing is frozen (the optimizer state keeps its layout)."""
  if not enabled(config):
    return tx
  tree = labels(config, abstract_params, abstract_batch_stats)
  return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, tree)


_inside = threading.local()


def _frozen_bn_interceptor(frozen_bn: frozenset[str]):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (not isinstance(module, nn.BatchNorm) or context.method_name != "__call__"
        or module.is_initializing() or getattr(_inside, "active", False)):
      return next_fun(*args, **kwargs)
    path = module.scope.path
    if len(path) < 2 or path[0] != "backbone" or path[1] not in frozen_bn:
      return next_fun(*args, **kwargs)
    # FrozenBatchNorm2d: the same layer in inference mode; its statistics are not updated.
    frozen = module.clone(parent=None, use_running_average=True)
    variables = {c: module.variables[c] for c in ("params", "batch_stats") if c in module.variables}
    _inside.active = True
    try:
      return frozen.apply(variables, *args, **kwargs)
    finally:
      _inside.active = False

  return intercept


@contextlib.contextmanager
def frozen_batchnorm(config, params) -> Iterator[None]:
  """Within it, applying the model uses running statistics in the frozen BatchNorm layers."""
  _, frozen_bn = frozen_modules(config, params)
  if not frozen_bn:
    yield
    return
  with nn.intercept_methods(_frozen_bn_interceptor(frozen_bn)):
    yield
