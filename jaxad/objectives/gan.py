"""GAN objectives as per-image terms (B,), reduced late by the caller.

Logits/critic values come from the discriminator on real images x and generated
images G(z), one of each per row (equal batch sizes):

  DCGAN (non-saturating, Goodfellow et al.; Radford et al.)
    discriminator  softplus(−D(x)) + softplus(D(G(z)))   = −log σ(D(x)) − log(1 − σ(D(G(z))))
    generator      softplus(−D(G(z)))                    = −log σ(D(G(z)))
  WGAN (Arjovsky et al.) with gradient penalty (Gulrajani et al.)
    critic         D(G(z)) − D(x)
    generator      −D(G(z))
    penalty        λ·(‖∇_x̂ D(x̂)‖₂ − 1)², x̂ = εx + (1−ε)G(z), ε ~ U[0, 1] per image

The penalty differentiates the critic one example at a time (vmap of grad), so it is
each image's own gradient; the critic should still treat examples independently (no
BatchNorm in training mode: use layer norm or none), as WGAN-GP prescribes.
"""

from collections.abc import Callable
import numbers

import jax
import jax.numpy as jnp


def _check_pair(real: jax.Array, fake: jax.Array) -> None:
  if real.shape != fake.shape:
    raise ValueError(f"real and fake batches must have the same shape (one of each per "
                     f"row); got {real.shape} and {fake.shape}")


def dcgan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """softplus(−D(x)) + softplus(D(G(z))) per row: the discriminator's cross-entropy."""
  _check_pair(real_logits, fake_logits)
  return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)


def dcgan_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """softplus(−D(G(z))) = −log σ(D(G(z))): the non-saturating generator loss."""
  return jax.nn.softplus(-fake_logits)


def wgan_critic_loss(real_values: jax.Array, fake_values: jax.Array) -> jax.Array:
  """D(G(z)) − D(x) per row (without the gradient penalty)."""
  _check_pair(real_values, fake_values)
  return fake_values - real_values


def wgan_generator_loss(fake_values: jax.Array) -> jax.Array:
  """−D(G(z)) per row."""
  return -fake_values


def interpolates(real: jax.Array, fake: jax.Array, rng: jax.Array) -> jax.Array:
  """x̂ = εx + (1−ε)G(z), one ε ~ U[0, 1] per image (B, *image)."""
  _check_pair(real, fake)
  eps = jax.random.uniform(rng, (real.shape[0],) + (1,) * (real.ndim - 1), real.dtype)
  return eps * real + (1 - eps) * fake


def input_grad_norms(critic: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """‖∇_x D(x)‖₂ per image (B,); critic maps a batch (N, *image) to values (N,).

  Each image is differentiated alone (a batch of one, vmapped), so the norm is its own
  gradient whatever the critic does across a batch. Works for any image rank.
  """

  def single(xi):
    return critic(xi[None])[0]

  grads = jax.vmap(jax.grad(single))(x)
  return jnp.sqrt(jnp.sum(jnp.square(grads.reshape(x.shape[0], -1)), axis=-1))


def gradient_penalty(critic: Callable[[jax.Array], jax.Array], real: jax.Array,
                     fake: jax.Array, rng: jax.Array, weight: float = 10.0) -> jax.Array:
  """weight·(‖∇_x̂ D(x̂)‖₂ − 1)² per image (B,) at x̂ = interpolates(real, fake, rng).

  Differentiable w.r.t. the critic's parameters (close over them in `critic`). Pure
  and jit-able; the same rng gives the same ε.
  """
  if isinstance(weight, numbers.Real) and not weight >= 0:
    raise ValueError(f"the gradient penalty weight must be ≥ 0 (10 in WGAN-GP); got {weight}")
  norms = input_grad_norms(critic, interpolates(real, fake, rng))
  return weight * jnp.square(norms - 1)
