"""Quickstart: a small VQ-VAE-2 on real Fashion-MNIST (28x28 padded to 32x32, 1 channel).

Run:
  python -m vqjax.train --config experiments/fashion_mnist.py --workdir /tmp/vqjax_fmnist
Reads Debian's idx files (`apt install dataset-fashion-mnist`, or point
`--config.data.local_dir` at the four idx .gz files); nothing is downloaded.

Expected (measured once on 2 CPU cores shared with other jobs): 7 minutes wall for 1,200
steps of batch 64 plus two evals of the 10k test images (160-285 img/s, first step after 15-25
s of compilation, 6 s with `--config.log.compilation_cache=DIR` warm); eval MSE 0.0071, PSNR
27.5 dB on [-1, 1] images, all 128 codes of both levels used (perplexity 101 top, 75 bottom);
`workdir/images/recon_0001200.png` shows inputs (odd rows) over reconstructions.
`:smoke` runs one step in seconds; `:reference` has the PyTorch reference's default sizes.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Fashion-MNIST quickstart config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.data.name = "fashion_mnist"
  c.data.reader = "local"
  c.data.image_size = 32
  c.data.channels = 1
  c.data.resize = "pad"
  c.data.batch_size = 64
  c.data.eval_batch_size = 500

  c.model.name = "vqvae2"
  c.model.channels = 64
  c.model.res_channels = 32
  c.model.num_res_blocks = 1
  c.model.levels = 2
  c.model.first_stride = 2  # bottom codes 16x16, top codes 8x8
  c.model.level_stride = 2
  c.vq.num_codes = 128
  c.vq.code_dim = 32

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.train.steps = 1200

  c.ckpt.every_steps = 400
  c.log.every_steps = 50
  c.log.eval_every_steps = 600
  c.log.image_every_steps = 600
  c.log.num_images = 16

  return configs.apply_variant(
    c, arg, {"smoke": configs.shrink_for_smoke, "reference": _reference_sizes}
  )


def _reference_sizes(c: ml_collections.ConfigDict) -> None:
  """The PyTorch reference's default VQVAE() (rosinality/vq-vae-2-pytorch vqvae.py: channel 128,
  2 residual blocks of 32, 64-dim codes, 512 per level, strides 4 and 2) at batch 128: the CPU
  speed comparison of benchmarks/RESULTS.md (`benchmarks/suite.py --only fashion`)."""
  c.model.update(channels=128, res_channels=32, num_res_blocks=2, first_stride=4, level_stride=2)
  c.vq.update(num_codes=512, code_dim=64)
  c.data.batch_size = 128
