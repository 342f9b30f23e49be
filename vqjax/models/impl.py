"""Implementation choices: which exact form of a computation the models run, chosen once.

Several layers can compute the same function (same parameters, same values up to float
rounding) in forms whose speed differs by platform. Every such choice lives in one frozen
`Impl`, resolved once when a model is built (`resolve`, or `from_config` for a config) and
handed down to the layers that read it, never looked up while tracing:

  upconv, downconv   the stride-2 transposed / plain convolutions of the autoencoders
                     (models/strided.py): "adjoint" forms' gradients run through each other
                     (+2.9% on the ImageNet-256 step on an H200, 1.2x the Fashion-MNIST step
                     on a 2-core CPU); "subpixel" / "lax" are the forms XLA differentiates
                     itself (the choice on TPUs, unmeasured there).
  channel_multiple   > 1 pads the image-side convolutions' channels (RGB in and out) to a
                     multiple of it with zeros: 8 on GPUs, whose tensor cores take multiples
                     of 8 (+7.4% on the ImageNet-256 step on an H100); 0 elsewhere.
  causal_conv        PixelSNAIL's k x k causal convolutions (models/pixelsnail_layers.py):
                     "split" on GPUs (two convolutions that skip the masked taps, +8.8% on the
                     bottom prior's step on an H200); on the CPU "patches" where the kernel
                     has more taps than the code map has pixels (4.6 s -> 0.48 s a step for the
                     4 x 4 top prior: XLA:CPU runs such convolutions without its fast
                     kernels); else "masked", as the reference.
  onehot             PixelSNAIL's convolutions of one-hot code maps: "lookup" (kernel rows
                     picked by the codes) on the CPU, where they took a seventh of the top
                     prior's step; "conv" elsewhere.
  vq_stats           the quantizer's per-code counts and sums: "scatter" on the CPU (5% faster
                     steps), "onehot" on accelerators (15% faster on an H100).
  vq_matmul          the quantizer's distance and EMA-sum matmuls: "bf16" (bfloat16 models on
                     accelerators: bfloat16 products, exact in float32, models/distances.py) or
                     "float32" (HIGHEST precision).
  vq_distance        the nearest-code search: "pallas" (models/vq_kernel.py) with bf16
                     matmuls on CUDA GPUs of compute capability >= 9.0, where it was measured
                     faster (15.87 against 16.24 ms per ImageNet-256 step on an H200); "xla".

Figures: benchmarks/RESULTS.md. `Impl()` holds the portable forms (those XLA differentiates
itself, no padding, float32 matmuls); a model built directly from its class uses them unless
given another `Impl`.
"""

import dataclasses
import importlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Every field's allowed forms; "auto" (resolved by `resolve`) is not a form.
CHOICES = {
  "upconv": ("subpixel", "lax", "adjoint"),
  "downconv": ("lax", "adjoint"),
  "causal_conv": ("masked", "split", "patches"),
  "onehot": ("conv", "lookup"),
  "vq_stats": ("onehot", "scatter"),
  "vq_distance": ("xla", "pallas"),
  "vq_matmul": ("float32", "bf16"),
}


@dataclasses.dataclass(frozen=True)
class Impl:
  """The forms a model computes in (see the module docstring); each field names one of
  `CHOICES[field]`, `channel_multiple` is an integer >= 0. Hashable, so a Flax module field."""

  upconv: str = "subpixel"
  downconv: str = "lax"
  channel_multiple: int = 0
  causal_conv: str = "masked"
  onehot: str = "conv"
  vq_stats: str = "onehot"
  vq_distance: str = "xla"
  vq_matmul: str = "float32"

  def __post_init__(self):
    for field, allowed in CHOICES.items():
      value = getattr(self, field)
      if value not in allowed:
        raise ValueError(f"unknown {field} form {value!r}; expected one of {', '.join(allowed)}")
    if not isinstance(self.channel_multiple, int) or self.channel_multiple < 0:
      raise ValueError(f"channel_multiple must be an integer >= 0, got {self.channel_multiple!r}")


def _cuda_compute_capability() -> float:
  """The first device's CUDA compute capability (9.0 for Hopper), 0 elsewhere."""
  device = jax.devices()[0]
  try:
    return float(getattr(device, "compute_capability", 0) or 0)
  except (TypeError, ValueError):
    return 0.0


def pallas_triton_available() -> bool:
  """Whether this JAX still has Pallas's Triton backend (deprecated in JAX 0.11: "will be
  removed in a future JAX version"); without it the nearest-code search stays "xla"."""
  try:
    importlib.import_module("jax.experimental.pallas.triton")
  except ImportError:
    return False
  return True


def resolve(
  *,
  upconv: str = "auto",
  downconv: str = "auto",
  channel_multiple: int = -1,
  causal_conv: str = "auto",
  vq_stats: str = "auto",
  vq_distance: str = "auto",
  vq_matmul: str = "auto",
  dtype: Any = jnp.float32,
  kernel_size: int = 0,
  code_shape: Sequence[int] = (),
  backend: str | None = None,
  capability: float | None = None,
) -> Impl:
  """An `Impl` with every "auto" (and channel_multiple -1) replaced by the platform's form.

  Args:
    upconv, downconv, causal_conv, vq_stats, vq_distance, vq_matmul: a form of `CHOICES`, or
      "auto".
    channel_multiple: >= 0, or -1 for the platform's.
    dtype: the model's compute dtype (bf16 matmuls are for bfloat16 models only).
    kernel_size, code_shape: a PixelSNAIL's causal kernel size and code-map shape (H, W), for
      `causal_conv`'s "patches" rule; leave them out for other models.
    backend: "cpu", "gpu", "tpu"; the default backend when None.
    capability: the GPU's CUDA compute capability; the first device's when None.

  Returns:
    The resolved `Impl`; an unknown form raises ValueError.
  """
  backend = backend or jax.default_backend()
  cpu, gpu = backend == "cpu", backend == "gpu"

  def pick(value: str, field: str, auto: str) -> str:
    if value != "auto" and value not in CHOICES[field]:
      raise ValueError(f"unknown {field} form {value!r}; expected auto or one of {CHOICES[field]}")
    return auto if value == "auto" else value

  if vq_matmul == "auto":
    vq_matmul = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 and not cpu else "float32"
  if vq_distance == "auto":
    fast = vq_matmul == "bf16" and gpu and pallas_triton_available()
    if fast:
      fast = (_cuda_compute_capability() if capability is None else capability) >= 9.0
    vq_distance = "pallas" if fast else "xla"
  small_map = bool(code_shape) and kernel_size * kernel_size > math.prod(code_shape)
  causal_auto = "split" if gpu else "patches" if cpu and small_map else "masked"
  if channel_multiple == -1:
    channel_multiple = 8 if gpu else 0
  return Impl(
    upconv=pick(upconv, "upconv", "adjoint" if cpu or gpu else "subpixel"),
    downconv=pick(downconv, "downconv", "adjoint" if cpu or gpu else "lax"),
    channel_multiple=channel_multiple,
    causal_conv=pick(causal_conv, "causal_conv", causal_auto),
    onehot="lookup" if cpu else "conv",
    vq_stats=pick(vq_stats, "vq_stats", "scatter" if cpu else "onehot"),
    vq_distance=pick(vq_distance, "vq_distance", "xla"),
    vq_matmul=pick(vq_matmul, "vq_matmul", "float32"),
  )
