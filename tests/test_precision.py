"""train.compute_dtype='bfloat16': bfloat16 activations, float32 parameters, losses and scores.

For the conv VAE, the MLP VAE, the U-Net score model and the DCGAN (and the WGAN-GP
critic's layer norm): what stays float32 and what runs in bfloat16 is read from
`jax.eval_shape` and the jaxprs (nothing compiled); agreement with float32 uses one
tiny model trained for 150 float32 steps on the synthetic source and scored by both
families on the same parameters and images. XLA:CPU may compute bfloat16 by upcasting;
the numbers still carry bfloat16 rounding, which is what the tolerances are about.

Tolerances (the largest difference measured on these models in brackets):
  sample scores   |s16 − s32| ≤ 3e-2·max|s32| over the test split [1.1e-2, U-Net sano_topk];
                  an elementwise relative error means nothing for scores that cross 0
                  (vae_rec of a Gaussian decoder, iwae_kl)
  AUROC           |AUROC16 − AUROC32| ≤ 0.01 per sample score and per map's pixel AUROC
                  against the lesion masks [0.003]
  maps            per-image relative L2 error ≤ 0.1 for the maps of values (rec_error,
                  sano, gan_residual) [0.042, gan_residual: |x − G(z)| after a latent
                  search]; ≤ 0.4 for the VAE's input-gradient maps and combi [0.125]:
                  they are small differences of large terms (‖x − g(μ(x))‖² of an
                  autoencoder with g∘μ ≈ id), so rounding only the *parameters* to
                  bfloat16 and computing in float32 already moves them by up to 0.16.
"""

import functools

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from jaxad import families, metrics
from jaxad import state as state_lib
from jaxad import trainer
from jaxad.data import pipeline
from jaxad.grid import axes as grid_axes
from jaxad.grid import train as grid_train
from jaxad.models import layers

SCORE = {"model.family": "score", "model.name": "unet", "model.unet.base_width": 8,
         "model.unet.channel_mult": (1,), "model.unet.num_res_blocks": 1,
         "model.unet.attention_resolutions": (8,), "model.unet.groups": 4}
# 16×16 and two blocks, so the discriminator has a norm layer (never on the first block).
DCGAN = {"model.family": "gan", "model.name": "dcgan", "model.latent_dim": 4,
         "model.widths": (4, 8), "data.image_size": 16, "data.synthetic.image_size": 16,
         "eval.latent_steps": 20}
CONFIGS = {
    "conv_vae": {"eval.num_samples": 4},
    "mlp_vae": {"model.name": "mlp_vae", "model.hidden": (32, 32), "eval.num_samples": 4},
    "unet": SCORE,
    "dcgan": DCGAN,
    "wgan_gp": {**DCGAN, "model.name": "wgan_gp", "model.gan.critic_steps": 2},
}
COMPARED = ("conv_vae", "mlp_vae", "unet", "dcgan")
F32 = jnp.dtype(jnp.float32)
# Layers that compute in float32 in a bfloat16 model: the VAE heads behind exp() and KL.
FLOAT32_LAYERS = ("mu", "logvar")
SCORE_RTOL, AUROC_TOL, VALUE_MAP_TOL, GRAD_MAP_TOL = 3e-2, 0.01, 0.1, 0.4
GRAD_MAPS = ("elbo_grad", "kl_grad", "rec_grad", "combi")


def config(name: str, dtype: str, **overrides):
  return tiny_config(**CONFIGS[name], **{"train.compute_dtype": dtype}, **overrides)


def family(name: str, dtype: str = "bfloat16"):
  return state_lib.build(config(name, dtype), 2)


def image_shape(name: str) -> tuple[int, ...]:
  return state_lib.image_shape(config(name, "float32"), 2)


