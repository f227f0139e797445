"""Mixed precision for the models: bfloat16 computation, float32 parameters and outputs.

Every model takes `dtype`, the dtype of its activations, matmuls and convolutions
(flax's `dtype`; parameters keep flax's `param_dtype`, float32). `None`, the default
and what train.compute_dtype='float32' gives, casts nothing: layers compute in the
dtype of their inputs and parameters, exactly as a model without the field (float32,
or float64 in the tests' references). `jnp.bfloat16` casts the inputs inside the first
layer; normalisation statistics are float32 (flax's `force_float32_reductions`); the
tensors a likelihood, an exp() or a softmax reads come back as float32 (`at_least_f32`).
"""

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any  # a jnp dtype (jnp.bfloat16) or None: compute as the inputs


def at_least_f32(x: jax.Array) -> jax.Array:
  """x in float32 when it is in a narrower float (bfloat16); otherwise x itself.

  float32 and float64 inputs pass through without an op, so a float32 model's program
  is unchanged.
  """
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def f32_dtype(dtype: Dtype) -> Dtype:
  """The dtype of layers that must stay float32 in a `dtype` model (heads behind exp):
  None (as the inputs) when the model casts nothing, else float32 or wider."""
  return None if dtype is None else jnp.promote_types(dtype, jnp.float32)
