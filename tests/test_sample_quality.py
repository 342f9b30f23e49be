"""Sample-quality references (vqjax/evaluation/samples.py), the unigram baseline
(evaluation/metrics.py) and the cached evaluation network (evaluation/feature_network.py),
against hand-derived values and NumPy."""

import gzip
import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest

from vqjax import configs, errors
from vqjax.evaluation import feature_network, frechet, metrics, samples


def test_blur_averages_each_2x2_block():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1) / 32.0 - 1.0
  out = samples.blur(x)
  assert out.shape == x.shape and out.dtype == np.float32
  # Hand-derived: the top-left block of image 0 holds x[0,0:2,0:2] = {0, 1, 4, 5} / 32 - 1.
  expected = (0 + 1 + 4 + 5) / 4 / 32.0 - 1.0
  assert np.allclose(out[0, :2, :2, 0], expected)
  for i in range(2):
    for r in range(0, 4, 2):
      for c in range(0, 4, 2):
        assert np.allclose(out[i, r : r + 2, c : c + 2, 0], x[i, r : r + 2, c : c + 2, 0].mean())
  # uint8 images are scaled to [-1, 1] first; a flat image stays flat.
  flat = np.full((1, 2, 2, 1), 255, np.uint8)
  assert np.allclose(samples.blur(flat), 1.0)
  with pytest.raises(ValueError, match="even"):
    samples.blur(np.zeros((1, 3, 4, 1), np.float32))


def test_unigram_bits_match_a_hand_computation():
  # Add-one counts [4, 2, 1] / 7; each test code once.
  bits = metrics.unigram_bits_per_code([3, 1, 0], [1, 1, 1])
  expected = -(math.log2(4 / 7) + math.log2(2 / 7) + math.log2(1 / 7)) / 3
  assert bits == pytest.approx(expected, rel=1e-12)
  # Codes that match the training frequencies cost their entropy; uniform codes log2(K).
  assert metrics.unigram_bits_per_code([10**6] * 8, [5] * 8) == pytest.approx(3.0, abs=1e-5)
  with pytest.raises(ValueError):
    metrics.unigram_bits_per_code([1, 2], [0, 0])


def test_too_few_samples_give_nan_with_a_note():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(300, 5))
  gen = rng.normal(size=(16, 5))
  probs = np.full((16, 10), 0.1)
  out = samples._quality(real, gen, probs)
  assert math.isnan(out["precision"]) and math.isnan(out["inception_score"])
  assert "16 samples" in out["note"] and "100" in out["note"]
  fd = frechet.frechet_distance_from_features(real, gen)
  assert out["frechet_distance"] == pytest.approx(fd)
  # The judge's class shares are counted whatever the size: all argmax ties go to class 0.
  assert out["class_shares"][0] == 1.0 and out["class_share_min"] == 0.0
  big = samples._quality(real, rng.normal(size=(120, 5)))
  assert np.isfinite(big["precision"]) and "note" not in big


def test_references_stand_where_they_should(monkeypatch):
  """Real held-out features near the real set score a smaller FD than shifted ("blurred")
  ones, and the rows carry both names."""
  rng = np.random.default_rng(1)
  refs = samples.References.__new__(samples.References)
  refs.count = 200
  refs.real = rng.normal(size=(200, 4))
  refs.blurred = rng.normal(size=(200, 4)) + 1.5
  refs.labels, refs.num_classes = None, None
  real_f = rng.normal(size=(500, 4))
  rows = refs.rows(real_f, 150)
  assert "real_images/classification_accuracy_score" not in rows  # no labels: no CAS
  assert rows["reference_count"] == 150
  assert rows["real_images/frechet_distance"] < rows["blurred_images/frechet_distance"]
  expected = frechet.frechet_distance_from_features(real_f, refs.blurred[:150])
  assert rows["blurred_images/frechet_distance"] == pytest.approx(expected)
  ratio = samples._with_ratio({"frechet_distance": 2.0, **rows})["fd_ratio_to_blurred"]
  assert ratio == pytest.approx(2.0 / expected)


