"""A prediction head and a loss that live outside the ssdjax package.

Nothing here is registered or special: the config names them by import path
(``experiments.custom_head.parts:TwoConvHead``), and every ssdjax tool (training, ``--mode=eval``,
predict, export, the head ablation) rebuilds them in a fresh process from that path alone.
"""

import flax.linen as nn
import jax.numpy as jnp
import optax

from ssdjax import losses
from ssdjax.models import heads


class TwoConvHead(heads.Head):
  """Per level, ``depth`` 3x3 conv + ReLU layers of ``width`` channels (each level its own),
  then SSD's 3x3 loc (K*4) and conf (K*C) convs: SSD's head with a little tower in front.

  The contract (docs/extending.md): fields num_classes, anchors_per_location and dtype come from
  ssdjax; ``features[i]`` is [B, H_i, W_i, C_i]; the output is (loc [B, A, 4], logits [B, A, C])
  in the anchors' order, which ``heads.to_anchor_order`` gives for NHWC outputs laid out [K, n].
  """
  width: int = 64
  depth: int = 1

  @nn.compact
  def __call__(self, features, train: bool = False):
    del train  # no batch norm or dropout
    self._check(features)
    loc, logits = [], []
    for i, (x, k) in enumerate(zip(features, self.anchors_per_location)):
      for j in range(self.depth):
        x = nn.relu(nn.Conv(self.width, (3, 3), padding=1, dtype=self.dtype,
                            name=f"tower_{i}_{j}")(x))
      box = nn.Conv(k * 4, (3, 3), padding=1, dtype=self.dtype, name=f"loc_{i}")(x)
      cls = nn.Conv(k * self.num_classes, (3, 3), padding=1, dtype=self.dtype,
                    bias_init=self._class_bias(), name=f"conf_{i}")(x)
      loc.append(heads.to_anchor_order(box, 4))  # [B, H*W*K, 4]
      logits.append(heads.to_anchor_order(cls, self.num_classes))  # [B, H*W*K, C]
    return jnp.concatenate(loc, 1), jnp.concatenate(logits, 1)


def balanced_l1(diff, *, alpha: float, gamma: float):
  """Balanced L1 loss (Pang et al., Libra R-CNN 2019) of |offset errors| [...] -> [...]."""
  b = jnp.exp(gamma / alpha) - 1.0  # makes the gradient continuous at |x| = 1
  small = alpha / b * (b * diff + 1) * jnp.log(b * diff + 1) - alpha * diff
  return jnp.where(diff < 1.0, small, gamma * diff + gamma / b - alpha)


def balanced_multibox(loc_pred, logits, loc_targets, cls_targets, *, alpha: float,
                      gamma: float, neg_pos_ratio: float):
  """SSD's multibox loss with balanced L1 in place of smooth L1, normalized by the positives.

  The loss contract: (loc [B, A, 4], logits [B, A, C], loc targets [B, A, 4], class targets
  [B, A] int, **config.loss.kwargs) -> (scalar loss, dict of scalars the loop logs).
  """
  positive = cls_targets > 0  # [B, A]
  box = balanced_l1(jnp.abs(loc_pred - loc_targets), alpha=alpha, gamma=gamma).sum(-1)  # [B, A]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), cls_targets)
  negative = losses.hard_negative_mask(ce, positive, neg_pos_ratio=neg_pos_ratio)  # [B, A]
  denom = jnp.maximum(positive.sum(), 1).astype(jnp.float32)
  box_term = jnp.where(positive, box, 0.0).sum() / denom
  cls_term = jnp.where(positive | negative, ce, 0.0).sum() / denom
  return box_term + cls_term, {"balanced_l1": box_term, "ce": cls_term, "positives": denom}
