"""Tests for jaxad.scores against float64 NumPy/SciPy references and a closed-form p(x)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import ndimage, special, stats

from conftest import fill_variables, numpy_variables
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as lik
from jaxad.scores import (PIXEL_MAPS, SAMPLE_SCORES, gaussian_smooth, pixel_maps,
                          sample_scores)
from jaxad.scores import pixel as pixel_lib
from jaxad.scores import sample as sample_lib
import test_decoders

GAUSSIAN = lik.Likelihood("gaussian", 0.1)
BERNOULLI = lik.Likelihood("bernoulli", 1.0)
LEARNED = lik.Likelihood("gaussian_learned", 1.0)
DISCRETE = lik.Likelihood("discretized_logistic", 1.0, mixtures=2)
ALL = [GAUSSIAN, BERNOULLI, LEARNED, DISCRETE]


def normal(shape, seed, scale=1.0):
  return np.random.default_rng(seed).normal(scale=scale, size=shape)


def images(shape, seed):
  return jnp.asarray(np.tanh(normal(shape, seed)), jnp.float32)


def f64(a):
  return np.asarray(a, np.float64)


def init(model, x, seed=0):
  """init's variable structure filled from NumPy: no PRNG initialisers to compile."""
  return numpy_variables(model, x.shape[1:], seed)


@functools.cache
def jitted_scores(model, likelihood, num_samples):
  return jax.jit(functools.partial(sample_scores, model, likelihood=likelihood,
                                   num_samples=num_samples))


@functools.cache
def _apply(model, method):
  return jax.jit(lambda variables, x: model.apply(variables, x, False, method=method))


def encode(model, variables, x):
  return _apply(model, "encode")(variables, x)


def decode(model, variables, z):
  return _apply(model, "decode")(variables, z)


MLP_SHAPE = (4, 4, 2)


@functools.cache
def jitted_maps(model, likelihood, smooth_sigma=0.0):
  return jax.jit(functools.partial(pixel_maps, model, likelihood=likelihood,
                                   smooth_sigma=smooth_sigma))


@functools.cache
def mlp_setup(params_per_value=1):
  """The tiny MLP VAE with P outputs per value; its images on the 8-bit grid when P > 1
  (the discrete likelihood scores stored images)."""
  model = vae_models.MLPVAE(MLP_SHAPE, latent_dim=3, hidden=(8,), activation="silu",
                            params_per_value=params_per_value)
  x = images((5, *MLP_SHAPE), 0)
  if params_per_value > 1:
    x = jnp.asarray(test_decoders.on_grid(x), jnp.float32)
  return model, init(model, x), x


@pytest.fixture
def mlp():
  return mlp_setup()


# ------------------------------------------------------------- NumPy reference


def numpy_log_px_z(x, out, likelihood):
  """log p(x|z) per image in float64, written from the densities' definitions."""
  x, out = f64(x), f64(out)
  if likelihood.params_per_value > 1:  # the new decoders' references (test_decoders)
    return test_decoders.numpy_log_px_z(x, out, likelihood)
  if likelihood.kind == "gaussian":
    values = stats.norm.logpdf(x, out, math.sqrt(likelihood.beta / 2))
  else:
    target = (x + 1) / 2
    values = target * out - np.logaddexp(0.0, out)
  return values.reshape(*values.shape[:2], -1).sum(-1)  # (L, B, ...) → (L, B)


