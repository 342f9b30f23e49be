"""The one module that talks to Orbax: save, keep-N, restore onto the current mesh.

A checkpoint step directory holds three items:
  state  the train state (`ocp.args.StandardSave`): every leaf a global jax.Array, so any
         mesh can read it back (8 devices -> 4 devices is a reshard, not a conversion);
  data   the data iterators' states, one per process (`ocp.args.JsonSave`);
  meta   the resolved config and a fingerprint of the fields that shape the model.
Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous step intact.
"""

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

CHECKPOINT_SUBDIR = "checkpoints"
# Config groups that decide the state's tree structure and shapes.
MODEL_FIELDS = ("task", "model", "vq")


def config_meta(config: ml_collections.ConfigDict) -> dict:
  """JSON-serialisable record of the config, with a hash of the model-shaping fields."""
  as_dict = json.loads(config.to_json_best_effort())
  shaping = {k: as_dict.get(k) for k in MODEL_FIELDS}
  shaping["channels"] = as_dict["data"]["channels"]
  digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
  return {"model_fingerprint": digest, "config": as_dict}


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in leaves if x is not None}


def describe_mismatch(saved: Any, target: Any) -> str | None:
  """One line naming how two trees of arrays differ in structure or shapes; None if equal."""
  a, b = _flat_shapes(saved), _flat_shapes(target)
  only_saved, only_target = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  if only_saved or only_target:
    parts = []
    if only_saved:
      parts.append(f"{len(only_saved)} arrays only in the checkpoint (e.g. {only_saved[0]})")
    if only_target:
      parts.append(f"{len(only_target)} arrays only in this model (e.g. {only_target[0]})")
    return " and ".join(parts)
  for key in sorted(a):
    if a[key] != b[key]:
      return f"{key} has shape {a[key]} in the checkpoint but {b[key]} in this model"
  return None


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a different model or config."""


def _gather_json(obj: Any) -> list:
  """Every process's JSON-serialisable `obj`, in process order (all processes get the list)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: data.size] = data
  everything = multihost_utils.process_allgather(padded)
  rows = zip(everything, lengths.ravel(), strict=True)
  return [json.loads(bytes(row[: int(n)]).decode()) for row, n in rows]


def resolve_directory(path: str) -> str:
  """A workdir (with checkpoints/ inside) or a checkpoints directory -> the latter."""
  path = os.path.abspath(os.path.expanduser(path))
  sub = os.path.join(path, CHECKPOINT_SUBDIR)
  return sub if os.path.isdir(sub) else path


class Checkpointer:
  """Saves and restores (train state, data iterator state, config record) with Orbax.

  Args:
    directory: where step directories live (usually `workdir/checkpoints`).
    keep: how many recent checkpoints to keep (`config.ckpt.keep`).
    async_save: save in a background thread (`config.ckpt.async_save`).
    read_only: open an existing directory for restoring only (`ckpt.init_from`).
  """

  def __init__(
      self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False
  ):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        # A save killed half-way leaves a tmp directory; remove it rather than trip over it.
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, meta: dict) -> None:
    """Starts saving `state` (async unless disabled). Every process must call this.

    Args:
      step: the step number naming the checkpoint.
      state: pytree of global jax.Arrays.
      data_state: this process's data iterator state (JSON-serialisable).
      meta: `config_meta(config)`.
    """
    data = {"process_count": jax.process_count(), "states": _gather_json(data_state)}
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )

  def check_compatible(self, step: int, abstract_state: Any, meta: dict | None = None) -> None:
    """Raises CheckpointMismatchError (one line) if the saved tree differs from the target."""
    saved = self._manager.item_metadata(step)["state"]
    saved_tree = getattr(saved, "tree", saved)
    problem = describe_mismatch(saved_tree, abstract_state)
    if problem is None:
      return
    hint = ""
    if meta is not None:
      saved_meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      old = saved_meta["meta"] or {}
      if old.get("model_fingerprint") != meta["model_fingerprint"]:
        hint = f"; it was written by a different model config ({_config_diff(old, meta)})"
    raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} does not fit this model: {problem}{hint}"
    )

  def restore(
      self, abstract_state: Any, step: int | None = None, meta: dict | None = None
  ) -> tuple[Any, Any]:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with `sharding`).

    Args:
      abstract_state: the target tree; its shardings may use a different mesh than the save.
      step: which step; None = the latest.
      meta: this run's `config_meta`, to explain a mismatch.

    Returns:
      (state, this process's data iterator state or None if it cannot be matched).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(step, abstract_state, meta)
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ),
    )
    data = out["data"] or {}
    data_state = None
    if data.get("process_count") == jax.process_count():
      data_state = data["states"][jax.process_index()]
    else:
      logging.warning(
          "checkpoint was written by %s processes, this run has %d: data iterators restart",
          data.get("process_count"),
          jax.process_count(),
      )
    return out["state"], data_state

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


WEIGHT_FIELDS = ("params", "model_state")


def _is_converted(path: str) -> bool:
  """A directory written by `python -m vqjax.convert` (config.json + variables/)."""
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "variables")
  )


def _restore_converted(path: str, abstract_state: Any) -> dict:
  """Weights of an imported model (variables = {"params", "vq_state"}) onto the run's state."""
  target = {"params": abstract_state.params, **abstract_state.model_state}
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(os.path.join(os.path.abspath(path), "variables"))
  saved = getattr(saved, "item_metadata", saved)
  saved = getattr(saved, "tree", saved)
  problem = describe_mismatch(saved, target)
  if problem is not None:
    raise CheckpointMismatchError(f"ckpt.init_from {path} does not fit this model: {problem}")
  out = checkpointer.restore(os.path.join(os.path.abspath(path), "variables"), target)
  params = out.pop("params")
  return {"params": params, "model_state": out}


def restore_weights(path: str, abstract_state: Any, step: int | None = None) -> dict:
  """Reads only the weights (params and model_state) of a checkpoint, for `ckpt.init_from`.

  The optimiser state is not read, so a run may start from weights trained with another
  optimiser or schedule.

  Args:
    path: a workdir, its checkpoints/ directory, or any directory of step directories.
    abstract_state: the current run's abstract TrainState (ShapeDtypeStructs with shardings).
    step: which step; None = the latest.

  Returns:
    {"params": ..., "model_state": ...} placed on the target shardings.
  """
  if _is_converted(path):
    return _restore_converted(path, abstract_state)
  directory = resolve_directory(path)
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()},
  )
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"ckpt.init_from: no checkpoint in {directory}")
    item = {k: getattr(abstract_state, k) for k in WEIGHT_FIELDS}
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    problem = describe_mismatch({k: saved.get(k) for k in WEIGHT_FIELDS}, item)
    if problem is not None:
      raise CheckpointMismatchError(
          f"ckpt.init_from {directory}/{step} does not fit this model: {problem}"
      )
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                         partial_restore=True)
        ),
    )
    return out["state"]
  finally:
    manager.close()


def _config_diff(old: dict, new: dict) -> str:
  a, b = old.get("config", {}), new.get("config", {})
  changed = []
  for group in MODEL_FIELDS:
    ga, gb = a.get(group), b.get(group)
    if isinstance(ga, dict) and isinstance(gb, dict):
      changed += [f"{group}.{k}: {ga.get(k)!r} -> {gb.get(k)!r}" for k in sorted(set(ga) | set(gb))
                  if ga.get(k) != gb.get(k)]
    elif ga != gb:
      changed.append(f"{group}: {ga!r} -> {gb!r}")
  return ", ".join(changed[:4]) or "fingerprint differs"


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, the form `restore` expects."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
  )
