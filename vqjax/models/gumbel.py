"""Gumbel-softmax quantization (Jang et al. 2016; the article's "future direction").

Instead of a nearest-neighbour lookup, a 1x1 projection gives logits over the K codewords;
training samples a relaxed one-hot y = softmax((logits + g) / tau) with Gumbel noise g and
outputs the codeword of its argmax, with the relaxed gradient (hard straight-through:
onehot(argmax y) + y - sg[y]); evaluation takes the argmax of the logits. The latent loss is
kl_weight * KL(softmax(logits) || uniform), which spreads use over the codebook. Same interface
as VectorQuantizer: `__call__(z, train)` and `lookup`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.models.quantizer import HIGHEST, code_histogram, usage_metrics


class GumbelQuantizer(nn.Module):
  """Gumbel-softmax quantizer.

  Attributes:
    num_codes: codebook size K.
    code_dim: codeword dimension D (and of the input's last axis).
    temperature: softmax temperature tau of the relaxation.
    kl_weight: weight of KL(q(code | z) || uniform).
    dtype: dtype of the output; logits and the relaxation stay float32.
    param_dtype: dtype of the parameters.
  """

  num_codes: int = 512
  code_dim: int = 64
  temperature: float = 1.0
  kl_weight: float = 5e-4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.to_logits = nn.Dense(self.num_codes, dtype=jnp.float32, param_dtype=self.param_dtype)
    self.codebook = self.param(
      "codebook",
      nn.initializers.normal(1.0),
      (self.num_codes, self.code_dim),
      self.param_dtype,
    )

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codewords for integer indices of any shape -> [..., D]."""
    return jnp.take(self.codebook.astype(jnp.float32), indices, axis=0).astype(self.dtype)

  def __call__(self, z: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Quantizes z [..., D]; returns (z_q, aux) with the VectorQuantizer aux keys."""
    logits = self.to_logits(z.astype(jnp.float32))
    idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if train:
      g = jax.random.gumbel(self.make_rng("vq"), logits.shape, jnp.float32)
      y = jax.nn.softmax((logits + g) / self.temperature, axis=-1)
      y_hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), self.num_codes, dtype=jnp.float32)
      y = y_hard + y - jax.lax.stop_gradient(y)
    else:
      y = jax.nn.one_hot(idx, self.num_codes, dtype=jnp.float32)
    zq = jnp.einsum("...k,kd->...d", y, self.codebook.astype(jnp.float32), precision=HIGHEST)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(log_q) * log_q, axis=-1)) + jnp.log(float(self.num_codes))
    counts = code_histogram(idx, self.num_codes).astype(jnp.int32)  # int32, as VectorQuantizer
    zero = jnp.zeros((), jnp.float32)
    aux = {
      "indices": idx,
      "latent_loss": self.kl_weight * kl,
      "kl": kl,
      "commitment": zero,
      "codebook_loss": zero,
      "counts": counts,
      **usage_metrics(counts),
    }
    return zq.astype(self.dtype), aux
