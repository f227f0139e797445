"""The end-to-end cases (`--case=e2e`): the trainer's loop and the eval binary on datasets
laid out as they ship, beside the compiled train step and score function alone.

    python -m jaxad.bench --case=e2e [--quick]      # every dataset
    python -m jaxad.bench --case=e2e/mnist_npz      # one

Each case writes its dataset into a temporary folder (`write_dataset`) and trains the
model of a shipped config on it (the configs are built here, `SHIPPED`, and a test keeps
them equal to the files in configs/):

  e2e/mnist_npz     MedMNIST-layout npz, uint8 `train_images` (N, 28, 28), `train_labels`
                    (N, 1), val_ and test_ too, np.savez_compressed: configs/mnist_vae.py
                    (the conv VAE at 32×32, batch 128: the MNIST config that trains on an
                    npz; configs/mnist_gan.py's DCGAN is the other, timed as gan/train_step)
  e2e/oct_png       a folder of 128×128 grayscale PNGs, ROOT/<split>/<class>/*.png, source
                    'folder': configs/oct_vae.py (conv128 VAE, batch 32) with its widths
                    halved (`OCT_WIDTHS`) so that a run fits this benchmark's minutes
  e2e/nodules_npz   MedMNIST-3D-layout npz of uint8 32³ volumes: configs/nodules_vae3d.py

and measures, for its model:

  step-only    the trainer's compiled step (`trainer.make_train_step`, the program the loop
               runs) on one preprocessed batch already on the device, timed as every bench
               case is (jaxad.bench.timing: rounds of warm-up and repeats, each call waited
               on), one round before the first training run and one after each
  pipeline     `pipeline.train_batches` iterated with no model (numpy batches on the host),
               after a warm-up of tf.data: images/s
  e2e          `trainer.train_and_evaluate(config, workdir)` for `epochs` epochs, once with
               data.on_device 'false' (streamed: tf.data, copied to the device
               train.prefetch_to_device batches ahead) and once 'true' (device-resident),
               otherwise as configured: logging, validation every epoch, checkpoints
  eval         `evaluation.evaluate` of the streamed run's workdir on the test split (the
               whole binary: pipeline, scores, complexity codes, the validation-ranking
               pass, metrics, bootstrap, report, files), beside score-only: the compiled
               score function (`scoring.make_score_fn`) on one device batch of
               eval.batch_size images.

Steady state. The loop waits for the device only at log, validation and checkpoint
steps, so the clock is read at those sync points: a handler on the "jaxad" logger
timestamps the trainer's "epoch E: validation ..." lines, written after the validation
pass has read every loss back (the device idle). The window runs from epoch 1's line to
the last epoch's: (epochs − 1) whole epochs of steps with their log flushes and
validation passes, and none of the compilations (train step at step 1, validation step
at epoch 1's end), the setup (loading, file checks, an on-device copy) or the final
checkpoint, reported apart as startup_s and final_s. e2e images/s = (epochs − 1) ·
steps/epoch · batch / window seconds. The validation passes inside the window are timed
too (val_s: the state is waited on before the clock starts, so it is the pass alone),
giving the training images/s without them (train_only_images_per_s), and so are the
host's waits for the next streamed batch (pipeline_wait_s: every `next` on
`pipeline.train_batches`, which includes tearing down the finished epoch's tf.data
iterator; 0 on the device-resident path, which does not call it).

Pairing. Other processes share this CPU, and its speed drifts over minutes, so each
run's ratio divides by the step-only rate of the rounds just before and just after it
(its step_only_images_per_s; the record's step_only is the median over all rounds).
The eval binary runs once to compile (`make_score_fn` is cached per model), then
EVAL_RUNS times between rounds of the score function alone; the fastest run is reported
(load only ever adds time) with its adjacent score-only rate: test images / seconds,
though the pass also scores the validation split for the ranking (scored_images_per_s
counts both), and its phases (test pass, validation-ranking pass, sample metrics,
report) are timed. CPU ms per image (process time, every thread) is recorded for the
step, the pipeline, the e2e window and the eval run, to show what competes for cores.
"""

from collections.abc import Sequence
import contextlib
import dataclasses
import io
import logging
import math
import os
import re
import shutil
import tempfile
import time
from unittest import mock

import jax
import ml_collections
import numpy as np

