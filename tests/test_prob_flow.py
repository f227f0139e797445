"""Tests for jaxad.scores.prob_flow: Gaussian data, where the flow is known in closed form.

For x0 ~ N(μ, Σ), Σ = R·diag(s²)·Rᵀ, the VP-SDE gives p_t = N(a(t)μ, V(t)) with
V = R·diag(v)·Rᵀ, v_d(t) = a²s_d² + σ², and dv/dt = β(1 − v). The probability-flow ODE
is affine: x_1 = a(1)μ + R·diag(√(v(1)/v(t0)))·Rᵀ·(x − a(t0)μ), its Jacobian is
½β(V⁻¹ − I), and ∫_t0^1 div f̃ dt = ½ Σ_d log(v_d(1)/v_d(t0)) exactly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxad.objectives import likelihood as likelihood_lib
from jaxad.objectives import sde as sde_lib
from jaxad.scores import prob_flow

SDE = sde_lib.VPSDE()
T0 = 1e-5


def f32(a):
  return jnp.asarray(a, jnp.float32)


def marginal64(t):
  """(a, σ²) of the continuous VP-SDE in float64."""
  log_a = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
  return math.exp(log_a), -math.expm1(2 * log_a)


class Gaussian:
  """Data N(μ, R·diag(s²)·Rᵀ): its diffused score (float32) and float64 references."""

  def __init__(self, mu, s, rotation):
    self.mu, self.s, self.rot = np.asarray(mu), np.asarray(s), np.asarray(rotation)

  def variances(self, t):
    a, var = marginal64(t)
    return a**2 * self.s**2 + var  # v_d(t), (D,)

  def score_fn(self, x, t):
    mean_coeff, std = SDE.marginal(t)
    a, sd = mean_coeff[:, None], std[:, None]
    rot, mu, s2 = f32(self.rot), f32(self.mu), f32(self.s**2)
    centred = (x - a * mu) @ rot  # coordinates in the eigenbasis.
    return -(centred / (a**2 * s2 + sd**2)) @ rot.T

  def flow_end(self, x, t0):
    """x_1 of the exact flow from t0, float64."""
    a0, _ = marginal64(t0)
    a1, _ = marginal64(1.0)
    scale = np.sqrt(self.variances(1.0) / self.variances(t0))
    return a1 * self.mu + ((x - a0 * self.mu) @ self.rot * scale) @ self.rot.T

  def div_integral(self, t0):
    return 0.5 * np.sum(np.log(self.variances(1.0) / self.variances(t0)))

  def log_prob(self, x, t):
    """log p_t(x), float64."""
    a, _ = marginal64(t)
    cov = self.rot @ np.diag(self.variances(t)) @ self.rot.T
    return stats.multivariate_normal(a * self.mu, cov).logpdf(x)

  def sample(self, n, seed):
    rng = np.random.default_rng(seed)
    return self.mu + (rng.normal(size=(n, self.mu.size)) * self.s) @ self.rot.T


def rotation(dim, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  return q


ISOTROPIC = Gaussian(mu=np.linspace(-0.5, 0.5, 16), s=np.full(16, 0.5), rotation=np.eye(16))
ROTATED = Gaussian(mu=[0.3, -0.2, 0.1, 0.5], s=[0.3, 0.6, 0.9, 1.2], rotation=rotation(4, 0))


def run_ode(gaussian, x, seed=0, **kwargs):
  fn = jax.jit(lambda v, r: prob_flow.prob_flow_ode(SDE, gaussian.score_fn, v, r, t0=T0,
                                                    **kwargs))
  return fn(f32(x), jax.random.key(seed))


def test_isotropic_flow_and_hutchinson_are_exact():
  """Isotropic: the Jacobian is c(t)·I, so εᵀJε = c·D = tr J for any Rademacher probe."""
  x = ISOTROPIC.sample(8, 0)
  x1, integral = run_ode(ISOTROPIC, x, steps=100, num_probes=1)
  np.testing.assert_allclose(x1, ISOTROPIC.flow_end(x, T0), atol=1e-5)
  np.testing.assert_allclose(integral, np.full(8, ISOTROPIC.div_integral(T0)), atol=1e-4)


def test_isotropic_log_likelihood():
  """log N(x_1; 0, I) + ∫div against the float64 closed form, and ≈ log p_t0(x).

  a(1)²s² + σ(1)² = 1 − 3e-5 and a(1)μ ≈ 7e-3·μ: the prior N(0, I) is p_1 up to ~1e-2
  nats here, which is the whole gap between the ODE's value and log p_t0(x).
  """
  x = ISOTROPIC.sample(8, 1)
  got = jax.jit(lambda v, r: prob_flow.log_likelihood(SDE, ISOTROPIC.score_fn, v, r))(
      f32(x), jax.random.key(0))  # t0 = sde.t_eps = 1e-5, 100 steps, one probe.
  x1 = ISOTROPIC.flow_end(x, T0)
  expected = stats.norm.logpdf(x1).sum(1) + ISOTROPIC.div_integral(T0)
  assert got.shape == (8,)
  np.testing.assert_allclose(got, expected, atol=1e-4)  # float32 RK4: ~1e-5 off.
  np.testing.assert_allclose(got, ISOTROPIC.log_prob(x, T0), atol=0.05)
  # Against the true p_1, the flow's change of variables is exact.
  np.testing.assert_allclose(got - stats.norm.logpdf(x1).sum(1) + ISOTROPIC.log_prob(x1, 1.0),
                             ISOTROPIC.log_prob(x, T0), atol=1e-3)


def test_rotated_exact_trace():
  x = ROTATED.sample(6, 2)
  x1, integral = run_ode(ROTATED, x, steps=100, exact_trace=True)
  np.testing.assert_allclose(x1, ROTATED.flow_end(x, T0), atol=1e-5)
  np.testing.assert_allclose(integral, np.full(6, ROTATED.div_integral(T0)), atol=1e-4)
  log_p1 = ROTATED.log_prob(np.asarray(x1, np.float64), 1.0)
  np.testing.assert_allclose(log_p1 + integral, ROTATED.log_prob(x, T0), atol=1e-3)


def test_rotated_hutchinson_is_unbiased_with_rademacher_variance():
  """The probe ε is fixed along the trajectory, so the estimate is εᵀMε with
  M = ∫J dt = R·diag(½ log(v(1)/v(t0)))·Rᵀ: mean tr M, variance 2·Σ_{i≠j} M_ij² (a
  Gaussian probe would add 2·Σ_i M_ii²)."""
  n = 4000
  x = np.repeat(ROTATED.sample(1, 3), n, axis=0)
  m = ROTATED.rot @ np.diag(0.5 * np.log(ROTATED.variances(1.0) / ROTATED.variances(T0))
                            ) @ ROTATED.rot.T
  off_diag = m - np.diag(np.diag(m))
  for num_probes in (1, 4):
    _, integral = run_ode(ROTATED, x, seed=num_probes, steps=50, num_probes=num_probes)
    std = math.sqrt(2 * np.sum(off_diag**2) / num_probes)
    assert abs(float(integral.mean()) - np.trace(m)) < 4 * std / math.sqrt(n)
    np.testing.assert_allclose(float(integral.std()), std, rtol=0.1)


def test_standard_normal_data_is_a_fixed_point_and_jits_on_images():
  """Data N(0, I) stays N(0, I): score −x, f̃ = 0, so log p = log N(x; 0, I) exactly."""
  x = np.random.default_rng(4).normal(size=(3, 4, 4, 1))
  score_fn = lambda v, t: -v
  fn = jax.jit(prob_flow.log_likelihood, static_argnums=(0, 1),
               static_argnames=("steps", "num_probes", "exact_trace"))
  expected = stats.norm.logpdf(x).reshape(3, -1).sum(1)
  for exact in (False, True):
    got = fn(SDE, score_fn, f32(x), jax.random.key(0), steps=4, num_probes=2,
             exact_trace=exact)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ----------------------------------------------------- dequantisation and bits/dim


def test_dequantize_stays_in_bins():
  k = np.arange(256).repeat(40)
  x = f32(k * 2 / 255 - 1)[:, None]
  x_deq = np.asarray(prob_flow.dequantize(x, jax.random.key(0), 256), np.float64)[:, 0]
  offset = (x_deq - np.asarray(x, np.float64)[:, 0]) * 127.5  # u in [0, 1).
  assert offset.min() >= 0 and offset.max() < 1 + 1e-4
  assert abs(offset.mean() - 0.5) < 4 * math.sqrt(1 / 12 / offset.size)
  assert stats.kstest(offset, "uniform").pvalue > 1e-3


def test_bits_per_dim_by_hand():
  num_dims, log_p = 3072, f32([-5000.0, 2000.0])
  # 8-bit: on the 0..255 scale, y = (x + 1)·127.5, so log p_y = log p_x − D·log 127.5
  # and bpd = −log p_y/(D ln 2) = −log p_x/(D ln 2) + log2 127.5.
  expected = -np.array([-5000.0, 2000.0]) / (num_dims * math.log(2)) + math.log2(127.5)
  got = likelihood_lib.bits_per_dim(log_p, num_dims, 256)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert float(got[0]) == pytest.approx(9.34249, abs=1e-5)  # 5000/(3072 ln 2) + 6.99435.
  # levels=0: the continuous density's bpd on [-1, 1]; a peaked density gives bpd < 0.
  continuous = likelihood_lib.bits_per_dim(log_p, num_dims, 0)
  np.testing.assert_allclose(continuous, [5000 / (3072 * math.log(2)),
                                          -2000 / (3072 * math.log(2))], rtol=1e-6)


@pytest.mark.parametrize("levels", [0, 256])
def test_prob_flow_scores(levels):
  x = f32(np.random.default_rng(5).integers(0, 256, size=(3, 4, 4, 1)) * 2 / 255 - 1)
  rng = jax.random.key(7)
  fn = jax.jit(prob_flow.prob_flow_scores, static_argnums=(0, 1),
               static_argnames=("steps", "num_probes", "levels"))
  scores = fn(SDE, lambda v, t: -v, x, rng, steps=3, num_probes=1, levels=levels)
  x_used = x if levels == 0 else prob_flow.dequantize(x, jax.random.split(rng)[0], levels)
  log_p = stats.norm.logpdf(np.asarray(x_used, np.float64)).reshape(3, -1).sum(1)
  nll = -log_p - (16 * math.log(2 / 255) if levels else 0.0)
  np.testing.assert_allclose(scores["prob_flow_nll"], nll, rtol=1e-5)
  np.testing.assert_allclose(scores["prob_flow_bpd"], nll / (16 * math.log(2)), rtol=1e-5)


def test_argument_errors():
  x, rng = jnp.zeros((2, 3)), jax.random.key(0)
  with pytest.raises(ValueError, match="levels must be 0 .* got 1"):
    likelihood_lib.bits_per_dim(jnp.zeros(2), 3, 1)
  with pytest.raises(ValueError, match="dequantize needs levels >= 2"):
    prob_flow.dequantize(x, rng, 0)
  with pytest.raises(ValueError, match="steps must be a positive int; got 0"):
    prob_flow.log_likelihood(SDE, lambda v, t: -v, x, rng, steps=0)
  with pytest.raises(ValueError, match="num_probes must be a positive int"):
    prob_flow.log_likelihood(SDE, lambda v, t: -v, x, rng, num_probes=0)
