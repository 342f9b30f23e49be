"""Trains a vqjax model: `python -m vqjax.train --config experiments/X.py[:variant] --workdir DIR`.

Overrides: `--config.optim.lr=1e-4`; a misspelled key is an error. Resuming is automatic: run
the same command again with the same workdir. Multi-host: set `--config.distributed.*` (or
run under a launcher JAX detects, e.g. SLURM or Cloud TPU) and start one process per host.
"""

import os
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vqjax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py, optionally :variant).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors the user can fix from the message alone: shown as one line, traceback at -v 1.
_USER_ERRORS = (FloatingPointError, ValueError, FileNotFoundError)


def _multi_process_env() -> bool:
  """Whether a launcher JAX can read (SLURM, MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS) started
  several processes; then `jax.distributed.initialize()` finds its arguments by itself."""
  env = os.environ
  if env.get("SLURM_NTASKS", "1") != "1" or env.get("OMPI_COMM_WORLD_SIZE", "1") != "1":
    return True
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(d) -> None:
  """Calls `jax.distributed.initialize` per `config.distributed` (nothing on a single host)."""
  if d.initialize not in ("auto", "yes", "no"):
    raise ValueError(f"config.distributed.initialize must be auto|yes|no, not {d.initialize!r}")
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  if d.initialize == "no" or (d.initialize == "auto" and not kwargs and not _multi_process_env()):
    return
  # CPU processes need gloo for cross-process collectives; GPUs and TPUs ignore this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a misspelled `--config.a.b` reported as one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, flags.Error) as e:
    detail = str(e)
    if len(detail) > 1 and detail[0] in "'\"" and detail[-1] == detail[0]:  # a repr'd message
      detail = detail[1:-1].replace("\\n", " ").replace("\\'", "'")
    detail = " ".join(detail.split())
    raise SystemExit(f"vqjax.train: bad config override: {detail}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  initialize_distributed(config.distributed)
  try:
    result = trainer.train_and_evaluate(config, _WORKDIR.value)
  except _USER_ERRORS as e:
    logging.debug("%s", traceback.format_exc())
    raise SystemExit(f"vqjax.train: {type(e).__name__}: {e}") from None
  shown = " ".join(f"{k}={v:.5g}" for k, v in sorted(result.items()))
  print(f"process {jax.process_index()}/{jax.process_count()} done: {shown}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
