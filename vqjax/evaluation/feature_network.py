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

Training the Fashion-MNIST network takes about 40 minutes on 2 CPU cores, so its trained weights
also ship with vqjax (`networks/<dataset>.npz`, its parameters, and `networks/<dataset>.json`,
the step, test accuracy and SHA-256 of the file), as FID ships fixed Inception weights: every
user then measures in the same feature space, and a first quickstart needs no training.
`packaged(dataset)` reads them (checked against the file's hash and the experiment's shapes) and
is the default judge; a network trained with `python -m vqjax.features` is used when named
(`--features RUN`). `export(workdir, dataset)` writes the packaged files from a finished run.
"""

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from vqjax import configs, errors, paths, runs
from vqjax.models import registry
from vqjax.training import trainer

# Datasets with an evaluation network: dataset name -> experiment config.
EXPERIMENTS = {"fashion_mnist": "features_fashion_mnist"}
RECORD = "features.json"
# The shipped networks: PACKAGE_DIR/<dataset>.npz (parameters) and PACKAGE_DIR/<dataset>.json.
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "networks")


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
    with epath.Path(workdir, RECORD).open() as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  if not (isinstance(record, dict) and "step" in record):
    return None
  # The run is the directory read, wherever the record was written (a moved workdir).
  return {**record, "run": os.path.abspath(workdir)}


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
  workdir = paths.absolute(workdir or default_dir(dataset))
  if config is None:
    config = configs.load_experiment(experiment(dataset))
  record = read_record(workdir)
  if record is not None and record["step"] >= config.train.steps:
    return record
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
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
  paths.write_text(os.path.join(workdir, RECORD), json.dumps(record, indent=2))
  return record


def describe(workdir: str, step: int | None) -> dict[str, Any]:
  """What eval.json records of the network that made the features: its run and step, and
  the test accuracy when the run is a cached evaluation network."""
  out: dict[str, Any] = {"features_run": paths.absolute(workdir), "features_step": step}
  record = read_record(workdir)
  if record is not None and record.get("step") == step:
    out["features_test_accuracy"] = record["accuracy"]
  return out


def _package_paths(dataset: str, directory: str = "") -> tuple[str, str]:
  base = os.path.join(directory or PACKAGE_DIR, dataset)
  return f"{base}.npz", f"{base}.json"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def has_packaged(dataset: str, directory: str = "") -> bool:
  """Whether vqjax ships trained weights of `dataset`'s evaluation network."""
  return all(os.path.isfile(p) for p in _package_paths(dataset, directory))


def _abstract_params(config: Any) -> dict[str, jax.ShapeDtypeStruct]:
  model = registry.build_model(config)
  size, channels = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((1, size, size, channels), jax.numpy.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros(x.shape)))
  return traverse_util.flatten_dict(variables["params"], sep="/")


def packaged_record(dataset: str, directory: str = "") -> dict[str, Any]:
  """The record of the shipped network of `dataset` ({"run", "step", "accuracy", "dataset",
  "sha256", "experiment"}), without reading or checking its weights."""
  _, meta = _package_paths(dataset, directory)
  with open(meta) as f:
    record = json.load(f)
  return dict(record, run=f"vqjax/evaluation/networks/{dataset}.npz", dataset=dataset)


def packaged(dataset: str, directory: str = "") -> tuple[Any, Any, dict, dict[str, Any]]:
  """The shipped evaluation network of `dataset`.

  Args:
    dataset: a key of `EXPERIMENTS` with shipped weights (`has_packaged`).
    directory: where the .npz / .json pair lies; default the package's `networks/`.

  Returns:
    (config, model, variables, record): the experiment's config and classifier, {"params": ...}
    as float32 arrays, and the record {"run", "step", "accuracy", "dataset", "sha256"}.

  Raises:
    errors.UserError: no shipped network, a file whose hash differs from its record (damaged),
      or parameters that do not fit the experiment config (the config changed since export).
  """
  npz, meta = _package_paths(dataset, directory)
  if not has_packaged(dataset, directory):
    raise errors.UserError(f"vqjax ships no evaluation network of {dataset!r} (no {npz})")
  record = packaged_record(dataset, directory)
  if _sha256(npz) != record.get("sha256"):
    raise errors.UserError(
      f"{npz} is damaged: its SHA-256 is not the one in {meta}; reinstall vqjax, or train the "
      f"network with python -m vqjax.features --data {dataset} and pass --features RUN"
    )
  config = configs.load_experiment(experiment(dataset))
  expected = _abstract_params(config)
  with np.load(npz) as saved:
    flat = {k: saved[k] for k in saved.files}
  shapes = {k: tuple(v.shape) for k, v in flat.items()}
  if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
    raise errors.UserError(
      f"{npz} does not fit experiments/{experiment(dataset)}.py (the config changed since the "
      f"weights were exported): export them again from a run of the current config"
    )
  params = traverse_util.unflatten_dict(
    {k: jax.numpy.asarray(v, expected[k].dtype) for k, v in flat.items()}, sep="/"
  )
  return config, registry.build_model(config), {"params": params}, record


def export(workdir: str, dataset: str, directory: str = "") -> dict[str, Any]:
  """Writes the shipped weights of `dataset`'s network from a finished run of its experiment.

  Args:
    workdir: a run trained by `ensure` (holds features.json).
    dataset: the dataset it was trained on.
    directory: where to write <dataset>.npz and <dataset>.json; default the package's.

  Returns:
    The record written to the .json.
  """
  record = read_record(workdir)
  if record is None or record.get("dataset") != dataset:
    raise errors.UserError(f"{workdir} is not a finished evaluation network of {dataset!r}")
  _, _, variables, step = runs.load_run_with_step(workdir)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  npz, meta = _package_paths(dataset, directory)
  os.makedirs(os.path.dirname(npz), exist_ok=True)
  np.savez_compressed(npz, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
  out = {
    "step": int(step),
    "accuracy": float(record["accuracy"]),
    "sha256": _sha256(npz),
    "experiment": f"experiments/{experiment(dataset)}.py",
  }
  with open(meta, "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
  return out
