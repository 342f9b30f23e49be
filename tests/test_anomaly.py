"""Tests of vqjax/evaluation/anomaly.py, and the evaluators on the quickstart's smoke model.

The smoke model's weights are drawn with NumPy on the shapes of `jax.eval_shape(model.init)`,
so no initialisation is compiled; references are NumPy computations on `model.apply`'s output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqjax import configs
from vqjax.evaluation import (
  AnomalyEvaluator,
  CodebookEvaluator,
  ReconstructionEvaluator,
  SsimEvaluator,
  anomaly,
  anomaly_figures,
)
from vqjax.models import registry


class _Affine(nn.Module):
  """Stand-in stage-1 model: recon = clip(x * scale + shift, -1, hi)."""

  hi: float = 1.0

  @nn.compact
  def __call__(self, x, train=False):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    shift = self.param("shift", nn.initializers.zeros, (x.shape[-1],))
    return jnp.clip(x * scale + shift, -1.0, self.hi), {}


def test_error_maps_of_a_stand_in_model():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 6, 5, 2)).astype(np.float32)
  scale, shift = np.array([0.5, -1.0], np.float32), np.array([0.1, 0.2], np.float32)
  variables = {"params": {"scale": scale, "shift": shift}}
  recon = np.clip(x.astype(np.float64) * scale + shift, -1, 1)
  expected = ((recon - x) ** 2).mean(-1)
  got = anomaly.error_maps(_Affine(), variables, x)
  assert got.shape == (3, 6, 5)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)


def _numpy_variables(model, image_shape, seed=0):
  """Random variables of `model` drawn with NumPy on the abstract init's shapes."""
  key = jax.random.key(0)
  abstract = jax.eval_shape(
    lambda: model.init({"params": key, "vq": key}, jnp.zeros(image_shape), train=False)
  )
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if leaf.dtype == jnp.bool_:
      return np.ones(leaf.shape, bool)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    # Kernels [..., fan_in, out]: a 1/sqrt(fan_in) scale keeps activations of order one.
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return jax.tree.map(draw, abstract)


@pytest.fixture(scope="module")
def smoke():
  config = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(config)
  variables = _numpy_variables(model, (1, 32, 32, 1))
  return config, model, variables


@pytest.mark.slow
def test_error_maps_of_the_smoke_model(smoke):
  _, model, variables = smoke
  x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32)
  recon, _ = model.apply(variables, x, train=False)
  expected = ((np.asarray(recon, np.float64) - x) ** 2).mean(-1)
  got = np.asarray(anomaly.error_maps(model, variables, x))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_evaluators_on_the_smoke_model_and_eval_split(smoke):
  config, model, variables = smoke
  # config.log.eval_batches = 1 of config.data.eval_batch_size = 8 local test images.
  out = ReconstructionEvaluator.from_config(config, model).run(variables)
  out.update(SsimEvaluator.from_config(config, model).run(variables))
  assert out["examples"] == 8
  from vqjax.data import pipeline

  batch = next(iter(pipeline.make_eval_iterator(config.data, max_batches=1)))
  recon, aux = model.apply(variables, batch["image"], train=False)
  mse = ((np.asarray(recon, np.float64) - batch["image"]) ** 2).mean()
  np.testing.assert_allclose(out["mse"], mse, rtol=1e-4)
  assert -1.0 <= out["ssim"] <= 1.0
  codes = CodebookEvaluator.from_config(config, model).run(variables, [batch])
  for i, name in enumerate(("top", "bottom")):
    counts = np.bincount(np.asarray(aux[f"level{i}/indices"]).reshape(-1), minlength=32)
    assert codes[f"{name}/usage"] == pytest.approx(np.mean(counts > 0))


def test_roc_auc_matches_pair_counting_with_ties():
  rng = np.random.default_rng(2)
  scores = rng.integers(0, 6, 80).astype(float)  # many ties
  y = rng.random(80) < 0.4
  pos, neg = scores[y], scores[~y]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  assert anomaly.roc_auc(scores, y) == pytest.approx(wins / (len(pos) * len(neg)), rel=1e-12)
  assert anomaly.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
  assert anomaly.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
  assert anomaly.roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
  assert np.isnan(anomaly.roc_auc([1, 2], [0, 0]))


