"""XLA compile options for jaxad's compiled programs, set where the benchmark shows they pay.

On XLA:CPU (jaxlib 0.10) dots and convolutions run through YNNPACK by default. On the
2-core AVX-512 CPU we benchmark on, XLA's own Eigen kernels were faster for most of our
programs, measured in one process with both compilations interleaved (`jaxad.bench`
cases; images/s with Eigen ÷ with YNNPACK):

  conv128   train 1.13   ELBO scores 1.43   IWAE L=15 1.97   pixel maps 1.12
  conv64    train 0.75   ELBO scores 1.34   IWAE L=15 1.29   pixel maps 0.94
  mlp28     train 1.01   ELBO scores 1.70   IWAE L=15 0.99   pixel maps 0.80
  score64   train 1.63   SANO map 0.95
  DCGAN     train 1.06   latent search 1.28

so every training, validation and scoring program jaxad compiles uses `jit` below, which
turns YNNPACK off on the CPU. Other backends get XLA's defaults. `python -m jaxad.bench`
records the options in its output.
"""

import jax

# An empty list of YNNPACK fusion kinds: every dot and convolution goes to Eigen.
CPU = {"xla_cpu_experimental_ynn_fusion_type": ""}


def options() -> dict | None:
  """The compiler_options for the default backend (None: XLA's defaults)."""
  return dict(CPU) if jax.default_backend() == "cpu" else None


def jit(fn, **jit_kwargs):
  """jax.jit(fn, **jit_kwargs) compiled with options()."""
  return jax.jit(fn, compiler_options=options(), **jit_kwargs)
