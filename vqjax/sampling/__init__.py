"""Ancestral sampling of code maps from the raster-order priors (PixelSNAIL, PixelCNN).

`naive.sample` re-runs the whole model for every position (the reference);
`cached.sample` runs the models' incremental decode mode. Both draw with the same keys.
"""

from vqjax.sampling.naive import filter_logits

__all__ = ["filter_logits"]
