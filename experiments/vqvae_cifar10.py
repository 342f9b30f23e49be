"""VQ-VAE on CIFAR-10 as in van den Oord et al. 2017 ("Neural Discrete Representation Learning").

Run:
  python -m vqjax.train --config experiments/vqvae_cifar10.py --workdir /tmp/vqvae_cifar10
Needs tfds `cifar10` prepared beforehand (ArrayRecord for the grain reader, or TFRecord with
TensorFlow installed and `--config.data.reader=tfdata`); `--config.data.download=True` lets
tfds fetch it.

Setup from the paper: encoder of 2 stride-2 4x4 convs and 2 residual blocks, 256 hidden units,
8x8 latents with K=512 codes (one 64-dim code per position here; the paper's "8x8x10" field,
ten codes per position, would need a grouped quantizer that vqjax does not have yet),
beta 0.25, Adam 2e-4, batch 128, 250k steps, codebook learned by the codebook loss
(`--config.vq.ema=True` gives the paper's EMA variant).
Expected: reconstructions close to the inputs (the paper reports 4.67 bits/dim for the
full model with its prior, not a reconstruction number); about 6 hours on one H100 (not
measured here). `:smoke` runs one step on CPU in seconds from the local Fashion-MNIST files.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10 VQ-VAE config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.data.name = "cifar10"
  c.data.reader = "auto"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.resize = "center_crop"
  c.data.batch_size = 128
  c.data.eval_batch_size = 500

  c.model.name = "vqvae"
  c.model.channels = 256
  c.model.res_channels = 256
  c.model.num_res_blocks = 2
  c.model.downsample = 2  # 32x32 -> 8x8 latents
  c.vq.num_codes = 512
  c.vq.code_dim = 64
  c.vq.beta = 0.25
  c.vq.ema = False
  c.vq.init = "uniform"
  c.vq.restart_after = 0

  c.optim.name = "adam"
  c.optim.lr = 2e-4
  c.train.steps = 250_000

  c.ckpt.every_steps = 5000
  c.log.every_steps = 100
  c.log.eval_every_steps = 5000
  c.log.image_every_steps = 5000

  return configs.apply_variant(c, arg, {"smoke": configs.shrink_for_smoke})
