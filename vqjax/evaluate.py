"""Evaluates a trained run on its eval split and writes the numbers.

  python -m vqjax.evaluate --workdir RUN [--out RUN/eval.json] [--max_batches 0]

An autoencoder run gets reconstruction MSE, PSNR and SSIM and the codebook usage and
perplexity per level (evaluation/evaluators.py); a prior run gets held-out cross-entropy in
bits per code and bits per image dimension (its task's own eval). The result is printed as a
short table and written as JSON.
"""

import json
import os
import sys

from absl import app, flags

from vqjax import errors


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --workdir, and tests import them together)."""
  flags.DEFINE_string("workdir", None, "The run to evaluate (load_run reads it).")
  flags.DEFINE_string("out", "", "JSON output (default WORKDIR/eval.json).")
  flags.DEFINE_integer("max_batches", 0, "Eval batches (0 = the whole split).")
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def evaluate(workdir: str, max_batches: int = 0) -> dict[str, float]:
  """The metrics of a run (see the module docstring)."""
  import jax
  import numpy as np

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.workdir:
    raise SystemExit("vqjax.evaluate: --workdir is required")
  with errors.one_line("vqjax.evaluate", flags.FLAGS.verbose):
    result = evaluate(flags.FLAGS.workdir, flags.FLAGS.max_batches)
    out = flags.FLAGS.out or os.path.join(flags.FLAGS.workdir, "eval.json")
    with open(out, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  width = max(len(k) for k in result)
  for key in sorted(result):
    print(f"{key:<{width}}  {result[key]:.6g}")
  print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
