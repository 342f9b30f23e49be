"""Pure step functions, one small task per training stage.

The trainer knows nothing about models or losses: it talks to a `Task`, which provides
  init(rng, example_batch) -> TrainState              pure; the trainer jits it sharded
  train_step(state, batch, rng) -> (state, metrics)    pure; rng is folded with state.step
  eval_step(state, batch) -> sums                      pure; masked sums over the batch
  eval_summary(sums) -> {name: float}                  host; turns summed statistics into metrics
  images(state, batch) -> {name: images}               pure; grids written by logs.py
and `progress_keys`, the metrics shown on the progress line. Batches are dicts of global
arrays ("image" float32 [B, H, W, C] in [-1, 1], "label", and in eval a "mask" float32 [B]
that is 0 on padding). A prior or a classifier is one more `Task` subclass and one line in
`TASKS`.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

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

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    raise NotImplementedError

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
    raise NotImplementedError

  def eval_step(self, state: TrainState, batch: Batch) -> Metrics:
    raise NotImplementedError

  def eval_summary(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    raise NotImplementedError

  def images(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    return {}


def _fold(rng: jax.Array, step: jax.Array) -> jax.Array:
  # One key per step, a function of the step only: a resumed run draws the same randomness.
  return jax.random.fold_in(rng, step)


class AutoencoderTask(Task):
  """Stage 1: a VQ-VAE / VQ-VAE-2 trained on reconstruction + latent losses.

  Args:
    config: the full run config (`config.model`, `config.vq`, `config.optim`, ...).
    model: a module following the contract of `models/registry.py`; default
      `registry.build_model(config)`.
  """

  progress_keys = ("loss", "mse", "usage")

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module | None = None):
    self.config = config
    self.model = registry.build_model(config) if model is None else model
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters, EMA state and optimiser state from the shape of `batch`."""
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

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
    """One optimiser update. Returns (new state, scalar metrics)."""
    rng = _fold(rng, state.step)
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

  def eval_step(self, state: TrainState, batch: Batch) -> Metrics:
    """Masked sums over one eval batch: squared error, example count, code histograms."""
    image, mask = batch["image"], batch["mask"].astype(jnp.float32)
    variables = self._variables(state)
    recon, aux = self.model.apply(variables, image, train=False)
    err = jnp.mean(jnp.square(recon.astype(jnp.float32) - image), axis=(1, 2, 3))
    sums = {"sq_err": jnp.sum(err * mask), "count": jnp.sum(mask)}
    num_codes = self.config.vq.num_codes
    levels = sum(1 for k in aux if k.endswith("/indices"))
    for i in range(levels):
      c = aux[f"level{i}/indices"]
      per_pos = c.reshape(c.shape[0], -1)
      weights = jnp.broadcast_to(mask[:, None], per_pos.shape)
      # Weighted histogram: padded examples add zero, so the counts cover the real split only.
      sums[f"level{i}/counts"] = jnp.zeros((num_codes,), jnp.float32).at[per_pos.ravel()].add(
          weights.ravel()
      )
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

  def images(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Inputs and their reconstructions, both in [-1, 1]."""
    recon, _ = self.model.apply(self._variables(state), batch["image"], train=False)
    return {"input": batch["image"], "reconstruction": jnp.clip(recon.astype(jnp.float32), -1, 1)}


TASKS = {"autoencoder": AutoencoderTask}


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task`."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r}; expected one of {sorted(TASKS)}")
  return TASKS[config.task](config)
