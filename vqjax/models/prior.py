"""The contract every raster-order prior over code maps follows (GatedPixelCNN, PixelSNAIL and
any plugin prior), in its full and its decode mode.

Full mode: `model.apply(variables, codes, condition=None, label=None, train=False)` maps int32
codes [B, H, W] to logits [B, H, W, K], in which position p = i * W + j depends only on the
codes before p in raster order, on the whole of every `condition` map (coarser levels' codes,
coarsest first) and on `label` (int32 [B] class ids of a class-conditional prior).

Decode mode (a prior whose class sets `decode_mode = True`): the same call with the keyword
`decode_position=p` and `mutable=["cache"]` returns the logits [B, K] at p alone, computed from
features of earlier positions kept in the "cache" collection. Calls go p = 0, 1, 2, ...; of
`codes` only the codes before p are read. The first call (no cache yet) creates the cache
and reads `condition` and `label`, whose features it keeps; later calls take the same arguments
but read them from the cache, never again from the call. Both priors build every layer once
per call and use the same layers (the same parameters) in both modes.

Logits: `logits_dtype(model dtype)` in both modes: float32 for float32, bfloat16 and float16
models, float64 under float64 (sampling divides and normalises them).

Levels: a prior models one code level `config.prior.level`, an index counted from the
coarsest map (0 = the top), as the hierarchy numbers them (models/hierarchy.py); the names a
user reads in logs, metrics and code datasets ("top", "bottom", ...) are given to those
indices by one function of the training layer, where metrics and datasets are written.

Samplers (vqjax/sampling) pick the cached sampler for a prior with `has_decode_mode`, the
full-recompute one otherwise.
"""

from typing import Any

import jax.numpy as jnp


def logits_dtype(dtype: Any) -> Any:
  """The dtype of a prior's logits for compute dtype `dtype`: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def has_decode_mode(model: Any) -> bool:
  """Whether `model` (a Flax module) declares the decode mode of this contract."""
  return getattr(type(model), "decode_mode", False) is True
