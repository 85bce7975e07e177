"""Detection losses: SSD's multibox loss (smooth L1 + softmax CE with hard negative mining) and
RetinaNet's sigmoid focal loss.

Layout (as optax): per-element functions return unreduced values, and each loss applies one
documented reduction. Hyper-parameters are keyword-only; shape mismatches raise ``ValueError``
instead of broadcasting. Everything is computed in float32 (bf16 model outputs are upcast), works
under ``jit``, ``vmap`` and ``grad``, and names no mesh axis: with sharded inputs under ``jit`` the
batch-wide sums below are global.

Inputs of both losses:

* ``loc_pred``: [B, A, 4] predicted offsets (SSD parameterization, ``ssdjax.boxes.encode``).
* ``logits``: [B, A, C] class scores, column 0 = background.
* ``loc_targets``: [B, A, 4] encoded matched gt boxes (``ssdjax.matching.batch_targets``).
* ``cls_targets``: [B, A] int, 0 = background, 1..C-1 = the matched gt's class.

An anchor is *positive* when ``cls_targets > 0``. Both return ``(loss, aux)`` where ``aux`` holds the
float32 scalars ``loc`` and ``conf`` (the two normalized terms; ``loss = loc_weight * loc + conf``),
``num_pos`` and ``num_neg`` (anchors that enter the classification term as negatives).

``config.loss.type`` names a registered loss (:func:`register`; built in: ``multibox``, ``focal``)
or an import path; it is called ``fn(loc_pred, logits, loc_targets, cls_targets,
**config.loss.kwargs)`` and the training loop logs every entry of its ``aux`` dict.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ssdjax import registry


def _check(loc_pred, logits, loc_targets, cls_targets):
  shape = jnp.shape(cls_targets)
  if len(shape) != 2:
    raise ValueError(f"cls_targets must have shape [B, A]; got {shape}")
  if not jnp.issubdtype(jnp.result_type(cls_targets), jnp.integer):
    raise ValueError(f"cls_targets must be integer class ids; got dtype {jnp.result_type(cls_targets)}")
  for name, arr in (("loc_pred", loc_pred), ("loc_targets", loc_targets)):
    if jnp.shape(arr) != (*shape, 4):
      raise ValueError(f"{name} must have shape [B, A, 4] = {(*shape, 4)} to match cls_targets; "
                       f"got {jnp.shape(arr)}")
  if jnp.ndim(logits) != 3 or jnp.shape(logits)[:2] != shape:
    raise ValueError(f"logits must have shape [B, A, C] with [B, A] = {shape} to match cls_targets; "
                     f"got {jnp.shape(logits)}")
  if jnp.shape(logits)[-1] < 2:
    raise ValueError(f"logits need C >= 2 classes (background + at least one); got {jnp.shape(logits)}")


def _check_nonneg(**values):
  for name, value in values.items():
    if isinstance(value, (int, float)) and value < 0:
      raise ValueError(f"loss {name} must be >= 0, got {value}")


def smooth_l1(loc_pred, loc_targets):
  """Smooth L1 (Huber, delta 1) summed over the 4 coordinates: [..., 4], [..., 4] -> [...] float32."""
  if jnp.shape(loc_pred) != jnp.shape(loc_targets) or jnp.shape(loc_pred)[-1:] != (4,):
    raise ValueError(f"loc_pred {jnp.shape(loc_pred)} and loc_targets {jnp.shape(loc_targets)} must "
                     "have the same shape [..., 4]")
  loss = optax.huber_loss(jnp.asarray(loc_pred, jnp.float32), jnp.asarray(loc_targets, jnp.float32),
                          delta=1.0)
  return loss.sum(axis=-1)


def hard_negative_mask(bg_loss, positive, *, neg_pos_ratio: float):
  """Hard negative mining: which negatives enter the classification loss. Per image, static shapes.

  Only negatives are ranked (positives are excluded before ranking, whatever their loss), and the
  ``min(floor(neg_pos_ratio * num_pos), num_neg)`` negatives with the highest background loss are
  kept (ties -> lower anchor index). An image without positives keeps no negatives (as Caffe and
  torchvision).

  Args:
    bg_loss: [..., A] loss of predicting background for each anchor (not differentiated through).
    positive: [..., A] bool, True for matched anchors.
    neg_pos_ratio: negatives kept per positive (3 in SSD).

  Returns:
    [..., A] bool, True for the mined negatives (never for a positive).
  """
  if jnp.shape(bg_loss) != jnp.shape(positive):
    raise ValueError(f"bg_loss {jnp.shape(bg_loss)} and positive {jnp.shape(positive)} must have the "
                     "same shape [..., A]")
  _check_nonneg(neg_pos_ratio=neg_pos_ratio)
  positive = jnp.asarray(positive, bool)
  loss = jax.lax.stop_gradient(jnp.asarray(bg_loss, jnp.float32))
  loss = jnp.where(positive, -jnp.inf, loss)
  num_pos = positive.sum(axis=-1, keepdims=True)
  num_neg = positive.shape[-1] - num_pos
  num_keep = jnp.minimum(jnp.floor(neg_pos_ratio * num_pos.astype(jnp.float32)).astype(jnp.int32),
                         num_neg)
  # The first num_keep anchors of a stable ascending sort of -loss (so NaNs come last).
  return _first_in_order(_sort_keys(-loss), num_keep) & ~positive


def _sort_keys(x):
  """uint32 keys of float32 x [..., A] ordered as ``jnp.sort`` orders x: -0 == +0, NaNs last
  (and denormals == 0 where the backend flushes them, as XLA:CPU does in its sort too)."""
  x = jnp.where(x == 0, 0.0, x)  # -0 -> +0
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC00000), bits)  # every NaN -> +NaN
  # Negative floats order inversely to their bits: flip them all; set the sign bit of the rest.
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _first_in_order(keys, k):
  """keys [..., A] uint32, k [..., 1] int32 in [0, A] -> [..., A] bool: the k smallest keys, ties
  -> lower index; the same as ``argsort(argsort(keys, stable=True), stable=True) < k``.

  Sort-free (two sorts of A per row are most of the loss's time on CPU): the k-th smallest key t
  is found bit by bit, 32 counts over the row; then all keys below t and, in index order, as many
  keys equal to t as are missing.
  """
  def bit(i, t):  # t: the k-th smallest key's bits above bit b, zeros below
    b = jnp.uint32(1) << (31 - i).astype(jnp.uint32)
    # Bit b of the k-th smallest key is 0 when k keys are at most t with bit b 0, the rest 1.
    at_most = jnp.sum(keys <= (t | (b - 1)), axis=-1, keepdims=True)
    return jnp.where(at_most >= k, t, t | b)

  t = jax.lax.fori_loop(0, 32, bit, jnp.zeros(k.shape, jnp.uint32))  # [..., 1]; 0 when k = 0
  below = keys < t
  tie = keys == t
  missing = k - below.sum(axis=-1, keepdims=True)
  return below | (tie & (jnp.cumsum(tie, axis=-1) <= missing))


def sigmoid_focal(logits, cls_targets, *, alpha: float, gamma: float):
  """RetinaNet focal loss per anchor: logits [..., C], cls_targets [...] int -> [...] float32.

  Sums ``optax.sigmoid_focal_loss`` over the foreground classes 1..C-1 with one-hot targets;
  background anchors (label 0) have all-zero targets. The background column 0 is unused.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_fg = logits.shape[-1] - 1
  onehot = jax.nn.one_hot(jnp.asarray(cls_targets) - 1, num_fg, dtype=jnp.float32)  # label 0 -> zeros
  loss = optax.sigmoid_focal_loss(logits[..., 1:], onehot, alpha=alpha, gamma=gamma)
  return loss.sum(axis=-1)


def multibox_loss(loc_pred, logits, loc_targets, cls_targets, *, neg_pos_ratio: float = 3.0,
                  loc_weight: float = 1.0):
  """SSD multibox loss (Liu et al. 2016; Caffe ``MultiBoxLoss``).

  ``loss = (loc_weight * sum_pos smooth_l1 + sum_{pos + mined neg} CE) / max(num_pos, 1)``

  with ``num_pos`` the positives of the whole batch, CE the softmax cross-entropy with the anchor's
  target class, and the negatives mined per image by :func:`hard_negative_mask` on their
  background CE. A batch without any positive mines no negatives, so its loss is exactly 0 with
  zero (finite) gradients: there is nothing to normalize by, and training on negatives alone would
  only teach "background everywhere".

  Args:
    loc_pred, logits, loc_targets, cls_targets: see the module docstring.
    neg_pos_ratio: mined negatives per positive, per image.
    loc_weight: weight of the localization term (alpha in the paper).

  Returns:
    (loss, aux): float32 scalar and a dict of float32 scalars, see the module docstring.
  """
  _check(loc_pred, logits, loc_targets, cls_targets)
  _check_nonneg(neg_pos_ratio=neg_pos_ratio, loc_weight=loc_weight)
  cls_targets = jnp.asarray(cls_targets, jnp.int32)
  logits = jnp.asarray(logits, jnp.float32)
  positive = cls_targets > 0  # [B, A]
  loc = smooth_l1(loc_pred, loc_targets)  # [B, A]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, cls_targets)  # [B, A]
  # For negatives the CE already is the background loss; positives are excluded from the ranking.
  negative = hard_negative_mask(ce, positive, neg_pos_ratio=neg_pos_ratio)  # [B, A]
  num_pos = positive.sum().astype(jnp.float32)
  denom = jnp.maximum(num_pos, 1.0)
  loc_term = jnp.where(positive, loc, 0.0).sum() / denom
  conf_term = jnp.where(positive | negative, ce, 0.0).sum() / denom
  aux = {"loc": loc_term, "conf": conf_term, "num_pos": num_pos,
         "num_neg": negative.sum().astype(jnp.float32)}
  return loc_weight * loc_term + conf_term, aux


def focal_loss(loc_pred, logits, loc_targets, cls_targets, *, alpha: float = 0.25,
               gamma: float = 2.0, loc_weight: float = 1.0):
  """RetinaNet-style loss (Lin et al. 2017): sigmoid focal loss on every anchor, no mining.

  ``loss = (loc_weight * sum_pos smooth_l1 + sum_all sigmoid_focal) / max(num_pos, 1)``

  with :func:`sigmoid_focal` over the foreground classes (background anchors have all-zero targets)
  and ``num_pos`` the positives of the whole batch. ``aux["num_neg"]`` counts all background anchors.

  Args:
    loc_pred, logits, loc_targets, cls_targets: see the module docstring.
    alpha: weight of the positive targets (1 - alpha for the negatives), in [0, 1].
    gamma: focusing exponent, >= 0.
    loc_weight: weight of the localization term.

  Returns:
    (loss, aux): float32 scalar and a dict of float32 scalars, see the module docstring.
  """
  _check(loc_pred, logits, loc_targets, cls_targets)
  _check_nonneg(gamma=gamma, loc_weight=loc_weight)
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"focal loss alpha must be in [0, 1], got {alpha}")
  cls_targets = jnp.asarray(cls_targets, jnp.int32)
  positive = cls_targets > 0  # [B, A]
  loc = smooth_l1(loc_pred, loc_targets)  # [B, A]
  conf = sigmoid_focal(logits, cls_targets, alpha=alpha, gamma=gamma)  # [B, A]
  num_pos = positive.sum().astype(jnp.float32)
  denom = jnp.maximum(num_pos, 1.0)
  loc_term = jnp.where(positive, loc, 0.0).sum() / denom
  conf_term = conf.sum() / denom
  aux = {"loc": loc_term, "conf": conf_term, "num_pos": num_pos,
         "num_neg": (~positive).sum().astype(jnp.float32)}
  return loc_weight * loc_term + conf_term, aux


