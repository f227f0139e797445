"""Every experiment config loads, validates, builds its model, and names its paper."""

import functools
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxad import config as config_lib
from jaxad import evaluation, files
from jaxad import state as state_lib
from jaxad import trainer
from jaxad.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates_and_builds(path):
  module = load(path)
  assert module.__doc__ and "python -m jaxad.train" in module.__doc__
  config = module.get_config()
  if config.data.source in ("folder", "nifti", "csv", "npz"):
    config.data.path = "/data/placeholder"
  config_lib.validate(config)
  ndim = 3 if config.data.source == "nifti" or config.data.ndim == 3 else 2
  family, _ = state_lib.build(config, spatial_ndim=ndim)
  shape = state_lib.image_shape(config, ndim)
  variables = jax.eval_shape(functools.partial(family.init, shape=shape), jax.random.key(0))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])) > 0


def test_paper_models_have_the_reference_parameter_counts():
  def count(name):
    config = load(os.path.join(ROOT, "configs", name)).get_config()
    family, _ = state_lib.build(config, 2)
    v = jax.eval_shape(functools.partial(family.init, shape=state_lib.image_shape(config, 2)),
                       jax.random.key(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
  assert count("isic_vae.py") == 12_951_003  # 128×128×3, latent 300 (Lu & Xu)
  assert count("brain_vae.py") == 3_753_697  # 64×64×1, 16-32-64-256, latent 256
  assert count("fashion_mnist_mlp.py") == 1_294_424  # 3×400, 20 latents (Zimmerer)


def test_locked_config_rejects_unknown_keys():
  config = load(CONFIGS[0]).get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.model.latnet_dim = 3


@pytest.mark.parametrize("key,value,message", [
    ("data.channels", 2, "data.channels"),
    ("model.likelihood", "laplace", "model.likelihood"),
    ("train.plateau_factor", 1.5, "plateau_factor"),
    ("data.intensity_range", (5, 1), "intensity_range"),
    ("data.val_anomaly_fraction", 1.0, "val_anomaly_fraction"),
    ("data.val_anomaly_fraction", -0.1, "val_anomaly_fraction"),
])
def test_bad_values_name_the_key(make_config, key, value, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(make_config(**{key: value}))


def test_mnist_config_trains_on_an_npz_file(tmp_path):
  """`--config.data.source=npz --config.data.path=FILE.npz` on the MedMNIST layout."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in [("train", 120), ("val", 20), ("test", 30)]:
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 10, (n, 1))
  np.savez(tmp_path / "mnist_like.npz", **arrays)
  config = load(os.path.join(ROOT, "configs", "mnist_vae.py")).get_config()
  config.data.source = "npz"
  config.data.path = str(tmp_path / "mnist_like.npz")
  config.train.batch_size = 16
  config.train.num_steps = 3
  config.model.widths = (8, 8, 8)
  config.train.progress_bar = False
  state, summary = trainer.train_and_evaluate(config, str(tmp_path / "work"))
  assert int(state.step) == 3 and np.isfinite(summary["train_loss"])


def test_val_anomaly_fraction_needs_a_validation_split(make_config):
  config = make_config(**{"data.val_anomaly_fraction": 0.2, "data.val_split": ""})
  with pytest.raises(ConfigError, match="val_anomaly_fraction=0.2.*data.val_fraction > 0"):
    config_lib.validate(config)
  config.data.val_fraction = 0.1
  config_lib.validate(config)


def test_honest_protocol_configs():
  mnist = load(os.path.join(ROOT, "configs", "mnist_vae.py")).get_config()
  assert (mnist.data.source, mnist.data.path, mnist.data.val_split) == ("npz", "mnist.npz", "val")
  assert "python -m jaxad.data.prepare --dataset=mnist" in load(
      os.path.join(ROOT, "configs", "mnist_vae.py")).__doc__
  chest = load(os.path.join(ROOT, "configs", "chest_xray_vae.py"))
  c = chest.get_config()
  assert (c.data.source, c.data.image_size, c.data.channels) == ("npz", 64, 1)
  assert "--flag=pneumoniamnist --size=64" in chest.__doc__
  assert "--config.data.source=folder" in chest.__doc__


def _pneumonia_npz(path, rng):
  """A PneumoniaMNIST-like npz at 64×64 as `jaxad.data.prepare` writes it (uint8 images
  N×64×64, uint8 labels N×1, class_names), its val part without pneumonia here."""
  arrays = {}
  for split, normal, sick in (("train", 40, 24), ("val", 8, 0), ("test", 8, 8)):
    labels = np.array([0] * normal + [1] * sick, np.uint8).reshape(-1, 1)
    base = rng.integers(60, 120, (len(labels), 64, 64))
    base[labels[:, 0] == 1, 20:44, 20:44] += 100  # "opacities"
    arrays[f"{split}_images"] = base.astype(np.uint8)
    arrays[f"{split}_labels"] = labels
  np.savez(path, class_names=np.array(["normal", "pneumonia"]), **arrays)


def test_chest_xray_config_trains_and_evaluates_on_a_pneumoniamnist_npz(tmp_path):
  """configs/chest_xray_vae.py end to end: a few steps, then the test split scored with
  thresholds chosen on validation anomalies moved out of test (val_anomaly_fraction)."""
  _pneumonia_npz(tmp_path / "pneumoniamnist_64.npz", np.random.default_rng(0))
  config = load(os.path.join(ROOT, "configs", "chest_xray_vae.py")).get_config()
  config.data.path = str(tmp_path / "pneumoniamnist_64.npz")
  config.data.val_anomaly_fraction = 0.5
  config.model.widths = (4, 4, 4, 4)
  config.model.latent_dim = 4
  config.train.batch_size = 16
  config.train.num_steps = 3
  config.train.progress_bar = False
  config.eval.update(dict(complexity=False, bootstrap=0, num_samples=2, batch_size=16,
                          num_examples=2))
  workdir = str(tmp_path / "work")
  state, summary = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == 3 and np.isfinite(summary["train_loss"])
  result = evaluation.evaluate(workdir, config=config)
  # 4 of the 8 test pneumonias moved: validation has 8 normal + 4 pneumonia images,
  # the test split keeps 8 normal + 4 pneumonia, and the score is ranked on validation.
  assert (result["num_images"], result["num_anomalous"]) == (12, 4)
  assert result["ranking"]["by"] == "validation AUROC"
  thresholds = files.read_json(os.path.join(workdir, "eval", "thresholds.json"))
  assert thresholds["chosen_on"] == "validation split: 12 images, 4 anomalous"
  assert "best_f1" in thresholds["scores"]["vae"]  # chosen with labelled anomalies
