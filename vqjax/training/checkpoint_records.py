"""What a checkpoint step records besides the train state: the `meta` and `data` items.

  meta  the resolved config and a fingerprint of the fields that shape the model
        (`config_meta`); `config_changes` names what differs between two such records;
  data  every process's data iterator state, gathered when saving (`gather_json`) and matched
        to this run's processes when restoring (`data_state_of_this_process`).
`training/checkpoint.py` writes and reads them with Orbax.
"""

import hashlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vqjax import configs

# Config groups that decide the state's tree structure and shapes, when the task names none.
MODEL_FIELDS = ("task", "model", "vq")


_NOT_SHAPING = ("stage1", "stage1_run_id", "stage1_step")


def config_meta(
  config: ml_collections.ConfigDict, sections: tuple[str, ...] = MODEL_FIELDS
) -> dict:
  """JSON-serialisable record of the config, with a hash of the state-shaping sections.

  Args:
    config: the run config.
    sections: the config groups that decide the state's shapes (`Task.config_sections`);
      `data.channels` is always included.

  Returns:
    {"model_fingerprint": 16 hex digits, "sections": [...], "config": the config as a dict}.
  """
  as_dict = json.loads(config.to_json_best_effort())
  shaping = {k: as_dict.get(k) for k in sections}
  shaping["channels"] = as_dict.get("data", {}).get("channels")
  # Fields that record where a run came from, or plugin options left empty, shape nothing:
  # left out, so the fingerprints of runs trained before they existed stay the same (a code
  # dataset of the same stage-1 model is not "another model" after an upgrade).
  shaping = {
    k: {f: v for f, v in g.items() if f not in _NOT_SHAPING and v != {}}
    if isinstance(g, dict)
    else g
    for k, g in shaping.items()
  }
  # A retired field is hashed at its old default, as before it retired: same fingerprints.
  for field, default in configs.RETIRED_FIELDS.items():
    group, _, name = field.partition(".")
    if isinstance(shaping.get(group), dict):
      shaping[group].setdefault(name, default)
  digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
  return {"model_fingerprint": digest, "sections": list(sections), "config": as_dict}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def config_changes(old: dict, new: dict, groups: tuple[str, ...] | None = None) -> list[str]:
  """ "group.field: old -> new" for every field that differs between two `config_meta`s.

  Args:
    old: the saved record.
    new: this run's record.
    groups: only these top-level groups; None = all.
  """
  a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
  keys = sorted((set(a) | set(b)) - set(configs.RETIRED_FIELDS))  # a retired field is no change
  if groups is not None:
    keys = [k for k in keys if k.split(".")[0] in groups]
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def gather_json(obj: Any) -> list:
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


def data_state_of_this_process(data: dict) -> Any:
  """This process's data iterator state from a checkpoint's record of every process's.

  On as many processes as saved, each gets its own. On another number, every process gets the
  saved position when all processes had saved the same one (the grain pipeline's states are
  global batch counts, equal on every host, and valid for any number of processes; the
  iterator itself decides whether it can continue from it); else None: the iterators restart.
  """
  states, saved_count = data["states"], data.get("process_count")
  if saved_count == jax.process_count():
    return states[jax.process_index()]
  if states and all(s == states[0] for s in states):
    logging.info(
      "checkpoint was written by %s processes, this run has %d: every process resumes the "
      "data at the saved position",
      saved_count,
      jax.process_count(),
    )
    return states[0]
  logging.warning(
    "checkpoint was written by %s processes with different data positions, this run has %d: "
    "data iterators restart",
    saved_count,
    jax.process_count(),
  )
  return None
