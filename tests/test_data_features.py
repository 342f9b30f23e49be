"""Tests for vqjax/data's handling of features by kind, through sources registered in SOURCES:
integer-only sources pass through exactly, training images stay uint8, eval images are scaled
exactly, eval pads per feature."""

import json

import numpy as np
import pytest
from data_helpers import data_config, take

from vqjax import errors
from vqjax.data import pipeline, sources

N = 24


def _codes(n=N):
  """Integer-only features: code map i holds i * 64 + 0..63 (beyond uint8, to catch casts)."""
  codes = np.arange(n, dtype=np.int32)[:, None] * 64 + np.arange(64, dtype=np.int32)
  return {"codes": codes.reshape(n, 8, 8), "label": np.arange(n, dtype=np.int32) % 5}


def _register(monkeypatch, tmp_path, features_fn, **overrides):
  """Registers a toy source under "toy" whose train split is `features_fn()`."""
  calls = []

  def factory(config, split):
    calls.append(split)
    return sources.ArraySource(features_fn(split))

  monkeypatch.setitem(sources.SOURCES, "toy", factory)
  c = data_config(tmp_path, name="toy", reader="auto", batch_size=4, eval_batch_size=4, **overrides)
  return c, calls


def test_integer_only_source_round_trips_exactly(monkeypatch, tmp_path):
  feats = _codes()
  # image_size/resize/channels/random_flip are image settings: meaningless here, never applied.
  c, calls = _register(
    monkeypatch,
    tmp_path,
    lambda split: feats,
    image_size=3,
    resize="center_crop",
    channels=3,
    random_flip=True,
  )
  it = pipeline.make_train_iterator(c, seed=0)
  assert it.reader == "local" and calls == ["train"]
  batches = take(it, 2 * it.steps_per_epoch)
  seen = []
  for b in batches:
    assert set(b) == {"codes", "label"}
    assert b["codes"].dtype == np.int32 and b["codes"].shape == (4, 8, 8)
    assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
    index = b["codes"][:, 0, 0] // 64  # which example each row is
    np.testing.assert_array_equal(b["codes"], feats["codes"][index])
    np.testing.assert_array_equal(b["label"], feats["label"][index])
    seen.append(index)
  assert sorted(np.concatenate(seen[:6])) == list(range(N))  # one epoch: every example once
  # The trainer's resume path works the same without images.
  state = json.loads(json.dumps(it.get_state()))
  more = take(it, 3)
  resumed = pipeline.make_train_iterator(c, seed=0)
  resumed.set_state(state)
  for x, y in zip(more, take(resumed, 3), strict=True):
    np.testing.assert_array_equal(x["codes"], y["codes"])


