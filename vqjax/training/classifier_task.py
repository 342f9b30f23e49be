"""The classifier stage: an image classifier trained by the shared trainer.

It judges samples for classifier-based rejection sampling (sampling/rejection.py) and gives
evaluation its feature space (`Classifier.features`). The loss is the softmax cross-entropy
against the data's "label", optionally against labels smoothed toward uniform
(`config.classifier.label_smoothing`). Training images arrive uint8 and are scaled, and flipped
with `config.data.random_flip`, on the devices (`data/device_transform.py`). Eval reports
accuracy, the mean negative log-likelihood of the true label (never smoothed, so runs with
different smoothing compare) and, with more than 5 classes, top-5 accuracy, all over the real
examples of the split.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqjax import errors
from vqjax.data.device_transform import device_transform
from vqjax.models import registry
from vqjax.training import evaluators, optim
from vqjax.training.task_base import Batch, Task, TrainState


class ClassifierTask(Task):
  """Trains `config.model` (a classifier) on images and their labels.

  Args:
    config: the run config: `config.classifier.num_classes`, `.label_smoothing`, `config.optim`,
      `config.train.steps`, `config.data.image_size` / `.channels`.
    model: a module mapping images [B, H, W, C] (and `train`) to logits [B, num_classes];
      default `registry.build_model(config)`.
  """

  progress_keys = ("loss", "accuracy")
  unit = "img"
  config_sections = ("task", "model", "classifier")
  evals = ("classifier",)

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module | None = None):
    self.config = config
    c = config.classifier
    if c.num_classes < 2:
      raise errors.UserError(
        f"config.classifier.num_classes={c.num_classes}: a classifier needs at least 2 classes"
      )
    if not 0.0 <= c.label_smoothing < 1.0:
      raise errors.UserError(
        f"config.classifier.label_smoothing={c.label_smoothing} is not in [0, 1)"
      )
    self.num_classes = int(c.num_classes)
    self.label_smoothing = float(c.label_smoothing)
    self.model = registry.build_model(config) if model is None else model
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)

  def dummy_batch(self) -> dict[str, np.ndarray]:
    size, channels = self.config.data.image_size, self.config.data.channels
    return {
      "image": np.zeros((1, size, size, channels), np.float32),
      "label": np.zeros((1,), np.int32),
    }

  def _inputs(self, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Images scaled (flipped with a train step's `rng`) and int32 labels."""
    missing = [k for k in ("image", "label") if k not in batch]
    if missing:
      raise errors.UserError(
        f"the classifier task needs features 'image' and 'label'; the data has {sorted(batch)}"
      )
    batch = device_transform(batch, rng, self.config.data)
    return batch["image"], batch["label"].astype(jnp.int32)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters and optimiser state from the shape of `batch["image"]`."""
    image, _ = self._inputs(batch)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = dict(
      self.model.init({"params": params_rng, "dropout": dropout_rng}, image, train=False)
    )
    params = variables.pop("params")
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      model_state=variables,
    )

  def _targets(self, label: jax.Array) -> jax.Array:
    """One-hot labels, smoothed: (1 - s) one_hot + s / num_classes."""
    onehot = jax.nn.one_hot(label, self.num_classes, dtype=jnp.float32)
    return optax.smooth_labels(onehot, self.label_smoothing) if self.label_smoothing else onehot

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None):
    """One optimiser update on the mean (smoothed) cross-entropy. Returns (state, metrics)."""
    del frozen
    image, label = self._inputs(batch, rng)

    def loss_fn(params):
      logits = self.model.apply(
        {"params": params, **state.model_state}, image, train=True, rngs={"dropout": rng}
      )
      logits = logits.astype(jnp.float32)
      return jnp.mean(optax.softmax_cross_entropy(logits, self._targets(label))), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    metrics = {
      "loss": loss,
      # Of this batch, with dropout on: a training signal, not the eval accuracy.
      "accuracy": jnp.mean((jnp.argmax(logits, -1) == label).astype(jnp.float32)),
      "grad_norm": optax.tree.norm(grads),
      "lr": jnp.asarray(self.schedule(state.step), jnp.float32),
    }
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return new_state, metrics

  def logits(self, state: TrainState, image: jax.Array) -> jax.Array:
    """Eval-mode logits, float32 [B, num_classes]."""
    variables = {"params": state.params, **state.model_state}
    return self.model.apply(variables, image, train=False).astype(jnp.float32)


@evaluators.register("classifier")
class ClassifierEvaluator(evaluators.BatchEvaluator):
  """Accuracy, the mean NLL in nats of the true label (and, with more than 5 classes, top-5
  accuracy) of a classifier over the real examples of eval batches with "image" and "label".

  Args:
    num_classes: `config.classifier.num_classes`.
    (the rest as `evaluators.BatchEvaluator`)
  """

  def __init__(self, model: Any, num_classes: int, **kw):
    super().__init__(model, **kw)
    self.num_classes = num_classes

  @classmethod
  def from_config(cls, config, model, **kw):
    kw = {"num_classes": int(config.classifier.num_classes), **kw}
    return super().from_config(config, model, **kw)

  def sums(self, variables, batch, frozen=None):
    del frozen
    if "label" not in batch:
      raise errors.UserError(f"the classifier eval needs a 'label'; the data has {sorted(batch)}")
    image, label = jnp.asarray(batch["image"], jnp.float32), batch["label"].astype(jnp.int32)
    mask = batch["mask"].astype(jnp.float32)
    logits = self.model.apply(variables, image, train=False).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
    sums = {
      "correct": jnp.sum(correct * mask),
      "nll": jnp.sum(nll * mask),
      "count": jnp.sum(mask),
    }
    if self.num_classes > 5:
      # The true label among the 5 largest logits: fewer than 5 logits beat it.
      true_logit = jnp.take_along_axis(logits, label[:, None], axis=-1)
      rank = jnp.sum(logits > true_logit, axis=-1)
      sums["correct_top5"] = jnp.sum((rank < 5).astype(jnp.float32) * mask)
    return sums

  def summary(self, sums):
    n = max(float(sums["count"]), 1.0)
    out = {
      "accuracy": float(sums["correct"]) / n,
      "nll": float(sums["nll"]) / n,
      "examples": float(sums["count"]),
    }
    if "correct_top5" in sums:
      out["top5_accuracy"] = float(sums["correct_top5"]) / n
    return out
