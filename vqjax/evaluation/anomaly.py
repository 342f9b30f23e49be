"""Anomaly detection by reconstruction error of a stage-1 model (the medical-imaging use).

A VQ-VAE trained only on normal images reconstructs normal structure well and anything it
never saw (a lesion, an artefact) poorly, because the codebook has no codes for it. So:

  1. per-pixel error map: squared error between image and reconstruction, averaged over
     channels ([B, H, W]);
  2. per-image score: the mean of the map, or the maximum of the map after a Gaussian blur
     (a small bright region, not one noisy pixel, should decide);
  3. threshold: a quantile of the scores of held-out normal images, so the false-positive
     rate on normal images is about 1 - quantile by construction;
  4. evaluation: ROC AUC (threshold-free) plus the TPR / FPR at that threshold on a labelled
     test set.

With the priors of the code levels there are two more (`PriorScorer`):

  * the negative log-likelihood of the image's codes under the priors, per level and summed:
    codes the normal images never produce, or in arrangements they never have, cost nats;
  * restoration (Pinaya et al. 2021; Marimont and Tarroni 2021): in raster order, every code
    whose probability under the prior (given the codes before it, as restored so far) falls
    below a threshold is replaced by one drawn from the prior, level by level (each finer level
    conditioned on the restored coarser ones); the decoded restoration is a normal-looking
    version of the image, and its pixel difference from the input is the map.

Images are float [B, H, W, C] in [-1, 1]; batches may be padded with a "mask" as the eval
iterators of `vqjax.data.pipeline` yield them.
"""

import itertools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.evaluation import anomaly_figures, metrics, model_jit
from vqjax.evaluation import memory as memory_lib


@model_jit.per_model
def _reconstruct_fn(model: Any):
  """The jitted `(variables, images) -> (recons, error maps)` of `model`, built once."""

  def fn(variables, images):
    recon, _ = model.apply(variables, images, train=False)
    recon = recon.astype(jnp.float32)
    maps = jnp.mean(jnp.square(recon - images.astype(jnp.float32)), axis=-1)
    return recon, maps

  return fn


