"""Tests for the GAN parts: models.gan, objectives.gan and scores.latent_search.

References are independent of the code under test: finite differences in float64 for
the gradient penalty, closed forms for the losses, sums recomputed from G for the
scores, and a search per image for the batched search. Weights are filled from NumPy
(He-scaled, so a random generator's images vary with z) instead of compiling the PRNG
initialisers.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxad import defaults
from jaxad.errors import ConfigError
from jaxad.models import gan as gan_models
from jaxad.objectives import gan as gan_losses
from jaxad.scores import latent_search as search_lib


def he_variables(model, input_shape, seed, dtype=jnp.float32):
  """init's variable structure: He-normal kernels, zero biases, identity norms."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "mean" in name or "bias" in name:
      return jnp.zeros(leaf.shape, dtype)
    if "var" in name or "scale" in name:
      return jnp.ones(leaf.shape, dtype)
    fan_in = math.prod(leaf.shape[:-1])
    return jnp.asarray(rng.normal(size=leaf.shape) * math.sqrt(2 / fan_in), dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


# --- models -------------------------------------------------------------------------


@pytest.mark.parametrize("image_shape, widths, base", [
    ((28, 28, 1), (32, 64), 7),
    ((32, 32, 3), (32, 64, 128), 4),
    ((64, 64, 1), (32, 64, 128, 256), 4),
    ((28, 28, 28, 1), (32, 64), 7),
    ((32, 32, 32, 1), (32, 64, 128), 4),
])
def test_generator_and_discriminator_shapes(image_shape, widths, base):
  assert gan_models.default_widths(image_shape[0]) == widths
  generator = gan_models.Generator(image_shape, 16, widths)
  discriminator = gan_models.Discriminator(image_shape, widths)
  z = jax.ShapeDtypeStruct((3, 16), jnp.float32)
  g_vars = jax.eval_shape(functools.partial(generator.init, train=False),
                          jax.random.key(0), z)
  images = jax.eval_shape(functools.partial(generator.apply, train=False), g_vars, z)
  assert images.shape == (3, *image_shape)
  d_vars = jax.eval_shape(functools.partial(discriminator.init, train=False),
                          jax.random.key(0), images)
  logits, features = jax.eval_shape(functools.partial(discriminator.apply, train=False),
                                    d_vars, images)
  ndim = len(image_shape) - 1
  assert logits.shape == (3,)
  assert features.shape == (3, base**ndim * widths[-1])
  # The generator's first layer projects z to the base map, the head covers it.
  assert g_vars["params"]["deconv_0"]["kernel"].shape == (base,) * ndim + (16, widths[-1])
  assert d_vars["params"]["head"]["kernel"].shape == (base,) * ndim + (widths[-1], 1)


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (28, 28, 28, 1)])
def test_forward_pass_ranges_2d_and_3d(image_shape):
  generator = gan_models.Generator(image_shape, 8, (4, 8))
  discriminator = gan_models.Discriminator(image_shape, (4, 8), norm="layer")
  g_vars = he_variables(generator, (8,), 0)
  d_vars = he_variables(discriminator, image_shape, 1)
  z = jax.random.normal(jax.random.key(0), (2, 8))
  images = generator.apply(g_vars, z)
  logits, features = discriminator.apply(d_vars, images)
  assert images.shape == (2, *image_shape)
  assert float(jnp.max(jnp.abs(images))) <= 1.0
  assert float(jnp.std(images)) > 0.01  # not a constant image
  assert np.all(np.isfinite(logits)) and features.shape == (2, 7**(len(image_shape) - 1) * 8)


