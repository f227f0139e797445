"""The GAN family end to end (alternating updates, resume, latent-search scores), 3D
volumes through train and eval (npz and NIfTI), and the NIfTI folder source."""

import json
import os

import jax
import numpy as np
import pytest

from jaxad import evaluation, trainer
from jaxad import state as state_lib
from jaxad.data import sources
from jaxad.errors import ConfigError, DataError
from jaxad.families import gan as gan_family
from jaxad.scores import complexity, latent_search, pixel, sample

GAN = {"model.family": "gan", "model.name": "dcgan", "model.latent_dim": 4,
       "model.widths": (8,), "train.b1": 0.5, "eval.latent_steps": 5,
       "eval.latent_lr": 1e-2, "eval.bootstrap": 0}


def gan_config(**overrides):
  from conftest import tiny_config
  return tiny_config(**{**GAN, **overrides})


def _adam_count(opt_state) -> int:
  """The step count of the (one) Adam inside an inject_hyperparams state."""
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
            if "count" in jax.tree_util.keystr(path) and "inner_state" in
            jax.tree_util.keystr(path)]
  return int(counts[0])


def test_wgan_gp_takes_critic_steps_per_generator_step(tmp_path):
  config = gan_config(**{"model.name": "wgan_gp", "model.gan.critic_steps": 3,
                         "train.num_steps": 4, "train.b1": 0.0, "train.b2": 0.9})
  state, summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert _adam_count(state.opt_state["discriminator"]) == 12
  assert _adam_count(state.opt_state["generator"]) == 4
  assert summary["train_gradient_penalty"] > 0 and np.isfinite(summary["train_g_loss"])
  family, _ = state_lib.build(config, 2)
  assert family.discriminator.norm == "layer"  # the WGAN-GP critic's default


