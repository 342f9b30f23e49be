"""Ancestral sampling of code maps from the raster-order priors (PixelSNAIL, PixelCNN).

`naive.sample` re-runs the whole model for every position (the reference);
`cached.sample` runs the models' incremental decode mode. Both draw with the same keys.
`sampler_for(model)` picks one for a model.
"""

from typing import Any

from vqjax.models import prior
from vqjax.sampling import cached, naive
from vqjax.sampling.naive import filter_logits

__all__ = ["filter_logits", "sampler_for"]


def sampler_for(model: Any) -> Any:
  """The sampler module for `model`: `cached` for a prior that declares the decode mode of
  models/prior.py (`decode_mode = True`: `PixelSNAIL`, `GatedPixelCNN`), else the
  full-recompute `naive` sampler."""
  return cached if prior.has_decode_mode(model) else naive