def test_discriminator_norms_create_expected_layers():
  shape = (16, 16, 1)
  for norm, layer in (("batch", "bn_1"), ("layer", "ln_1"), ("none", None)):
    variables = jax.eval_shape(
        functools.partial(gan_models.Discriminator(shape, (4, 8), norm).init, train=False),
        jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    names = set(variables["params"])
    assert not any(n.startswith(("bn_0", "ln_0")) for n in names)  # never on block 0
    assert (layer in names) if layer else names == {"conv_0", "conv_1", "head"}
    assert ("batch_stats" in variables) == (norm == "batch")


def _model_config(**overrides):
  m = defaults.get_config().model
  m.update(dict(family="gan", name="dcgan", latent_dim=100, widths=()))
  m.update(overrides)
  return m


def test_gan_from_config_defaults_and_overrides():
  cfg = _model_config(base_width=16, name="wgan_gp")
  generator, discriminator = gan_models.gan_from_config(cfg, (28, 28, 28, 1))
  assert generator.widths == discriminator.widths == (16, 32)
  assert generator.latent_dim == 100 and discriminator.norm == "layer"  # the critic's
  assert generator.norm == "batch"
  _, discriminator = gan_models.gan_from_config(_model_config(), (28, 28, 1))
  assert discriminator.norm == "batch"  # DCGAN's


@pytest.mark.parametrize("make, message", [
    (lambda: gan_models.Generator((30, 30, 1), 8, (4, 8)), "28 or 32"),
    (lambda: gan_models.Discriminator((36, 36, 1), (4, 8)), "32 or 40"),
    (lambda: gan_models.Discriminator((7, 7, 1), ()), "got 7: set .* to 8$"),
    (lambda: gan_models.Discriminator((28, 32, 1), (4, 8)), "same number"),
    (lambda: gan_models.Generator((28, 28, 1), 8, (4, 8, 16)), "needs 2"),
    (lambda: gan_models.Generator((28, 28, 1), 0, (4, 8)), "latent_dim"),
    (lambda: gan_models.Generator((28, 28, 1), 8, (4, 8), norm="layer"), "generator_norm"),
    (lambda: gan_models.Discriminator((28, 28, 1), (4, 8), norm="group"),
     "discriminator_norm"),
    (lambda: gan_models.Discriminator((28, 28, 1), (4, -8)), "positive"),
    (lambda: gan_models.gan_from_config(_model_config(latent_dim=0), (28, 28, 1)),
     "latent_dim"),
])
def test_model_config_errors_name_the_fix(make, message):
  with pytest.raises(ConfigError, match=message):
    make()


def test_side_blocks():
  assert gan_models.side_blocks(28) == (7, 2)
  assert gan_models.side_blocks(32) == (4, 3)
  assert gan_models.side_blocks(48) == (6, 3)
  assert gan_models.side_blocks(10) == (5, 1)


# --- objectives ---------------------------------------------------------------------


def test_dcgan_losses_match_closed_forms():
  real = np.array([-3.0, -0.5, 0.0, 2.0, 40.0])
  fake = np.array([1.5, 0.0, -2.0, 7.0, -40.0])
  sigmoid = lambda t: 1 / (1 + np.exp(-t))
  expected_d = -np.log(sigmoid(real)) - np.log(1 - sigmoid(fake))
  expected_g = -np.log(sigmoid(fake))
  np.testing.assert_allclose(gan_losses.dcgan_discriminator_loss(real, fake), expected_d,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gan_losses.dcgan_generator_loss(fake), expected_g,
                             rtol=1e-5, atol=1e-7)
  # At D(x) = D(G(z)) = 0 the discriminator loss is log 4 (the GAN equilibrium).
  assert float(gan_losses.dcgan_discriminator_loss(jnp.zeros(1), jnp.zeros(1))[0]) == \
      pytest.approx(math.log(4))
  # Stable for confident logits, where log(sigmoid) in float32 would give inf.
  extreme = gan_losses.dcgan_discriminator_loss(jnp.array([-200.0]), jnp.array([200.0]))
  np.testing.assert_allclose(extreme, [400.0], rtol=1e-6)
  np.testing.assert_allclose(gan_losses.wgan_critic_loss(real, fake), fake - real)
  np.testing.assert_allclose(gan_losses.wgan_generator_loss(fake), -fake)
  with pytest.raises(ValueError, match="same shape"):
    gan_losses.dcgan_discriminator_loss(jnp.zeros(3), jnp.zeros(4))


def test_interpolates_are_per_image_convex_combinations():
  real = jax.random.normal(jax.random.key(0), (6, 5, 5, 2))
  fake = jax.random.normal(jax.random.key(1), (6, 5, 5, 2))
  x_hat = gan_losses.interpolates(real, fake, jax.random.key(2))
  eps = np.asarray((x_hat - fake) / (real - fake)).reshape(6, -1)
  np.testing.assert_allclose(eps, eps[:, :1] * np.ones_like(eps), rtol=1e-3, atol=1e-4)
  assert np.all((eps >= 0) & (eps <= 1)) and np.ptp(eps[:, 0]) > 0.1


def test_gradient_penalty_of_a_linear_critic():
  w = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)) * 0.3  # a 3D linear critic
  critic = lambda x: jnp.sum(x * w, axis=(1, 2, 3, 4))
  real, fake = jnp.ones((3, 4, 4, 4, 1)), -jnp.ones((3, 4, 4, 4, 1))
  penalty = gan_losses.gradient_penalty(critic, real, fake, jax.random.key(1), weight=10.0)
  expected = 10.0 * (float(jnp.linalg.norm(w)) - 1) ** 2
  np.testing.assert_allclose(penalty, np.full(3, expected), rtol=1e-5)


