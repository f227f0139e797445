"""The model cases: the work of the same-named cases of ../shared/bench/peer_torch.py.

Each case runs on a fixed float32 batch of B = 32 images (uniform in [-1, 1]), with its
random draws made inside the jitted function. For the VAEs (conv128, conv64, mlp28):

  train_step      train mode: encode, 1 sample, decode, mean_b(train_rec + beta·KL),
                  gradients w.r.t. the parameters, Adam(1e-4) update, new batch stats
  score_elbo      eval: encode, 1 sample, decode; per-image rec, KL, rec + KL
  score_iwae_L15  eval: encode once, one decoder call on 15·B latents, the six
                  vae/iwae scores of `jaxad.scores.sample_scores` (the reference's
                  score_iwae_L15_batched)
  pixel_grads     eval: `jaxad.scores.pixel_maps` (rec error, ELBO/KL/rec input
                  gradients, combi): one forward, two reverse passes to x (KL, rec;
                  the ELBO gradient is their sum) and a decode of mu for rec_error,
                  about 3E + 3D where the reference's three reverse passes do 4E + 3D

and for score64 (the 64×64×3 score U-Net, `jaxad.models.unet.score_unet_64`, continuous
VP-SDE β 0.1..20):

  train_step      t ~ U(1e-5, 1), x_t = a(t)x + σ(t)ε, σ²-weighted DSM loss (mean over
                  elements of (ε_θ(x_t, 999t) − ε)²), gradients, Adam(1e-4) update
  score_map       eval: one forward at t = 1e-3 on the clean batch, score = −ε_θ/σ(t),
                  map = mean over channels of |score| (SANO's map before smoothing)

and for gan (configs/mnist_gan.py's DCGAN, 28×28, latent 100, widths 64/128; the cases
of ../shared/bench/peer_torch_gan.py, whose ids are dcgan28/...):

  train_step      batch 64: one discriminator update on real + G(z) and one generator
                  update on fresh z (jaxad.families.gan's train_update), Adam(2e-4, β1 0.5)
  latent_search   batch 32: 100 SGD-momentum steps of AnoGAN's search on z, every image
                  at once; the gan scores and the residual map
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxad import compile_options, families
from jaxad.bench.timing import Runner
from jaxad.families import score as score_family
from jaxad.families import vae as vae_family
from jaxad.models import unet as unet_models
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.objectives import sde as sde_lib
from jaxad.objectives import vae as vae_objectives
from jaxad.scores import pixel as pixel_scores
from jaxad.scores import sample as sample_scores

BATCH = 32
IWAE_L = 15
LR = 1e-4
VAE_CASES = ("train_step", "score_elbo", f"score_iwae_L{IWAE_L}", "pixel_grads")
SCORE_CASES = ("train_step", "score_map")
GAN_STEPS = 100  # latent-search steps per image (the thesis's MNIST protocol)
MODEL_CASES = {"conv128": VAE_CASES, "conv64": VAE_CASES, "mlp28": VAE_CASES,
               "score64": SCORE_CASES, "gan": ("train_step", "latent_search")}
MODELS = tuple(MODEL_CASES)
CASES = tuple(dict.fromkeys(c for cases in MODEL_CASES.values() for c in cases))
CASE_IDS = tuple(f"{m}/{c}" for m, cases in MODEL_CASES.items() for c in cases)
# Cases whose batch is not BATCH: the DCGAN reference trains on batches of 64.
CASE_BATCH = {"gan/train_step": 64}
GAN_LR, GAN_B1 = 2e-4, 0.5  # configs/mnist_gan.py's Adam, as the reference
DESCRIPTIONS = {
    "train_step": "train mode; 1 reparameterised sample; loss=mean_b(train_rec+beta*KL); "
                  "grads w.r.t. params; Adam(lr=1e-4) update; batch stats updated",
    "score_elbo": "eval; encode, 1 sample, decode; per-image rec, KL, rec+KL",
    f"score_iwae_L{IWAE_L}": f"eval; encode once; one decode of {IWAE_L}*B latents; "
                             "vae, vae_kl, vae_rec, iwae, iwae_kl, iwae_rec",
    "pixel_grads": "eval; jaxad.scores.pixel_maps: one forward, KL and rec pullbacks to x, "
                   "decode(mu) for rec_error; rec_error, elbo/kl/rec grad maps, combi",
    "score64/train_step": "t~U(1e-5,1), x_t=a(t)x+s(t)eps, loss=mean((net(x_t,999t)-eps)^2) "
                          "(DSM, lambda=s^2); grads w.r.t. params; Adam(lr=1e-4) update",
    "score64/score_map": "eval; one forward at t=1e-3 on the clean batch; score=-net/s(t); "
                         "map=mean_c|score|",
    "gan/train_step": "batch 64; one discriminator update (real + G(z) with fresh z, "
                      "BatchNorm in train mode) and one generator update (fresh z, "
                      "non-saturating), Adam(2e-4, b1=0.5) each: jaxad.families.gan's "
                      "train_update",
    "gan/latent_search": f"eval; AnoGAN latent search, {GAN_STEPS} SGD-momentum steps on z "
                         "for every image of the batch at once (MNIST DCGAN 28x28, latent "
                         "100); gan, gan_residual, gan_feature and the residual map",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A benchmarked VAE: its constructor, input shape (H, W, C) and likelihood."""

  build: Callable[[], nn.Module]
  image_shape: tuple[int, ...]
  likelihood: likelihood_lib.Likelihood


