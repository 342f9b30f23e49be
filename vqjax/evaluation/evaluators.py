"""Evaluators: small classes built from a run config, each turning a model and data into metrics.

Every evaluator has `from_config(config, **overrides)` and `run(model, variables, data) ->
{name: float}`, so the trainer can call a list of them every N steps and an eval script can
call the same ones once on a loaded run (`vqjax.runs.load_run`):

  config, model, variables = runs.load_run(workdir)
  ReconstructionEvaluator.from_config(config).run(model, variables)

`data` defaults to one pass over `config.data.eval_split` (`pipeline.make_eval_iterator`,
padded batches with a "mask"); padding rows never count. The per-batch work is one jitted
function per model (built on first use); sums over the split are kept on the host in float64.
Each process evaluates the batches it is given: with several processes, sum the returned
sums yourself or pass each the whole split.
"""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqjax.data import pipeline
from vqjax.evaluation import anomaly, frechet, metrics
from vqjax.training import tasks


def _level_names(levels: int) -> tuple[str, ...]:
  return tasks.level_names(levels)


class _PerModelJit:
  """A function of (model, ...) jitted once per model object.

  Linen modules that hold dicts cannot be hashed, so the model cannot be a static jit
  argument; a closure over it is jitted instead and kept while the same object comes back.
  """

  def __init__(self, make: Callable[[Any], Callable]):
    self._make = make
    self._model = None
    self._fn = None

  def __call__(self, model: Any) -> Callable:
    if self._fn is None or self._model is not model:
      self._model, self._fn = model, jax.jit(self._make(model))
    return self._fn


def _eval_data(data_config: ml_collections.ConfigDict | None, max_batches: int) -> Iterable:
  if data_config is None:
    raise ValueError("no data given and the evaluator was built without config.data")
  return pipeline.make_eval_iterator(
    data_config, jax.process_index(), jax.process_count(), max_batches
  )


def _images_and_mask(batch: Any) -> tuple[jax.Array, jax.Array]:
  """(images, float mask) of a dict batch with "image" (and "mask") or of an image array."""
  if isinstance(batch, dict):
    images = jnp.asarray(batch["image"])
    mask = batch.get("mask")
  else:
    images, mask = jnp.asarray(batch), None
  mask = jnp.ones(images.shape[0], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  return images, mask


def _accumulate(total: dict[str, np.ndarray], sums: dict[str, jax.Array]) -> None:
  for k, v in sums.items():
    v = np.asarray(v, np.float64)
    total[k] = total[k] + v if k in total else v


class ReconstructionEvaluator:
  """MSE, PSNR and SSIM of reconstructions over an eval split.

  MSE is the mean over real images of each image's mean squared error, PSNR that of the
  split's MSE (as the training logs report them), SSIM the mean over real images of
  `metrics.ssim`.

  Args:
    data_config: `config.data`, for the default data (one pass over its eval split).
    max_batches: stop after this many batches of the default data; 0 = the whole split.
    clip: clip reconstructions to [-1, 1] first (what a saved image shows); the training
      logs do not, so the default keeps their numbers.
  """

  def __init__(
    self,
    data_config: ml_collections.ConfigDict | None = None,
    max_batches: int = 0,
    clip: bool = False,
  ):
    self.data_config = data_config
    self.max_batches = max_batches
    self.clip = clip
    self._step = _PerModelJit(self._make_step)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **kw) -> "ReconstructionEvaluator":
    """From a run config: its data and `config.log.eval_batches`; `kw` overrides."""
    args = {"data_config": config.data, "max_batches": config.log.eval_batches}
    return cls(**{**args, **kw})

  def _make_step(self, model: Any) -> Callable:
    def step(variables, images, mask):
      recon, _ = model.apply(variables, images, train=False)
      recon = recon.astype(jnp.float32)
      if self.clip:
        recon = jnp.clip(recon, -1.0, 1.0)
      return {
        "sq_err": jnp.sum(metrics.squared_error(images, recon) * mask),
        "ssim": jnp.sum(metrics.ssim(images, recon) * mask),
        "count": jnp.sum(mask),
      }

    return step

  def run(self, model: Any, variables: Any, data: Iterable | None = None) -> dict[str, float]:
    """Evaluates `model` on `data`.

    Args:
      model: a stage-1 module.
      variables: its variables.
      data: batches (dicts with "image" [B, H, W, C] in [-1, 1] and optionally "mask", or
        image arrays); default the eval split of `data_config`.

    Returns:
      {"mse", "psnr", "ssim", "examples"}.
    """
    data = _eval_data(self.data_config, self.max_batches) if data is None else data
    step = self._step(model)
    total = {}
    for batch in data:
      _accumulate(total, step(variables, *_images_and_mask(batch)))
    count = max(float(total.get("count", 0.0)), 1.0)
    mse = float(total.get("sq_err", 0.0)) / count
    return {
      "mse": mse,
      "psnr": float(metrics.psnr(mse)),
      "ssim": float(total.get("ssim", 0.0)) / count,
      "examples": float(total.get("count", 0.0)),
    }