def float_dtypes(tree) -> set:
  return {leaf.dtype for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


def update_fn(fam, tx):
  """One training update (params, model_state, opt_state, images, rng) → new ones."""
  update = getattr(fam, "train_update", None) or functools.partial(
      families.gradient_update, fam)
  return functools.partial(update, tx)


def abstract_state(fam, tx, shape):
  return jax.eval_shape(lambda: state_lib.initial_state(fam, tx, shape, 0))


def eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (jit, custom_jvp, loops)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from eqns(sub)


def operand_dtypes(jaxpr, primitive: str) -> list:
  """The (lhs, rhs) dtypes of every `primitive` (dot_general, conv_general_dilated)."""
  return [tuple(str(v.aval.dtype) for v in e.invars[:2]) for e in eqns(jaxpr)
          if e.primitive.name == primitive]


# -- (1) float32 state, losses and scores ------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_keeps_parameters_optimiser_state_losses_and_scores_float32(name):
  f16, tx = family(name)
  f32, _ = family(name, "float32")
  shape = image_shape(name)
  assert f16 != f32  # the dtype is part of the family (compiled functions are cached on it)
  # The same parameter pytree as float32: names, shapes and dtypes (float32).
  init = lambda fam: jax.eval_shape(lambda: fam.init(jax.random.key(0), shape))
  assert init(f16) == init(f32)
  state = abstract_state(f16, tx, shape)
  assert float_dtypes((state.params, state.model_state, state.opt_state)) == {F32}
  x = jax.ShapeDtypeStruct((4, *shape), jnp.float32)
  params, model_state, opt_state, step_metrics = jax.eval_shape(
      update_fn(f16, tx), state.params, state.model_state, state.opt_state, x,
      jax.random.key(0))
  assert float_dtypes((params, model_state, opt_state, step_metrics)) == {F32}
  assert step_metrics["loss"].shape == ()
  variables = {"params": state.params, **state.model_state}
  val = jax.eval_shape(f16.val_loss, variables, x, jax.random.key(0))
  assert (val.shape, val.dtype) == ((4,), jnp.float32)
  scores, maps = jax.eval_shape(lambda v, x: f16.score(v, x, jax.random.key(0), True),
                                variables, x)
  assert set(scores) == set(f16.sample_scores) and set(maps) == set(f16.pixel_maps)
  for k, s in scores.items():
    assert (s.shape, s.dtype) == ((4,), jnp.float32), k
  for k, m in maps.items():
    assert (m.shape, m.dtype) == ((4, *shape[:-1]), jnp.float32), k


def test_float32_is_no_dtype_at_all():
  """compute_dtype='float32' builds the modules of before the key existed (dtype None)."""
  for name in CONFIGS:
    fam, _ = family(name, "float32")
    modules = [fam.module] if hasattr(fam, "module") else [fam.generator, fam.discriminator]
    assert all(m.dtype is None for m in modules)
  assert families.compute_dtype(config("conv_vae", "bfloat16")) == jnp.bfloat16


# -- (2) bfloat16 activations -------------------------------------------------------------

LAYERS = (nn.Conv, nn.Dense, nn.ConvTranspose, layers.Conv, layers.ConvTranspose,
          nn.BatchNorm, nn.GroupNorm, nn.LayerNorm)


def module_calls(fam, variables, shape) -> dict:
  """{network: (fn, abstract args)}: each network's forward pass in training mode (batch
  statistics), returning (its output, the outputs of its conv, dense and norm layers)."""
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  capture = lambda mdl, method: isinstance(mdl, LAYERS) and method == "__call__"

  def run(module, v, *args, **kwargs):
    out, state = module.apply(v, *args, capture_intermediates=capture,
                              mutable=["intermediates", "batch_stats"], **kwargs)
    return out, state["intermediates"]

  if hasattr(fam, "generator"):
    net = lambda n: {"params": variables["params"][n],
                     **{c: s[n] for c, s in variables.items() if c != "params" and n in s}}
    z = jax.ShapeDtypeStruct((2, fam.latent_dim), jnp.float32)
    return {"generator": (lambda v, z: run(fam.generator, v, z, train=True),
                          (net("generator"), z)),
            "discriminator": (lambda v, x: run(fam.discriminator, v, x, train=True),
                              (net("discriminator"), x))}
  if hasattr(fam, "sde"):
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    return {"unet": (lambda v, x, t: run(fam.module, v, x, t, True), (variables, x, t))}
  autoencode = lambda m, x: (m.encode(x, True), m.decode(m.encode(x, True)[0], True))
  return {"vae": (lambda v, x: run(fam.module, v, x, method=autoencode), (variables, x))}


def layer_outputs(fam, variables, shape) -> dict:
  """{layer path: output dtype} of every conv, dense and norm layer, and {net/output...:
  dtype} of the networks' outputs, from eval_shape (nothing computed)."""
  dtypes = {}
  for net, (fn, args) in module_calls(fam, variables, shape).items():
    out, inter = jax.eval_shape(fn, *args)
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
      dtypes[f"{net}/output{jax.tree_util.keystr(path)}"] = leaf.dtype
    for path, leaf in jax.tree_util.tree_leaves_with_path(inter):
      dtypes[f"{net}{jax.tree_util.keystr(path)}"] = leaf.dtype
  return dtypes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_layers_compute_in_bfloat16_and_outputs_are_float32(name):
  fam, tx = family(name)
  state = abstract_state(fam, tx, image_shape(name))
  dtypes = layer_outputs(fam, {"params": state.params, **state.model_state},
                         image_shape(name))
  outputs = {k: v for k, v in dtypes.items() if "/output" in k}
  inner = {k: v for k, v in dtypes.items() if "/output" not in k}
  heads = {k for k in inner if any(f"['{h}']" in k for h in FLOAT32_LAYERS)}
  assert len(inner) - len(heads) >= 4
  assert {k: v for k, v in inner.items() if k not in heads and v != jnp.bfloat16} == {}
  assert {k: v for k, v in inner.items() if k in heads and v != jnp.float32} == {}
  assert len(heads) == (4 if name.endswith("vae") else 0)  # mu, logvar: encode twice
  assert outputs and set(outputs.values()) == {jnp.dtype(jnp.float32)}


REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "argmax", "cumsum")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_norm_statistics_softmax_losses_and_scores_reduce_in_float32(name):
  """No reduction of the forward passes (norm statistics in training mode, the attention
  softmax), the validation loss or the scores (sums over pixels and latents, logsumexp,
  top-k means, the latent search) reads bfloat16."""
  fam, tx = family(name)
  shape = image_shape(name)
  state = abstract_state(fam, tx, shape)
  variables = {"params": state.params, **state.model_state}
  x = jax.ShapeDtypeStruct((4, *shape), jnp.float32)
  jaxprs = [jax.make_jaxpr(fn)(*args).jaxpr
            for fn, args in module_calls(fam, variables, shape).values()]
  jaxprs.append(jax.make_jaxpr(lambda v, x: fam.val_loss(v, x, jax.random.key(0)))(
      variables, x).jaxpr)
  jaxprs.append(jax.make_jaxpr(lambda v, x: fam.score(v, x, jax.random.key(0), True))(
      variables, x).jaxpr)
  reduced = [str(e.invars[0].aval.dtype) for j in jaxprs for e in eqns(j)
             if e.primitive.name in REDUCTIONS]
  assert reduced and "bfloat16" not in reduced


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_training_step_and_scores_run_their_matmuls_and_convs_in_bfloat16(name):
  """Forward and backward: every convolution and matmul of the training step takes
  bfloat16 operands, but the VAE heads' (float32 by design); the eval pass as well, but
  the float32 smoothing matmuls of the pixel maps."""
  fam, tx = family(name)
  state = abstract_state(fam, tx, image_shape(name))
  x = jax.ShapeDtypeStruct((4, *image_shape(name)), jnp.float32)
  step = jax.make_jaxpr(update_fn(fam, tx))(state.params, state.model_state,
                                            state.opt_state, x, jax.random.key(0)).jaxpr
  variables = {"params": state.params, **state.model_state}
  score = jax.make_jaxpr(lambda v, x: fam.score(v, x, jax.random.key(0), True))(
      variables, x).jaxpr
  bf16 = ("bfloat16", "bfloat16")
  for jaxpr in (step, score):
    convs = operand_dtypes(jaxpr, "conv_general_dilated")
    dots = operand_dtypes(jaxpr, "dot_general")
    if name != "mlp_vae":
      assert convs and set(convs) == {bf16}
    assert dots.count(bf16) >= 2
    other = [d for d in dots if d != bf16]
    if name.endswith("vae"):
      assert set(other) <= {("float32", "float32")}  # the mu and logvar heads
    elif jaxpr is step:
      assert not other
  step_other = [d for d in operand_dtypes(step, "dot_general") if d != bf16]
  # Forward, input gradient and parameter gradient of each of the 2 heads.
  assert len(step_other) == (6 if name.endswith("vae") else 0)