def numpy_reference(model, variables, x, rng, likelihood, num_samples):
  """Every score and the sampled −ELBO, float64, from mu, logvar, eps and decoder outputs.

  Written from the definitions; shares with jaxad only the model and the draw of eps.
  """
  mu, logvar = encode(model, variables, x)
  eps = jax.random.normal(rng, (num_samples, *mu.shape), mu.dtype)
  z = mu + jnp.exp(0.5 * logvar) * eps
  out = decode(model, variables, z.reshape(-1, z.shape[-1]))
  out = out.reshape(*z.shape[:2], *out.shape[1:])
  mu, logvar, eps, z = f64(mu), f64(logvar), f64(eps), f64(z)
  log_px_z = numpy_log_px_z(x, out, likelihood)  # (L, B)
  log_pz = stats.norm.logpdf(z).sum(-1)
  log_qz = stats.norm.logpdf(z, mu, np.exp(0.5 * logvar)).sum(-1)
  kl = -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=-1)
  log_w = log_px_z + log_pz - log_qz
  lme = lambda a: special.logsumexp(a, axis=0) - math.log(num_samples)
  ref = {
      "vae": kl - log_px_z.mean(0), "vae_kl": kl, "vae_rec": -log_px_z.mean(0),
      "iwae": -lme(log_w), "iwae_kl": -lme(log_pz - log_qz), "iwae_rec": -lme(log_px_z),
      "sampled_neg_elbo": -log_w.mean(0),
  }
  if likelihood.has_pixel_variance:  # AE-U: (x − x̂_i)²/σ²_i, mean over values and i
    out = f64(out)
    logvar_x = test_decoders.numpy_learned_logvar(out[..., 1], likelihood.bit_depth)
    normalized = (f64(x) - out[..., 0]) ** 2 * np.exp(-logvar_x)
    ref["vae_rec_normalized"] = normalized.reshape(*normalized.shape[:2], -1).mean((0, 2))
  return ref


# --------------------------------------------------------------- sample scores


@pytest.mark.parametrize("likelihood", [GAUSSIAN, BERNOULLI])
def test_iwae_with_one_sample_is_the_sampled_neg_elbo(mlp, likelihood):
  model, variables, x = mlp
  rng = jax.random.key(7)
  scores = jitted_scores(model, likelihood, 1)(variables, x, rng)
  assert set(scores) == set(SAMPLE_SCORES)
  assert all(s.shape == (5,) for s in scores.values())
  mu, logvar = encode(model, variables, x)
  eps = jax.random.normal(rng, (1, *mu.shape))[0]
  z = mu + jnp.exp(0.5 * logvar) * eps
  log_px_z = likelihood.log_prob(x, decode(model, variables, z))
  log_ratio = lik.log_standard_normal(z) - lik.log_normal_diag(z, mu, logvar)
  np.testing.assert_allclose(scores["iwae"], -(log_px_z + log_ratio), rtol=1e-5)
  np.testing.assert_allclose(scores["iwae_rec"], -log_px_z, rtol=1e-5)
  np.testing.assert_allclose(scores["iwae_kl"], -log_ratio, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scores["vae"], -log_px_z + lik.gaussian_kl(mu, logvar), rtol=1e-5)
  np.testing.assert_allclose(scores["vae"], scores["vae_rec"] + scores["vae_kl"], rtol=1e-6)
  # The analytic KL is not the sampled one: vae and iwae differ even at L = 1.
  assert not np.allclose(scores["vae"], scores["iwae"], rtol=1e-4)


@functools.cache
def scores_and_reference(likelihood, num_samples=20):
  """sample_scores of the tiny MLP VAE and the NumPy reference, with the same eps."""
  model, variables, x = mlp_setup(likelihood.params_per_value)
  rng = jax.random.key(3)
  return (jitted_scores(model, likelihood, num_samples)(variables, x, rng),
          numpy_reference(model, variables, x, rng, likelihood, num_samples))


