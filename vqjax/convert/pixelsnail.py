"""Import PixelSNAIL priors trained with rosinality/vq-vae-2-pytorch (`train_pixelsnail.py`).

Our `vqjax.models.pixelsnail.PixelSNAIL` names its parameters after the PyTorch keys, so the
import is a rename plus a transpose:

  blocks.0.resblocks.1.conv1.conv.conv.weight_v -> params/blocks_0/resblocks_1/conv1/weight_v
  cond_resnet.blocks.0.conv.weight_g            -> params/cond_resnet/blocks_0/weight_g
  out.1.conv.bias                               -> params/out_1/bias

i.e. the `.conv` wrappers of WNConv2d / CausalConv2d are dropped and a position index joins the
name before it. Conv `weight_v` [out, in, kh, kw] becomes (kh, kw, in, out), linear `weight_v`
[out, in] becomes (in, out), `weight_g` [out, 1, ...] becomes [out]. The `background` buffer
(the coordinate channels) is recomputed by the model; it only gives the map size here. Weights
saved by torch's newer `parametrizations.weight_norm` (original0 = g, original1 = v) are read too.

Files go through `torch.load(weights_only=True)`: only tensors and allow-listed types load.
"""

import argparse
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqjax import errors
from vqjax.configs import base_config
from vqjax.convert.rosinality import (
  _preview,
  _shape,
  _to_numpy,
  load_torch_file,
  unwrap_state_dict,
)
from vqjax.models.pixelsnail import PixelSNAIL

# Without these keys a state_dict is not a PixelSNAIL (they carry the map size and widths).
_SHAPE_KEYS = ("background", "horizontal.conv.conv.weight_v", "vertical.conv.conv.weight_v")
_N_HEAD = 8  # rosinality's CausalAttention default; PixelBlock never changes it
_DROPOUT = 0.1  # train_pixelsnail.py's default, used when the file has no saved args

# PixelSNAIL arguments that are config.model fields of the same name (the map shape, the code
# count and the class count live in config.prior / config.vq: see `make_config`).
CONFIG_FIELDS = (
  "channels",
  "res_channels",
  "num_res_blocks",
  "kernel_size",
  "num_blocks",
  "attention",
  "num_heads",
  "dropout",
  "num_cond_res_blocks",
  "cond_res_channels",
  "cond_res_kernel",
  "num_out_res_blocks",
)


