"""Tests of vqjax/convert/pixelsnail.py against an independent float64 PixelSNAIL forward.

The reference below is written from the layer structure of rosinality's PixelSNAIL with
torch.nn.functional only, computing on the raw state_dict tensors in float64.
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import vqjax  # noqa: E402
from vqjax import errors  # noqa: E402
from vqjax.convert import __main__ as cli  # noqa: E402
from vqjax.convert.pixelsnail import load_pixelsnail  # noqa: E402
from vqjax.models.impl import Impl  # noqa: E402

H = W = 8
K = 8


def _wn(shape, gen, bias=True):
  t = {
    "weight_v": torch.randn(*shape, generator=gen, dtype=torch.float64),
    "weight_g": torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen, dtype=torch.float64)
    + 0.5,
  }
  if bias:
    t["bias"] = 0.2 * torch.randn(shape[0], generator=gen, dtype=torch.float64)
  return t


def _state_dict(
  channel=16,
  kernel=5,
  n_block=2,
  n_res_block=1,
  res_channel=12,
  attention=True,
  n_cond_res_block=0,
  cond_res_channel=0,
  cond_res_kernel=3,
  n_out_res_block=0,
  seed=0,
  side=H,
):
  """Random tensors under rosinality's PixelSNAIL state_dict keys (float32, like a file)."""
  gen = torch.Generator().manual_seed(seed)
  sd = {}

  def add(prefix, shape, bias=True):
    for name, t in _wn(shape, gen, bias).items():
      sd[f"{prefix}.{name}"] = t.float()

  def gated(prefix, in_ch, ch, k, wrap, aux=0, cond=0):
    add(f"{prefix}.conv1.{wrap}", (ch, in_ch, k, k))
    if aux:
      add(f"{prefix}.aux_conv.conv", (ch, aux, 1, 1))
    add(f"{prefix}.conv2.{wrap}", (2 * in_ch, ch, k, k))
    if cond:
      add(f"{prefix}.condition.conv", (2 * in_ch, cond, 1, 1), bias=False)

  add("horizontal.conv.conv", (channel, K, kernel // 2, kernel))
  add("vertical.conv.conv", (channel, K, (kernel + 1) // 2, kernel // 2))
  rows = (torch.arange(side).float() - side / 2) / side
  sd["background"] = torch.stack(
    [rows.view(side, 1).expand(side, side), rows.view(1, side).expand(side, side)]
  ).unsqueeze(0)
  for b in range(n_block):
    for r in range(n_res_block):
      gated(
        f"blocks.{b}.resblocks.{r}",
        channel,
        res_channel,
        kernel,
        "conv.conv",
        cond=cond_res_channel,
      )
    if attention:
      gated(f"blocks.{b}.key_resblock", 2 * channel + 2, channel, 1, "conv")
      gated(f"blocks.{b}.query_resblock", channel + 2, channel, 1, "conv")
      for name, in_ch in (
        ("query", channel + 2),
        ("key", 2 * channel + 2),
        ("value", 2 * channel + 2),
      ):
        add(f"blocks.{b}.causal_attention.{name}", (channel // 2, in_ch))
      gated(f"blocks.{b}.out_resblock", channel, channel, 1, "conv", aux=channel // 2)
    else:
      add(f"blocks.{b}.out.conv", (channel, channel + 2, 1, 1))
  if n_cond_res_block:
    add("cond_resnet.blocks.0.conv", (cond_res_channel, K, cond_res_kernel, cond_res_kernel))
    for i in range(1, n_cond_res_block + 1):
      gated(f"cond_resnet.blocks.{i}", cond_res_channel, cond_res_channel, cond_res_kernel, "conv")
  for i in range(n_out_res_block):
    gated(f"out.{i}", channel, res_channel, 1, "conv")
  add(f"out.{n_out_res_block + 1}.conv", (K, channel, 1, 1))
  return sd


# --- an independent float64 forward of the same function ---------------------------------


def _weight(sd, prefix, mask_last_row_from=None):
  v = sd[f"{prefix}.weight_v"].double().clone()
  if mask_last_row_from is not None:  # "causal" convs: the current pixel and right of it
    v[:, :, -1, mask_last_row_from:] = 0
  dims = tuple(range(1, v.ndim))
  w = sd[f"{prefix}.weight_g"].double() * v / v.pow(2).sum(dims, keepdim=True).sqrt()
  bias = sd.get(f"{prefix}.bias")
  return w, None if bias is None else bias.double()


def _conv(sd, prefix, x, pad=(0, 0, 0, 0), causal=False):
  k = sd[f"{prefix}.weight_v"].shape[-1]
  w, b = _weight(sd, prefix, k // 2 if causal else None)
  return F.conv2d(F.pad(x, pad), w, b)


def _gated(sd, prefix, x, wrap, causal=False, aux=None, cond=None):
  k = sd[f"{prefix}.conv1.{wrap}.weight_v"].shape[-1]
  pad = (k // 2, k // 2, k - 1, 0) if causal else (k // 2,) * 4
  out = _conv(sd, f"{prefix}.conv1.{wrap}", F.elu(x), pad, causal)
  if aux is not None:
    out = out + _conv(sd, f"{prefix}.aux_conv.conv", F.elu(aux))
  out = _conv(sd, f"{prefix}.conv2.{wrap}", F.elu(out), pad, causal)
  if cond is not None:
    out = out + _conv(sd, f"{prefix}.condition.conv", cond)
  return x + F.glu(out, 1)


def _attention(sd, prefix, query, key, heads=8):
  b, _, h, w = key.shape
  flat = lambda t: t.flatten(2).transpose(1, 2)  # [B, T, C]

  def proj(name, t):
    wt, bias = _weight(sd, f"{prefix}.{name}")
    y = F.linear(flat(t), wt, bias)
    return y.view(b, h * w, heads, -1).transpose(1, 2)  # [B, N, T, D]

  q, k, v = proj("query", query), proj("key", key), proj("value", key)
  logits = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
  t = h * w
  allowed = torch.ones(t, t, dtype=torch.bool).tril(-1)  # key s < query t
  probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
  out = (probs @ v).transpose(1, 2).reshape(b, h, w, -1)
  return out.permute(0, 3, 1, 2)


def reference(sd, codes, condition=None, heads=8):
  n_class = sd["horizontal.conv.conv.weight_v"].shape[1]
  h, w = codes.shape[1:]
  x = F.one_hot(codes, n_class).permute(0, 3, 1, 2).double()
  kh, kw = sd["horizontal.conv.conv.weight_v"].shape[2:]
  above = _conv(sd, "horizontal.conv.conv", x, (kw // 2, kw // 2, kh - 1, 0))
  kh, kw = sd["vertical.conv.conv.weight_v"].shape[2:]
  left = _conv(sd, "vertical.conv.conv", x, (kw - 1, 0, kh - 1, 0))
  out = F.pad(above, (0, 0, 1, 0))[:, :, :h] + F.pad(left, (1, 0, 0, 0))[:, :, :, :w]
  bg = sd["background"].double().expand(codes.shape[0], 2, h, w)
  cond = None
  if condition is not None:
    c = F.one_hot(condition, n_class).permute(0, 3, 1, 2).double()
    k = sd["cond_resnet.blocks.0.conv.weight_v"].shape[-1]
    c = _conv(sd, "cond_resnet.blocks.0.conv", c, (k // 2,) * 4)
    i = 1
    while f"cond_resnet.blocks.{i}.conv1.conv.weight_v" in sd:
      c = _gated(sd, f"cond_resnet.blocks.{i}", c, "conv")
      i += 1
    cond = c.repeat_interleave(2, 2).repeat_interleave(2, 3)
  b = 0
  while f"blocks.{b}.resblocks.0.conv1.conv.conv.weight_v" in sd:
    p = f"blocks.{b}"
    inp, r = out, 0
    while f"{p}.resblocks.{r}.conv1.conv.conv.weight_v" in sd:
      out = _gated(sd, f"{p}.resblocks.{r}", out, "conv.conv", causal=True, cond=cond)
      r += 1
    if f"{p}.causal_attention.query.weight_v" in sd:
      key = _gated(sd, f"{p}.key_resblock", torch.cat([inp, out, bg], 1), "conv")
      query = _gated(sd, f"{p}.query_resblock", torch.cat([out, bg], 1), "conv")
      attn = _attention(sd, f"{p}.causal_attention", query, key, heads)
      out = _gated(sd, f"{p}.out_resblock", out, "conv", aux=attn)
    else:
      out = _conv(sd, f"{p}.out.conv", torch.cat([out, bg], 1))
    b += 1
  i = 0
  while f"out.{i}.conv1.conv.weight_v" in sd:
    out = _gated(sd, f"out.{i}", out, "conv")
    i += 1
  out = _conv(sd, f"out.{i + 1}.conv", F.elu(out))
  return out.permute(0, 2, 3, 1).numpy()  # NHWC like ours


# --- tests ----------------------------------------------------------------------------------


def _codes(seed, shape):
  return torch.from_numpy(np.random.default_rng(seed).integers(0, K, shape))


def _compare(sd, condition=None, heads=2, side=H, **overrides):
  codes = _codes(1, (2, side, side))
  model, variables = load_pixelsnail(sd, num_heads=heads)
  model = model.clone(**overrides)  # e.g. another form of the same function
  cond = None if condition is None else (jnp.asarray(condition.numpy(), jnp.int32),)
  # One compiled program: applied op by op, each layer's ops would compile on their own.
  apply = jax.jit(lambda v, c, cond: model.apply(v, c, condition=cond))
  got = np.asarray(apply(variables, jnp.asarray(codes.numpy(), jnp.int32), cond))
  want = reference(sd, codes, condition, heads)
  assert got.shape == want.shape == (2, side, side, K)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  return model


def test_top_prior_with_attention_matches_reference():
  sd = _state_dict(attention=True, n_out_res_block=1)
  model = _compare(sd)
  assert model.attention and model.num_blocks == 2 and model.num_out_res_blocks == 1
  assert (model.channels, model.res_channels, model.kernel_size) == (16, 12, 5)


@pytest.mark.parametrize("side", [4, 8])
def test_top_prior_in_the_cpu_forms_matches_reference(side):
  # The forms the registry picks on the CPU where the 5 x 5 kernel exceeds the map (4 x 4: the
  # reference's Fashion-MNIST top codes): causal convolutions as matrix products, stems as
  # look-ups of the codes; and the same forms on a map larger than the kernel.
  sd = _state_dict(attention=True, n_res_block=2, side=side)
  model = _compare(sd, side=side, impl=Impl(causal_conv="patches", onehot="lookup"))
  assert model.impl.causal_conv == "patches" and model.shape == (side, side)


@pytest.mark.parametrize("onehot_impl", ["conv", "lookup"])
def test_bottom_prior_with_condition_matches_reference(onehot_impl):
  sd = _state_dict(
    attention=False, kernel=3, n_res_block=2, n_cond_res_block=2, cond_res_channel=10
  )
  model = _compare(sd, condition=_codes(2, (2, H // 2, W // 2)), impl=Impl(onehot=onehot_impl))
  assert not model.attention and model.num_res_blocks == 2
  assert (model.cond_res_channels, model.num_cond_res_blocks, model.cond_res_kernel) == (10, 2, 3)


def test_training_checkpoint_with_args_loads_and_converts(tmp_path):
  sd = _state_dict(attention=False)
  args = argparse.Namespace(hier="top", channel=16, dropout=0.25, n_res_block=1)
  path = tmp_path / "pixelsnail_top_001.pt"
  torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "args": args}, path)
  model, _ = load_pixelsnail(path)
  assert model.dropout == 0.25 and model.shape == (H, W) and model.num_codes == K

  out = tmp_path / "converted"
  assert cli.main(["rosinality-pixelsnail", str(path), str(out)]) == 0
  config = json.loads((out / "config.json").read_text())
  assert config["task"] == "prior" and config["model"]["name"] == "pixelsnail"
  assert config["prior"]["code_shapes"] == [[H, W]] and config["vq"]["num_codes"] == K
  assert (out / "variables").is_dir()
  # One path to a trained model on disk: load_run reads the converted prior and computes the
  # same logits as the direct import.
  loaded_config, loaded, variables = vqjax.load_run(str(out))
  assert loaded_config.task == "prior" and loaded.shape == (H, W)
  codes = jnp.asarray(_codes(5, (2, H, W)).numpy(), jnp.int32)
  direct_model, direct = load_pixelsnail(path)
  np.testing.assert_allclose(
    np.asarray(jax.jit(loaded.apply)(variables, codes)),
    np.asarray(jax.jit(direct_model.apply)(direct, codes)),
    rtol=1e-6,
    atol=1e-6,
  )


def test_not_a_pixelsnail_is_a_one_line_error(tmp_path):
  path = tmp_path / "vqvae.pt"
  torch.save({"enc_b.blocks.0.weight": torch.zeros(4, 3, 4, 4)}, path)
  with pytest.raises(errors.UserError) as e:
    load_pixelsnail(path)
  message = str(e.value)
  assert "not a rosinality PixelSNAIL" in message and "background" in message
  assert "VQVAE" in message and "\n" not in message
