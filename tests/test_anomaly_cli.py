"""Tests of the anomaly path a user runs: `config.data.exclude_labels` (data/sources.py
make_source) against a NumPy selection of tiny fake idx files, and `python -m vqjax.anomaly`
(vqjax/anomaly.py) on a one-step run, against scores, threshold and AUC recomputed in NumPy
from the model's reconstructions."""

import gzip
import json
import math
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from data_helpers import data_config, take
from PIL import Image
from test_memory import _codewords, _numpy_knn

import vqjax
from vqjax import anomaly, anomaly_runs, config_checks, configs, convert, errors
from vqjax.data import pipeline, sources
from vqjax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _idx_bytes(array: np.ndarray) -> bytes:
  """A uint8 array as an idx file, from the format spec (magic 0 0 8 ndim, big-endian dims)."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_fashion_dir(path, n_train=80, n_test=40):
  """Debian-like idx .gz files of random images with labels 0..9 repeating; returns
  {split: (images uint8 [N, 28, 28], labels [N])}."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  out = {}
  for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    with gzip.open(os.path.join(path, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
      f.write(_idx_bytes(images))
    with gzip.open(os.path.join(path, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
      f.write(_idx_bytes(labels))
    out[split] = images, labels
  return out


@pytest.fixture
def fake(tmp_path):
  return _write_fashion_dir(tmp_path / "fmnist")


# --- the label filter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "split,base,rows", [("train", "train", slice(None)), ("test[5:33]", "test", slice(5, 33))]
)
def test_exclude_labels_keeps_what_numpy_keeps(tmp_path, fake, split, base, rows):
  images, labels = (a[rows] for a in fake[base])
  keep = ~np.isin(labels, [3, 7])
  c = data_config(tmp_path, exclude_labels=(3, 7))
  source = sources.make_source(c, split)
  got = source.read_batch(np.arange(len(source)))
  assert len(source) == keep.sum() < len(labels)
  np.testing.assert_array_equal(got["image"][..., 0], images[keep])
  np.testing.assert_array_equal(got["label"], labels[keep])
  assert pipeline.num_examples(c, split) == keep.sum()
  # Without the field set, nothing is dropped.
  assert len(sources.make_source(data_config(tmp_path), split)) == len(labels)


def test_training_and_eval_batches_never_hold_an_excluded_label(tmp_path, fake):
  c = data_config(tmp_path, exclude_labels=(0, 9))
  it = pipeline.make_train_iterator(c, seed=0)
  seen = np.concatenate([b["label"] for b in take(it, 12)])  # 12 x 10 > one epoch of 64
  it.close()
  assert set(seen.tolist()) == set(range(1, 9))
  test_images, test_labels = fake["test"]
  keep = ~np.isin(test_labels, [0, 9])
  batches = list(pipeline.make_eval_iterator(c))
  mask = np.concatenate([b["mask"] for b in batches]) > 0
  labels = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(labels, test_labels[keep])
  x = np.concatenate([b["image"] for b in batches])[mask]
  np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], test_images[keep] / np.float32(127.5) - 1)


def test_exclude_labels_of_a_folder_and_of_a_source_read_one_by_one(tmp_path):
  for name, value in (("a/1.png", 10), ("a/2.png", 20), ("b/3.png", 30), ("c/4.png", 40)):
    os.makedirs(tmp_path / "imgs" / os.path.dirname(name), exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / "imgs" / name)
  c = data_config(tmp_path, name="folder", reader="folder", folder=str(tmp_path / "imgs"))
  c.exclude_labels = (1,)  # "b"
  source = sources.make_source(c, "train")
  assert [int(source[i]["image"][0, 0, 0]) for i in range(len(source))] == [10, 20, 40]
  assert source.name_of(2).endswith("c/4.png")

  class OneByOne:  # like a tfds source: no labels in memory, examples read by index
    def __init__(self, labels):
      self.labels_ = labels

    def __len__(self):
      return len(self.labels_)

    def __getitem__(self, i):
      return {"value": np.int32(100 + i), "label": np.int32(self.labels_[i])}

  labels = np.array([4, 2, 4, 1, 0, 4, 2])
  kept = sources.exclude_labels(OneByOne(labels), [4, 0])
  expected = 100 + np.flatnonzero(~np.isin(labels, [4, 0]))
  assert [int(kept[i]["value"]) for i in range(len(kept))] == expected.tolist()
  assert [int(e["value"]) for e in kept.__getitems__([2, 0])] == [expected[2], expected[0]]


def test_exclude_labels_mistakes_are_one_line_user_errors(tmp_path, fake):
  with pytest.raises(errors.UserError, match="no 'label' feature"):
    sources.exclude_labels(sources.ArraySource({"image": np.zeros((3, 2, 2), np.uint8)}), [1])
  c = data_config(tmp_path, exclude_labels=tuple(range(10)))
  with pytest.raises(errors.UserError, match=r"leaves none of the 40 examples of fashion_mnist"):
    sources.make_source(c, "test")
  config = configs.base_config()
  config.data.exclude_labels = ("bag",)
  with pytest.raises(errors.UserError, match="must be integers"):
    config_checks.validate(config)
  config.data.update(exclude_labels=(8,), reader="tfdata")
  with pytest.raises(errors.UserError, match="tfdata"):
    config_checks.validate(config)
  config = configs.load_experiment("fashion_mnist_anomaly")
  assert tuple(config.data.exclude_labels) == (8,)
  config_checks.validate(config)  # accepted: only the new field differs from the quickstart
  quickstart = configs.load_experiment("fashion_mnist").to_dict()
  assert {k: v for k, v in config.to_dict()["data"].items() if quickstart["data"][k] != v} == {
    "exclude_labels": (8,)
  }


# --- the CLI on a tiny trained run --------------------------------------------------------------


def _blur_max(maps: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  """Maximum of each map after a normalised Gaussian blur (window 2 ceil(3 sigma) + 1) that
  averages only pixels inside the image, in float64 with explicit loops over the window."""
  r = int(math.ceil(3 * sigma))
  g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
  n, h, w = maps.shape
  num, den = np.zeros_like(maps), np.zeros((h, w))
  padded = np.pad(maps, ((0, 0), (r, r), (r, r)))
  ones = np.pad(np.ones((h, w)), r)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      num += g[dy] * g[dx] * padded[:, dy : dy + h, dx : dx + w]
      den += g[dy] * g[dx] * ones[dy : dy + h, dx : dx + w]
  return (num / den).max(axis=(1, 2))


def _pairwise_auc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
  """P(anomaly scores higher) + P(tie) / 2 over every (anomaly, normal) pair."""
  a, n = scores[is_anomaly][:, None], scores[~is_anomaly][None, :]
  return float(np.mean((a > n) + 0.5 * (a == n)))


@pytest.fixture(scope="module")
def fast_compile():
  """Compiling, not running, dominates these one-step CPU tests: XLA skips most optimisations
  while they run (the numbers compared stay float32-exact to the tolerances used)."""
  saved = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fast_compile):
  """A stage-1 model of the anomaly experiment's smoke config (class 8 left out) on fake idx
  files, saved as a run (config.json + variables, as `vqjax.convert` writes them; a trainer
  step would add half a minute of compiling and change nothing tested here), its codebook
  initialised from a batch of normal training images; returns (workdir, test images, labels)."""
  tmp = tmp_path_factory.mktemp("anomaly")
  data = _write_fashion_dir(tmp / "fmnist")
  config = configs.load_experiment("fashion_mnist_anomaly:smoke")
  config.data.update(local_dir=str(tmp / "fmnist"), data_dir=str(tmp / "cache"), eval_split="test")
  it = pipeline.make_train_iterator(config.data, seed=0)
  batch = next(it)
  it.close()
  assert 8 not in batch["label"]
  model = registry.build_model(config)
  rngs = {"params": jax.random.key(0, impl="rbg"), "vq": jax.random.key(1)}
  variables = jax.jit(model.init)(rngs, batch["image"])
  convert.save_converted(str(tmp / "run"), config, dict(variables))
  return str(tmp / "run"), *data["test"]


@pytest.mark.slow
def test_run_matches_numpy_and_thresholds_on_held_out_normals_only(tiny_run, tmp_path):
  workdir, images, labels = tiny_run
  result = anomaly.run(workdir, str(tmp_path / "out"), quantile=0.8)
  assert result["anomaly_labels"] == [8]  # the run's own data.exclude_labels

  # Independent reference: images padded and scaled by hand, scored in float64.
  config, model, variables = vqjax.load_run(workdir)
  x = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None] / 127.5 - 1.0
  recon, _ = model.apply(variables, x.astype(np.float32), train=False)
  maps = np.mean((np.asarray(recon, np.float64) - x) ** 2, axis=-1)
  mean_score, max_score = maps.mean(axis=(1, 2)), _blur_max(maps)

  is_anomaly = labels == 8
  normal = np.flatnonzero(~is_anomaly)
  heldout, scored = normal[0::2], normal[1::2]
  test = np.concatenate([scored, np.flatnonzero(is_anomaly)])
  assert (result["num_heldout"], result["num_normal"], result["num_anomalous"]) == (18, 18, 4)
  threshold = np.quantile(max_score[heldout], 0.8)
  assert math.isclose(result["threshold"], threshold, rel_tol=1e-5)
  assert result["auc"] == result["auc_max"] == _pairwise_auc(max_score[test], is_anomaly[test])
  assert result["auc_mean"] == _pairwise_auc(mean_score[test], is_anomaly[test])
  assert result["tpr"] == np.mean(max_score[is_anomaly] > threshold)
  assert result["fpr"] == np.mean(max_score[scored] > threshold)
  assert result["heldout_fpr"] == np.mean(max_score[heldout] > threshold)
  # Thresholding all normal images instead would be another number (here it is).
  assert not math.isclose(np.quantile(max_score[normal], 0.8), threshold, rel_tol=1e-5)

  with open(tmp_path / "out" / "anomaly.json") as f:
    assert json.load(f) == result
  figure = np.asarray(Image.open(tmp_path / "out" / "anomaly.png"))
  # 4 normal then 4 anomalous images (min(4, 18, 4)), one per row of 190 px panels (input,
  # reconstruction, error map) plus 50 px of titles and 160 px of colour bar.
  assert figure.shape[:2] == (8 * 190 + 50, 3 * 190 + 160)
  # Every image's scores, in split order, with its role.
  with open(tmp_path / "out" / "anomaly_scores.csv") as f:
    rows = [line.strip().split(",") for line in f]
  assert rows[0][:5] == ["index", "label", "role", "recon_max", "recon_mean"]
  assert [int(r[1]) for r in rows[1:]] == labels.tolist()
  roles = np.array([r[2] for r in rows[1:]])
  assert np.array_equal(np.flatnonzero(roles == "heldout"), heldout)
  assert np.array_equal(np.flatnonzero(roles == "anomalous"), np.flatnonzero(is_anomaly))
  np.testing.assert_allclose([float(r[3]) for r in rows[1:]], max_score, rtol=1e-4)

  # knn: mean distance to the 5 nearest latents of the normal training images (train[:64]
  # without bags, regenerated from the same seed), the codewords looked up by hand, float64.
  train, train_labels = _write_fashion_dir(tmp_path / "again")["train"]
  bank = np.pad(train[:64][train_labels[:64] != 8], ((0, 0), (2, 2), (2, 2)))[..., None]
  bank = _codewords(model, variables, (bank / 127.5 - 1.0).astype(np.float32))
  knn = _numpy_knn(bank, _codewords(model, variables, x.astype(np.float32)), 5)
  assert (result["memory"], result["k"]) == (58, 5)
  assert rows[0][5] == "knn"
  written = np.array([float(r[5]) for r in rows[1:]])
  np.testing.assert_allclose(written, knn, rtol=1e-4)
  # (The one-step model gives many images the same codes: ties, so the AUC is taken of the
  # written scores, which equal the float64 ones to 1e-4.)
  assert math.isclose(result["auc_knn"], _pairwise_auc(written[test], is_anomaly[test]))
  no_bank = anomaly.run(workdir, str(tmp_path / "nobank"), quantile=0.8, memory=0)
  assert "knn" not in no_bank["scores"] and "memory" not in no_bank

  # --score mean and --max_examples: the first 20 images only, thresholded on their mean.
  head = anomaly.run(workdir, str(tmp_path / "head"), [8], 0.5, max_examples=20, score="mean")
  normal20 = np.flatnonzero(~is_anomaly[:20])
  assert (head["num_heldout"], head["num_normal"], head["num_anomalous"]) == (9, 9, 2)
  assert math.isclose(head["threshold"], np.median(mean_score[normal20[0::2]]), rel_tol=1e-5)


