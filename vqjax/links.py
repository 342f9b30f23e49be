"""How one run records another it depends on, so that a pipeline workdir can move.

A prior reads a code dataset and decodes with a stage-1 run; a code dataset records the stage-1
run it came from; a sample directory records the runs it was drawn from. When the two lie under
one parent directory (the stages of one pipeline workdir: `stage1/`, `codes/`, `prior_top/`,
...), the record is relative to the recording directory, e.g. `../stage1`, and a workdir copied
to another directory or bucket keeps working. Anything else is recorded as given, made absolute.

A relative record always starts with `./` or `../`. Any other string is read as it always was
(an absolute path, or one relative to the working directory), so records written before vqjax
wrote relative ones read the same. Paths with a scheme (`gs://bucket/run`) are compared and
joined as POSIX paths within their bucket; a record never crosses buckets.
"""

import os
import posixpath

import ml_collections

# The config fields that name another run or dataset a run reads: (group, field).
CONFIG_LINKS = (("data", "codes_dir"), ("prior", "stage1"), ("ckpt", "init_from"))


def _split(path: str) -> tuple[str, str]:
  """(scheme and bucket, absolute POSIX path within it); ("", absolute local path) locally."""
  if "://" in path:
    scheme, rest = path.split("://", 1)
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", posixpath.normpath("/" + key)
  return "", os.path.abspath(os.path.expanduser(path))


def is_relative_record(recorded: str) -> bool:
  """Whether `recorded` was written by `record` as relative to its directory."""
  return recorded.startswith(("./", "../")) or recorded in (".", "..")


def record(target: str, base: str) -> str:
  """How a run (or output) directory `base` records `target`, a run it depends on.

  Args:
    target: the run or dataset depended on ("" stays "").
    base: the directory the record is written in.

  Returns:
    `target` relative to `base` (starting "./" or "../") when `target` lies under `base`'s
    parent directory, else `target` made absolute.
  """
  if not target:
    return target
  target_root, target_path = _split(target)
  base_root, base_path = _split(base)
  absolute = target_root + target_path
  parent = posixpath.dirname(base_path.rstrip("/"))
  if target_root != base_root or parent in ("", "/"):
    return absolute
  if target_path != parent and not target_path.startswith(parent.rstrip("/") + "/"):
    return absolute
  relative = posixpath.relpath(target_path, base_path)
  return relative if is_relative_record(relative) else "./" + relative


def resolve(recorded: str, base: str) -> str:
  """The path a record written in directory `base` names (the inverse of `record`)."""
  if not recorded or not is_relative_record(recorded):
    return recorded
  root, path = _split(base)
  return root + posixpath.normpath(posixpath.join(path, recorded))


def _map_links(config: ml_collections.ConfigDict, base: str, fn) -> ml_collections.ConfigDict:
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for group, field in CONFIG_LINKS:
      section = out.get(group)
      if section is not None and isinstance(section.get(field), str):
        section[field] = fn(section[field], base)
  return out


def recorded_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of a run's config as its workdir records it: `CONFIG_LINKS` fields by `record`."""
  return _map_links(config, workdir, record)


def resolved_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of a config read from a run's workdir with its `CONFIG_LINKS` fields resolved."""
  return _map_links(config, workdir, resolve)
