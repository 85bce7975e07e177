"""A head and a loss of an "outside" package, used by tests/test_registry.py."""

import flax.linen as nn
import jax.numpy as jnp

from ssdjax import losses
from ssdjax.models import heads


class TinyHead(heads.Head):
  """1x1 conv loc / conf per level (the contract's minimum)."""

  @nn.compact
  def __call__(self, features, train: bool = False):
    del train
    loc, logits = [], []
    for i, (x, k) in enumerate(zip(features, self.anchors_per_location)):
      loc.append(heads.to_anchor_order(nn.Conv(k * 4, (1, 1), name=f"l{i}")(x), 4))
      logits.append(heads.to_anchor_order(nn.Conv(k * self.num_classes, (1, 1), name=f"c{i}")(x),
                                          self.num_classes))
    return jnp.concatenate(loc, 1), jnp.concatenate(logits, 1)


def scaled_multibox(loc_pred, logits, loc_targets, cls_targets, *, scale: float):
  loss, aux = losses.multibox_loss(loc_pred, logits, loc_targets, cls_targets, neg_pos_ratio=3.0,
                                   loc_weight=1.0)
  return scale * loss, {"unscaled": loss, **aux}
