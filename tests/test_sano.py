"""SANO end to end: score-model training (EMA, warm-up, clipping), maps, thresholds, eval."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxad import checkpoint, config as config_lib, evaluation, families, parallel, trainer
from jaxad import state as state_lib
from jaxad.data import pipeline
from jaxad.errors import CheckpointError, ConfigError
from jaxad.families import score as score_family

SCORE = {"model.family": "score", "model.name": "unet", "model.unet.base_width": 16,
         "model.unet.channel_mult": (1, 2), "model.unet.num_res_blocks": 1,
         "model.unet.attention_resolutions": (4,), "model.unet.groups": 8,
         "model.sde.discrete": True}


def score_config(**overrides):
  from conftest import tiny_config
  return tiny_config(**{**SCORE, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A small U-Net trained on 16×16 synthetic images, evaluated on lesioned test images."""
  config = score_config(**{
      "data.image_size": 16, "data.synthetic.image_size": 16,
      "data.synthetic.num_examples": 96, "model.unet.attention_resolutions": (8,),
      "train.num_steps": 80, "train.learning_rate": 1e-3, "train.ema_rate": 0.99,
      "train.grad_clip": 1.0, "train.warmup_steps": 20, "train.log_every_steps": 40,
      "train.checkpoint_every_steps": 80, "eval.batch_size": 48, "eval.bootstrap": 10})
  workdir = str(tmp_path_factory.mktemp("sano"))
  trainer.train_and_evaluate(config, workdir)
  return workdir, config, evaluation.evaluate(workdir, config=config)


def test_sano_localises_and_detects_lesions(trained):
  # An untrained U-Net scores about 0.87 pixel AUROC and 0.15 AUPRC here (bright
  # lesions correlate with |score| by chance); training lifts both far above that.
  _, _, result = trained
  assert result["family"] == "score"
  pixel = result["pixel"]["sano"]
  assert pixel["auroc"] > 0.95 and pixel["auprc"] > 0.5, pixel
  assert set(pixel["thresholds"]) == {"calibrated", "pr_operating_point", "n_sigma"}
  assert pixel["thresholds"]["n_sigma"]["dice"] > 0.1
  ci = pixel["bootstrap"]  # images resampled within lesion / no-lesion strata
  assert ci["threshold"] == "n_sigma" and set(ci) >= {"auroc", "auprc", "dice", "iou"}
  assert ci["auroc"]["low"] <= ci["auroc"]["estimate"] <= ci["auroc"]["high"]
  assert set(result["sample"]) == set(score_family.SAMPLE_SCORES)
  assert result["sample"]["sano_topk"]["all"]["auroc"] > 0.9
  assert "sano_topk" in result["bootstrap"]


def test_eval_uses_the_ema_and_thresholds_from_healthy_maps_alone(trained):
  workdir, config, result = trained
  mesh = parallel.make_mesh(jax.devices()[:1])
  family, variables, _ = state_lib.restore_variables(config, workdir, 2, mesh)
  ckpt = checkpoint.Checkpoints(workdir)
  state = ckpt.restore(state_lib.create_state(family, state_lib.make_optimizer(config),
                                            (16, 16, 1), config.seed, mesh, ema=True))
  ckpt.close()
  for used, ema in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(used, ema)
  assert any(not np.allclose(e, p) for e, p in zip(jax.tree.leaves(state.ema_params),
                                                   jax.tree.leaves(state.params)))
  # The N-σ threshold: mean + 3·std of the maps of the (healthy-only) validation split.
  val = pipeline.load_split(config.data, "val")
  assert val.anomalous.sum() == 0
  sano_map = jax.jit(family.sano_map)
  maps = [np.asarray(sano_map(variables, b["image"]))[b["valid"] > 0]
          for b in pipeline.eval_batches(val, config.data, global_batch=48, normal_only=True)]
  maps = np.concatenate(maps).astype(np.float64)
  stats = result["healthy_map_stats"]["sano"]
  assert stats["num_pixels"] == maps.size
  np.testing.assert_allclose(stats["mean"], maps.mean(), rtol=1e-4)
  np.testing.assert_allclose(stats["std"], maps.std(), rtol=1e-3)
  threshold = result["pixel"]["sano"]["thresholds"]["n_sigma"]["threshold"]
  np.testing.assert_allclose(threshold, maps.mean() + 3.0 * maps.std(), rtol=1e-3)


