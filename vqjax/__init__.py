"""vqjax: VQ-VAE and VQ-VAE-2 with autoregressive priors in JAX/Flax."""

__version__ = "0.1.0"