# -- (3) agreement with float32 on a trained model ---------------------------------------


@functools.lru_cache(maxsize=None)
def trained(name: str, steps: int = 150):
  """A model trained for `steps` float32 steps on the synthetic normal images, both
  families, and the synthetic test split with its labels and lesion masks."""
  c32 = config(name, "float32")
  f32, tx = state_lib.build(c32, 2)
  f16, _ = family(name)
  train = pipeline.load_split(c32.data, "train")
  images = jnp.asarray(pipeline.preprocessed_images(train, c32.data, train.normal_indices))
  update = update_fn(f32, tx)

  @jax.jit
  def run():
    s = state_lib.initial_state(f32, tx, image_shape(name), 0)

    def body(i, carry):
      batch = images[jax.random.permutation(jax.random.key(i), images.shape[0])[:16]]
      return update(*carry, batch, jax.random.fold_in(jax.random.key(1), i))[:3]
    return jax.lax.fori_loop(0, steps, body, (s.params, s.model_state, s.opt_state))

  params, model_state, _ = run()
  test = pipeline.load_split(c32.data, "test")
  indices = np.arange(len(test.source))
  x = jnp.asarray(pipeline.preprocessed_images(test, c32.data, indices))
  masks = np.stack([test.source.read(i)[1][..., 0] for i in indices]) > 0
  return f32, f16, {"params": params, **model_state}, x, test.anomalous, masks