# The reference's continuous VP-SDE for score64 (beta 0.1..20, t_eps 1e-5, label 999·t).
SCORE64_SDE = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, num_scales=1000, t_eps=1e-5)
SCORE64_MAP_T = 1e-3


def _mnist_gan():
  """configs/mnist_gan.py's DCGAN (widths 64, 128; latent 100) as a GAN family object."""
  from jaxad.families import gan as gan_family  # pylint: disable=import-outside-toplevel
  from jaxad.models import gan as gan_models  # pylint: disable=import-outside-toplevel
  widths = (64, 128)
  return gan_family.GAN(generator=gan_models.Generator((28, 28, 1), 100, widths),
                        discriminator=gan_models.Discriminator((28, 28, 1), widths),
                        latent_steps=GAN_STEPS, latent_lr=1e-3)


SPECS = {
    "conv128": ModelSpec(vae_models.conv_vae_128, (128, 128, 3),
                         likelihood_lib.Likelihood("gaussian", 0.01)),
    "conv64": ModelSpec(vae_models.conv_vae_64, (64, 64, 1),
                        likelihood_lib.Likelihood("gaussian", 1.0)),
    "mlp28": ModelSpec(vae_models.mlp_vae_28, (28, 28, 1),
                       likelihood_lib.Likelihood("bernoulli", 1.0)),
    "score64": ModelSpec(unet_models.score_unet_64, (64, 64, 3), None),
    "gan": ModelSpec(_mnist_gan, (28, 28, 1), None),
}


# --------------------------------------------------------------------------
# Case selection
# --------------------------------------------------------------------------
def _matches(selector: str, case_id: str) -> bool:
  model, case = case_id.split("/")
  return selector in (model, case_id) or case.startswith(selector) or \
      case_id.startswith(selector)


def select_cases(selectors: Sequence[str]) -> list[str]:
  """The case ids picked by the selectors, in table order.

  A selector is a model (`conv64`), a case or case prefix (`train_step`, `score_iwae`),
  or `model/case`; items may be comma lists. No selectors picks every case. An
  unknown selector raises ValueError naming the valid ones.
  """
  sel = [s.strip() for item in selectors for s in item.split(",") if s.strip()]
  unknown = [s for s in sel if not any(_matches(s, c) for c in CASE_IDS)]
  if unknown:
    raise ValueError(
        f"unknown --case {unknown}; choose models {list(MODELS)}, cases {list(CASES)} "
        f"or model/case ids {list(CASE_IDS)} (comma lists and case prefixes work)")
  return [c for c in CASE_IDS if not sel or any(_matches(s, c) for s in sel)]


def case_batch(case_id: str, batch: int = BATCH) -> int:
  """The batch a case runs on: `batch`, except where the reference's case differs."""
  return CASE_BATCH.get(case_id, batch) if batch == BATCH else batch


# --------------------------------------------------------------------------
# Cases: each is a jitted function and its arguments
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
  """A model with initialised variables and its fixed input batch."""

  model: nn.Module
  variables: dict
  x: jax.Array
  likelihood: likelihood_lib.Likelihood | None


