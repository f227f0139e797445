"""Tests for jaxad.objectives.sde against closed forms, SciPy quadrature and Monte Carlo."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from jaxad.errors import ConfigError
from jaxad.objectives import sde as sde_lib

CONTINUOUS = sde_lib.VPSDE()
DISCRETE = sde_lib.VPSDE(discrete=True)


def f32(a):
  return jnp.asarray(a, jnp.float32)


def beta64(t, beta_min=0.1, beta_max=20.0):
  return beta_min + t * (beta_max - beta_min)


def quad_marginal(t):
  """(a, σ) from the moment ODEs: a = exp(−½∫β), σ² = 1 − exp(−∫β), by quadrature."""
  integral = integrate.quad(beta64, 0.0, t, epsabs=1e-14, epsrel=1e-13)[0]
  return math.exp(-0.5 * integral), math.sqrt(-math.expm1(-integral))


def discrete_log_alpha_bar(n=1000, beta_min=0.1, beta_max=20.0):
  """log ᾱ_i = Σ_{j≤i} log(1 − β_j) with DDPM's β_j = linspace(1e-4, 0.02, n), float64."""
  betas = np.linspace(beta_min / n, beta_max / n, n)
  return np.cumsum(np.log(1.0 - betas)), betas


# --------------------------------------------------------------------- marginals


def test_continuous_marginal_matches_quadrature():
  ts = np.array([1e-5, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.8, 1.0])
  mean_coeff, std = CONTINUOUS.marginal(f32(ts))
  expected = np.array([quad_marginal(t) for t in ts])
  np.testing.assert_allclose(mean_coeff, expected[:, 0], rtol=1e-6)
  np.testing.assert_allclose(std, expected[:, 1], rtol=1e-5)
  # σ² ≈ ∫β = β_min·t + ½t²(β_max − β_min) at small t, to float32 precision thanks to
  # expm1 (1 − a² in float32 is off by ~3% at t = 1e-5).
  t = float(f32(1e-5))
  np.testing.assert_allclose(std[0], math.sqrt(0.1 * t + 0.5 * 19.9 * t**2), rtol=1e-6)
  naive = np.sqrt(1 - np.float32(mean_coeff[0])**2)
  assert abs(naive / std[0] - 1) > 1e-2


def test_discrete_marginal_matches_cumprod():
  log_alpha_bar, _ = discrete_log_alpha_bar()
  i = np.array([0, 1, 2, 10, 250, 500, 998, 999])
  t = i / 999.0
  mean_coeff, std = DISCRETE.marginal(f32(t))
  np.testing.assert_allclose(mean_coeff, np.sqrt(np.exp(log_alpha_bar[i])), rtol=1e-6)
  np.testing.assert_allclose(std, np.sqrt(1 - np.exp(log_alpha_bar[i])), rtol=1e-6)
  assert float(std[0]) == pytest.approx(0.01)  # σ_0 = √β_0 = √1e-4.
  # Off-grid times round to the nearest step.
  np.testing.assert_array_equal(DISCRETE.marginal(f32(t + 0.3 / 999))[0], mean_coeff)


def test_discrete_and_continuous_are_the_same_sde():
  """The 1000-step chain is the continuous VP-SDE up to the discretisation error.

  −log ᾱ_i = Σ_{j≤i} −log(1 − β_j) vs ∫_0^{t_i} β: the sum Σ_{j≤i} β(t_j)/N is a
  Riemann sum of the integral, off by at most β_max/N, and −log(1 − β) − β ≤
  β²/(2(1 − β_max/N)) adds at most Σ_j β_j²/(2(1 − 0.02)). So |log ᾱ_i − log a(t_i)²| ≤ δ
  and |σ_d² − σ_c²| = |ᾱ_i − a²| ≤ (e^δ − 1)·a².
  """
  log_alpha_bar, betas = discrete_log_alpha_bar()
  delta = betas.max() + np.sum(betas**2) / (2 * (1 - betas.max()))  # ≈ 0.088
  t = np.arange(1000) / 999.0
  mean_c, std_c = map(np.asarray, CONTINUOUS.marginal(f32(t)))
  mean_d, std_d = map(np.asarray, DISCRETE.marginal(f32(t)))
  log_gap = np.abs(np.log(mean_d.astype(np.float64)**2) - np.log(mean_c.astype(np.float64)**2))
  assert log_gap.max() <= delta
  assert np.all(np.abs(std_d**2 - std_c**2) <= (math.expm1(delta)) * mean_c**2 + 1e-6)
  # In practice the curves agree to 2e-3 in a and 0.01 in σ (= σ_0, one step of noise).
  assert np.abs(mean_d - mean_c).max() < 2e-3
  assert np.abs(std_d - std_c).max() < 0.0101


