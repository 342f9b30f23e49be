"""Reading only the weights (params and model_state) of a run: `ckpt.init_from`, `load_run`,
and models imported with `python -m vqjax.convert`."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vqjax import paths
from vqjax.errors import CheckpointDamagedError, CheckpointMismatchError
from vqjax.training.checkpoint import Checkpointer, describe_mismatch, resolve_directory
from vqjax.training.checkpoint_integrity import (
  check_finite,
  check_intact,
  first_intact,
  short_message,
  unreadable,
)

WEIGHT_FIELDS = ("params", "model_state")


def _is_converted(path: str) -> bool:
  """A directory written by `python -m vqjax.convert` (config.json + variables/)."""
  return epath.Path(path, "config.json").is_file() and epath.Path(path, "variables").is_dir()


def _restore_converted(path: str, abstract_state: Any) -> dict:
  """Weights of an imported model (variables = {"params", "vq_state"}) onto the run's state."""
  target = {"params": abstract_state.params, **abstract_state.model_state}
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(os.path.join(paths.absolute(path), "variables"))
  saved = getattr(saved, "item_metadata", saved)
  saved = getattr(saved, "tree", saved)
  problem = describe_mismatch(saved, target)
  if problem is not None:
    raise CheckpointMismatchError(f"{path} does not fit this model: {problem}")
  # Empty collections saved for layout's sake (a prior's "vq_state": {}) are read as such.
  empty = [k for k in saved if k not in target and not jax.tree.leaves(saved[k])]
  out = checkpointer.restore(
    os.path.join(paths.absolute(path), "variables"), {**target, **{k: {} for k in empty}}
  )
  for k in empty:
    out.pop(k)
  params = out.pop("params")
  return {"params": params, "model_state": out}


def restore_weights(path: str, abstract_state: Any, step: int | None = None) -> dict:
  """Reads only the weights (params and model_state) of a checkpoint, for `ckpt.init_from`.

  The optimiser state is not read, so a run may start from weights trained with another
  optimiser or schedule.

  Args:
    path: a workdir, its checkpoints/ directory, or any directory of step directories.
    abstract_state: the current run's abstract TrainState (ShapeDtypeStructs with shardings).
    step: which step; None = the newest one not recorded as bad (a damaged one is skipped
      with a warning).

  Returns:
    {"params": ..., "model_state": ...} placed on the target shardings.
  """
  if _is_converted(path):
    return _restore_converted(path, abstract_state)
  directory = resolve_directory(path)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"{path} is neither a run's workdir nor a checkpoint directory")
  if step is not None:
    return _restore_weights_of(directory, abstract_state, step)
  # The newest intact step not recorded as bad, as a resume would pick.
  probe = Checkpointer(directory, read_only=True)
  try:
    candidates = probe.usable_steps()
  finally:
    probe.close()
  if not candidates:
    raise FileNotFoundError(f"no intact checkpoint in {directory}")
  loaded, _ = first_intact(
    directory, candidates, lambda s: _restore_weights_of(directory, abstract_state, s)
  )
  return loaded


def _restore_weights_of(directory: str, abstract_state: Any, step: int) -> dict:
  """restore_weights of one step; CheckpointDamagedError (one line) if it cannot be read."""
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_handlers={"state": ocp.PyTreeCheckpointHandler()},
  )
  try:
    item = {k: getattr(abstract_state, k) for k in WEIGHT_FIELDS}
    check_intact(directory, step)
    try:
      saved = manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
      if not saved:
        raise ValueError("state/_METADATA describes no arrays")
    except Exception as e:  # noqa: BLE001 - an unreadable tree description is damage
      raise CheckpointDamagedError(
        f"checkpoint step {step} in {directory} is damaged: {short_message(e)}"
      ) from None
    problem = describe_mismatch({k: saved.get(k) for k in WEIGHT_FIELDS}, item)
    if problem is not None:
      raise CheckpointMismatchError(f"{directory}/{step} does not fit this model: {problem}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    try:
      out = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        ),
      )
      # Reading is lazy in places: force every array so truncated files fail here.
      jax.block_until_ready(out["state"])
    except Exception as e:  # noqa: BLE001 - anything unreadable in the step is damage
      raise unreadable(directory, step, e) from None
    check_finite(out["state"], directory, step)
    return out["state"]
  finally:
    manager.close()
