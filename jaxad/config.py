"""Config checks at the edge, durations, and the resolved config saved in the workdir
(`load_workdir_config` reads it back on top of today's defaults).

Everything here runs before any data is read or anything compiles, so a bad value
fails in a second with a message that names the key and the fix.
"""

import json
import math
import os

import ml_collections

from jaxad import defaults, files
from jaxad.data.sources.registry import NAMES as SOURCES
from jaxad.errors import CheckpointError, ConfigError

MODEL_NAMES = {"vae": ("conv_vae", "mlp_vae"), "score": ("unet",),
               "gan": ("dcgan", "wgan_gp")}
# jaxad.objectives.likelihood.KINDS, spelled out so that checking a config imports no
# JAX (tests/test_decoders.py checks that the two agree).
LIKELIHOODS = ("gaussian", "bernoulli", "gaussian_learned", "discretized_logistic")
# What may differ when a workdir's training resumes: how long and how often, where the
# same data lives, and what only the eval binary reads. Any other difference would
# continue a checkpoint under a config it was not trained with. The background model is
# checked against its own WORKDIR/background/config.json when it trains.
RESUME_MAY_CHANGE = (
    "train.num_epochs", "train.num_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.log_every_steps", "train.progress_bar",
    "train.prefetch_to_device",
    "data.path", "data.image_dir", "data.mask_dir", "data.data_dir", "data.check_files",
    "data.check_files_max", "data.test_split", "data.synthetic_lesions", "data.on_device",
    "data.on_device_fraction", "eval", "background")
# What the eval binary may override on top of the workdir's config: eval settings, where
# the data lives, which splits and lesions it scores, and whether the likelihood ratio
# is added. The model, the image preprocessing and the classes are what was trained.
EVAL_MAY_CHANGE = (
    "eval", "data.path", "data.image_dir", "data.mask_dir", "data.data_dir",
    "data.check_files", "data.check_files_max", "data.train_split", "data.val_split",
    "data.test_split", "data.val_fraction", "data.val_anomaly_fraction",
    "data.synthetic_lesions", "data.on_device", "data.on_device_fraction",
    "background.enabled", "background.path", "train.progress_bar")


def _choice(value, valid, key):
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is not one of {list(valid)}: "
                      f"set --config.{key} to one of them")


def _positive(value, key):
  if not value > 0:
    raise ConfigError(f"{key}={value!r} must be > 0: set --config.{key}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for any value that cannot work, naming the key and the fix."""
  m, t = config.model, config.train
  _validate_data(config.data)
  _choice(m.family, tuple(MODEL_NAMES), "model.family")
  _choice(m.name, MODEL_NAMES[m.family], "model.name")
  if m.family == "vae":
    _validate_likelihood(m)
    if config.eval.regret.enabled:  # bad eval.regret.* keys fail before anything compiles
      from jaxad.scores import regret
      regret.settings_from_config(config.eval)
    _positive(m.beta, "model.beta")
    _positive(m.latent_dim, "model.latent_dim")
  if m.family == "score":
    _validate_score_eval(config.eval)
  if m.family == "gan":
    _positive(m.latent_dim, "model.latent_dim")
    _validate_gan(m.gan, config.eval)
  _choice(t.compute_dtype, ("float32", "bfloat16"), "train.compute_dtype")
  _positive(t.batch_size, "train.batch_size")
  _positive(t.learning_rate, "train.learning_rate")
  _positive(t.checkpoint_every_steps, "train.checkpoint_every_steps")
  _positive(t.log_every_steps, "train.log_every_steps")
  if t.prefetch_to_device < 0:
    raise ConfigError(f"train.prefetch_to_device={t.prefetch_to_device} must be >= 0 "
                      "(0 = no look-ahead; 2 is usual)")
  if t.num_steps <= 0:
    _positive(t.num_epochs, "train.num_epochs")
  if not 0.0 < t.plateau_factor < 1.0:
    raise ConfigError(f"train.plateau_factor={t.plateau_factor} must be in (0, 1)")
  for key in ("plateau_patience", "early_stop_patience", "warmup_steps", "grad_clip"):
    if t[key] < 0:
      raise ConfigError(f"train.{key}={t[key]} must be >= 0 (0 turns it off)")
  if not 0.0 <= t.mutation_rate < 1.0:
    raise ConfigError(f"train.mutation_rate={t.mutation_rate} must be in [0, 1) (0 = off)")
  _validate_background(config)
  if not 0.0 <= t.ema_rate < 1.0:
    raise ConfigError(f"train.ema_rate={t.ema_rate} must be in [0, 1) (0 turns it off; "
                      "0.999 or 0.9999 are usual)")


def _validate_likelihood(m: ml_collections.ConfigDict) -> None:
  _choice(m.likelihood, LIKELIHOODS, "model.likelihood")
  k = m.likelihood_mixtures
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"model.likelihood_mixtures={k!r} must be an int >= 1 (logistics "
                      "per value; 1 = the plain discretised logistic)")
  if k > 1 and m.likelihood != "discretized_logistic":
    raise ConfigError(f"model.likelihood_mixtures={k} needs model.likelihood="
                      f"'discretized_logistic' (got {m.likelihood!r}): set "
                      "--config.model.likelihood_mixtures=1")


