"""The last step of the training input, run on the devices inside the jitted train step.

Training batches leave the host as uint8 images (a quarter of the bytes of float32, and no
per-pixel work on the host); `device_transform` scales them to float32 [-1, 1] exactly as the
host does for eval (`pipeline.transform_batch`: x / 127.5 - 1, so 0 -> -1 and 255 -> 1) and,
with `config.data.random_flip`, mirrors about half of them left-right. The scale is a lookup
in a 256-entry table computed on the host: XLA turns a division by a constant into a
multiplication by its reciprocal, which is off by an ulp for most values.

Which images flip is `flip_mask(rng, n)`: a Bernoulli(0.5) draw per example from
`fold_in(rng, FLIP_STREAM)`, where `rng` is the train step's key (`fold_in(key(seed + 1),
step)`). It depends only on the seed, the step and the global batch size, not on how many
devices or hosts share the batch, and it leaves the step key itself to the model.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGE = "image"
# fold_in(step key, FLIP_STREAM) decides the flips: a stream of its own ("flip" in ASCII), so
# the model's own uses of the step key draw the same numbers with or without flips.
FLIP_STREAM = 0x666C6970
# uint8 value v -> v / 127.5 - 1 in float32, divided in NumPy (IEEE, the host's eval values).
_SCALED = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def flip_mask(rng: jax.Array, n: int) -> jax.Array:
  """Which of `n` images a step mirrors.

  Args:
    rng: the train step's key.
    n: the global batch size.

  Returns:
    bool [n], True where the image is mirrored left-right.
  """
  return jax.random.bernoulli(jax.random.fold_in(rng, FLIP_STREAM), 0.5, (n,))


def device_transform(
  batch: dict[str, jax.Array], rng: jax.Array | None, data_config: Any
) -> dict[str, jax.Array]:
  """Scales (and, training, randomly flips) a batch's "image"; other features pass through.

  Tasks call it first thing in their jitted steps. uint8 images become float32 in [-1, 1],
  bit for bit what `pipeline.transform_batch` gives on the host; floating images are taken as
  already scaled (eval batches, benchmarks' synthetic data) and keep their values. With
  `config.data.random_flip` and a key, the images `flip_mask(rng, B)` picks are mirrored
  along their width, whatever their dtype. Under a mesh, the mesh's axes must be Auto (as
  `sharding.make_mesh` makes them), so the table lookup follows the batch's sharding.

  Args:
    batch: {feature: array [B, ...]}; "image" [B, H, W, C] uint8 or floating, if present.
    rng: the step's key; None (init, eval) = no flips.
    data_config: `config.data` (random_flip).

  Returns:
    A new dict with the same keys.
  """
  if IMAGE not in batch:
    return batch
  x = jnp.asarray(batch[IMAGE])
  if x.dtype == jnp.uint8:
    x = jnp.take(jnp.asarray(_SCALED), x, mode="clip")  # in range: "clip" skips no value
  elif not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"'image' must be uint8 or floating, not {x.dtype}")
  if rng is not None and data_config.random_flip:
    flip = flip_mask(rng, x.shape[0])
    x = jnp.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)
  return {**batch, IMAGE: x}
