"""Layers with the parameters and outputs of flax.linen layers but faster XLA graphs.

`ConvTranspose` is `nn.ConvTranspose` (same 'kernel'/'bias' parameters, same function)
for the two shapes the conv VAE decoder uses, computed without `lhs_dilation`: on
XLA:CPU the gradient of a dilated-input convolution is many times slower than the
convolution itself, which made the decoder's backward pass dominate training.

`Conv` is `nn.Conv` (same parameters, same function) that runs a 'VALID' convolution
whose kernel covers its whole input (the VAE's mean and log-variance heads, the DCGAN
discriminator's logit) as the matmul it is: as a convolution, its input gradient is a
fully padded convolution with a flipped, transposed copy of the kernel.
"""

from collections.abc import Sequence
import itertools
import math

import flax.linen as nn
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding
import jax
from jax import lax
import jax.numpy as jnp


def _phase_kernel(kernel: jax.Array) -> jax.Array:
  """The stride-1 kernel giving every output phase of a k=4, s=2, 'SAME' conv_transpose.

  lax pads the 2-dilated input by (2, 2) and correlates with the unflipped kernel, so
  per spatial axis y[2p] = x[p-1]·k[0] + x[p]·k[2] and y[2p+1] = x[p]·k[1] + x[p+1]·k[3].
  A 3-tap window over x[p-1..p+1] then needs taps (k0, k2, 0) for phase 0 and
  (0, k1, k3) for phase 1. Returns (3,)*ndim + (C_in, 2**ndim * C_out), output
  channels ordered (phase_1, ..., phase_ndim, C_out).
  """
  ndim = kernel.ndim - 2
  # Tap index per (window position, phase); 4 is an appended zero tap.
  taps = jnp.array([[0, 4], [2, 1], [4, 3]])
  k = jnp.pad(kernel, [(0, 1)] * ndim + [(0, 0)] * 2)
  for axis in range(ndim):
    # Axis `axis` (size 5) becomes (window, phase) at positions 2·axis, 2·axis + 1.
    k = jnp.take(k, taps, axis=2 * axis)
  c_in, c_out = kernel.shape[-2:]
  # (w1, r1, ..., wn, rn, C_in, C_out) -> (w1, ..., wn, C_in, r1, ..., rn, C_out)
  perm = ([2 * a for a in range(ndim)] + [2 * ndim]
          + [2 * a + 1 for a in range(ndim)] + [2 * ndim + 1])
  k = k.transpose(perm)
  return k.reshape((3,) * ndim + (c_in, 2**ndim * c_out))


def _depth_to_space(y: jax.Array, ndim: int, c_out: int) -> jax.Array:
  """(B, *S, 2**ndim·C) with channels (r1..rn, C) -> (B, *(2·S), C)."""
  batch, spatial = y.shape[0], y.shape[1:1 + ndim]
  y = y.reshape((batch, *spatial, *(2,) * ndim, c_out))
  # (B, s1..sn, r1..rn, C) -> (B, s1, r1, ..., sn, rn, C)
  perm = [0] + [a for i in range(ndim) for a in (1 + i, 1 + ndim + i)] + [1 + 2 * ndim]
  return y.transpose(perm).reshape((batch, *(2 * s for s in spatial), c_out))


def _dimension_numbers(ndim: int) -> tuple[str, str, str]:
  """Channels-last layouts (NHWC, HWIO, NHWC) for `ndim` spatial axes."""
  sp = "DHW"[3 - ndim:]
  return "N" + sp + "C", sp + "IO", "N" + sp + "C"


