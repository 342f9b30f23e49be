"""Tests of vqjax/convert: importing rosinality/vq-vae-2-pytorch VQVAE weights.

The expected outputs come from a float64 NCHW forward written here with torch.nn.functional
from the `VQVAE` module of the rosinality/vq-vae-2-pytorch repository (vqvae.py: its encoder,
decoder and EMA quantizer), on a state_dict built here with that module's key names and
random weights; nothing is downloaded.
"""

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vqjax.convert import load_converted, load_vqvae2  # noqa: E402
from vqjax.convert.__main__ import main  # noqa: E402
from vqjax.errors import UserError  # noqa: E402

SMALL = dict(in_channel=3, channel=16, n_res_block=2, n_res_channel=8, embed_dim=8, n_embed=32)
GRAY = dict(in_channel=1, channel=12, n_res_block=1, n_res_channel=4, embed_dim=4, n_embed=16)


# ---- an independent float64 reference of the PyTorch model ---------------------------------


def _conv(x, sd, key, stride=1, padding=0):
  return F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=stride, padding=padding)


def _upconv(x, sd, key):
  return F.conv_transpose2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2, padding=1)


def _res_stack(x, sd, key, first, n):
  for i in range(n):
    block = f"{key}.blocks.{first + i}.conv"
    h = _conv(F.relu(x), sd, f"{block}.1", padding=1)
    x = x + _conv(F.relu(h), sd, f"{block}.3")
  return x


def _encoder(x, sd, key, stride, n):
  x = F.relu(_conv(x, sd, f"{key}.blocks.0", stride=2, padding=1))
  if stride == 4:
    x = F.relu(_conv(x, sd, f"{key}.blocks.2", stride=2, padding=1))
    x, first = _conv(x, sd, f"{key}.blocks.4", padding=1), 5
  else:
    x, first = _conv(x, sd, f"{key}.blocks.2", padding=1), 3
  return F.relu(_res_stack(x, sd, key, first, n))


def _decoder(x, sd, key, stride, n):
  x = F.relu(_res_stack(_conv(x, sd, f"{key}.blocks.0", padding=1), sd, key, 1, n))
  x = _upconv(x, sd, f"{key}.blocks.{n + 2}")
  if stride == 4:
    x = _upconv(F.relu(x), sd, f"{key}.blocks.{n + 4}")
  return x


def _nearest(z, embed):
  """z [B, D, H, W], embed [D, K] -> (codes [B, H, W], quantized [B, D, H, W], flat z)."""
  b, d, h, w = z.shape
  flat = z.permute(0, 2, 3, 1).reshape(-1, d)
  dist = ((flat[:, :, None] - embed[None]) ** 2).sum(1)
  idx = dist.argmin(1)
  q = embed.T[idx].reshape(b, h, w, d).permute(0, 3, 1, 2)
  return idx.reshape(b, h, w), q, flat


def _reference(sd, x, n):
  """Forward of the reference model in eval mode: (recon, top codes, bottom codes, pre-quant
  vectors of both levels)."""
  enc_b = _encoder(x, sd, "enc_b", 4, n)
  enc_t = _encoder(enc_b, sd, "enc_t", 2, n)
  id_t, q_t, z_t = _nearest(_conv(enc_t, sd, "quantize_conv_t"), sd["quantize_t.embed"])
  cond = torch.cat([_decoder(q_t, sd, "dec_t", 2, n), enc_b], 1)
  id_b, q_b, z_b = _nearest(_conv(cond, sd, "quantize_conv_b"), sd["quantize_b.embed"])
  recon = _decoder(torch.cat([_upconv(q_t, sd, "upsample_t"), q_b], 1), sd, "dec", 4, n)
  return recon, id_t, id_b, z_t, z_b


# ---- a random state_dict with the reference's key names --------------------------------------


