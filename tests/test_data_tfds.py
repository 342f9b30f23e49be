"""Tests for vqjax/data's tfds readers: grain over tfds.data_source (ArrayRecord, no
TensorFlow) and tf.data over tfds.load (TFRecord; these skip where TensorFlow is missing)."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import data_config, take

from vqjax.data import pipeline, tfds_data


def _tiny_image(i):
  """Example i of the tiny tfds set: halves i % 251 and 255 - i % 251 (never equal: flips show)."""
  image = np.full((28, 28, 1), i % 251, np.uint8)
  image[:, 14:] = 255 - i % 251
  return image


class VqjaxTinyTestDs(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset written without TensorFlow: Tensor features need no image encoder."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {"image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8), "label": np.int64}
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(400), "test": self._generate_examples(9)}

  def _generate_examples(self, n=0):
    for i in range(n):
      yield i, {"image": _tiny_image(i), "label": i}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  VqjaxTinyTestDs(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture
def grain_config(tmp_path, tiny_tfds_dir):
  return data_config(
    tmp_path, name="vqjax_tiny_test_ds", reader="grain", data_dir=tiny_tfds_dir, batch_size=40
  )


def _assert_tiny_images(batch):
  """Checks every image against its label's example padded to 32: training batches exactly,
  uint8 and never flipped (the devices scale and flip them), eval batches scaled to [-1, 1]
  (computed here independently)."""
  for x, label in zip(batch["image"], batch["label"], strict=True):
    padded = np.zeros((32, 32, 1), np.uint8)
    padded[2:30, 2:30] = _tiny_image(int(label))
    if batch["image"].dtype == np.uint8:
      np.testing.assert_array_equal(x, padded)
    else:
      assert batch["image"].dtype == np.float32
      np.testing.assert_allclose(x, padded.astype(np.float64) / 127.5 - 1, atol=1e-6)


def _assert_same_batches(a, b):
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_grain_reader_values_and_epochs(grain_config):
  c = grain_config
  assert pipeline.num_examples(c, "train") == 400 and pipeline.num_examples(c, "test") == 9
  it = pipeline.make_train_iterator(c, seed=0)
  assert isinstance(it, pipeline.TrainIterator) and "grain" in it.get_state()
  assert (it.local_batch_size, it.steps_per_epoch, it.reader) == (40, 10, "grain")
  assert it.get_state()["reader"] == "grain"
  batches = take(it, 20)
  for b in batches:
    assert b["image"].shape == (40, 32, 32, 1) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32
    _assert_tiny_images(b)
  epoch0 = np.concatenate([b["label"] for b in batches[:10]])
  epoch1 = np.concatenate([b["label"] for b in batches[10:]])
  assert sorted(epoch0) == list(range(400)) and sorted(epoch1) == list(range(400))
  assert (epoch0 != epoch1).any()  # each epoch is shuffled anew
  it.close()
  # 400 // 48 = 8 batches: each epoch drops its own 16 examples, no batch spans two epochs.
  c.batch_size = 48
  it = pipeline.make_train_iterator(c, seed=0)
  assert it.steps_per_epoch == 8
  labels = [np.concatenate([b["label"] for b in take(it, 8)]) for _ in range(2)]
  assert all(len(set(x)) == 384 for x in labels) and set(labels[0]) != set(labels[1])
  assert it.get_state()["grain"]["next_index"] == 16
  ev = list(pipeline.make_eval_iterator(c))
  assert len(ev) == 2 and ev[1]["mask"].sum() == 1  # 9 examples in batches of 8


def test_grain_reader_seed_fixes_the_batches(grain_config):
  c = grain_config
  c.random_flip = True
  a = take(pipeline.make_train_iterator(c, seed=3), 12)
  _assert_same_batches(a, take(pipeline.make_train_iterator(c, seed=3), 12))
  other = take(pipeline.make_train_iterator(c, seed=4), 12)
  assert any((x["label"] != y["label"]).any() for x, y in zip(a, other, strict=True))
  for b in a + other:  # random_flip is for the devices: the host never mirrors an image
    _assert_tiny_images(b)


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["grain", "tfdata"])
def test_reader_resume_gives_the_same_batches(reader, request):
  c = request.getfixturevalue(f"{reader}_config")  # the tfdata one skips without TensorFlow
  c.random_flip = True
  it = pipeline.make_train_iterator(c, seed=7)
  first = next(it)
  # The trainer peeks at one batch and rewinds before training.
  it.set_state(pipeline.make_train_iterator(c, seed=7).get_state())
  _assert_same_batches([first], [next(it)])
  take(it, 6)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 6)  # crosses the epoch boundary at batch 10
  for b in expected:
    _assert_tiny_images(b)
  resumed = pipeline.make_train_iterator(c, seed=7)
  resumed.set_state(state)
  _assert_same_batches(expected, take(resumed, 6))
  assert resumed.get_state() == it.get_state()
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_train_iterator(c, seed=8).set_state(state)
  if reader == "grain":
    c.batch_size = 20
    with pytest.raises(ValueError, match=r"saved batch_size=\d+, this run has 20"):
      pipeline.make_train_iterator(c, seed=7).set_state(state)
    with pytest.raises(ValueError, match="another reader"):
      resumed.set_state({"seed": 7, "reader": "grain"})
    # A state of the other tfds reader names the setting that reads it.
    with pytest.raises(ValueError, match="set --config.data.reader=tfdata"):
      resumed.set_state({"epoch": 1, "step": 3, "seed": 7, "reader": "tfdata"})


def test_grain_reader_hosts_get_disjoint_shards(grain_config):
  c = grain_config
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(c, seed=0, process_index=p, process_count=2)
    assert it.local_batch_size == 20 and it.steps_per_epoch == 10
    batches = take(it, it.steps_per_epoch)
    for b in batches:
      _assert_tiny_images(b)
    seen.append(np.concatenate([b["label"] for b in batches]))
    assert len(set(seen[-1])) == 200
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(400))


def test_grain_reader_threads_do_not_change_the_batches(grain_config):
  c = grain_config
  c.random_flip, c.batch_size = True, 16
  serial = take(pipeline.make_train_iterator(c, seed=0), 30)
  c.num_workers = 2
  threaded_it = pipeline.make_train_iterator(c, seed=0)
  threaded = take(threaded_it, 30)
  threaded_it.close()
  _assert_same_batches(serial, threaded)
  for b in threaded:  # each record stays with its own label
    _assert_tiny_images(b)


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
  c = data_config(tmp_path, name="mnist", reader="grain", data_dir=str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="not prepared"):
    pipeline.make_train_iterator(c, seed=0)
  c.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="Unknown tfds dataset"):
    pipeline.num_examples(c, "train")
  c.name, c.reader = "fashion_mnist", "auto"  # no Debian files in local_dir: falls back to tfds
  with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
    pipeline.make_train_iterator(c, seed=0)


def test_tfdata_reader_needs_tensorflow(tmp_path):
  try:
    import tensorflow  # noqa: F401

    pytest.skip("TensorFlow is installed")
  except ImportError:
    pass
  c = data_config(tmp_path, name="mnist", reader="tfdata")
  with pytest.raises(ValueError, match="tensorflow-cpu"):
    pipeline.make_train_iterator(c, seed=0)
  with pytest.raises(ValueError, match="tensorflow-cpu"):
    pipeline.make_eval_iterator(c)


class VqjaxTinyTfrecordDs(tfds.core.GeneratorBasedBuilder):
  """The tiny set with PNG-encoded Image features, for the "tfdata" reader (needs TensorFlow)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(28, 28, 1)), "label": np.int64}
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(100), "test": self._generate_examples(9)}

  def _generate_examples(self, n=0):
    for i in range(n):
      yield i, {"image": _tiny_image(i), "label": i}


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory):
  """A data_dir with both tiny sets prepared as TFRecord, offline (skips without TensorFlow)."""
  pytest.importorskip("tensorflow")
  data_dir = str(tmp_path_factory.mktemp("tfrecord"))
  for builder in (VqjaxTinyTfrecordDs, VqjaxTinyTestDs):
    builder(data_dir=data_dir, file_format="tfrecord").download_and_prepare(
      download_config=tfds.download.DownloadConfig()
    )
  return data_dir


