"""VQ-VAE-2 on ImageNet 256x256 (Razavi et al. 2019) with rosinality/vq-vae-2-pytorch defaults.

Run:
  python -m vqjax.train --config experiments/vqvae2_imagenet.py --workdir /tmp/vqvae2_imagenet
Needs tfds `imagenet2012` prepared beforehand (manual download; ArrayRecord for the grain
reader, TFRecord with TensorFlow for `--config.data.reader=tfdata`).

Model: top codes 32x32, bottom codes 64x64, K=512 per level, channel 128, residual channel
32, 2 residual blocks, embedding 64, EMA codebooks (decay 0.99), beta 0.25; Adam 3e-4,
batch 128 (1.39M parameters, about 23 GFLOP per image per training step).
Expected: reconstruction MSE around 0.01 on [-1, 1] images after a few epochs (not measured
here: no ImageNet on the project's machines). Cost of 200k steps x 128 images on one H100, from
this config's own train step on synthetic data (benchmarks/RESULTS.md): float32 3,395 img/s,
about 2.1 hours; `--config.model.dtype=bfloat16` 6,548 img/s, about 1.1 hours, if the input
pipeline keeps up (its JPEG decoding rate was not measured).
`:smoke` runs one step on CPU in seconds from the local Fashion-MNIST files.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ImageNet-256 VQ-VAE-2 config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.data.name = "imagenet2012"
  c.data.reader = "auto"
  c.data.image_size = 256
  c.data.channels = 3
  c.data.resize = "resize_crop"
  c.data.random_flip = True
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.batch_size = 128
  c.data.eval_batch_size = 128
  c.data.num_workers = 8

  c.model.name = "vqvae2"
  c.model.channels = 128
  c.model.res_channels = 32
  c.model.num_res_blocks = 2
  c.model.levels = 2
  c.model.first_stride = 4  # 256 -> 64x64 bottom codes
  c.model.level_stride = 2  # 64 -> 32x32 top codes
  c.vq.num_codes = 512
  c.vq.code_dim = 64
  c.vq.beta = 0.25
  c.vq.ema = True
  c.vq.decay = 0.99

  c.optim.name = "adam"
  c.optim.lr = 3e-4
  c.train.steps = 200_000

  c.ckpt.every_steps = 5000
  c.log.every_steps = 100
  c.log.eval_every_steps = 10_000
  c.log.eval_batches = 50
  c.log.image_every_steps = 5000

  return configs.apply_variant(c, arg, {"smoke": configs.shrink_for_smoke})