@pytest.mark.slow
def test_run_mistakes_are_user_errors(tiny_run, tmp_path, monkeypatch):
  workdir = tiny_run[0]
  out = str(tmp_path / "out")
  for q in (0.0, 1.0, 1.5):
    with pytest.raises(errors.UserError, match=r"quantile must be in \(0, 1\)"):
      anomaly.run(workdir, out, quantile=q)
  with pytest.raises(errors.UserError, match="no anomaly labels"):
    anomaly.run(workdir, out, anomaly_labels=[])
  with pytest.raises(errors.UserError, match=r"no anomalous examples.*labels found: \[0, 1"):
    anomaly.run(workdir, out, anomaly_labels=[11])
  with pytest.raises(errors.UserError, match="at least 2 are needed"):
    anomaly.run(workdir, out, anomaly_labels=list(range(1, 10)), max_examples=10)
  with pytest.raises(errors.UserError, match="integers"):
    anomaly.run(workdir, out, anomaly_labels=["bag"])
  with pytest.raises(errors.UserError, match=r"--memory must be >= 0"):
    anomaly.run(workdir, out, memory=-1)
  with pytest.raises(errors.UserError, match=r"--k must be >= 1"):
    anomaly.run(workdir, out, k=0)
  with pytest.raises(errors.UserError, match=r"--k 59 needs at least 59 .* has 58"):
    anomaly.run(workdir, out, k=59)
  with pytest.raises(errors.UserError, match=r"--k 50 is more than the 20 images --memory"):
    anomaly.run(workdir, out, memory=20, k=50)
  with pytest.raises(errors.UserError, match=r"knn needs --memory above 0"):
    anomaly.run(workdir, out, score="knn", memory=0)
  for name in ("rotation", "rotation_nll"):
    with pytest.raises(errors.UserError, match=f"--score {name} needs --rotation_priors"):
      anomaly.run(workdir, out, score=name)
  with pytest.raises(errors.UserError, match=r"--score must be one of .*, rotation, rotation_nll"):
    anomaly.run(workdir, out, score="rotations")
  # A combination needs every part: here knn is scored, nll_ratio and rotation are not.
  with pytest.raises(
    errors.UserError,
    match=r"--score combined_rotation combines knn, nll_ratio, rotation; scoring nll_ratio needs "
    r"--priors and --memory above 0; rotation needs --rotation_priors$",
  ):
    anomaly.run(workdir, out, score="combined_rotation")
  with pytest.raises(
    errors.UserError, match=r"nll_ratio; scoring knn needs --memory above 0; nll_ratio needs"
  ):
    anomaly.run(workdir, out, score="combined", memory=0)
  # A model without `encode` (a plugin needs only the code contract): the bank scores go.
  from vqjax.evaluation import memory

  monkeypatch.setattr(memory, "has_encode", lambda model: False)
  with pytest.raises(errors.UserError, match=r"--score knn needs the model's latents"):
    anomaly.run(workdir, out, score="knn")
  without = anomaly.run(workdir, str(tmp_path / "no_encode"))
  assert list(without["scores"]) == ["recon_max", "recon_mean"] and "memory" not in without
  monkeypatch.undo()
  monkeypatch.setattr(anomaly_runs, "MAX_BANK_BYTES", 1000)  # 58 latents of 640 numbers: 145 KiB
  with pytest.raises(errors.UserError, match=r"--memory 10000: a bank of 10000 latents"):
    anomaly.run(workdir, out)
  monkeypatch.undo()

  real = pipeline.make_eval_iterator

  def unlabelled(data, **kw):
    return ({k: v for k, v in b.items() if k != "label"} for b in real(data, **kw))

  monkeypatch.setattr(pipeline, "make_eval_iterator", unlabelled)
  with pytest.raises(errors.UserError, match="no 'label' feature"):
    anomaly.run(workdir, out)

  prior = configs.prior_config("/nowhere", 0, "pixelcnn")
  monkeypatch.setattr(vqjax.runs, "load_run", lambda w: (prior, None, None))
  with pytest.raises(errors.UserError, match="not a stage-1 autoencoder"):
    anomaly.run(workdir, out)
  assert not os.path.exists(out)  # nothing written by a failed run


