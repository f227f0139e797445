"""Input complexity (Serrà et al.): lossless code lengths, bits per dimension, the
corrected scores, and the eval binary on data with the complexity bias built in."""

import csv
import io
import json
import math
import os

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from jaxad import evaluation, trainer
from jaxad.data import pipeline
from jaxad.errors import ConfigError
from jaxad.families import score as score_family
from jaxad.families import vae as vae_family
from jaxad.scores import complexity


def _decode(data: bytes, coder: str) -> np.ndarray:
  """libjxl's and libpng's decoders (Pillow reads 16-bit colour PNGs as 8-bit)."""
  return imagecodecs.jpegxl_decode(data) if coder == "jpegxl" else \
      imagecodecs.png_decode(data)


@pytest.mark.parametrize("bit_depth", [8, 12, 16])
@pytest.mark.parametrize("shape", [(20, 24, 1), (20, 24, 3), (20, 24, 2), (5, 12, 16, 1)])
def test_coders_are_lossless_at_the_bit_depth(bit_depth, shape):
  rng = np.random.default_rng(bit_depth)
  top = 2 ** bit_depth - 1
  k = rng.integers(0, top + 1, shape)
  x = k * (2.0 / top) - 1.0  # the pipeline's [-1, 1] scale
  q = complexity.quantize(x[None], bit_depth)[0]
  np.testing.assert_array_equal(q, k)
  assert q.dtype == (np.uint8 if bit_depth <= 8 else np.uint16)
  picture = complexity.as_planar_image(q)
  assert picture.size == q.size and picture.ndim in (2, 3)
  for coder in complexity.CODERS:
    data = complexity.encode(picture, coder, bit_depth)
    np.testing.assert_array_equal(_decode(data, coder), picture)


def test_volumes_and_odd_channel_counts_are_laid_out_as_one_picture():
  volume = np.arange(2 * 3 * 4).reshape(2, 3, 4, 1)
  np.testing.assert_array_equal(complexity.as_planar_image(volume),
                                np.concatenate([volume[0, ..., 0], volume[1, ..., 0]]))
  two = np.stack([np.zeros((3, 4)), np.ones((3, 4))], -1)
  np.testing.assert_array_equal(complexity.as_planar_image(two)[:, :4], 0)
  np.testing.assert_array_equal(complexity.as_planar_image(two)[:, 4:], 1)
  with pytest.raises(ValueError, match="one image"):
    complexity.as_planar_image(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="bit_depth"):
    complexity.quantize(np.zeros((1, 4, 4, 1)), 17)
  with pytest.raises(ValueError, match="coder"):
    complexity.encode(np.zeros((4, 4), np.uint8), "gif", 8)


