"""The GAN family (the thesis's GAN-AD, AnoGAN): a DCGAN or WGAN-GP, scored by latent search.

Training alternates, as in DCGAN and WGAN-GP: `model.gan.critic_steps` discriminator
(critic) updates, then one generator update, all inside one jitted trainer step on the
same real batch (fresh z, and fresh interpolates for the penalty, at every update).
Each network has its own Adam state (the trainer's optimiser, initialised per network);
both share train.learning_rate, so plateaus scale both.

  model.name = "dcgan"    non-saturating DCGAN losses, BatchNorm in both networks
  model.name = "wgan_gp"  critic D(G(z)) − D(x) + model.gan.gp_weight·(‖∇D(x̂)‖ − 1)²,
                          a critic without BatchNorm (layer norm by default)

The logged `loss` is the discriminator's (critic's) loss, `g_loss` the generator's.
Validation: the discriminator's loss on real normal images (softplus(−D(x)), or −D(x)).

Scores (`jaxad.scores.latent_search`): for each test image, eval.latent_steps steps of
SGD with momentum on z from z₁ ~ N(0, I) minimise (1−λ)·Σ|x − G(z)| + λ·Σ|f(x) − f(G(z))|:

  sample  gan, gan_residual, gan_feature     pixel map  gan_residual = mean_c |x − G(z)|
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxad import families
from jaxad.errors import ConfigError
from jaxad.models import gan as gan_models
from jaxad.objectives import gan as gan_objectives
from jaxad.scores import latent_search

NETS = ("generator", "discriminator")
LOSSES = ("dcgan", "wgan_gp")  # model.name


def _variables(net: str, params, model_state: dict) -> dict:
  """One network's flax variables out of the family's joint {"params": {net: ...}, ...}."""
  return {"params": params[net],
          **{col: v[net] for col, v in model_state.items() if net in v}}


def _net(variables: dict, net: str) -> dict:
  """One network's flax variables out of the family's joint variables."""
  return _variables(net, variables["params"],
                    {k: v for k, v in variables.items() if k != "params"})


def _merge(model_state: dict, net: str, updates: dict) -> dict:
  """model_state with one network's collection updates (batch_stats) put back."""
  out = {col: dict(v) for col, v in model_state.items()}
  for col, v in updates.items():
    out.setdefault(col, {})[net] = v
  return out