from jaxad import defaults, keys, parallel
from jaxad.bench.timing import FULL, QUICK, CaseTimer, Runner, Timing, log, xla_flops

MODES = ("false", "true")  # data.on_device: streamed, device-resident
MODE_NAMES = {"false": "streamed", "true": "device"}
OCT_WIDTHS = (16, 32, 64, 128, 256)  # configs/oct_vae.py's (32, ..., 512) halved
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
PIPELINE_WARMUP = 3  # batches drawn before the pipeline's clock starts
EVAL_NOTE = ("evaluation.evaluate on the test split, the fastest of the runs after one "
             "that compiles: pipeline, every score, complexity codes, the validation "
             "split's ranking pass, metrics, bootstrap, report and files")


# --------------------------------------------------------------------------
# The shipped configs (equal to configs/*.py: tests/test_bench.py checks it)
# --------------------------------------------------------------------------
def mnist_vae_config() -> ml_collections.ConfigDict:
  """configs/mnist_vae.py."""
  c = defaults.get_config()
  c.data.source = "npz"
  c.data.path = "mnist.npz"
  c.data.name = "mnist"
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.val_fraction = 0.0
  c.data.val_anomaly_fraction = 0.0
  c.data.test_split = "test"
  c.data.anomalous_classes = (9,)
  c.data.image_size = 32
  c.data.channels = 1
  c.model.name = "conv_vae"
  c.model.widths = (32, 64, 128)
  c.model.latent_dim = 32
  c.model.norm = "batch"
  c.model.likelihood = "bernoulli"
  c.model.beta = 1.0
  c.train.batch_size = 128
  c.train.num_epochs = 20
  c.train.learning_rate = 1e-3
  c.train.checkpoint_every_steps = 1000
  c.train.log_every_steps = 100
  return c


def oct_vae_config() -> ml_collections.ConfigDict:
  """configs/oct_vae.py."""
  c = defaults.use_dcgan128_vae(defaults.get_config())
  c.data.source = "folder"
  c.data.path = ""
  c.data.val_split = ""
  c.data.val_fraction = 0.05
  c.data.normal_classes = ("NORMAL",)
  c.data.channels = 1
  return c


def nodules_vae3d_config() -> ml_collections.ConfigDict:
  """configs/nodules_vae3d.py."""
  c = defaults.get_config()
  c.data.source = "npz"
  c.data.path = "nodulemnist3d.npz"
  c.data.ndim = 3
  c.data.normal_classes = (0,)
  c.data.image_size = 32
  c.data.depth = 32
  c.data.channels = 1
  c.model.name = "conv_vae"
  c.model.widths = (16, 32, 64)
  c.model.latent_dim = 64
  c.model.norm = "batch"
  c.model.likelihood = "gaussian"
  c.model.beta = 0.05
  c.train.batch_size = 32
  c.train.num_epochs = 50
  c.train.learning_rate = 1e-3
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  return c


# case → (the shipped config file, its builder here)
SHIPPED = {"mnist_npz": ("configs/mnist_vae.py", mnist_vae_config),
           "oct_png": ("configs/oct_vae.py", oct_vae_config),
           "nodules_npz": ("configs/nodules_vae3d.py", nodules_vae3d_config)}
E2E_CASE_IDS = tuple(f"e2e/{name}" for name in SHIPPED)
DESCRIPTIONS = {
    "mnist_npz": "MedMNIST-layout npz, uint8 28x28 (savez_compressed), 10 classes, 9 "
                 "anomalous; configs/mnist_vae.py (conv VAE 32x32 widths 32-64-128, "
                 "Bernoulli, batch 128, 10% of train held out for validation)",
    "oct_png": "folder of 128x128 grayscale PNGs ROOT/<split>/<class>/*.png (OCT2017 "
               "classes, NORMAL normal); configs/oct_vae.py (conv128 VAE, latent 300, "
               f"batch 32, 5% held out) with widths {OCT_WIDTHS} (the config's halved)",
    "nodules_npz": "MedMNIST-3D-layout npz, uint8 32x32x32 volumes (savez_compressed), "
                   "0 benign normal; configs/nodules_vae3d.py (3D conv VAE widths "
                   "16-32-64, latent 64, batch 32, val split of the npz)",
}