def test_gan_resumes_bit_for_bit(tmp_path):
  config = gan_config(**{"train.num_steps": 10, "train.checkpoint_every_steps": 5})
  full, _ = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  trainer.train_and_evaluate(config, str(tmp_path / "cut"), stop_at_step=5)
  resumed, summary = trainer.train_and_evaluate(config, str(tmp_path / "cut"))
  assert summary["step"] == 10
  for a, b in zip(jax.tree.leaves((full.params, full.model_state, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.model_state, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plateau_lowers_both_networks_learning_rates(tmp_path):
  config = gan_config(**{"train.num_steps": 2})
  state, _ = trainer.train_and_evaluate(config, str(tmp_path))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  lowered = state_lib.set_learning_rate(state, 1e-5, mesh)  # pylint: disable=protected-access
  for net in gan_family.NETS:
    assert float(lowered.opt_state[net].hyperparams["learning_rate"]) == pytest.approx(1e-5)
  assert state_lib.learning_rate(lowered.opt_state) == pytest.approx(1e-5)


@pytest.fixture(scope="module")
def evaluated_gan(tmp_path_factory):
  config = gan_config(**{"train.num_steps": 30, "eval.batch_size": 24,
                         "data.synthetic.num_examples": 48})
  workdir = str(tmp_path_factory.mktemp("gan"))
  trainer.train_and_evaluate(config, workdir)
  return workdir, config, evaluation.evaluate(workdir, config=config)


def test_gan_eval_has_every_score_logreg_and_residual_maps(evaluated_gan):
  workdir, config, result = evaluated_gan
  assert result["family"] == "gan"
  assert set(result["sample"]) == set(latent_search.SAMPLE_SCORES)
  for k in latent_search.SAMPLE_SCORES:
    assert 0.0 <= result["logistic_regression"][k]["auroc"] <= 1.0
  assert set(result["pixel"]) == {"gan_residual"}
  rows = open(os.path.join(workdir, "eval", "test", "scores.csv")).read().splitlines()
  assert set(latent_search.SAMPLE_SCORES) <= set(rows[0].split(","))
  assert len(rows) == 1 + result["num_images"]
  html = open(os.path.join(workdir, "eval", "test", "report.html")).read()
  assert "gan_residual" in html
  figures = os.listdir(os.path.join(workdir, "eval", "test", "figures"))
  assert any("density" in f and "gan" in f for f in figures), figures


def _restored_and_scored(evaluated_gan, data_seed, key_seed):
  """(family, variables, x, key, (scores, maps)): the trained GAN restored from its
  workdir on one device and three random 8×8 images scored with `key`."""
  workdir, config, _ = evaluated_gan
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  family, variables, _ = state_lib.restore_variables(config, workdir, 2, mesh)
  x = np.random.default_rng(data_seed).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  key = jax.random.key(key_seed)
  out = jax.jit(lambda v, x: family.score(v, x, key, with_maps=True))(variables, x)
  return family, variables, x, key, out


def test_gan_scores_match_the_latent_search_run_alone(evaluated_gan):
  """The eval binary's `gan` score is latent_search's on the restored networks."""
  family, variables, x, key, (scores, maps) = _restored_and_scored(evaluated_gan, 0, 7)
  net = gan_family._net  # pylint: disable=protected-access
  generate, features = latent_search.eval_functions(
      family.generator, net(variables, "generator"),
      family.discriminator, net(variables, "discriminator"))
  alone = latent_search.latent_search(
      generate, features, x, latent_search.initial_latents(key, 3, 4), steps=5, lr=1e-2,
      momentum=0.9, lam=0.5)
  for k in latent_search.SAMPLE_SCORES:
    np.testing.assert_allclose(scores[k], alone.scores[k], rtol=1e-4, atol=1e-4)
  assert maps["gan_residual"].shape == (3, 8, 8)


def test_report_reconstructions_are_the_scored_search_results(evaluated_gan, monkeypatch):
  """The report's G(z) comes from the search the scores came from (same batch, same key):
  |x − G(z)| channel-averaged is then exactly the example's gan_residual map."""
  workdir, config, _ = evaluated_gan
  family, variables, x, key, (_, maps) = _restored_and_scored(evaluated_gan, 1, 3)
  recon = jax.jit(family.reconstruct)(variables, x, key)
  residual = np.abs(x - np.asarray(recon)).mean(-1)
  np.testing.assert_allclose(residual, maps["gan_residual"], rtol=1e-5, atol=1e-5)
  other = np.asarray(jax.jit(family.reconstruct)(variables, x, jax.random.key(4)))
  assert np.abs(other - np.asarray(recon)).max() > 1e-3  # the key matters
  grids = []
  monkeypatch.setattr(evaluation, "_write_report", lambda *args: grids.append(args[-1]))
  evaluation.evaluate(workdir, config=config)
  grid = grids[0]
  assert len(grid["ids"]) == config.eval.num_examples
  residual = np.abs(grid["images"] - grid["reconstructions"]).mean(-1)
  np.testing.assert_allclose(residual, grid["maps"]["gan_residual"], rtol=1e-5, atol=1e-5)


def test_gan_config_errors():
  with pytest.raises(ConfigError, match="discriminator_norm='batch' cannot be used"):
    state_lib.build(gan_config(**{"model.name": "wgan_gp",
                                "model.gan.discriminator_norm": "batch"}), 2)
  with pytest.raises(ConfigError, match="b·2\\^k"):
    state_lib.build(gan_config(**{"data.image_size": 9}), 2)
  from jaxad import config as config_lib
  with pytest.raises(ConfigError, match="eval.latent_lambda"):
    config_lib.validate(gan_config(**{"eval.latent_lambda": 1.5}))
  with pytest.raises(ConfigError, match="model.name='unet' is not one of"):
    config_lib.validate(gan_config(**{"model.name": "unet"}))


# ----------------------------------------------------------------------------------
# 3D volumes


def _volumes(rng, n, side, lesion):
  """Smooth random 3D fields in uint8; with `lesion`, a bright cube and its mask."""
  coarse = rng.uniform(60, 140, (n, 2, 2, 2))
  x = coarse.repeat(side // 2, 1).repeat(side // 2, 2).repeat(side // 2, 3)
  x = x + rng.normal(0, 4, x.shape)
  masks = np.zeros(x.shape, np.uint8)
  if lesion:
    for i in range(n):
      c = rng.integers(1, side - 4, 3)
      masks[i, c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 3] = 1
    x = np.where(masks == 1, 250.0, x)
  return np.clip(x, 0, 255).astype(np.uint8), masks


def _write_npz3d(path, side=8):
  rng = np.random.default_rng(0)
  train, _ = _volumes(rng, 48, side, False)
  val, _ = _volumes(rng, 16, side, False)
  healthy, healthy_masks = _volumes(rng, 12, side, False)
  sick, sick_masks = _volumes(rng, 12, side, True)
  np.savez(path, train_images=train, train_labels=np.zeros(48, np.int64),
           val_images=val, val_labels=np.zeros(16, np.int64),
           test_images=np.concatenate([healthy, sick]),
           test_labels=np.repeat([0, 1], 12),
           test_masks=np.concatenate([healthy_masks, sick_masks]))


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_3d_volumes_train_and_evaluate_with_every_score(tmp_path, family):
  path = str(tmp_path / "cubes.npz")
  _write_npz3d(path)
  overrides = {"data.source": "npz", "data.path": path, "data.ndim": 3,
               "data.normal_classes": (0,), "data.val_split": "val", "data.depth": 8,
               "train.num_steps": 6, "eval.batch_size": 16, "eval.bootstrap": 0,
               "eval.num_examples": 4}
  if family == "gan":
    config = gan_config(**overrides, **{"model.name": "wgan_gp",
                                        "model.gan.critic_steps": 2})
    names, maps = latent_search.SAMPLE_SCORES, latent_search.PIXEL_MAPS
  else:
    from conftest import tiny_config
    config = tiny_config(**overrides, **{"eval.num_samples": 3})
    names, maps = sample.SAMPLE_SCORES, pixel.PIXEL_MAPS
    names += complexity.score_names(("vae", "iwae"))
  workdir = str(tmp_path / "wd")
  state, _ = trainer.train_and_evaluate(config, workdir)
  leaves = jax.tree.leaves(state.params)
  assert any(leaf.ndim == 5 for leaf in leaves)  # 3D conv kernels
  result = evaluation.evaluate(workdir, config=config)
  assert result["num_images"] == 24
  assert set(result["sample"]) == set(names)
  assert set(result["pixel"]) == set(maps)
  for k in names:
    assert np.isfinite(result["sample"][k]["all"]["auroc"])
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))["test"]
  assert set(saved["pixel"]) == set(maps)
  assert os.path.exists(os.path.join(workdir, "eval", "test", "report.html"))


# ----------------------------------------------------------------------------------
# NIfTI folder source


def _write_nifti(path, volume):
  nibabel = pytest.importorskip("nibabel")  # an install extra: jaxad[nifti]
  nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)


def _nifti_tree(root, side=8):
  """ROOT/test/{healthy,lesion}/*.nii.gz with masks for the lesion class only."""
  rng = np.random.default_rng(1)
  expected = {}
  for cls, lesion in (("healthy", False), ("lesion", True)):
    os.makedirs(os.path.join(root, "test", cls))
    os.makedirs(os.path.join(root, "test", "masks", cls), exist_ok=True)
    vols, masks = _volumes(rng, 2, side, lesion)
    for i in range(2):
      xyz = vols[i].transpose(2, 1, 0)  # stored as (x, y, z)
      _write_nifti(os.path.join(root, "test", cls, f"s{i}.nii.gz"), xyz)
      if lesion:
        _write_nifti(os.path.join(root, "test", "masks", cls, f"s{i}.nii.gz"),
                     masks[i].transpose(2, 1, 0))
      expected[f"{cls}/s{i}.nii.gz"] = (vols[i], masks[i])
  return expected


def test_nifti_source_reads_volumes_and_masks(tmp_path, make_config):
  root = str(tmp_path / "mri")
  expected = _nifti_tree(root)
  config = make_config(**{"data.source": "nifti", "data.path": root,
                          "data.normal_classes": ("healthy",)})
  source = sources.get_source(config.data, "test")
  assert source.spatial_ndim == 3 and source.has_masks
  assert source.class_names == ("healthy", "lesion")
  assert sorted(source.ids) == sorted(expected)
  for i, name in enumerate(source.ids):
    volume, mask = source.read(i)
    want, want_mask = expected[name]
    assert volume.shape == (8, 8, 8, 1) and volume.dtype == np.uint8
    np.testing.assert_array_equal(volume[..., 0], want)  # (z, y, x) = D×H×W
    np.testing.assert_array_equal(mask[..., 0], want_mask)  # zeros for healthy


def test_nifti_source_errors_name_the_file(tmp_path, make_config):
  root = str(tmp_path / "mri")
  _nifti_tree(root)
  bad = os.path.join(root, "test", "healthy", "broken.nii.gz")
  with open(bad, "wb") as f:
    f.write(b"not a nifti file")
  config = make_config(**{"data.source": "nifti", "data.path": root,
                          "data.normal_classes": ("healthy",)})
  source = sources.get_source(config.data, "test")
  i = list(source.ids).index("healthy/broken.nii.gz")
  with pytest.raises(DataError, match="broken.nii.gz"):
    source.read(i)
  config.data.path = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="does not exist: check data.path"):
    sources.get_source(config.data, "test")