def test_choose_threshold_is_the_normal_quantile():
  scores = np.random.default_rng(3).permutation(np.arange(101.0))
  assert anomaly.choose_threshold(scores, 0.95) == pytest.approx(95.0)
  assert np.mean(scores > anomaly.choose_threshold(scores, 0.9)) == pytest.approx(0.1, abs=0.01)
  with pytest.raises(ValueError):
    anomaly.choose_threshold(scores, 1.5)


def test_image_scores_mean_and_smoothed_max():
  maps = np.zeros((2, 15, 15), np.float32)
  maps[0, 7, 7] = 1.0
  maps[1] = 0.25
  out = anomaly.image_scores(maps, sigma=1.0)
  # A single bright pixel blurred by a normalised 7-tap Gaussian peaks at (centre tap)^2.
  taps = np.exp(-(np.arange(-3, 4) ** 2) / 2.0)
  np.testing.assert_allclose(np.asarray(out["max"]), [(1 / taps.sum()) ** 2, 0.25], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["mean"]), [1 / 225, 0.25], rtol=1e-5)


def test_save_anomaly_png(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  maps = np.zeros((3, 8, 8), np.float32)
  maps[1, 2, 3] = 2.0
  path = tmp_path / "sub" / "anomaly.png"
  grid = anomaly_figures.save_anomaly_png(str(path), images, images * 0.5, maps, per_row=3)
  read = np.asarray(Image.open(path))
  assert read.shape == grid.shape and read.ndim == 3 and read.shape[2] == 3
  # Three labelled rows of 8x8 images with 2-pixel gaps; the label margin is on the left.
  assert read.shape[0] == 3 * (8 + 2) + 2
  # The largest error is white in the heat-map row (third row, second image).
  right = read[:, read.shape[1] - 3 * (8 + 2) - 2 :]
  assert tuple(right[2 * 10 + 2 + 2, 1 * 10 + 2 + 3]) == (255, 255, 255)
  assert tuple(right[2 * 10 + 2, 2]) == (0, 0, 0)


def _anomaly_data(rng, n, anomalous):
  """Images in [-1, 0.1]; anomalies get a bright 3x3 patch the stand-in cannot reconstruct."""
  x = rng.uniform(-1, 0.1, (n, 12, 12, 1)).astype(np.float32)
  for i in np.flatnonzero(anomalous):
    r, c = rng.integers(0, 9, 2)
    x[i, r : r + 3, c : c + 3] = 1.0
  return x


def test_evaluate_anomalies_separates_patches(tmp_path):
  rng = np.random.default_rng(5)
  model = _Affine(hi=0.0)  # reconstructs nothing above 0: bright patches become errors
  variables = {"params": {"scale": np.ones(1, np.float32), "shift": np.zeros(1, np.float32)}}
  normal = [_anomaly_data(rng, 20, np.zeros(20, bool)) for _ in range(2)]
  labels = np.arange(16) % 2 == 1
  test_images = _anomaly_data(rng, 16, labels)
  # The second batch is padded with two junk rows that must not count.
  test = [
    {"image": test_images[:8], "is_anomaly": labels[:8], "mask": np.ones(8)},
    {
      "image": np.concatenate([test_images[8:], np.ones((2, 12, 12, 1), np.float32)]),
      "is_anomaly": np.concatenate([labels[8:], [False, False]]),
      "mask": np.r_[np.ones(8), np.zeros(2)],
    },
  ]
  png = tmp_path / "grid.png"
  ev = AnomalyEvaluator.from_config(configs.base_config(), model, png_path=str(png))
  out = ev.run(variables, {"normal": normal, "test": test})
  assert out["num_normal"] == 40 and out["num_test"] == 16 and out["num_anomalies"] == 8
  assert out["auc"] == 1.0 and out["auc_max"] == 1.0
  assert out["tpr"] == 1.0 and out["fpr"] <= 0.25
  assert out["normal_fpr"] == pytest.approx(0.05, abs=0.03)
  assert out["threshold"] == pytest.approx(
    np.quantile(anomaly.score_batches(model, variables, normal)["max"], 0.95)
  )
  assert png.exists()
  mean_out = anomaly.evaluate_anomalies(model, variables, normal, test, score="mean")
  assert mean_out["auc"] == mean_out["auc_mean"] == out["auc_mean"]