def select_e2e_cases(selectors: Sequence[str]) -> tuple[list[str], list[str]]:
  """(e2e case ids, the other selectors): `e2e` picks every e2e case, `e2e/mnist` a
  prefix. E2E cases run only when selected by name."""
  sel = [s.strip() for item in selectors for s in item.split(",") if s.strip()]
  is_e2e = lambda s: s == "e2e" or s.startswith("e2e/")
  chosen = [c for c in E2E_CASE_IDS
            if any(s == "e2e" or (is_e2e(s) and c.startswith(s)) for s in sel)]
  unknown = [s for s in sel if is_e2e(s) and s != "e2e"
             and not any(c.startswith(s) for c in E2E_CASE_IDS)]
  if unknown:
    raise ValueError(f"unknown --case {unknown}; e2e cases are {list(E2E_CASE_IDS)}")
  return chosen, [s for s in sel if not is_e2e(s)]


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
  """One case's example counts per split, its training runs' epochs (the steady window
  is the last epochs − 1), the pipeline's minimum timed seconds, whether the eval
  binary is measured, and config overrides applied last (tests shrink the model)."""

  train: int
  val: int
  test: int
  epochs: int = 3
  pipeline_s: float = 3.0
  eval: bool = True
  overrides: tuple = ()  # ((dotted key, value), ...)


FULL_SIZES = {"mnist_npz": Sizes(train=12000, val=1000, test=1000),
              "oct_png": Sizes(train=760, val=40, test=96),
              "nodules_npz": Sizes(train=128, val=16, test=32)}
QUICK_SIZES = {"mnist_npz": Sizes(train=6000, val=500, test=500, epochs=2, pipeline_s=1.0),
               "oct_png": Sizes(train=420, val=20, test=48, epochs=2, pipeline_s=1.0),
               "nodules_npz": Sizes(train=88, val=8, test=16, epochs=2, pipeline_s=1.0,
                                    eval=False)}


# The step-only and score-only rates of the e2e cases: the bench's protocol with fewer
# repeats (a 3D step takes seconds), in three rounds: before, between and after the two
# training runs (or the eval binary's two timed runs).
E2E_FULL = Timing(rounds=3, warmup=1, min_repeats=6, max_repeats=12, budget_s=9.0)
E2E_QUICK = Timing(rounds=3, warmup=1, min_repeats=3, max_repeats=6, budget_s=3.0,
                   min_repeat_s=0.1)
EVAL_RUNS = 2  # timed runs of the eval binary (after one that compiles)


