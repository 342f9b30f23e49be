"""Tests for vqjax/data on Fashion-MNIST-like idx files: idx parsing, the local cache,
preprocessing, order, resume, reader resolution, per-host split, eval padding."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
from data_helpers import data_config, take

from vqjax import errors
from vqjax.configs import base_config
from vqjax.data import pipeline, sources

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
  """Encodes a uint8 array as idx, written here from the format spec, not by the code under test."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_fashion_dir(path, n_train=100, n_test=30):
  """A Debian-like directory of tiny idx .gz files; label i identifies example i (mod 256)."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  out = {}
  for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8)
    with gzip.open(os.path.join(path, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
      f.write(_idx_bytes(images))
    with gzip.open(os.path.join(path, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
      f.write(_idx_bytes(labels))
    out[split] = images
  return out


@pytest.fixture
def tiny(tmp_path):
  images = _write_fashion_dir(tmp_path / "fmnist")
  return data_config(tmp_path), images


def test_read_idx_values(tmp_path):
  a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  gz = tmp_path / "a-idx3-ubyte.gz"
  with gzip.open(gz, "wb") as f:
    f.write(_idx_bytes(a))
  raw = tmp_path / "b-idx1-ubyte"
  raw.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
  got = sources.read_idx(str(gz))
  assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
  np.testing.assert_array_equal(got, a)
  np.testing.assert_array_equal(sources.read_idx(str(raw)), [7, 8, 9])


@pytest.mark.parametrize(
  "payload",
  [
    bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]),  # unknown type code
    bytes([1, 2, 8, 1, 0, 0, 0, 1, 5]),  # bad magic
    bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]),  # truncated data
  ],
)
def test_read_idx_rejects_corrupt(tmp_path, payload):
  path = tmp_path / "broken-idx.gz"
  with gzip.open(path, "wb") as f:
    f.write(payload)
  with pytest.raises(ValueError, match="broken-idx.gz"):
    sources.read_idx(str(path))


def test_read_idx_rejects_truncated_gzip(tmp_path):
  path = tmp_path / "cut.gz"
  path.write_bytes(gzip.compress(_idx_bytes(np.arange(5000, dtype=np.uint8) * 7))[:300])
  with pytest.raises(ValueError, match="cut.gz"):
    sources.read_idx(str(path))


def test_local_cache_is_written_and_reused(tiny, tmp_path):
  c, images = tiny
  src = sources.make_source(c, "train")
  np.testing.assert_array_equal(src.features["image"][..., 0], images["train"])
  cache = tmp_path / "cache" / "fashion_mnist_local" / "train.npz"
  assert cache.is_file()
  # Same size, garbage content: only a reused cache can still give the right images.
  gz = tmp_path / "fmnist" / "train-images-idx3-ubyte.gz"
  gz.write_bytes(b"\0" * gz.stat().st_size)
  np.testing.assert_array_equal(
    sources.make_source(c, "train").features["image"][..., 0], images["train"]
  )
  assert len(sources.make_source(c, "train[:25]")) == 25
  assert pipeline.num_examples(c, "test") == 30


def test_missing_fashion_mnist_is_a_clear_error(tmp_path):
  c = data_config(tmp_path)
  with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
    pipeline.make_train_iterator(c, seed=0)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path):
  c = base_config().data
  c.data_dir = str(tmp_path)
  assert sources.resolve_reader(c) == "local"
  assert pipeline.num_examples(c, "train") == 60000
  assert pipeline.num_examples(c, "test") == 10000
  it = pipeline.make_train_iterator(c, seed=0)
  batch = next(it)
  x = batch["image"]  # training images stay uint8: the devices scale them
  assert x.shape == (128, 32, 32, 1) and x.dtype == np.uint8 and batch["label"].dtype == np.int32
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(x[:, border] == 0) and x.max() == 255
  assert set(np.unique(batch["label"])) <= set(range(10))
  # The interior is a raw image, unchanged; find which one by its pixels.
  raw = sources.read_idx(os.path.join(DEBIAN_DIR, "train-images-idx3-ubyte.gz"))
  raw_labels = sources.read_idx(os.path.join(DEBIAN_DIR, "train-labels-idx1-ubyte.gz"))
  match = np.flatnonzero((raw == x[0, 2:30, 2:30, 0]).all(axis=(1, 2)))
  assert len(match) and batch["label"][0] in raw_labels[match]
  assert it.get_state()["reader"] == "local"
  # Eval batches are scaled on the host: the same pixels in [-1, 1].
  ev = next(iter(pipeline.make_eval_iterator(c, max_batches=1)))
  raw_test = sources.read_idx(os.path.join(DEBIAN_DIR, "t10k-images-idx3-ubyte.gz"))
  expected = raw_test[0].astype(np.float64) / 127.5 - 1
  np.testing.assert_allclose(ev["image"][0, 2:30, 2:30, 0], expected, atol=1e-6)


def test_order_is_deterministic_and_epochs_cover_all(tiny):
  c, _ = tiny
  a = take(pipeline.make_train_iterator(c, seed=3), 20)
  b = take(pipeline.make_train_iterator(c, seed=3), 20)
  other = take(pipeline.make_train_iterator(c, seed=4), 10)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any((x["label"] != y["label"]).any() for x, y in zip(a[:10], other, strict=True))
  epoch0 = np.concatenate([x["label"] for x in a[:10]])
  epoch1 = np.concatenate([x["label"] for x in a[10:]])
  assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
  assert (epoch0 != epoch1).any()


def test_drop_last_partial_batch(tmp_path):
  _write_fashion_dir(tmp_path / "fmnist", n_train=95)
  it = pipeline.make_train_iterator(data_config(tmp_path, batch_size=10), seed=0)
  assert it.steps_per_epoch == 9
  labels = np.concatenate([x["label"] for x in take(it, 9)])
  assert len(set(labels)) == 90 and it.get_state()["epoch"] == 1


def _assert_same_batches(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [7, 10])  # mid-epoch, and exactly at the epoch boundary
def test_resume_gives_the_same_batches(tiny, num_workers, stop_at):
  c, _ = tiny
  c.random_flip = True
  c.num_workers = num_workers
  uninterrupted = take(pipeline.make_train_iterator(c, seed=7), 24)  # 10 batches per epoch
  it = pipeline.make_train_iterator(c, seed=7)
  take(it, stop_at)
  state = json.loads(json.dumps(it.get_state()))
  assert (state["epoch"], state["step"]) == divmod(stop_at, 10)
  it.close()
  resumed = pipeline.make_train_iterator(c, seed=7)
  resumed.set_state(state)
  _assert_same_batches(uninterrupted[stop_at:], take(resumed, 24 - stop_at))
  resumed.close()
  with pytest.raises(errors.UserError, match="seed=7.*--config.seed=7"):
    pipeline.make_train_iterator(c, seed=8).set_state(state)
  c.train_split = "train[:90]"
  with pytest.raises(errors.UserError, match="num_examples=100, this run has 90"):
    pipeline.make_train_iterator(c, seed=7).set_state(state)


def test_state_records_the_reader_and_a_mismatch_names_the_setting(tiny):
  c, _ = tiny
  it = pipeline.make_train_iterator(c, seed=0)
  state = json.loads(json.dumps(it.get_state()))
  assert state["reader"] == "local" and it.reader == "local"
  c.reader = "auto"  # Debian's files are in local_dir: auto resolves to the same reader
  pipeline.make_train_iterator(c, seed=0).set_state(state)
  moved = dict(state, reader="grain")  # as if "auto" had found no idx files where it was saved
  with pytest.raises(
    errors.UserError, match=r"saved by reader 'grain'.*set --config\.data\.reader=grain"
  ):
    pipeline.make_train_iterator(c, seed=0).set_state(moved)
  with pytest.raises(ValueError, match="another reader"):  # UserError is a ValueError
    it.set_state({k: v for k, v in state.items() if k not in ("grain", "epoch", "step")})


def test_resolve_reader(tiny, tmp_path, monkeypatch):
  c, _ = tiny
  c.reader = "auto"
  assert sources.resolve_reader(c) == "local"
  c.local_dir = str(tmp_path / "elsewhere")
  assert sources.resolve_reader(c) == "grain"  # no idx files: the tfds catalogue
  c.name = "cifar10"
  assert sources.resolve_reader(c) == "grain"
  c.reader = "local"
  with pytest.raises(errors.UserError, match="cifar10"):
    sources.resolve_reader(c)
  monkeypatch.setitem(sources.SOURCES, "toy", lambda config, split: None)
  c.name, c.reader = "toy", "auto"
  assert sources.resolve_reader(c) == "local"
  c.name = "folder"
  assert sources.resolve_reader(c) == "folder"
  c.reader = "grain"
  with pytest.raises(errors.UserError, match="reader=folder"):
    sources.resolve_reader(c)
  c.reader = "tfds"
  with pytest.raises(errors.UserError, match=r"auto\|local\|folder\|grain\|tfdata"):
    sources.resolve_reader(c)


def test_state_from_an_earlier_version_resumes_at_its_position(tiny):
  c, _ = tiny
  it = pipeline.make_train_iterator(c, seed=0)
  it.set_state(
    {
      "epoch": 1,
      "step": 3,
      "seed": 0,
      "num_examples": 100,
      "process_count": 1,
      "local_batch_size": 10,
    }
  )
  assert it.get_state()["grain"] == {"next_index": 13}


def test_workers_do_not_change_the_order(tiny):
  c, _ = tiny
  c.random_flip = True
  serial = take(pipeline.make_train_iterator(c, seed=1), 12)
  for workers in (1, 3):
    c.num_workers = workers
    threaded = pipeline.make_train_iterator(c, seed=1)
    _assert_same_batches(serial, take(threaded, 12))
    threaded.close()


def test_random_flip_is_left_to_the_devices(tiny):
  c, images = tiny
  plain = next(pipeline.make_train_iterator(c, seed=0))
  c.random_flip = True
  batch = next(pipeline.make_train_iterator(c, seed=0))
  # The host hands out the same unflipped uint8 batch; device_transform flips it in the step.
  np.testing.assert_array_equal(plain["image"], batch["image"])
  assert batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"][:, 2:30, 2:30, 0], images["train"][batch["label"]])


def _grain_order(seed: int, n: int, epochs: int) -> np.ndarray:
  """The example order of `epochs` epochs, re-derived from grain's index shuffle (the order
  one process of earlier versions read): epoch e is a permutation seeded with the 32-bit hash
  of (seed, 0) plus e."""
  import grain

  hashed = int(np.random.SeedSequence((seed, 0)).generate_state(1)[0])
  return np.array(
    [
      grain.experimental.index_shuffle(i, max_index=n - 1, seed=(hashed + e) % 2**32, rounds=4)
      for e in range(epochs)
      for i in range(n)
    ]
  )


def test_one_process_reads_the_order_of_earlier_versions(tiny):
  c, images = tiny
  batches = take(pipeline.make_train_iterator(c, seed=5), 20)  # two epochs of 10 batches
  order = _grain_order(5, 100, 2)
  for k, x in enumerate(batches):  # label i is example i
    np.testing.assert_array_equal(x["label"], order[10 * k : 10 * (k + 1)])
    np.testing.assert_array_equal(x["image"][:, 2:30, 2:30, 0], images["train"][x["label"]])
  # A state those versions saved (one process, with its count and per-process batch) resumes
  # there exactly.
  it = pipeline.make_train_iterator(c, seed=5)
  saved = {"seed": 5, "num_examples": 100, "process_count": 1, "local_batch_size": 10}
  it.set_state({"grain": {"next_index": 13}, "epoch": 1, "step": 3, "reader": "local", **saved})
  np.testing.assert_array_equal(next(it)["label"], order[130:140])


@pytest.mark.parametrize("process_count", [2, 5])
def test_hosts_read_their_slices_of_one_global_order(tiny, process_count):
  c, images = tiny
  order = _grain_order(0, 100, 2)
  b = 10 // process_count
  for p in range(process_count):
    it = pipeline.make_train_iterator(c, seed=0, process_index=p, process_count=process_count)
    assert it.local_batch_size == b and it.steps_per_epoch == 10
    for k, x in enumerate(take(it, 20)):  # host p: its slice of global batch k, and no more
      np.testing.assert_array_equal(x["label"], order[10 * k + p * b : 10 * k + (p + 1) * b])
      np.testing.assert_array_equal(x["image"][:, 2:30, 2:30, 0], images["train"][x["label"]])
    assert it.get_state()["epoch"] == 2
  with pytest.raises(ValueError, match="multiple of 3"):
    pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=3)


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 5), (5, 2)])
def test_a_resume_on_another_process_count_continues_the_global_order(tiny, saved_on, resumed_on):
  c, _ = tiny
  order = _grain_order(2, 100, 2)
  states = []
  for p in range(saved_on):
    it = pipeline.make_train_iterator(c, seed=2, process_index=p, process_count=saved_on)
    take(it, 13)
    states.append(json.loads(json.dumps(it.get_state())))
  assert all(s == states[0] for s in states)  # one position, the same on every host
  b = 10 // resumed_on
  for p in range(resumed_on):
    it = pipeline.make_train_iterator(c, seed=2, process_index=p, process_count=resumed_on)
    it.set_state(states[0])
    for k, x in enumerate(take(it, 3), start=13):
      np.testing.assert_array_equal(x["label"], order[10 * k + p * b : 10 * k + (p + 1) * b])


def test_a_per_host_state_of_an_earlier_version_keeps_its_position(tiny):
  c, _ = tiny
  old = {"grain": {"next_index": 4}, "seed": 0, "num_examples": 100, "reader": "local"}
  it = pipeline.make_train_iterator(c, seed=0)
  it.set_state({**old, "process_count": 2, "local_batch_size": 5})  # a global batch of 10
  assert it.get_state()["grain"] == {"next_index": 4}
  with pytest.raises(errors.UserError, match=r"batch_size=6.*--config\.data\.batch_size=6"):
    it.set_state({**old, "process_count": 2, "local_batch_size": 3})


def test_eval_covers_the_split_once_with_mask(tiny):
  c, images = tiny
  labels, batches = [], 0
  for p in range(2):
    ev = pipeline.make_eval_iterator(c, process_index=p, process_count=2)
    assert len(ev) == 4  # 15 examples per host in batches of 4
    for b in ev:
      batches += 1
      assert b["image"].shape == (4, 32, 32, 1) and b["mask"].dtype == np.float32
      real = b["mask"] == 1
      labels += list(b["label"][real])
      for x, lab in zip(b["image"][real], b["label"][real], strict=True):
        np.testing.assert_allclose(x[2:30, 2:30, 0], images["test"][lab] / 127.5 - 1, atol=1e-6)
  assert batches == 8 and sorted(labels) == list(range(30))
  assert len(list(pipeline.make_eval_iterator(c, max_batches=2))) == 2


def test_preprocess_modes_against_numpy():
  c = base_config().data
  c.image_size, c.channels = 4, 1
  img = np.arange(36, dtype=np.uint8).reshape(1, 6, 6, 1) * 7
  c.resize = "center_crop"
  expected = img[0, 1:5, 1:5, 0] / 127.5 - 1
  np.testing.assert_allclose(pipeline.preprocess(img, c)[0, ..., 0], expected, atol=1e-6)
  c.resize, c.image_size = "pad", 8
  padded = np.zeros((8, 8))
  padded[1:7, 1:7] = img[0, ..., 0]
  np.testing.assert_allclose(
    pipeline.preprocess([img[0]], c)[0, ..., 0], padded / 127.5 - 1, atol=1e-6
  )
  c.resize, c.image_size = "resize_crop", 3
  wide = np.zeros((6, 12, 3), np.uint8)
  wide[:, 3:9] = 255  # the centre crop keeps only the bright middle
  out = pipeline.preprocess([wide], c)
  assert out.shape == (1, 3, 3, 1) and out[0, :, 1].min() > 0.9
  rgb = np.array([[[[255, 0, 0]]]], np.uint8)
  c.resize, c.image_size = "pad", 1
  luma = round(0.299 * 255) / 127.5 - 1  # ITU-R 601 weight of red
  np.testing.assert_allclose(pipeline.preprocess(rgb, c)[0, 0, 0, 0], luma, atol=1e-6)
  c.resize = "stretch"
  with pytest.raises(ValueError, match="resize"):
    pipeline.preprocess([wide], c)
