"""Convolution with a faster weight gradient on CPU, for the train step.

XLA:CPU computes a convolution's weight gradient as a "backward filter" convolution that runs
1.6-3.4x slower than the forward convolution of the same FLOPs (SSD300-VGG16's layers, batch 8).
The same gradient is a sum over the kernel taps of one matrix product each,
``dW[i, j] = x_shift(i, j)^T @ dy`` over all batch and output positions, which XLA:CPU runs at
close to the speed of the forward convolution: SSD300-VGG16's whole train step (batch 8, 2 cores)
takes 6.6 s instead of 9.6 s (1.46x, interleaved; BENCHMARKS.md).

:func:`conv_general_dilated` is ``lax.conv_general_dilated`` for every use, with one exception:
inside :func:`tap_weight_grad` (the train step enters it when ``train.conv_weight_grad`` says so),
an ungrouped NHWC/HWIO convolution gets that weight gradient through a ``custom_vjp``. Outside it
the function is lax's own, so forward-mode and higher-order differentiation of the models work as
usual. The models build their convolutions with :data:`Conv`; a module of your own that uses
``nn.Conv`` directly keeps XLA's gradient (pass ``conv_general_dilated=conv.conv_general_dilated``
to use this one).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_TAP_WEIGHT_GRAD = contextvars.ContextVar("ssdjax_tap_weight_grad", default=False)
_NHWC = ("NHWC", "HWIO", "NHWC")


@contextlib.contextmanager
def tap_weight_grad(enabled: bool = True):
  """Within this context (at trace time), eligible convolutions use the per-tap weight gradient."""
  token = _TAP_WEIGHT_GRAD.set(enabled)
  try:
    yield
  finally:
    _TAP_WEIGHT_GRAD.reset(token)


def resolve(mode: str) -> bool:
  """``train.conv_weight_grad`` -> whether to use the per-tap gradient: 'auto' = on CPU only."""
  if mode == "auto":
    return jax.default_backend() == "cpu"
  return mode == "taps"


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``; the per-tap weight gradient inside :func:`tap_weight_grad`."""
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
  eligible = (_TAP_WEIGHT_GRAD.get() and lhs.ndim == 4 and _is_nhwc(dimension_numbers)
              and feature_group_count == 1 and batch_group_count == 1
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and preferred_element_type is None)
  if not eligible:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return _tap_conv(lhs, rhs, strides, padding, dilation, precision)


def _conv(x, w, strides, padding, dilation, precision):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _tap_conv(x, w, strides: Sequence[int], padding, dilation, precision):
  return _conv(x, w, strides, padding, dilation, precision)


def _tap_conv_fwd(x, w, strides, padding, dilation, precision):
  return _conv(x, w, strides, padding, dilation, precision), (x, w)


def weight_grad(x, g, kernel_shape, strides, padding, dilation, precision=None):
  """d(conv)/d(kernel) contracted with ``g``: one matrix product per kernel tap (NHWC, HWIO).

  The taps run one after another (a ``lax.scan``), so at most one shifted copy of ``x`` exists
  at a time and the products do not compete for the cores.
  """
  kh, kw, ci, co = kernel_shape
  n, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  g2 = g.reshape(-1, co)
  span = ((ho - 1) * strides[0] + 1, (wo - 1) * strides[1] + 1)

  def tap(_, ij):
    window = lax.dynamic_slice(xp, (0, ij[0] * dilation[0], ij[1] * dilation[1], 0),
                               (n, span[0], span[1], ci))
    xs = window[:, ::strides[0], ::strides[1], :]
    return None, lax.dot_general(xs.reshape(-1, ci), g2, (((0,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)

  ij = jnp.stack(jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij"), -1).reshape(-1, 2)
  _, taps = lax.scan(tap, None, ij)
  return taps.reshape(kh, kw, ci, co)


def _tap_conv_bwd(strides, padding, dilation, precision, residuals, g):
  x, w = residuals
  _, input_grad = jax.vjp(lambda x: _conv(x, w, strides, padding, dilation, precision), x)
  dw = weight_grad(x, g, w.shape, strides, padding, dilation, precision)
  return input_grad(g)[0], dw.astype(w.dtype)


_tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)

# The models' convolution: flax's, with the function above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