def _state_dict(in_channel, channel, n_res_block, n_res_channel, embed_dim, n_embed, seed=0):
  """Random float32 weights named and shaped like rosinality's VQVAE(...).state_dict()."""
  rng = np.random.default_rng(seed)
  c, h, e, r, n = channel, channel // 2, embed_dim, n_res_channel, n_res_block
  shapes = {}

  def conv(key, cout, cin, k):
    shapes[f"{key}.weight"] = (cout, cin, k, k)
    shapes[f"{key}.bias"] = (cout,)

  def upconv(key, cin, cout):
    shapes[f"{key}.weight"] = (cin, cout, 4, 4)
    shapes[f"{key}.bias"] = (cout,)

  def res(key, first):
    for i in range(n):
      conv(f"{key}.blocks.{first + i}.conv.1", r, c, 3)
      conv(f"{key}.blocks.{first + i}.conv.3", c, r, 1)

  conv("enc_b.blocks.0", h, in_channel, 4)
  conv("enc_b.blocks.2", c, h, 4)
  conv("enc_b.blocks.4", c, c, 3)
  res("enc_b", 5)
  conv("enc_t.blocks.0", h, c, 4)
  conv("enc_t.blocks.2", c, h, 3)
  res("enc_t", 3)
  conv("quantize_conv_t", e, c, 1)
  conv("dec_t.blocks.0", c, e, 3)
  res("dec_t", 1)
  upconv(f"dec_t.blocks.{n + 2}", c, e)
  conv("quantize_conv_b", e, e + c, 1)
  upconv("upsample_t", e, e)
  conv("dec.blocks.0", c, 2 * e, 3)
  res("dec", 1)
  upconv(f"dec.blocks.{n + 2}", c, h)
  upconv(f"dec.blocks.{n + 4}", h, in_channel)
  sd = {}
  for key, shape in shapes.items():
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    sd[key] = torch.from_numpy(rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32))
  for level in ("t", "b"):
    sd[f"quantize_{level}.embed"] = torch.from_numpy(
      rng.normal(size=(e, n_embed)).astype(np.float32)
    )
    size = rng.uniform(0.5, 5.0, n_embed).astype(np.float32)
    sd[f"quantize_{level}.cluster_size"] = torch.from_numpy(size)
    sd[f"quantize_{level}.embed_avg"] = torch.from_numpy(
      rng.normal(size=(e, n_embed)).astype(np.float32)
    )
  return sd


def _data_codebooks(sd, x, n, seed=1):
  """Replaces both codebooks by perturbed encoder outputs, so that many codes are in use."""
  rng = np.random.default_rng(seed)
  sd64 = {k: v.double() for k, v in sd.items()}
  for level in ("t", "b"):
    z = _reference(sd64, x, n)[3 if level == "t" else 4]
    embed = sd[f"quantize_{level}.embed"]
    picks = z[rng.integers(0, z.shape[0], embed.shape[1])].numpy()
    noise = rng.normal(0, 0.3 * picks.std(), picks.shape)
    sd[f"quantize_{level}.embed"] = torch.from_numpy((picks + noise).T.astype(np.float32))
    sd64[f"quantize_{level}.embed"] = sd[f"quantize_{level}.embed"].double()


def _case(sizes, batch=3, image=32, seed=0):
  rng = np.random.default_rng(seed + 100)
  x = rng.uniform(-1, 1, (batch, sizes["in_channel"], image, image))
  sd = _state_dict(**sizes, seed=seed)
  _data_codebooks(sd, torch.from_numpy(x), sizes["n_res_block"])
  expected = _reference(
    {k: v.double() for k, v in sd.items()}, torch.from_numpy(x), sizes["n_res_block"]
  )
  return sd, x, expected


def _nhwc(x):
  return jnp.asarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def _rel_err(ours, theirs):
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _encode_forward_decode(model, variables, x, codes):
  """(codes of x, reconstruction of x, decoding of `codes`) from one compiled program: applied
  op by op, every layer's ops would compile on their own (seconds of the test's time)."""

  def run(mdl, x, codes):
    return mdl.encode_to_indices(x), mdl(x)[0], mdl.decode_from_indices(codes)

  return jax.jit(lambda v, x, c: model.apply(v, x, c, method=run))(variables, x, codes)


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [SMALL, GRAY], ids=["rgb", "gray"])
def test_matches_reference_forward(sizes):
  sd, x, (recon, id_t, id_b, _, _) = _case(sizes)
  model, variables = load_vqvae2(sd)
  # The test is only meaningful if the codes vary.
  assert len(np.unique(id_b.numpy())) > sizes["n_embed"] // 4
  codes, ours, from_codes = _encode_forward_decode(
    model, variables, _nhwc(x), (id_t.numpy(), id_b.numpy())
  )
  np.testing.assert_array_equal(np.asarray(codes[0]), id_t.numpy())
  np.testing.assert_array_equal(np.asarray(codes[1]), id_b.numpy())
  assert _rel_err(np.asarray(ours).transpose(0, 3, 1, 2), recon.numpy()) < 1e-5
  assert _rel_err(np.asarray(from_codes).transpose(0, 3, 1, 2), recon.numpy()) < 1e-5