def test_length_follows_complexity():
  """A constant image costs almost nothing, noise its full 8 bits per value."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:64, :64]
  images = np.stack([
      np.full((64, 64), -0.3),
      np.exp(-((yy - 30) ** 2 + (xx - 34) ** 2) / 200.0) * 1.6 - 0.8,
      rng.uniform(-1, 1, (64, 64)),
  ])[..., None]
  for coder in complexity.CODERS:
    bpd = complexity.complexity_bpd(images, 8, coder)
    assert bpd[0] < 0.25 and bpd[0] < bpd[1] < bpd[2], (coder, bpd)
    # Uniform noise is incompressible: no lossless coder gets below its 8 bits per value
    # (JPEG XL spends about 12% more on it than raw storage).
    assert 7.95 < bpd[2] < 9.2, (coder, bpd)


def test_pool_gives_the_serial_lengths_in_order():
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (13, 8, 8, 1)) * rng.uniform(0, 1, (13, 1, 1, 1))
  with complexity.ComplexityPool(8, threads=3) as pool:
    got = pool.submit(images).result()
    empty = pool.submit(images[:0]).result()
  want = complexity.lengths(images, 8)
  assert set(got) == set(want) == set(pool.names)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
    assert empty[k].shape == (0,)


def test_bits_per_dim_of_the_vae_and_the_corrected_scores_in_float64():
  nll = np.array([-800.0, 120.5, 3000.0])  # nats per image
  num_dims, bit_depth = 32 * 32, 8
  scores = {"vae": nll, "iwae": nll - 1.0}
  gaussian = vae_family.VAE(module=None, likelihood=vae_family.likelihood_lib.Likelihood(
      "gaussian", 0.05))
  got = gaussian.likelihood_bpd(scores, num_dims, bit_depth)
  # −log P(k) ≈ −log p(x) − D·log w with w = 2/255: nats → bits per value.
  want = (nll + num_dims * math.log(255 / 2)) / (num_dims * math.log(2))
  np.testing.assert_allclose(got["vae"], want, rtol=1e-12)
  np.testing.assert_allclose(got["iwae"], want - 1 / (num_dims * math.log(2)), rtol=1e-12)
  bernoulli = vae_family.VAE(module=None, likelihood=vae_family.likelihood_lib.Likelihood(
      "bernoulli", 1.0))
  np.testing.assert_allclose(bernoulli.likelihood_bpd(scores, num_dims, 8)["vae"],
                             nll / (num_dims * math.log(2)), rtol=1e-12)
  lengths = {"jpegxl_bpd": np.array([1.0, 2.0, 3.0]), "png_bpd": np.array([2.0, 2.5, 4.0])}
  out = complexity.corrected_scores(got, lengths)
  np.testing.assert_allclose(out["vae_complexity"], want - [1.0, 2.0, 3.0])
  np.testing.assert_allclose(out["iwae_complexity_png"], got["iwae"] - [2.0, 2.5, 4.0])
  assert set(out) == {"jpegxl_bpd", "png_bpd", "vae_complexity", "vae_complexity_png",
                      "iwae_complexity", "iwae_complexity_png"}


def test_score_family_bits_per_dim_and_its_levels_check(make_config):
  config = make_config(**{"model.family": "score", "model.name": "unet",
                          "model.unet.base_width": 8, "model.unet.channel_mult": (1,),
                          "model.unet.num_res_blocks": 1,
                          "model.unet.attention_resolutions": (), "model.unet.groups": 4,
                          "eval.prob_flow.enabled": True})
  family = score_family.build(config, (8, 8, 1))
  assert family.likelihood_scores == ("prob_flow",)
  scores = {"prob_flow_bpd": np.array([3.0]), "prob_flow_nll": np.array([100.0])}
  assert family.likelihood_bpd(scores, 64, 8)["prob_flow"] == 3.0
  config.eval.prob_flow.levels = 0  # continuous: the density at the 8-bit bin width
  family = score_family.build(config, (8, 8, 1))
  np.testing.assert_allclose(family.likelihood_bpd(scores, 64, 8)["prob_flow"],
                             (100.0 + 64 * math.log(127.5)) / (64 * math.log(2)))
  config.eval.prob_flow.levels = 4096
  with pytest.raises(ConfigError, match="data.bit_depth"):
    score_family.build(config, (8, 8, 1))
  config.eval.complexity = False
  score_family.build(config, (8, 8, 1))


def _blobs(n, rng, kind, contrast=1.2):
  """32×32 uint8: a smooth blob (simple); the blob under strong noise (complex); the
  blob with sharp rectangles of ±`contrast` the model never saw (anomalous, of middle
  complexity)."""
  yy, xx = np.mgrid[:32, :32]
  out = np.zeros((n, 32, 32), np.uint8)
  for i in range(n):
    cy, cx = rng.uniform(8, 24, 2)
    r, a = rng.uniform(4, 8), rng.uniform(0.8, 1.4)
    image = -0.8 + a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    if kind == "complex":
      image = image + rng.normal(0.0, 0.4, image.shape)
    if kind == "anomalous":
      for _ in range(3):
        (y0, x0), (h, w) = rng.integers(0, 24, 2), rng.integers(3, 10, 2)
        image[y0:y0 + h, x0:x0 + w] += contrast * rng.choice([-1, 1])
    out[i] = np.round((np.clip(image, -1, 1) + 1) * 127.5)
  return out


def _write_bias_npz(path, seed=0, contrast=1.2):
  """MedMNIST layout (uint8 images, uint8 (N, 1) labels): classes 0 = simple and
  1 = complex are normal, 2 is anomalous; validation and test hold all three."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, normal, anomalous in (("train", 400, 0), ("val", 50, 50), ("test", 100, 100)):
    arrays[f"{split}_images"] = np.concatenate([
        _blobs(normal, rng, "simple"), _blobs(normal, rng, "complex"),
        _blobs(anomalous, rng, "anomalous", contrast)])
    arrays[f"{split}_labels"] = np.repeat(np.arange(3, dtype=np.uint8),
                                          [normal, normal, anomalous])[:, None]
  np.savez_compressed(path, **arrays)


