"""Tests for ssdjax.losses against NumPy references written here."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ssd300_voc
from ssdjax import losses

# ---------------------------------------------------------------- independent NumPy references


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_smooth_l1(pred, target):
  d = np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))
  return np.where(d < 1, 0.5 * d * d, d - 0.5).sum(-1)


def ref_multibox(loc_pred, logits, loc_t, cls_t, neg_pos_ratio=3.0, loc_weight=1.0):
  """Caffe MultiBoxLoss, one image at a time: mining over the negatives of each image."""
  total_loc = total_conf = 0.0
  total_pos = total_neg = 0
  for b in range(len(cls_t)):
    lsm = np_log_softmax(logits[b])
    pos = np.flatnonzero(cls_t[b] > 0)
    neg = np.flatnonzero(cls_t[b] == 0)
    total_loc += np_smooth_l1(loc_pred[b][pos], loc_t[b][pos]).sum()
    total_conf += -lsm[pos, cls_t[b][pos]].sum()
    bg_loss = -lsm[neg, 0]
    keep = min(int(neg_pos_ratio * len(pos)), len(neg))
    chosen = neg[np.argsort(-bg_loss, kind="stable")[:keep]]
    total_conf += -lsm[chosen, 0].sum()
    total_pos += len(pos)
    total_neg += keep
  denom = max(total_pos, 1)
  return (loc_weight * total_loc + total_conf) / denom, dict(
      loc=total_loc / denom, conf=total_conf / denom, num_pos=total_pos, num_neg=total_neg)


def ref_focal(loc_pred, logits, loc_t, cls_t, alpha, gamma, loc_weight=1.0):
  """RetinaNet: FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) over the foreground classes."""
  logits = np.asarray(logits, np.float64)
  num_fg = logits.shape[-1] - 1
  y = (cls_t[..., None] == np.arange(1, num_fg + 1)).astype(np.float64)  # [B, A, C-1]
  p = 1 / (1 + np.exp(-logits[..., 1:]))
  p_t = np.where(y == 1, p, 1 - p)
  alpha_t = np.where(y == 1, alpha, 1 - alpha)
  fl = (-alpha_t * (1 - p_t) ** gamma * np.log(p_t)).sum()
  pos = cls_t > 0
  loc = np_smooth_l1(loc_pred, loc_t)[pos].sum()
  denom = max(pos.sum(), 1)
  return (loc_weight * loc + fl) / denom


def random_inputs(rng, batch=3, num_anchors=30, num_classes=5, pos_frac=0.1, dtype=np.float32):
  loc_pred = rng.normal(size=(batch, num_anchors, 4)) * 1.5
  logits = rng.normal(size=(batch, num_anchors, num_classes)) * 2
  loc_t = rng.normal(size=(batch, num_anchors, 4))
  cls_t = np.where(rng.uniform(size=(batch, num_anchors)) < pos_frac,
                   rng.integers(1, num_classes, (batch, num_anchors)), 0).astype(np.int32)
  return loc_pred.astype(dtype), logits.astype(dtype), loc_t.astype(dtype), cls_t


def assert_aux(aux, expected):
  for k in ("loc", "conf", "num_pos", "num_neg"):
    np.testing.assert_allclose(aux[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- multibox loss

@pytest.mark.parametrize("ratio,loc_weight", [(3.0, 1.0), (1.5, 2.0), (0.0, 1.0)])
def test_multibox_matches_numpy_reference(ratio, loc_weight):
  rng = np.random.default_rng(0)
  fn = jax.jit(functools.partial(losses.multibox_loss, neg_pos_ratio=ratio, loc_weight=loc_weight))
  for _ in range(6):
    inputs = random_inputs(rng, pos_frac=rng.uniform(0.02, 0.4))
    loss, aux = fn(*inputs)
    expected, expected_aux = ref_multibox(*inputs, neg_pos_ratio=ratio, loc_weight=loc_weight)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert_aux(aux, expected_aux)


def test_multibox_hand_computed():
  # Anchor 0 is positive (class 1, logits 0,0 -> CE log 2; loc error (.5, 0, 0, 2) -> .125 + 1.5).
  # Negatives: anchor 1 (bg loss log(1 + e)) beats anchor 2 (log(1 + 1/e)); ratio 1 keeps anchor 1.
  loc_pred = np.array([[[.5, 0, 0, 2], [9, 9, 9, 9], [9, 9, 9, 9]]], np.float32)
  logits = np.array([[[0, 0], [0, 1], [1, 0]]], np.float32)
  loc_t = np.zeros((1, 3, 4), np.float32)
  cls_t = np.array([[1, 0, 0]], np.int32)
  loss, aux = losses.multibox_loss(loc_pred, logits, loc_t, cls_t, neg_pos_ratio=1.0)
  expected_conf = math.log(2) + math.log(1 + math.e)
  np.testing.assert_allclose(loss, 1.625 + expected_conf, rtol=1e-6)
  np.testing.assert_allclose(aux["loc"], 1.625, rtol=1e-6)
  np.testing.assert_allclose(aux["conf"], expected_conf, rtol=1e-6)
  assert aux["num_pos"] == 1 and aux["num_neg"] == 1
  loss2, _ = losses.multibox_loss(loc_pred, logits, loc_t, cls_t, neg_pos_ratio=1.0, loc_weight=2.0)
  np.testing.assert_allclose(loss2, 2 * 1.625 + expected_conf, rtol=1e-6)


def test_mining_ranks_only_negatives():
  # The positive has by far the highest background loss; it must not take a negative's place.
  logits = np.array([[[-5, 5], [0, 2], [0, 1], [0, -1], [0, -2]]], np.float32)
  cls_t = np.array([[1, 0, 0, 0, 0]], np.int32)
  mask = losses.hard_negative_mask(-np_log_softmax(logits)[..., 0], cls_t > 0, neg_pos_ratio=2.0)
  np.testing.assert_array_equal(mask, [[False, True, True, False, False]])
  zeros = np.zeros((1, 5, 4), np.float32)
  loss, aux = losses.multibox_loss(zeros, logits, zeros, cls_t, neg_pos_ratio=2.0)
  lsm = np_log_softmax(logits[0])
  np.testing.assert_allclose(loss, -(lsm[0, 1] + lsm[1, 0] + lsm[2, 0]), rtol=1e-6)
  assert aux["num_neg"] == 2


def test_negative_count_is_min_of_ratio_and_available():
  num_anchors = 10
  cls_t = np.zeros((3, num_anchors), np.int32)
  cls_t[0, :3] = 1   # 3 pos -> min(9, 7) = 7
  cls_t[1, :1] = 2   # 1 pos -> min(3, 9) = 3
  cls_t[2, :2] = 1   # 2 pos, ratio 3 -> 6
  bg_loss = np.random.default_rng(1).uniform(size=(3, num_anchors))
  mask = np.asarray(losses.hard_negative_mask(bg_loss, cls_t > 0, neg_pos_ratio=3.0))
  np.testing.assert_array_equal(mask.sum(-1), [7, 3, 6])
  assert not (mask & (cls_t > 0)).any()
  # Fractional ratios floor per image, as Caffe's int(num_pos * ratio): 1.5 -> 4, 1, 3.
  mask = np.asarray(losses.hard_negative_mask(bg_loss, cls_t > 0, neg_pos_ratio=1.5))
  np.testing.assert_array_equal(mask.sum(-1), [4, 1, 3])
  # The kept negatives are the highest-loss ones.
  for b in range(3):
    neg = np.flatnonzero(cls_t[b] == 0)
    top = neg[np.argsort(-bg_loss[b, neg])[:mask[b].sum()]]
    np.testing.assert_array_equal(np.flatnonzero(mask[b]), np.sort(top))


def np_mining(bg_loss, positive, neg_pos_ratio):
  """The mining by ranks of a stable sort of -loss (NaNs last, -0 == +0); the first k kept."""
  loss = np.where(positive, -np.inf, np.asarray(bg_loss, np.float32))
  rank = np.empty(loss.shape, np.int64)
  for row in np.ndindex(loss.shape[:-1]):
    rank[row][np.argsort(-loss[row], kind="stable")] = np.arange(loss.shape[-1])
  num_pos = positive.sum(-1, keepdims=True)
  keep = np.minimum(np.floor(np.float32(neg_pos_ratio) * num_pos.astype(np.float32)),
                    loss.shape[-1] - num_pos)
  return (rank < keep) & ~positive


def argsort_mining(keys, k):
  """The previous ranking of losses.hard_negative_mask: a double stable argsort."""
  return jnp.argsort(jnp.argsort(keys, axis=-1, stable=True), axis=-1, stable=True) < k


def previous_mining(bg_loss, positive, neg_pos_ratio):
  """losses.hard_negative_mask as it was, with two sorts."""
  loss = jnp.where(positive, -jnp.inf, bg_loss)
  num_pos = positive.sum(axis=-1, keepdims=True)
  num_keep = jnp.minimum(jnp.floor(neg_pos_ratio * num_pos.astype(jnp.float32)).astype(jnp.int32),
                         positive.shape[-1] - num_pos)
  return argsort_mining(-loss, num_keep) & ~positive


# Signed zeros, infinities, NaNs of both signs, the largest floats and denormals (which XLA:CPU
# flushes to zero, so they tie with 0 in jitted code, where NumPy orders them).
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1.0, 2.0],
                   np.float32)
DENORMALS = np.array([1e-45, -1e-45, 1e-39], np.float32)


def mining_losses(rng, kind, shape):
  """bg_loss [B, A] float32 with many exact ties, or special values."""
  if kind == "normal":
    loss = rng.normal(size=shape)
  elif kind == "ties":  # a few distinct values
    loss = rng.integers(0, 4, shape) / 4
  elif kind == "special":
    loss = SPECIAL[rng.integers(len(SPECIAL), size=shape)]
  elif kind == "denormal":
    pool = np.concatenate([SPECIAL, DENORMALS])
    loss = pool[rng.integers(len(pool), size=shape)]
  elif kind == "equal":
    loss = np.full(shape, rng.choice(SPECIAL))
  elif kind in ("zeros", "nans"):  # values that sort as equal although their bits differ
    pool = [0.0, -0.0, 1.0] if kind == "zeros" else [np.nan, -np.nan, 1.0]
    loss = np.array(pool, np.float32)[rng.integers(len(pool), size=shape)]
  else:  # "ce": non-negative like a cross-entropy, half of it exactly 0
    loss = np.abs(rng.normal(size=shape)) * (rng.uniform(size=shape) < 0.5)
  return loss.astype(np.float32)


MINING_KINDS = ["normal", "ties", "special", "denormal", "equal", "zeros", "nans", "ce"]


@pytest.mark.parametrize("kind", MINING_KINDS)
def test_mining_equals_stable_double_argsort(kind):
  # The sort-free mining keeps exactly the anchors that the previous double stable argsort ranks
  # first (ties -> lower index) for every input: k = 0, no or only positives, NaN, signed-zero and
  # denormal losses; and, but for denormals, those of a NumPy stable sort.
  rng = np.random.default_rng(12)
  mine = jax.jit(lambda l, p, r: losses.hard_negative_mask(l, p, neg_pos_ratio=r))
  previous = jax.jit(previous_mining)
  for shape in ((1, 1), (2, 2), (3, 5), (2, 17), (3, 300), (1, 8732)):
    # (positive fraction, ratio): no positives, all positives, and k strictly between 0 and the
    # number of negatives.
    for frac, ratio in ((0.0, 3.0), (1.0, 3.0), (0.05, 3.0), (0.2, 1.0), (0.3, 0.5), (0.1, 1e4)):
      loss = mining_losses(rng, kind, shape)
      positive = rng.uniform(size=shape) < frac
      mask = np.asarray(mine(loss, positive, np.float32(ratio)))
      msg = f"{shape} {frac} {ratio}"
      np.testing.assert_array_equal(mask, previous(loss, positive, np.float32(ratio)), err_msg=msg)
      if kind != "denormal":
        np.testing.assert_array_equal(mask, np_mining(loss, positive, ratio), err_msg=msg)


@pytest.mark.parametrize("kind", MINING_KINDS)
def test_mining_keys_sort_as_floats(kind):
  x = mining_losses(np.random.default_rng(14), kind, (3, 300))
  by_keys = jax.jit(lambda x: jnp.argsort(losses._sort_keys(x), axis=-1, stable=True))
  np.testing.assert_array_equal(by_keys(x), jnp.argsort(x, axis=-1, stable=True))


def test_first_in_order_equals_double_argsort_for_every_k():
  rng = np.random.default_rng(15)
  first, by_argsort = jax.jit(losses._first_in_order), jax.jit(argsort_mining)
  for num_anchors in (1, 2, 17, 300):
    keys = rng.integers(0, 4, (4, num_anchors)).astype(np.uint32)
    keys[1] = rng.integers(0, 2**32, num_anchors, dtype=np.uint64).astype(np.uint32)
    keys[2] = 2**32 - 1  # all equal, at the top of the range
    for k in {0, 1, num_anchors // 2, num_anchors - 1, num_anchors}:
      k = np.full((4, 1), k, np.int32)
      np.testing.assert_array_equal(first(keys, k), by_argsort(keys, k))


def test_mining_with_equal_losses_keeps_the_lowest_indices():
  positive = np.zeros((2, 10), bool)
  positive[0, [3, 7]] = True
  positive[1, 0] = True
  mask = np.asarray(losses.hard_negative_mask(np.ones((2, 10)), positive, neg_pos_ratio=2.0))
  np.testing.assert_array_equal(np.flatnonzero(mask[0]), [0, 1, 2, 4])
  np.testing.assert_array_equal(np.flatnonzero(mask[1]), [1, 2])


@pytest.mark.parametrize("quantized", [False, True])
def test_multibox_loss_and_grads_as_with_argsort_mining(quantized, monkeypatch):
  # Same mask as the double argsort, so the same loss, aux and gradients, bit for bit; quantized
  # logits make many anchors' background losses exactly equal.
  rng = np.random.default_rng(13)
  loc_pred, logits, loc_t, cls_t = random_inputs(rng, batch=3, num_anchors=500, num_classes=6,
                                                 pos_frac=0.03)
  if quantized:
    logits = np.round(logits).astype(np.float32)
  fn = jax.jit(jax.value_and_grad(losses.multibox_loss, argnums=(0, 1), has_aux=True))
  (loss, aux), grads = fn(loc_pred, logits, loc_t, cls_t)
  monkeypatch.setattr(losses, "_first_in_order", argsort_mining)
  (ref_loss, ref_aux), ref_grads = jax.jit(
      jax.value_and_grad(losses.multibox_loss, argnums=(0, 1), has_aux=True))(
          loc_pred, logits, loc_t, cls_t)
  np.testing.assert_array_equal(loss, ref_loss)
  for k in ref_aux:
    np.testing.assert_array_equal(aux[k], ref_aux[k], err_msg=k)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_array_equal(g, ref_g)
  assert aux["num_neg"] > 0


def test_zero_positives_gives_zero_loss_and_finite_zero_grads():
  rng = np.random.default_rng(2)
  loc_pred, logits, loc_t, _ = random_inputs(rng)
  cls_t = np.zeros(logits.shape[:2], np.int32)
  for name in ("multibox", "focal"):
    fn = losses.get(name)
    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
        loc_pred, logits, loc_t, cls_t)
    assert all(np.isfinite(g).all() for g in grads)
    if name == "multibox":
      assert float(loss) == 0.0 and aux["num_neg"] == 0
      assert all((np.asarray(g) == 0).all() for g in grads)
    else:  # focal still pushes every foreground score down, normalized by 1
      expected = ref_focal(loc_pred, logits, loc_t, cls_t, alpha=0.25, gamma=2.0)
      np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_image_without_gt_in_batch_with_positives():
  rng = np.random.default_rng(3)
  inputs = list(random_inputs(rng, batch=2, num_anchors=20))
  inputs[3] = inputs[3].copy()
  inputs[3][0] = 0             # image 0 has no gt
  inputs[3][1] = 0
  inputs[3][1, [2, 5]] = [1, 3]  # image 1 has two positives
  loss, aux = losses.multibox_loss(*inputs)
  expected, expected_aux = ref_multibox(*inputs)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert_aux(aux, expected_aux)
  assert aux["num_neg"] == 6  # all from image 1; image 0 mines none


def test_large_and_degenerate_values_stay_finite():
  rng = np.random.default_rng(4)
  loc_pred, logits, loc_t, cls_t = random_inputs(rng)
  logits = (np.sign(logits) * 1e4).astype(np.float32)
  loc_pred = (loc_pred * 1e6).astype(np.float32)
  for name in ("multibox", "focal"):
    (loss, _), grads = jax.jit(jax.value_and_grad(losses.get(name), argnums=(0, 1), has_aux=True))(
        loc_pred, logits, loc_t, cls_t)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)


def test_bf16_inputs_compute_in_float32():
  inputs = random_inputs(np.random.default_rng(5))
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:3]] + [inputs[3]]
  for name in ("multibox", "focal"):
    loss, aux = losses.get(name)(*bf16)
    assert loss.dtype == jnp.float32 and aux["loc"].dtype == jnp.float32
    # Same as float32 inputs rounded to bf16 first.
    rounded = [np.asarray(x, np.float32) for x in bf16[:3]] + [inputs[3]]
    np.testing.assert_allclose(loss, losses.get(name)(*rounded)[0], rtol=1e-6)


@pytest.mark.parametrize("name", ["multibox", "focal"])
def test_jit_equals_no_jit_and_grads_finite(name):
  inputs = random_inputs(np.random.default_rng(6))
  fn = losses.get(name)
  eager, eager_aux = fn(*inputs)
  jitted, jitted_aux = jax.jit(fn)(*inputs)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6)
  for k in eager_aux:
    np.testing.assert_allclose(eager_aux[k], jitted_aux[k], rtol=1e-6)
  grads = jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))(*inputs)
  assert all(np.isfinite(g).all() for g in grads)
  assert any(np.abs(g).sum() > 0 for g in grads)


def test_multibox_grad_matches_finite_differences():
  loc_pred, logits, loc_t, cls_t = random_inputs(np.random.default_rng(7), batch=1, num_anchors=8,
                                                 num_classes=3, pos_frac=0.3)
  grad = np.asarray(jax.grad(lambda lg: losses.multibox_loss(loc_pred, lg, loc_t, cls_t)[0])(logits))
  logits64 = logits.astype(np.float64)
  eps = 1e-5
  for idx in [(0, 0, 0), (0, 3, 1), (0, 7, 2)]:
    up, down = logits64.copy(), logits64.copy()
    up[idx] += eps
    down[idx] -= eps
    fd = (ref_multibox(loc_pred, up, loc_t, cls_t)[0] -
          ref_multibox(loc_pred, down, loc_t, cls_t)[0]) / (2 * eps)
    np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- focal loss

@pytest.mark.parametrize("alpha,gamma,loc_weight", [(0.25, 2.0, 1.0), (0.5, 0.0, 0.5), (0.9, 1.5, 2.0)])
def test_focal_matches_numpy_formula(alpha, gamma, loc_weight):
  inputs = random_inputs(np.random.default_rng(8), pos_frac=0.2)
  loss, aux = losses.focal_loss(*inputs, alpha=alpha, gamma=gamma, loc_weight=loc_weight)
  expected = ref_focal(*inputs, alpha=alpha, gamma=gamma, loc_weight=loc_weight)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  num_pos = (inputs[3] > 0).sum()
  assert aux["num_pos"] == num_pos and aux["num_neg"] == inputs[3].size - num_pos
  np.testing.assert_allclose(loc_weight * aux["loc"] + aux["conf"], loss, rtol=1e-6)


def test_focal_ignores_background_column():
  inputs = list(random_inputs(np.random.default_rng(9)))
  base = losses.focal_loss(*inputs)[0]
  inputs[1] = inputs[1].copy()
  inputs[1][..., 0] = 123.0
  np.testing.assert_allclose(losses.focal_loss(*inputs)[0], base, rtol=1e-6)


# ---------------------------------------------------------------- errors and registry

def test_shape_mismatch_and_bad_values_raise():
  loc_pred, logits, loc_t, cls_t = random_inputs(np.random.default_rng(10))
  for fn in (losses.multibox_loss, losses.focal_loss):
    with pytest.raises(ValueError, match="loc_pred"):
      fn(loc_pred[:, :-1], logits, loc_t, cls_t)
    with pytest.raises(ValueError, match="loc_targets"):
      fn(loc_pred, logits, loc_t[..., :2], cls_t)
    with pytest.raises(ValueError, match="logits"):
      fn(loc_pred, logits[:, :-1], loc_t, cls_t)
    with pytest.raises(ValueError, match="cls_targets"):
      fn(loc_pred, logits, loc_t, cls_t[0])
    with pytest.raises(ValueError, match="integer"):
      fn(loc_pred, logits, loc_t, cls_t.astype(np.float32))
    with pytest.raises(ValueError, match="C >= 2"):
      fn(loc_pred, logits[..., :1], loc_t, cls_t)
  with pytest.raises(ValueError, match="neg_pos_ratio"):
    losses.multibox_loss(loc_pred, logits, loc_t, cls_t, neg_pos_ratio=-1.0)
  with pytest.raises(ValueError, match="alpha"):
    losses.focal_loss(loc_pred, logits, loc_t, cls_t, alpha=1.5)
  with pytest.raises(ValueError, match="same shape"):
    losses.hard_negative_mask(np.zeros((2, 3)), np.zeros((2, 4), bool), neg_pos_ratio=3.0)
  with pytest.raises(ValueError, match="same shape"):
    losses.smooth_l1(loc_pred, loc_t[:, :-1])


def test_registry_and_from_config():
  assert losses.names() == ("focal", "multibox")
  assert losses.get("multibox") is losses.multibox_loss
  with pytest.raises(ValueError, match="focal.*multibox"):
    losses.get("ohem")
  inputs = random_inputs(np.random.default_rng(11))
  config = ssd300_voc.get_config()
  config.loss.kwargs.neg_pos_ratio = 2.0
  config.loss.kwargs.loc_weight = 0.5
  np.testing.assert_allclose(losses.from_config(config)(*inputs)[0],
                             ref_multibox(*inputs, neg_pos_ratio=2.0, loc_weight=0.5)[0], rtol=1e-5)
  config.loss.type = "focal"
  with pytest.raises(ValueError, match="neg_pos_ratio.*accepted keys: alpha, gamma, loc_weight"):
    losses.from_config(config)  # the multibox kwargs do not fit the focal loss
  config.loss.kwargs = {"alpha": 0.4, "gamma": 1.0, "loc_weight": 0.5}
  np.testing.assert_allclose(losses.from_config(config)(*inputs)[0],
                             ref_focal(*inputs, alpha=0.4, gamma=1.0, loc_weight=0.5), rtol=1e-5)
  config.loss.type = "nope"
  with pytest.raises(ValueError, match="valid names"):
    losses.from_config(config)