def _merged_phase_conv(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """All 2^n phases from one 3^n conv with 2^n·C_out outputs (zero taps included)."""
  ndim = x.ndim - 2
  return lax.conv_general_dilated(x, _phase_kernel(kernel), (1,) * ndim, ((1, 1),) * ndim,
                                  dimension_numbers=_dimension_numbers(ndim),
                                  precision=precision)


def _separate_phase_convs(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """One 2^n conv per phase: phase 0 of an axis sees x[p-1], x[p] with taps k[0::2]
  (pad (1, 0)); phase 1 sees x[p], x[p+1] with taps k[1::2] (pad (0, 1))."""
  ndim = x.ndim - 2
  outs = []
  for phase in itertools.product((0, 1), repeat=ndim):
    taps = kernel[tuple(slice(r, None, 2) for r in phase)]
    pad = tuple((1, 0) if r == 0 else (0, 1) for r in phase)
    outs.append(lax.conv_general_dilated(x, taps, (1,) * ndim, pad,
                                         dimension_numbers=_dimension_numbers(ndim),
                                         precision=precision))
  return jnp.concatenate(outs, axis=-1)


# Below this many output channels the per-phase convs are too thin for XLA:CPU's conv
# kernels (a 16²·32→1 layer: 12 ms vs 3 ms forward), so the phases share one conv.
MERGE_PHASES_BELOW = 8


def conv_transpose_s2_same(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """lax.conv_transpose(x, kernel, (2,)*n, 'SAME') for a 4^n kernel via stride-1 convs.

  x: (B, *S, C_in) channels-last; kernel: (4,)*n + (C_in, C_out). Returns (B, *(2·S), C_out).
  """
  c_out = kernel.shape[-1]
  phase_conv = _merged_phase_conv if c_out < MERGE_PHASES_BELOW else _separate_phase_convs
  return _depth_to_space(phase_conv(x, kernel, precision), x.ndim - 2, c_out)


def conv_transpose_from_point(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """lax.conv_transpose(x, kernel, (1,)*n, 'VALID') for a 1^n input: a dense layer.

  With stride 1 lax pads by k-1 and correlates, so output position o sees tap k-1-o:
  y[b, o, c] = Σ_i x[b, i] · kernel[k-1-o, i, c].
  """
  ndim = x.ndim - 2
  flipped = kernel[(slice(None, None, -1),) * ndim]
  x = x.reshape(x.shape[0], x.shape[-1])
  w = jnp.moveaxis(flipped, -2, 0).reshape(kernel.shape[-2], -1)  # (C_in, k^n·C_out)
  y = jnp.dot(x, w, precision=precision)
  return y.reshape((x.shape[0], *kernel.shape[:ndim], kernel.shape[-1]))


class _ConvLike(nn.Module):
  """The fields, parameters and batch handling flax's Conv and ConvTranspose share."""

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] | None = None
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  precision: lax.PrecisionLike = None
  kernel_init: initializers.Initializer = nn.linear.default_kernel_init
  bias_init: initializers.Initializer = initializers.zeros_init()

  def _setup_call(self, inputs: jax.Array):
    """(kernel size, strides, batch shape, inputs as (B, *S, C), kernel, bias).

    Creates 'kernel' then 'bias' (flax's order, so each gets flax's rng) and flattens
    any batch dims to one (as flax does); `_finish` restores them.
    """
    ks = ((self.kernel_size,) if isinstance(self.kernel_size, int)
          else tuple(self.kernel_size))
    ndim = len(ks)
    if self.strides is None or isinstance(self.strides, int):
      strides = (self.strides or 1,) * ndim
    else:
      strides = tuple(self.strides)
    batch_shape = inputs.shape[:inputs.ndim - ndim - 1]
    inputs = inputs.reshape((-1, *inputs.shape[len(batch_shape):]))
    kernel = self.param("kernel", self.kernel_init, ks + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return ks, strides, batch_shape, inputs, kernel, bias

  @staticmethod
  def _finish(y: jax.Array, bias, batch_shape) -> jax.Array:
    if bias is not None:
      y = y + bias
    return y.reshape((*batch_shape, *y.shape[1:]))


class ConvTranspose(_ConvLike):
  """Drop-in `nn.ConvTranspose` (same parameters, same output) with fast special cases.

  Kernel 4 / stride 2 / 'SAME' runs as stride-1 convs producing the 2^n output phases,
  then a depth-to-space interleave; kernel k / stride 1 / 'VALID' on a 1^n input runs
  as a matmul. Everything else falls back to `lax.conv_transpose`.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    ks, strides, batch_shape, inputs, kernel, bias = self._setup_call(inputs)
    ndim = len(ks)
    spatial = inputs.shape[1:-1]
    if ks == (4,) * ndim and strides == (2,) * ndim and self.padding == "SAME":
      y = conv_transpose_s2_same(inputs, kernel, self.precision)
    elif strides == (1,) * ndim and self.padding == "VALID" and math.prod(spatial) == 1:
      y = conv_transpose_from_point(inputs, kernel, self.precision)
    else:
      padding = canonicalize_padding(self.padding, ndim)
      if padding == "CIRCULAR":
        raise ValueError("layers.ConvTranspose does not support padding='CIRCULAR'")
      y = lax.conv_transpose(inputs, kernel, strides, padding, precision=self.precision)
    return self._finish(y, bias, batch_shape)


def conv_covering_input(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """lax.conv(x, kernel, 'VALID') when the kernel's spatial shape is x's: one matmul.

  x: (B, *S, C_in); kernel: (*S, C_in, C_out). Returns (B, 1, ..., 1, C_out). Both
  reshapes are free (row-major), so neither the forward nor either gradient moves the
  kernel in memory.
  """
  ndim = x.ndim - 2
  y = jnp.dot(x.reshape(x.shape[0], -1), kernel.reshape(-1, kernel.shape[-1]),
              precision=precision)
  return y.reshape((x.shape[0],) + (1,) * ndim + (kernel.shape[-1],))


class Conv(_ConvLike):
  """Drop-in `nn.Conv` (same parameters, same output), channels-last, no groups/dilation.

  A 'VALID' convolution whose kernel covers the whole input runs as a matmul
  (`conv_covering_input`); everything else is `lax.conv_general_dilated`.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    ks, strides, batch_shape, inputs, kernel, bias = self._setup_call(inputs)
    ndim = len(ks)
    if self.padding == "VALID" and tuple(inputs.shape[1:-1]) == ks:
      y = conv_covering_input(inputs, kernel, self.precision)
    else:
      padding = canonicalize_padding(self.padding, ndim)
      if padding == "CIRCULAR":
        raise ValueError("layers.Conv does not support padding='CIRCULAR'")
      y = lax.conv_general_dilated(inputs, kernel, strides, padding,
                                   dimension_numbers=_dimension_numbers(ndim),
                                   precision=self.precision)
    return self._finish(y, bias, batch_shape)