def test_nifti_volumes_train_and_evaluate(tmp_path):
  root = str(tmp_path / "mri")
  expected = _nifti_tree(root)
  # The same volumes serve as train (healthy only) and test split here.
  os.symlink(os.path.join(root, "test"), os.path.join(root, "train"))
  from conftest import tiny_config
  config = tiny_config(**{"data.source": "nifti", "data.path": root,
                          "data.normal_classes": ("healthy",), "data.val_split": "",
                          "data.val_fraction": 0.0, "data.depth": 8,
                          "train.batch_size": 2, "train.num_steps": 3,
                          "eval.batch_size": 4, "eval.bootstrap": 0,
                          "eval.num_samples": 2, "eval.num_examples": 2})
  workdir = str(tmp_path / "wd")
  one = jax.devices()[:1]  # a global batch of 2 volumes
  trainer.train_and_evaluate(config, workdir, devices=one)
  result = evaluation.evaluate(workdir, config=config, devices=one)
  assert result["num_images"] == len(expected)
  assert set(result["sample"]) == set(sample.SAMPLE_SCORES) | set(
      complexity.score_names(("vae", "iwae")))
  # 2 images per class are too few for 5-fold logistic regression: recorded, not raised.
  assert "needs at least 5 images" in result["logistic_regression"]["vae"]["error"]


@pytest.mark.parametrize("name", ["digits_gan.py", "digits_wgan.py"])
def test_digits_configs_train_evaluate_and_report(tmp_path, name):
  """The CPU configs end to end, shortened: gan scores, logistic regression, report."""
  from jaxad.grid import axes as grid_axes
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = grid_axes.load_experiment(os.path.join(root, "configs", name))
  config.train.num_steps = 6
  config.train.progress_bar = False
  config.eval.latent_steps = 5
  config.eval.bootstrap = 5
  workdir = str(tmp_path / "wd")
  trainer.train_and_evaluate(config, workdir)
  result = evaluation.evaluate(workdir, config=config)
  assert result["num_anomalous"] > 0 and result["family"] == "gan"
  for k in latent_search.SAMPLE_SCORES:
    assert 0.0 <= result["sample"][k]["all"]["auroc"] <= 1.0
    assert 0.0 <= result["logistic_regression"][k]["auroc"] <= 1.0
  assert "gan" in evaluation.headline_table(result)
  assert os.path.exists(os.path.join(workdir, "eval", "test", "report.html"))
