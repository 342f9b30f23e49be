"""vqjax: VQ-VAE and VQ-VAE-2 with autoregressive priors in JAX/Flax.

`vqjax.load_run(workdir)` loads a trained model (a trainer workdir or a converted PyTorch
checkpoint) as (config, model, variables).
"""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so `import vqjax` (e.g. for the version) does not import JAX.
  if name == "load_run":
    from vqjax.runs import load_run

    return load_run
  raise AttributeError(f"module 'vqjax' has no attribute {name!r}")