def _validate_data(d: ml_collections.ConfigDict) -> None:
  _choice(d.source, SOURCES, "data.source")
  if d.source == "tfds" and not d.name:
    raise ConfigError("data.source='tfds' needs data.name (e.g. --config.data.name=mnist)")
  if d.source in ("folder", "nifti", "csv", "npz") and not d.path:
    what = {"folder": "image folder root", "nifti": "NIfTI folder root", "csv": "CSV file",
            "npz": ".npz file"}[d.source]
    raise ConfigError(f"data.source={d.source!r} needs data.path (the {what})")
  if bool(tuple(d.normal_classes)) == bool(tuple(d.anomalous_classes)):
    raise ConfigError("set exactly one of data.normal_classes and data.anomalous_classes "
                      f"(got {tuple(d.normal_classes)!r} and {tuple(d.anomalous_classes)!r})")
  _choice(d.channels, (1, 3), "data.channels")
  _choice(d.intensity, ("fixed", "minmax"), "data.intensity")
  if tuple(d.intensity_range):
    if len(d.intensity_range) != 2 or not d.intensity_range[1] > d.intensity_range[0]:
      raise ConfigError(f"data.intensity_range={tuple(d.intensity_range)!r} must be "
                        "(lo, hi) with lo < hi, or () for the dtype's range")
  _positive(d.image_size, "data.image_size")
  _choice(str(d.on_device).lower(), ("auto", "true", "false"), "data.on_device")
  if not 0.0 < d.on_device_fraction <= 1.0:
    raise ConfigError(f"data.on_device_fraction={d.on_device_fraction} must be in (0, 1]")
  if isinstance(d.bit_depth, bool) or not isinstance(d.bit_depth, int) or \
      not 1 <= d.bit_depth <= 16:
    raise ConfigError(f"data.bit_depth={d.bit_depth!r} must be an int in 1..16 (8 for "
                      "PNG/JPEG/uint8 images, 16 for 16-bit, 12 for 12-bit CT)")
  _choice(d.resize, ("bilinear", "nearest"), "data.resize")
  if not 0.0 <= d.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
  if not 0.0 <= d.val_anomaly_fraction < 1.0:
    raise ConfigError(f"data.val_anomaly_fraction={d.val_anomaly_fraction} must be in "
                      "[0, 1) (0 = off)")
  if d.val_anomaly_fraction > 0 and not d.val_split and d.val_fraction <= 0:
    raise ConfigError(f"data.val_anomaly_fraction={d.val_anomaly_fraction} moves "
                      "anomalous test images into the validation split, but there is "
                      "none: set data.val_split, or data.val_split='' and "
                      "data.val_fraction > 0")


def _validate_background(config: ml_collections.ConfigDict) -> None:
  b = config.background
  if not b.enabled:
    return
  if config.model.family == "gan":
    raise ConfigError("background.enabled needs a likelihood model (model.family vae or "
                      "score); a GAN has no log p(x) to take a ratio of")
  if not 0.0 <= b.mutation_rate < 1.0:
    raise ConfigError(f"background.mutation_rate={b.mutation_rate} must be in [0, 1) "
                      "(Ren et al. use 0.1–0.3)")
  if not 0.0 < b.width_factor <= 1.0:
    raise ConfigError(f"background.width_factor={b.width_factor} must be in (0, 1]")
  if b.source:
    _choice(b.source, SOURCES, "background.source")
    if b.source == "tfds" and not b.name:
      raise ConfigError("background.source='tfds' needs background.name")
    if b.source in ("folder", "nifti", "csv", "npz") and not b.path:
      raise ConfigError(f"background.source={b.source!r} needs background.path")


def _validate_gan(g: ml_collections.ConfigDict, e: ml_collections.ConfigDict) -> None:
  _choice(g.generator_norm, ("batch", "none"), "model.gan.generator_norm")
  _choice(g.discriminator_norm, ("", "batch", "layer", "none"), "model.gan.discriminator_norm")
  if g.critic_steps < 0:
    raise ConfigError(f"model.gan.critic_steps={g.critic_steps} must be >= 0 (0 = the "
                      "loss's usual: 1 for dcgan, 5 for wgan_gp)")
  if g.gp_weight < 0:
    raise ConfigError(f"model.gan.gp_weight={g.gp_weight} must be >= 0 (10 in WGAN-GP)")
  _positive(e.latent_steps, "eval.latent_steps")
  _positive(e.latent_lr, "eval.latent_lr")
  if not 0.0 <= e.latent_momentum < 1.0:
    raise ConfigError(f"eval.latent_momentum={e.latent_momentum} must be in [0, 1)")
  if not 0.0 <= e.latent_lambda <= 1.0:
    raise ConfigError(f"eval.latent_lambda={e.latent_lambda} must be in [0, 1] (0.5 in AnoGAN)")