@pytest.mark.slow
def test_cli_prints_a_table_and_mistakes_in_one_line(tiny_run, tmp_path):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )

  def cli(*args):
    return subprocess.run(
      [sys.executable, "-m", "vqjax.anomaly", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )

  bad = cli(f"--workdir={tiny_run[0]}", "--quantile=1.5")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert bad.stderr.strip() == "vqjax.anomaly: UserError: --quantile must be in (0, 1), got 1.5"
  ok = cli(f"--workdir={tiny_run[0]}", "--anomaly_labels=8,9", f"--out={tmp_path}")
  assert ok.returncode == 0, ok.stderr
  with open(tmp_path / "anomaly.json") as f:
    result = json.load(f)
  assert result["anomaly_labels"] == [8, 9] and result["num_anomalous"] == 8
  assert ["auc", f"{result['auc']:.6g}"] in [line.split() for line in ok.stdout.splitlines()]


def _classifier_run(path, stage1_data, exclude_labels):
  """A classifier of the classifier experiment's smoke config on the stage-1 run's data, saved
  as a run with the labels it was trained without, its weights from an init."""
  config = configs.load_experiment("classifier_fashion_mnist:smoke")
  for key in ("local_dir", "data_dir", "image_size", "resize", "channels"):
    config.data[key] = stage1_data[key]
  config.data.exclude_labels = exclude_labels
  model = registry.build_model(config)
  x = np.zeros((1, config.data.image_size, config.data.image_size, 1), np.float32)
  variables = jax.jit(model.init)({"params": jax.random.key(2, impl="rbg")}, x)
  # A converted run holds a VQ state beside the weights; a classifier's is empty.
  convert.save_converted(str(path), config, {**variables, "vq_state": {}})
  return str(path), model, variables


@pytest.mark.slow
def test_classifier_score_is_one_minus_the_max_softmax_over_normal_labels(tiny_run, tmp_path):
  workdir, images, labels = tiny_run
  stage1 = vqjax.load_run(workdir)[0]
  path, model, variables = _classifier_run(tmp_path / "clf", stage1.data, (8,))
  result = anomaly.run(workdir, str(tmp_path / "out"), classifier=path, score="classifier")
  assert result["classifier"] == path and result["score"] == "classifier"
  # Independent reference: images padded and scaled by hand, the softmax over labels 0-7 and 9
  # in float64 (the classifier's ten logits include the anomaly's, which is dropped).
  x = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None] / 127.5 - 1.0
  logits = np.asarray(model.apply(variables, x.astype(np.float32)), np.float64)
  kept = logits[:, [0, 1, 2, 3, 4, 5, 6, 7, 9]]
  p = np.exp(kept - kept.max(1, keepdims=True))
  expected = 1 - (p / p.sum(1, keepdims=True)).max(1)
  with open(tmp_path / "out" / "anomaly_scores.csv") as f:
    rows = [line.strip().split(",") for line in f]
  column = rows[0].index("classifier")
  written = np.array([float(r[column]) for r in rows[1:]])
  np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-6)
  is_anomaly = labels == 8
  normal = np.flatnonzero(~is_anomaly)
  test = np.concatenate([normal[1::2], np.flatnonzero(is_anomaly)])
  assert math.isclose(result["auc"], _pairwise_auc(written[test], is_anomaly[test]))
  assert math.isclose(
    result["threshold"], np.quantile(written[normal[0::2]], 0.95), rel_tol=1e-4, abs_tol=1e-7
  )
  # mahalanobis: the features of the classifier's own training images (the fake train[:64], its
  # smoke split, without bags; rebuilt from the same seed) fit the class means and the shared
  # covariance, in float64 NumPy.
  train_images, train_labels = _write_fashion_dir(tmp_path / "again")["train"]
  keep = (np.arange(len(train_labels)) < 64) & (train_labels != 8)
  assert result["classifier_images"] == int(keep.sum())

  def features(im):
    x = np.pad(im, ((0, 0), (2, 2), (2, 2)))[..., None] / 127.5 - 1.0
    return np.asarray(model.apply(variables, x.astype(np.float32), method="features"), np.float64)

  fit, fit_labels = features(train_images[keep]), train_labels[keep]
  means = {c: fit[fit_labels == c].mean(0) for c in (0, 1, 2, 3, 4, 5, 6, 7, 9)}
  dev = fit - np.stack([means[c] for c in fit_labels])
  precision = np.linalg.pinv(dev.T @ dev / len(fit))
  expected = [min((f - m) @ precision @ (f - m) for m in means.values()) for f in features(images)]
  column = rows[0].index("mahalanobis")
  written = np.array([float(r[column]) for r in rows[1:]])
  np.testing.assert_allclose(written, expected, rtol=1e-3)
  assert math.isclose(
    result["scores"]["mahalanobis"]["auc"], _pairwise_auc(written[test], is_anomaly[test])
  )
  # --classifier_images 0 leaves the score out.
  result = anomaly.run(workdir, str(tmp_path / "out0"), classifier=path, classifier_images=0)
  assert "mahalanobis" not in result["scores"] and "classifier_images" not in result