class CodebookEvaluator:
  """Code usage, perplexity and top share of every level over an eval split.

  Args:
    num_codes: codebook size of every level (`config.vq.num_codes`).
    data_config: `config.data`, for the default data.
    max_batches: stop after this many batches of the default data; 0 = the whole split.
  """

  def __init__(
    self,
    num_codes: int,
    data_config: ml_collections.ConfigDict | None = None,
    max_batches: int = 0,
  ):
    self.num_codes = num_codes
    self.data_config = data_config
    self.max_batches = max_batches
    self._step = _PerModelJit(self._make_step)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **kw) -> "CodebookEvaluator":
    """From a run config: `config.vq.num_codes`, its data, `config.log.eval_batches`."""
    args = {
      "num_codes": config.vq.num_codes,
      "data_config": config.data,
      "max_batches": config.log.eval_batches,
    }
    return cls(**{**args, **kw})

  def _make_step(self, model: Any) -> Callable:
    def step(variables, images, mask):
      codes = model.apply(variables, images, method="encode_to_indices")
      return {
        **{f"{i}": metrics.code_counts(c, self.num_codes, mask) for i, c in enumerate(codes)},
        "count": jnp.sum(mask),
      }

    return step

  def histograms(
    self, model: Any, variables: Any, data: Iterable | None = None
  ) -> tuple[dict[str, np.ndarray], float]:
    """How often every code of every level is chosen over `data`.

    Args:
      model: a stage-1 module with `encode_to_indices` (codes coarsest first).
      variables: its variables.
      data: batches as for `ReconstructionEvaluator.run`; default the eval split.

    Returns:
      ({level name: float64 [num_codes] counts}, number of real examples), levels coarsest
      first, named "top", "bottom" (... see `tasks.level_names`; one level: "codes").
    """
    data = _eval_data(self.data_config, self.max_batches) if data is None else data
    step = self._step(model)
    total = {}
    for batch in data:
      _accumulate(total, step(variables, *_images_and_mask(batch)))
    examples = float(total.pop("count", 0.0))
    names = _level_names(len(total))
    counts = {names[i]: total[f"{i}"] for i in range(len(total))}
    return counts, examples

  def run(self, model: Any, variables: Any, data: Iterable | None = None) -> dict[str, float]:
    """Histograms every level's codes over `data` and summarises them.

    Args:
      model: a stage-1 module with `encode_to_indices` (codes coarsest first).
      variables: its variables.
      data: batches as for `ReconstructionEvaluator.run`; default the eval split.

    Returns:
      {"{level}/usage", "{level}/perplexity", "{level}/top_share", "examples"}, levels named
      as in `histograms`.
    """
    counts, examples = self.histograms(model, variables, data)
    out = metrics.codebook_metrics(counts)
    out["examples"] = examples
    return out


class AnomalyEvaluator:
  """Reconstruction-error anomaly detection (see `anomaly.evaluate_anomalies`).

  Args:
    score: "max" (of the blurred error map) or "mean" per-image score.
    quantile: quantile of normal scores used as threshold.
    sigma: blur of the maps before their maximum, in pixels.
    label_key: the anomaly label feature of the test batches.
    png_path: where to write the first test batch's grid (None = no image).
  """

  def __init__(
    self,
    score: str = "max",
    quantile: float = 0.95,
    sigma: float = 1.0,
    label_key: str = "is_anomaly",
    png_path: str | None = None,
  ):
    self.score = score
    self.quantile = quantile
    self.sigma = sigma
    self.label_key = label_key
    self.png_path = png_path

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **kw) -> "AnomalyEvaluator":
    """The run config has no anomaly fields yet: everything comes from `kw`."""
    del config
    return cls(**kw)

  def run(self, model: Any, variables: Any, data: Any) -> dict[str, float]:
    """Evaluates anomaly detection.

    Args:
      model: a stage-1 module trained on normal images.
      variables: its variables.
      data: {"normal": batches of held-out normal images, "test": labelled test batches},
        or the pair (normal, test).

    Returns:
      The dict of `anomaly.evaluate_anomalies`.
    """
    normal, test = (data["normal"], data["test"]) if isinstance(data, dict) else data
    return anomaly.evaluate_anomalies(
      model,
      variables,
      normal,
      test,
      score=self.score,
      quantile=self.quantile,
      sigma=self.sigma,
      label_key=self.label_key,
      png_path=self.png_path,
    )


def _batched(fn: Callable, images: np.ndarray, batch_size: int) -> np.ndarray:
  """fn applied to `images` in chunks of `batch_size`, outputs concatenated on the host."""
  parts = [
    np.asarray(fn(images[i : i + batch_size]), np.float64)
    for i in range(0, len(images), batch_size)
  ]
  return np.concatenate(parts)


