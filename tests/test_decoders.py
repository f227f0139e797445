"""The discrete (PixelCNN++'s discretised logistic) and learned-variance Gaussian decoders:
their likelihoods against float64 SciPy brute force over every level, their config
checks, and a grid that trains and scores them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jaxad import config as config_lib
from jaxad.errors import ConfigError
from jaxad.objectives import likelihood as lik

FLOOR = -7.0  # PixelCNN++'s log-scale floor, the definition the reference applies


def f32(a):
  return jnp.asarray(a, jnp.float32)


def levels(bits: int) -> np.ndarray:
  """The 2^bits values of the [-1, 1] grid."""
  return -1.0 + 2.0 * np.arange(2**bits) / (2**bits - 1)


def log_diff_exp(a, b):
  """log(e^a − e^b) for a ≥ b, float64."""
  return a + np.log(-np.expm1(b - a))


def numpy_bin_log_mass(x, mean, log_scale, bits):
  """float64 log of the logistic(mean, e^max(log_scale, −7)) mass of x's bin [x − h, x + h]
  (h = 1/(2^bits − 1); the first bin from −∞, the last to +∞), from SciPy's log-CDF left
  of the mean and its log-survival function right of it (where the CDF has no digits)."""
  x, mean, log_scale = (np.asarray(a, np.float64) for a in (x, mean, log_scale))
  h, s = 1.0 / (2**bits - 1), np.exp(np.maximum(log_scale, FLOOR))
  first, last = x < -1 + h, x > 1 - h
  logcdf = lambda t: stats.logistic.logcdf(t, mean, s)
  logsf = lambda t: stats.logistic.logsf(t, mean, s)
  with np.errstate(divide="ignore"):
    left = log_diff_exp(np.where(last, 0.0, logcdf(x + h)),
                        np.where(first, -np.inf, logcdf(x - h)))
    right = log_diff_exp(np.where(first, 0.0, logsf(x - h)),
                         np.where(last, -np.inf, logsf(x + h)))
  return np.where(x > mean, right, left)


def numpy_mixture_log_prob(x, means, log_scales, logits, bits):
  """float64 log Σ_k π_k·mass_k(bin of x) per value; means etc. (..., K)."""
  per_component = numpy_bin_log_mass(x[..., None], means, log_scales, bits)
  if logits is None:
    return per_component[..., 0]
  log_weights = logits - special.logsumexp(logits, axis=-1, keepdims=True)
  return special.logsumexp(per_component + log_weights, axis=-1)


def numpy_learned_logvar(raw, bits):
  """gaussian_learned's log σ² = lo + softplus(v − lo), lo = 2·log(2/(2^bits − 1))."""
  lo = 2.0 * math.log(2.0 / (2**bits - 1))
  return lo + np.logaddexp(0.0, np.asarray(raw, np.float64) - lo)


def numpy_log_px_z(x, out, likelihood):
  """log p(x|z) per image (..., B) of decoder outputs (..., B, *image[, P]), float64."""
  x, out = np.asarray(x, np.float64), np.asarray(out, np.float64)
  if likelihood.kind == "gaussian_learned":
    logvar = numpy_learned_logvar(out[..., 1], likelihood.bit_depth)
    values = stats.norm.logpdf(x, out[..., 0], np.exp(0.5 * logvar))
  else:
    k = likelihood.mixtures
    values = numpy_mixture_log_prob(
        np.broadcast_to(x, out.shape[:-1]), out[..., :k], out[..., k:2 * k],
        out[..., 2 * k:] if k > 1 else None, likelihood.bit_depth)
  return values.reshape(*values.shape[:out.ndim - x.ndim], -1).sum(-1)  # (L?, B)


def on_grid(x, bits=8):
  """x rounded to the nearest of the 2^bits levels (a stored image)."""
  top = 2**bits - 1
  return np.round((np.asarray(x, np.float64) + 1) * top / 2) * 2 / top - 1


# ----------------------------------------------------- the discretised logistic