@pytest.mark.parametrize("likelihood", ALL)
def test_iwae_below_sampled_neg_elbo_and_matches_numpy(likelihood):
  scores, ref = scores_and_reference(likelihood)
  assert np.all(ref["iwae"] <= ref["sampled_neg_elbo"])  # Jensen, per image.
  assert np.all(f64(scores["iwae"]) <= ref["sampled_neg_elbo"] + 1e-4)
  assert np.any(ref["iwae"] < ref["sampled_neg_elbo"] - 1e-3)  # and not trivially.
  for name in ("iwae", "iwae_kl", "iwae_rec"):
    np.testing.assert_allclose(scores[name], ref[name], rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("likelihood", ALL)
def test_vae_kl_and_rec_match_numpy(likelihood):
  scores, ref = scores_and_reference(likelihood)
  assert sorted(scores) == sorted(sample_lib.score_names(likelihood))  # (jit sorts keys)
  for name in ("vae", "vae_kl", "vae_rec"):
    np.testing.assert_allclose(scores[name], ref[name], rtol=1e-5, atol=1e-4, err_msg=name)


def test_vae_rec_normalized_matches_numpy():
  """AE-U (Mao et al. 2020): the mean over values of (x − x̂)²·exp(−log σ²), averaged
  over the L posterior samples, only for a decoder with a variance per value."""
  scores, ref = scores_and_reference(LEARNED)
  assert sample_lib.score_names(LEARNED) == SAMPLE_SCORES + ("vae_rec_normalized",)
  np.testing.assert_allclose(scores["vae_rec_normalized"], ref["vae_rec_normalized"],
                             rtol=1e-5)
  assert np.all(f64(scores["vae_rec_normalized"]) > 0)
  for other in (GAUSSIAN, BERNOULLI, DISCRETE):
    assert sample_lib.score_names(other) == SAMPLE_SCORES


def test_sample_scores_rng_and_num_samples(mlp):
  model, variables, x = mlp
  score_fn = jitted_scores(model, GAUSSIAN, 20)
  a = score_fn(variables, x, jax.random.key(0))
  b = score_fn(variables, x, jax.random.key(0))
  c = score_fn(variables, x, jax.random.key(1))
  for name in SAMPLE_SCORES:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.allclose(a["vae_rec"], c["vae_rec"])
  np.testing.assert_array_equal(a["vae_kl"], c["vae_kl"])
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="num_samples"):
      sample_scores(model, variables, x, jax.random.key(0), GAUSSIAN, bad)


# ------------------------------------------------ linear-Gaussian VAE: exact p(x)


class LinearGaussianVAE(nn.Module):
  """x = W z + b + N(0, σ²I), z ~ N(0, I); q(z|x) = N(A x + a, diag exp(c))."""

  image_shape: tuple[int, ...]
  latent_dim: int

  def setup(self):
    dims, d = math.prod(self.image_shape), self.latent_dim
    zeros = nn.initializers.zeros
    self.W, self.b = self.param("W", zeros, (dims, d)), self.param("b", zeros, (dims,))
    self.A, self.a = self.param("A", zeros, (d, dims)), self.param("a", zeros, (d,))
    self.c = self.param("c", zeros, (d,))

  def encode(self, x, train=False):
    mu = x.reshape(x.shape[0], -1) @ self.A.T + self.a
    return mu, jnp.broadcast_to(self.c, mu.shape)

  def decode(self, z, train=False):
    return (z @ self.W.T + self.b).reshape(z.shape[0], *self.image_shape)


@pytest.fixture(scope="module")
def linear_gaussian():
  """The model, exact and imperfect encoder parameters, images, and exact log p(x)."""
  shape, d, variance = (2, 2, 1), 2, 0.25
  dims = math.prod(shape)
  q, _ = np.linalg.qr(normal((dims, d), 0))
  w = q * np.array([1.5, 0.8])  # orthogonal columns: the exact posterior is diagonal.
  b = normal(dims, 1, scale=0.3)
  precision = 1 + np.sum(w**2, axis=0) / variance
  a_matrix = (w / (variance * precision)).T
  exact = dict(W=w, b=b, A=a_matrix, a=-a_matrix @ b, c=-np.log(precision))
  imperfect = dict(exact, A=0.8 * a_matrix, a=exact["a"] + 0.3, c=exact["c"] + 0.7)
  cov = w @ w.T + variance * np.eye(dims)
  x = stats.multivariate_normal(b, cov).rvs(64, random_state=2)
  log_px = stats.multivariate_normal(b, cov).logpdf(x)
  to_vars = lambda p: {"params": {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}}
  model = LinearGaussianVAE(shape, d)
  x = jnp.asarray(x.reshape(-1, *shape), jnp.float32)
  return model, to_vars(exact), to_vars(imperfect), x, log_px, lik.Likelihood(
      "gaussian", 2 * variance)