def test_time_label_and_beta_and_diffusion():
  t = f32([0.0, 0.5, 1.0])
  for sde in (CONTINUOUS, DISCRETE):
    np.testing.assert_allclose(sde.time_label(t), [0.0, 499.5, 999.0])
    np.testing.assert_allclose(sde.beta(t), [0.1, 10.05, 20.0], rtol=1e-6)
    np.testing.assert_allclose(sde.diffusion(t), np.sqrt([0.1, 10.05, 20.0]), rtol=1e-6)
  x = f32(np.ones((3, 2, 2)))
  np.testing.assert_allclose(CONTINUOUS.drift(x, t)[:, 0, 0], [-0.05, -5.025, -10.0],
                             rtol=1e-6)


def test_sample_time_ranges():
  t = np.asarray(CONTINUOUS.sample_time(jax.random.key(0), 20_000))
  assert t.shape == (20_000,) and t.min() >= 1e-5 and t.max() <= 1.0
  assert stats.kstest(t, stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3
  t = np.asarray(DISCRETE.sample_time(jax.random.key(1), 100_000))
  i = np.round(t * 999)
  np.testing.assert_allclose(t * 999, i, atol=1e-4)  # on the grid, up to float32 rounding.
  counts = np.bincount(i.astype(int), minlength=1000)
  assert counts.size == 1000 and counts.min() > 0  # covers 0..999 (expected 100 each).
  assert stats.chisquare(counts).pvalue > 1e-3


def test_perturb_broadcasts_and_score_from_eps():
  x0, noise = f32(np.ones((2, 3, 3, 1))), f32(np.full((2, 3, 3, 1), 2.0))
  t = f32([0.1, 0.7])
  mean_coeff, std = CONTINUOUS.marginal(t)
  x_t = CONTINUOUS.perturb(x0, t, noise)
  np.testing.assert_allclose(x_t[:, 1, 2, 0], mean_coeff + 2 * std, rtol=1e-6)
  score = sde_lib.score_from_eps(noise, std)
  np.testing.assert_allclose(score[:, 0, 0, 0], -2 / std, rtol=1e-6)


def test_prior_log_prob():
  z = np.random.default_rng(0).normal(size=(3, 4, 4, 2))
  np.testing.assert_allclose(CONTINUOUS.prior_log_prob(f32(z)),
                             stats.norm.logpdf(z).reshape(3, -1).sum(1), rtol=1e-6)


# ------------------------------------------------------------ DSM: Gaussian data

MU, S, DIM = 0.3, 0.5, 8


def gaussian_eps(sde, mu=MU, s=S, scale=1.0, shift=0.0):
  """The optimal ε-predictor for x0 ~ N(μ, s²I): E[ε|x_t] = σ(x_t − aμ)/(a²s² + σ²)."""
  def apply_fn(x_t, label):
    t = label / (sde.num_scales - 1)
    mean_coeff, std = sde.marginal(t)
    a, sd = mean_coeff[:, None], std[:, None]
    return scale * sd * (x_t - a * mu) / (a**2 * s**2 + sd**2) + shift
  return apply_fn


def min_loss(sde, t, s=S):
  """Per-element E[(E[ε|x_t] − ε)²] = a²s²/(a²s² + σ²) (the residual variance)."""
  mean_coeff, std = map(lambda v: np.asarray(v, np.float64), sde.marginal(f32(t)))
  return mean_coeff**2 * s**2 / (mean_coeff**2 * s**2 + std**2)


def gaussian_batch(n, seed):
  rng = np.random.default_rng(seed)
  return f32(MU + S * rng.normal(size=(n, DIM))), f32(rng.normal(size=(n, DIM)))


@pytest.mark.parametrize("sde", [CONTINUOUS, DISCRETE], ids=["continuous", "discrete"])
@pytest.mark.parametrize("weighting", sde_lib.WEIGHTINGS)
def test_dsm_loss_at_matches_analytic_minimum(sde, weighting):
  n = 25_000  # 200k elements: standard error m·√(2/200k) ≈ 0.3% of the minimum m.
  x0, noise = gaussian_batch(n, 0)
  loss_at = jax.jit(lambda fn, t: sde_lib.dsm_loss_at(sde, fn, x0, t, noise, weighting),
                    static_argnums=0)
  for t in (0.01, 0.2, 0.6):
    ts = f32(np.full((n,), round(t * 999) / 999))
    weight = 1.0
    if weighting == "likelihood":
      weight = float(sde.beta(ts[0]) / sde.marginal(ts[0])[1]**2)
    m = weight * min_loss(sde, ts[0])
    got = loss_at(gaussian_eps(sde), ts)
    assert got.shape == (n,)
    se = m * math.sqrt(2 / (n * DIM))
    assert abs(float(got.mean()) - m) < 4 * se, (t, float(got.mean()), m, se)
    # Worse predictors (same samples): ε_true + c adds c² + 2c·mean(ε_true − ε), and
    # k·ε_true adds (k − 1)²·mean(ε_true²) + 2(k − 1)·mean(ε_true·(ε_true − ε)); the
    # second terms have mean 0 (E[ε|x_t] = ε_true) and the standard errors below.
    std = float(sde.marginal(ts[0])[1])
    e2 = std**2 / (std**2 + (1 - std**2) * S**2)  # E[ε_true²] = σ²/(a²s² + σ²).
    shifted = loss_at(gaussian_eps(sde, shift=0.1), ts)
    se = weight * 0.2 * math.sqrt(m / weight / (n * DIM))
    assert abs(float(shifted.mean() - got.mean()) - 0.01 * weight) < 4 * se
    assert float(shifted.mean()) > float(got.mean())
    scaled = loss_at(gaussian_eps(sde, scale=1.5), ts)
    se = weight * math.sqrt(e2 * m / weight / (n * DIM))
    assert abs(float(scaled.mean() - got.mean()) - 0.25 * e2 * weight) < 4 * se
    assert float(scaled.mean()) > float(got.mean())


@pytest.mark.parametrize("sde", [CONTINUOUS, DISCRETE], ids=["continuous", "discrete"])
def test_dsm_loss_time_average_matches_integral(sde):
  n = 100_000
  x0, _ = gaussian_batch(n, 1)
  losses = jax.jit(lambda r: sde_lib.dsm_loss(sde, gaussian_eps(sde), x0, r))(
      jax.random.key(3))
  if sde.discrete:
    grid = np.arange(1000) / 999
    expected = min_loss(sde, grid).mean()
    spread = min_loss(sde, grid).std()
  else:
    m = lambda t: min_loss(sde, np.array([t]))[0]
    expected = integrate.quad(m, sde.t_eps, 1.0, limit=200)[0] / (1 - sde.t_eps)
    spread = 0.5  # at most: the minimum lies in [0, 1].
  # Each loss has variance ≤ Var_t(m) + 2·E[m²]/DIM ≤ spread² + 2/DIM.
  se = math.sqrt(spread**2 + 2 / DIM) / math.sqrt(n)
  assert abs(float(losses.mean()) - expected) < 4 * se, (float(losses.mean()), expected)


def test_dsm_loss_rejects_unknown_weighting():
  x0 = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="weighting='l2'.*sigma2.*likelihood"):
    sde_lib.dsm_loss(CONTINUOUS, lambda x, t: x, x0, jax.random.key(0), weighting="l2")