def finite_difference_grad_norms(critic, x, h=1e-6):
  """‖∇D‖ per image by central differences, all perturbations in one batch (float64)."""
  batch, size = x.shape[0], math.prod(x.shape[1:])
  basis = np.eye(size).reshape(size, *x.shape[1:])
  norms = []
  for i in range(batch):
    plus, minus = critic(x[i] + h * basis), critic(x[i] - h * basis)
    norms.append(np.linalg.norm((np.asarray(plus) - np.asarray(minus)) / (2 * h)))
  return np.array(norms)


def test_gradient_penalty_matches_finite_differences():
  shape = (16, 16, 1)
  discriminator = gan_models.Discriminator(shape, (3, 4), norm="layer")
  with jax.enable_x64(True):
    variables = he_variables(discriminator, shape, 3, dtype=jnp.float64)
    critic = lambda x: discriminator.apply(variables, x)[0]
    real = jax.random.uniform(jax.random.key(0), (3, *shape), jnp.float64, -1, 1)
    fake = jax.random.uniform(jax.random.key(1), (3, *shape), jnp.float64, -1, 1)
    key = jax.random.key(2)
    x_hat = gan_losses.interpolates(real, fake, key)
    reference = finite_difference_grad_norms(critic, x_hat)
    assert np.ptp(reference) > 1e-3  # images differ, so per-image norms must too
    np.testing.assert_allclose(gan_losses.input_grad_norms(critic, x_hat), reference,
                               rtol=1e-6)
    penalty = gan_losses.gradient_penalty(critic, real, fake, key, weight=10.0)
    np.testing.assert_allclose(penalty, 10.0 * (reference - 1) ** 2, rtol=1e-6)


# --- latent search ------------------------------------------------------------------

SEARCH_SHAPE, SEARCH_LATENT, SEARCH_WIDTHS = (16, 16, 1), 4, (8, 16)


@pytest.fixture(scope="module")
def small_gan():
  generator = gan_models.Generator(SEARCH_SHAPE, SEARCH_LATENT, SEARCH_WIDTHS)
  discriminator = gan_models.Discriminator(SEARCH_SHAPE, SEARCH_WIDTHS)
  g_vars = he_variables(generator, (SEARCH_LATENT,), 0)
  d_vars = he_variables(discriminator, SEARCH_SHAPE, 1)
  return search_lib.eval_functions(generator, g_vars, discriminator, d_vars)


_SEARCHES = {}


def run_search(fns, x, z0, **kwargs):
  """The jitted search, compiled once per (G, f, settings) and shape: its steps are
  unrolled, so each compilation costs seconds."""
  generate, features = fns
  key = (generate, features, tuple(sorted(kwargs.items())))
  if key not in _SEARCHES:
    _SEARCHES[key] = jax.jit(functools.partial(search_lib.latent_search, generate,
                                               features, **kwargs))
  return _SEARCHES[key](x, z0)


