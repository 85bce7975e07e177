"""The per-tap convolution weight gradient (ssdjax.models.conv) against XLA's own gradient."""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from ssdjax import train
from ssdjax.models import conv
from tests.helpers import small_config

NHWC = ("NHWC", "HWIO", "NHWC")

# (input [N, H, W, C], kernel [kh, kw, C, O], strides, padding, dilation): VGG's 3x3, fc6's
# dilation 6, the strided and unpadded extras, SSD512's 4x4, 1x1, asymmetric and string padding.
CASES = [
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 19, 19, 4), (3, 3, 4, 6), (1, 1), ((6, 6), (6, 6)), (6, 6)),
    ((2, 10, 9, 4), (3, 3, 4, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((1, 5, 5, 3), (3, 3, 3, 4), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 4, 4, 3), (4, 4, 3, 2), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((3, 7, 6, 8), (1, 1, 8, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 8, 7, 3), (3, 2, 3, 4), (2, 1), ((0, 2), (1, 0)), (1, 2)),
    ((2, 9, 8, 3), (3, 3, 3, 4), (2, 2), "SAME", (1, 1)),
    ((2, 9, 8, 3), (3, 3, 3, 4), (2, 3), "VALID", (1, 1)),
]


def _loss(fn, x, w, strides, padding, dilation, g):
  y = fn(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)
  return jnp.sum(y * g)


@pytest.mark.parametrize("shape_x,shape_w,strides,padding,dilation", CASES)
def test_tap_gradients_equal_xla(shape_x, shape_w, strides, padding, dilation):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=shape_x), jnp.float32)
  w = jnp.asarray(r.normal(size=shape_w), jnp.float32)
  y = lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)
  g = jnp.asarray(r.normal(size=y.shape), jnp.float32)
  ref = jax.grad(_loss, argnums=(1, 2))(lax.conv_general_dilated, x, w, strides, padding,
                                          dilation, g)
  with conv.tap_weight_grad():
    jaxpr = jax.make_jaxpr(jax.grad(_loss, argnums=(1, 2)), static_argnums=(0, 3, 4, 5))(
        conv.conv_general_dilated, x, w, strides, padding, dilation, g)
    got = jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=(0, 3, 4, 5))(
        conv.conv_general_dilated, x, w, strides, padding, dilation, g)
  assert "dot_general" in str(jaxpr)  # the per-tap path was taken (lax has no dot)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(b))))
  # The forward value is lax's, exactly.
  with conv.tap_weight_grad():
    same = conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                     dimension_numbers=NHWC)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(y))


def test_weight_grad_by_hand():
  """A 1-channel 2x2 kernel on a 3x3 image, no padding: dW[i, j] = sum_p x[p + (i, j)] g[p]."""
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  g = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  dw = conv.weight_grad(x, g, (2, 2, 1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1))
  xs = np.arange(9.0).reshape(3, 3)
  want = [[np.sum(xs[i:i + 2, j:j + 2] * np.array([[1, 2], [3, 4]])) for j in range(2)]
          for i in range(2)]
  np.testing.assert_array_equal(np.asarray(dw)[:, :, 0, 0], want)  # 37 47 67 77


def test_outside_the_context_and_for_grouped_convs_it_is_lax():
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 1, 4))
  f = lambda x, w, groups: conv.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=groups)
  dense = jnp.ones((3, 3, 4, 4))
  # The per-tap gradient is the only one with matrix products (lax's has convolutions only).
  taps = lambda w, groups: "dot_general" in str(
      jax.make_jaxpr(jax.grad(lambda w: f(x, w, groups).sum()))(w))
  assert not taps(dense, 1)
  with conv.tap_weight_grad():
    assert not taps(w, 4)  # depthwise
    assert taps(dense, 1)
  # Forward-mode differentiation of the models works outside the train step.
  _, tangent = jax.jvp(lambda w: f(x, w, 1), (dense,), (dense,))
  assert tangent.shape == (1, 6, 6, 4)


def test_resolve_auto_is_taps_only_on_cpu():
  assert conv.resolve("taps") and not conv.resolve("xla")
  assert conv.resolve("auto") is (jax.default_backend() == "cpu")


def test_train_step_with_tap_gradients_matches_xla_gradients():
  """One train step of the synthetic model: the same loss, parameters equal to float32 rounding."""
  r = np.random.default_rng(0)
  results = {}
  for mode in ("taps", "xla"):
    # SGD: the update is proportional to the gradient (Adam's first step is lr * sign(g), which
    # turns the rounding of a near-zero gradient into a full step).
    config = small_config(**{"train.conv_weight_grad": mode, "optimizer.warmup_steps": 0,
                             "optimizer.name": "sgd", "optimizer.learning_rate": 1.0})
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    s, g = config.image_size, config.data.max_boxes
    lo = r.uniform(0.0, 0.6, size=(8, g, 2))
    batch = {"images": r.normal(size=(8, s, s, 3)).astype(np.float32),
             "gt_boxes": np.concatenate([lo, lo + 0.3], -1).astype(np.float32),
             "gt_labels": r.integers(1, len(config.class_names) + 1, size=(8, g)).astype(np.int32),
             "gt_mask": np.arange(g)[None, :].repeat(8, 0) < 3}
    r = np.random.default_rng(0)  # the same batch for both
    new_state, metrics = trainer.train_step(state, trainer.to_device(batch))
    results[mode] = jax.device_get((new_state["params"], metrics))
  (p_taps, m_taps), (p_xla, m_xla) = results["taps"], results["xla"]
  assert float(m_taps["loss"]) == float(m_xla["loss"])  # the forward pass is the same
  np.testing.assert_allclose(float(m_taps["grad_norm"]), float(m_xla["grad_norm"]), rtol=1e-5)
  # lr 1: the parameters moved by the gradient itself, which the two agree on to float32 rounding.
  for a, b in zip(jax.tree.leaves(p_taps), jax.tree.leaves(p_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
