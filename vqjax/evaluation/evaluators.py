"""The evaluation layer's evaluators, registered into the one registry the trainer uses
(`vqjax/training/evaluators.py`, where the protocol, `Suite` and the evaluators of the eval
split live: "reconstruction", "codebook", "prior", "classifier").

Importing this module registers:
  "ssim"            mean SSIM of a stage-1 model's reconstructions over the eval split
  "anomaly"         reconstruction-error anomaly detection (normal and labelled test batches)
  "sample_quality"  Frechet distance, precision / recall, Inception-style score, CAS of
                    generated images against real ones

`evaluate_run(config, model, variables)` is what `python -m vqjax.evaluate --workdir RUN`
reports: the run's own evaluators (`config.evals`, or its task's) in one pass over its eval
split, plus SSIM for a stage-1 model:

  config, model, variables = runs.load_run(workdir)
  evaluators.evaluate_run(config, model, variables)
"""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from vqjax.evaluation import anomaly, frechet, metrics
from vqjax.models import registry
from vqjax.training import classifier_task, tasks  # noqa: F401  (they register their evaluators)
from vqjax.training.evaluators import (  # noqa: F401  (re-exported)
  EVALUATORS,
  BatchEvaluator,
  CodebookEvaluator,
  Evaluator,
  ReconstructionEvaluator,
  Suite,
  build,
  names_for,
  register,
)


@register("ssim")
class SsimEvaluator(BatchEvaluator):
  """Mean SSIM (`metrics.ssim`) over real images of a stage-1 model's reconstructions.

  Args:
    clip: clip reconstructions to [-1, 1] first (what a saved image shows).
    (the rest as `BatchEvaluator`)
  """

  def __init__(self, model: Any, clip: bool = False, **kw):
    super().__init__(model, **kw)
    self.clip = clip

  def sums(self, variables, batch, frozen=None):
    del frozen
    image, mask = jnp.asarray(batch["image"], jnp.float32), batch["mask"].astype(jnp.float32)
    recon, _ = self.model.apply(variables, image, train=False)
    recon = recon.astype(jnp.float32)
    if self.clip:
      recon = jnp.clip(recon, -1.0, 1.0)
    return {"ssim": jnp.sum(metrics.ssim(image, recon) * mask), "count": jnp.sum(mask)}

  def summary(self, sums):
    count = float(sums["count"])
    return {"ssim": float(sums["ssim"]) / max(count, 1.0), "examples": count}


def standalone_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What `vqjax.evaluate` runs on a run: its evaluators (`config.evals`, or its task's), and
  "ssim" too for a stage-1 model."""
  names = names_for(config, tasks.TASKS[config.task].evals)
  if registry.is_autoencoder(config) and "ssim" not in names:
    names += ("ssim",)
  return names


def evaluate_run(
  config: ml_collections.ConfigDict, model: Any, variables: Any, max_batches: int = 0
) -> dict[str, float]:
  """A trained model's metrics over its eval split (`standalone_names`, in one pass).

  Args:
    config: the run's config.
    model: its module.
    variables: its variables.
    max_batches: eval batches; 0 = the whole split.
  """
  built = build(standalone_names(config), config, model, max_batches=max_batches)
  return Suite(built).run(variables, built[0].default_data())


@register("anomaly")
class AnomalyEvaluator(Evaluator):
  """Reconstruction-error anomaly detection (see `anomaly.evaluate_anomalies`).

  Args:
    model: a stage-1 module trained on normal images.
    score: "max" (of the blurred error map) or "mean" per-image score.
    quantile: quantile of normal scores used as threshold.
    sigma: blur of the maps before their maximum, in pixels.
    label_key: the anomaly label feature of the test batches.
    png_path: where to write the first test batch's grid (None = no image).
  """

  def __init__(
    self,
    model: Any,
    score: str = "max",
    quantile: float = 0.95,
    sigma: float = 1.0,
    label_key: str = "is_anomaly",
    png_path: str | None = None,
  ):
    self.model = model
    self.score = score
    self.quantile = quantile
    self.sigma = sigma
    self.label_key = label_key
    self.png_path = png_path

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, **kw) -> "AnomalyEvaluator":
    """The run config has no anomaly fields yet: everything comes from `kw`."""
    del config
    return cls(model, **kw)

  def run(self, variables: Any, data: Any = None) -> dict[str, float]:
    """Evaluates anomaly detection.

    Args:
      variables: the model's variables.
      data: {"normal": batches of held-out normal images, "test": labelled test batches},
        or the pair (normal, test).

    Returns:
      The dict of `anomaly.evaluate_anomalies`.
    """
    if data is None:
      raise ValueError("the anomaly evaluator needs data: normal and labelled test batches")
    normal, test = (data["normal"], data["test"]) if isinstance(data, dict) else data
    return anomaly.evaluate_anomalies(
      self.model,
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


@register("sample_quality")
class SampleQualityEvaluator(Evaluator):
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
    cls, config: ml_collections.ConfigDict, model: Any, features_fn: Callable, **kw
  ) -> "SampleQualityEvaluator":
    """The run config has no sample-quality fields yet: the functions and `kw` decide (the
    model is not used: the samples were drawn elsewhere)."""
    del config, model
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

  def run(self, variables: Any, data: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """`compute` with the uniform evaluator signature.

    Args:
      variables: unused (the samples were drawn elsewhere, e.g. by the sampler).
      data: {"real", "generated"} image arrays and optionally "real_label",
        "generated_label".

    Returns:
      See `compute`.
    """
    del variables
    if data is None:
      raise ValueError("the sample-quality evaluator needs data: real and generated images")
    return self.compute(
      data["real"], data["generated"], data.get("real_label"), data.get("generated_label")
    )
