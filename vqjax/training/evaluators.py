"""Evaluators: one registry of them, run by the trainer every `config.log.eval_every_steps` and
alone by `python -m vqjax.evaluate`, as big_vision's `config.evals` are.

An evaluator is a small class registered by name (`register`), built for one model with
`from_config(config, model, **overrides)` and run with `run(variables, data=None) -> {name:
float}`. Which ones a run uses: `config.evals` (names), or when it is empty the defaults of the
run's task (`Task.evals`: the autoencoder's "reconstruction" and "codebook", the prior's "prior",
the classifier's "classifier", registered by `tasks.py` and `classifier_task.py`). Evaluators
that need more than the eval split (anomaly detection, sample quality) live in
`vqjax/evaluation/evaluators.py` and register there; the layer above this one.

Most evaluators are `BatchEvaluator`s: masked sums over each eval batch (pure, jitted), then a
summary of the split's sums on the host. `Suite` runs several of them together in one pass over
the batches with one jitted function, built once for the model the evaluators were built with
(the model is closed over, never a jit argument, so it need not be hashable). Padding rows of
an eval batch ("mask" 0) never count. With several processes every process runs the same
batches of its own share of the split: the sums are global arrays, summed over all of them.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqjax import errors
from vqjax.data import pipeline
from vqjax.models import quantizer
from vqjax.training import sharding

Batch = dict[str, jax.Array]

# Evaluator name -> class (see `register`).
EVALUATORS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the evaluator class usable by `name` in `config.evals`."""

  def add(cls: type) -> type:
    EVALUATORS[name] = cls
    return cls

  return add


def level_names(levels: int) -> tuple[str, ...]:
  """Names of the code levels, coarsest first: what a user reads in logs and metrics."""
  if levels == 1:
    return ("codes",)
  if levels == 2:
    return ("top", "bottom")
  if levels == 3:
    return ("top", "middle", "bottom")
  return tuple(f"level{i}" for i in range(levels))


def psnr(mse: float) -> float:
  """10 log10(4 / MSE): images in [-1, 1], so the peak-to-peak range is 2."""
  return float(10.0 * np.log10(4.0 / max(mse, 1e-12)))


class Evaluator:
  """What every evaluator provides (see the module docstring)."""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, **kw) -> "Evaluator":
    raise NotImplementedError

  def run(self, variables: Any, data: Any = None) -> dict[str, float]:
    raise NotImplementedError