def _validate_score_eval(e: ml_collections.ConfigDict) -> None:
  for key in ("t", "dsm_t", "top_k_fraction"):
    if not 0.0 < e.sano[key] <= 1.0:
      raise ConfigError(f"eval.sano.{key}={e.sano[key]} must be in (0, 1]")
  if e.sano.smooth_sigma < 0:
    raise ConfigError(f"eval.sano.smooth_sigma={e.sano.smooth_sigma} must be >= 0 (0 = off)")
  _positive(e.sano.dsm_samples, "eval.sano.dsm_samples")
  if e.prob_flow.enabled:
    _positive(e.prob_flow.steps, "eval.prob_flow.steps")
    _positive(e.prob_flow.probes, "eval.prob_flow.probes")
    if e.prob_flow.levels == 1 or e.prob_flow.levels < 0:
      raise ConfigError(f"eval.prob_flow.levels={e.prob_flow.levels} must be 0 (continuous "
                        "data) or the number of intensity levels (256 for 8-bit images)")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The one place durations resolve: train.num_steps if set, else epochs × steps/epoch."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(math.ceil(config.train.num_epochs * steps_per_epoch))


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe dict (tuples become lists)."""
  return json.loads(config.to_json())


def differences(a, b, prefix: str = "") -> list[str]:
  """Every leaf where the saved tree `a` and the new tree `b` differ, as readable lines."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [k for key in sorted(set(a) | set(b))
            for k in differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)]
  return [] if a == b else [f"{prefix}: {a!r} in the workdir, {b!r} now"]


def _may_change(key: str, allowed) -> bool:
  return any(key == a or key.startswith(a + ".") for a in allowed)


def changed_keys(saved: dict, now: dict, allowed=()) -> list[str]:
  """Every leaf where `now` differs from `saved`, except keys under `allowed`, as
  "key: old in the workdir, new now" lines. Keys one side lacks (a config written by
  another jaxad version) are skipped: there is nothing to compare them with."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [line for key in sorted(set(saved) & set(now))
            for line in _changed(key, saved[key], now[key], allowed)]
  return []


def _changed(key, saved, now, allowed) -> list[str]:
  if _may_change(key, allowed):
    return []
  if isinstance(saved, dict) and isinstance(now, dict):
    return [line for k in sorted(set(saved) & set(now))
            for line in _changed(f"{key}.{k}", saved[k], now[k], allowed)]
  return [] if saved == now else [f"{key}: {saved!r} in the workdir, {now!r} now"]


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoint was trained under another config.

  Only `RESUME_MAY_CHANGE` (duration, cadence, data location, eval) may differ; any
  other change (dataset, seed, classes, model, optimiser) is a CheckpointError listing
  each key with its old and new value.
  """
  diffs = changed_keys(saved, to_dict(config), RESUME_MAY_CHANGE)
  if diffs:
    raise CheckpointError(
        f"{workdir} holds a checkpoint trained with another config ("
        + "; ".join(diffs) + "): use a new --workdir for a new run, or resume with the "
        f"values in {os.path.join(workdir, 'config.json')} (only duration, logging and "
        "checkpoint cadence, data paths and eval.* may change)")


def check_eval_overrides(saved: dict, config: ml_collections.ConfigDict,
                         workdir: str) -> None:
  """Refuses eval overrides that contradict what the workdir's model was trained with
  (`EVAL_MAY_CHANGE` lists what may be overridden)."""
  diffs = changed_keys(saved, to_dict(config), EVAL_MAY_CHANGE)
  if diffs:
    raise ConfigError(
        f"the model in {workdir} was trained with other values ("
        + "; ".join(diffs) + "): the eval binary may override only eval.*, data paths, "
        "splits and synthetic lesions, and background.enabled; drop the other overrides")


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if key not in config:
      continue  # a key this version no longer has
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's resolved config on top of today's defaults (new keys keep defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {workdir} is not a training workdir "
                          "(train first: python -m jaxad.train --workdir=...)")
  return from_dict(files.read_json(path))


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A saved (JSON) config on top of today's defaults: new keys keep their defaults,
  lists become the tuples configs hold, keys this version no longer has are dropped."""
  config = defaults.get_config()
  _merge(config, saved)
  return config
