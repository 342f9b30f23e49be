"""Trains the evaluation network that judges samples of a dataset (Fashion-MNIST's also ships
with vqjax, vqjax/evaluation/networks/: the default judge; this command reproduces it).

  python -m vqjax.features --data fashion_mnist [--workdir DIR]

The network is a classifier trained to the end of its experiment config
(`experiments/features_<dataset>.py`), into `~/.cache/vqjax/features/<dataset>` ($VQJAX_CACHE
moves the cache) unless --workdir says otherwise. A finished network is not trained again, an
interrupted one resumes. `vqjax.evaluate` and the pipeline read it from there by default when
vqjax ships no network of the dataset (else pass --features DIR), and every eval.json names its
run, step and test accuracy.
"""

import json
import sys

from absl import app, flags

from vqjax import _cli, errors

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string("data", "fashion_mnist", "The dataset whose evaluation network to train.")
  flags.DEFINE_string("workdir", "", "Where the network is trained (default: the cache).")
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.setup(tune_malloc=True)  # before JAX creates its CPU backend
  with errors.one_line("vqjax.features", flags.FLAGS.verbose):
    from vqjax.evaluation import feature_network

    feature_network.experiment(flags.FLAGS.data)  # an unknown dataset: one line
    record = feature_network.ensure(flags.FLAGS.data, flags.FLAGS.workdir)
  print(json.dumps(record, indent=2))
  print(
    f"evaluation network of {record['dataset']}: {record['run']} (step {record['step']}, "
    f"test accuracy {record['accuracy']:.4f})",
    file=sys.stderr,
  )


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