@pytest.fixture
def tfdata_config(tmp_path, tfrecord_dir):
  return data_config(
    tmp_path,
    name="vqjax_tiny_tfrecord_ds",
    reader="tfdata",
    data_dir=tfrecord_dir,
    batch_size=10,
    eval_batch_size=4,
  )


def test_tfdata_reader_values_epochs_and_seed(tfdata_config):
  c = tfdata_config
  assert pipeline.num_examples(c, "train") == 100 and pipeline.num_examples(c, "test") == 9
  assert pipeline.num_examples(c, "train[:64]") == 64
  it = pipeline.make_train_iterator(c, seed=3)
  assert isinstance(it, tfds_data.TfDataTrainIterator)
  assert (it.local_batch_size, it.steps_per_epoch, it.reader) == (10, 10, "tfdata")
  batches = take(it, 20)
  for b in batches:
    assert b["image"].shape == (10, 32, 32, 1) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32
    _assert_tiny_images(b)
  epoch0 = np.concatenate([b["label"] for b in batches[:10]])
  epoch1 = np.concatenate([b["label"] for b in batches[10:]])
  assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
  assert (epoch0 != epoch1).any()  # each epoch is shuffled anew
  assert it.get_state()["epoch"] == 2
  _assert_same_batches(batches, take(pipeline.make_train_iterator(c, seed=3), 20))
  other = take(pipeline.make_train_iterator(c, seed=4), 10)
  assert any((x["label"] != y["label"]).any() for x, y in zip(batches, other, strict=True))