def _every_level(bits, params):
  """x (L·n, 1) holding every level for each of n parameter rows (n, P) → out (L·n, 1, P)."""
  v = levels(bits).astype(np.float32)
  x = np.repeat(v, len(params))
  out = np.tile(params, (len(v), 1))[:, None, :]
  return x[:, None], out.astype(np.float32)


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 16])
def test_levels_sum_to_one_and_match_brute_force(bits):
  """K = 1: every level's log-probability is SciPy's log bin mass; the masses sum to 1."""
  rng = np.random.default_rng(bits)
  mean = np.r_[rng.uniform(-1.5, 1.5, 4), -1.0, 1.0, 0.3]
  # below the floor, narrow, wide (16 bits: bins under TINY_BIN scales, the midpoint rule)
  log_scale = np.r_[-9.0, rng.uniform(-6, 0, 4), 1.0, 3.0]
  x, out = _every_level(bits, np.stack([mean, log_scale], -1).astype(np.float32))
  likelihood = lik.Likelihood("discretized_logistic", bit_depth=bits)
  got = np.asarray(jax.jit(likelihood.log_prob)(f32(x), f32(out)), np.float64)
  ref = numpy_bin_log_mass(x[:, 0], out[:, 0, 0], out[:, 0, 1], bits)
  n = len(mean)
  # (float32 levels: their bins tile [-1, 1] to ~1e-7)
  np.testing.assert_allclose(np.exp(ref.reshape(-1, n)).sum(0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.exp(got.reshape(-1, n)).sum(0), 1.0, rtol=2e-6)
  np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
  assert np.all(got <= 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_mixture_matches_a_mixture_by_hand(bits):
  k, n = 3, 9
  rng = np.random.default_rng(10 + bits)
  params = np.concatenate([rng.uniform(-1.3, 1.3, (n, k)), rng.uniform(-8, -0.5, (n, k)),
                           rng.normal(0, 2, (n, k))], -1).astype(np.float32)
  x, out = _every_level(bits, params)
  likelihood = lik.Likelihood("discretized_logistic", mixtures=k, bit_depth=bits)
  assert likelihood.params_per_value == 3 * k
  got = np.asarray(jax.jit(likelihood.log_prob)(f32(x), f32(out)), np.float64)
  p = out[:, 0].astype(np.float64)
  ref = numpy_mixture_log_prob(x[:, 0], p[:, :k], p[:, k:2 * k], p[:, 2 * k:], bits)
  np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(np.exp(got.reshape(-1, n)).sum(0), 1.0, rtol=2e-6)
  # The reconstruction: the mixture's mean Σ π_k·mean_k, clipped to the image range.
  weights = special.softmax(params[:, 2 * k:].astype(np.float64), axis=-1)
  expected = np.clip((weights * params[:, :k]).sum(-1), -1, 1)
  np.testing.assert_allclose(likelihood.mean(f32(params[None])), expected[None], rtol=1e-6,
                             atol=1e-7)


def test_whole_images_sum_their_values_and_train_on_the_neg_log_likelihood():
  from jaxad.objectives import vae as vae_obj
  rng = np.random.default_rng(0)
  x = on_grid(rng.uniform(-1, 1, (3, 4, 4, 2)), 5).astype(np.float32)
  out = np.concatenate([rng.normal(0, 0.8, (3, 4, 4, 2, 2)), rng.uniform(-6, -1, (3, 4, 4, 2, 2)),
                        rng.normal(0, 1, (3, 4, 4, 2, 2))], -1).astype(np.float32)
  likelihood = lik.Likelihood("discretized_logistic", beta=1.0, mixtures=2, bit_depth=5)
  log_p = likelihood.log_prob(f32(x), f32(out))
  assert log_p.shape == (3,)
  np.testing.assert_allclose(log_p, numpy_log_px_z(x, out, likelihood), rtol=1e-5)
  np.testing.assert_allclose(likelihood.train_rec(f32(x), f32(out)), -log_p, rtol=1e-6)
  kl = f32([1.0, 2.0, 3.0])
  terms = vae_obj.VAETerms(rec=-log_p, kl=kl, train_rec=likelihood.train_rec(f32(x), f32(out)))
  np.testing.assert_allclose(vae_obj.training_loss(terms, likelihood), terms.neg_elbo.mean(),
                             rtol=1e-6)  # β = 1: the loss is the −ELBO itself
  with pytest.raises(ValueError, match="needs 6 decoder outputs per value.*params_per_value=6"):
    likelihood.log_prob(f32(x), f32(x))


@pytest.mark.parametrize("bits", [8, 16])
def test_gradients_are_finite_at_the_edges_and_match_float64_differences(bits):
  """∂log P/∂(x, mean, log-scale, logit) everywhere, edge bins and floor included; inside
  the bins, against central differences of the float64 SciPy reference."""
  k = 2
  top = levels(bits)
  xs = np.array([-1.0, top[1], -0.5, 0.0, 0.37, top[-2], 1.0])
  means = np.array([[-3.0, 0.1], [-1.0, 0.9], [0.2, -0.4], [2.5, -2.5], [0.3, 0.5],
                    [1.0, 0.95], [3.0, -0.2]])
  log_scales = np.array([[-10.0, -2.0], [-7.5, 1.0], [-3.0, -4.0], [0.5, -1.0],
                         [-2.0, 2.0], [-6.0, -3.0], [-8.0, 0.0]])
  logits = np.array([[0.0, 1.0]] * len(xs))
  likelihood = lik.Likelihood("discretized_logistic", mixtures=k, bit_depth=bits)
  with jax.enable_x64(True):
    x = jnp.asarray(xs[:, None])
    out = jnp.asarray(np.concatenate([means, log_scales, logits], -1)[:, None, :])
    grads = jax.jit(jax.grad(lambda x, o: likelihood.log_prob(x, o).sum(), (0, 1)))(x, out)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    d_out = np.asarray(grads[1])[:, 0, :]
  params = np.concatenate([means, log_scales, logits], -1)
  scales = np.exp(np.maximum(log_scales, FLOOR))
  f = lambda p: numpy_mixture_log_prob(xs, p[:, :k], p[:, k:2 * k], p[:, 2 * k:], bits)
  for j in range(3 * k):
    # A step well inside the logistic's scale for the means; 1e-4 elsewhere (16-bit bins:
    # the reference loses ~1e-11 of each log-probability to cancellation).
    step = 1e-3 * scales[:, j] if j < k else np.full(len(xs), 1e-4)
    free = log_scales[:, j - k] > FLOOR + 1e-3 if k <= j < 2 * k else np.ones(len(xs), bool)
    plus, minus = params.copy(), params.copy()  # below the floor: a zero slope
    plus[:, j] += step
    minus[:, j] -= step
    fd = (f(plus) - f(minus)) / (2 * step)
    np.testing.assert_allclose(d_out[free, j], fd[free], rtol=1e-5, atol=1e-6, err_msg=str(j))
    if not free.all():
      np.testing.assert_array_equal(d_out[~free, j], 0.0)


# ----------------------------------------------------- the learned-variance Gaussian


def test_gaussian_learned_matches_scipy_and_its_floor_bounds_the_density():
  rng = np.random.default_rng(4)
  x = on_grid(rng.uniform(-1, 1, (2, 3, 3, 2)))
  mean = x + rng.normal(0, 0.1, x.shape)
  raw = rng.uniform(-30, 2, x.shape)  # far below the floor too
  # The inputs as float32 holds them, so the float64 reference sees the same numbers.
  x, mean, raw = (np.asarray(a, np.float32).astype(np.float64) for a in (x, mean, raw))
  out = np.stack([mean, raw], -1)
  likelihood = lik.Likelihood("gaussian_learned", beta=1.0)
  assert likelihood.params_per_value == 2 and likelihood.has_pixel_variance
  logvar = numpy_learned_logvar(raw, 8)
  lo = 2 * math.log(2 / 255)
  assert likelihood.logvar_floor == pytest.approx(lo) and np.all(logvar > lo)
  np.testing.assert_allclose(likelihood.log_variance(f32(out)), logvar, rtol=1e-6, atol=1e-6)
  expected = stats.norm.logpdf(x, mean, np.exp(0.5 * logvar)).reshape(2, -1).sum(1)
  np.testing.assert_allclose(likelihood.log_prob(f32(x), f32(out)), expected, rtol=1e-5)
  np.testing.assert_allclose(likelihood.log_prob(f32(x), f32(out)),
                             numpy_log_px_z(x, out, likelihood), rtol=1e-5)
  np.testing.assert_allclose(likelihood.train_rec(f32(x), f32(out)), -expected, rtol=1e-5)
  np.testing.assert_array_equal(likelihood.mean(f32(out)), f32(mean))
  np.testing.assert_allclose(likelihood.normalized_error(f32(x), f32(out)),
                             (x - mean) ** 2 * np.exp(-logvar), rtol=1e-5, atol=1e-7)
  # A perfect reconstruction of a constant image with σ pushed to −∞: the density stays
  # at most 1/(w·√(2π)) per value, so p(x|z)·w^D, the mass of the image's bins, is < 1.
  flat = np.full((1, 4, 4, 1), -1.0)
  collapsed = np.stack([flat, np.full(flat.shape, -80.0)], -1)
  per_value = float(likelihood.log_prob(f32(flat), f32(collapsed))[0]) / 16
  assert per_value == pytest.approx(-0.5 * (math.log(2 * math.pi) + lo), rel=1e-6)
  assert per_value + math.log(2 / 255) < 0


# --------------------------------------------------------------------- config checks


def test_config_knows_every_likelihood_and_checks_the_mixtures(make_config):
  assert config_lib.LIKELIHOODS == lik.KINDS
  for kind in lik.KINDS:
    config_lib.validate(make_config(**{"model.likelihood": kind}))
  config_lib.validate(make_config(**{"model.likelihood": "discretized_logistic",
                                     "model.likelihood_mixtures": 5}))
  assert [lik.params_per_value(k) for k in lik.KINDS] == [1, 1, 2, 2]
  assert lik.params_per_value("discretized_logistic", 5) == 15
  for overrides, match in (
      ({"model.likelihood_mixtures": 0}, "model.likelihood_mixtures=0 must be an int >= 1"),
      ({"model.likelihood_mixtures": 2},
       "likelihood_mixtures=2 needs model.likelihood='discretized_logistic'"),
      ({"model.likelihood": "laplace"}, "model.likelihood='laplace' is not one of")):
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(make_config(**overrides))
  with pytest.raises(ConfigError, match="likelihood_mixtures=3 needs"):
    lik.Likelihood("gaussian_learned", mixtures=3)
  with pytest.raises(ConfigError, match="data.bit_depth=17"):
    lik.Likelihood("discretized_logistic", bit_depth=17)
  with pytest.raises(ConfigError, match="model.likelihood='laplace'"):
    lik.params_per_value("laplace")


# ------------------------------------------------------------------------ the grid


def test_grid_trains_and_scores_the_new_decoders(make_config, tmp_path):
  """β members of a learned-variance group train with β a per-member array and get
  AE-U's score and map; a discrete grid over latent sizes plans decoders with their own
  outputs per value; the c axis is refused for a decoder without a fixed σ²."""
  import ml_collections
  from jaxad.grid import axes as grid_axes
  from jaxad.grid import run as grid
  from jaxad.grid import train as grid_train
  config = grid_axes.with_grid(make_config(**{
      "model.likelihood": "gaussian_learned", "train.num_steps": 3, "eval.num_samples": 2,
      "eval.batch_size": 32, "eval.bootstrap": 0, "data.synthetic_lesions.enabled": True}))
  config.grid.axes = ml_collections.ConfigDict({"beta": (0.5, 1.0)})
  (group,) = grid.run_grid(config, str(tmp_path / "grid"), progress=False)["groups"]
  for m in group["members"]:
    assert not m["diverged"] and m["steps"] == 3
    for name in ("vae", "vae_rec_normalized", "vae_complexity"):
      assert 0.0 <= m["sample"][name]["auroc"] <= 1.0, name
    for name in ("rec_normalized", "combi"):
      assert 0.0 <= m["pixel"][name]["auroc"] <= 1.0, name
  a, b = group["members"]
  assert a["param_norm"] != b["param_norm"]  # each member trained with its own β
  config.model.likelihood = "discretized_logistic"
  config.model.likelihood_mixtures = 2
  config.grid.axes = ml_collections.ConfigDict({"seed": (0, 1), "latent_dim": (2, 8),
                                                "beta": (0.5, 1.0)})
  groups = grid_axes.plan(config)
  assert [len(g.members) for g in groups] == [4, 4]
  for g in groups:
    model, likelihood, _ = grid_train.group_setup(g, (8, 8, 1))
    assert likelihood == lik.Likelihood("discretized_logistic", 1.0, 2, 8)
    assert model.params_per_value == 6 and model.latent_dim == g.values["latent_dim"]
  config.grid.axes = ml_collections.ConfigDict({"c": (1.0,)})
  with pytest.raises(ConfigError, match="grid.axes.c needs model.likelihood='gaussian'.*"
                     "no fixed decoder variance"):
    grid_axes.plan(config)
