"""The likelihood ratio's background model (Ren et al.): its perturbation, its config,
training it with the model and scoring both in one eval pass."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxad import background, evaluation, trainer
from jaxad import config as config_lib
from jaxad.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("bit_depth", [8, 4])
def test_mutation_replaces_the_rate_of_values_with_uniform_levels(bit_depth):
  top = 2 ** bit_depth - 1
  images = jnp.full((64, 32, 32, 1), 0.123)  # off the level grid: changed values show
  out = np.asarray(background.mutate(images, jax.random.key(0), 0.2, bit_depth))
  changed = out != np.float32(0.123)
  n = changed.size
  assert abs(changed.sum() - 0.2 * n) < 5 * math.sqrt(0.2 * 0.8 * n)  # binomial, 5σ
  levels = np.rint((out[changed] + 1) * top / 2).astype(int)
  np.testing.assert_allclose(levels * (2 / top) - 1, out[changed], atol=1e-6)
  counts = np.bincount(levels, minlength=top + 1)
  assert len(counts) == top + 1
  assert stats.chisquare(counts).pvalue > 1e-4  # uniform over every level
  same = background.mutate(images, jax.random.key(0), 0.0, bit_depth)
  np.testing.assert_array_equal(same, images)


def test_background_config_is_smaller_mutated_and_has_no_background(make_config):
  config = make_config(**{"background.enabled": True, "model.widths": (8, 16),
                          "model.hidden": (400, 100), "background.width_factor": 0.5,
                          "background.mutation_rate": 0.3})
  bg = background.background_config(config)
  assert bg.model.widths == (4, 8) and bg.model.hidden == (200, 50)
  assert bg.train.mutation_rate == 0.3 and not bg.background.enabled
  assert bg.data.source == config.data.source and config.train.mutation_rate == 0.0
  config.background.source, config.background.name = "digits", ""
  generic = background.background_config(config)
  assert generic.data.source == "digits" and tuple(generic.data.normal_classes) == ("*",)
  assert generic.data.val_split == "" and generic.data.val_fraction == 0.0
  config_lib.validate(generic)


def test_background_settings_are_checked(make_config):
  for overrides, key in (({"background.width_factor": 0.0}, "width_factor"),
                         ({"background.mutation_rate": 1.0}, "mutation_rate"),
                         ({"background.source": "npz"}, "background.path"),
                         ({"model.family": "gan", "model.name": "dcgan"}, "GAN")):
    config = make_config(**{"background.enabled": True, **overrides})
    with pytest.raises(ConfigError, match=key):
      config_lib.validate(config)


@pytest.fixture(scope="module")
def with_background(tmp_path_factory):
  from conftest import tiny_config
  config = tiny_config(**{"background.enabled": True, "eval.bootstrap": 0,
                          "eval.pixel_maps": False})
  workdir = str(tmp_path_factory.mktemp("bg"))
  _, summary = trainer.train_and_evaluate(config, workdir)
  return workdir, config, summary


def test_train_binary_trains_the_background_model_after_the_model(with_background):
  workdir, config, summary = with_background
  assert summary["step"] == summary["background_step"] == config.train.num_steps
  saved = json.load(open(os.path.join(workdir, "background", "config.json")))
  assert saved["model"]["widths"] == [4] and saved["train"]["mutation_rate"] == 0.2
  assert not saved["background"]["enabled"]
  # Running it again resumes both: nothing is trained twice.
  _, again = trainer.train_and_evaluate(config, workdir)
  assert again["step"] == again["background_step"] == config.train.num_steps


def test_llr_is_the_bpd_difference_of_the_two_models_on_the_same_pass(with_background):
  workdir, config, _ = with_background
  result = evaluation.evaluate(workdir, config=config)
  assert {"vae_llr", "iwae_llr"} <= set(result["sample"])
  assert result["step"] == 12 and result["background"] == {
      "step": 12, "num_steps": 12, "stopped_early": False}
  main = np.load(os.path.join(workdir, "eval", "test", "scores.npz"))
  # The background workdir evaluated on its own: its scores with the same keys.
  bg_config = background.background_config(config)
  bg_config.eval.complexity = False
  evaluation.evaluate(os.path.join(workdir, "background"), config=bg_config)
  bg = np.load(os.path.join(workdir, "background", "eval", "test", "scores.npz"))
  np.testing.assert_array_equal(main["index"], bg["index"])
  num_dims = 8 * 8
  for k in ("vae", "iwae"):  # nats → bits per dim; the bin-width offsets cancel
    want = (main[k] - bg[k]) / (num_dims * math.log(2))
    np.testing.assert_allclose(main[f"{k}_llr"], want, rtol=1e-6, atol=1e-6)


def test_missing_background_checkpoint_is_a_clear_error(make_config, tmp_path):
  config = make_config(**{"train.num_steps": 4, "eval.bootstrap": 0})
  trainer.train_and_evaluate(config, str(tmp_path))
  config.background.enabled = True
  with pytest.raises(CheckpointError, match="background.*python -m jaxad.train"):
    evaluation.evaluate(str(tmp_path), config=config)


def test_background_on_a_generic_dataset_sees_every_class(make_config, tmp_path):
  config = make_config(**{"background.enabled": True, "background.source": "digits",
                          "background.mutation_rate": 0.0, "train.num_steps": 4})
  _, summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary["background_step"] == 4
  saved = json.load(open(os.path.join(str(tmp_path), "background", "config.json")))
  assert saved["data"]["source"] == "digits" and saved["data"]["normal_classes"] == ["*"]
  log = open(os.path.join(str(tmp_path), "background", "train.log")).read()
  assert "on digits" in log  # trained on the digits' train split, every class of it


def test_half_trained_background_model_is_a_clear_error(make_config, tmp_path):
  # The background's step was dropped: its *_llr scores could come from a model whose
  # training was killed half-way. Durations in epochs: its own data's steps per epoch.
  from jaxad.data import pipeline
  config = make_config(**{"train.num_steps": 0, "train.num_epochs": 2,
                          "train.checkpoint_every_steps": 1, "eval.bootstrap": 0,
                          "eval.pixel_maps": False})
  workdir = str(tmp_path)
  trainer.train_and_evaluate(config, workdir)  # the model alone
  config.background.enabled = True
  bg_config = background.background_config(config)
  num_steps = 2 * pipeline.steps_per_epoch(pipeline.load_split(bg_config.data, "train"),
                                           bg_config.train.batch_size)
  assert num_steps > 1
  trainer.train_and_evaluate(bg_config, os.path.join(workdir, "background"),
                             stop_at_step=1)  # killed after its first checkpoint
  with pytest.raises(CheckpointError, match=(
      r"background model's latest checkpoint in .*background/checkpoints is at step 1 of "
      rf"the {num_steps} its config trains for .*: run python -m jaxad.train again with "
      r"the same --config and --workdir=.* to finish the background model.*"
      r"--config.background.enabled=False")):
    evaluation.evaluate(workdir, config=config)
  assert not os.path.exists(os.path.join(workdir, "eval", "test", "scores.csv"))
  trainer.train_background(config, workdir)  # finishes it
  result = evaluation.evaluate(workdir, config=config)
  assert result["background"] == {"step": num_steps, "num_steps": num_steps,
                                  "stopped_early": False}
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))["test"]
  assert saved["background"]["step"] == num_steps and saved["step"] == num_steps