def test_complexity_corrects_a_built_in_bias(make_config, tmp_path):
  """Normal = simple and complex images, anomalies in between: −ELBO puts the anomalies
  among the normal images, the complexity-corrected score above them (Serrà et al.)."""
  path = str(tmp_path / "bias.npz")
  _write_bias_npz(path)
  config = make_config(**{
      "data.source": "npz", "data.path": path, "data.normal_classes": (),
      "data.anomalous_classes": (2,), "data.image_size": 32,
      "model.widths": (16, 32, 64), "model.latent_dim": 8, "model.beta": 0.05,
      "train.num_steps": 300, "train.batch_size": 32, "train.log_every_steps": 100,
      "train.checkpoint_every_steps": 300, "eval.bootstrap": 0, "eval.num_samples": 5})
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  result = evaluation.evaluate(workdir, config=config)
  auroc = {k: row["all"]["auroc"] for k, row in result["sample"].items()}
  assert auroc["vae"] < 0.6 and auroc["iwae"] < 0.6, auroc
  assert auroc["vae_complexity"] > 0.8 and auroc["iwae_complexity"] > 0.8, auroc
  assert auroc["vae_complexity_png"] > 0.8, auroc

  # The ranking uses the validation split (it has anomalies) and picks a corrected score.
  ranking = result["ranking"]
  assert ranking["by"] == "validation AUROC"
  assert "complexity" in ranking["best"]
  assert ranking["order"][0] == ranking["best"] and set(ranking["order"]) == set(auroc)
  values = [ranking["auroc"][k] for k in ranking["order"]]
  assert values == sorted(values, reverse=True)
  val = evaluation.evaluate(workdir, config=config, split="val")  # the same pass
  for k, row in val["sample"].items():
    assert row["all"]["auroc"] == pytest.approx(ranking["auroc"][k], abs=1e-12)
  assert val["ranking"]["by"] == "val AUROC" and "validation split" in val["ranking"]["note"]
  table = evaluation.headline_table(result)
  assert f"* {ranking['best']}" in table and "validation AUROC" in table
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved["test"]["ranking"]["best"] == ranking["best"]
  html = open(os.path.join(workdir, "eval", "test", "report.html")).read()
  assert "Which score to trust" in html and f"★ {ranking['best']}" in html

  # The scores file against an independent computation: Pillow's PNG of each test
  # image as the model saw it, and the bits per dim of −ELBO by hand.
  with open(os.path.join(workdir, "eval", "test", "scores.csv")) as f:
    rows = list(csv.DictReader(f))
  split = pipeline.load_split(config.data, "test")
  batch = next(pipeline.eval_batches(split, config.data, global_batch=8))
  num_dims = 32 * 32
  for j in range(8):
    row = rows[j]
    k = np.rint((batch["image"][j, ..., 0].astype(np.float64) + 1) * 127.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(k).save(buffer, format="PNG", compress_level=9)
    png_bpd = 8 * len(buffer.getvalue()) / num_dims
    assert float(row["png_bpd"]) == pytest.approx(png_bpd, rel=1e-6)
    bpd = (float(row["vae"]) + num_dims * math.log(127.5)) / (num_dims * math.log(2))
    assert float(row["vae_complexity_png"]) == pytest.approx(bpd - png_bpd, abs=1e-4)


def test_complexity_corrects_the_bias_of_the_discrete_likelihood(make_config, tmp_path):
  """The same bias under PixelCNN++'s discretised logistic decoder: −ELBO is now the
  stored image's bits, so S = bpd − L(x)/D subtracts bits from bits.

  The rectangles have contrast 0.5, not 1.2: a logistic's tails charge about |d|/s nats
  for a value d away from a sharp prediction, so 1.2 rectangles cost more bits than the
  noisy normal images (measured: vae AUROC 0.88, vae_complexity 0.999 at 300 steps: no
  bias left to correct); at 0.5 their bits lie between the simple and the complex normal
  images, where the bias lives. The parameter EMA steadies the simple images' bits, which
  swing by ±0.5 bpd from step to step this early in training.
  """
  path = str(tmp_path / "bias.npz")
  _write_bias_npz(path, contrast=0.5)
  config = make_config(**{
      "data.source": "npz", "data.path": path, "data.normal_classes": (),
      "data.anomalous_classes": (2,), "data.image_size": 32,
      "model.widths": (16, 32, 64), "model.latent_dim": 8, "model.beta": 1.0,
      "model.likelihood": "discretized_logistic", "train.ema_rate": 0.98,
      "train.num_steps": 300, "train.batch_size": 32, "train.log_every_steps": 100,
      "train.checkpoint_every_steps": 300, "eval.bootstrap": 0, "eval.num_samples": 2})
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  result = evaluation.evaluate(workdir, config=config)
  auroc = {k: row["all"]["auroc"] for k, row in result["sample"].items()}
  assert auroc["vae"] <= 0.6 and auroc["iwae"] <= 0.6, auroc
  assert auroc["vae_complexity"] >= 0.9 and auroc["iwae_complexity"] >= 0.9, auroc
  # The bits are the likelihood's own: nats/(D·ln 2), no bin width added.
  with open(os.path.join(workdir, "eval", "test", "scores.csv")) as f:
    rows = list(csv.DictReader(f))
  num_dims = 32 * 32
  for row in rows[:8]:
    bpd = float(row["vae"]) / (num_dims * math.log(2))
    assert 0 < bpd < 8
    assert float(row["vae_complexity"]) == pytest.approx(bpd - float(row["jpegxl_bpd"]),
                                                         abs=1e-4)


def test_bits_per_dim_of_the_new_decoders_in_float64():
  """Discretised logistic: exact bits of the discrete image; learned-variance Gaussian:
  a density, with the bin width as for the fixed one."""
  lib = vae_family.likelihood_lib
  nll = np.array([300.0, 4000.0])
  scores = {"vae": nll, "iwae": nll - 2.0}
  discrete = vae_family.VAE(module=None, likelihood=lib.Likelihood(
      "discretized_logistic", bit_depth=12))
  got = discrete.likelihood_bpd(scores, 64, 12)
  np.testing.assert_allclose(got["vae"], nll / (64 * math.log(2)), rtol=1e-12)
  np.testing.assert_allclose(got["iwae"], (nll - 2) / (64 * math.log(2)), rtol=1e-12)
  with pytest.raises(ValueError, match="12 bits per value, not 8"):
    discrete.likelihood_bpd(scores, 64, 8)
  learned = vae_family.VAE(module=None, likelihood=lib.Likelihood("gaussian_learned"))
  np.testing.assert_allclose(learned.likelihood_bpd(scores, 64, 8)["vae"],
                             (nll + 64 * math.log(127.5)) / (64 * math.log(2)), rtol=1e-12)
  assert learned.sample_scores[-1] == "vae_rec_normalized"
  assert learned.pixel_maps[-1] == "rec_normalized"
  assert "vae_rec_normalized" not in discrete.sample_scores


def test_bit_depth_is_checked_at_the_edge(make_config):
  from jaxad import config as config_lib
  for bad in (0, 17):
    with pytest.raises(ConfigError, match="data.bit_depth"):
      config_lib.validate(make_config(**{"data.bit_depth": bad}))
