"""Trains a vqjax model: `python -m vqjax.train --config experiments/X.py[:variant] --workdir DIR`.

Overrides: `--config.optim.lr=1e-4`; a misspelled key is an error. `--config` also takes a bare
experiment name (`--config fashion_mnist:smoke`). Resuming is automatic: run the same command
again with the same workdir. Multi-host: set `--config.distributed.*` (or run under a launcher
JAX detects, e.g. SLURM or Cloud TPU) and start one process per host.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vqjax import _cli, config_checks, configs, errors

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config: experiments/X.py, X.py or X, optionally :variant.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too (or -v 1).")


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
  import jax  # here, so that --help and flag errors answer without loading JAX

  if d.initialize not in ("auto", "yes", "no"):
    raise errors.UserError(
      f"config.distributed.initialize must be auto|yes|no, not {d.initialize!r}"
    )
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


def _usage() -> str:
  return (
    f"{__doc__}\nExperiments (--config NAME[:smoke]): "
    f"{', '.join(configs.list_experiments())}\n\n"
    f"Config fields and defaults (set with --config.GROUP.FIELD=VALUE):\n"
    f"{configs.summarize_fields()}\n\nFlags:\n{flags.FLAGS.main_module_help()}\n"
    "(absl's own flags, such as -v: --helpfull)"
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where every mistake (a missing flag, an unknown experiment or variant,
  a misspelled `--config.a.b`) is reported as one line, not a traceback."""
  try:
    rest = flags.FLAGS(configs.resolve_config_argv(argv))
  except errors.UserError as e:
    raise SystemExit(f"vqjax.train: {e}") from None
  except (AttributeError, KeyError, TypeError, flags.Error) as e:
    detail = str(e)
    if len(detail) > 1 and detail[0] in "'\"" and detail[-1] == detail[0]:  # a repr'd message
      detail = detail[1:-1].replace("\\n", " ").replace("\\'", "'")
    detail = " ".join(detail.split())
    raise SystemExit(f"vqjax.train: bad config override: {detail}") from None
  for name, what in (
    ("config", "an experiment, e.g. --config fashion_mnist:smoke"),
    ("workdir", "the directory for checkpoints, logs and images"),
  ):
    if flags.FLAGS[name].value is None:
      raise SystemExit(f"vqjax.train: --{name} is required ({what}); see --help")
  return rest


def _user_error(message: str) -> SystemExit:
  if _VERBOSE.value or logging.get_verbosity() >= logging.DEBUG:
    traceback.print_exc()
  return SystemExit(f"vqjax.train: {' '.join(message.split())}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.setup(tune_malloc=True)  # before JAX creates its CPU backend
  import jax

  from vqjax import runs
  from vqjax.training import trainer

  config = _CONFIG.value
  # Only errors a user fixes from the message are one line; anything else is a bug, whose
  # traceback is what a report needs.
  try:
    config_checks.validate(config)
    trainer.setup_compilation_cache(config.log.compilation_cache)
    initialize_distributed(config.distributed)
    result = trainer.train_and_evaluate(config, _WORKDIR.value, make_task=runs.make_task)
  except errors.UserError as e:
    raise _user_error(f"{type(e).__name__}: {e}") from None
  except OSError as e:  # a read-only or full disk, a workdir that is a file, ...
    where = f"{e.filename}: " if e.filename else ""
    raise _user_error(f"{type(e).__name__}: {where}{e.strerror or e}") from None
  except KeyboardInterrupt:  # before the trainer handles SIGINT itself, or a second Ctrl-C
    errors.interrupted("vqjax.train")
  who = f"process {jax.process_index()}/{jax.process_count()}"
  if "stopped" in result:
    # Not finished: a script or scheduler must be able to tell (128 + signal, as a shell does).
    stopped = errors.Stopped(
      f"{who} stopped at step {result['step']} of {config.train.steps}, checkpoint saved; the "
      "same command resumes",
      int(result["stopped"]),
    )
    print(stopped, file=sys.stderr, flush=True)
    raise SystemExit(stopped.exit_code)
  shown = " ".join(f"{k}={v:.5g}" for k, v in sorted(result.items()))
  print(f"{who} done: {shown}", flush=True)


if __name__ == "__main__":
  _cli.run(main, flags_parser=parse_flags, usage=_usage)