def test_linear_gaussian_exact_posterior_iwae_is_exact(linear_gaussian):
  model, exact, _, x, log_px, likelihood = linear_gaussian
  for num_samples in (1, 10, 1000):
    scores = jitted_scores(model, likelihood, num_samples)(
        exact, x, jax.random.key(num_samples))
    np.testing.assert_allclose(scores["iwae"], -log_px, rtol=1e-5, atol=1e-4)
  # −ELBO = −log p(x) + KL(q‖posterior) = −log p(x); the vae estimate is right on average.
  assert abs(np.mean(f64(scores["vae"]) + log_px)) < 0.05


def test_linear_gaussian_iwae_converges_to_log_px(linear_gaussian):
  model, _, imperfect, x, log_px, likelihood = linear_gaussian
  errors, bias = {}, {}
  for num_samples in (1, 10, 1000):
    scores = jitted_scores(model, likelihood, num_samples)(
        imperfect, x, jax.random.key(num_samples))
    gap = f64(scores["iwae"]) + log_px  # iwae − (−log p(x)), ≥ 0 in expectation.
    errors[num_samples], bias[num_samples] = np.mean(np.abs(gap)), np.mean(gap)
    if num_samples > 1:  # at L = 1 both estimate −ELBO; beyond, iwae is the tighter bound.
      assert np.mean(f64(scores["iwae"])) < np.mean(f64(scores["vae"])) - 0.5
  assert errors[1000] < errors[10] < errors[1]
  assert errors[1000] < 0.05 * errors[1]
  # E[iwae] ≥ −log p(x): a large gap at L = 1, within sampling noise of zero at L = 1000.
  assert bias[1] > 0.5 and bias[1000] > -0.02


# ------------------------------------------------------------------- pixel maps


def finite_difference_grads(term_fn, x, h=1e-5):
  """Central differences of the per-image terms w.r.t. every pixel and channel.

  The same value is perturbed in every image at once; images are independent.
  """
  grads = [np.zeros(x.shape) for _ in range(2)]
  for index in np.ndindex(*x.shape[1:]):
    step = np.zeros(x.shape)
    step[(slice(None), *index)] = h
    plus, minus = term_fn(x + step), term_fn(x - step)
    for grad, p, m in zip(grads, plus, minus):
      grad[(slice(None), *index)] = (f64(p) - f64(m)) / (2 * h)
  return grads


@pytest.mark.parametrize("likelihood", ALL)
def test_gradient_maps_match_finite_differences_float64(likelihood):
  model, variables, x = mlp_setup(likelihood.params_per_value)
  rng = jax.random.key(11)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    x = jnp.asarray(x[:2], jnp.float64)

    def terms(x):
      mu, logvar = model.apply(variables, x, False, method=model.encode)
      z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape, mu.dtype)
      out = model.apply(variables, z, False, method=model.decode)
      return lik.gaussian_kl(mu, logvar), -likelihood.log_prob(x, out)

    neg_elbo = lambda x: sum(jnp.sum(t) for t in terms(x))
    terms_and_grad = jax.jit(lambda x: (terms(x), jax.grad(neg_elbo)(x)))
    maps = jitted_maps(model, likelihood)(variables, x, rng)
    kl_fd, rec_fd = finite_difference_grads(lambda x: terms_and_grad(x)[0], np.asarray(x))
    _, direct = terms_and_grad(x)
    assert all(m.dtype == jnp.float64 and m.shape == (2, 4, 4) for m in maps.values())
  check = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-8)
  check(maps["kl_grad"], np.abs(kl_fd).mean(-1))
  check(maps["rec_grad"], np.abs(rec_fd).mean(-1))
  check(maps["elbo_grad"], np.abs(kl_fd + rec_fd).mean(-1))
  check(maps["elbo_grad"], np.abs(f64(direct)).mean(-1))
  assert np.all(f64(maps["kl_grad"]) > 0)


