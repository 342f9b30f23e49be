"""Tests of the input pipeline at accelerator speed: the device transform
(vqjax/data/device_transform.py) against NumPy, grain worker processes in
vqjax/data/pipeline.py (same batches and resume point for every count, a dying worker is an
error, not a hang) and the JPEG fast path of `folder.decode_image`."""

import json
import os
import pathlib
import signal

import jax
import numpy as np
import pytest
from data_helpers import data_config, take
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from vqjax.data import device_transform, folder, pipeline, sources

_NOWHERE = pathlib.Path("/nonexistent")  # these configs read no files


def _flips(rng, n):
  """Which images a step mirrors, drawn here from the documented key: fold_in(step key,
  FLIP_STREAM = "flip" in ASCII), Bernoulli(0.5) per image."""
  return np.asarray(jax.random.bernoulli(jax.random.fold_in(rng, 0x666C6970), 0.5, (n,)))


def _numpy_reference(images, rng, random_flip):
  """x / 127.5 - 1 in float32, then the mirrored images flipped by NumPy."""
  x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  flip = _flips(rng, len(images)) if random_flip else np.zeros(len(images), bool)
  x[flip] = x[flip][:, :, ::-1]
  return x, flip


def test_device_transform_matches_numpy_on_any_number_of_devices():
  cfg = data_config(_NOWHERE, random_flip=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 6, 5, 3), dtype=np.uint8)
  images[0, 0, 0] = (0, 255, 128)
  labels = np.arange(16, dtype=np.int32)
  step_key = jax.random.fold_in(jax.random.key(3), 7)
  want, flip = _numpy_reference(images, step_key, True)
  assert 0 < flip.sum() < 16  # some flip, some do not: the comparison can tell them apart

  fn = jax.jit(lambda b, k: device_transform.device_transform(b, k, cfg))
  for devices in (jax.devices()[:1], jax.devices()):  # 1 device, then 8 sharing the batch
    auto = (jax.sharding.AxisType.Auto,)  # as the trainer's mesh (sharding.make_mesh)
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=auto, devices=devices)
    batch = jax.device_put({"image": images, "label": labels}, NamedSharding(mesh, P("data")))
    out = jax.device_get(fn(batch, step_key))
    assert out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["image"], want)  # bit for bit
    np.testing.assert_array_equal(out["label"], labels)
  first = want[0, 0, -1] if flip[0] else want[0, 0, 0]
  assert first.tolist() == [-1.0, 1.0, float(np.float32(128) / np.float32(127.5) - 1)]


def test_device_scaling_is_exact_and_equals_the_hosts():
  cfg = data_config(_NOWHERE, random_flip=False)
  every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  key = jax.random.key(0)
  device = np.asarray(
    jax.jit(lambda b: device_transform.device_transform(b, key, cfg))({"image": every})["image"]
  )
  np.testing.assert_array_equal(device, _numpy_reference(every, key, False)[0])
  assert device.min() == -1.0 and device.max() == 1.0  # 0 -> -1, 255 -> 1 exactly
  np.testing.assert_array_equal(device, pipeline.transform_batch({"image": every}, cfg)["image"])
  # Without a key (init, eval) nothing flips; floating images are already scaled.
  cfg.random_flip = True
  x = np.linspace(-1, 1, 8 * 4 * 4, dtype=np.float32).reshape(8, 4, 4, 1)
  same = device_transform.device_transform({"image": x}, None, cfg)["image"]
  np.testing.assert_array_equal(np.asarray(same), x)
  flipped = device_transform.device_transform({"image": x}, key, cfg)["image"]
  flip = _flips(key, 8)
  assert 0 < flip.sum() < 8
  np.testing.assert_array_equal(
    np.asarray(flipped), np.where(flip[:, None, None, None], x[:, :, ::-1], x)
  )
  assert device_transform.device_transform({"codes": x}, key, cfg) == {"codes": x}


def test_flips_change_from_step_to_step_and_are_about_half():
  base = jax.random.key(1)
  masks = np.stack(
    [np.asarray(device_transform.flip_mask(jax.random.fold_in(base, s), 64)) for s in range(20)]
  )
  assert 0.4 < masks.mean() < 0.6
  assert len({m.tobytes() for m in masks}) == 20


def _toy_source(n=60):
  """Image i is filled with i (and its label is i), so a batch tells which examples it holds."""
  images = np.repeat(np.arange(n, dtype=np.uint8), 4 * 4).reshape(n, 4, 4, 1)
  return sources.ArraySource({"image": images, "label": np.arange(n, dtype=np.int32)})


def _iterator(source, processes, threads=0, batch_size=4):
  c = data_config(_NOWHERE, image_size=4, batch_size=batch_size)
  c.num_workers, c.worker_processes = threads, processes
  return pipeline.TrainIterator(source, c, 5, 0, 1, "local")


