"""The interface between the trainer and what it trains: `Task`, and the `TrainState` it makes.

The trainer knows nothing about models, losses or what a batch holds; it talks to a `Task`:

  init(rng, batch) -> TrainState                       pure; jitted sharded by the trainer
  frozen() -> pytree | None                            host; another run's weights the steps
                                                       read but never train (a stage-1 model
                                                       inside a prior's image hook, given to the
                                                       task by `vqjax.runs.make_task`); the
                                                       trainer shards it like the state and
                                                       passes it to every jitted step
  train_step(state, batch, rng, frozen) -> (state, metrics)
                                                       pure; `rng` is already this step's key
  images(state, batch, rng, frozen) -> {grid: {row: images}}
                                                       pure; each grid becomes a PNG with its
                                                       rows labelled ("recon": input / output)
  dummy_batch() -> batch                               host; a one-example batch of the right
                                                       shapes, to build a model without data

and a few attributes: `model` (the module trained, which the evaluators evaluate),
`progress_keys` (metrics on the progress line), `unit` (what the throughput counts: "img" ->
img/s, "codes" -> codes/s), `config_sections` (the config groups that decide the state's
shapes, for the checkpoint fingerprint) and `evals` (the evaluators of `evaluators.py` the
trainer runs on the eval split when `config.evals` names none).

Batches are dicts of global arrays whose features depend on the data source (images, integer
code maps, "label"); eval batches add "mask" float32 [B], 0 on padding. Training images arrive
uint8 [B, H, W, C] (the host neither scales nor flips them): a task that reads images passes
the batch through `device_transform(batch, rng, config.data)` first, which scales them to
float32 [-1, 1] and applies `config.data.random_flip` from the step key; its init, eval and
image steps pass it with rng=None (scale only: eval batches come scaled from the host and go
through unchanged). The stages' tasks are in `tasks.py` (the autoencoder and the priors) and
`classifier_task.py`; `tasks.make_task(config)` picks one.
"""

from typing import Any

import flax
import jax
import numpy as np

Batch = dict[str, jax.Array]


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

  model: Any = None
  progress_keys: tuple[str, ...] = ("loss",)
  unit: str = "img"
  config_sections: tuple[str, ...] = ("task", "model")
  evals: tuple[str, ...] = ()

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    raise NotImplementedError

  def frozen(self) -> Any:
    return None

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any):
    raise NotImplementedError

  def images(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any) -> dict:
    return {}

  def dummy_batch(self) -> dict[str, np.ndarray]:
    raise NotImplementedError
