"""Import VQ-VAE-2 weights trained with rosinality/vq-vae-2-pytorch (its `VQVAE` module).

The PyTorch model is NCHW and names its layers by position in `nn.Sequential` blocks; ours is
NHWC with named submodules and levels numbered coarsest first. The correspondence:

  enc_b (stride 4, on the image)    -> encoders_1        quantize_conv_t -> pre_quant_0
  enc_t (stride 2, on enc_b)        -> encoders_0        quantize_conv_b -> pre_quant_1
  dec_t (top codes -> bottom res.)  -> cond_decoders_0   quantize_t      -> quantizers_0
  upsample_t                        -> upsamplers_0/up0  quantize_b      -> quantizers_1
  dec (final decoder)               -> decoder

Conv2d weights [out, in, kh, kw] become (kh, kw, in, out) kernels; ConvTranspose2d weights
[in, out, kh, kw] become (kh, kw, in, out) without a spatial flip, since our `UpConv` keeps
PyTorch's transposed-conv orientation. The EMA buffers map to the "vq_state" collection:
embed [D, K] -> codebook [K, D], cluster_size -> ema_count, embed_avg [D, K] -> ema_sum [K, D]
(the reference has no bias correction, so ema_weight = 1).

Only tensors are read: files go through `torch.load(..., weights_only=True)`, which refuses
pickled Python objects, so a checkpoint cannot run code on import.
"""

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqjax import errors
from vqjax.configs import base_config
from vqjax.models import registry

# Fixed by the reference architecture (not stored in the state_dict).
_FIRST_STRIDE = 4
_LEVEL_STRIDE = 2
_DECAY = 0.99
_EPS = 1e-5
_DEFAULT_RES_CHANNELS = 32  # only used when there are no residual blocks to read it from

# Keys whose shapes determine the hyperparameters; without them this is not a VQVAE.
_SHAPE_KEYS = (
  "enc_b.blocks.0.weight",
  "enc_b.blocks.2.weight",
  "quantize_conv_t.weight",
  "quantize_t.embed",
)


@dataclasses.dataclass(frozen=True)
class VQVAE2Shape:
  """The constructor arguments of rosinality's `VQVAE` that shape its state_dict."""

  in_channel: int
  channel: int
  n_res_block: int
  n_res_channel: int
  embed_dim: int
  n_embed: int


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [O, I, kh, kw] -> (kh, kw, I, O)


