"""The evaluation network of a small dataset: trained once, cached, and named in every result.

Sample quality (Frechet distance, precision / recall, CAS) is measured in the pooled features
of a classifier. That network must be strong (a weak one cannot tell a blurred garment from a
sharp one) and must not be the rejection classifier (a filter should not also be the judge of
what it filtered). Each dataset with such a network has an experiment config
`experiments/features_<dataset>.py`; `ensure(dataset)` trains it to the end the first time
(resuming if it was interrupted) into the cache and records its test accuracy, and later calls
only read the record:

  CACHE/features/<dataset>/            the training run (checkpoints/, metrics.jsonl, ...)
  CACHE/features/<dataset>/features.json   {"run", "step", "accuracy", "dataset"}

CACHE is $VQJAX_CACHE, or ~/.cache/vqjax.
"""

import json
import os
from typing import Any

from vqjax import configs, errors
from vqjax.training import trainer

# Datasets with an evaluation network: dataset name -> experiment config.
EXPERIMENTS = {"fashion_mnist": "features_fashion_mnist"}
RECORD = "features.json"


def cache_root() -> str:
  """$VQJAX_CACHE, or ~/.cache/vqjax."""
  return os.path.expanduser(os.environ.get("VQJAX_CACHE") or os.path.join("~", ".cache", "vqjax"))


def default_dir(dataset: str) -> str:
  """Where the evaluation network of `dataset` is cached."""
  return os.path.join(cache_root(), "features", dataset)


def experiment(dataset: str) -> str:
  """The experiment config name of `dataset`'s evaluation network (UserError if none)."""
  if dataset not in EXPERIMENTS:
    raise errors.UserError(
      f"no evaluation network is defined for the dataset {dataset!r} (known: "
      f"{', '.join(sorted(EXPERIMENTS))}); judge its samples with a classifier run of your own "
      "(vqjax.evaluate --features RUN)"
    )
  return EXPERIMENTS[dataset]


def read_record(workdir: str) -> dict[str, Any] | None:
  """The run's features.json ({"run", "step", "accuracy", "dataset"}), or None."""
  try:
    with open(os.path.join(workdir, RECORD)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and "step" in record else None


def ensure(dataset: str, workdir: str = "", config: Any = None) -> dict[str, Any]:
  """Trains (or resumes) the evaluation network of `dataset` unless it is finished.

  Args:
    dataset: a key of `EXPERIMENTS` (e.g. "fashion_mnist").
    workdir: the run directory; default `default_dir(dataset)`.
    config: the run config; default the experiment's own (`:smoke` variants for tests).

  Returns:
    The record: {"run": the workdir, "step": its final step, "accuracy": test accuracy,
    "dataset"}. Also written to WORKDIR/features.json.

  Raises:
    errors.Stopped: the training was interrupted (the same call resumes it).
  """
  workdir = os.path.abspath(workdir or default_dir(dataset))
  if config is None:
    config = configs.load_experiment(experiment(dataset))
  record = read_record(workdir)
  if record is not None and record["step"] >= config.train.steps:
    return record
  os.makedirs(workdir, exist_ok=True)
  result = trainer.train_and_evaluate(config, workdir)
  if "stopped" in result:
    raise errors.Stopped(
      f"the evaluation network {workdir} stopped at step {int(result['step'])} of "
      f"{config.train.steps}; run the same command to resume",
      int(result["stopped"]),
    )
  if "eval/accuracy" not in result:
    raise errors.UserError(
      f"the evaluation network {workdir} finished without a test accuracy: its config must "
      "evaluate at the last step (log.eval_every_steps)"
    )
  record = {
    "run": workdir,
    "step": int(result["step"]),
    "accuracy": float(result["eval/accuracy"]),
    "dataset": dataset,
  }
  tmp = os.path.join(workdir, f"{RECORD}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(workdir, RECORD))
  return record


def describe(workdir: str, step: int | None) -> dict[str, Any]:
  """What eval.json records of the network that made the features: its run and step, and
  the test accuracy when the run is a cached evaluation network."""
  out: dict[str, Any] = {"features_run": os.path.abspath(workdir), "features_step": step}
  record = read_record(workdir)
  if record is not None and record.get("step") == step:
    out["features_test_accuracy"] = record["accuracy"]
  return out