def test_make_score_fn():
  eps = lambda x, label: x * label[:, None]
  t = f32([0.25, 0.5])
  x = f32(np.ones((2, 3)))
  for sde in (CONTINUOUS, DISCRETE):
    expected = -(x * 999 * t[:, None]) / sde.marginal(t)[1][:, None]
    np.testing.assert_allclose(sde_lib.make_score_fn(sde, eps)(x, t), expected, rtol=1e-6)


# --------------------------------------------- a trained score model on a mixture

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-1.0, -0.5], [0.8, 0.6]])
STDS = np.array([0.25, 0.35])


def mixture_score(x, t):
  """∇log p_t for p_0 = Σ w_k N(μ_k, s_k²I): p_t = Σ w_k N(aμ_k, (a²s_k² + σ²)I), float64."""
  mean_coeff, std = map(lambda v: float(v), CONTINUOUS.marginal(f32(t)))
  var = mean_coeff**2 * STDS**2 + std**2  # (K,)
  diff = x[:, None, :] - mean_coeff * MEANS  # (n, K, 2)
  log_w = np.log(WEIGHTS) - np.sum(diff**2, -1) / (2 * var) - np.log(var)  # (d/2)·log, d=2
  resp = np.exp(log_w - log_w.max(1, keepdims=True))
  resp /= resp.sum(1, keepdims=True)
  return np.sum(resp[:, :, None] * (-diff / var[:, None]), axis=1)