def _upconv_kernel(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # [I, O, kh, kw] -> (kh, kw, I, O)


def _transposed(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def _same(w: np.ndarray) -> np.ndarray:
  return w


# One entry per tensor: (PyTorch key, PyTorch shape, our path in the variables, converter).
_Entry = tuple[str, tuple[int, ...], tuple[str, ...], Callable[[np.ndarray], np.ndarray]]


def _layer(
  key: str, path: tuple[str, ...], shape: tuple[int, ...], transposed: bool = False
) -> Iterator[_Entry]:
  """The weight and bias entries of one Conv2d ([O, I, kh, kw]) or ConvTranspose2d layer."""
  out = shape[1] if transposed else shape[0]
  yield (
    f"{key}.weight",
    shape,
    ("params", *path, "kernel"),
    _upconv_kernel if transposed else _conv_kernel,
  )
  yield f"{key}.bias", (out,), ("params", *path, "bias"), _same


def _res_blocks(key: str, path: tuple[str, ...], first: int, s: VQVAE2Shape) -> Iterator[_Entry]:
  # Each ResBlock is Sequential(ReLU, Conv3x3, ReLU, Conv1x1): the convs sit at indices 1 and 3.
  c, r = s.channel, s.n_res_channel
  for i in range(s.n_res_block):
    block = f"{key}.blocks.{first + i}.conv"
    yield from _layer(f"{block}.1", (*path, f"res{i}", "conv3"), (r, c, 3, 3))
    yield from _layer(f"{block}.3", (*path, f"res{i}", "conv1"), (c, r, 1, 1))


def _quantizer(key: str, name: str, s: VQVAE2Shape) -> Iterator[_Entry]:
  d, k = s.embed_dim, s.n_embed
  yield f"{key}.embed", (d, k), ("vq_state", name, "codebook"), _transposed
  yield f"{key}.cluster_size", (k,), ("vq_state", name, "ema_count"), _same
  yield f"{key}.embed_avg", (d, k), ("vq_state", name, "ema_sum"), _transposed


def layout(s: VQVAE2Shape) -> list[_Entry]:
  """Every tensor of a rosinality `VQVAE` with these sizes, and where it goes in ours.

  Args:
    s: the model sizes.

  Returns:
    A list of (PyTorch key, PyTorch shape, our variable path, converter) tuples.
  """
  c, h, e, n = s.channel, s.channel // 2, s.embed_dim, s.n_res_block
  entries: list[_Entry] = []
  add = entries.extend
  # enc_b: Conv4x4/2, ReLU, Conv4x4/2, ReLU, Conv3x3, ResBlocks, ReLU.
  add(_layer("enc_b.blocks.0", ("encoders_1", "down0"), (h, s.in_channel, 4, 4)))
  add(_layer("enc_b.blocks.2", ("encoders_1", "down1"), (c, h, 4, 4)))
  add(_layer("enc_b.blocks.4", ("encoders_1", "conv_out"), (c, c, 3, 3)))
  add(_res_blocks("enc_b", ("encoders_1",), 5, s))
  # enc_t: Conv4x4/2, ReLU, Conv3x3, ResBlocks, ReLU.
  add(_layer("enc_t.blocks.0", ("encoders_0", "down0"), (h, c, 4, 4)))
  add(_layer("enc_t.blocks.2", ("encoders_0", "conv_out"), (c, h, 3, 3)))
  add(_res_blocks("enc_t", ("encoders_0",), 3, s))
  add(_layer("quantize_conv_t", ("pre_quant_0",), (e, c, 1, 1)))
  add(_quantizer("quantize_t", "quantizers_0", s))
  # dec_t: Conv3x3, ResBlocks, ReLU, ConvT4x4/2.
  add(_layer("dec_t.blocks.0", ("cond_decoders_0", "conv_in"), (c, e, 3, 3)))
  add(_res_blocks("dec_t", ("cond_decoders_0",), 1, s))
  add(_layer(f"dec_t.blocks.{n + 2}", ("cond_decoders_0", "up0"), (c, e, 4, 4), True))
  add(_layer("quantize_conv_b", ("pre_quant_1",), (e, e + c, 1, 1)))
  add(_quantizer("quantize_b", "quantizers_1", s))
  add(_layer("upsample_t", ("upsamplers_0", "up0"), (e, e, 4, 4), True))
  # dec: Conv3x3, ResBlocks, ReLU, ConvT4x4/2, ReLU, ConvT4x4/2.
  add(_layer("dec.blocks.0", ("decoder", "conv_in"), (c, 2 * e, 3, 3)))
  add(_res_blocks("dec", ("decoder",), 1, s))
  add(_layer(f"dec.blocks.{n + 2}", ("decoder", "up0"), (c, h, 4, 4), True))
  add(_layer(f"dec.blocks.{n + 4}", ("decoder", "up1"), (h, s.in_channel, 4, 4), True))
  return entries


def _preview(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in getattr(x, "shape", ()))


def infer_shape(state_dict: Mapping[str, Any]) -> VQVAE2Shape:
  """Reads the model sizes off the tensor shapes of a rosinality `VQVAE` state_dict.

  Args:
    state_dict: PyTorch key -> tensor (or array).

  Returns:
    The sizes; raises ValueError if the keys that carry them are absent.
  """
  missing = [k for k in _SHAPE_KEYS if k not in state_dict]
  if missing:
    # The same repository's PixelSNAIL priors are the likeliest wrong file.
    hint = (
      " (it looks like a PixelSNAIL prior)"
      if any(".causal_attention." in k or k.startswith("horizontal.") for k in state_dict)
      else ""
    )
    raise ValueError(
      f"not a rosinality VQVAE state_dict{hint}: missing {_preview(missing)}; "
      f"it has {len(state_dict)} keys such as {_preview(state_dict, 4) or 'none'}"
    )
  n_res_block = 0
  while f"enc_b.blocks.{5 + n_res_block}.conv.1.weight" in state_dict:
    n_res_block += 1
  res_key = "enc_b.blocks.5.conv.1.weight"
  n_res_channel = _shape(state_dict[res_key])[0] if res_key in state_dict else _DEFAULT_RES_CHANNELS
  first = _shape(state_dict["enc_b.blocks.0.weight"])
  embed = _shape(state_dict["quantize_t.embed"])
  if len(first) != 4 or len(embed) != 2:
    raise ValueError(
      f"not a rosinality VQVAE state_dict: enc_b.blocks.0.weight has shape {first} and "
      f"quantize_t.embed {embed}; expected 4 and 2 dimensions"
    )
  return VQVAE2Shape(
    in_channel=first[1],
    channel=_shape(state_dict["enc_b.blocks.2.weight"])[0],
    n_res_block=n_res_block,
    n_res_channel=n_res_channel,
    embed_dim=_shape(state_dict["quantize_conv_t.weight"])[0],
    n_embed=embed[1],
  )


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch.Tensor; float() also covers half and bfloat16 tensors
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


# How torch names the object it refused, across versions: "Unsupported global: GLOBAL
# argparse.Namespace was not an allowed global" and, for a blocked module, "Trying to load
# unsupported GLOBAL posix.system whose module posix is blocked" (both torch 2.13); older
# releases said "Unsupported class argparse.Namespace".
_REFUSED = re.compile(r"(?:GLOBAL|Unsupported class)\s+([A-Za-z_][\w.]*[\w])")


def _load_error(path: str, e: Exception) -> errors.UserError:
  """One line for a file `torch.load(weights_only=True)` refused: what, and what to do."""
  message = str(e)
  found = _REFUSED.search(message)
  if found:
    what = found.group(1)
    if "is blocked" in message:  # torch refuses these modules whatever the allow-list
      other = f" (torch blocks the module of {what} even on an allow-list)"
    else:
      other = (
        f", or, only if you trust {what}, load the file under "
        f"torch.serialization.safe_globals([{what}]) and pass the state_dict to "
        "vqjax.convert.load_vqvae2"
      )
    # rosinality's train_pixelsnail.py saves {"model": ..., "args": argparse.Namespace}, which
    # `rosinality-pixelsnail` reads (allowing Namespace): the likeliest mix-up.
    prior = (
      "; a file with an argparse.Namespace is most likely a PixelSNAIL prior saved by "
      "rosinality's train_pixelsnail.py: convert it with `rosinality-pixelsnail`"
      if what == "argparse.Namespace"
      else ""
    )
    return errors.UserError(
      f"{path} holds a pickled {what}, not just tensors; torch.load(weights_only=True) "
      f"refused it, as unpickling it could run code: re-save the state_dict alone "
      f"(torch.save(model.state_dict(), path)) where the file is trusted{other}{prior}"
    )
  # Not a refused object (a damaged file, an unsupported pickle opcode, ...): torch's most
  # specific line; its other lines are generic advice about weights_only=False.
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  reason = next(
    (line for line in lines if line.startswith(("Unsupported", "Invalid", "PytorchStreamReader"))),
    lines[0] if lines else type(e).__name__,
  )
  return errors.UserError(
    f"cannot read {path} with torch.load(weights_only=True): {reason} (expected a file "
    "written by torch.save(model.state_dict(), path))"
  )


def load_torch_file(
  path_or_mapping: str | os.PathLike | Mapping[str, Any], safe_globals: tuple = ()
) -> Mapping[str, Any]:
  """A `torch.save` file read with `weights_only=True`, or a mapping passed through.

  Args:
    path_or_mapping: the file, or a mapping already in memory.
    safe_globals: classes also allowed in the pickle (plain data such as argparse.Namespace);
      any other object is refused with a one-line error naming it.

  Returns:
    The mapping the file holds.
  """
  if isinstance(path_or_mapping, Mapping):
    return path_or_mapping
  try:
    import torch  # optional (vqjax[torch]) and slow to import: only to read a PyTorch file
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install 'vqjax[torch]'") from e
  path = os.fspath(path_or_mapping)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  try:
    with torch.serialization.safe_globals(list(safe_globals)):
      sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types; all mean the same here
    raise _load_error(path, e) from e
  if not isinstance(sd, Mapping):
    raise errors.UserError(f"{path} holds a {type(sd).__name__}, not a state_dict")
  return sd


def unwrap_state_dict(sd: Mapping[str, Any], marker: str) -> dict[str, Any]:
  """The state_dict inside a checkpoint dict ({"model": sd} or {"state_dict": sd}, unless the
  `marker` key shows it is already the state_dict), without DataParallel's "module." prefix."""
  for wrapper in ("model", "state_dict"):
    if marker not in sd and isinstance(sd.get(wrapper), Mapping):
      sd = sd[wrapper]
  keys = list(sd)
  if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
    sd = {k[len("module.") :]: v for k, v in sd.items()}
  return dict(sd)


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
  """The state_dict of a rosinality `VQVAE` from a file or a mapping.

  Args:
    path_or_state_dict: a file written by `torch.save(model.state_dict(), path)`, or a
      mapping already in memory. A checkpoint dict holding it under "model" or "state_dict"
      and the "module." prefix of (Distributed)DataParallel models are accepted too.

  Returns:
    A plain dict key -> tensor (or array).
  """
  return unwrap_state_dict(load_torch_file(path_or_state_dict), "enc_b.blocks.0.weight")


def convert_state_dict(state_dict: Mapping[str, Any]) -> tuple[VQVAE2Shape, dict]:
  """Converts a rosinality `VQVAE` state_dict to our variables, checking every key and shape.

  Args:
    state_dict: PyTorch key -> tensor (or array), as returned by `read_state_dict`.

  Returns:
    (sizes, variables): variables is {"params": ..., "vq_state": ...} of float32 numpy arrays
    (int32 / bool for the quantizers' bookkeeping), nested like `VQVAE2.init`'s output.
  """
  s = infer_shape(state_dict)
  entries = layout(s)
  expected = {key: shape for key, shape, _, _ in entries}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  wrong = sorted(
    f"{k} {_shape(state_dict[k])} (expected {expected[k]})"
    for k in set(expected) & set(state_dict)
    if _shape(state_dict[k]) != expected[k]
  )
  if missing or unexpected or wrong:
    problems = []
    if missing:
      problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
      problems.append(f"unexpected keys: {_preview(unexpected)}")
    if wrong:
      problems.append(f"wrong shapes: {_preview(wrong, 4)}")
    raise ValueError(
      f"state_dict does not match a rosinality VQVAE with {s}: " + "; ".join(problems)
    )

  variables: dict = {}
  for key, _, path, convert in entries:
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = convert(_to_numpy(state_dict[key]))
  for level in ("quantizers_0", "quantizers_1"):
    q = variables["vq_state"][level]
    # No bias correction in the reference: the EMA sums are used as they are.
    q["ema_weight"] = np.array(1.0, np.float32)
    q["initialized"] = np.array(True)
    q["unused_steps"] = np.zeros((s.n_embed,), np.int32)
  return s, variables


def make_config(s: VQVAE2Shape) -> ml_collections.ConfigDict:
  """`base_config()` with the model, quantizer and image channels of the converted model."""
  config = base_config()
  config.data.channels = s.in_channel
  m = config.model
  m.name = "vqvae2"
  m.channels = s.channel
  m.res_channels = s.n_res_channel
  m.num_res_blocks = s.n_res_block
  m.levels = 2
  m.first_stride = _FIRST_STRIDE
  m.level_stride = _LEVEL_STRIDE
  vq = config.vq
  vq.num_codes = s.n_embed
  vq.code_dim = s.embed_dim
  vq.beta = 0.25
  vq.ema = True
  vq.decay = _DECAY
  vq.eps = _EPS
  vq.bias_correction = False
  # The codebook comes from the checkpoint: no data init, and the reference never restarts.
  vq.init = "normal"
  vq.restart_after = 0
  return config


def abstract_variables(model, channels: int) -> Any:
  """ShapeDtypeStructs of `model.init`'s variables (nothing is computed)."""
  stride = _FIRST_STRIDE * _LEVEL_STRIDE
  x = jnp.zeros((1, stride, stride, channels), jnp.float32)
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))


