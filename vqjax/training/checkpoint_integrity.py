"""Whether a saved checkpoint step is whole and unchanged, and what to do when it is not.

Once a step is complete, the primary process records every file's size and CRC-32 in
`<step>/vqjax_checksums.json` (`write_checksums`), and every restore (resume, `load_run`,
`ckpt.init_from`, hence evaluation, code extraction and sampling) checks them first
(`check_intact`): a file changed since the save (a bit flip, a bad copy) makes the step damaged,
skipped with a warning for the previous one (`first_intact`), as a missing file does. Flipped
weights that stayed finite used to evaluate with exit 0 at 7x the MSE. A step without the record
(an older vqjax, or a launch killed between the save and the record) is read unverified, with a
warning. Restored weights that are not finite are refused the same way (`check_finite`). CRC-32
(zlib), not a cryptographic hash: it detects damage, not tampering, and reads at memory speed
(benchmarks/RESULTS.md has the cost on the ImageNet-size checkpoint).
"""

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from absl import logging
from etils import epath

from vqjax import checksums, errors, paths
from vqjax.training import logs

T = TypeVar("T")

# Files every complete step directory holds (Orbax writes them; a step missing one is damaged).
_REQUIRED_FILES = (
  "_CHECKPOINT_METADATA",
  "state/_METADATA",
  "state/manifest.ocdbt",
  "data/metadata",
  "meta/metadata",
)


def short_message(e: BaseException, limit: int = 240) -> str:
  """An exception's text on one line, cut to `limit` characters (tensorstore errors run to KBs),
  without the pointer TensorStore appends to its details (it prints as a bound method)."""
  text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
  text = text or type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def first_intact(directory: str, steps: list[int], attempt: Callable[[int], T]) -> tuple[T, int]:
  """(attempt(step), step) for the first of `steps` whose attempt raises no
  CheckpointDamagedError; each damaged step is skipped with a warning, as a resume skips it.
  The leftovers of a damaged step's failed reads, which arrive while the next one is read, are
  not shown (`logs.failed_read_leftovers_dropped`).

  Raises:
    CheckpointDamagedError: every step is damaged (or there is none), naming each problem.
  """
  problems = []
  with logs.failed_read_leftovers_dropped():
    for step in steps:
      try:
        return attempt(step), step
      except errors.CheckpointDamagedError as e:
        logging.warning("%s; skipping it and trying an earlier step", e)
        problems.append(str(e))
  raise errors.CheckpointDamagedError(
    f"no intact checkpoint in {directory}: {'; '.join(problems) or 'none saved'}"
  )


def unreadable(directory: str, step: int, e: BaseException) -> errors.CheckpointDamagedError:
  """The one-line error for a step whose arrays failed to read (Orbax's other pending reads of
  it fail later, `logs.failed_read_leftovers_dropped`)."""
  return errors.CheckpointDamagedError(
    f"checkpoint step {step} in {directory} is damaged: {short_message(e)}"
  )


def check_intact(directory: str, step: int) -> None:
  """CheckpointDamagedError naming the first file of `step` that is missing, empty, or differs
  from its recorded checksum (the required files first, then the record's)."""
  root = os.path.join(directory, str(step))
  for rel in _REQUIRED_FILES:
    path = os.path.join(root, rel)
    if not epath.Path(path).is_file():
      raise errors.CheckpointDamagedError(f"checkpoint step {step} is damaged: {path} is missing")
    if paths.getsize(path) == 0:
      raise errors.CheckpointDamagedError(f"checkpoint step {step} is damaged: {path} is empty")
  verify_checksums(directory, step)


CHECKSUM_FILE = "vqjax_checksums.json"
_CHECKSUM_VERSION = 1
_UNVERIFIED_WARNED: set[str] = set()


def _step_files(root: str) -> list[str]:
  """Every file of a step directory but the checksum record, relative and sorted."""
  return [f for f in paths.files_under(root) if f != CHECKSUM_FILE]


def write_checksums(directory: str, step: int) -> dict[str, list[int]]:
  """Records the size and CRC-32 of every file of a complete step (`<step>/vqjax_checksums.json`,
  written atomically). Returns {relative path: [size, crc32]}."""
  root = os.path.join(directory, str(step))
  rels = _step_files(root)
  crcs = checksums.crc32_all([os.path.join(root, rel) for rel in rels])
  files = {rel: [paths.getsize(os.path.join(root, rel)), crc] for rel, crc in zip(rels, crcs)}
  record = {"version": _CHECKSUM_VERSION, "crc32": files}
  # Atomic: a full disk leaves no half-written file behind.
  paths.write_text(os.path.join(root, CHECKSUM_FILE), json.dumps(record))
  return files


def verify_checksums(directory: str, step: int) -> bool:
  """Checks a step's files against its record.

  Returns:
    True when every recorded file matched; False when the step has no record (read
    unverified; one warning per step).

  Raises:
    CheckpointDamagedError: a recorded file is missing or differs in size or content, or the
      record itself cannot be read.
  """
  root = os.path.join(directory, str(step))
  record_path = os.path.join(root, CHECKSUM_FILE)
  if not epath.Path(record_path).is_file():
    if root not in _UNVERIFIED_WARNED:
      _UNVERIFIED_WARNED.add(root)
      logging.warning(
        "checkpoint step %d in %s has no checksum record (written by an older vqjax, or by a "
        "launch that stopped before recording it): read unverified",
        step,
        directory,
      )
    return False
  try:
    with epath.Path(record_path).open() as f:
      files = json.load(f)["crc32"]
    if not isinstance(files, dict):
      raise ValueError("no file list")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.CheckpointDamagedError(
      f"checkpoint step {step} is damaged: its checksum record {record_path} cannot be read "
      f"({short_message(e)})"
    ) from None
  for rel, (size, _) in sorted(files.items()):  # sizes first: a stat each
    path = os.path.join(root, rel)
    if not epath.Path(path).is_file():
      raise errors.CheckpointDamagedError(f"checkpoint step {step} is damaged: {path} is missing")
    if paths.getsize(path) != size:
      raise errors.CheckpointDamagedError(
        f"checkpoint step {step} is damaged: {path} has {paths.getsize(path)} bytes, "
        f"{size} when saved"
      )
  rels = sorted(files)
  crcs = checksums.crc32_all([os.path.join(root, r) for r in rels])
  for rel, crc in zip(rels, crcs, strict=True):
    if crc != files[rel][1]:
      raise errors.CheckpointDamagedError(
        f"checkpoint step {step} is damaged: {os.path.join(root, rel)} changed since it was "
        "saved (checksum)"
      )
  return True


def check_finite(tree: Any, directory: str, step: int) -> None:
  """CheckpointDamagedError naming the first leaf of restored weights that holds a NaN or an
  infinity (floating leaves only)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
      continue
    if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
      raise errors.CheckpointDamagedError(
        f"checkpoint step {step} in {directory} holds weights that are not finite "
        f"({jax.tree_util.keystr(path)})"
      )