def test_inferred_sizes_and_ema_state():
  sd, x, (_, id_t, id_b, z_t, z_b) = _case(SMALL)
  model, variables = load_vqvae2(sd)
  sizes = (model.channels, model.res_channels, model.num_res_blocks, model.out_channels)
  assert sizes == (16, 8, 2, 3)
  assert model.quantizer["num_codes"] == 32 and model.quantizer["code_dim"] == 8
  for i, level in enumerate("tb"):
    state = variables["vq_state"][f"quantizers_{i}"]
    np.testing.assert_array_equal(state["codebook"], sd[f"quantize_{level}.embed"].numpy().T)
    np.testing.assert_array_equal(state["ema_sum"], sd[f"quantize_{level}.embed_avg"].numpy().T)
    np.testing.assert_array_equal(state["ema_count"], sd[f"quantize_{level}.cluster_size"].numpy())
    assert float(state["ema_weight"]) == 1.0 and bool(state["initialized"])
    assert not np.any(np.asarray(state["unused_steps"]))
  # One training step of ours must apply the reference's EMA rule (decay 0.99, Laplace eps
  # 1e-5, no bias correction) to the imported statistics.
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["vq_state"]))
  _, updates = step(variables, _nhwc(x))
  for i, (level, idx, z) in enumerate((("t", id_t, z_t), ("b", id_b, z_b))):
    size = sd[f"quantize_{level}.cluster_size"].double()
    avg = sd[f"quantize_{level}.embed_avg"].double()
    onehot = F.one_hot(idx.reshape(-1), 32).double()
    size = 0.99 * size + 0.01 * onehot.sum(0)
    avg = 0.99 * avg + 0.01 * z.T @ onehot
    total = size.sum()
    embed = avg / ((size + 1e-5) / (total + 32 * 1e-5) * total)
    new = updates["vq_state"][f"quantizers_{i}"]
    np.testing.assert_allclose(np.asarray(new["ema_count"]), size.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["ema_sum"]), avg.T.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["codebook"]), embed.T.numpy(), rtol=1e-4, atol=1e-6)


def test_cli_round_trip(tmp_path):
  sd, x, (recon, id_t, id_b, _, _) = _case(SMALL, batch=2, seed=3)
  path = tmp_path / "vqvae_001.pt"
  torch.save(sd, path)
  out = tmp_path / "converted"
  assert main(["rosinality-vqvae2", str(path), str(out), "--image-size", "64"]) == 0
  config, model, variables = load_converted(str(out))
  assert config.model.name == "vqvae2" and config.data.channels == 3
  assert config.data.image_size == 64
  assert (config.model.channels, config.vq.num_codes, config.vq.code_dim) == (16, 32, 8)
  assert config.vq.init == "normal" and config.vq.restart_after == 0 and config.vq.ema
  _, direct = load_vqvae2(str(path))
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(direct), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  codes, ours, from_codes = _encode_forward_decode(
    model, variables, _nhwc(x), (id_t.numpy(), id_b.numpy())
  )
  np.testing.assert_array_equal(np.asarray(codes[1]), id_b.numpy())
  assert _rel_err(np.asarray(ours).transpose(0, 3, 1, 2), recon.numpy()) < 1e-5
  assert _rel_err(np.asarray(from_codes).transpose(0, 3, 1, 2), recon.numpy()) < 1e-5
  # An existing output is not overwritten silently.
  assert main(["rosinality-vqvae2", str(path), str(out)]) == 1
  assert main(["rosinality-vqvae2", str(path), str(out), "--force"]) == 0