def check_against_model(variables: Any, abstract: Any) -> None:
  """Raises RuntimeError if the converted tree does not have the model's structure/shapes."""
  flat = {
    jax.tree_util.keystr(p): _shape(x)
    for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]
  }
  want = {
    jax.tree_util.keystr(p): _shape(x) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  if flat != want:
    diff = sorted(set(flat.items()) ^ set(want.items()))
    raise RuntimeError(
      "the rosinality layout no longer matches vqjax.models.hierarchy.VQVAE2; "
      f"first differences: {diff[:4]}"
    )


def convert_vqvae2(path_or_state_dict: str | os.PathLike | Mapping[str, Any]):
  """Like `load_vqvae2`, also returning the matching config.

  Args:
    path_or_state_dict: see `load_vqvae2`.

  Returns:
    (config, model, variables): config is `base_config()` with the model.*, vq.* and
    data.channels fields of the converted model; `registry.build_model(config)` is `model`.
  """
  s, variables = convert_state_dict(read_state_dict(path_or_state_dict))
  config = make_config(s)
  model = registry.build_model(config)
  check_against_model(variables, abstract_variables(model, s.in_channel))
  return config, model, jax.tree.map(jnp.asarray, variables)


def load_vqvae2(path_or_state_dict: str | os.PathLike | Mapping[str, Any]):
  """Builds our `VQVAE2` and its variables from a rosinality/vq-vae-2-pytorch `VQVAE`.

  Args:
    path_or_state_dict: a `torch.save(model.state_dict(), path)` file, or the state_dict
      itself (see `read_state_dict` for the wrappers accepted).

  Returns:
    (model, variables): `model.apply(variables, x)` with NHWC images x in [-1, 1]
    reproduces the PyTorch model's `eval()` forward; variables = {"params", "vq_state"}
    of float32 jax arrays. The sizes are inferred from the tensor shapes.
  """
  _, model, variables = convert_vqvae2(path_or_state_dict)
  return model, variables