def test_image_is_scaled_exactly_and_other_features_pass_through(monkeypatch, tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, 4, 4, 1), dtype=np.uint8)
  images[:, 0, 0], images[:, 0, 1] = 0, 255
  feats = {"image": images, **_codes(), "weight": np.linspace(0, 1, N, dtype=np.float32)}
  c, _ = _register(monkeypatch, tmp_path, lambda split: feats, image_size=4, resize="pad")
  for b in take(pipeline.make_train_iterator(c, seed=3), 6):
    index = b["codes"][:, 0, 0] // 64
    # Training images leave the host as they are stored; the devices scale them.
    assert b["image"].dtype == np.uint8 and b["weight"].dtype == np.float32
    np.testing.assert_array_equal(b["image"], images[index])
    np.testing.assert_array_equal(b["weight"], feats["weight"][index])
    np.testing.assert_array_equal(b["label"], feats["label"][index])
  c.eval_batch_size = N
  (ev,) = list(pipeline.make_eval_iterator(c))  # eval: scaled on the host, in example order
  assert ev["image"].dtype == np.float32
  np.testing.assert_array_equal(ev["image"][:, 0, 0], -1.0)  # exactly, not approximately
  np.testing.assert_array_equal(ev["image"][:, 0, 1], 1.0)
  expected = images.astype(np.float64) / 127.5 - 1
  np.testing.assert_allclose(ev["image"], expected, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(ev["weight"], feats["weight"])


def test_eval_pads_each_feature_by_kind(monkeypatch, tmp_path):
  n = 5
  images = np.full((n, 2, 2, 1), 200, np.uint8)
  feats = {"image": images, **_codes(n), "weight": np.full(n, 0.5, np.float32)}
  c, _ = _register(monkeypatch, tmp_path, lambda split: feats, image_size=2, resize="pad")
  batches = list(pipeline.make_eval_iterator(c))
  assert len(batches) == 2  # 5 examples in batches of 4
  last = batches[1]
  np.testing.assert_array_equal(last["mask"], [1, 0, 0, 0])
  assert last["mask"].dtype == np.float32
  np.testing.assert_array_equal(last["codes"][0], feats["codes"][4])
  np.testing.assert_array_equal(last["codes"][1:], 0)
  np.testing.assert_array_equal(last["label"][1:], 0)
  np.testing.assert_array_equal(last["weight"], [0.5, 0, 0, 0])
  np.testing.assert_allclose(last["image"][0], 200 / 127.5 - 1, atol=1e-7)
  np.testing.assert_array_equal(last["image"][1:], -1.0)
  assert last["codes"].dtype == np.int32 and last["image"].dtype == np.float32
  # Two hosts, 2 per batch: host 1 has examples 1 and 3, so its second batch is all padding,
  # yet it must have every feature, in the shapes and dtypes of host 0's.
  per_host = [list(pipeline.make_eval_iterator(c, p, 2)) for p in range(2)]
  assert [len(h) for h in per_host] == [2, 2]
  empty, full = per_host[1][1], per_host[0][1]
  assert empty.keys() == full.keys()
  for k in full:
    assert empty[k].shape == full[k].shape and empty[k].dtype == full[k].dtype
  np.testing.assert_array_equal(empty["mask"], 0)
  np.testing.assert_array_equal(empty["codes"], 0)
  np.testing.assert_array_equal(empty["image"], -1.0)
  real = sorted(
    int(c)
    for h in per_host
    for b in h
    for c, m in zip(b["codes"][:, 0, 0] // 64, b["mask"], strict=True)
    if m
  )
  assert real == list(range(n))


def test_array_source_checks_its_arrays():
  with pytest.raises(errors.UserError, match="differ in length"):
    sources.ArraySource({"codes": np.zeros((3, 2), np.int32), "label": np.zeros(4, np.int32)})
  with pytest.raises(errors.UserError, match="uint8"):
    sources.ArraySource({"image": np.zeros((3, 2, 2, 1), np.float32)})
  src = sources.ArraySource.from_images(np.zeros((3, 2, 2), np.uint8), [4, 5, 6])
  assert src.features["image"].shape == (3, 2, 2, 1) and src[2]["label"] == 6


class _ListSource:
  """A source of differently sized images, read one example at a time."""

  def __init__(self, sizes):
    self._sizes = sizes

  def __len__(self):
    return len(self._sizes)

  def __getitem__(self, i):
    return {"image": np.zeros((self._sizes[i], self._sizes[i], 1), np.uint8), "label": np.int32(i)}


def test_pad_error_names_the_example(monkeypatch, tmp_path):
  monkeypatch.setitem(sources.SOURCES, "toy", lambda config, split: _ListSource([4] * 5 + [9]))
  c = data_config(
    tmp_path, name="toy", reader="local", image_size=8, resize="pad", eval_batch_size=6
  )
  with pytest.raises(errors.UserError, match="image example 5 is 9x9"):
    list(pipeline.make_eval_iterator(c))
  batch = pipeline.load_batch(_ListSource([4, 8, 2]), [0, 1, 2], c)
  assert batch["image"].shape == (3, 8, 8, 1) and batch["label"].tolist() == [0, 1, 2]