@dataclasses.dataclass(frozen=True)
class GAN:
  """Generator and discriminator modules, the loss variant and the latent-search settings."""

  generator: nn.Module
  discriminator: nn.Module
  loss: str = "dcgan"
  critic_steps: int = 1
  gp_weight: float = 10.0
  latent_steps: int = 100
  latent_lr: float = 1e-3
  latent_momentum: float = 0.9
  latent_lambda: float = 0.5
  val_metric: str = "d_real"
  sample_scores: tuple[str, ...] = latent_search.SAMPLE_SCORES
  pixel_maps: tuple[str, ...] = latent_search.PIXEL_MAPS

  @property
  def latent_dim(self) -> int:
    return int(self.generator.latent_dim)

  def init(self, rng: jax.Array, shape: tuple[int, ...]) -> dict:
    g_rng, d_rng = jax.random.split(rng)
    nets = {"generator": self.generator.init(g_rng, jnp.zeros((1, self.latent_dim)),
                                             train=False),
            "discriminator": self.discriminator.init(d_rng, jnp.zeros((1, *shape)),
                                                     train=False)}
    state = {}
    for net, v in nets.items():
      state = _merge(state, net, {c: x for c, x in v.items() if c != "params"})
    return {"params": {net: v["params"] for net, v in nets.items()}, **state}

  def init_opt_state(self, tx: optax.GradientTransformation, params) -> dict:
    """One optimiser state per network: their updates alternate."""
    return {net: tx.init(params[net]) for net in NETS}

  # -- training ---------------------------------------------------------------------
  def _generate(self, params, model_state, z):
    """G(z) in train mode; (images, generator collection updates)."""
    mutable = [c for c, v in model_state.items() if "generator" in v]
    out = self.generator.apply(_variables("generator", params, model_state), z, train=True,
                               mutable=mutable or False)
    return out if mutable else (out, {})

  def _discriminate(self, params, model_state, x):
    """D(x) in train mode; (logits, updated model_state)."""
    mutable = [c for c, v in model_state.items() if "discriminator" in v]
    out = self.discriminator.apply(_variables("discriminator", params, model_state), x,
                                   train=True, mutable=mutable or False)
    (logits, _), updates = out if mutable else (out, {})
    return logits, _merge(model_state, "discriminator", updates)

  def _d_loss(self, d_params, params, model_state, real, fake, rng):
    params = {**params, "discriminator": d_params}
    real_logits, model_state = self._discriminate(params, model_state, real)
    fake_logits, model_state = self._discriminate(params, model_state, fake)
    metrics = {"d_real": real_logits.mean(), "d_fake": fake_logits.mean()}
    if self.loss == "dcgan":
      return gan_objectives.dcgan_discriminator_loss(real_logits, fake_logits).mean(), (
          metrics, model_state)
    critic = lambda x: self.discriminator.apply(
        _variables("discriminator", params, model_state), x, train=True)[0]
    loss = gan_objectives.wgan_critic_loss(real_logits, fake_logits).mean()
    penalty = gan_objectives.gradient_penalty(critic, real, fake, rng, self.gp_weight).mean()
    return loss + penalty, ({**metrics, "gradient_penalty": penalty}, model_state)

  def _g_loss(self, g_params, params, model_state, z):
    params = {**params, "generator": g_params}
    fake, g_updates = self._generate(params, model_state, z)
    logits, model_state = self._discriminate(params, _merge(model_state, "generator",
                                                            g_updates), fake)
    if self.loss == "dcgan":
      return gan_objectives.dcgan_generator_loss(logits).mean(), model_state
    return gan_objectives.wgan_generator_loss(logits).mean(), model_state

  def train_update(self, tx: optax.GradientTransformation, params, model_state: dict,
                   opt_state: dict, images: jax.Array, rng: jax.Array):
    """critic_steps discriminator updates, then one generator update.

    Returns (params, model_state, opt_state, metrics); the trainer's hook for families
    whose step is not one gradient of one loss.
    """
    batch = images.shape[0]
    d_keys = jax.random.split(jax.random.fold_in(rng, 0), self.critic_steps)

    def d_step(carry, key):
      params, model_state, d_opt = carry
      z_key, gp_key = jax.random.split(key)
      z = latent_search.initial_latents(z_key, batch, self.latent_dim)
      fake, g_updates = self._generate(params, model_state, z)
      fake = jax.lax.stop_gradient(fake)
      model_state = _merge(model_state, "generator", g_updates)
      (loss, (metrics, model_state)), grads = jax.value_and_grad(self._d_loss, has_aux=True)(
          params["discriminator"], params, model_state, images, fake, gp_key)
      updates, d_opt = tx.update(grads, d_opt, params["discriminator"])
      params = {**params, "discriminator": optax.apply_updates(params["discriminator"],
                                                               updates)}
      metrics = {"loss": loss, **metrics, "d_grad_norm": optax.tree.norm(grads)}
      return (params, model_state, d_opt), metrics

    # A Python loop, not lax.scan: inside an XLA:CPU while loop (even a fully unrolled
    # scan) this step ran 12× slower (714 against 63 ms for the MNIST DCGAN at batch 64),
    # and critic_steps is small (1 for DCGAN, 5 for WGAN-GP).
    carry = (params, model_state, opt_state["discriminator"])
    for i in range(self.critic_steps):
      carry, d_metrics = d_step(carry, d_keys[i])
    params, model_state, d_opt = carry
    z = latent_search.initial_latents(jax.random.fold_in(rng, 1), batch, self.latent_dim)
    (g_loss, model_state), grads = jax.value_and_grad(self._g_loss, has_aux=True)(
        params["generator"], params, model_state, z)
    updates, g_opt = tx.update(grads, opt_state["generator"], params["generator"])
    params = {**params, "generator": optax.apply_updates(params["generator"], updates)}
    metrics = dict(d_metrics)  # the last critic update's
    metrics.update(g_loss=g_loss, grad_norm=optax.tree.norm(grads))
    return params, model_state, {"generator": g_opt, "discriminator": d_opt}, metrics

  # -- evaluation -------------------------------------------------------------------
  def val_loss(self, variables, images: jax.Array, rng: jax.Array) -> jax.Array:
    """The discriminator's loss on real images, eval mode (B,)."""
    del rng
    logits, _ = self.discriminator.apply(_net(variables, "discriminator"), images,
                                         train=False)
    return jax.nn.softplus(-logits) if self.loss == "dcgan" else -logits

  def _search(self, variables, images: jax.Array, rng: jax.Array):
    generate, features = latent_search.eval_functions(
        self.generator, _net(variables, "generator"),
        self.discriminator, _net(variables, "discriminator"))
    z0 = latent_search.initial_latents(rng, images.shape[0], self.latent_dim)
    result = latent_search.latent_search(
        generate, features, images, z0, steps=self.latent_steps, lr=self.latent_lr,
        momentum=self.latent_momentum, lam=self.latent_lambda)
    return result, generate

  def score(self, variables, images: jax.Array, rng: jax.Array, with_maps: bool):
    result, _ = self._search(variables, images, rng)
    return result.scores, (result.maps if with_maps else {})

  def reconstruct(self, variables, images: jax.Array, rng: jax.Array) -> Any:
    """G(z) at the end of the latent search: the closest image the generator finds.

    `rng` is the key `score` got for the same batch, so the search starts from the
    same z₁ and ends at the image that was scored (|x − G(z)| is its residual map).
    """
    result, generate = self._search(variables, images, rng)
    return generate(result.z)


def build(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> GAN:
  m, e = config.model, config.eval
  if m.name not in LOSSES:
    raise ConfigError(f"model.name={m.name!r} is not a GAN; use one of {list(LOSSES)}")
  generator, discriminator = gan_models.gan_from_config(m, image_shape,
                                                        families.compute_dtype(config))
  return GAN(generator=generator, discriminator=discriminator, loss=m.name,
             critic_steps=int(m.gan.critic_steps) or (1 if m.name == "dcgan" else 5),
             gp_weight=float(m.gan.gp_weight), latent_steps=int(e.latent_steps),
             latent_lr=float(e.latent_lr), latent_momentum=float(e.latent_momentum),
             latent_lambda=float(e.latent_lambda))