# --------------------------------------------------------------------------
# Datasets, written as they ship
# --------------------------------------------------------------------------
def smooth_uint8(rng: np.random.Generator, n: int, coarse: tuple[int, ...],
                 factor: int) -> np.ndarray:
  """n smooth uint8 images (or volumes) of side coarse·factor: uniform noise on a coarse
  grid, linearly upsampled, plus 20% fine noise (compressible like real scans)."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  x = ndimage.zoom(rng.uniform(0, 1, (n, *coarse)).astype(np.float32),
                   (1,) + (factor,) * len(coarse), order=1)
  x = 0.8 * x + 0.2 * rng.uniform(0, 1, x.shape).astype(np.float32)
  return np.clip(np.round(255 * x), 0, 255).astype(np.uint8)


def _labels(rng, n: int, num_classes: int, weights=None) -> np.ndarray:
  """n class indices, as (N, 1) uint8 (MedMNIST's layout); `weights` per class."""
  weights = np.ones(num_classes) if weights is None else np.asarray(weights, float)
  counts = np.floor(n * weights / weights.sum()).astype(int)
  counts[np.argmax(weights)] += n - counts.sum()
  labels = np.repeat(np.arange(num_classes), counts)
  return rng.permutation(labels).astype(np.uint8)[:, None]


def write_medmnist(path: str, sizes: Sizes, coarse: tuple[int, ...], factor: int,
                   num_classes: int, weights=None, seed: int = 0) -> str:
  """An npz in the MedMNIST layout: `{split}_images` uint8 (N, *spatial) and
  `{split}_labels` uint8 (N, 1) for train, val and test, np.savez_compressed."""
  arrays = {}
  for i, split in enumerate(("train", "val", "test")):
    n = getattr(sizes, split)
    rng = np.random.default_rng([seed, i])
    arrays[f"{split}_images"] = smooth_uint8(rng, n, coarse, factor)
    arrays[f"{split}_labels"] = _labels(rng, n, num_classes, weights)
  np.savez_compressed(path, **arrays)
  return path


def write_png_folder(root: str, sizes: Sizes, side: int = 128, seed: int = 0) -> str:
  """ROOT/<split>/<class>/<i>.png, 8-bit grayscale side×side, OCT2017's classes: the
  train split mostly NORMAL (`_oct_counts`), test balanced; val/ too (OCT2017 has one)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for i, split in enumerate(("train", "val", "test")):
    rng = np.random.default_rng([seed, i])
    counts = _oct_counts(getattr(sizes, split), split)
    images = smooth_uint8(rng, sum(counts.values()), (side // 8,) * 2, 8)
    k = 0
    for cls, n in counts.items():
      folder = os.path.join(root, split, cls)
      os.makedirs(folder, exist_ok=True)
      for j in range(n):
        Image.fromarray(images[k], "L").save(os.path.join(folder, f"{cls}-{j}.png"))
        k += 1
  return root


def _oct_counts(n: int, split: str) -> dict[str, int]:
  """Images per class: train 7/8 NORMAL and the rest spread over the diseases (the model
  trains on NORMAL only); val and test one quarter each."""
  if split == "train":
    normal = n - 3 * (n // 24)
    return {**{c: n // 24 for c in OCT_CLASSES[:3]}, "NORMAL": normal}
  return {c: n // 4 + (1 if i < n % 4 else 0) for i, c in enumerate(OCT_CLASSES)}


def write_dataset(name: str, folder: str, sizes: Sizes, seed: int = 0) -> str:
  """Writes case `name`'s dataset under `folder`; returns its data.path."""
  if name == "mnist_npz":
    return write_medmnist(os.path.join(folder, "mnist.npz"), sizes, (7, 7), 4, 10,
                          seed=seed)
  if name == "oct_png":
    return write_png_folder(os.path.join(folder, "oct"), sizes, seed=seed)
  if name == "nodules_npz":  # NoduleMNIST3D is about 3/4 benign
    return write_medmnist(os.path.join(folder, "nodules.npz"), sizes, (8, 8, 8), 4, 2,
                          weights=(3, 1), seed=seed)
  raise ValueError(f"unknown e2e dataset {name!r}; choose from {list(SHIPPED)}")


def bench_config(name: str, path: str, sizes: Sizes, on_device: str = "false"
                 ) -> ml_collections.ConfigDict:
  """The shipped config of case `name` on the dataset at `path`, trained for
  sizes.epochs epochs with data.on_device = `on_device`, no progress bar."""
  c = SHIPPED[name][1]()
  c.data.source = "folder" if name == "oct_png" else "npz"
  c.data.path = path
  c.data.on_device = on_device
  if name == "oct_png":
    c.model.widths = OCT_WIDTHS
  c.train.num_epochs = sizes.epochs
  c.train.num_steps = -1
  c.train.progress_bar = False
  for key, value in sizes.overrides:
    node, *path_, last = [c, *key.split(".")]
    for part in path_:
      node = node[part]
    node[last] = value
  return c


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------
class _Clock(logging.Handler):
  """Timestamps (perf_counter) the trainer's step and validation log lines."""

  STEP = re.compile(r"^step (\d+): ")
  EPOCH = re.compile(r"^epoch (\d+): validation ")

  def __init__(self):
    super().__init__(logging.INFO)
    self.epochs, self.steps = {}, {}  # → (perf_counter, process CPU seconds)

  def emit(self, record):
    now, msg = (time.perf_counter(), time.process_time()), record.getMessage()
    if m := self.EPOCH.match(msg):
      self.epochs[int(m.group(1))] = now
    elif m := self.STEP.match(msg):
      self.steps[int(m.group(1))] = now


@contextlib.contextmanager
def _quiet_jaxad(handler: logging.Handler | None = None):
  """The "jaxad" logger at INFO with `handler` added and its console handlers muted
  (files, such as the workdir's train.log, still written); tqdm bars to nowhere."""
  logger = logging.getLogger("jaxad")
  level = logger.level
  muted = [(h, h.level) for h in logger.handlers
           if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
  logger.setLevel(logging.INFO)
  for h, _ in muted:
    h.setLevel(logging.WARNING)
  if handler is not None:
    logger.addHandler(handler)
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      yield
  finally:
    if handler is not None:
      logger.removeHandler(handler)
    for h, old in muted:
      h.setLevel(old)
    logger.setLevel(level)


class _Intervals:
  """Wraps a module function to record (start, end) of each call; `sync` is waited on
  first (the argument at that position), so the interval is the call's own work. With
  `items`, the function returns an iterator and each `next` on it is recorded."""

  def __init__(self, module, name: str, sync_arg: int | None = None, items: bool = False):
    self.module, self.name, self.sync_arg, self.spans = module, name, sync_arg, []
    self.items, self.found = items, False

  @contextlib.contextmanager
  def patched(self):
    fn = getattr(self.module, self.name, None)
    self.found = callable(fn)
    if not self.found:  # the code changed: measure without this breakdown
      yield
      return

    def timed(*args, **kwargs):
      if self.sync_arg is not None and len(args) > self.sync_arg:
        jax.block_until_ready(args[self.sync_arg])
      t0 = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.spans.append((t0, time.perf_counter()))

    def timed_items(*args, **kwargs):
      it = fn(*args, **kwargs)
      try:
        while True:
          t0 = time.perf_counter()
          try:
            item = next(it)
          except StopIteration:
            return
          finally:
            self.spans.append((t0, time.perf_counter()))
          yield item
      finally:
        close = getattr(it, "close", None)
        if close is not None:
          close()

    with mock.patch.object(self.module, self.name, timed_items if self.items else timed):
      yield

  def within(self, t0: float = -math.inf, t1: float = math.inf) -> float | None:
    """Seconds of the calls inside [t0, t1] (None: the function was not found)."""
    if not self.found:
      return None
    return sum(b - a for a, b in self.spans if a >= t0 and b <= t1)


def train_run(config, workdir: str, steps_per_epoch: int) -> dict:
  """One `trainer.train_and_evaluate` run, its steady-state rate (module docstring);
  cpu_ms_per_image: process CPU time (every thread) in the window per image."""
  from jaxad import trainer  # pylint: disable=import-outside-toplevel
  from jaxad.data import pipeline  # pylint: disable=import-outside-toplevel
  clock, val = _Clock(), _Intervals(trainer, "validation_loss", sync_arg=1)
  waits = _Intervals(pipeline, "train_batches", items=True)
  with _quiet_jaxad(clock), val.patched(), waits.patched():
    t0 = time.perf_counter()
    _, summary = trainer.train_and_evaluate(config, workdir)
    t_end = time.perf_counter()
  epochs = sorted(clock.epochs)
  batch = config.train.batch_size
  if len(epochs) >= 2:
    first, last = epochs[0], epochs[-1]
    (start, cpu0), (stop, cpu1) = clock.epochs[first], clock.epochs[last]
    steps = (last - first) * steps_per_epoch
  elif len(clock.steps) >= 2:  # no validation split: between the first and last log lines
    first, last = min(clock.steps), max(clock.steps)
    (start, cpu0), (stop, cpu1) = clock.steps[first], clock.steps[last]
    steps = last - first
  else:
    raise RuntimeError(
        "the e2e window needs two validation (or log) lines from the trainer; got "
        f"epochs {epochs} and steps {sorted(clock.steps)}: raise Sizes.epochs")
  window = stop - start
  val_s = val.within(start, stop)
  out = dict(images_per_s=steps * batch / window, window_s=window, window_steps=steps,
             val_s=val_s, pipeline_wait_s=waits.within(start, stop),
             startup_s=start - t0, final_s=t_end - stop,
             total_s=t_end - t0, steps=int(summary["step"]),
             cpu_ms_per_image=1e3 * (cpu1 - cpu0) / (steps * batch),
             cores_busy=(cpu1 - cpu0) / window,
             train_step_compilations=summary.get("train_step_compilations"),
             trainer_last_window_images_per_s=summary.get("train_images_per_second"))
  if val_s is not None:
    out["train_only_images_per_s"] = steps * batch / max(window - val_s, 1e-9)
  return out


def pipeline_rate(split, config, batches: int, min_s: float) -> dict:
  """images/s of `pipeline.train_batches` alone: after PIPELINE_WARMUP batches, at
  least `batches` batches and `min_s` seconds; its process CPU time per image."""
  from jaxad.data import pipeline  # pylint: disable=import-outside-toplevel
  batch = config.train.batch_size
  it = pipeline.train_batches(split, config.data, seed=config.seed, global_batch=batch)
  t0 = time.perf_counter()
  for _ in range(PIPELINE_WARMUP):
    next(it)
  warm = time.perf_counter() - t0
  n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
  while n < batches or time.perf_counter() - t0 < min_s:
    next(it)
    n += 1
  sec, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  it.close()
  return dict(images_per_s=n * batch / sec, batches=n, seconds=sec, warmup_s=warm,
              cpu_ms_per_image=1e3 * cpu / (n * batch), cores_busy=cpu / sec)


def step_runner(config, split, mesh):
  """The trainer's compiled step on one real preprocessed batch, on the device."""
  from jaxad import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxad import trainer  # pylint: disable=import-outside-toplevel
  from jaxad.data import pipeline  # pylint: disable=import-outside-toplevel
  t = config.train
  ndim = split.source.spatial_ndim
  family, tx = state_lib.build(config, ndim)
  state = state_lib.create_state(family, tx, state_lib.image_shape(config, ndim),
                                 config.seed, mesh, bool(t.ema_rate))
  step = trainer.make_train_step(family, tx, config.seed, mesh, float(t.ema_rate),
                                 (float(t.mutation_rate), int(config.data.bit_depth)))
  it = pipeline.train_batches(split, config.data, seed=config.seed, global_batch=t.batch_size)
  images = parallel.put_batch(next(it)["image"], mesh)
  it.close()
  return Runner(step, (state, images), carry=True)


def score_runner(config, workdir: str, mesh):
  """The eval binary's compiled score function on its first padded test batch."""
  from jaxad import scoring  # pylint: disable=import-outside-toplevel
  from jaxad import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxad.data import pipeline  # pylint: disable=import-outside-toplevel
  split = pipeline.load_split(config.data, "test")
  family, variables, _ = state_lib.restore_variables(config, workdir,
                                                     split.source.spatial_ndim, mesh)
  with_maps = bool(config.eval.pixel_maps and (split.source.has_masks or
                                              config.data.synthetic_lesions.enabled))
  batch = next(scoring.batches(split, config))
  images, index = parallel.put_batch((batch["image"], batch["index"]), mesh)
  fn = scoring.make_score_fn(family, with_maps)
  return Runner(fn, (variables, images, index, keys.purpose_key(config.seed, keys.EVAL)))


class _Rounds:
  """A runner's CaseTimer, and the process CPU time and number of its timed rounds'
  calls (warm-up included)."""

  def __init__(self, runner: Runner, timing: Timing):
    t0 = time.perf_counter()
    runner()
    self.first_call_s = time.perf_counter() - t0
    self.flops = xla_flops(runner.compiled())
    self.timer, self.cpu, self.calls = CaseTimer(runner, timing), 0.0, 0

  def run_round(self) -> None:
    before, cpu0 = len(self.timer.per_call), time.process_time()
    self.timer.run_round()
    self.cpu += time.process_time() - cpu0
    self.calls += self.timer.timing.warmup + (len(self.timer.per_call) - before) * \
        self.timer.inner

  def record(self, batch: int) -> dict:
    """images/s (median), XLA FLOPs and CPU ms per image, and the timer's summary."""
    r = self.timer.summary()
    return dict(images_per_s=batch / r["sec_per_call_median"], batch=batch,
                first_call_s=self.first_call_s, flops_per_image=self.flops / batch,
                cpu_ms_per_image=1e3 * self.cpu / max(self.calls * batch, 1),
                cores_busy=self.cpu / max(self.calls * r["sec_per_call_median"], 1e-9),
                timing=r)


EVAL_PHASES = (("evaluation", "_score", "test_pass_s"),
               ("scoring", "validation_scores", "val_ranking_pass_s"),
               ("evaluation", "_sample_metrics", "sample_metrics_s"),
               ("evaluation", "_write_report", "report_s"))


def _adjacent_rate(rounds: _Rounds, i: int, batch: int) -> float:
  """images/s of the mean of round i's and round i+1's median seconds per call: the
  step-only (or score-only) rate measured just before and just after run i."""
  medians = rounds.timer.round_medians[i:i + 2]
  return batch / (sum(medians) / len(medians))


def eval_record(config, workdir: str, timing: Timing, mesh, verbose: bool) -> dict:
  """The eval binary three times: the first compiles, the other two are timed between
  rounds of the score function alone (module docstring)."""
  from jaxad import evaluation, scoring  # pylint: disable=import-outside-toplevel
  from jaxad.data import pipeline  # pylint: disable=import-outside-toplevel
  modules = {"evaluation": evaluation, "scoring": scoring}
  batch = int(config.eval.batch_size)
  rounds, runs = None, []
  with _quiet_jaxad():
    t0 = time.perf_counter()
    result = evaluation.evaluate(workdir, split="test")  # compiles
    first_s = time.perf_counter() - t0
    rounds = _Rounds(score_runner(config, workdir, mesh), timing)
    rounds.run_round()
    for _ in range(EVAL_RUNS):
      phases = [(_Intervals(modules[m], fn), key) for m, fn, key in EVAL_PHASES]
      with contextlib.ExitStack() as stack:
        for p, _ in phases:
          stack.enter_context(p.patched())
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = evaluation.evaluate(workdir, split="test")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
      rounds.run_round()
      runs.append(dict(seconds=seconds, cpu_s=cpu,
                       score_only_images_per_s=_adjacent_rate(rounds, len(runs), batch),
                       phases={key: p.within() for p, key in phases}))
  test_n = int(result["num_images"])
  val = pipeline.load_split(config.data, "val")
  val_n = len(val.source) if val is not None else 0  # scored for the ranking and thresholds
  best = min(runs, key=lambda r: r["seconds"])  # others' load only ever adds time
  out = dict(description=EVAL_NOTE, test_images=test_n, val_images_scored=val_n,
             first_run_s=first_s, runs=runs, seconds=best["seconds"],
             images_per_s=test_n / best["seconds"],
             scored_images_per_s=(test_n + val_n) / best["seconds"],
             cpu_ms_per_image=1e3 * best["cpu_s"] / test_n, phases=best["phases"],
             score_only=rounds.record(batch),
             score_only_images_per_s=best["score_only_images_per_s"])
  out["ratio"] = out["images_per_s"] / out["score_only_images_per_s"]
  if out["phases"].get("test_pass_s"):
    out["test_pass_images_per_s"] = test_n / out["phases"]["test_pass_s"]
  log(f"  eval: {out['images_per_s']:8.1f} test images/s end to end ({test_n} test, "
      f"{val_n} val images in {out['seconds']:.1f} s: "
      + ", ".join(f"{k} {v:.1f}" for k, v in out["phases"].items() if v is not None)
      + f"; first run {first_s:.1f} s), score-only "
      f"{out['score_only_images_per_s']:8.1f}", verbose)
  return out


def run_case(case_id: str, timing: Timing, sizes: Sizes, peak_gflops: float, *,
             modes: Sequence[str] = MODES, seed: int = 0, verbose: bool = False) -> dict:
  """Every measurement of one e2e case (module docstring); the record --out holds."""
  from jaxad.data import pipeline  # pylint: disable=import-outside-toplevel
  name = case_id.split("/", 1)[1]
  scratch = tempfile.mkdtemp(prefix="jaxad_bench_e2e_")
  try:
    t0 = time.perf_counter()
    os.makedirs(os.path.join(scratch, "data"))
    path = write_dataset(name, os.path.join(scratch, "data"), sizes, seed)
    generate_s = time.perf_counter() - t0
    config = bench_config(name, path, sizes, MODES[0])
    batch = config.train.batch_size
    split = pipeline.load_split(config.data, "train")
    steps_per_epoch = pipeline.steps_per_epoch(split, batch)
    mesh = parallel.make_mesh()
    log(f"{case_id}: {len(split.source)} train examples ({steps_per_epoch} steps/epoch of "
        f"{batch}), written in {generate_s:.1f} s", verbose)
    pipe = pipeline_rate(split, config, batches=4, min_s=sizes.pipeline_s)
    rounds = _Rounds(step_runner(config, split, mesh), timing)
    rounds.run_round()
    runs = {}
    for i, mode in enumerate(modes):  # a round of the step alone before and after each
      run = train_run(bench_config(name, path, sizes, mode),
                      os.path.join(scratch, f"run{i}_{mode}"), steps_per_epoch)
      rounds.run_round()
      run["step_only_images_per_s"] = _adjacent_rate(rounds, i, batch)
      run["ratio"] = run["images_per_s"] / run["step_only_images_per_s"]
      runs[MODE_NAMES[mode]] = run
      log(f"  e2e on_device={mode}: {run['images_per_s']:8.1f} images/s "
          f"({run['window_steps']} steps in {run['window_s']:.1f} s: validation "
          f"{run['val_s'] or 0:.1f} s, waiting for batches {run['pipeline_wait_s'] or 0:.1f}"
          f" s; startup {run['startup_s']:.1f} s), step-only "
          f"{run['step_only_images_per_s']:.1f}: x{run['ratio']:.2f}", verbose)
    step = rounds.record(batch)
    step_rate = step["images_per_s"]
    record = dict(description=DESCRIPTIONS[name], source=config.data.source,
                  batch=batch, steps_per_epoch=steps_per_epoch, epochs=sizes.epochs,
                  train_examples=len(split.source), generate_s=generate_s,
                  step_only=step, step_only_images_per_s=step_rate,
                  pipeline=pipe, pipeline_images_per_s=pipe["images_per_s"],
                  pipeline_over_step=pipe["images_per_s"] / step_rate, runs=runs)
    for run in runs.values():
      run["gflops"] = run["images_per_s"] * step["flops_per_image"] / 1e9
      run["fraction_of_peak"] = run["gflops"] / peak_gflops
    step["gflops"] = step_rate * step["flops_per_image"] / 1e9
    step["fraction_of_peak"] = step["gflops"] / peak_gflops
    log(f"  step-only {step_rate:8.1f} images/s (median of all rounds), pipeline "
        f"{pipe['images_per_s']:8.1f} (x{record['pipeline_over_step']:.1f}); CPU ms/image: "
        f"step {step['cpu_ms_per_image']:.3f}, pipeline {pipe['cpu_ms_per_image']:.3f}",
        verbose)
    if sizes.eval and MODES[0] in modes:
      workdir = os.path.join(scratch, f"run{list(modes).index(MODES[0])}_{MODES[0]}")
      record["eval"] = eval_record(config, workdir, timing, mesh, verbose)
    return record
  finally:
    _close_file_logs(scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def _close_file_logs(folder: str) -> None:
  """Removes the "jaxad" logger's file handlers (the workdirs' train.log) under `folder`."""
  logger = logging.getLogger("jaxad")
  for h in list(logger.handlers):
    path = getattr(h, "baseFilename", "")
    if path and os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep):
      logger.removeHandler(h)
      h.close()


def run_e2e_cases(case_ids: Sequence[str], timing: Timing, peak_gflops: float,
                  verbose: bool = False, sizes: dict | None = None) -> dict:
  """Every selected e2e case: the bench's FULL and QUICK protocols become E2E_FULL and
  E2E_QUICK with FULL_SIZES and QUICK_SIZES (other timings and `sizes` as given)."""
  quick = timing == QUICK
  timing = {FULL: E2E_FULL, QUICK: E2E_QUICK}.get(timing, timing)
  sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
  return {cid: run_case(cid, timing, sizes[cid.split("/", 1)[1]], peak_gflops,
                        verbose=verbose) for cid in case_ids}


def e2e_table(e2e: dict) -> str:
  """One row per training run and one per eval binary: images/s beside the step-only (or
  score-only) rate measured around it, their ratio, the pipeline alone over the step
  alone, GFLOP/s at the e2e rate; no PyTorch reference (—)."""
  head = ["e2e case", "images/s", "step-only images/s", "e2e/step", "pipeline images/s",
          "pipeline/step", "GFLOP/s", "fraction of peak", "torch images/s",
          "jaxad/torch"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for cid, r in e2e.items():
    for kind, run in r["runs"].items():
      rows.append("| " + " | ".join([
          f"{cid} train, {kind}", f"{run['images_per_s']:.1f}",
          f"{run['step_only_images_per_s']:.1f}", f"{run['ratio']:.2f}",
          f"{r['pipeline_images_per_s']:.0f}", f"{r['pipeline_over_step']:.1f}",
          f"{run['gflops']:.1f}", f"{run['fraction_of_peak']:.2f}", "—", "—"]) + " |")
    if "eval" in r:
      ev = r["eval"]
      rows.append("| " + " | ".join([
          f"{cid} eval (vs score-only)", f"{ev['images_per_s']:.1f}",
          f"{ev['score_only_images_per_s']:.1f}", f"{ev['ratio']:.2f}", "-", "-", "-",
          "-", "—", "—"]) + " |")
  return "\n".join(rows)
