"""Tests for jaxad.objectives against independent float64 NumPy/SciPy references."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from conftest import numpy_variables
from jaxad.errors import ConfigError
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as lik
from jaxad.objectives import vae as vae_obj

RTOL = 1e-5


def normal(shape, seed, scale=1.0):
  return np.random.default_rng(seed).normal(scale=scale, size=shape)


def f32(a):
  return jnp.asarray(a, jnp.float32)


# ---------------------------------------------------------------- log densities


@pytest.mark.parametrize("variance", [0.005, 1.0, 2.5])
def test_gaussian_log_prob_matches_scipy(variance):
  x, mean = normal((3, 4, 5, 2), 0), normal((3, 4, 5, 2), 1)
  expected = [stats.norm.logpdf(x[b], mean[b], math.sqrt(variance)).sum() for b in range(3)]
  got = lik.gaussian_log_prob(f32(x), f32(mean), variance)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_gaussian_log_prob_per_value_variance_and_x64():
  x, mean = normal((2, 6), 0), normal((2, 6), 1)
  variance = np.exp(normal((2, 6), 2))
  expected = stats.norm.logpdf(x, mean, np.sqrt(variance)).sum(axis=1)
  with jax.enable_x64(True):
    got = lik.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(variance))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bernoulli_log_prob_matches_numpy():
  x01 = np.random.default_rng(0).uniform(size=(3, 4, 4, 1))
  logits = normal((3, 4, 4, 1), 1, scale=3.0)
  p = 1 / (1 + np.exp(-logits))
  expected = (x01 * np.log(p) + (1 - x01) * np.log(1 - p)).reshape(3, -1).sum(axis=1)
  np.testing.assert_allclose(lik.bernoulli_log_prob(f32(x01), f32(logits)), expected,
                             rtol=RTOL)


def test_bernoulli_log_prob_is_differentiable_in_x():
  logits = f32(normal((2, 5), 0))
  grad = jax.grad(lambda x: lik.bernoulli_log_prob(x, logits).sum())(f32(np.full((2, 5), .3)))
  np.testing.assert_allclose(grad, logits, rtol=RTOL)


def numpy_kl(mu, logvar):
  return -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=-1)


def test_gaussian_kl_closed_form():
  mu, logvar = normal((4, 7), 0), normal((4, 7), 1, scale=0.5)
  np.testing.assert_allclose(lik.gaussian_kl(f32(mu), f32(logvar)), numpy_kl(mu, logvar),
                             rtol=RTOL)
  np.testing.assert_allclose(lik.gaussian_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


def test_gaussian_kl_matches_monte_carlo():
  mu, logvar = normal((2, 3), 0, scale=0.7), normal((2, 3), 1, scale=0.4)
  std = np.exp(0.5 * logvar)
  z = mu + std * normal((200_000, 2, 3), 2)  # samples from q.
  log_q = stats.norm.logpdf(z, mu, std).sum(axis=-1)
  log_p = stats.norm.logpdf(z).sum(axis=-1)
  monte_carlo = (log_q - log_p).mean(axis=0)
  np.testing.assert_allclose(lik.gaussian_kl(f32(mu), f32(logvar)), monte_carlo, atol=0.02)


def test_log_normal_diag_and_standard_normal():
  z, mu, logvar = normal((3, 2, 5), 0), normal((3, 2, 5), 1), normal((3, 2, 5), 2, 0.5)
  expected = stats.norm.logpdf(z, mu, np.exp(0.5 * logvar)).sum(axis=-1)
  got = lik.log_normal_diag(f32(z), f32(mu), f32(logvar))
  assert got.shape == (3, 2)
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  np.testing.assert_allclose(lik.log_standard_normal(f32(z)),
                             stats.norm.logpdf(z).sum(axis=-1), rtol=RTOL)
  np.testing.assert_allclose(lik.log_normal_diag(f32(z), 0.0, 0.0),
                             lik.log_standard_normal(f32(z)), rtol=RTOL)


# ----------------------------------------------------------------- likelihoods


def model_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(likelihood="gaussian", beta=0.01))
  cfg.update(overrides)
  return cfg


def test_make_likelihood_and_variance():
  gaussian = lik.make_likelihood(model_cfg())
  assert gaussian == lik.Likelihood("gaussian", 0.01)
  assert gaussian.variance == pytest.approx(0.005)
  assert lik.make_likelihood(model_cfg(beta=2)).variance == 1.0  # Zimmerer et al.'s c = 1.
  assert lik.make_likelihood(model_cfg(likelihood="bernoulli", beta=1.0)).kind == "bernoulli"
  hash(gaussian)  # usable as a static jit argument.


def test_make_likelihood_of_the_new_decoders():
  discrete = lik.make_likelihood(
      model_cfg(likelihood="discretized_logistic", likelihood_mixtures=4, beta=1.0), 12)
  assert discrete == lik.Likelihood("discretized_logistic", 1.0, mixtures=4, bit_depth=12)
  assert discrete.params_per_value == 12 and not discrete.has_pixel_variance
  learned = lik.make_likelihood(model_cfg(likelihood="gaussian_learned"))
  assert (learned.mixtures, learned.bit_depth, learned.has_pixel_variance) == (1, 8, True)
  hash(discrete)
  for likelihood in (discrete, learned, lik.Likelihood("bernoulli")):
    with pytest.raises(ValueError, match="no fixed variance"):
      likelihood.variance
  with pytest.raises(ValueError, match="no per-value variance"):
    discrete.log_variance(jnp.zeros((1, 2, 12)))


@pytest.mark.parametrize("overrides, match", [
    (dict(likelihood="laplace"), "model.likelihood='laplace'.*gaussian.*bernoulli"),
    (dict(likelihood_mixtures=2), "likelihood_mixtures=2 needs"),
    (dict(likelihood="discretized_logistic", likelihood_mixtures=0),
     "model.likelihood_mixtures=0 must be an int"),
    (dict(beta=0.0), "model.beta must be a positive number"),
    (dict(beta=-1.0), "model.beta"),
    (dict(beta=float("nan")), "model.beta"),
])
def test_make_likelihood_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    lik.make_likelihood(model_cfg(**overrides))


def test_make_likelihood_missing_key():
  with pytest.raises(ConfigError, match="model.beta is missing"):
    lik.make_likelihood(ml_collections.ConfigDict(dict(likelihood="gaussian")))


def test_gaussian_likelihood_terms():
  beta = 0.01
  x, out = np.tanh(normal((2, 4, 4, 3), 0)), normal((2, 4, 4, 3), 1, scale=0.5)
  g = lik.Likelihood("gaussian", beta)
  expected_log_prob = stats.norm.logpdf(x, out, math.sqrt(beta / 2)).reshape(2, -1).sum(1)
  np.testing.assert_allclose(g.log_prob(f32(x), f32(out)), expected_log_prob, rtol=RTOL)
  np.testing.assert_allclose(g.train_rec(f32(x), f32(out)),
                             ((x - out)**2).reshape(2, -1).sum(1), rtol=RTOL)
  np.testing.assert_array_equal(g.mean(f32(out)), f32(out))


def test_bernoulli_likelihood_terms():
  x, logits = np.tanh(normal((2, 4, 4, 1), 0)), normal((2, 4, 4, 1), 1, scale=2.0)
  b = lik.Likelihood("bernoulli", 1.0)
  target, p = (x + 1) / 2, 1 / (1 + np.exp(-logits))
  bce = -(target * np.log(p) + (1 - target) * np.log(1 - p)).reshape(2, -1).sum(1)
  np.testing.assert_allclose(b.log_prob(f32(x), f32(logits)), -bce, rtol=RTOL)
  np.testing.assert_allclose(b.train_rec(f32(x), f32(logits)), bce, rtol=RTOL)
  np.testing.assert_allclose(b.mean(f32(logits)), 2 * p - 1, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("beta", [0.01, 1.0, 2.0])
def test_gaussian_training_loss_is_scaled_neg_elbo_plus_constant(beta):
  """beta·(−ELBO) = SSE + beta·KL + beta·½·D·log(π·beta), with the constant by hand."""
  x, out = np.tanh(normal((3, 4, 4, 2), 0)), normal((3, 4, 4, 2), 1, scale=0.5)
  mu, logvar = normal((3, 5), 2), normal((3, 5), 3, scale=0.3)
  g = lik.Likelihood("gaussian", beta)
  terms = vae_obj.VAETerms(rec=-g.log_prob(f32(x), f32(out)),
                           kl=lik.gaussian_kl(f32(mu), f32(logvar)),
                           train_rec=g.train_rec(f32(x), f32(out)))
  dims = 4 * 4 * 2
  variance = beta / 2
  constant = beta * 0.5 * dims * math.log(2 * math.pi * variance)
  sse = ((x - out)**2).reshape(3, -1).sum(1)
  np.testing.assert_allclose(beta * terms.neg_elbo, sse + beta * numpy_kl(mu, logvar) + constant,
                             rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(vae_obj.training_loss(terms, g),
                             np.mean(sse + beta * numpy_kl(mu, logvar)), rtol=RTOL)


def test_bernoulli_training_loss_with_beta_one_is_neg_elbo():
  x, logits = np.tanh(normal((2, 3, 3, 1), 0)), normal((2, 3, 3, 1), 1)
  mu, logvar = f32(normal((2, 4), 2)), f32(normal((2, 4), 3, scale=0.3))
  b = lik.Likelihood("bernoulli", 1.0)
  terms = vae_obj.VAETerms(rec=-b.log_prob(f32(x), f32(logits)), kl=lik.gaussian_kl(mu, logvar),
                           train_rec=b.train_rec(f32(x), f32(logits)))
  np.testing.assert_allclose(vae_obj.training_loss(terms, b), terms.neg_elbo.mean(), rtol=RTOL)


# --------------------------------------------------------------------- vae_terms


numpy_params = numpy_variables


IMAGE_SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def bn_setup():
  model = vae_models.ConvVAE(IMAGE_SHAPE, latent_dim=3, widths=(4,), norm="batch")
  x = f32(np.tanh(normal((4, *IMAGE_SHAPE), 0)))
  return model, numpy_params(model, IMAGE_SHAPE), x


def test_vae_terms_deterministic_and_rng_dependent(bn_setup):
  model, variables, x = bn_setup
  g = lik.Likelihood("gaussian", 0.01)
  terms_fn = jax.jit(lambda rng: vae_obj.vae_terms(model, variables, x, rng, g, train=False))
  a, updates = terms_fn(jax.random.key(1))
  b, _ = terms_fn(jax.random.key(1))
  c, _ = terms_fn(jax.random.key(2))
  assert updates == {}
  assert a.rec.shape == a.kl.shape == a.train_rec.shape == a.neg_elbo.shape == (4,)
  np.testing.assert_array_equal(a.rec, b.rec)
  assert not np.allclose(a.rec, c.rec)
  np.testing.assert_array_equal(a.kl, c.kl)  # the KL is closed form: no sample.


def test_vae_terms_rec_matches_decoded_sample_by_hand(bn_setup):
  model, variables, x = bn_setup
  g = lik.Likelihood("gaussian", 0.5)
  rng = jax.random.key(3)

  @jax.jit
  def by_hand(rng):
    mu, logvar = model.apply(variables, x, train=False, method=model.encode)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape)
    return mu, logvar, model.apply(variables, z, train=False, method=model.decode)

  terms, _ = jax.jit(functools.partial(
      vae_obj.vae_terms, model, variables, x, likelihood=g, train=False))(rng)
  mu, logvar, out = by_hand(rng)
  out = np.asarray(out, np.float64)
  expected = -stats.norm.logpdf(np.asarray(x, np.float64), out, math.sqrt(0.25))
  np.testing.assert_allclose(terms.rec, expected.reshape(4, -1).sum(1), rtol=1e-4)
  np.testing.assert_allclose(terms.rec, -lik.gaussian_log_prob(x, f32(out), 0.25), rtol=1e-5)
  np.testing.assert_allclose(terms.kl, numpy_kl(np.asarray(mu, np.float64),
                                                np.asarray(logvar, np.float64)), rtol=1e-4)
  np.testing.assert_allclose(terms.train_rec,
                             ((np.asarray(x) - out)**2).reshape(4, -1).sum(1), rtol=1e-4)


def test_vae_terms_train_mode_updates_batch_stats_and_gradients(bn_setup):
  model, variables, x = bn_setup
  g = lik.Likelihood("gaussian", 0.01)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}

  def loss(params, x):
    terms, updates = vae_obj.vae_terms(model, {"params": params, **state}, x,
                                       jax.random.key(0), g, train=True)
    return vae_obj.training_loss(terms, g), updates

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (param_grads, x_grad), updates = grad_fn(params, x)
  assert set(updates) == {"batch_stats"}
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(state["batch_stats"])
  changed = jax.tree.map(lambda new, old: bool(np.any(new != old)), updates["batch_stats"],
                         state["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert x_grad.shape == x.shape and np.all(np.isfinite(x_grad)) and np.any(x_grad != 0)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(param_grads))


def test_vae_terms_no_norm_model_train_mode_returns_nothing():
  model = vae_models.ConvVAE(IMAGE_SHAPE, latent_dim=2, widths=(2,), norm="none")
  variables = numpy_params(model, IMAGE_SHAPE)
  x = f32(np.tanh(normal((2, *IMAGE_SHAPE), 1)))
  terms, updates = jax.jit(functools.partial(
      vae_obj.vae_terms, model, variables, x, likelihood=lik.Likelihood("bernoulli", 1.0),
      train=True))(jax.random.key(0))
  assert updates == {}
  assert np.all(np.isfinite(terms.neg_elbo))
  np.testing.assert_allclose(terms.rec, terms.train_rec, rtol=1e-6)


def test_vae_terms_vmaps_over_samples(bn_setup):
  model, variables, x = bn_setup
  g = lik.Likelihood("gaussian", 0.01)
  terms_fn = lambda rng: vae_obj.vae_terms(model, variables, x, rng, g, train=False)[0]
  rngs = jax.random.split(jax.random.key(5), 3)
  per_sample = jax.jit(jax.vmap(terms_fn))(rngs)
  assert per_sample.rec.shape == (3, 4)
  one = jax.jit(terms_fn)(rngs[1])
  np.testing.assert_allclose(per_sample.rec[1], one.rec, rtol=1e-5)