def _labels(batches):
  return [b["label"].tolist() for b in batches]


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_point():
  source = _toy_source()
  serial = _iterator(source, 0)
  expected = take(serial, 20)  # 15 batches per epoch: crosses into the second
  for b in expected:
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])
    assert b["image"].dtype == np.uint8
  # Two processes of two threads each: worker k reads batches k, k + 2, ...
  it = _iterator(source, 2, threads=2)
  got = take(it, 12)
  assert _labels([it.peek()]) == _labels(expected[12:13])  # from the workers, not consumed
  state = json.loads(json.dumps(it.get_state()))
  assert state["grain"] == {"next_index": 12} and (state["epoch"], state["step"]) == (0, 12)
  assert state == serial.get_state() | {"grain": {"next_index": 12}, "step": 12, "epoch": 0}
  got += take(it, 8)
  it.close()
  assert _labels(got) == _labels(expected)
  for x, y in zip(got, expected, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  # The position saved with two processes resumes with one, and with none: the same stream.
  resumed = _iterator(source, 1)
  resumed.set_state(state)
  assert _labels([resumed.peek()]) == _labels(expected[12:13])  # peeking consumes nothing
  assert _labels(take(resumed, 8)) == _labels(expected[12:])
  assert resumed.get_state()["grain"] == {"next_index": 20}
  resumed.close()
  resumed = _iterator(source, 0)
  resumed.set_state(state)
  assert _labels(take(resumed, 8)) == _labels(expected[12:])


class _Alarm:
  """Fails the test instead of hanging when the block takes more than `seconds`."""

  def __init__(self, seconds):
    self.seconds = seconds

  def __enter__(self):
    def fail(signum, frame):
      raise TimeoutError(f"hung for {self.seconds} s")

    self.previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(self.seconds)

  def __exit__(self, *exc):
    signal.alarm(0)
    signal.signal(signal.SIGALRM, self.previous)


@pytest.mark.slow
def test_a_dying_or_failing_worker_is_an_error_not_a_hang():
  parent = os.getpid()

  class Dying:
    """Example 7 kills the process reading it, when that is a worker (a crash, an OOM kill)."""

    def __init__(self, inner):
      self.inner = inner

    def __len__(self):
      return len(self.inner)

    def __getitem__(self, i):
      if i == 7 and os.getpid() != parent:
        os._exit(3)
      return self.inner[i]

  class Failing(Dying):
    def __getitem__(self, i):
      if i == 7:
        raise ValueError("cannot read example 7")
      return self.inner[i]

  with _Alarm(120):
    it = _iterator(Dying(_toy_source()), 2)  # a worker dies; the other one lives on
    with pytest.raises(pipeline.DataWorkerError, match="exit code 3.*worker_processes"):
      take(it, 15)  # every example is read in the first epoch
    it.close()
    it = _iterator(Failing(_toy_source()), 1)
    with pytest.raises(ValueError, match="cannot read example 7"):
      take(it, 15)
    it.close()


def _jpeg(path, size):
  """A smooth colour JPEG (gradients), so a downscaled decode stays close to a full one."""
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1)
  Image.fromarray(image.astype(np.uint8)).save(path, quality=95)


def test_decode_image_fast_path_against_a_full_decode(tmp_path):
  cfg = data_config(tmp_path, image_size=32, resize="resize_crop", channels=3, batch_size=1)
  big = tmp_path / "big.jpg"
  _jpeg(big, (300, 200))  # 6x the target: decoded at 1/4 scale, shorter side still >= 32
  fast = folder.decode_image(str(big), 3, min_size=32)
  assert fast.shape == (75, 50, 3)
  np.testing.assert_array_equal(fast, folder.decode_image(str(big), 3, min_size=32))
  full = folder.decode_image(str(big), 3)
  assert full.shape == (300, 200, 3)
  reference = pipeline.fit_image(full, 32, "resize_crop")
  got = pipeline.fit_image(fast, 32, "resize_crop")
  assert got.shape == reference.shape == (32, 32, 3)
  assert np.abs(got.astype(int) - reference.astype(int)).mean() < 3  # of 0..255 gradients
  # A JPEG under twice the size, or not a JPEG: decoded at full size.
  small = tmp_path / "small.jpg"
  _jpeg(small, (50, 63))
  np.testing.assert_array_equal(
    folder.decode_image(str(small), 1, min_size=32), folder.decode_image(str(small), 1)
  )
  png = tmp_path / "big.png"
  Image.open(big).save(png)
  assert folder.decode_image(str(png), 3, min_size=32).shape == (300, 200, 3)
  # The folder reader decodes small only where it resizes anyway.
  os.makedirs(tmp_path / "imgs" / "a")
  _jpeg(tmp_path / "imgs" / "a" / "x.jpg", (300, 200))
  cfg.update(name="folder", folder=str(tmp_path / "imgs"), reader="auto")
  assert sources.make_source(cfg, "train")[0]["image"].shape == (75, 50, 3)
  batch = next(pipeline.make_train_iterator(cfg, seed=0))
  np.testing.assert_array_equal(batch["image"][0], got)
  cfg.update(resize="center_crop")
  assert sources.make_source(cfg, "train")[0]["image"].shape == (300, 200, 3)
