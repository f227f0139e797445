"""Where the conv models' time goes on this backend: `python -m jaxad.bench.convs`.

Times single convolutions of the shapes the benchmarked models use (batch 32, NHWC,
float32), forward and forward + both gradients, and prints GFLOP/s beside the matmul
peak of `jaxad.bench`. It is the profile behind the speed notes: on XLA:CPU a 3×3 conv
with 128 channels runs near the matmul peak while the same conv with 64 channels at
64×64 (score64's first level) or 3 → 64 runs far below it, and those layers dominate
the step times. FLOPs are 2·MAC of every tap (fwd) and three times that (fwd + grads).
"""

import statistics
import sys

import jax
import jax.numpy as jnp
from jax import lax

from jaxad.bench import timing

BATCH = 32
# (model, side, c_in, c_out, kernel, stride, layers of this shape per step)
SHAPES = (
    ("score64", 64, 3, 64, 3, 1, 1),
    ("score64", 64, 64, 64, 3, 1, 10),
    ("score64", 64, 64, 64, 3, 2, 1),
    ("score64", 32, 64, 128, 3, 1, 1),
    ("score64", 32, 128, 128, 3, 1, 9),
    ("score64", 16, 128, 128, 3, 1, 12),
    ("score64", 8, 128, 128, 3, 1, 14),
    ("conv64", 64, 1, 16, 4, 2, 1),
    ("conv64", 32, 16, 32, 4, 2, 1),
    ("conv64", 16, 32, 64, 4, 2, 1),
    ("conv128", 128, 3, 32, 4, 2, 1),
    ("conv128", 64, 32, 64, 4, 2, 1),
    ("conv128", 32, 64, 128, 4, 2, 1),
    ("conv128", 16, 128, 256, 4, 2, 1),
    ("conv128", 8, 256, 512, 4, 2, 1),
)


def conv_rates(side, c_in, c_out, kernel, stride, repeats=5):
  """(ms fwd, GFLOP/s fwd, ms fwd+grads, GFLOP/s fwd+grads) of one conv shape."""
  x = jax.random.normal(jax.random.key(0), (BATCH, side, side, c_in))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, c_in, c_out))
  pad = "SAME" if stride == 1 else ((1, 1), (1, 1))

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), pad,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  out = side // stride
  flops = 2.0 * BATCH * out * out * c_in * c_out * kernel * kernel
  fwd = jax.jit(conv)
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(conv(x, w))), argnums=(0, 1)))
  times = []
  for fn in (fwd, both):
    call = lambda fn=fn: jax.block_until_ready(fn(x, w))
    call()
    times.append(statistics.median(timing.run_timed(call, 1) for _ in range(repeats)))
  return (1e3 * times[0], flops / times[0] / 1e9, 1e3 * times[1], 3 * flops / times[1] / 1e9)


def main() -> None:
  peak = timing.measure_peak((2048,), repeats=3, min_s=0.2)["xla_sgemm_2048"]["median"]
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; matmul peak "
        f"{peak:.1f} GFLOP/s; batch {BATCH}, NHWC float32")
  print("| model | conv | per step | fwd ms | fwd GFLOP/s | fwd+grads ms | fwd+grads GFLOP/s "
        "| of peak |")
  print("|---|---|---|---|---|---|---|---|")
  for model, side, c_in, c_out, kernel, stride, count in SHAPES:
    f_ms, f_rate, b_ms, b_rate = conv_rates(side, c_in, c_out, kernel, stride)
    print(f"| {model} | {side}² {c_in}→{c_out} k{kernel} s{stride} | ×{count} | {f_ms:.1f} | "
          f"{f_rate:.1f} | {b_ms:.1f} | {b_rate:.1f} | {b_rate / peak:.2f} |", flush=True)


if __name__ == "__main__":
  if len(sys.argv) > 1:
    sys.exit("usage: python -m jaxad.bench.convs (no arguments)")
  main()
