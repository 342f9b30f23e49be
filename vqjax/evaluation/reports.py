"""Evaluation of trained runs and drawn samples on disk (the library side of `vqjax.evaluate`).

  evaluate(workdir)                          # a run's metrics on its eval split
  stage1_plots(workdir, out_dir)             # reconstruction grid, code-usage histograms
  evaluate_samples(samples_dir, classifier)  # FD, precision / recall, IS, CAS of samples
  threshold_tradeoff(samples_dir, classifier, thresholds, png)    # rejection sampling
  temperature_tradeoff(priors, classifier, temperatures, num, png)  # quality vs diversity

Sample quality is measured in the feature space of a classifier run (`Classifier.features`,
its softmax for the Inception-style score) against the real eval split of the stage-1 run the
samples came from; see `python -m vqjax.evaluate --help` for the command-line side.
"""

import functools
import json
import math
import os
import time
import zipfile
from typing import Any

import numpy as np

from vqjax import errors

# Neighbour rank of the precision / recall radii; a set needs more samples than this.
K_NEIGHBOURS = 3
# Images per classifier call and per generated batch (every call has this shape: one compile).
BATCH_SIZE = 256


def evaluate(workdir: str, max_batches: int = 0) -> dict[str, float]:
  """The metrics of a run (see the module docstring)."""
  import jax

  from vqjax import runs
  from vqjax.data import pipeline
  from vqjax.evaluation import CodebookEvaluator, ReconstructionEvaluator
  from vqjax.models import registry
  from vqjax.training import tasks

  config, model, variables = runs.load_run(workdir)
  if config.model.name in registry.AUTOENCODERS:
    result = ReconstructionEvaluator.from_config(config, max_batches=max_batches).run(
      model, variables
    )
    result.update(
      CodebookEvaluator.from_config(config, max_batches=max_batches).run(model, variables)
    )
    return result
  task = tasks.make_task(config)
  state = tasks.TrainState(
    step=None,
    params=variables["params"],
    opt_state=None,
    model_state={k: v for k, v in variables.items() if k != "params"},
  )
  step = jax.jit(lambda batch: task.eval_step(state, batch, None))
  totals = None
  for batch in pipeline.make_eval_iterator(config.data, max_batches=max_batches):
    sums = jax.device_get(step(jax.tree.map(jax.numpy.asarray, batch)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if totals is None:
    raise errors.UserError(f"eval split {config.data.eval_split!r} gave no batches")
  return task.eval_summary({k: np.asarray(v) for k, v in totals.items()})


# --- Stage-1 plots ------------------------------------------------------------------------


def stage1_plots(workdir: str, out_dir: str, max_batches: int = 0) -> dict[str, str]:
  """Draws a stage-1 run's reconstruction grid and code-usage histograms.

  Args:
    workdir: an autoencoder run (trainer workdir or converted directory).
    out_dir: where the PNGs go (created if needed).
    max_batches: eval batches histogrammed for the code usage; 0 = the whole split.

  Returns:
    {"reconstructions": path of a grid of eval images (rows "input") over their
    reconstructions (rows "reconstruction"), "code_usage": path of the per-level histograms
    of code counts, most used first, perplexity in each panel's title}.
  """
  import jax

  from vqjax import runs
  from vqjax.data import pipeline
  from vqjax.evaluation import CodebookEvaluator, metrics, plots
  from vqjax.models import registry
  from vqjax.training import logs

  config, model, variables = runs.load_run(workdir)
  if config.model.name not in registry.AUTOENCODERS:
    raise errors.UserError(
      f"{workdir} is not an autoencoder run (its task is {config.task!r}): --plots draws "
      "stage-1 plots"
    )
  os.makedirs(out_dir, exist_ok=True)
  want = max(int(config.log.num_images), 1)
  shown = []
  for batch in pipeline.make_eval_iterator(config.data):
    shown.append(batch["image"][batch["mask"] > 0])
    if sum(len(x) for x in shown) >= want:
      break
  if not shown or not sum(len(x) for x in shown):
    raise errors.UserError(f"eval split {config.data.eval_split!r} gave no images")
  x = np.concatenate(shown)[:want]
  recon = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables, x)
  recon = np.clip(np.asarray(recon, np.float32), -1.0, 1.0)
  grid = logs.comparison_grid({"input": x, "reconstruction": recon}, per_row=min(8, len(x)))
  paths = {"reconstructions": os.path.join(out_dir, "reconstructions.png")}
  logs.save_png(paths["reconstructions"], grid)

  evaluator = CodebookEvaluator.from_config(config, max_batches=max_batches)
  counts, _ = evaluator.histograms(model, variables)
  summary = metrics.codebook_metrics(counts)
  paths["code_usage"] = plots.usage_histograms(
    os.path.join(out_dir, "code_usage.png"),
    counts,
    {level: summary[f"{level}/perplexity"] for level in counts},
  )
  return paths


# --- Sample quality -------------------------------------------------------------------------


@functools.cache
def _features_and_probs() -> Any:
  """(model, variables, images) -> a classifier's pooled features and softmax probabilities
  (float32), jitted once per process (JAX is imported only when needed). The model is static
  and compares by value, so runs of the same architecture share one compilation; the
  variables are an argument, not constants baked into the program."""
  import jax
  import jax.numpy as jnp

  def fn(model, variables, images):
    f = model.apply(variables, images, method="features")
    logits = model.apply(variables, images)
    return f.astype(jnp.float32), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return jax.jit(fn, static_argnums=0)


class _Judge:
  """A classifier run as the feature and probability extractor of sample-quality statistics.

  Args:
    workdir: the classifier run.
  """

  def __init__(self, workdir: str):
    from vqjax import runs

    config, model, variables = runs.load_run(workdir)
    if config.task != "classifier":
      raise errors.UserError(f"{workdir} is not a classifier run (its task is {config.task!r})")
    self.workdir = workdir
    self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.num_classes = int(config.classifier.num_classes)
    self._model, self._variables = model, variables

  def check(self, shape: tuple[int, ...], what: str) -> None:
    """UserError unless images of `shape` [H, W, C] fit the classifier."""
    if tuple(shape) != self.image_shape:
      h, w, c = self.image_shape
      raise errors.UserError(
        f"the classifier {self.workdir} takes {h}x{w}x{c} images, {what} are "
        f"{'x'.join(str(d) for d in shape)}: use a classifier trained on the samples' data"
      )

  def features(self, images: np.ndarray) -> np.ndarray:
    """Features float64 [N, D] of images (see `__call__`)."""
    return self(images)[0]

  def probs(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities float64 [N, K] of images (see `__call__`)."""
    return self(images)[1]

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, D], probabilities float64 [N, K]) of uint8 images or floats
    in [-1, 1], in padded batches of `BATCH_SIZE`."""
    features, probs = [], []
    for start in range(0, len(images), BATCH_SIZE):
      chunk = _to_float(images[start : start + BATCH_SIZE])
      n = len(chunk)
      if n < BATCH_SIZE:
        chunk = np.concatenate([chunk, np.zeros((BATCH_SIZE - n, *chunk.shape[1:]), np.float32)])
      f, p = _features_and_probs()(self._model, self._variables, chunk)
      features.append(np.asarray(f, np.float64)[:n])
      probs.append(np.asarray(p, np.float64)[:n])
    if not features:
      raise ValueError("no images to judge")
    return np.concatenate(features), np.concatenate(probs)


def _to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] as the data pipeline scales them (floats pass)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return images.astype(np.float32)


def _real_features(
  data_config: Any, max_real: int, judge: _Judge
) -> tuple[np.ndarray, np.ndarray | None]:
  """Features of at most `max_real` images of the eval split, and their labels (None when
  the split has none)."""
  from vqjax.data import pipeline

  if max_real <= K_NEIGHBOURS:
    raise errors.UserError(f"max_real must be > {K_NEIGHBOURS}, got {max_real}")
  judge.check(
    (data_config.image_size, data_config.image_size, data_config.channels),
    f"the eval images of {data_config.name!r}",
  )
  features, pending, labels, labelled, count = [], [], [], True, 0
  for batch in pipeline.make_eval_iterator(data_config):
    take = np.flatnonzero(np.asarray(batch["mask"]) > 0)[: max_real - count]
    pending.append(np.asarray(batch["image"])[take])
    labelled = labelled and "label" in batch
    if labelled:
      labels.append(np.asarray(batch["label"])[take])
    count += len(take)
    # Small eval batches are gathered into full classifier batches.
    if sum(len(x) for x in pending) >= BATCH_SIZE or count >= max_real:
      features.append(judge.features(np.concatenate(pending)))
      pending = []
    if count >= max_real:
      break
  if sum(len(x) for x in pending):
    features.append(judge.features(np.concatenate(pending)))
  if count <= K_NEIGHBOURS:
    raise errors.UserError(
      f"the eval split {data_config.eval_split!r} gave {count} images: sample-quality "
      f"statistics need more than {K_NEIGHBOURS}"
    )
  real_labels = np.concatenate(labels).astype(np.int64) if labelled else None
  return np.concatenate(features), real_labels


def check_unfiltered(samples_dir: str, settings: dict | None = None) -> None:
  """A threshold trade-off replays rejection sampling: its samples must be drawn without it."""
  if settings is None:
    try:
      with open(os.path.join(samples_dir, "settings.json")) as f:
        settings = json.load(f)
    except (OSError, ValueError):
      return  # _read_samples names what is missing or damaged
  if settings.get("classifier"):
    raise errors.UserError(
      f"{samples_dir} holds samples already filtered by rejection sampling (threshold "
      f"{settings.get('threshold')}): draw samples without --classifier for a trade-off"
    )


def _read_samples(samples_dir: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """(uint8 images [N, H, W, C], labels [N] or None, settings) of a vqjax.sample directory."""
  path = os.path.join(samples_dir, "images.npz")
  if not os.path.isfile(path):
    raise errors.UserError(
      f"no images.npz in {samples_dir}: give a directory written by python -m vqjax.sample"
    )
  settings_path = os.path.join(samples_dir, "settings.json")
  if not os.path.isfile(settings_path):
    raise errors.UserError(f"no settings.json in {samples_dir}: it names the stage-1 run")
  try:
    with np.load(path) as saved:
      images = saved["image"]
      labels = saved["label"].astype(np.int64) if "label" in saved else None
    with open(settings_path) as f:
      settings = json.load(f)
  except (KeyError, ValueError, zipfile.BadZipFile) as e:
    raise errors.UserError(f"{samples_dir} holds unreadable samples: {e}") from None
  if images.ndim != 4 or images.dtype != np.uint8:
    raise errors.UserError(
      f"{path} must hold uint8 images [N, H, W, C], got {images.dtype} {images.shape}"
    )
  if not len(images):
    raise errors.UserError(f"{path} holds no samples")
  if not settings.get("stage1"):
    raise errors.UserError(f"{settings_path} names no stage-1 run")
  return images, labels, settings


def _stage1_data(stage1: str) -> Any:
  """`config.data` of the stage-1 run (its eval split holds the real images)."""
  from vqjax import runs

  return runs.load_run(stage1)[0].data


def _quality(
  judge: _Judge,
  real_f: np.ndarray,
  gen_f: np.ndarray,
  probs: np.ndarray | None = None,
  real_labels: np.ndarray | None = None,
  gen_labels: np.ndarray | None = None,
  num_classes: int | None = None,
) -> dict[str, Any]:
  """Sample-quality statistics of generated features against real ones; NaN, with a "note",
  where there are too few generated samples (FD needs 2, precision / recall k + 1)."""
  from vqjax.evaluation import SampleQualityEvaluator, frechet

  n = len(gen_f)
  nan = float("nan")
  if n > K_NEIGHBOURS:
    evaluator = SampleQualityEvaluator(judge.features, judge.probs, k=K_NEIGHBOURS)
    labelled = real_labels is not None and gen_labels is not None
    return evaluator.compute_from_features(
      real_f,
      gen_f,
      probs,
      real_labels if labelled else None,
      gen_labels if labelled else None,
      num_classes=num_classes,
    )
  out = {"frechet_distance": nan, "precision": nan, "recall": nan}
  if n >= 2:
    out["frechet_distance"] = frechet.frechet_distance_from_features(real_f, gen_f)
    out["note"] = f"only {n} samples: precision / recall need more than {K_NEIGHBOURS}"
  else:
    out["note"] = f"only {n} sample(s): no statistics (Frechet distance needs 2)"
  return out


def evaluate_samples(samples_dir: str, classifier: str, max_real: int = 10000) -> dict[str, float]:
  """Sample-quality statistics of a `python -m vqjax.sample` directory.

  Args:
    samples_dir: holds images.npz (uint8 "image" [N, H, W, C], optional "label" [N]) and
      settings.json (its "stage1" run's eval split gives the real images).
    classifier: a classifier run: its `features` are the feature space, its softmax the
      probabilities of the Inception-style score.
    max_real: at most this many real eval images.

  Returns:
    {"frechet_distance", "precision", "recall", "inception_score", "inception_score_std",
    "num_samples", "num_real"}, plus "classification_accuracy_score" when the samples and
    the real images are labelled.

  Raises:
    errors.UserError: missing files, fewer than 4 samples, or images of another shape than
      the classifier's.
  """
  images, labels, settings = _read_samples(samples_dir)
  if len(images) <= K_NEIGHBOURS:
    raise errors.UserError(
      f"{samples_dir} holds {len(images)} samples: sample-quality statistics need more than "
      f"{K_NEIGHBOURS}"
    )
  judge = _Judge(classifier)
  judge.check(images.shape[1:], f"the samples in {samples_dir}")
  real_f, real_labels = _real_features(_stage1_data(settings["stage1"]), max_real, judge)
  gen_f, probs = judge(images)
  out = _quality(judge, real_f, gen_f, probs, real_labels, labels, judge.num_classes)
  out.update(num_samples=float(len(images)), num_real=float(len(real_f)))
  return out


def check_thresholds(thresholds: list[float]) -> list[float]:
  thresholds = [float(t) for t in thresholds]
  if not thresholds:
    raise errors.UserError("give at least one threshold, e.g. --thresholds 0.5,0.7,0.9")
  for t in thresholds:
    if not 0.0 < t < 1.0:
      raise errors.UserError(f"threshold {t:g} is not in (0, 1): it is a class probability")
  return thresholds


def _scores(probs: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
  """The classifier's probability of each sample's label (its top class when unlabelled),
  what rejection sampling thresholds."""
  if labels is None:
    return probs.max(axis=1)
  if labels.min() < 0 or labels.max() >= probs.shape[1]:
    raise errors.UserError(
      f"sample labels span [{labels.min()}, {labels.max()}], the classifier has "
      f"{probs.shape[1]} classes"
    )
  return probs[np.arange(len(labels)), labels]


def threshold_tradeoff(
  samples_dir: str,
  classifier: str,
  thresholds: list[float],
  out_png: str,
  max_real: int = 10000,
) -> list[dict]:
  """Quality and diversity of the samples that classifier-based rejection would keep.

  Each sample's score is the classifier's probability of its label (of its top class when
  the samples are unlabelled), as in `vqjax.sampling.rejection`; a threshold keeps the
  samples scoring at least that much.

  Args:
    samples_dir: a `python -m vqjax.sample` directory drawn without --classifier.
    classifier: the classifier run that scores and embeds the samples.
    thresholds: thresholds in (0, 1).
    out_png: where the plot goes (acceptance rate, FD, precision, recall against threshold).
    max_real: at most this many real eval images.

  Returns:
    One dict per threshold: "threshold", "acceptance_rate" (share kept), "kept",
    "num_samples", and "frechet_distance", "precision", "recall" of the kept samples (NaN,
    with a "note", when too few are kept), and the same three of a random subset of the
    unfiltered samples of the same size ("unfiltered_frechet_distance", ...): FD and recall
    grow as a set shrinks, so the kept samples are compared with a set of their own size.
  """
  from vqjax.evaluation import plots
  from vqjax.sampling import rejection

  thresholds = check_thresholds(thresholds)
  images, labels, settings = _read_samples(samples_dir)
  check_unfiltered(samples_dir, settings)
  judge = _Judge(classifier)
  judge.check(images.shape[1:], f"the samples in {samples_dir}")
  gen_f, probs = judge(images)
  scores = _scores(probs, labels)
  real_f, _ = _real_features(_stage1_data(settings["stage1"]), max_real, judge)
  acceptance = rejection.acceptance_curve(scores, thresholds)
  order = np.random.default_rng(0).permutation(len(images))  # the same-size random subsets
  rows = []
  for t, rate in zip(thresholds, acceptance, strict=True):
    keep = scores >= t
    row = {
      "threshold": t,
      "acceptance_rate": float(rate),
      "kept": int(keep.sum()),
      "num_samples": len(images),
    }
    row.update(_quality(judge, real_f, gen_f[keep]))
    same_size = _quality(judge, real_f, gen_f[order[: int(keep.sum())]])
    row.update(
      {f"unfiltered_{k}": same_size[k] for k in ("frechet_distance", "precision", "recall")}
    )
    rows.append(row)
  column = lambda key: [r[key] for r in rows]  # noqa: E731
  plots.line_panels(
    out_png,
    thresholds,
    "classifier threshold",
    [
      (
        "Frechet distance (lower is better)",
        {
          "kept samples": column("frechet_distance"),
          "random unfiltered, same size": column("unfiltered_frechet_distance"),
        },
      ),
      (
        "share",
        {
          "acceptance rate": column("acceptance_rate"),
          "precision": column("precision"),
          "recall": column("recall"),
        },
      ),
    ],
    title=f"rejection sampling trade-off ({len(images)} samples)",
  )
  return rows


def check_temperatures(temperatures: list[float]) -> list[float]:
  temperatures = [float(t) for t in temperatures]
  if not temperatures:
    raise errors.UserError("give at least one temperature, e.g. --temperatures 0.7,0.85,1.0")
  for t in temperatures:
    if not (math.isfinite(t) and t > 0.0):
      raise errors.UserError(f"temperature {t:g} must be > 0")
  return temperatures


def _decoder(gen: Any) -> Any:
  """The stage-1 decoder of a Generator, jitted once: (variables, code maps) -> images in
  [-1, 1], as `Generator.decode` computes them."""
  import jax
  import jax.numpy as jnp

  model = gen.stage1[1]

  def decode(variables, maps):
    images = model.apply(variables, tuple(maps), method="decode_from_indices")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  return jax.jit(decode)


def _generate(
  gen: Any, decode: Any, num: int, seed: int, temperature: float, labels: Any
) -> np.ndarray:
  """`num` uint8 samples drawn in equal batches (the last one padded and cut): each example's
  draw depends on its global index only, so the batching changes nothing."""
  import jax

  from vqjax.training import logs

  variables = gen.stage1[2]
  batch = min(num, BATCH_SIZE)
  out = []
  for start in range(0, num, batch):
    maps = gen.sample_codes(
      batch,
      jax.random.key(seed),
      None if labels is None else labels[start : start + batch],
      temperature=temperature,
      example_offset=start,
    )
    images = decode(variables, maps)
    out.append(logs.to_uint8(np.asarray(images))[: num - start])
  return np.concatenate(out)


def temperature_tradeoff(
  priors: list[str],
  classifier: str,
  temperatures: list[float],
  num: int,
  out_png: str,
  seed: int = 0,
  stage1: str = "",
  max_real: int = 10000,
) -> list[dict]:
  """Quality against diversity of fresh samples at several sampling temperatures.

  Every temperature draws `num` samples with the same seed (class-conditional priors cycle
  through the classes) through one compiled sampler per level: the temperature is a traced
  argument of `vqjax.sampling`, so a new temperature does not compile again.

  Args:
    priors: the priors' workdirs, one per code level.
    classifier: the classifier run whose features and probabilities judge the samples.
    temperatures: softmax temperatures > 0.
    num: samples per temperature (more than 3).
    out_png: where the plot goes (FD, precision and recall against temperature).
    seed: the sampling seed.
    stage1: the autoencoder run; default the one the priors' codes came from.
    max_real: at most this many real eval images of the stage-1 run's data.

  Returns:
    One dict per temperature: "temperature", "num_samples", "seconds" (sampling and
    scoring; the first temperature's include the compilation), and the statistics of
    `evaluate_samples` ("frechet_distance", "precision", "recall", "inception_score", ...).
  """
  from vqjax import sample
  from vqjax.evaluation import plots
  from vqjax.sampling import hierarchy

  temperatures = check_temperatures(temperatures)
  if num <= K_NEIGHBOURS:
    raise errors.UserError(f"num must be > {K_NEIGHBOURS} for precision / recall, got {num}")
  if not priors:
    raise errors.UserError("give the priors' workdirs: --workdir TOP --workdir BOTTOM ...")
  stage1 = stage1 or sample.stage1_of(priors[0])
  gen = hierarchy.Generator.from_runs(stage1, priors)
  data = gen.stage1[0].data
  judge = _Judge(classifier)
  judge.check((data.image_size, data.image_size, data.channels), f"the images of {stage1}")
  real_f, real_labels = _real_features(data, max_real, judge)
  num_classes = max(
    (p[0].prior.num_classes for p in gen.priors if p[0].prior.class_conditional), default=0
  )
  # Labels for the padded last batch too, cycling as `hierarchy.labels_for` does.
  padded = -(-num // min(num, BATCH_SIZE)) * min(num, BATCH_SIZE)
  labels = hierarchy.labels_for(padded, None, num_classes)
  decode = _decoder(gen)
  rows = []
  for t in temperatures:
    t0 = time.perf_counter()
    images = _generate(gen, decode, num, seed, t, labels)
    gen_f, probs = judge(images)
    gen_labels = None if labels is None else labels[:num].astype(np.int64)
    row = {"temperature": t, "num_samples": num}
    row.update(_quality(judge, real_f, gen_f, probs, real_labels, gen_labels, judge.num_classes))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    rows.append(row)
  column = lambda key: [r[key] for r in rows]  # noqa: E731
  plots.line_panels(
    out_png,
    temperatures,
    "temperature",
    [
      ("Frechet distance (lower is better)", {"FD": column("frechet_distance")}),
      (
        "share",
        {"precision (quality)": column("precision"), "recall (diversity)": column("recall")},
      ),
    ],
    title=f"temperature trade-off ({num} samples each)",
  )
  return rows


# --- Command line -------------------------------------------------------------------------
