"""The tf.data pipeline: order from the seed, exact resume, process slices, eval coverage."""

import numpy as np
import pytest
from PIL import Image

from jaxad.data import pipeline
from jaxad.errors import DataError


def _split(make_config, **overrides):
  config = make_config(**overrides)
  return pipeline.load_split(config.data, "train"), config


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_are_deterministic_and_scaled(make_config):
  split, config = _split(make_config)
  a = _take(pipeline.train_batches(split, config.data, seed=3, global_batch=16), 6)
  b = _take(pipeline.train_batches(split, config.data, seed=3, global_batch=16), 6)
  c = _take(pipeline.train_batches(split, config.data, seed=4, global_batch=16), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  image = a[0]["image"]
  assert image.shape == (16, 8, 8, 1) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.05


def test_every_epoch_visits_each_normal_image_once(make_config):
  split, config = _split(make_config)
  steps = pipeline.steps_per_epoch(split, 16)
  batches = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16),
                  2 * steps)
  first = np.concatenate([b["index"] for b in batches[:steps]])
  second = np.concatenate([b["index"] for b in batches[steps:]])
  assert len(set(first)) == len(first) == steps * 16
  assert set(first) <= set(split.normal_indices)
  assert not np.array_equal(first, second)  # reshuffled every epoch


def test_resume_continues_the_same_stream(make_config):
  split, config = _split(make_config)
  full = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16), 9)
  resumed = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16,
                                         start_step=5), 4)
  for x, y in zip(full[5:], resumed):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_process_slices_make_the_global_batch(make_config):
  split, config = _split(make_config)
  whole = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16), 5)
  parts = [_take(pipeline.train_batches(split, config.data, seed=0, global_batch=16,
                                        process_index=p, process_count=2), 5)
           for p in range(2)]
  for step in range(5):
    joined = np.concatenate([parts[0][step]["index"], parts[1][step]["index"]])
    np.testing.assert_array_equal(joined, whole[step]["index"])


def test_training_keeps_only_normal_classes(make_config):
  split, config = _split(make_config, **{"data.source": "digits", "data.image_size": 8,
                                         "data.normal_classes": (),
                                         "data.anomalous_classes": (9,)})
  labels = np.concatenate([b["label"] for b in _take(
      pipeline.train_batches(split, config.data, seed=0, global_batch=16), 30)])
  assert 9 not in labels and set(labels) == set(range(9))


@pytest.mark.parametrize("n_procs", [1, 3])
def test_eval_scores_every_example_exactly_once(make_config, n_procs):
  config = make_config()
  split = pipeline.load_split(config.data, "test")
  n = len(split.source)
  seen, valid = [], []
  for p in range(n_procs):
    for b in pipeline.eval_batches(split, config.data, global_batch=12, process_index=p,
                                   process_count=n_procs):
      seen.append(b["index"][b["valid"] > 0])
      valid.append(b["valid"])
      assert "mask" in b and b["mask"].shape[1:] == (8, 8, 1)
  seen = np.concatenate(seen)
  assert sorted(seen) == list(range(n))
  assert np.concatenate(valid).sum() == n


def test_uint16_and_rgb_are_converted(make_config, tmp_path):
  for split, cls in [("train", "NORMAL"), ("test", "NORMAL")]:
    folder = tmp_path / split / cls
    folder.mkdir(parents=True)
    for i in range(4):
      Image.fromarray(np.full((10, 12), 1000 * (i + 1), np.uint16)).save(folder / f"{i}.png")
  config = make_config(**{"data.source": "folder", "data.path": str(tmp_path),
                          "data.normal_classes": ("NORMAL",), "data.val_split": "",
                          "data.channels": 3, "data.intensity_range": (0, 4000)})
  split = pipeline.load_split(config.data, "test")
  batch = next(pipeline.eval_batches(split, config.data, global_batch=4))
  assert batch["image"].shape == (4, 8, 8, 3)
  # 1000·(i+1) in a 0..4000 window → [0.25, 0.5, 0.75, 1] → [-0.5, 0, 0.5, 1]
  np.testing.assert_allclose(batch["image"][:, 3, 3, 0], [-0.5, 0.0, 0.5, 1.0], atol=1e-5)


def test_corrupt_file_is_named_through_the_pipeline(make_config, tmp_path):
  folder = tmp_path / "train" / "NORMAL"
  folder.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i}.png")
  (folder / "3_broken.png").write_bytes(b"not a png at all")
  config = make_config(**{"data.source": "folder", "data.path": str(tmp_path),
                          "data.normal_classes": ("NORMAL",), "data.val_split": ""})
  split = pipeline.load_split(config.data, "train")
  with pytest.raises(DataError, match="3_broken.png"):
    list(pipeline.eval_batches(split, config.data, global_batch=4))