def test_tfdata_reader_hosts_get_disjoint_shards(tfdata_config):
  c = tfdata_config
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(c, seed=0, process_index=p, process_count=2)
    assert it.local_batch_size == 5 and it.steps_per_epoch == 10
    batches = take(it, it.steps_per_epoch)
    for b in batches:
      _assert_tiny_images(b)
    seen.append(np.concatenate([b["label"] for b in batches]))
    assert len(set(seen[-1])) == 50 and it.get_state()["epoch"] == 1
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(100))
  # Its order is per host: on another number of processes a saved position restarts it.
  one = pipeline.make_train_iterator(c, seed=0)
  one.set_state(it.get_state())
  assert (one.get_state()["epoch"], one.get_state()["step"]) == (0, 0)
  with pytest.raises(ValueError, match="multiple of 3"):
    pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=3)


def test_tfdata_eval_covers_the_split_once_with_mask(tfdata_config):
  c = tfdata_config
  labels, batches = [], 0
  for p in range(2):
    ev = pipeline.make_eval_iterator(c, process_index=p, process_count=2)
    assert len(ev) == 3  # 9 examples: 5 and 4 per host, in batches of 2
    for b in ev:
      batches += 1
      assert b["image"].shape == (2, 32, 32, 1) and b["mask"].dtype == np.float32
      real = b["mask"] == 1
      assert np.all(b["image"][~real] == -1.0)
      labels += list(b["label"][real])
      _assert_tiny_images({"image": b["image"][real], "label": b["label"][real]})
  assert batches == 6 and sorted(labels) == list(range(9))
  ev = pipeline.make_eval_iterator(c, max_batches=2)
  assert len(list(ev)) == 2 and len(list(ev)) == 2  # re-iterable


def test_tfdata_reader_tensor_features_and_arrayrecord(tfdata_config, tiny_tfds_dir):
  c = tfdata_config
  c.name, c.batch_size = "vqjax_tiny_test_ds", 40  # Tensor features: stored unencoded
  it = pipeline.make_train_iterator(c, seed=0)
  labels = np.concatenate([take(it, 1)[0]["label"]] + [b["label"] for b in take(it, 9)])
  assert sorted(labels) == list(range(400))
  ev = list(pipeline.make_eval_iterator(c))
  assert len(ev) == 3 and ev[2]["mask"].sum() == 1
  for b in ev:
    _assert_tiny_images({"image": b["image"][b["mask"] == 1], "label": b["label"][b["mask"] == 1]})
  c.data_dir = tiny_tfds_dir  # the same set prepared as ArrayRecord
  with pytest.raises(ValueError, match="reader='grain'"):
    pipeline.make_train_iterator(c, seed=0)
  with pytest.raises(ValueError, match="reader='grain'"):
    pipeline.make_eval_iterator(c)


@pytest.mark.slow
def test_tfdata_reader_trains_one_step(tfrecord_dir, tmp_path):
  import importlib.util

  from vqjax.training import trainer

  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "fashion_mnist.py")
  spec = importlib.util.spec_from_file_location("fashion_mnist_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data.update(
    name="vqjax_tiny_tfrecord_ds",
    reader="tfdata",
    data_dir=tfrecord_dir,
    train_split="train[:64]",
    eval_split="test",
  )
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 1 and np.isfinite(result["loss"])
  assert result["eval/examples"] == 8  # one eval batch of 8 real test images