def make_setup(name: str, seed: int = 0, batch: int = BATCH) -> Setup:
  """The model `name`, its variables (jitted init) and a uniform [-1, 1] batch."""
  spec = SPECS[name]
  model = spec.build()
  x = np.random.default_rng(seed).uniform(-1, 1, (batch, *spec.image_shape))
  x = jnp.asarray(x, jnp.float32)
  if name == "gan":  # a family object: init(rng, shape)
    variables = jax.jit(model.init, static_argnums=1)(jax.random.key(seed), spec.image_shape)
    return Setup(model, variables, x, None)
  init = jax.jit(functools.partial(model.init, train=False))
  extra = () if spec.likelihood else (jnp.zeros((1,), jnp.float32),)  # the time label
  variables = flax.core.unfreeze(init(jax.random.key(seed), x[:1], *extra))
  return Setup(model, variables, x, spec.likelihood)


def train_runner(s: Setup, key: jax.Array) -> Runner:
  """train_step: one step of the trainer's update with the family's loss and Adam: the
  VAE's or score64's σ²-weighted DSM through `families.gradient_update` with Adam(LR),
  or the GAN family's own `train_update` (one D and one G update) with Adam(2e-4, 0.5)."""
  if isinstance(s.model, nn.Module):
    family = (vae_family.VAE(s.model, s.likelihood) if s.likelihood is not None
              else score_family.ScoreModel(s.model, SCORE64_SDE))
    tx = optax.adam(LR)
    update = functools.partial(families.gradient_update, family)
    opt_state = tx.init(s.variables["params"])
  else:  # the GAN family object
    tx = optax.adam(GAN_LR, b1=GAN_B1)
    update = s.model.train_update
    opt_state = s.model.init_opt_state(tx, s.variables["params"])
  params = s.variables["params"]
  model_state = {k: v for k, v in s.variables.items() if k != "params"}
  # Copies: the step donates its state, and the eval cases share s.variables.
  state = jax.tree.map(jnp.copy, (params, model_state, opt_state, jnp.zeros((), jnp.int32)))

  def step(state, x, key):
    params, model_state, opt_state, count = state
    params, model_state, opt_state, metrics = update(
        tx, params, model_state, opt_state, x, jax.random.fold_in(key, count))
    return (params, model_state, opt_state, count + 1), metrics["loss"]  # jit drops the rest

  return Runner(compile_options.jit(step, donate_argnums=0), (state, s.x, key), carry=True)


def _score_map(model, variables, x):
  """score64/score_map: the SANO map before smoothing, mean_c |s_θ(x, t = 1e-3)|."""
  apply = lambda x_t, label: model.apply(variables, x_t, label, train=False)
  t = jnp.full((x.shape[0],), SCORE64_MAP_T, jnp.float32)
  score = sde_lib.make_score_fn(SCORE64_SDE, apply)(x, t)
  return jnp.mean(jnp.abs(score), axis=-1)


def _score_elbo(model, likelihood, variables, x, key):
  terms, _ = vae_objectives.vae_terms(model, variables, x, key, likelihood, train=False)
  return terms.rec, terms.kl, terms.neg_elbo


def _score_iwae(model, likelihood, variables, x, key):
  return sample_scores.sample_scores(model, variables, x, key, likelihood, IWAE_L)


def _pixel_grads(model, likelihood, variables, x, key):
  return pixel_scores.pixel_maps(model, variables, x, key, likelihood)


EVAL_CASES = {"score_elbo": _score_elbo, f"score_iwae_L{IWAE_L}": _score_iwae,
              "pixel_grads": _pixel_grads}


def make_runner(case: str, s: Setup, seed: int = 0) -> Runner:
  """The runner of `case` (a name in CASES) for the model and batch of `s`."""
  key = jax.random.key(seed + 1)
  # Every case compiles as jaxad's binaries do (jaxad.compile_options).
  if case == "latent_search":
    fn = compile_options.jit(lambda v, x, k: s.model.score(v, x, k, with_maps=True))
    return Runner(fn, (s.variables, s.x, key))
  if case == "train_step":
    return train_runner(s, key)
  if case == "score_map":
    return Runner(compile_options.jit(functools.partial(_score_map, s.model)),
                  (s.variables, s.x))
  fn = compile_options.jit(functools.partial(EVAL_CASES[case], s.model, s.likelihood))
  return Runner(fn, (s.variables, s.x, key))