def reconstruct(model: Any, variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reconstructions and per-pixel error maps of a stage-1 model.

  Args:
    model: a stage-1 module (`model.apply(variables, x, train=False) -> (recon, aux)`).
    variables: its variables, e.g. from `vqjax.runs.load_run`.
    images: float [B, H, W, C] in [-1, 1].

  Returns:
    (recons float32 [B, H, W, C], maps float32 [B, H, W]).
  """
  return _reconstruct_fn(model)(variables, jnp.asarray(images))


def error_maps(model: Any, variables: Any, images: jax.Array) -> jax.Array:
  """Per-pixel squared reconstruction error averaged over channels.

  Args:
    model: a stage-1 module.
    variables: its variables.
    images: float [B, H, W, C] in [-1, 1].

  Returns:
    float32 [B, H, W].
  """
  return reconstruct(model, variables, images)[1]


def image_scores(maps: jax.Array, sigma: float = 1.0) -> dict[str, jax.Array]:
  """Per-image anomaly scores of error maps.

  Args:
    maps: float [B, H, W] error maps.
    sigma: standard deviation (pixels) of the Gaussian blur before the maximum.

  Returns:
    {"mean": mean of each map [B], "max": maximum of each blurred map [B]}.
  """
  maps = jnp.asarray(maps, jnp.float32)
  smoothed = metrics.gaussian_blur(maps[..., None], sigma)[..., 0]
  return {"mean": jnp.mean(maps, axis=(1, 2)), "max": jnp.max(smoothed, axis=(1, 2))}


def choose_threshold(normal_scores: np.ndarray, quantile: float = 0.95) -> float:
  """Score threshold from normal images: their `quantile` (linear interpolation).

  Args:
    normal_scores: [N] scores of held-out normal images.
    quantile: in [0, 1]; about 1 - quantile of normal images then score above the threshold.

  Returns:
    The threshold; an image is flagged anomalous when its score is strictly above it.
  """
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}")
  scores = np.asarray(normal_scores, np.float64).reshape(-1)
  if scores.size == 0:
    raise ValueError("choose_threshold needs at least one normal score")
  return float(np.quantile(scores, quantile))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1..N of values, tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  # Start of each run of equal values, and the rank every member of a run gets.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]
  run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(len(values))
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def roc_auc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
  """Area under the ROC curve, exactly, by the Mann-Whitney U statistic.

  AUC = P(score of an anomaly > score of a normal image) + 1/2 P(equal scores), over all
  (anomaly, normal) pairs.

  Args:
    scores: [N] anomaly scores (higher = more anomalous).
    is_anomaly: [N] bool (or 0/1) ground truth.

  Returns:
    The AUC in [0, 1]; NaN when one of the two classes is empty.
  """
  s = np.asarray(scores, np.float64).reshape(-1)
  y = np.asarray(is_anomaly).reshape(-1).astype(bool)
  if s.shape != y.shape:
    raise ValueError(f"roc_auc of {s.shape} scores and {y.shape} labels")
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  u = _average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def _unpack(batch: Any, label_key: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(images, mask, labels) of a batch: an image array, an (images, labels) pair, or a dict
  with "image", optional "mask" and `label_key`."""
  if isinstance(batch, dict):
    images = np.asarray(batch["image"])
    mask = batch.get("mask")
    labels = batch.get(label_key) if label_key else None
    if label_key and labels is None:
      raise ValueError(f"test batch has no {label_key!r} feature; it has {sorted(batch)}")
  elif isinstance(batch, tuple | list):
    images, labels = np.asarray(batch[0]), batch[1]
    mask = None
  else:
    images, mask, labels = np.asarray(batch), None, None
  mask = np.ones(len(images), bool) if mask is None else np.asarray(mask) > 0
  return images, mask, None if labels is None else np.asarray(labels)


def score_batches(
  model: Any,
  variables: Any,
  batches: Iterable[Any],
  sigma: float = 1.0,
  label_key: str | None = None,
) -> dict[str, np.ndarray]:
  """Anomaly scores of every real image of some batches.

  Args:
    model: a stage-1 module.
    variables: its variables.
    batches: image arrays [B, H, W, C], (images, labels) pairs, or dicts with "image",
      optionally "mask" (0 = padding, dropped) and `label_key`.
    sigma: blur of the maps before their maximum (see `image_scores`).
    label_key: the feature holding the 0/1 anomaly labels of dict batches; None = unlabelled.

  Returns:
    {"mean": [N], "max": [N]} float64 and, with labels, "is_anomaly": bool [N].
  """
  out = {"mean": [], "max": []}
  labels = []
  for batch in batches:
    images, mask, y = _unpack(batch, label_key)
    scores = image_scores(error_maps(model, variables, images), sigma)
    for key in out:
      out[key].append(np.asarray(scores[key], np.float64)[mask])
    if y is not None:
      labels.append(y.reshape(-1)[mask].astype(bool))
  result = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
  if labels:
    result["is_anomaly"] = np.concatenate(labels)
  return result


def evaluate_anomalies(
  model: Any,
  variables: Any,
  normal_batches: Iterable[Any],
  test_batches_with_labels: Iterable[Any],
  score: str = "max",
  quantile: float = 0.95,
  sigma: float = 1.0,
  label_key: str = "is_anomaly",
  png_path: str | None = None,
) -> dict[str, float]:
  """Threshold from normal images, then ROC AUC, TPR and FPR on a labelled test set.

  Args:
    model: a stage-1 module trained on normal images.
    variables: its variables.
    normal_batches: held-out normal images (not the test set), as for `score_batches`.
    test_batches_with_labels: (images, labels) pairs or dicts with "image", `label_key`
      (1 = anomaly) and optionally "mask".
    score: the per-image score that is thresholded, "max" or "mean" (see `image_scores`).
    quantile: quantile of the normal scores used as threshold.
    sigma: blur of the maps before their maximum.
    label_key: the label feature of dict test batches.
    png_path: when set, the first test batch's inputs, reconstructions and error maps are
      written there (`anomaly_figures.save_anomaly_png`).

  Returns:
    {"threshold", "auc" (of `score`), "auc_mean", "auc_max", "tpr" (share of test anomalies
    above the threshold), "fpr" (share of test normal images above it), "normal_fpr" (share
    of the threshold's own normal images above it, about 1 - quantile), "num_normal",
    "num_test", "num_anomalies"}; AUC, TPR or FPR is NaN where its class is empty.
  """
  if score not in ("max", "mean"):
    raise ValueError(f"unknown anomaly score {score!r}; expected 'max' or 'mean'")
  normal = score_batches(model, variables, normal_batches, sigma)
  threshold = choose_threshold(normal[score], quantile)
  test_batches = iter(test_batches_with_labels)
  if png_path:
    first = next(test_batches, None)
    if first is not None:
      images, mask, _ = _unpack(first, label_key)
      recons, maps = reconstruct(model, variables, images)
      anomaly_figures.save_anomaly_png(
        png_path, images[mask], np.asarray(recons)[mask], np.asarray(maps)[mask]
      )
      test_batches = itertools.chain([first], test_batches)
  test = score_batches(model, variables, test_batches, sigma, label_key=label_key)
  y = test.get("is_anomaly", np.zeros(0, bool))
  flagged = test[score] > threshold

  def share(selected):
    return float(np.mean(flagged[selected])) if np.any(selected) else float("nan")

  return {
    "threshold": threshold,
    "auc": roc_auc(test[score], y),
    "auc_mean": roc_auc(test["mean"], y),
    "auc_max": roc_auc(test["max"], y),
    "tpr": share(y),
    "fpr": share(~y),
    "normal_fpr": float(np.mean(normal[score] > threshold)),
    "num_normal": float(len(normal[score])),
    "num_test": float(len(y)),
    "num_anomalies": float(np.sum(y)),
  }


def code_nll(logits: jax.Array, codes: jax.Array) -> jax.Array:
  """Negative log-likelihood (nats) of each code under its logits.

  Args:
    logits: float [B, H, W, K] (a prior's output for `codes`).
    codes: int [B, H, W].

  Returns:
    float32 [B, H, W]: -log softmax(logits)[code].
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, jnp.asarray(codes, jnp.int32)[..., None], axis=-1)[..., 0]


def restore_codes(
  model: Any,
  variables: Any,
  codes: jax.Array,
  rng: jax.Array,
  threshold: float,
  condition: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Replaces the codes a prior finds unlikely, in raster order, with codes drawn from it.

  The prior runs in its incremental decode mode (`decode_position`, the cached samplers' mode):
  at position p it sees the codes before p as restored so far. A code whose probability there
  is below `threshold` is replaced by a draw from the prior's distribution at p (temperature
  1); a likely code stays.

  Args:
    model: a prior with a decode mode (`PixelSNAIL`, `GatedPixelCNN`), not class-conditional.
    variables: its variables.
    codes: int32 [B, H, W] the image's codes.
    rng: PRNG key of the draws (folded with the position).
    threshold: probability below which a code is replaced; 0 keeps every code.
    condition: None or the (restored) coarser code maps, coarsest first.

  Returns:
    (restored int32 [B, H, W], replaced bool [B, H, W]).
  """
  codes = jnp.asarray(codes, jnp.int32)
  condition = None if condition is None else tuple(jnp.asarray(c, jnp.int32) for c in condition)
  return _restore_fn(model)(variables, codes, rng, jnp.float32(threshold), condition)


@model_jit.per_model
def _restore_fn(model: Any):
  """The jitted restoration loop of `model`, built once."""

  def fn(variables, codes, rng, threshold, condition):
    variables = {k: v for k, v in variables.items() if k != "cache"}
    width = codes.shape[2]
    # The first call creates the decode cache (and the conditioning features).
    _, state = model.apply(
      variables, codes, condition=condition, decode_position=0, mutable=["cache"]
    )

    def body(p, carry):
      cache, restored, replaced = carry
      logits, state = model.apply(
        {**variables, "cache": cache},
        restored,
        condition=condition,
        decode_position=p,
        mutable=["cache"],
      )
      i, j = p // width, p % width
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      current = restored[:, i, j]
      unlikely = jnp.take_along_axis(logp, current[:, None], axis=-1)[:, 0] < jnp.log(threshold)
      drawn = jax.random.categorical(jax.random.fold_in(rng, p), logp, axis=-1).astype(jnp.int32)
      new = jnp.where(unlikely, drawn, current)
      return (
        state["cache"],
        restored.at[:, i, j].set(new),
        replaced.at[:, i, j].set(unlikely),
      )

    replaced = jnp.zeros(codes.shape, bool)
    size = codes.shape[1] * codes.shape[2]
    _, restored, replaced = jax.lax.fori_loop(0, size, body, (state["cache"], codes, replaced))
    return restored, replaced

  return fn


class PriorScorer:
  """Every anomaly score and map of a stage-1 model, with or without the priors of its levels.

  `score(images, rng)` returns, per image:
    * "recon_max", "recon_mean": the reconstruction-error scores (`image_scores`);
    * with a memory bank: "knn" (evaluation/memory.py);
    * with priors: "nll_level{i}" (nats of level i's codes, 0 = top) and "nll" (their sum);
      with a memory bank too "nll_ratio": nll minus the codes' nats under the bank's code
      frequencies (the likelihood ratio of a model with context to one without);
      "restoration_max": the maximum of the blurred restoration map (squared difference of
      input and restored image, averaged over channels, as the error map).

  Attributes:
    model, variables: the stage-1 model (`encode_to_indices` / `decode_from_indices`).
    priors: (model, variables) per level, coarsest first; empty = reconstruction scores only.
    sigma: blur of the maps before their maximum (pixels).
    restore_threshold: probability below which restoration replaces a code.
    memory: a bank of normal images' latents (`memory.Memory`) for the "knn" score, or None.
  """

  def __init__(
    self,
    model: Any,
    variables: Any,
    priors: list[tuple[Any, Any]] = (),
    sigma: float = 1.0,
    restore_threshold: float = 0.01,
    memory: memory_lib.Memory | None = None,
  ):
    if not 0.0 <= restore_threshold < 1.0:
      raise ValueError(f"restore_threshold must be in [0, 1), got {restore_threshold}")
    self.model, self.variables = model, variables
    self.priors = list(priors)
    self.sigma = float(sigma)
    self.restore_threshold = float(restore_threshold)
    self.memory = memory
    self._encode = jax.jit(self._encode_and_nll)
    self._decode = jax.jit(
      lambda v, codes: model.apply(v, tuple(codes), method="decode_from_indices").astype(
        jnp.float32
      )
    )

  def _encode_and_nll(self, variables, prior_variables, images):
    recon, _ = self.model.apply(variables, images, train=False)
    recon = recon.astype(jnp.float32)
    maps = jnp.mean(jnp.square(recon - images), axis=-1)
    codes = self.model.apply(variables, images, method="encode_to_indices")
    # Traced beside the encodings above, so XLA can share their identical work.
    latents = None
    if self.memory is not None:
      latents, _ = memory_lib.encode_latents(self.model, variables, images)
    nll = []
    for level, ((prior, _), pv) in enumerate(zip(self.priors, prior_variables, strict=True)):
      logits = prior.apply(pv, codes[level], condition=tuple(codes[:level]) or None)
      nll.append(code_nll(logits, codes[level]))
    return recon, maps, codes, nll, latents

  def score(self, images: Any, rng: jax.Array) -> dict[str, np.ndarray]:
    """Scores and maps of a batch.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      rng: PRNG key of the restoration draws.

    Returns:
      The per-image scores above (float64 [B]) and the arrays "recon" [B, H, W, C],
      "recon_map" [B, H, W], with priors also "nll_map{i}" [B, h_i, w_i] (nats per code),
      "restored" [B, H, W, C], "restoration_map" [B, H, W] and "replaced" (share of codes
      restoration replaced, [B]). With a memory bank also "knn": the mean distance of the
      image's quantized latents to the k nearest in the bank (`evaluation/memory.py`).
    """
    images = jnp.asarray(images, jnp.float32)
    pvars = [v for _, v in self.priors]
    recon, maps, codes, nll, latents = self._encode(self.variables, pvars, images)
    out = {"recon": np.asarray(recon), "recon_map": np.asarray(maps)}
    for k, v in image_scores(maps, self.sigma).items():
      out[f"recon_{k}"] = np.asarray(v, np.float64)
    if self.memory is not None:
      out["knn"] = self.memory.score(latents)
    if not self.priors:
      return out
    total = 0.0
    for level, n in enumerate(nll):
      per_image = np.asarray(jnp.sum(n, axis=(1, 2)), np.float64)
      out[f"nll_level{level}"], out[f"nll_map{level}"] = per_image, np.asarray(n)
      total = total + per_image
    out["nll"] = total
    if self.memory is not None and self.memory.counts is not None:
      out["nll_ratio"] = total - self.memory.code_nll(codes)
    restored, replaced = [], []
    for level, (prior, pv) in enumerate(self.priors):
      r, m = restore_codes(
        prior,
        pv,
        codes[level],
        jax.random.fold_in(rng, level),
        self.restore_threshold,
        condition=tuple(restored) or None,
      )
      restored.append(r)
      replaced.append(np.asarray(m).reshape(len(images), -1))
    image = np.clip(np.asarray(self._decode(self.variables, restored)), -1.0, 1.0)
    rmap = np.mean(np.square(image - np.asarray(images)), axis=-1)
    out["restored"], out["restoration_map"] = image, rmap
    out["restoration_max"] = np.asarray(image_scores(rmap, self.sigma)["max"], np.float64)
    out["replaced"] = np.concatenate(replaced, axis=1).mean(axis=1)
    return out
