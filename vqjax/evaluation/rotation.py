"""Anomaly score of how well the priors recognise an image's rotation.

GEOM (Golan and El-Yaniv 2018, "Deep Anomaly Detection Using Geometric Transformations") trains
a classifier to tell which of several transformations was applied to a normal image, and calls
an image anomalous when the classifier cannot tell for it: what the classifier learned about
the normal class (where a collar is, which way a shoe points) does not hold for other things.
Here the classifier is the library's own: a class-conditional prior per code level whose
"class" is the rotation. Its training set is the codes of every normal training image rotated
by 0, 90, 180 and 270 degrees, labelled 0-3 (`python -m vqjax.extract_codes --rotations 4`);
the stage-1 model is the ordinary one, trained on upright images.

For an image x, with c_t the codes of x rotated t quarter turns and L[t, s] = log p(c_t | s)
summed over the levels (each finer level conditioned on the coarser codes of the same
rotation), the priors are a generative classifier of the rotation: p(s | c_t) = softmax_s
L[t, s] under a uniform prior over rotations. The score is the mean over t of -log p(t | c_t),
the cross-entropy of naming the rotations correctly: low for normal images, high for images
whose rotations the priors confuse.

  scorer = rotation.RotationScorer(model, variables, priors)   # priors: [(module, variables)]
  scores = scorer.score(images)   # {"rotation": float64 [B], "rotation_nll": float64 [B]}

"rotation_nll" is the mean over t of -L[t, t]: the codes' nats under their own rotation's
label, the plain likelihood of the four rotated copies (reported beside, as a check of what
the classification adds).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.evaluation import model_jit

ROTATIONS = 4  # quarter turns: 0, 90, 180 and 270 degrees


def rotate(images: Any, turns: int) -> Any:
  """`images` [B, H, W, C] rotated `turns` quarter turns counter-clockwise (H == W)."""
  xp = jnp if isinstance(images, jax.Array) else np
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"rotations need square NHWC images, got shape {tuple(images.shape)}")
  return xp.rot90(images, turns, axes=(1, 2))


def recognition_scores(log_likelihoods: Any) -> dict[str, np.ndarray]:
  """The two scores of `RotationScorer` from L [B, T, T] (row t: the rotated copy t; column s:
  its log-likelihood under label s): "rotation", mean_t -log softmax_s(L[t, :])[t], and
  "rotation_nll", mean_t -L[t, t]. float64 [B] each."""
  ll = np.asarray(log_likelihoods, np.float64)
  if ll.ndim != 3 or ll.shape[1] != ll.shape[2]:
    raise ValueError(f"expected log-likelihoods [B, T, T], got shape {ll.shape}")
  top = ll.max(axis=-1, keepdims=True)
  log_softmax = ll - top - np.log(np.exp(ll - top).sum(axis=-1, keepdims=True))
  diagonal = np.arange(ll.shape[1])
  return {
    "rotation": -log_softmax[:, diagonal, diagonal].mean(axis=1),
    "rotation_nll": -ll[:, diagonal, diagonal].mean(axis=1),
  }


@model_jit.per_model
def _codes_fn(model: Any):
  """The jitted `(variables, images) -> codes of every rotation` of a stage-1 model."""

  def fn(variables, images):
    return [
      model.apply(variables, rotate(images, t), method="encode_to_indices")
      for t in range(ROTATIONS)
    ]

  return fn


def _prior_log_likelihood(prior, variables, codes, condition, label):
  logits = prior.apply(variables, codes, condition=condition, label=label)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.take_along_axis(logp, codes[..., None], axis=-1), axis=(1, 2, 3))


class RotationScorer:
  """The rotation scores (module docstring) of a stage-1 model and its rotation priors.

  Attributes:
    model, variables: the stage-1 model (`encode_to_indices`).
    priors: (module, variables) per code level, coarsest first, each class-conditional with
      `num_classes == ROTATIONS` (trained on `extract_codes --rotations 4` codes).
  """

  def __init__(self, model: Any, variables: Any, priors: list[tuple[Any, Any]]):
    if not priors:
      raise ValueError("the rotation score needs a rotation prior per code level, got none")
    for level, (prior, _) in enumerate(priors):
      classes = getattr(prior, "num_classes", 0)
      if classes != ROTATIONS:
        raise ValueError(
          f"the level-{level} prior has num_classes={classes}, not {ROTATIONS}: rotation priors "
          "are trained on `extract_codes --rotations 4` codes with "
          f"config.prior.class_conditional=True and config.prior.num_classes={ROTATIONS}"
        )
    self.model, self.variables = model, variables
    self.priors = list(priors)
    modules = tuple(p for p, _ in self.priors)

    def log_likelihoods(variables, prior_variables, images):
      per_rotation = _codes_fn(model)(variables, images)
      rows = []
      for codes in per_rotation:  # the image rotated t quarter turns
        row = []
        for s in range(ROTATIONS):  # under label s
          label = jnp.full((images.shape[0],), s, jnp.int32)
          total = 0.0
          for level, (prior, pv) in enumerate(zip(modules, prior_variables, strict=True)):
            condition = tuple(codes[:level]) or None
            total = total + _prior_log_likelihood(prior, pv, codes[level], condition, label)
          row.append(total)
        rows.append(jnp.stack(row, axis=-1))
      return jnp.stack(rows, axis=1)  # [B, t, s]

    self._log_likelihoods = jax.jit(log_likelihoods)

  def log_likelihoods(self, images: Any) -> np.ndarray:
    """L [B, T, T] of images [B, H, W, C] in [-1, 1] (module docstring), float64."""
    images = jnp.asarray(images, jnp.float32)
    pvars = [v for _, v in self.priors]
    return np.asarray(self._log_likelihoods(self.variables, pvars, images), np.float64)

  def score(self, images: Any) -> dict[str, np.ndarray]:
    """{"rotation", "rotation_nll"}: float64 [B] each (`recognition_scores`)."""
    return recognition_scores(self.log_likelihoods(images))