def read_checkpoint(
  path_or_state_dict: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The state_dict of a rosinality `PixelSNAIL` and its saved training arguments.

  Args:
    path_or_state_dict: a .pt file as `train_pixelsnail.py` writes it ({'model', 'args'}),
      a bare `torch.save(model.state_dict())` file, or such a mapping in memory. The
      "module." prefix of DataParallel models is removed.

  Returns:
    (state_dict, args): args is the saved Namespace as a dict ({} when absent).
  """
  # train_pixelsnail.py saves {'model': state_dict, 'args': argparse.Namespace}. A Namespace
  # is plain attribute data (unpickling it runs no code), so it joins the allow-list; every
  # other non-tensor object is still refused.
  raw = load_torch_file(path_or_state_dict, safe_globals=(argparse.Namespace,))
  args = raw.get("args")
  args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
  sd = unwrap_state_dict(raw, "background")
  # torch.nn.utils.parametrizations.weight_norm's names for the same two tensors.
  sd = {
    k.replace(".parametrizations.weight.original0", ".weight_g").replace(
      ".parametrizations.weight.original1", ".weight_v"
    ): v
    for k, v in sd.items()
  }
  return dict(sd), args


def _count(sd: Mapping[str, Any], pattern: str, start: int = 0) -> int:
  n = start
  while pattern.format(n) in sd:
    n += 1
  return n - start


def infer_kwargs(state_dict: Mapping[str, Any], args: Mapping[str, Any] | None = None) -> dict:
  """PixelSNAIL constructor arguments read off the tensor shapes and key names.

  Args:
    state_dict: PyTorch key -> tensor.
    args: the saved training arguments (only `dropout` is read from them).

  Returns:
    Keyword arguments of `PixelSNAIL`; raises UserError if this is not a PixelSNAIL.
  """
  missing = [k for k in _SHAPE_KEYS if k not in state_dict]
  if not _count_blocks(state_dict):
    missing.append("blocks.0.*")
  if missing:
    hint = " (it looks like a VQVAE)" if "enc_b.blocks.0.weight" in state_dict else ""
    raise errors.UserError(
      f"not a rosinality PixelSNAIL state_dict{hint}: missing {_preview(missing)}; "
      f"it has {len(state_dict)} keys such as {_preview(state_dict, 4) or 'none'}"
    )
  bg = _shape(state_dict["background"])
  hz = _shape(state_dict["horizontal.conv.conv.weight_v"])
  if len(bg) != 4 or len(hz) != 4:
    raise errors.UserError(
      f"not a rosinality PixelSNAIL state_dict: background has shape {bg} and "
      f"horizontal.conv.conv.weight_v {hz}; expected 4 dimensions each"
    )
  channels, num_codes, _, kernel = hz
  num_res_blocks = _count(state_dict, "blocks.0.resblocks.{}.conv1.conv.conv.weight_v")
  res_key = "blocks.0.resblocks.0.conv1.conv.conv.weight_v"
  out_key = "out.0.conv1.conv.weight_v"
  if res_key in state_dict:
    res_channels, kernel_size = _shape(state_dict[res_key])[0], _shape(state_dict[res_key])[3]
  else:
    res_channels = _shape(state_dict[out_key])[0] if out_key in state_dict else channels
    kernel_size = kernel  # the input convs use the next odd size: an odd kernel is exact
  cond_key = "cond_resnet.blocks.0.conv.weight_v"
  cond_res_channels, cond_res_kernel, num_cond_res_blocks = 0, 3, 0
  if cond_key in state_dict:
    cond_res_channels, _, cond_res_kernel, _ = _shape(state_dict[cond_key])
    num_cond_res_blocks = _count(state_dict, "cond_resnet.blocks.{}.conv1.conv.weight_v", 1)
  dropout = (args or {}).get("dropout", _DROPOUT)
  return dict(
    shape=(bg[2], bg[3]),
    num_codes=num_codes,
    channels=channels,
    kernel_size=kernel_size,
    num_blocks=_count_blocks(state_dict),
    num_res_blocks=num_res_blocks,
    res_channels=res_channels,
    attention="blocks.0.causal_attention.query.weight_v" in state_dict,
    num_heads=_N_HEAD,
    dropout=float(dropout),
    num_cond_res_blocks=num_cond_res_blocks,
    cond_res_channels=cond_res_channels,
    cond_res_kernel=cond_res_kernel,
    num_out_res_blocks=_count(state_dict, "out.{}.conv1.conv.weight_v"),
    num_classes=0,
  )


def _count_blocks(sd: Mapping[str, Any]) -> int:
  n = 0
  while any(k.startswith(f"blocks.{n}.") for k in sd):
    n += 1
  return n


def flax_path(key: str) -> tuple[str, ...]:
  """Our parameter path of a PyTorch key.

  Args:
    key: e.g. "blocks.0.resblocks.1.conv1.conv.conv.weight_v".

  Returns:
    e.g. ("blocks_0", "resblocks_1", "conv1", "weight_v").
  """
  *modules, leaf = key.split(".")
  while modules and modules[-1] == "conv":  # WNConv2d / CausalConv2d wrappers
    modules.pop()
  path: list[str] = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return (*path, leaf)


def _convert(leaf: str, w: np.ndarray) -> np.ndarray:
  if leaf == "weight_v":
    if w.ndim == 4:
      return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [O, I, kh, kw] -> (kh, kw, I, O)
    return np.ascontiguousarray(w.T)  # linear [O, I] -> (I, O)
  if leaf == "weight_g":
    return w.reshape(-1)
  return w


def convert_state_dict(state_dict: Mapping[str, Any], model: PixelSNAIL) -> dict:
  """Our {"params": ...} for `model` from the PyTorch tensors, checking every key and shape.

  Args:
    state_dict: PyTorch key -> tensor (or array).
    model: the PixelSNAIL the variables are for.

  Returns:
    {"params": nested dict of float32 numpy arrays}.
  """
  want = _abstract_params(model)
  params: dict = {}
  got = {}
  for key, value in state_dict.items():
    if key == "background":
      continue
    path = flax_path(key)
    got[path] = _convert(path[-1], _to_numpy(value))
  missing = sorted("/".join(p) for p in set(want) - set(got))
  extra = sorted(k for k in state_dict if k != "background" and flax_path(k) not in want)
  wrong = sorted(
    f"{'/'.join(p)} {got[p].shape} != {want[p]}"
    for p in set(want) & set(got)
    if got[p].shape != want[p]
  )
  if missing or extra or wrong:
    raise errors.UserError(
      "the state_dict does not fit the inferred PixelSNAIL: "
      + "; ".join(
        f"{what} {_preview(items, 3)}"
        for what, items in (("missing", missing), ("unexpected", extra), ("shape", wrong))
        if items
      )
    )
  for path, w in got.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = w
  return {"params": params}


def _abstract_params(model: PixelSNAIL) -> dict[tuple[str, ...], tuple[int, ...]]:
  h, w = model.shape
  codes = jnp.zeros((1, h, w), jnp.int32)
  condition = None
  if model.cond_res_channels > 0:
    # The reference's one conditioning map, at half the resolution.
    condition = (jnp.zeros((1, max(h // 2, 1), max(w // 2, 1)), jnp.int32),)
  label = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), codes, condition=condition, label=label)
  )
  return {
    tuple(getattr(k, "key", str(k)) for k in p): tuple(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
  }


def make_config(kwargs: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A full vqjax prior config (`task="prior"`, `model.name="pixelsnail"`) describing the
  converted PixelSNAIL: a conditioned one models the bottom level (1) of a two-level hierarchy
  whose top maps are half its size, as rosinality's bottom prior; otherwise the top level."""
  config = base_config()
  config.task = "prior"
  config.model.name = "pixelsnail"
  for field in CONFIG_FIELDS:
    config.model[field] = kwargs[field]
  config.vq.num_codes = kwargs["num_codes"]
  h, w = (int(x) for x in kwargs["shape"])
  conditioned = kwargs["cond_res_channels"] > 0
  config.prior.level = 1 if conditioned else 0
  config.prior.code_shapes = [[h // 2, w // 2], [h, w]] if conditioned else [[h, w]]
  if kwargs.get("num_classes"):
    config.prior.class_conditional = True
    config.prior.num_classes = kwargs["num_classes"]
  return config


def convert_pixelsnail(path_or_state_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any):
  """Like `load_pixelsnail`, also returning the matching config.

  Returns:
    (config, model, variables).
  """
  sd, args = read_checkpoint(path_or_state_dict)
  kwargs = infer_kwargs(sd, args)
  unknown = set(overrides) - set(kwargs) - {"dtype", "param_dtype"}
  if unknown:
    raise TypeError(f"unknown PixelSNAIL arguments {sorted(unknown)}")
  kwargs.update(overrides)
  kwargs["shape"] = tuple(kwargs["shape"])
  model = PixelSNAIL(**kwargs)
  variables = convert_state_dict(sd, model)
  config = make_config({k: v for k, v in kwargs.items() if k not in ("dtype", "param_dtype")})
  return config, model, jax.tree.map(jnp.asarray, variables)


def load_pixelsnail(path_or_state_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any):
  """Builds our `PixelSNAIL` and its variables from a rosinality/vq-vae-2-pytorch PixelSNAIL.

  Args:
    path_or_state_dict: a .pt file written by `train_pixelsnail.py` ({'model': state_dict,
      'args': Namespace}), a bare state_dict file, or the state_dict itself.
    **overrides: PixelSNAIL constructor arguments replacing the inferred ones (num_heads is
      not stored in the state_dict: the reference always uses 8; also dtype, param_dtype).

  Returns:
    (model, variables): `model.apply(variables, codes, condition=(top_codes,) or None)` gives
    the PyTorch model's eval-mode logits as [B, H, W, num_codes] (NHWC).
  """
  _, model, variables = convert_pixelsnail(path_or_state_dict, **overrides)
  return model, variables