@pytest.mark.parametrize("likelihood", [LEARNED, DISCRETE])
def test_maps_of_the_new_decoders_match_numpy(likelihood):
  """rec_error from the likelihood's reconstruction at z = mu; under the learned
  variance AE-U's rec_normalized = (x − x̂)²·exp(−log σ²), channels averaged; combi is
  still rec_error · kl_grad."""
  model, variables, x = mlp_setup(likelihood.params_per_value)
  maps = jitted_maps(model, likelihood)(variables, x, jax.random.key(4))
  assert sorted(maps) == sorted(pixel_lib.map_names(likelihood))  # (jit sorts keys)
  mu, _ = encode(model, variables, x)
  out = f64(decode(model, variables, mu))
  if likelihood.has_pixel_variance:
    recon = out[..., 0]
    logvar = test_decoders.numpy_learned_logvar(out[..., 1], likelihood.bit_depth)
    np.testing.assert_allclose(maps["rec_normalized"],
                               ((f64(x) - recon) ** 2 * np.exp(-logvar)).mean(-1), rtol=1e-5)
  else:
    k = likelihood.mixtures
    weights = special.softmax(out[..., 2 * k:], axis=-1)
    recon = np.clip((weights * out[..., :k]).sum(-1), -1, 1)
    assert "rec_normalized" not in maps
  np.testing.assert_allclose(maps["rec_error"], ((f64(x) - recon) ** 2).mean(-1), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(maps["combi"], maps["rec_error"] * maps["kl_grad"], rtol=1e-6)


@functools.cache
def conv_vae_2d():
  return vae_models.ConvVAE((8, 8, 2), latent_dim=2, widths=(4,), norm="batch")


@pytest.mark.parametrize("image_shape", [(8, 8, 2), (8, 8, 8, 1)])
def test_pixel_maps_shapes_combi_and_rec_error(image_shape):
  model = conv_vae_2d() if len(image_shape) == 3 else vae_models.ConvVAE(
      image_shape, latent_dim=2, widths=(2,), norm="batch")
  x = images((3, *image_shape), 5)
  variables = init(model, x)
  map_fn = jitted_maps(model, GAUSSIAN)
  maps = map_fn(variables, x, jax.random.key(0))
  assert set(maps) == set(PIXEL_MAPS)
  assert all(m.shape == (3, *image_shape[:-1]) for m in maps.values())
  np.testing.assert_allclose(maps["combi"], maps["rec_error"] * maps["kl_grad"], rtol=1e-6)
  mu, _ = encode(model, variables, x)
  recon = f64(decode(model, variables, mu))
  np.testing.assert_allclose(maps["rec_error"], ((f64(x) - recon)**2).mean(-1), rtol=1e-5,
                             atol=1e-7)
  again = map_fn(variables, x, jax.random.key(0))
  other = map_fn(variables, x, jax.random.key(1))
  for name in PIXEL_MAPS:
    np.testing.assert_array_equal(maps[name], again[name])
  np.testing.assert_array_equal(maps["rec_error"], other["rec_error"])  # no sample.
  assert not np.allclose(maps["rec_grad"], other["rec_grad"])


def test_pixel_maps_smoothing():
  model = conv_vae_2d()
  x = images((3, 8, 8, 2), 5)
  variables = init(model, x)
  maps = jitted_maps(model, GAUSSIAN)(variables, x, jax.random.key(0))
  smoothed = jitted_maps(model, GAUSSIAN, 1.5)(variables, x, jax.random.key(0))
  for name in ("rec_error", "elbo_grad", "kl_grad", "rec_grad"):
    np.testing.assert_allclose(smoothed[name], gaussian_smooth(maps[name], 1.5), rtol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(smoothed["combi"], smoothed["rec_error"] * smoothed["kl_grad"],
                             rtol=1e-6)


@pytest.mark.parametrize("shape, sigma", [
    ((3, 16, 12), 2.0), ((2, 6, 5), 2.0), ((2, 10, 9, 8), 2.0), ((2, 7, 9), 0.7)])
def test_gaussian_smooth_matches_scipy(shape, sigma):
  maps = normal(shape, 0)
  got = gaussian_smooth(jnp.asarray(maps, jnp.float32), sigma)
  expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect") for m in maps])
  assert got.shape == shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_smooth_identity_and_errors():
  maps = jnp.asarray(normal((2, 5, 5), 0), jnp.float32)
  np.testing.assert_array_equal(gaussian_smooth(maps, 0.0), maps)
  for bad in (-1.0, float("nan")):
    with pytest.raises(ValueError, match="sigma"):
      gaussian_smooth(maps, bad)


# --------------------------------------------------------------------- sharding


def test_scores_sharded_over_devices_match_one_device():
  devices = jax.devices()
  assert len(devices) == 8
  model = vae_models.ConvVAE((8, 8, 1), latent_dim=3, widths=(4,), norm="batch")
  x = images((16, 8, 8, 1), 9)
  variables = init(model, x)
  rng = jax.random.key(2)
  mesh = Mesh(np.asarray(devices), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  assert len(x_sharded.addressable_shards) == 8
  score_fn = jitted_scores(model, GAUSSIAN, 15)
  map_fn = jitted_maps(model, GAUSSIAN)
  one = jax.device_put((variables, x), devices[0])
  for fn in (score_fn, map_fn):
    sharded, single = fn(replicated, x_sharded, rng), fn(*one, rng)
    for name, value in sharded.items():
      np.testing.assert_allclose(value, single[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ------------------------------------------------------------- keys per image


FAMILY_CONFIGS = {
    "vae": {"model.norm": "batch"},
    "vae_learned": {"model.likelihood": "gaussian_learned", "model.beta": 1.0},
    "score": {"model.family": "score", "model.name": "unet", "model.unet.base_width": 8,
              "model.unet.channel_mult": (1,), "model.unet.num_res_blocks": 1,
              "model.unet.attention_resolutions": (), "model.unet.groups": 4,
              "model.sde.discrete": True, "eval.sano.dsm_samples": 2},
    "gan": {"model.family": "gan", "model.name": "dcgan", "model.latent_dim": 4,
            "model.widths": (8,), "eval.latent_steps": 3, "eval.latent_lr": 1e-2},
}


def _scored_by_index(family, variables, split, config, batch_size):
  """{index: (scores, maps, reconstruction)} of the eval binary's scoring pass."""
  from jaxad import keys, parallel, scoring
  config = config.copy_and_resolve_references()
  config.eval.batch_size = batch_size
  mesh = parallel.make_mesh()
  key = keys.purpose_key(config.seed, keys.EVAL)
  recon_fn = scoring.make_reconstruct_fn(family)
  out = {}
  for s in scoring.score_split(scoring.make_score_fn(family, True), variables,
                               scoring.batches(split, config), mesh, key):
    recon = recon_fn(variables, s.placed, s.placed_index, s.key)
    recon = None if recon is None else np.asarray(recon)
    for j in np.flatnonzero(s.valid):
      out[int(s.index[j])] = ({k: v[j] for k, v in s.scores.items()},
                              {k: v[j] for k, v in s.maps.items()},
                              None if recon is None else recon[j])
  return out


@pytest.mark.parametrize("name", ["vae", "vae_learned", "score", "gan"])
def test_scores_maps_and_reconstructions_do_not_depend_on_eval_batch_size(make_config,
                                                                          name):
  # Keys were per batch (fold_in(key, b)): eval.batch_size changed every sampled score
  # and gradient map. Image i is now scored alone with fold_in(key, i).
  from jaxad import state as state_lib
  from jaxad.data import pipeline
  config = make_config(**FAMILY_CONFIGS[name])
  split = pipeline.load_split(config.data, "test")
  family, _ = state_lib.build(config, 2)
  shape = state_lib.image_shape(config, 2)
  variables = fill_variables(jax.eval_shape(functools.partial(family.init, shape=shape),
                                    jax.random.key(0)))
  small = _scored_by_index(family, variables, split, config, 8)
  large = _scored_by_index(family, variables, split, config, 24)
  assert sorted(small) == sorted(large) == list(range(len(split.source)))
  assert len(split.source) % 24  # the last batch is padded
  for i, (scores, maps, recon) in small.items():
    other = large[i]
    assert set(scores) == set(family.sample_scores) and set(maps) == set(family.pixel_maps)
    for k in scores:
      np.testing.assert_allclose(scores[k], other[0][k], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{k} of image {i}")
    for k in maps:
      np.testing.assert_allclose(maps[k], other[1][k], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{k} map of image {i}")
    if recon is not None:
      np.testing.assert_allclose(recon, other[2], rtol=1e-5, atol=1e-5)
