"""vqjax: VQ-VAE and VQ-VAE-2 with autoregressive priors in JAX/Flax.

`vqjax.load_run(workdir)` loads a trained model (a trainer workdir or a converted PyTorch
checkpoint) as (config, model, variables).

Importing vqjax (or any of its modules) changes nothing in the process: not the environment,
`jax.config`, `sys.unraisablehook` nor the loggers. The command-line programs make their
process-wide settings themselves, first thing (`vqjax.cli_setup`, vqjax/_cli.py): XLA:CPU's
convolution kernels, glibc's allocator for the training programs, quieter logs.
"""

__version__ = "0.1.0"

_CLI_NAMES = ("cli_setup", "tune_cpu_malloc", "CPU_XLA_FLAG")


def __getattr__(name):
  # Lazy, so `import vqjax` (e.g. for the version) does not import JAX.
  if name == "load_run":
    from vqjax.runs import load_run

    return load_run
  if name in _CLI_NAMES:
    from vqjax import _cli

    return _cli.setup if name == "cli_setup" else getattr(_cli, name)
  raise AttributeError(f"module 'vqjax' has no attribute {name!r}")
