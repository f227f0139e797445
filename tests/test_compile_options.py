"""Tests for jaxad.compile_options: the CPU options reach XLA and change no result."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import compile_options


def _conv_and_dot(x, w, a):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y, a @ a


def test_cpu_programs_compile_without_ynnpack_and_agree_with_the_default():
  assert jax.default_backend() == "cpu"
  assert compile_options.options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in ((4, 16, 16, 32), (3, 3, 32, 32), (64, 64))]
  default = jax.jit(_conv_and_dot)
  ours = compile_options.jit(_conv_and_dot)
  # XLA's default sends this dot and convolution to YNNPACK; ours sends neither.
  assert "__ynn_fusion" in default.lower(*args).compile().as_text()
  assert "__ynn_fusion" not in ours.lower(*args).compile().as_text()
  for a, b in zip(ours(*args), default(*args)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_jit_keeps_its_other_arguments():
  step = compile_options.jit(lambda x, n: x * n, static_argnums=1, donate_argnums=0)
  np.testing.assert_array_equal(step(jnp.arange(3.0), 2), [0.0, 2.0, 4.0])