REGISTRY = registry.Registry("loss", "config.loss.type", registry.must_be_function(
    "loss", "fn(loc_pred, logits, loc_targets, cls_targets, **kwargs) -> (loss, aux)"))
REGISTRY.register("multibox", multibox_loss, _builtin=True)
REGISTRY.register("focal", focal_loss, _builtin=True)


def register(name: str, fn=None, *, overwrite: bool = False):
  """Registers a loss as ``name`` (usable as ``config.loss.type``); a decorator without ``fn``.

  A loss is ``fn(loc_pred, logits, loc_targets, cls_targets, **config.loss.kwargs) -> (loss,
  aux)``: inputs as in the module docstring, ``loss`` a float32 scalar to minimise, ``aux`` a dict
  of float32 scalars that the training loop logs (any keys).
  """
  return REGISTRY.register(name, fn, overwrite=overwrite)


def names() -> tuple[str, ...]:
  """The registered loss types (``config.loss.type``; an import path is valid too)."""
  return REGISTRY.names()


def get(name: str):
  """The loss function registered as ``name`` or imported from ``"package.module:Name"``."""
  return REGISTRY.get(name)


def from_config(config):
  """``(loc_pred, logits, loc_targets, cls_targets) -> (loss, aux)`` with ``config.loss.kwargs``
  bound to the function ``config.loss.type`` names (checked against its signature)."""
  c = config.loss
  fn = get(c.type)
  kwargs = c.kwargs.to_dict() if hasattr(c.kwargs, "to_dict") else dict(c.kwargs)
  registry.check_kwargs(fn, kwargs, field="config.loss.kwargs", name=c.type, positional=4)
  return functools.partial(fn, **kwargs)
