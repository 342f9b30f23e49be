"""Reference ancestral sampling from a raster-order prior: one full forward per position.

Both priors (`PixelSNAIL`, `GatedPixelCNN`) map codes [B, H, W] to logits [B, H, W, K] in
which position p = i * W + j depends only on codes before p. Sampling fills the map one
position at a time; this sampler re-runs the whole model on the current map for every
position (H * W forwards), which is slow but obviously right, so the cached sampler
(`vqjax/sampling/cached.py`) is tested against it.

The random draw is shared by both samplers and fixed by (rng, example index, position) only:
the key of example e at position p is fold_in(fold_in(rng, p), e). A seed therefore gives
the same samples whatever the batch layout, the number of devices, or the sampler.
"""

from typing import Any

import jax
import jax.numpy as jnp


def filter_logits(
  logits: jax.Array,
  temperature: float | jax.Array = 1.0,
  top_k: int | jax.Array = 0,
  top_p: float | jax.Array = 1.0,
) -> jax.Array:
  """Temperature, top-k and nucleus (top-p) filtering of logits over the last axis.

  The three settings may be traced (one compiled sampler serves them all); a Python 0 as
  temperature means greedy decoding (top_k = 1).

  Args:
    logits: float [..., K].
    temperature: divides the logits.
    top_k: keep only the k largest logits (ties at the k-th value are kept); 0 is off.
    top_p: keep the smallest set of most probable codes whose probability reaches top_p (the
      most probable code is always kept); 1.0 is off.

  Returns:
    float32 [..., K] logits, removed codes set to -inf.
  """
  if isinstance(temperature, int | float) and temperature == 0:
    temperature, top_k = 1.0, 1
  logits = logits.astype(jnp.float32) / temperature
  num = logits.shape[-1]
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  k = jnp.clip(jnp.asarray(top_k, jnp.int32), 0, num)
  kth = jnp.take(ordered, jnp.where(k > 0, k - 1, num - 1), axis=-1)[..., None]
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  # Mass strictly before each code in descending order: a code is kept while the codes above
  # it have not yet reached top_p, so the first code always stays.
  before = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  # top_p = 1 skips the cut: rounding in the cumulative sum could drop the rarest codes.
  threshold = jnp.where(jnp.asarray(top_p) < 1.0, threshold, -jnp.inf)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def draw(
  rng: jax.Array,
  logits: jax.Array,
  position: jax.Array,
  example_offset: int | jax.Array = 0,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Draws one code per example at one position.

  Args:
    rng: the sampling key.
    logits: float [B, K] logits of the position.
    position: int scalar raster position p.
    example_offset: global index of example 0 of this batch.
    temperature, top_k, top_p: as `filter_logits`.

  Returns:
    int32 [B] codes.
  """
  logits = filter_logits(logits, temperature, top_k, top_p)
  examples = example_offset + jnp.arange(logits.shape[0])
  at_p = jax.random.fold_in(rng, position)
  keys = jax.vmap(lambda e: jax.random.fold_in(at_p, e))(examples)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def check_inputs(num: int, shape: tuple[int, int], condition, label) -> tuple:
  """Normalises `condition` to a tuple (or None) and checks batch sizes against `num`."""
  if isinstance(condition, jax.Array) or hasattr(condition, "__array__"):
    condition = (condition,)
  if condition is not None:
    condition = tuple(jnp.asarray(c, jnp.int32) for c in condition)
    for c in condition:
      if c.shape[0] != num:
        raise ValueError(f"condition map of batch {c.shape[0]} given for num={num} samples")
  if label is not None:
    label = jnp.asarray(label, jnp.int32)
    if label.shape != (num,):
      raise ValueError(f"label must be int [num={num}], got shape {label.shape}")
  if len(shape) != 2:
    raise ValueError(f"shape must be (H, W), got {shape}")
  return condition or None, label


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
  """Samples `num` code maps by re-running the full model for every position.

  Args:
    model: a prior module (codes [B, H, W] -> logits [B, H, W, K]).
    variables: its variables ({"params": ...}).
    num: number of maps B.
    shape: (H, W).
    rng: a typed or raw PRNG key.
    condition: None or a tuple of int32 coarser code maps [num, h, w] (coarsest first).
    label: None or int32 [num] class ids.
    temperature, top_k, top_p: as `filter_logits`.
    example_offset: global index of this batch's first example, so that a batch split into
      pieces draws what the whole batch would.

  Returns:
    int32 [num, H, W] codes.
  """
  condition, label = check_inputs(num, shape, condition, label)
  settings = sampling_settings(temperature, top_k, top_p, example_offset)
  return _sample(model, tuple(shape), num, variables, rng, condition, label, settings)


def sampling_settings(temperature, top_k, top_p, example_offset) -> tuple:
  """(temperature, top_k, top_p, example_offset) as arrays, so that they are not static."""
  if isinstance(temperature, int | float) and temperature == 0:
    temperature, top_k = 1.0, 1  # greedy
  return (
    jnp.asarray(temperature, jnp.float32),
    jnp.asarray(top_k, jnp.int32),
    jnp.asarray(top_p, jnp.float32),
    jnp.asarray(example_offset, jnp.int32),
  )


@jax.jit(static_argnums=(0, 1, 2))
def _sample(model, shape, num, variables, rng, condition, label, settings):
  height, width = shape
  temperature, top_k, top_p, offset = settings

  def step(p, codes):
    logits = model.apply(variables, codes, condition=condition, label=label, train=False)
    i, j = p // width, p % width
    new = draw(rng, logits[:, i, j], p, offset, temperature, top_k, top_p)
    return codes.at[:, i, j].set(new)

  codes = jnp.zeros((num, height, width), jnp.int32)
  return jax.lax.fori_loop(0, height * width, step, codes)