@pytest.mark.slow
def test_classifier_mistakes_are_user_errors(tiny_run, tmp_path):
  workdir = tiny_run[0]
  out = str(tmp_path / "out")
  stage1 = vqjax.load_run(workdir)[0]
  with pytest.raises(errors.UserError, match="--score classifier needs --classifier"):
    anomaly.run(workdir, out, score="classifier")
  with pytest.raises(errors.UserError, match="--score mahalanobis needs --classifier"):
    anomaly.run(workdir, out, score="mahalanobis")
  with pytest.raises(errors.UserError, match="--classifier_images must be >= 0"):
    anomaly.run(workdir, out, classifier_images=-1)
  with pytest.raises(errors.UserError, match=r"--classifier: .*nowhere is not a directory"):
    anomaly.run(workdir, out, classifier=str(tmp_path / "nowhere"))
  with pytest.raises(errors.UserError, match=r"--classifier: .* is not a classifier run"):
    anomaly.run(workdir, out, classifier=workdir)
  saw, _, _ = _classifier_run(tmp_path / "saw", stage1.data, ())
  with pytest.raises(errors.UserError, match=r"trained on the anomaly labels \[8\]"):
    anomaly.run(workdir, out, classifier=saw)
  # Trained without 8 but asked about 9 as well.
  fit, _, _ = _classifier_run(tmp_path / "fit", stage1.data, (8,))
  with pytest.raises(errors.UserError, match=r"anomaly labels \[9\]"):
    anomaly.run(workdir, out, anomaly_labels=[8, 9], classifier=fit)
  with pytest.raises(errors.UserError, match="--score mahalanobis needs --classifier_images"):
    anomaly.run(workdir, out, classifier=fit, score="mahalanobis", classifier_images=0)
  # The first 3 training images have labels 0, 1, 2: six normal labels have no Gaussian.
  with pytest.raises(
    errors.UserError,
    match=r"cannot fit the mahalanobis score \(no fitting image has the normal labels "
    r"\[3, 4, 5, 6, 7, 9\]\); --classifier_images 0 leaves",
  ):
    anomaly.run(workdir, out, classifier=fit, classifier_images=3)
  assert not os.path.exists(out)