def test_latent_search_recovers_generated_images_but_not_noise(small_gan):
  generate, features = small_gan
  z_star = jax.random.normal(jax.random.key(1), (4, SEARCH_LATENT))
  x = generate(z_star)
  noise = jax.random.uniform(jax.random.key(3), x.shape, minval=-1, maxval=1)
  z0 = search_lib.initial_latents(jax.random.key(2), 4, SEARCH_LATENT)
  on = run_search(small_gan, x, z0, steps=200, lr=3e-3, momentum=0.9)
  off = run_search(small_gan, noise, z0, steps=200, lr=3e-3, momentum=0.9)

  start = np.asarray(jnp.sum(jnp.abs(x - generate(z0)), axis=(1, 2, 3)))
  residual = np.asarray(on.scores["gan_residual"])
  assert np.all(start > 5), start
  assert np.all(residual < 0.1 * start), (residual, start)
  assert np.min(off.scores["gan_residual"]) > 20 * np.max(residual)
  assert np.min(off.scores["gan"]) > 20 * np.max(on.scores["gan"])

  # The scores and the map are what their definitions say, recomputed from G and f.
  image = generate(on.z)
  res_ref = jnp.sum(jnp.abs(x - image), axis=(1, 2, 3))
  feat_ref = jnp.sum(jnp.abs(features(x) - features(image)), axis=-1)
  np.testing.assert_allclose(on.scores["gan_residual"], res_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(on.scores["gan_feature"], feat_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(on.scores["gan"], 0.5 * res_ref + 0.5 * feat_ref,
                             rtol=1e-5, atol=1e-6)
  assert on.maps["gan_residual"].shape == (4, 16, 16)
  np.testing.assert_allclose(on.maps["gan_residual"], jnp.abs(x - image)[..., 0], atol=1e-6)
  # The trace starts at L(z0) and its first step goes down.
  l0 = 0.5 * start + 0.5 * np.asarray(
      jnp.sum(jnp.abs(features(x) - features(generate(z0))), axis=-1))
  assert on.losses.shape == (200, 4)
  np.testing.assert_allclose(on.losses[0], l0, rtol=1e-5)
  assert np.all(on.losses[1] < on.losses[0])


def test_batched_search_equals_search_per_image(small_gan):
  generate, _ = small_gan
  x = generate(jax.random.normal(jax.random.key(4), (4, SEARCH_LATENT)))
  x = x.at[2].set(jax.random.uniform(jax.random.key(5), x.shape[1:], minval=-1, maxval=1))
  z0 = search_lib.initial_latents(jax.random.key(6), 4, SEARCH_LATENT)
  kwargs = dict(steps=40, lr=3e-3, momentum=0.9, lam=0.3)
  batched = run_search(small_gan, x, z0, **kwargs)
  for i in range(4):
    alone = run_search(small_gan, x[i:i + 1], z0[i:i + 1], **kwargs)
    np.testing.assert_allclose(batched.z[i], alone.z[0], rtol=1e-4, atol=1e-5)
    for name in search_lib.SAMPLE_SCORES:
      np.testing.assert_allclose(batched.scores[name][i], alone.scores[name][0],
                                 rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched.maps["gan_residual"][i],
                               alone.maps["gan_residual"][0], atol=1e-5)


def test_latent_search_on_volumes():
  shape = (8, 8, 8, 2)
  generator = gan_models.Generator(shape, 3, (4,))
  discriminator = gan_models.Discriminator(shape, (4,))
  fns = search_lib.eval_functions(generator, he_variables(generator, (3,), 0),
                                  discriminator, he_variables(discriminator, shape, 1))
  x = jax.random.uniform(jax.random.key(0), (2, *shape), minval=-1, maxval=1)
  result = run_search(fns, x, search_lib.initial_latents(jax.random.key(1), 2, 3),
                      steps=3, lr=1e-3, lam=1.0)
  assert result.maps["gan_residual"].shape == (2, 8, 8, 8)
  assert result.z.shape == (2, 3) and result.losses.shape == (3, 2)
  np.testing.assert_allclose(result.scores["gan"], result.scores["gan_feature"], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0, lr=1e-3), "steps"),
    (dict(steps=2.5, lr=1e-3), "steps"),
    (dict(steps=5, lr=0.0), "lr"),
    (dict(steps=5, lr=1e-3, momentum=1.0), "momentum"),
    (dict(steps=5, lr=1e-3, lam=1.5), r"λ\) must be in \[0, 1\]"),
    (dict(steps=5, lr=1e-3, lam=-0.1), "λ"),
])
def test_latent_search_argument_errors(small_gan, kwargs, message):
  x, z0 = jnp.zeros((1, *SEARCH_SHAPE)), jnp.zeros((1, SEARCH_LATENT))
  with pytest.raises(ConfigError, match=message):
    search_lib.latent_search(*small_gan, x, z0, **kwargs)