def test_accepts_wrapped_and_data_parallel_state_dicts():
  sd = _state_dict(**GRAY)
  _, plain = load_vqvae2(sd)
  _, wrapped = load_vqvae2({"model": {f"module.{k}": v for k, v in sd.items()}})
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(wrapped), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _missing(sd):
  del sd["dec.blocks.0.bias"]
  return "dec.blocks.0.bias"


def _wrong_shape(sd):
  sd["quantize_conv_b.weight"] = sd["quantize_conv_b.weight"][:, :-1]
  return "quantize_conv_b.weight"


def _extra(sd):
  sd["enc_t.blocks.9.conv.1.weight"] = torch.zeros(4)
  return "enc_t.blocks.9.conv.1.weight"


def _not_a_vqvae(sd):
  sd.clear()
  sd["blocks.0.causal_attention.key.weight_v"] = torch.zeros(4, 4)
  return "enc_b.blocks.0.weight"


@pytest.mark.parametrize("corrupt", [_missing, _wrong_shape, _extra, _not_a_vqvae])
def test_bad_state_dict_names_the_key(corrupt, tmp_path, capsys):
  sd = _state_dict(**GRAY)
  key = corrupt(sd)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    load_vqvae2(sd)
  path = tmp_path / "bad.pt"
  torch.save(sd, path)
  assert main(["rosinality-vqvae2", str(path), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert key in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "out").exists()


class _WritesFile:
  """Unpickles by calling open(path, "w"): stands for any code a checkpoint could run on load."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return open, (self.path, "w")


def test_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
  victim = tmp_path / "written_on_load"
  path = tmp_path / "malicious.pt"
  torch.save({"model": _state_dict(**GRAY), "payload": _WritesFile(victim)}, path)
  with pytest.raises(UserError, match=r"pickled io\.open\b.*state_dict alone"):
    load_vqvae2(str(path))
  assert main(["rosinality-vqvae2", str(path), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert "io.open" in err and len(err.splitlines()) == 1
  assert not victim.exists() and not (tmp_path / "out").exists()
  # The payload is live: loading without weights_only runs it, which the refusal prevented.
  torch.load(path, weights_only=False)
  assert victim.exists()


def test_refusal_names_the_object_and_the_allow_list(tmp_path):
  # What prior checkpoints of the reference store next to the weights: the training args.
  path = tmp_path / "with_args.pt"
  torch.save({"model": _state_dict(**GRAY), "args": argparse.Namespace(epoch=1)}, path)
  with pytest.raises(UserError) as refused:
    load_vqvae2(str(path))
  message = str(refused.value)
  assert "argparse.Namespace" in message and "\n" not in message
  assert "safe_globals([argparse.Namespace])" in message
  assert message.endswith("convert it with `rosinality-pixelsnail`")  # the likeliest mix-up
  # The advice works: under that allow-list the weights load.
  with torch.serialization.safe_globals([argparse.Namespace]):
    sd = torch.load(path, weights_only=True)
  _, variables = load_vqvae2(sd)
  assert variables["params"]


@pytest.mark.slow
def test_training_starts_from_converted_weights(tmp_path):
  """`ckpt.init_from` pointed at a converted directory: the first step's (pre-update) MSE is
  the imported model's MSE on that batch, which a fresh initialisation would not give."""
  import os

  from vqjax.data import pipeline
  from vqjax.training import trainer

  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("needs Debian's dataset-fashion-mnist")
  torch.save(_state_dict(**SMALL, seed=5), tmp_path / "w.pt")
  out = tmp_path / "converted"
  assert main(["rosinality-vqvae2", str(tmp_path / "w.pt"), str(out)]) == 0
  config, model, variables = load_converted(str(out))
  config.data.update(
    name="fashion_mnist",
    reader="local",
    train_split="train[:16]",
    eval_split="test[:8]",
    batch_size=8,
    eval_batch_size=8,
    image_size=32,
  )
  config.train.steps = 1
  config.ckpt.init_from = str(out)
  config.log.update(every_steps=1, eval_batches=1, tensorboard=False)
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  batch = next(pipeline.make_train_iterator(config.data, config.seed))
  _, aux = model.apply(variables, jnp.asarray(pipeline.preprocess(batch["image"], config.data)))
  np.testing.assert_allclose(result["mse"], float(aux["mse"]), rtol=1e-4)
