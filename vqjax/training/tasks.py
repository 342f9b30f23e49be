"""What is trained: one small `Task` per stage, pure step functions the trainer jits.

The trainer knows nothing about models, losses or what a batch holds; it talks to a `Task`:

  init(rng, batch) -> TrainState                       pure; jitted sharded by the trainer
  frozen() -> pytree | None                            host; another run's weights the steps
                                                       read but never train (a stage-1 model
                                                       inside a prior's image hook); the trainer
                                                       shards it like the state and passes it
                                                       to every jitted step as an argument
  train_step(state, batch, rng, frozen) -> (state, metrics)
                                                       pure; `rng` is already this step's key
  eval_step(state, batch, frozen) -> sums              pure; sums over the real examples
  eval_summary(sums) -> {name: float}                  host; summed statistics -> metrics
  images(state, batch, rng, frozen) -> {grid: {row: images}}
                                                       pure; each grid becomes a PNG with its
                                                       rows labelled ("recon": input / output)
  dummy_batch() -> batch                               host; a one-example batch of the right
                                                       shapes, to build a model without data

and a few attributes: `progress_keys` (metrics on the progress line), `unit` (what the
throughput counts: "img" -> img/s, "codes" -> codes/s) and `config_sections` (the config groups
that decide the state's shapes, for the checkpoint fingerprint).

Batches are dicts of global arrays whose features depend on the data source (images float32
[B, H, W, C] in [-1, 1], integer code maps, "label"); eval batches add "mask" float32 [B], 0 on
padding. A prior or a classifier is one more `Task` subclass and one line in `TASKS`.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqjax import errors
from vqjax.models import quantizer, registry
from vqjax.training import optim

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; every leaf is a (global) jax.Array.

  Attributes:
    step: int32 scalar, the number of optimiser updates applied.
    params: trainable parameters (the "params" collection).
    opt_state: the optax state.
    model_state: the other variable collections, e.g. {"vq_state": ...} (EMA codebooks),
      updated by the forward pass rather than by the optimiser.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any


class Task:
  """The interface between the trainer and a training stage (see the module docstring)."""

  progress_keys: tuple[str, ...] = ("loss",)
  unit: str = "img"
  config_sections: tuple[str, ...] = ("task", "model")

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    raise NotImplementedError

  def frozen(self) -> Any:
    return None

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any):
    raise NotImplementedError

  def eval_step(self, state: TrainState, batch: Batch, frozen: Any) -> Metrics:
    raise NotImplementedError

  def eval_summary(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    raise NotImplementedError

  def images(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any) -> dict:
    return {}

  def dummy_batch(self) -> dict[str, np.ndarray]:
    raise NotImplementedError


def level_names(levels: int) -> tuple[str, ...]:
  """Names of the code levels, coarsest first: what a user reads in logs and metrics."""
  if levels == 1:
    return ("codes",)
  if levels == 2:
    return ("top", "bottom")
  if levels == 3:
    return ("top", "middle", "bottom")
  return tuple(f"level{i}" for i in range(levels))


def _rename_levels(metrics: dict[str, Any], levels: int) -> dict[str, Any]:
  """"level{i}/x" -> "top/x", "bottom/x", ... (see `level_names`)."""
  names = level_names(levels)
  out = {}
  for k, v in metrics.items():
    if k.startswith("level") and "/" in k:
      head, tail = k.split("/", 1)
      k = f"{names[int(head[len('level'):])]}/{tail}"
    out[k] = v
  return out


class AutoencoderTask(Task):
  """Stage 1: a VQ-VAE / VQ-VAE-2 trained on reconstruction + latent losses.

  Args:
    config: the full run config (`config.model`, `config.vq`, `config.optim`, ...).
    model: a module following the contract of `models/registry.py`; default
      `registry.build_model(config)`.
  """

  progress_keys = ("loss", "mse", "batch_usage")
  config_sections = ("task", "model", "vq")

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module | None = None):
    self.config = config
    self.model = registry.build_model(config) if model is None else model
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)
    self.levels = config.model.levels if config.model.name == "vqvae2" else 1

  def dummy_batch(self) -> dict[str, np.ndarray]:
    size, channels = self.config.data.image_size, self.config.data.channels
    return {"image": np.zeros((1, size, size, channels), np.float32)}

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters, EMA state and optimiser state from the shape of `batch`."""
    if "image" not in batch:
      raise errors.UserError(
          f"the autoencoder task needs an 'image' feature; the data has {sorted(batch)}")
    params_rng, vq_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "vq": vq_rng}, batch["image"], train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        model_state=variables,
    )

  def _loss(self, params, model_state, image, rng):
    (recon, aux), updates = self.model.apply(
        {"params": params, **model_state},
        image,
        train=True,
        rngs={"vq": rng},
        mutable=list(model_state.keys()),
    )
    del recon
    # The loss is reduced in float32 whatever the compute dtype (bf16 sums lose small terms).
    return aux["loss"].astype(jnp.float32), (aux, updates)

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None):
    """One optimiser update. Returns (new state, scalar metrics)."""
    del frozen
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (loss, (aux, model_state)), grads = grad_fn(
        state.params, state.model_state, batch["image"], rng
    )
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        k: jnp.asarray(v, jnp.float32)
        for k, v in aux.items()
        if not k.endswith("/counts") and jnp.ndim(v) == 0
    }
    # Per-batch statistics are told apart from the eval ones over the whole split.
    metrics = {k.replace("/usage", "/batch_usage").replace("/perplexity", "/batch_perplexity"): v
               for k, v in _rename_levels(metrics, self.levels).items()}
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = jnp.asarray(self.schedule(state.step), jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        model_state={**state.model_state, **model_state},
    )
    return new_state, metrics

  def _variables(self, state: TrainState) -> dict:
    return {"params": state.params, **state.model_state}

  def eval_step(self, state: TrainState, batch: Batch, frozen: Any = None) -> Metrics:
    """Masked sums over one eval batch: squared error, example count, code histograms."""
    del frozen
    image, mask = batch["image"], batch["mask"].astype(jnp.float32)
    recon, aux = self.model.apply(self._variables(state), image, train=False)
    err = jnp.mean(jnp.square(recon.astype(jnp.float32) - image), axis=(1, 2, 3))
    sums = {"sq_err": jnp.sum(err * mask), "count": jnp.sum(mask)}
    names = level_names(self.levels)
    for i, name in enumerate(names):
      codes = aux[f"level{i}/indices"]
      # Padded examples weigh zero, so the counts cover the real split only.
      sums[f"{name}/counts"] = quantizer.code_histogram(
          codes, self.config.vq.num_codes, weights=mask)
    return sums

  def eval_summary(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    """MSE, PSNR and code statistics over the whole eval split.

    PSNR is 10 log10(4 / MSE) of the split's mean squared error (images in [-1, 1], so the
    peak-to-peak range is 2), not a mean of per-image PSNRs.
    """
    mse = float(sums["sq_err"]) / max(float(sums["count"]), 1.0)
    out = {"mse": mse, "psnr": float(10.0 * np.log10(4.0 / max(mse, 1e-12)))}
    for key, counts in sums.items():
      if not key.endswith("/counts"):
        continue
      level = key[: -len("/counts")]
      stats = quantizer.usage_metrics(np.asarray(counts, np.float32))
      out[f"{level}/usage"] = float(stats["usage"])
      out[f"{level}/perplexity"] = float(stats["perplexity"])
    out["examples"] = float(sums["count"])
    return out

  def images(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None) -> dict:
    """One grid, "recon": inputs over their reconstructions, both in [-1, 1]."""
    del rng, frozen
    recon, _ = self.model.apply(self._variables(state), batch["image"], train=False)
    recon = jnp.clip(recon.astype(jnp.float32), -1, 1)
    return {"recon": {"input": batch["image"], "reconstruction": recon}}


TASKS = {"autoencoder": AutoencoderTask}


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task`."""
  if config.task not in TASKS:
    raise errors.UserError(f"unknown config.task {config.task!r}; expected one of {sorted(TASKS)}")
  return TASKS[config.task](config)
