"""`load_run`: the one way from a trained model on disk to (config, model, variables).

Code extraction, sampling, evaluation and notebooks all start here. Two kinds of directory
hold a trained model:
  * a trainer workdir (`python -m vqjax.train ... --workdir DIR`, or its checkpoints/): the
    config is the one saved with the chosen step, the weights are its params and model state
    (the optimiser state is never read);
  * a directory written by `python -m vqjax.convert` (config.json + variables/).
Only the model is built (`models/registry.py`): what fixes its variables' shapes is recorded in
the config (a prior's code-map shapes too), so no dataset is read.

`make_task(config)` is the task that trains `config`, with what it reads from another run: a
prior's stage-1 model, whose decoder draws the sample grids in the prior's logs.
"""

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from vqjax import config_checks, configs, errors, links, paths, sampling
from vqjax.models import registry
from vqjax.training import checkpoint, checkpoint_integrity, logs, tasks, weights


def _config_from_record(record: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON back into a ConfigDict (fields the schema has since gained keep
  their defaults)."""
  config = configs.base_config()
  with config.unlocked():
    _merge(config, configs.drop_retired(record))  # fields since retired: configs.RETIRED_FIELDS
  return config


def _merge(config: ml_collections.ConfigDict, record: dict) -> None:
  for key, value in record.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      current = config.get(key)
      if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
      config[key] = value


def _is_converted(path: str) -> bool:
  return epath.Path(path, "config.json").is_file() and epath.Path(path, "variables").is_dir()


def load_run(
  workdir: str, step: int | None = None, device: jax.Device | None = None
) -> tuple[ml_collections.ConfigDict, Any, dict]:
  """Loads a trained model: its config, its module and its variables.

  Args:
    workdir: a trainer workdir, its checkpoints/ directory, or a `vqjax.convert` output.
    step: the checkpoint step; None = the newest intact step not recorded as bad (a damaged
      one is skipped with a warning, as a resume skips it).
    device: where the variables go; default the first device.

  Returns:
    (config, model, variables): `model.apply(variables, ...)` computes the trained model
    (for the autoencoder: `{"params", "vq_state"}`, see `models/registry.py`).

  Raises:
    errors.UserError: the directory holds no trained model, or the model does not fit.
  """
  return load_run_with_step(workdir, step, device)[:3]


@logs.quiet_library_logs()  # Orbax's notes on read-only and partial restores, done on purpose
@logs.failed_read_leftovers_dropped()  # a damaged step's pending reads, failing after it
def load_run_with_step(
  workdir: str, step: int | None = None, device: jax.Device | None = None
) -> tuple[ml_collections.ConfigDict, Any, dict, int | None]:
  """`load_run`, and the checkpoint step it read (None for a converted model)."""
  path = paths.absolute(workdir)
  if not epath.Path(path).is_dir():
    raise errors.UserError(f"{workdir} is not a directory")
  if _is_converted(path):
    if step is not None:
      raise errors.UserError(f"{workdir} is a converted model: it has no steps")
    config = config_checks.read_config(os.path.join(path, "config.json"))
    return (config, *_restore(config, path, None, device), None)
  directory = checkpoint.resolve_directory(path)
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  try:
    candidates = ckpt.usable_steps() if step is None else [step]
    if step is None and not candidates:
      raise errors.UserError(
        f"no checkpoint in {directory}: {workdir} is not a finished or running vqjax run"
      )
    if step is not None and step not in ckpt.all_steps():
      raise errors.UserError(
        f"no checkpoint of step {step} in {directory}; it has {ckpt.all_steps()}"
      )
    # Every candidate's record up front, with one manager closed before any restore: an Orbax
    # read after a damaged step's failed restore floods stderr with its pending reads' errors.
    metas = {s: ckpt.read_meta(s) for s in candidates}
  finally:
    ckpt.close()

  def attempt(candidate: int) -> tuple:
    config = _config_from_record(_config_record(metas[candidate], directory, candidate))
    # The runs it read, recorded relative to its workdir where they share its parent.
    config = links.resolved_config(config, os.path.dirname(directory))
    return (config, *_restore(config, directory, candidate, device))

  if step is not None:  # asked for by number: its damage is the error, no fallback
    return (*attempt(step), step)
  loaded, read = checkpoint_integrity.first_intact(directory, candidates, attempt)
  return (*loaded, read)


def _config_record(meta: dict, directory: str, step: int) -> dict:
  """The config a step was saved with; the run's config.json if the step's record is damaged."""
  record = meta.get("config")
  if record is not None:
    return record
  config_json = os.path.join(os.path.dirname(directory), "config.json")
  try:
    with epath.Path(config_json).open() as f:
      return json.load(f)
  except (OSError, ValueError):
    raise errors.CheckpointError(
      f"checkpoint {directory}/{step} has no readable config record, nor has {config_json}"
    ) from None


def _restore(config: ml_collections.ConfigDict, path: str, step: int | None, device) -> tuple:
  """(model, variables) of `config`'s model, read from a checkpoint or converted directory."""
  model = registry.build_model(config)
  args, kwargs = registry.init_inputs(config)
  key = jax.random.key(0, impl="rbg")
  rngs = {"params": key, "vq": key, "dropout": key}
  abstract = dict(jax.eval_shape(lambda: model.init(rngs, *args, **kwargs)))
  placement = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement), abstract
  )
  params = abstract.pop("params")
  target = tasks.TrainState(step=None, params=params, opt_state=None, model_state=abstract)
  loaded = weights.restore_weights(path, target, step=step)
  return model, {"params": loaded["params"], **loaded["model_state"]}


def make_task(config: ml_collections.ConfigDict) -> tasks.Task:
  """`tasks.make_task(config)`, with what the task reads from other runs: a prior on extracted
  codes gets its stage-1 run (`config.prior.stage1`, recorded from the codes) and a sampler, and
  logs sample grids decoded by it. Without grids (`config.log.image_every_steps` = 0) nothing
  more is loaded; a stage-1 run that cannot be loaded leaves them out with a warning.

  The trainer calls it with its own copy of the config (`trainer.train_and_evaluate(config,
  workdir, make_task=runs.make_task)`, as `python -m vqjax.train` does).
  """
  task = tasks.make_task(config)
  stage1 = config.prior.stage1 if config.task == "prior" else ""
  if not stage1 or not config.log.image_every_steps:
    return task
  try:
    _, decoder, variables = load_run(stage1)
  except errors.UserError as e:
    logging.warning("no sample grids in the logs: stage-1 run %s: %s", stage1, e)
    return task
  return tasks.PriorTask(
    config,
    task.model,
    stage1=(decoder, jax.device_get(variables)),
    sample=sampling.sampler_for(task.model).sample,
  )
