"""Incremental (cached) ancestral sampling: each position costs only the work that needs it.

The model runs in its decode mode (models/prior.py: `decode_position=p`, a mutable "cache"
collection, as Flax's lm1b decoder does): every layer computes only pixel p's features, reading the
features of earlier pixels from the cache, to which it adds pixel p's.

For PixelSNAIL the cache holds one [B, H, W, C] map per k x k causal convolution input (the
convolution then computes one output pixel from its k x k window, k^2 C_in C_out), the keys
and values of every attention layer (one query over <= H * W keys, O(H W C) per position,
the only per-position cost that grows with the map) and the conditioning features, computed
once.

For the Gated PixelCNN the vertical stack depends only on the rows above, so the first position
of each row (j == 0, an `nn.cond` inside the model) computes one whole row of vertical features
per layer, from a ring of each layer's last k//2 + 1 input rows; every position then runs one
horizontal pixel per layer from the cached inputs of the current row plus that row's
down-shifted vertical term. The conditioning features (coarser codes) are computed once. Per
map this is the work of one full forward, where the full-recompute sampler does H * W of them.

For both priors the whole loop over the H * W positions is one jitted `lax.fori_loop`.

Draws use the keys of `vqjax/sampling/naive.py` (fold_in(fold_in(rng, p), example)), so the
two samplers give the same samples for the same key, up to logits equal to rounding.
"""

from typing import Any

import jax
import jax.numpy as jnp

from vqjax.models import prior
from vqjax.sampling.naive import check_inputs, draw, sampling_settings


def _check_model(model: Any) -> None:
  if not prior.has_decode_mode(model):
    raise ValueError(
      f"{type(model).__name__} declares no decode mode (models/prior.py: decode_mode = True): "
      "use vqjax.sampling.naive"
    )


def _params(variables: Any) -> dict:
  # A stale cache passed in with the parameters would be read as earlier positions.
  return {name: value for name, value in variables.items() if name != "cache"}


def _decode_loop(model, variables, codes, condition, label, choose):
  """The fori_loop body over positions, its initial cache and the first logits (for K and the
  logits dtype).

  `choose(p, logits [B, K], codes, out)` returns the codes map with position p filled (and
  any per-position output `out`).
  """
  num, height, width = codes.shape
  variables = _params(variables)

  def step(p, cache, codes):
    logits, state = model.apply(
      {**variables, "cache": cache},
      codes,
      condition=condition,
      label=label,
      decode_position=p,
      mutable=["cache"],
    )
    return logits, state["cache"]

  # The first call creates the cache (and the conditioning features); its position-0
  # features depend on no code, so the loop's own call at p = 0 rewrites the same values.
  first, state = model.apply(
    variables, codes, condition=condition, label=label, decode_position=0, mutable=["cache"]
  )

  def body(p, carry):
    cache, codes, out = carry
    logits, cache = step(p, cache, codes)
    codes, out = choose(p, logits, codes, out)
    return cache, codes, out

  return body, state["cache"], first


def sample(
  model: Any,
  variables: Any,
  num: int,
  shape: tuple[int, int],
  rng: jax.Array,
  *,
  condition: tuple[jax.Array, ...] | None = None,
  label: jax.Array | None = None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  example_offset: int = 0,
) -> jax.Array:
  """Samples `num` code maps with the model's decode mode (see the module docstring).

  Args:
    model: a prior with a decode mode (models/prior.py; `PixelSNAIL`, `GatedPixelCNN`).
    variables: its variables ({"params": ...}).
    num: number of maps B.
    shape: (H, W).
    rng: a typed or raw PRNG key.
    condition: None or a tuple of int32 coarser code maps [num, h, w] (coarsest first).
    label: None or int32 [num] class ids.
    temperature, top_k, top_p: as `vqjax.sampling.naive.filter_logits`.
    example_offset: global index of this batch's first example.

  Returns:
    int32 [num, H, W] codes, the same as `vqjax.sampling.naive.sample` draws with this key.
  """
  _check_model(model)
  condition, label = check_inputs(num, shape, condition, label)
  settings = sampling_settings(temperature, top_k, top_p, example_offset)
  return _sample(model, tuple(shape), num, variables, rng, condition, label, settings)


@jax.jit(static_argnums=(0, 1, 2))
def _sample(model, shape, num, variables, rng, condition, label, settings):
  height, width = shape
  temperature, top_k, top_p, offset = settings

  def choose(p, logits, codes, out):
    new = draw(rng, logits, p, offset, temperature, top_k, top_p)
    return codes.at[:, p // width, p % width].set(new), out

  codes = jnp.zeros((num, height, width), jnp.int32)
  body, cache, _ = _decode_loop(model, variables, codes, condition, label, choose)
  return jax.lax.fori_loop(0, height * width, body, (cache, codes, ()))[1]


def logits_at_every_position(
  model: Any,
  variables: Any,
  codes: jax.Array,
  condition: tuple[jax.Array, ...] | None = None,
  label: jax.Array | None = None,
) -> jax.Array:
  """The logits [B, H, W, K] of `codes`, computed position by position in decode mode.

  The map fed at step p holds the true codes before p and zeros from p on, as while
  sampling, so any dependence on later codes would show as a difference from the full
  forward.

  Args:
    model: a prior with a decode mode (models/prior.py).
    variables: its variables.
    codes: int32 [B, H, W] true codes (fed one position at a time).
    condition: None or a tuple of coarser code maps.
    label: None or int32 [B] class ids.

  Returns:
    [B, H, W, K] logits, of the model's logits dtype (models/prior.py).
  """
  _check_model(model)
  codes = jnp.asarray(codes, jnp.int32)
  condition, label = check_inputs(codes.shape[0], codes.shape[1:], condition, label)
  return _logits(model, variables, codes, condition, label)


@jax.jit(static_argnums=0)
def _logits(model, variables, truth, condition, label):
  num, height, width = truth.shape

  def choose(p, logits, codes, out):
    i, j = p // width, p % width
    return codes.at[:, i, j].set(truth[:, i, j]), out.at[:, i, j].set(logits)

  codes = jnp.zeros_like(truth)
  body, cache, first = _decode_loop(model, variables, codes, condition, label, choose)
  out = jnp.zeros((num, height, width, first.shape[-1]), first.dtype)
  return jax.lax.fori_loop(0, height * width, body, (cache, codes, out))[2]