class BatchEvaluator(Evaluator):
  """Masked sums over eval batches, summarised over the split.

  Args:
    model: the module evaluated.
    data_config: `config.data`, for the default data (one pass over its eval split).
    max_batches: stop after this many batches of the default data; 0 = the whole split.
  """

  def __init__(
    self, model: Any, data_config: ml_collections.ConfigDict | None = None, max_batches: int = 0
  ):
    self.model, self.data_config, self.max_batches = model, data_config, max_batches
    self._suite = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, **kw) -> "BatchEvaluator":
    """From a run config: its data and `config.log.eval_batches`; `kw` overrides."""
    return cls(model, **{"data_config": config.data, "max_batches": config.log.eval_batches, **kw})

  def sums(self, variables: Any, batch: Batch, frozen: Any = None) -> dict[str, jax.Array]:
    """Pure: sums over the batch's real examples (`batch["mask"]` float32 [B], 0 on padding).
    `frozen` is the task's frozen inputs during training (None when run alone)."""
    raise NotImplementedError

  def summary(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    """Host: the split's summed statistics (float64) -> metrics."""
    raise NotImplementedError

  def default_data(self) -> Iterable:
    """One pass over the eval split of `data_config` (this process's share)."""
    if self.data_config is None:
      raise ValueError("no data given and the evaluator was built without config.data")
    return pipeline.make_eval_iterator(
      self.data_config, jax.process_index(), jax.process_count(), self.max_batches
    )

  def run(self, variables: Any, data: Iterable | None = None) -> dict[str, float]:
    """Evaluates the model on `data`: batches (dicts with the features and optionally "mask";
    default the eval split)."""
    return self.suite().run(variables, self.default_data() if data is None else data)

  def suite(self) -> "Suite":
    """This evaluator alone as a `Suite`, compiled on its first use and kept."""
    if self._suite is None:
      self._suite = Suite([self])
    return self._suite


class Suite:
  """Batch evaluators run together: one pass over the batches, one jitted function.

  Args:
    evaluators: `BatchEvaluator`s (built for the same model).
    put: host batch -> arrays on the devices (default: `jnp.asarray` of each feature; the
      trainer passes `sharding.global_batch` on its mesh).
    out_sharding: sharding of the sums (the trainer's: replicated over its mesh).
  """

  def __init__(
    self,
    evaluators: Sequence[BatchEvaluator],
    put: Callable[[dict], Batch] | None = None,
    out_sharding: Any = None,
  ):
    self.evaluators = list(evaluators)
    self._put = put or (lambda batch: jax.tree.map(jnp.asarray, batch))

    def sums(variables, batch, frozen):
      return [ev.sums(variables, batch, frozen) for ev in self.evaluators]

    placement = {} if out_sharding is None else {"out_shardings": out_sharding}
    self._sums = jax.jit(sums, **placement)

  def run(self, variables: Any, batches: Iterable, frozen: Any = None) -> dict[str, float]:
    """Every evaluator's metrics over `batches` (a key two give, like "examples", is one).

    Raises:
      errors.UserError: `batches` held none.
    """
    out = {}
    for ev, total in zip(self.evaluators, self.totals(variables, batches, frozen), strict=True):
      out.update(ev.summary(total))
    return out

  def totals(self, variables: Any, batches: Iterable, frozen: Any = None) -> list[dict]:
    """Each evaluator's sums over `batches`, float64 on the host (see `run`)."""
    totals = pending = None

    def add(totals, sums):
      sums = jax.tree.map(lambda x: np.asarray(x, np.float64), sharding.to_host(sums))
      return sums if totals is None else jax.tree.map(np.add, totals, sums)

    for batch in batches:
      batch = dict(batch)
      if "mask" not in batch:
        batch["mask"] = np.ones(len(next(iter(batch.values()))), np.float32)
      sums = self._sums(variables, self._put(batch), frozen)
      # The previous batch's sums are pulled once this one is dispatched: the devices work
      # while the host waits and reads.
      if pending is not None:
        totals = add(totals, pending)
      pending = sums
    if pending is None:
      raise errors.UserError("the eval data gave no batches")
    return add(totals, pending)


def names_for(config: ml_collections.ConfigDict, default: Sequence[str]) -> tuple[str, ...]:
  """`config.evals`, or `default` (the task's) when it is empty."""
  names = tuple(config.get("evals", ()) or ())
  return names or tuple(default)


def build(names: Sequence[str], config: ml_collections.ConfigDict, model: Any, **kw) -> list:
  """The evaluators `names` name, each `from_config(config, model, **kw)`.

  Raises:
    errors.UserError: a name is not registered.
  """
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise errors.UserError(
      f"unknown evaluator(s) {unknown} in config.evals; registered: {sorted(EVALUATORS)} "
      "(those of vqjax.evaluation.evaluators register when it is imported)"
    )
  return [EVALUATORS[n].from_config(config, model, **kw) for n in names]


def _images(batch: Batch) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(batch["image"], jnp.float32), batch["mask"].astype(jnp.float32)


@register("reconstruction")
class ReconstructionEvaluator(BatchEvaluator):
  """MSE and PSNR of a stage-1 model's reconstructions.

  MSE is the mean over real images of each image's mean squared error, PSNR 10 log10(4 / MSE)
  of the split's MSE (not a mean of per-image PSNRs). Reconstructions are not clipped.
  """

  def sums(self, variables, batch, frozen=None):
    del frozen
    image, mask = _images(batch)
    recon, _ = self.model.apply(variables, image, train=False)
    err = jnp.mean(jnp.square(recon.astype(jnp.float32) - image), axis=(1, 2, 3))
    return {"sq_err": jnp.sum(err * mask), "count": jnp.sum(mask)}

  def summary(self, sums):
    count = float(sums["count"])
    mse = float(sums["sq_err"]) / max(count, 1.0)
    return {"mse": mse, "psnr": psnr(mse), "examples": count}


@register("codebook")
class CodebookEvaluator(BatchEvaluator):
  """Usage, perplexity and top share of every level's codes (`encode_to_indices`, coarsest
  first), levels named by `level_names`.

  Args:
    num_codes: codebook size of every level (`config.vq.num_codes`).
    (the rest as `BatchEvaluator`)
  """

  def __init__(self, model: Any, num_codes: int, **kw):
    super().__init__(model, **kw)
    self.num_codes = num_codes

  @classmethod
  def from_config(cls, config, model, **kw):
    return super().from_config(config, model, **{"num_codes": config.vq.num_codes, **kw})

  def sums(self, variables, batch, frozen=None):
    del frozen
    image, mask = _images(batch)
    codes = self.model.apply(variables, image, method="encode_to_indices")
    sums = {
      f"counts{i}": quantizer.code_histogram(c, self.num_codes, weights=mask)
      for i, c in enumerate(codes)
    }
    return {**sums, "count": jnp.sum(mask)}

  def histograms(
    self, variables: Any, data: Iterable | None = None
  ) -> tuple[dict[str, np.ndarray], float]:
    """How often every code of every level is chosen over `data` (default the eval split).

    Returns:
      ({level name: float64 [num_codes] counts}, number of real examples), coarsest first.
    """
    (sums,) = self.suite().totals(variables, self.default_data() if data is None else data)
    return self._levels(sums), float(sums["count"])

  def _levels(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    levels = len(sums) - 1
    names = level_names(levels)
    return {names[i]: np.asarray(sums[f"counts{i}"]) for i in range(levels)}

  def summary(self, sums):
    out = {}
    for level, counts in self._levels(sums).items():
      stats = quantizer.usage_metrics(jnp.asarray(counts, jnp.float32))
      out.update({f"{level}/{k}": float(v) for k, v in stats.items()})
    out["examples"] = float(sums["count"])
    return out
