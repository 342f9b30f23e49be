"""Evaluation of trained runs on disk (the library side of `vqjax.evaluate`).

  evaluate(workdir)                          # a run's metrics on its eval split
  stage1_plots(workdir, out_dir)             # reconstruction grid, code-usage histograms

Sample quality (drawn images) is in `samples.py` and `tradeoffs.py`; see
`python -m vqjax.evaluate --help` for the command-line side.
"""

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from vqjax import errors, runs
from vqjax.data import pipeline
from vqjax.evaluation import evaluators, metrics, plots
from vqjax.models import registry
from vqjax.training import logs


def evaluate(workdir: str, max_batches: int = 0) -> dict[str, float]:
  """The metrics of a run (see the module docstring), with "step": the checkpoint step read
  (the newest intact one: after a damaged step was skipped, an earlier one; absent for a
  converted model)."""
  config, model, variables, read = runs.load_run_with_step(workdir)
  names = ", ".join(evaluators.standalone_names(config))
  logging.info("evaluating %s on its eval split %r: %s", workdir, config.data.eval_split, names)
  t0 = time.perf_counter()
  result = _metrics(config, model, variables, max_batches)
  logging.info(
    "evaluated %s over %d examples in %.1f s",
    workdir,
    int(result.get("examples", 0)),
    time.perf_counter() - t0,
  )
  if read is not None:
    result["step"] = read
  return result


def _metrics(config: Any, model: Any, variables: dict, max_batches: int) -> dict[str, float]:
  try:
    return evaluators.evaluate_run(config, model, variables, max_batches)
  except errors.UserError as e:
    raise errors.UserError(f"eval split {config.data.eval_split!r}: {e}") from e


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
  config, model, variables = runs.load_run(workdir)
  if not registry.is_autoencoder(config):
    raise errors.UserError(
      f"{workdir} is not an autoencoder run (its task is {config.task!r}): --plots draws "
      "stage-1 plots"
    )
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
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

  evaluator = evaluators.CodebookEvaluator.from_config(config, model, max_batches=max_batches)
  counts, _ = evaluator.histograms(variables)
  summary = metrics.codebook_metrics(counts)
  paths["code_usage"] = plots.usage_histograms(
    os.path.join(out_dir, "code_usage.png"),
    counts,
    {level: summary[f"{level}/perplexity"] for level in counts},
  )
  return paths
