"""The runs `python -m vqjax.anomaly` reads, loaded and checked.

The stage-1 run with its priors, the rotation priors, a classifier run, and the bank of normal
latents of the knn score. Each problem is a one-line `errors.UserError` that names the flag it
came from; JAX and the model code are imported inside the functions, as in vqjax/anomaly.py.
"""

import math
from typing import Any

from etils import epath

from vqjax import errors, paths

# The knn bank lives on the device with the model. 10,000 latents take 49 MiB for the anomaly
# experiment's model (4x4 and 8x8 codes of 16 numbers), 12.2 GiB for the ImageNet VQ-VAE-2
# (32x32 and 64x64 codes of 64 numbers): beyond this, a clear error instead of running out.
MAX_BANK_BYTES = 4 * 2**30


def load(
  workdir: str, priors: list[str], allow_mismatch: bool = False
) -> tuple[Any, Any, Any, list[tuple[Any, Any]]]:
  """(config, model, variables, [(prior model, variables)]) of the stage-1 run and its priors;
  `allow_mismatch`: priors of another stage-1 run's codes with a warning, not an error."""
  from vqjax import runs
  from vqjax.models import registry

  if not priors:
    config, model, variables = runs.load_run(workdir)
    loaded = []
  else:
    from vqjax.sampling import hierarchy

    gen = hierarchy.Generator.from_runs(workdir, priors, allow_mismatch)
    config, model, variables = gen.stage1
    if gen.class_conditional:
      raise errors.UserError(
        "the priors are class-conditional: an image to screen has no label; train "
        "unconditional priors (config.prior.class_conditional=False) for anomaly scores"
      )
    loaded = [(m, v) for _, m, v in gen.priors]
  if config.task != "autoencoder" or not registry.is_autoencoder(config):
    raise errors.UserError(
      f"{workdir} is a {config.task} run of {config.model.name!r}, not a stage-1 autoencoder "
      f"({', '.join(registry.AUTOENCODERS)}): anomaly maps need reconstructions"
    )
  return config, model, variables, loaded


def rotation_scorer(
  workdir: str, rotation_priors: list[str], model: Any, variables: Any, allow_mismatch: bool = False
):
  """The `rotation.RotationScorer` of the run's rotation priors; None without them."""
  if not rotation_priors:
    return None
  from vqjax.evaluation import rotation
  from vqjax.sampling import hierarchy

  gen = hierarchy.Generator.from_runs(workdir, rotation_priors, allow_mismatch)
  try:
    return rotation.RotationScorer(model, variables, [(m, v) for _, m, v in gen.priors])
  except ValueError as e:
    raise errors.UserError(f"--rotation_priors: {e}") from None


def classifier_scorer(path: str, config: Any, labels: list[int], fit_images: int):
  """The `open_set.ClassifierScorer` of the classifier run at `path`, over the labels of the
  stage-1 run's eval data that are not anomalous, fitted to the first `fit_images` of the
  classifier's own train split (0: not fitted); None without a path."""
  if not path:
    return None
  from vqjax import runs
  from vqjax.data import pipeline
  from vqjax.evaluation import open_set
  from vqjax.sampling import hierarchy

  if not epath.Path(paths.absolute(path)).is_dir():
    raise errors.UserError(f"--classifier: {path} is not a directory")
  clf_config, model, variables = runs.load_run(path)
  hierarchy.check_run(path, "classifier", "--classifier", clf_config.task)
  problems = open_set.check_inputs(clf_config.data, config.data, labels)
  if problems:
    raise errors.UserError(f"--classifier {path}: {'; '.join(problems)}")
  normal = [k for k in range(int(clf_config.classifier.num_classes)) if k not in labels]
  try:
    scorer = open_set.ClassifierScorer(model, variables, normal)
  except ValueError as e:
    raise errors.UserError(f"--classifier {path}: {e}") from None
  if not fit_images:
    return scorer
  data = clf_config.data.copy_and_resolve_references()
  data.eval_split = data.train_split
  batches = pipeline.make_eval_iterator(
    data, max_batches=math.ceil(fit_images / data.eval_batch_size)
  )
  try:
    return scorer.fit(batches, fit_images)
  except ValueError as e:
    raise errors.UserError(
      f"--classifier {path}: its train split {data.train_split!r} cannot fit the mahalanobis "
      f"score ({e}); --classifier_images 0 leaves that score out"
    ) from None


def memory_bank(config: Any, model: Any, variables: Any, labels: list[int], size: int, k: int):
  """The knn score's bank: the first `size` images of the run's train split, without the run's
  excluded labels and without the anomaly labels."""
  from vqjax.data import pipeline
  from vqjax.evaluation import memory

  data = config.data.copy_and_resolve_references()
  data.exclude_labels = tuple(sorted(set(data.exclude_labels) | set(labels)))
  data.eval_split = data.train_split
  batches = pipeline.make_eval_iterator(data, max_batches=math.ceil(size / data.eval_batch_size))
  try:
    bank = memory.Memory.build(
      model, variables, batches, size, config.vq.num_codes, k=1, max_bytes=MAX_BANK_BYTES
    )
  except memory.BankTooLargeError as e:
    raise errors.UserError(f"--memory {size}: {e} (--memory N, or 0 for none)") from None
  except ValueError:
    raise errors.UserError(
      f"--memory: the train split {data.train_split!r} has no normal images for the knn bank"
    ) from None
  if len(bank.bank) < k:
    raise errors.UserError(
      f"--k {k} needs at least {k} normal training images; the train split "
      f"{data.train_split!r} has {len(bank.bank)}"
    )
  return memory.Memory(bank.bank, k, bank.counts)
