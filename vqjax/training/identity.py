"""A run's identity: a random id written once into its workdir, so runs that consume it can
record what they consumed, and runs that do not belong together are told apart.

`WORKDIR/run.json` ({"run_id", "created"}) is written by the trainer's primary process at a
run's first launch (and by `vqjax.convert` for a converted model). A path alone does not name a
run: a workdir can be deleted and trained again, and another stage-1 run can have the same code
shapes. What consumes a run records `{"run_id", "step"}`: a code dataset its stage-1 run and
checkpoint step, a prior the stage-1 run its codes came from (`config.prior.stage1_run_id`,
`config.prior.stage1_step`). Sampling and evaluation check the chain (`sampling/hierarchy.py`).
A copied workdir keeps its id: the same weights.
"""

import datetime
import json
import os
import uuid

from etils import epath

from vqjax import errors, paths

RUN_FILE = "run.json"


def read_run_id(workdir: str) -> str | None:
  """The run id recorded in `workdir`, or None where it has no record (a run from before ids
  were recorded).

  Raises:
    errors.UserError: a record that is there but damaged (not JSON, or without an id). It is
      never replaced silently: a new id would make everything made from the run look foreign.
  """
  path = epath.Path(workdir, RUN_FILE)
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    record = None
  run_id = record.get("run_id") if isinstance(record, dict) else None
  if not (isinstance(run_id, str) and run_id):
    raise errors.UserError(
      f"{path} is damaged (no run id in it); delete it to give the run a new id, and pass "
      "--allow_mismatch where priors trained on this run's codes are used with it"
    )
  return run_id


def ensure_run_id(workdir: str) -> str:
  """The run id of `workdir`, written (atomically) if it has none yet."""
  existing = read_run_id(workdir)
  if existing:
    return existing
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  record = {
    "run_id": uuid.uuid4().hex,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  paths.write_text(os.path.join(workdir, RUN_FILE), json.dumps(record) + "\n")
  return record["run_id"]