def sample_mixture(n, t, seed):
  rng = np.random.default_rng(seed)
  k = rng.choice(2, size=n, p=WEIGHTS)
  x0 = MEANS[k] + STDS[k, None] * rng.normal(size=(n, 2))
  mean_coeff, std = map(float, CONTINUOUS.marginal(f32(t)))
  return mean_coeff * x0 + std * rng.normal(size=(n, 2))


class ScoreMLP(nn.Module):
  """A tiny ε-predictor: [x, Fourier features of t = label/999] → 2 SiLU layers → ε."""

  width: int = 128

  @nn.compact
  def __call__(self, x, label):
    t = (label / 999.0)[:, None]
    freqs = jnp.arange(1, 9, dtype=jnp.float32) * math.pi
    h = jnp.concatenate([x, t, jnp.sin(freqs * t), jnp.cos(freqs * t)], axis=-1)
    for _ in range(2):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(x.shape[-1])(h)


def test_trained_score_matches_mixture_score():
  model, steps, batch = ScoreMLP(), 3000, 512
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  data = f32(sample_mixture(200_000, 0.0, 0))
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def train(params, rng):
    def step(carry, key):
      params, opt_state = carry
      idx_key, loss_key = jax.random.split(key)
      x0 = data[jax.random.randint(idx_key, (batch,), 0, data.shape[0])]
      loss_fn = lambda p: jnp.mean(sde_lib.dsm_loss(
          CONTINUOUS, lambda x, lab: model.apply(p, x, lab), x0, loss_key))
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       jax.random.split(rng, steps))
    return params, losses

  untrained = params
  params, _ = train(params, jax.random.key(1))

  def rel_error(p, t):
    x = sample_mixture(4000, t, seed=int(t * 100) + 1)
    ts = f32(np.full((x.shape[0],), t))
    score_fn = sde_lib.make_score_fn(CONTINUOUS, lambda v, lab: model.apply(p, v, lab))
    got = np.asarray(score_fn(f32(x), ts), np.float64)
    true = mixture_score(x, t)
    return np.mean(np.linalg.norm(got - true, axis=1) / np.linalg.norm(true, axis=1))

  for t in (0.05, 0.2):
    trained_err, untrained_err = rel_error(params, t), rel_error(untrained, t)
    assert trained_err < 0.2, (t, trained_err)
    assert untrained_err > 0.8, (t, untrained_err)


# ------------------------------------------------------------------------ config


def sde_cfg(**overrides):
  fields = dict(beta_min=0.1, beta_max=20.0, num_scales=1000, discrete=False, t_eps=1e-5,
                weighting="sigma2")
  return ml_collections.ConfigDict({**fields, **overrides})


def test_make_sde():
  assert sde_lib.make_sde(sde_cfg()) == CONTINUOUS
  assert sde_lib.make_sde(sde_cfg(discrete=True, weighting="likelihood")) == DISCRETE
  assert sde_lib.make_sde(sde_cfg(beta_min=1, beta_max=2)).beta_max == 2.0
  hash(DISCRETE)  # usable as a static jit argument.


@pytest.mark.parametrize("overrides, match", [
    (dict(beta_min=0.0), "model.sde.beta_min=0.0.*0 < beta_min < beta_max"),
    (dict(beta_min=30.0), "model.sde.beta_min=30.0"),
    (dict(beta_max=float("nan")), "model.sde.beta_max must be a finite number"),
    (dict(num_scales=1), "model.sde.num_scales must be an int >= 2"),
    (dict(num_scales=10.5), "model.sde.num_scales"),
    (dict(t_eps=0.0), r"model.sde.t_eps must be in \(0, 1\)"),
    (dict(t_eps=1.0), "model.sde.t_eps"),
    (dict(discrete="yes"), "model.sde.discrete must be True or False"),
    (dict(weighting="l2"), "model.sde.weighting='l2'.*sigma2.*likelihood"),
])
def test_make_sde_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    sde_lib.make_sde(sde_cfg(**overrides))


def test_make_sde_missing_key():
  cfg = sde_cfg()
  del cfg["t_eps"]
  with pytest.raises(ConfigError, match="model.sde.t_eps is missing"):
    sde_lib.make_sde(cfg)