def test_references_carry_a_classification_accuracy_score():
  """With labels, CAS of the held-out images: two well-separated classes give 1 (a classifier
  trained on them labels every real image right); "blurred" features that lost the class give
  a chance-level score (hand-derived: the real set is half of each class)."""
  rng = np.random.default_rng(2)
  centres = np.array([[-4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
  refs = samples.References.__new__(samples.References)
  refs.count, refs.num_classes = 200, 2
  refs.labels = np.arange(200) % 2
  refs.real = centres[refs.labels] + rng.normal(size=(200, 3))
  # No trace of the class: the class axis (0) flattened, noise elsewhere.
  refs.blurred = np.concatenate([np.zeros((200, 1)), rng.normal(size=(200, 2))], axis=1)
  real_labels = np.arange(400) % 2
  real_f = centres[real_labels] + rng.normal(size=(400, 3))
  rows = refs.rows(real_f, 200, real_labels=real_labels)
  assert rows["real_images/classification_accuracy_score"] == 1.0
  assert abs(rows["blurred_images/classification_accuracy_score"] - 0.5) < 0.15
  # Too few for CAS: NaN, as for the samples.
  few = refs.rows(real_f, 20, real_labels=real_labels)
  assert math.isnan(few["real_images/classification_accuracy_score"])


def test_no_cached_network_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("VQJAX_CACHE", str(tmp_path))
  monkeypatch.setattr(feature_network, "PACKAGE_DIR", str(tmp_path / "none"))  # none shipped
  data = configs.load_experiment("fashion_mnist:smoke").data
  with pytest.raises(errors.UserError, match="python -m vqjax.features --data fashion_mnist"):
    samples.judge_for("", data)
  data.name = "mnist"
  with pytest.raises(errors.UserError, match="no evaluation network is defined"):
    samples.judge_for("", data)


@pytest.mark.slow
def test_a_finished_network_is_read_not_trained(tmp_path, monkeypatch):
  config = configs.load_experiment("features_fashion_mnist:smoke")
  config.log.tensorboard = False
  workdir = str(tmp_path / "net")
  record = feature_network.ensure("fashion_mnist", workdir, config)
  assert record["run"] == workdir and record["step"] == 1 and 0.0 <= record["accuracy"] <= 1.0
  with open(os.path.join(workdir, "features.json")) as f:
    assert json.load(f) == record
  monkeypatch.setattr(
    feature_network.trainer, "train_and_evaluate", lambda *a, **k: pytest.fail("trained")
  )
  assert feature_network.ensure("fashion_mnist", workdir, config) == record
  described = feature_network.describe(workdir, 1)
  assert described == {
    "features_run": workdir,
    "features_step": 1,
    "features_test_accuracy": record["accuracy"],
  }
  # Another step than the record's: the accuracy is not claimed for it.
  assert "features_test_accuracy" not in feature_network.describe(workdir, 7)


FMNIST = "/usr/share/datasets/fashion-mnist"


def _idx(name: str) -> np.ndarray:
  """An idx file read with NumPy alone (not vqjax's data pipeline)."""
  with gzip.open(os.path.join(FMNIST, name)) as f:
    data = f.read()
  dims = data[3]
  shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def test_the_shipped_network_is_a_trained_judge():
  """The shipped weights load, match their recorded hash (hashlib, here), and classify real
  test images as well as their record says (labels read from the idx files with NumPy)."""
  npz = os.path.join(feature_network.PACKAGE_DIR, "fashion_mnist.npz")
  record = feature_network.packaged_record("fashion_mnist")
  with open(npz, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == record["sha256"]
  assert record["accuracy"] >= 0.93 and record["step"] > 0
  judge = samples.Judge.packaged("fashion_mnist")
  described = judge.describe()
  assert described["features_step"] == record["step"]
  assert described["features_test_accuracy"] == record["accuracy"]
  if not os.path.isdir(FMNIST):
    pytest.skip("Fashion-MNIST idx files not installed (Debian dataset-fashion-mnist)")
  n = 1000
  images = _idx("t10k-images-idx3-ubyte.gz")[:n]
  labels = _idx("t10k-labels-idx1-ubyte.gz")[:n]
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28 -> 32, as vqjax's data
  probs = judge.probs(padded)
  # 93.0% on all 10,000; 1,000 images leave about +/-0.8% of binomial spread.
  assert np.mean(np.argmax(probs, axis=1) == labels) >= 0.9
  # The default judge of the dataset is the shipped one.
  data = configs.load_experiment("fashion_mnist:smoke").data
  assert samples.judge_for("", data).describe() == described


def test_a_damaged_or_stale_shipped_network_is_one_line(tmp_path, monkeypatch):
  """A flipped byte fails the hash; weights exported from another config (the smoke
  network) do not fit the experiment's shapes: each a one-line error, never a silent judge."""
  config = configs.load_experiment("features_fashion_mnist:smoke")
  config.log.tensorboard = False
  workdir = str(tmp_path / "net")
  feature_network.ensure("fashion_mnist", workdir, config)
  out = tmp_path / "shipped"
  feature_network.export(workdir, "fashion_mnist", str(out))
  with pytest.raises(errors.UserError, match="does not fit"):
    feature_network.packaged("fashion_mnist", str(out))
  damaged = tmp_path / "damaged"
  shutil.copytree(feature_network.PACKAGE_DIR, damaged)
  with open(damaged / "fashion_mnist.npz", "r+b") as f:
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(errors.UserError, match="damaged"):
    feature_network.packaged("fashion_mnist", str(damaged))
  with pytest.raises(errors.UserError, match="ships no evaluation network"):
    feature_network.packaged("fashion_mnist", str(tmp_path / "empty"))
