"""The Inception-v3 network of the FID literature, in Flax, and its 2048-d pool features.

FID (Heusel et al. 2017) as papers report it is the Frechet distance between Gaussians fitted
to the 2048-d average-pool ("pool3") features of one particular Inception-v3: the TensorFlow
graph of 2015-12-05 that the original TTUR code used. pytorch-fid ported its weights to a
PyTorch state dict (`pt_inception-2015-12-05-6726825d.pth`, from pytorch-fid's GitHub
releases); this module reads that file and computes the same features, so that numbers are
comparable with published ones (for instance the VQ-VAE-2 paper's ImageNet FID). vqjax never
downloads the file: the caller passes its path.

The layers are torchvision's Inception-v3 layers (same names, so the state dict maps one to one)
with the FID graph's own details, which change the features and are all kept here:

  * the average pools inside the mixed blocks (5b-5d, 6b-6e, 7b) divide by the number of
    in-image pixels under the 3x3 window (TensorFlow's SAME padding), not by 9;
  * the last mixed block (7c) max-pools, not average-pools, before its pool-branch 1x1 conv;
  * every conv has no bias and is followed by batch norm with epsilon 1e-3 and a ReLU;
  * the classifier has 1008 classes (unused here: the features are the pool before it).

Inputs are resized to 299x299 with bilinear interpolation on half-pixel centres and no
anti-aliasing (PyTorch's `F.interpolate(..., mode="bilinear", align_corners=False)`) and then
mapped from [0, 1] to [-1, 1]. Grayscale images are repeated to three channels. The network is
NHWC; convolutions run at `Precision.HIGHEST` by default, so GPUs do not fall back to TF32.

Typical use:

  variables = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
  real = fid_features(real_images_uint8, variables)
  fake = fid_features(sample_images_uint8, variables)
  fid = vqjax.evaluation.frechet.frechet_distance_from_features(real, fake)
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax import errors

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_BN_EPSILON = 1e-3
# The FID graph's classifier: 1008 classes (torchvision's ImageNet Inception has 1000); unused
# for the features, only checked so the wrong file is named.
_FID_CLASSES = 1008
# Float images may stray this far outside [0, 1] (round-off) before they are refused.
_RANGE_SLACK = 1e-6

Precision = jax.lax.Precision | str | None


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm with running statistics (epsilon 1e-3) -> ReLU.

  Attributes:
    features: output channels.
    kernel: kernel size (kh, kw) or one int for a square kernel.
    stride: stride, (sh, sw) or one int.
    padding: zero padding added on both sides, (ph, pw) or one int.
    precision: the convolution's precision.
  """

  features: int
  kernel: int | tuple[int, int]
  stride: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel),
      strides=_pair(self.stride),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=self.precision,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over the in-image pixels of each window (padding not counted)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool without padding (halves the grid, rounding down)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class MixedA(nn.Module):
  """Mixed 5b-5d: 1x1, 5x5, double 3x3 and average-pool branches (35x35 grid)."""

  pool_features: int
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class MixedB(nn.Module):
  """Mixed 6a: grid reduction 35 -> 17 (strided 3x3, double 3x3, max pool)."""

  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class MixedC(nn.Module):
  """Mixed 6b-6e: factorised 7x7 branches (1x7 and 7x1 convs) on the 17x17 grid."""

  channels_7x7: int
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    c = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c, 1, name="branch7x7_1")(x)
    b7 = conv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c, 1, name="branch7x7dbl_1")(x)
    bd = conv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class MixedD(nn.Module):
  """Mixed 7a: grid reduction 17 -> 8 (3x3 and 7x7-then-3x3 strided branches, max pool)."""

  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class MixedE(nn.Module):
  """Mixed 7b / 7c on the 8x8 grid: split 1x3 / 3x1 branches.

  Attributes:
    pool: "avg" (7b) or "max" (7c, a quirk of the FID graph) before the pool-branch conv.
    precision: the convolutions' precision.
  """

  pool: str = "avg"
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool_same(x) if self.pool == "max" else _avg_pool_same(x)
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of 1-D linear interpolation on half-pixel centres.

  Output pixel i samples the input at (i + 0.5) * size_in / size_out - 0.5, clamped below at 0;
  it mixes the two nearest input pixels (the last one repeated past the edge) with no
  anti-aliasing filter, whatever the scale: PyTorch's bilinear `align_corners=False` rule.
  """
  f32 = np.float32
  # The positions in float32 as PyTorch's CPU kernel computes them for float32 images: a float32
  # scale, and scale * (i + 0.5) - 0.5 as one fused multiply-add (the float64 product of two
  # float32 numbers is exact), rounded once. Plain float64 positions differ by up to 3e-5 pixel
  # for a 512-pixel image.
  scale = f32(size_in) / f32(size_out)
  centres = np.arange(size_out, dtype=f32) + f32(0.5)
  src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(np.float64)
  m = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Images in [0, 1] -> the network's input: `size` x `size`, 3 channels, in [-1, 1].

  Args:
    images: [N, H, W, C] floats in [0, 1], C = 1 (repeated to RGB) or 3.
    size: output height and width (299 for FID).

  Returns:
    [N, size, size, 3] float32.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  highest = jax.lax.Precision.HIGHEST
  if x.shape[1] != size:
    x = jnp.einsum("oh,nhwc->nowc", _resize_matrix(x.shape[1], size), x, precision=highest)
  if x.shape[2] != size:
    x = jnp.einsum("ow,nhwc->nhoc", _resize_matrix(x.shape[2], size), x, precision=highest)
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """The FID Inception-v3 up to its 2048-d global average pool.

  Attributes:
    resize_input: resize the input to 299x299 and map [0, 1] to [-1, 1] first (`preprocess`);
      without it the input must already be the network's input.
    precision: the convolutions' precision (HIGHEST: true float32 on GPUs and TPUs).
  """

  resize_input: bool = True
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Pool features of a batch.

    Args:
      images: [N, H, W, C] float images in [0, 1] (C = 1 or 3), or with `resize_input=False`
        [N, H, W, 3] network input in [-1, 1] (299x299 for standard FID).

    Returns:
      [N, 2048] float32 features.
    """
    x = preprocess(images) if self.resize_input else images
    conv = functools.partial(ConvBN, precision=self.precision)
    p = self.precision
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_reduce(x)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_reduce(x)
    x = MixedA(32, precision=p, name="Mixed_5b")(x)
    x = MixedA(64, precision=p, name="Mixed_5c")(x)
    x = MixedA(64, precision=p, name="Mixed_5d")(x)
    x = MixedB(precision=p, name="Mixed_6a")(x)
    x = MixedC(128, precision=p, name="Mixed_6b")(x)
    x = MixedC(160, precision=p, name="Mixed_6c")(x)
    x = MixedC(160, precision=p, name="Mixed_6d")(x)
    x = MixedC(192, precision=p, name="Mixed_6e")(x)
    x = MixedD(precision=p, name="Mixed_7a")(x)
    x = MixedE("avg", precision=p, name="Mixed_7b")(x)
    x = MixedE("max", precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ---- weights ---------------------------------------------------------------------------------


@functools.cache
def _variable_shapes() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """PyTorch key -> (collection, path in it, our shape) for every tensor of the network."""
  shapes = jax.eval_shape(
    lambda: InceptionV3(resize_input=False).init(
      jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    )
  )
  torch_name = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  torch_name.update(mean="running_mean", var="running_var")
  table = {}
  for collection, tree in shapes.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = tuple(k.key for k in path)
      key = ".".join((*names[:-1], torch_name[names[-1]]))
      table[key] = (collection, names, tuple(leaf.shape))
  return table


# pytorch_fid.inception.InceptionV3 wraps the same layers in `blocks` (an nn.ModuleList of
# nn.Sequential), so its own state_dict says "blocks.<block>.<index>" for the layer names that
# the weights file (the bare network's state dict) uses.
_WRAPPER_LAYERS = (
  ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
  ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
  ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
  ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)
_FROM_WRAPPER = {
  f"blocks.{b}.{i}": name for b, names in enumerate(_WRAPPER_LAYERS) for i, name in enumerate(names)
}


def _layer_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict with the weights file's layer names (a pytorch-fid wrapper's renamed)."""
  renamed = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    prefix = ".".join(parts[:3])
    if prefix in _FROM_WRAPPER:
      key = ".".join((_FROM_WRAPPER[prefix], *parts[3:]))
    renamed[key] = value
  return renamed


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """pytorch-fid's FID Inception state dict -> this module's Flax variables.

  Conv weights [O, I, kh, kw] become (kh, kw, I, O) kernels; batch norm weight / bias go to
  "params" as scale / bias, running_mean / running_var to "batch_stats" as mean / var. The
  classifier (fc) and `num_batches_tracked` counters are not used.

  Args:
    state_dict: PyTorch key -> tensor (or array): `torch.load` of
      pt_inception-2015-12-05-6726825d.pth, or the `state_dict()` of pytorch-fid's
      `InceptionV3(use_fid_inception=True)` (output block 3) whose keys say "blocks.<i>.<j>".

  Returns:
    {"params": ..., "batch_stats": ...} of float32 numpy arrays, for `InceptionV3.apply`.

  Raises:
    UserError: a key is missing or has the wrong shape, or the state dict is another network
      (torchvision's ImageNet Inception-v3 has the same layer names but is not the FID one).
  """
  table = _variable_shapes()
  state_dict = _layer_names(state_dict)
  fc = state_dict.get("fc.weight")
  if any(k.startswith("AuxLogits.") for k in state_dict) or (
    fc is not None and tuple(fc.shape)[0] != _FID_CLASSES
  ):
    raise errors.UserError(
      "this state dict is torchvision's ImageNet Inception-v3 (it has an auxiliary classifier "
      f"or not {_FID_CLASSES} classes), not the FID Inception: standard FID needs "
      f"{WEIGHTS_FILE} from pytorch-fid's GitHub releases"
    )
  used = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
  used -= {"fc.weight", "fc.bias"}
  missing = sorted(set(table) - used)
  unexpected = sorted(used - set(table))
  if missing or unexpected:
    raise errors.UserError(
      f"not the FID Inception-v3 state dict ({WEIGHTS_FILE}): {len(missing)} keys missing "
      f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
    )
  variables: dict[str, Any] = {}
  for key, (collection, path, shape) in table.items():
    value = _to_numpy(state_dict[key])
    if value.ndim == 4:  # conv weight [O, I, kh, kw] -> (kh, kw, I, O)
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.shape != shape:
      raise errors.UserError(
        f"not the FID Inception-v3 state dict ({WEIGHTS_FILE}): {key} has shape "
        f"{tuple(state_dict[key].shape)}, expected one that becomes {shape}"
      )
    node = variables.setdefault(collection, {})
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return variables


def load_fid_inception(path: str | os.PathLike) -> dict[str, Any]:
  """Reads pytorch-fid's FID Inception weights file into Flax variables (needs torch).

  Args:
    path: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub releases); read with
      `torch.load(weights_only=True)`, which loads tensors only, never pickled code.

  Returns:
    {"params": ..., "batch_stats": ...} for `InceptionV3` and `fid_features`.

  Raises:
    UserError: torch is not installed, or the file is not that state dict.
    FileNotFoundError: no such file.
  """
  try:
    import torch  # optional (vqjax[torch]) and slow to import: only to read a PyTorch file
  except ImportError:
    raise errors.UserError(
      "reading the FID Inception weights needs torch: pip install 'vqjax[torch]'"
    ) from None
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such Inception weights file: {path}")
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types; all mean a bad file here
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    raise errors.UserError(
      f"cannot read {path} as a PyTorch state dict ({reason}); expected {WEIGHTS_FILE}"
    ) from None
  if not isinstance(state_dict, Mapping):
    raise errors.UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
  return convert_state_dict(state_dict)


# ---- features --------------------------------------------------------------------------------


@functools.cache
def _network(precision: Precision):
  model = InceptionV3(resize_input=False, precision=precision)
  return jax.jit(model.apply)


@jax.jit
def _prepare(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images -> 299x299x3 network input in [-1, 1]."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return preprocess(x)


def fid_features(
  images: Any,
  variables: Mapping[str, Any],
  batch_size: int = 50,
  precision: Precision = jax.lax.Precision.HIGHEST,
) -> np.ndarray:
  """The 2048-d FID Inception pool features of a set of images.

  Args:
    images: [N, H, W, C] (or [N, H, W] grayscale) NHWC images, uint8 in [0, 255] or floats in
      [0, 1]; C = 1 (repeated to RGB) or 3. Any size: each image is resized to 299x299. Any
      array indexable by slices (a NumPy memmap too); batches are read one at a time.
    variables: the network's variables, from `load_fid_inception` or `convert_state_dict`.
    batch_size: images per forward pass (the last batch is padded, so the network compiles
      once for a given image size).
    precision: the convolutions' precision; HIGHEST keeps float32 accuracy on accelerators.

  Returns:
    [N, 2048] float64 features, for `vqjax.evaluation.frechet`.

  Raises:
    UserError: images of the wrong rank, channel count, dtype or value range.
  """
  n = len(images)
  shape = tuple(images.shape)
  if len(shape) == 3:
    shape = (*shape, 1)
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise errors.UserError(
      f"FID features need [N, H, W, C] images with C = 1 or 3, got shape {tuple(images.shape)}"
    )
  if batch_size < 1:
    raise errors.UserError(f"batch_size must be at least 1, got {batch_size}")
  batch = min(batch_size, max(n, 1))
  network = _network(precision)
  out = np.zeros((n, FEATURE_DIM), np.float64)
  for start in range(0, n, batch):
    chunk = np.asarray(images[start : start + batch]).reshape(-1, *shape[1:])
    if chunk.dtype != np.uint8:
      if not np.issubdtype(chunk.dtype, np.floating):
        raise errors.UserError(f"FID features need uint8 or float images, got {chunk.dtype}")
      lo, hi = float(chunk.min()), float(chunk.max())
      if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK or not np.isfinite(lo + hi):
        raise errors.UserError(
          f"float images must lie in [0, 1] (uint8 ones in [0, 255]); found values in "
          f"[{lo:g}, {hi:g}] at images {start}..{start + len(chunk) - 1}"
        )
      chunk = chunk.astype(np.float32)
    size = len(chunk)
    if size < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - size, *shape[1:]), chunk.dtype)])
    features = network(variables, _prepare(chunk))
    out[start : start + size] = np.asarray(features, np.float64)[:size]
  return out
