"""vqjax: VQ-VAE and VQ-VAE-2 with autoregressive priors in JAX/Flax.

`vqjax.load_run(workdir)` loads a trained model (a trainer workdir or a converted PyTorch
checkpoint) as (config, model, variables).
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU (jaxlib 0.10) sends convolutions to YNNPACK by default; its kernel and input gradients
# of the autoencoders' convolutions are 1.5-2x slower than XLA's Eigen ones (measured on 2 cores:
# the Fashion-MNIST train step at the PyTorch reference's sizes, 205 -> 320 img/s with the
# adjoint transposed convolutions; benchmarks/RESULTS.md). YNNPACK keeps the matmuls and reductions.
# Read once, when JAX creates its CPU backend (so only if vqjax is imported before that); a
# user's own setting of the flag in XLA_FLAGS wins, and VQJAX_XLA_CPU_DEFAULTS=1 leaves XLA's
# defaults. Only jaxlib 0.10 (measured) and 0.11 (the flag exists there: other projects turn
# YNNPACK fusions off in 0.11.2 over wrong results) are touched: an XLA flag a build does not
# know aborts the process.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def _set_cpu_xla_flag() -> None:
  from importlib import metadata

  try:
    version = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if _os.environ.get("VQJAX_XLA_CPU_DEFAULTS") == "1" or not (0, 10) <= version <= (0, 11):
    return
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    _os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_set_cpu_xla_flag()


def __getattr__(name):
  # Lazy, so `import vqjax` (e.g. for the version) does not import JAX.
  if name == "load_run":
    from vqjax.runs import load_run

    return load_run
  raise AttributeError(f"module 'vqjax' has no attribute {name!r}")