def test_latent_search_rejects_mismatched_start(small_gan):
  with pytest.raises(ValueError, match="z0"):
    search_lib.latent_search(*small_gan, jnp.zeros((2, *SEARCH_SHAPE)),
                             jnp.zeros((3, SEARCH_LATENT)), steps=1, lr=1e-3)


# --- a tiny DCGAN learns a toy distribution -----------------------------------------


def test_tiny_dcgan_moves_samples_to_the_data():
  """8×8 images with pixels ~ N(0.5, 0.1²); alternating D and G Adam steps."""
  shape, latent, batch = (8, 8, 1), 4, 64
  generator = gan_models.Generator(shape, latent, (16,))
  discriminator = gan_models.Discriminator(shape, (16,))
  g_vars = he_variables(generator, (latent,), 0)
  d_params = he_variables(discriminator, shape, 1)["params"]
  opt = optax.adam(2e-3, b1=0.5)
  g_opt, d_opt = opt.init(g_vars["params"]), opt.init(d_params)

  @jax.jit
  def step(g_vars, d_params, g_opt, d_opt, key):
    k_x, k_z1, k_z2 = jax.random.split(key, 3)
    real = jnp.clip(0.5 + 0.1 * jax.random.normal(k_x, (batch, *shape)), -1, 1)
    fake, stats = generator.apply(g_vars, jax.random.normal(k_z1, (batch, latent)),
                                  train=True, mutable=["batch_stats"])
    g_vars = {**g_vars, **stats}

    def d_loss(p):
      real_logits = discriminator.apply({"params": p}, real, train=True)[0]
      fake_logits = discriminator.apply({"params": p}, fake, train=True)[0]
      return jnp.mean(gan_losses.dcgan_discriminator_loss(real_logits, fake_logits))

    d_value, grads = jax.value_and_grad(d_loss)(d_params)
    updates, d_opt = opt.update(grads, d_opt)
    d_params = optax.apply_updates(d_params, updates)

    def g_loss(p):
      images, stats = generator.apply({**g_vars, "params": p},
                                      jax.random.normal(k_z2, (batch, latent)),
                                      train=True, mutable=["batch_stats"])
      logits = discriminator.apply({"params": d_params}, images, train=True)[0]
      return jnp.mean(gan_losses.dcgan_generator_loss(logits)), stats

    (_, stats), grads = jax.value_and_grad(g_loss, has_aux=True)(g_vars["params"])
    updates, g_opt = opt.update(grads, g_opt)
    g_vars = {**g_vars, **stats, "params": optax.apply_updates(g_vars["params"], updates)}
    return g_vars, d_params, g_opt, d_opt, d_value

  def sample_mean(g_vars):
    z = jax.random.normal(jax.random.key(99), (256, latent))
    return float(jnp.mean(generator.apply(g_vars, z, train=False)))

  start = sample_mean(g_vars)
  d_values = []
  for i in range(300):
    g_vars, d_params, g_opt, d_opt, d_value = step(g_vars, d_params, g_opt, d_opt,
                                                   jax.random.fold_in(jax.random.key(7), i))
    d_values.append(float(d_value))
  assert abs(start - 0.5) > 0.3
  assert abs(sample_mean(g_vars) - 0.5) < 0.1
  # Near the equilibrium the discriminator loss approaches log 4 ≈ 1.386.
  assert np.mean(d_values[-50:]) > 1.2, d_values[-50:]


def test_search_sharded_over_devices_matches_one_device(small_gan):
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  generate, _ = small_gan
  n = len(devices)
  x = generate(jax.random.normal(jax.random.key(8), (n, SEARCH_LATENT)))
  z0 = search_lib.initial_latents(jax.random.key(9), n, SEARCH_LATENT)
  kwargs = dict(steps=20, lr=3e-3, momentum=0.9)
  sharded = run_search(small_gan, jax.device_put(x, batch), jax.device_put(z0, batch),
                       **kwargs)
  single = run_search(small_gan, x, z0, **kwargs)
  assert sharded.z.sharding.is_equivalent_to(batch, 2)
  np.testing.assert_allclose(sharded.z, single.z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sharded.scores["gan"], single.scores["gan"], rtol=1e-4)