def scored(fam, variables, x):
  return jax.jit(lambda v, x: fam.score(v, x, jax.random.key(3), True))(variables, x)


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
  """max over images of ‖a − b‖/‖a‖."""
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)))


@pytest.mark.parametrize("name", COMPARED)
def test_bf16_scores_maps_and_auroc_match_float32(name):
  f32, f16, variables, x, labels, masks = trained(name)
  s32, m32 = scored(f32, variables, x)
  s16, m16 = scored(f16, variables, x)
  assert 0.0 < labels.mean() < 1.0 and masks.any()
  for k in f32.sample_scores:
    a, b = np.asarray(s32[k], np.float64), np.asarray(s16[k], np.float64)
    assert np.all(np.isfinite(b)), k
    err = np.max(np.abs(a - b)) / np.max(np.abs(a))
    assert err <= SCORE_RTOL, (k, err)
    auroc32, auroc16 = metrics.auroc(labels, a), metrics.auroc(labels, b)
    assert abs(auroc32 - auroc16) <= AUROC_TOL, (k, auroc32, auroc16)
  for k in f32.pixel_maps:
    a, b = np.asarray(m32[k], np.float64), np.asarray(m16[k], np.float64)
    err = relative_l2(a, b)
    assert err <= (GRAD_MAP_TOL if k in GRAD_MAPS else VALUE_MAP_TOL), (k, err)
    pixel32 = metrics.auroc(masks.ravel(), a.ravel())
    pixel16 = metrics.auroc(masks.ravel(), b.ravel())
    assert abs(pixel32 - pixel16) <= AUROC_TOL, (k, pixel32, pixel16)


def test_trained_models_separate_the_classes():
  """The comparison above is not between two coin flips: the float32-trained models'
  headline scores already detect the synthetic lesions."""
  headline = {"conv_vae": "vae", "mlp_vae": "vae", "unet": "dsm", "dcgan": "gan"}
  for name, score in headline.items():
    f32, _, variables, x, labels, _ = trained(name)
    s32, _ = scored(f32, variables, x)
    assert metrics.auroc(labels, np.asarray(s32[score])) >= 0.8, name


def test_bf16_training_run_checkpoints_float32_and_restores(tmp_path):
  """The trainer end to end with bfloat16: finite losses, one compilation, a float32
  checkpoint that restores into a bfloat16 family."""
  cfg = config("conv_vae", "bfloat16", **{"train.num_steps": 12})
  state, summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert int(state.step) == 12 and summary["train_step_compilations"] == 1
  assert np.isfinite(summary["train_neg_elbo"])
  assert float_dtypes((state.params, state.model_state, state.opt_state)) == {F32}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  fam, variables, step = state_lib.restore_variables(cfg, str(tmp_path), 2, mesh)
  assert step == 12 and fam.module.dtype == jnp.bfloat16
  assert float_dtypes(variables) == {F32}


def test_grid_groups_build_their_models_in_the_compute_dtype():
  """The grid builds its members' model itself (grid.train.group_setup, also used by the
  grid's evaluation): it computes in the group config's train.compute_dtype."""
  for dtype, expected in (("float32", None), ("bfloat16", jnp.bfloat16)):
    cfg = grid_axes.with_grid(config("conv_vae", dtype))
    cfg.grid.axes = ml_collections.ConfigDict({"seed": (0, 1)})
    (group,) = grid_axes.plan(cfg)
    model, _, _ = grid_train.group_setup(group, image_shape("conv_vae"))
    assert model.dtype == expected
