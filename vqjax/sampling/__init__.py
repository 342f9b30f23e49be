"""Ancestral sampling of code maps from the raster-order priors (PixelSNAIL, PixelCNN).

`naive.sample` re-runs the whole model for every position (the reference);
`cached.sample` runs the models' incremental decode mode. Both draw with the same keys.
`sampler_for(model)` picks one for a model.
"""

from typing import Any

from vqjax.sampling import cached, naive
from vqjax.sampling.naive import filter_logits

__all__ = ["filter_logits", "sampler_for"]


def sampler_for(model: Any) -> Any:
  """The sampler module for `model`: `cached` for a prior with a decode mode.

  Both priors of vqjax (`PixelSNAIL`, `GatedPixelCNN`) have one; a model without a
  `decode_position` argument gets the full-recompute `naive` sampler.
  """
  try:
    cached._check_model(model)
  except ValueError:
    return naive
  return cached