def test_outputs_are_replaced_whole_or_not_at_all(tiny_run, tmp_path, monkeypatch):
  """A run that fails while writing (here a full disk at anomaly.json, the last file) leaves
  the previous run's three files as they were, and none of its own half-written ones."""
  workdir, out = tiny_run[0], tmp_path / "out"
  anomaly.run(workdir, str(out), memory=0)
  names = ("anomaly.png", "anomaly_scores.csv", "anomaly.json")
  before = {name: (out / name).read_bytes() for name in names}

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(json, "dump", full_disk)
  with pytest.raises(OSError, match="No space left"):
    anomaly.run(workdir, str(out), memory=0, score="mean", max_examples=40)
  monkeypatch.undo()
  assert sorted(os.listdir(out)) == sorted(names)
  assert {name: (out / name).read_bytes() for name in names} == before
  # The same run without the fault replaces all three.
  result = anomaly.run(workdir, str(out), memory=0, score="mean", max_examples=40)
  assert sorted(os.listdir(out)) == sorted(names)
  with open(out / "anomaly.json") as f:
    assert json.load(f)["score"] == result["score"] == "recon_mean"
  with open(out / "anomaly_scores.csv") as f:
    assert len(f.read().splitlines()) == 1 + 40


def test_an_unusable_out_fails_before_any_scoring(tiny_run, tmp_path, monkeypatch):
  workdir = tiny_run[0]
  afile = tmp_path / "afile"
  afile.write_text("")
  monkeypatch.setattr(anomaly_runs, "load", lambda *a: pytest.fail("scoring started"))
  for out in (afile, afile / "below"):
    with pytest.raises(errors.UserError, match=f"--out {out}: {afile} is a file"):
      anomaly.run(workdir, str(out))
  assert sorted(os.listdir(tmp_path)) == ["afile"]  # the check leaves nothing behind


def test_allow_mismatch_reaches_both_kinds_of_priors(tiny_run, tmp_path, monkeypatch):
  """The mismatch error names --allow_mismatch: the flag exists and is passed on."""
  from vqjax.sampling import hierarchy

  seen = []

  def from_runs(stage1, priors, allow_mismatch=False):
    seen.append((tuple(priors), allow_mismatch))
    raise errors.UserError("checked")

  monkeypatch.setattr(hierarchy.Generator, "from_runs", from_runs)
  for allow in (False, True):
    with pytest.raises(errors.UserError, match="checked"):
      anomaly.run(tiny_run[0], str(tmp_path / "out"), priors=["p0", "p1"], allow_mismatch=allow)
    with pytest.raises(errors.UserError, match="checked"):
      anomaly_runs.rotation_scorer(tiny_run[0], ["r0", "r1"], None, None, allow)
  assert seen == [(("p0", "p1"), False), (("r0", "r1"), False)] + [
    (("p0", "p1"), True),
    (("r0", "r1"), True),
  ]
  help_text = subprocess.run(
    [sys.executable, "-m", "vqjax.anomaly", "--help"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  ).stdout
  assert "--[no]allow_mismatch:" in help_text
