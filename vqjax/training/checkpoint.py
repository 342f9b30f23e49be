"""The one module that talks to Orbax: save, keep-N, restore onto the current mesh.

A checkpoint step directory holds three items:
  state  the train state (`ocp.args.StandardSave`): every leaf a global jax.Array, so any
         mesh can read it back (8 devices -> 4 devices is a reshard, not a conversion);
  data   the data iterators' states, one per process (`ocp.args.JsonSave`);
  meta   the resolved config and a fingerprint of the fields that shape the model.
Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous step intact. The data and meta records are made and read in
`training/checkpoint_records.py`; the checksum record of a complete step, and the checks that
skip a damaged one, are in `training/checkpoint_integrity.py`.
"""

import contextlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vqjax import errors, paths
from vqjax.training import checkpoint_integrity, checkpoint_records

CHECKPOINT_SUBDIR = "checkpoints"


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


def resolve_directory(path: str) -> str:
  """A workdir (with checkpoints/ inside) or a checkpoints directory -> the latter."""
  path = paths.absolute(path)
  sub = os.path.join(path, CHECKPOINT_SUBDIR)
  return sub if epath.Path(sub).is_dir() else path


class Checkpointer:
  """Saves and restores (train state, data iterator state, config record) with Orbax.

  Beyond Orbax's own guarantees (a step appears only once completely written), it keeps a
  health record, `health.json`, of which steps the trainer confirmed good (the losses after
  them stayed finite and sane) and which it found bad (saved just before a divergence):
  restoring skips bad and damaged steps, and the keep-N clean-up never deletes the newest
  good step.

  Args:
    directory: where step directories live (usually `workdir/checkpoints`).
    keep: how many recent checkpoints to keep (`config.ckpt.keep`); 0 = all.
    async_save: save in a background thread (`config.ckpt.async_save`).
    read_only: open an existing directory for restoring only (`ckpt.init_from`).
  """

  HEALTH_FILE = "health.json"

  def __init__(
    self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False
  ):
    self.directory = paths.absolute(directory)
    self.keep = int(keep)
    self._read_only, self._async = read_only, async_save
    self._saving: int | None = None  # the step of the save in flight
    self._unfinished = False  # whether Orbax may still be writing or finalizing `_saving`
    self._failed: set[int] = set()  # steps whose save failed (never recorded as good)
    options = ocp.CheckpointManagerOptions(
      # Deletion is ours (`_clean_up`): Orbax's keep-N would rotate out the last good step.
      max_to_keep=None,
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
    self._health = self._read_health()
    # Orbax creates the directory in a background thread: a launch that fails at once (an empty
    # image folder) otherwise exits while it runs, and Orbax logs "cannot schedule new futures
    # after interpreter shutdown" after the one-line error.
    self._manager.wait_until_finished()

  # --- health record ---------------------------------------------------------------------

  def _read_health(self) -> dict:
    path = os.path.join(self.directory, self.HEALTH_FILE)
    try:
      with epath.Path(path).open() as f:
        data = json.load(f)
      return {
        "good": [int(s) for s in data.get("good", [])],
        "bad": [int(s) for s in data.get("bad", [])],
      }
    except FileNotFoundError:
      return {"good": [], "bad": []}
    except (OSError, ValueError, TypeError, AttributeError):
      logging.warning("%s is unreadable; treating every checkpoint as unconfirmed", path)
      return {"good": [], "bad": []}

  def _write_health(self) -> None:
    if self._read_only or jax.process_index() != 0:
      return
    # Atomic: a full disk leaves no half-written file behind.
    paths.write_text(os.path.join(self.directory, self.HEALTH_FILE), json.dumps(self._health))

  def mark_good(self, steps: list[int]) -> None:
    """Records saved steps as good: training after them stayed finite and sane. A step whose
    save failed is not on disk, and is never recorded."""
    new = [
      int(s) for s in steps if int(s) not in self._health["good"] and int(s) not in self._failed
    ]
    if new:
      self._health["good"] = sorted(set(self._health["good"]) | set(new))
      self._health["bad"] = [s for s in self._health["bad"] if s not in new]
      self._write_health()
      self._clean_up()

  def mark_bad(self, steps: list[int]) -> None:
    """Records saved steps as bad (written just before a divergence): never restored."""
    new = [int(s) for s in steps if int(s) not in self._health["bad"]]
    if new:
      self._health["bad"] = sorted(set(self._health["bad"]) | set(new))
      self._health["good"] = [s for s in self._health["good"] if s not in new]
      self._write_health()

  def _forget(self, steps: list[int]) -> None:
    """Drops `steps` from the health record (they are being deleted or rewritten)."""
    h = self._health
    if any(s in h["good"] or s in h["bad"] for s in steps):
      h["good"] = [s for s in h["good"] if s not in steps]
      h["bad"] = [s for s in h["bad"] if s not in steps]
      self._write_health()

  def discard_after(self, step: int) -> None:
    """Deletes the steps after `step`: a run resumed from `step` replaces that future (they
    were recorded bad, or the resume skipped them as damaged)."""
    later = [s for s in self.all_steps() if s > step]
    for s in later:
      self._manager.delete(s)
    self._forget(later)

  def last_good_step(self) -> int | None:
    """The newest step confirmed good that is still on disk, or None."""
    steps = set(self.all_steps())
    good = [s for s in self._health["good"] if s in steps]
    return max(good) if good else None

  def bad_steps(self) -> list[int]:
    return list(self._health["bad"])

  def _clean_up(self, saving: int | None = None) -> None:
    """Deletes all but the newest `keep` usable steps, always keeping the newest good one.

    Args:
      saving: a step being saved asynchronously (not listed yet, but counted as kept).
    """
    if self.keep <= 0 or self._read_only:
      return
    on_disk = self.all_steps()
    steps = sorted(set(on_disk) | ({saving} if saving is not None else set()))
    usable = [s for s in steps if s not in self._health["bad"]]
    keep = set(usable[-self.keep :])
    good = self.last_good_step()
    if good is not None:
      keep.add(good)
    for s in steps:
      if s not in keep and s in on_disk:
        self._manager.delete(s)
    self._forget([s for s in steps if s not in keep and s in on_disk])

  # --- save / restore --------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest complete step not recorded as bad, or None."""
    steps = [s for s in self.all_steps() if s not in self._health["bad"]]
    return max(steps) if steps else None

  def all_steps(self) -> list[int]:
    """The complete steps on disk."""
    if not self._unfinished:
      self._manager.reload()
      return sorted(self._manager.all_steps())
    # While a save may be in flight, Orbax's own list (the steps on disk when it started, less
    # those deleted since, plus the one being saved) is current: a reload would drop the step
    # being saved from it, which Orbax's finalize of a save at a preemption sync point (its own
    # `reached_preemption`) needs there. That step is complete only after `wait`.
    return sorted(s for s in self._manager.all_steps() if s != self._saving)

  def save(self, step: int, state: Any, data_state: Any, meta: dict) -> None:
    """Starts saving `state` (async unless disabled). Every process must call this.

    Args:
      step: the step number naming the checkpoint.
      state: pytree of global jax.Arrays.
      data_state: this process's data iterator state (JSON-serialisable).
      meta: `checkpoint_records.config_meta(config)`.
    """
    data = {
      "process_count": jax.process_count(),
      "states": checkpoint_records.gather_json(data_state),
    }
    self.wait()  # the previous async save finished, or its failure reported for its step
    with self._save_errors():
      if int(step) in self.all_steps():  # left by a run that diverged after this step's
        self._manager.delete(int(step))
      self._forget([int(step)])
      self._failed.discard(int(step))
      self._saving, self._unfinished = int(step), True
      self._manager.save(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
      self._unfinished = self._async  # a synchronous save is complete when `save` returns
    self._clean_up(saving=int(step))

  @contextlib.contextmanager
  def _save_errors(self):
    """A failed save (a full disk, a quota, a lost mount) as one CheckpointSaveError naming the
    step, the directory and the step a resume would use, instead of Orbax's traceback."""
    try:
      yield
    except (OSError, ValueError) as e:
      step, self._saving, self._unfinished = self._saving, None, False
      if step is None:
        raise
      self._failed.add(step)
      try:
        self._forget([step])  # never recorded as good: it is not on disk
      except OSError:  # the same full disk: the record is only a hint (steps are checked)
        pass
      try:
        newest = self.latest_step()
      except Exception:  # noqa: BLE001 - the message matters more than this detail
        newest = None
      raise errors.CheckpointSaveError(
        f"could not write checkpoint step {step} in {self.directory}: "
        f"{checkpoint_integrity.short_message(e)}; "
        + (f"a resume continues from step {newest}" if newest is not None else "none is saved")
      ) from None

  def check_intact(self, step: int) -> None:
    """Raises CheckpointDamagedError naming the first missing or empty file of `step`."""
    checkpoint_integrity.check_intact(self.directory, step)

  def read_meta(self, step: int) -> dict:
    """The config record (`config_meta`) saved with `step`; {} when it cannot be read."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return out["meta"] or {}
    except Exception:  # noqa: BLE001 - a damaged record only costs the explanation
      return {}

  def check_compatible(self, step: int, abstract_state: Any, meta: dict | None = None) -> None:
    """Raises CheckpointMismatchError (one line) if the saved tree differs from the target."""
    self.check_intact(step)
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any failure to read the tree's metadata is damage
      raise errors.CheckpointDamagedError(
        f"checkpoint step {step} is damaged: {self.directory}/{step}/state/_METADATA "
        f"cannot be read ({checkpoint_integrity.short_message(e)})"
      ) from None
    saved_tree = getattr(saved, "tree", saved)
    if not saved_tree:
      raise errors.CheckpointDamagedError(
        f"checkpoint step {step} is damaged: {self.directory}/{step}/state/_METADATA "
        "describes no arrays"
      )
    problem = describe_mismatch(saved_tree, abstract_state)
    if problem is None:
      return
    hint = ""
    if meta is not None:
      old = self.read_meta(step)
      if old.get("model_fingerprint") != meta["model_fingerprint"]:
        hint = f"; it was written by a different model config ({_config_diff(old, meta)})"
    raise errors.CheckpointMismatchError(
      f"checkpoint {self.directory}/{step} does not fit this model: {problem}{hint}"
    )

  def restore(
    self, abstract_state: Any, step: int | None = None, meta: dict | None = None
  ) -> tuple[Any, Any]:
    """Restores one step onto the shardings of `abstract_state` (ShapeDtypeStructs with
    `sharding`).

    Args:
      abstract_state: the target tree; its shardings may use a different mesh than the save.
      step: which step; None = the latest usable one.
      meta: this run's `config_meta`, to explain a mismatch.

    Returns:
      (state, this process's data iterator state or None if it cannot be matched).

    Raises:
      CheckpointDamagedError: the step is incomplete or unreadable.
      CheckpointMismatchError: the step was written by another model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(step, abstract_state, meta)
    try:
      out = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
        ),
      )
      data = out["data"]
      if not isinstance(data, dict) or "states" not in data:
        raise ValueError(f"data record is {type(data).__name__}, not the saved iterator states")
      state = out["state"]
      # Reading is lazy in places: force every array so truncated files fail here, not later.
      jax.block_until_ready(state)
    except Exception as e:  # noqa: BLE001 - anything unreadable in a step is damage
      raise checkpoint_integrity.unreadable(self.directory, step, e) from None
    checkpoint_integrity.check_finite(state, self.directory, step)
    return state, checkpoint_records.data_state_of_this_process(data)

  def usable_steps(self) -> list[int]:
    """The steps on disk not recorded as bad, newest first: what a resume tries in order."""
    return sorted(set(self.all_steps()) - set(self._health["bad"]), reverse=True)

  def restore_newest_intact(
    self, abstract_state: Any, meta: dict | None = None
  ) -> tuple[Any, Any, int]:
    """Restores the newest usable step, skipping (with a warning) damaged ones.

    Returns:
      (state, data iterator state or None, the restored step).

    Raises:
      CheckpointMismatchError: the newest intact step was written by another model.
      CheckpointDamagedError: every step is damaged.
    """
    steps = self.usable_steps()
    (state, data_state), step = checkpoint_integrity.first_intact(
      self.directory, steps, lambda s: self.restore(abstract_state, s, meta)
    )
    if step != steps[0]:
      skipped = steps.index(step)
      logging.warning("resumed from step %d after skipping %d damaged checkpoint(s)", step, skipped)
    return state, data_state, step

  def wait(self) -> None:
    """Blocks until pending async saves are on disk (CheckpointSaveError if one failed), then
    records the finished step's checksums (primary process)."""
    with self._save_errors():
      self._manager.wait_until_finished()
      step, self._unfinished = self._saving, False
      if step is not None and jax.process_index() == 0 and step in self.all_steps():
        checkpoint_integrity.write_checksums(self.directory, step)
    self._saving = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def _config_diff(old: dict, new: dict) -> str:
  groups = tuple(new.get("sections") or checkpoint_records.MODEL_FIELDS) + ("data",)
  changed = checkpoint_records.config_changes(old, new, groups)
  return ", ".join(changed[:4]) or "fingerprint differs"


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, the form `restore` expects."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
  )