class SampleQualityEvaluator:
  """Frechet distance, precision / recall, Inception-style score and CAS of generated images.

  Features and probabilities come from the given functions (e.g. the project classifier's
  penultimate features and softmax), so the numbers are comparable only between runs that
  used the same functions.

  Args:
    features_fn: images [B, H, W, C] in [-1, 1] -> features [B, D].
    probs_fn: images -> class probabilities [B, K]; None = no Inception-style score.
    k: neighbour rank of the precision / recall radii.
    splits: splits of the Inception-style score.
    batch_size: images per call of `features_fn` / `probs_fn`.
    cas_steps: gradient steps of the CAS logistic regression.
  """

  def __init__(
    self,
    features_fn: Callable[[np.ndarray], Any],
    probs_fn: Callable[[np.ndarray], Any] | None = None,
    k: int = 3,
    splits: int = 10,
    batch_size: int = 256,
    cas_steps: int = 500,
  ):
    self.features_fn = features_fn
    self.probs_fn = probs_fn
    self.k = k
    self.splits = splits
    self.batch_size = batch_size
    self.cas_steps = cas_steps

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, features_fn: Callable, **kw
  ) -> "SampleQualityEvaluator":
    """The run config has no sample-quality fields yet: the functions and `kw` decide."""
    del config
    return cls(features_fn, **kw)

  def compute(
    self,
    real: np.ndarray,
    generated: np.ndarray,
    real_labels: np.ndarray | None = None,
    generated_labels: np.ndarray | None = None,
  ) -> dict[str, float]:
    """Compares generated images with real ones.

    Args:
      real: [N, H, W, C] in [-1, 1].
      generated: [M, H, W, C] in [-1, 1].
      real_labels: [N] labels of the real images (for CAS).
      generated_labels: [M] the labels the samples were drawn for (for CAS).

    Returns:
      {"frechet_distance", "precision", "recall"}, plus "inception_score" and
      "inception_score_std" of the generated images with `probs_fn`, plus
      "classification_accuracy_score" when both label arrays are given.
    """
    real_f = _batched(self.features_fn, np.asarray(real), self.batch_size)
    gen_f = _batched(self.features_fn, np.asarray(generated), self.batch_size)
    probs = None
    if self.probs_fn is not None:
      probs = _batched(self.probs_fn, np.asarray(generated), self.batch_size)
    return self.compute_from_features(real_f, gen_f, probs, real_labels, generated_labels)

  def compute_from_features(
    self,
    real_features: np.ndarray,
    generated_features: np.ndarray,
    generated_probs: np.ndarray | None = None,
    real_labels: np.ndarray | None = None,
    generated_labels: np.ndarray | None = None,
    num_classes: int | None = None,
  ) -> dict[str, float]:
    """`compute` from features already extracted (e.g. real features reused across subsets).

    Args:
      real_features: [N, D] features of real images, N > k.
      generated_features: [M, D] features of generated images, M > k.
      generated_probs: [M, K] class probabilities of the generated images; None = no
        Inception-style score.
      real_labels: [N] labels of the real images (for CAS).
      generated_labels: [M] the labels the samples were drawn for (for CAS).
      num_classes: classes of the CAS regression; default one more than the largest label.

    Returns:
      See `compute`.
    """
    real_f = np.asarray(real_features, np.float64)
    gen_f = np.asarray(generated_features, np.float64)
    out = {"frechet_distance": frechet.frechet_distance_from_features(real_f, gen_f)}
    out.update(frechet.precision_recall(real_f, gen_f, self.k))
    if generated_probs is not None:
      probs = np.asarray(generated_probs, np.float64)
      out["inception_score"], out["inception_score_std"] = frechet.inception_score(
        probs, min(self.splits, len(probs))
      )
    if real_labels is not None and generated_labels is not None:
      out["classification_accuracy_score"] = frechet.classification_accuracy_score(
        gen_f,
        generated_labels,
        real_f,
        real_labels,
        num_classes=num_classes,
        steps=self.cas_steps,
      )
    return out

  def run(self, model: Any, variables: Any, data: dict[str, np.ndarray]) -> dict[str, float]:
    """`compute` with the uniform evaluator signature.

    Args:
      model: unused (the samples were drawn elsewhere, e.g. by the sampler).
      variables: unused.
      data: {"real", "generated"} image arrays and optionally "real_label",
        "generated_label".

    Returns:
      See `compute`.
    """
    del model, variables
    return self.compute(
      data["real"], data["generated"], data.get("real_label"), data.get("generated_label")
    )


# Evaluator name -> class, for a list of evaluators named in a config.
EVALUATORS = {
  "reconstruction": ReconstructionEvaluator,
  "codebook": CodebookEvaluator,
  "anomaly": AnomalyEvaluator,
  "sample_quality": SampleQualityEvaluator,
}