def test_ema_follows_its_recurrence():
  # The config and mesh of the resume test below: the compiled step is shared (cache).
  config = score_config(**{"train.ema_rate": 0.9, "data.val_split": ""})
  mesh = parallel.make_mesh()
  family, tx = state_lib.build(config, 2)
  state = state_lib.create_state(family, tx, (8, 8, 1), 0, mesh, ema=True)
  step = trainer.make_train_step(family, tx, 0, mesh, ema_rate=0.9)
  images = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
  expected = jax.tree.map(np.asarray, state.params)
  for _ in range(3):
    state, _ = step(state, images)
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * np.asarray(p), expected, state.params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_warmup_scales_the_first_updates_and_clipping_bounds_the_gradient():
  config = score_config(**{"train.learning_rate": 0.1, "train.warmup_steps": 4,
                           "train.grad_clip": 0.5})
  tx = state_lib.make_optimizer(config)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  grads = {"w": jnp.array([3.0, -4.0, 0.0])}  # norm 5, clipped to 0.5
  updates, state = tx.update(grads, state, params)
  # Adam's first step moves each coordinate by lr·g/|g|; warm-up gives lr/4 at count 0.
  np.testing.assert_allclose(updates["w"], [-0.025, 0.025, 0.0], atol=1e-6)
  clip = optax.clip_by_global_norm(0.5)
  clipped, _ = clip.update(grads, clip.init(params))
  np.testing.assert_allclose(optax.tree.norm(clipped), 0.5, rtol=1e-6)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_training_resumes_bit_for_bit_with_ema(tmp_path):
  config = score_config(**{"train.num_steps": 8, "train.checkpoint_every_steps": 5,
                           "train.ema_rate": 0.9, "data.val_split": ""})
  full, _ = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  trainer.train_and_evaluate(config, str(tmp_path / "part"), stop_at_step=6)
  resumed, summary = trainer.train_and_evaluate(config, str(tmp_path / "part"))
  assert summary["train_step_compilations"] == 1
  for a, b in zip(jax.tree.leaves((full.params, full.ema_params)),
                  jax.tree.leaves((resumed.params, resumed.ema_params))):
    np.testing.assert_array_equal(a, b)
  # Turning the EMA off changes the state's structure: refused with the key named.
  with pytest.raises(CheckpointError, match="train.ema_rate"):
    trainer.train_and_evaluate(score_config(**{"train.num_steps": 10, "data.val_split": ""}),
                               str(tmp_path / "part"))


def test_prob_flow_scores_through_the_family():
  config = score_config(**{"eval.prob_flow.enabled": True, "eval.prob_flow.steps": 3})
  family = families.build(config, (8, 8, 1))
  assert family.sample_scores[-2:] == ("prob_flow_nll", "prob_flow_bpd")
  variables = family.init(jax.random.key(0), (8, 8, 1))
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 1)) / 127.5 - 1,
                       jnp.float32)
  scores, maps = jax.jit(functools.partial(family.score, with_maps=True))(
      variables, images, jax.random.key(1))
  assert set(scores) == set(family.sample_scores) and set(maps) == {"sano"}
  assert maps["sano"].shape == (4, 8, 8)
  nll, bpd = np.asarray(scores["prob_flow_nll"]), np.asarray(scores["prob_flow_bpd"])
  assert np.all(np.isfinite(nll))
  np.testing.assert_allclose(bpd, nll / (64 * np.log(2)), rtol=1e-5)


def test_score_config_errors(make_config):
  with pytest.raises(ConfigError, match="model.name"):
    config_lib.validate(score_config(**{"model.name": "conv_vae"}))
  with pytest.raises(ConfigError, match="eval.sano.t"):
    config_lib.validate(score_config(**{"eval.sano.t": 0.0}))
  with pytest.raises(ConfigError, match="eval.prob_flow.levels"):
    config_lib.validate(score_config(**{"eval.prob_flow.enabled": True,
                                        "eval.prob_flow.levels": 1}))
  with pytest.raises(ConfigError, match="2D"):
    families.build(score_config(), (8, 8, 8, 1))
  with pytest.raises(ConfigError, match="model.unet.channel_mult"):
    families.build(score_config(**{"model.unet.channel_mult": (1, 2, 2, 2)}), (12, 12, 1))
