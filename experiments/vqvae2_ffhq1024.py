"""Three-level VQ-VAE-2 on FFHQ at 1024x1024 (Razavi et al. 2019, codes 32, 64 and 128 square).

Run:
  python -m vqjax.train --config experiments/vqvae2_ffhq1024.py \
      --config.data.folder=/path/to/ffhq/images1024x1024 --workdir /tmp/vqvae2_ffhq1024
Reads an image folder (FFHQ is not in the tfds catalogue); the last 1,000 files (sorted by
path) are held out for evaluation.

Model: bottom encoder stride 8 (1024 -> 128x128 codes), then 64x64 and 32x32 codes, K=512
per level, channel 128, residual channel 32, 2 residual blocks, embedding 64, EMA codebooks;
Adam 3e-4, batch 32 in bfloat16 compute.
Expected: faithful face reconstructions; cost not measured (16x the pixels of the ImageNet
config per image: roughly 2 days on one H100 for 200k steps, to be re-measured).
`:smoke` runs one step on CPU in seconds from the local Fashion-MNIST files.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """FFHQ-1024 three-level config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.data.name = "folder"
  c.data.folder = ""  # set on the command line
  c.data.train_split = "train[:-1000]"
  c.data.eval_split = "train[-1000:]"
  c.data.image_size = 1024
  c.data.channels = 3
  c.data.resize = "resize_crop"
  c.data.random_flip = True
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  c.data.num_workers = 16

  c.model.name = "vqvae2"
  c.model.channels = 128
  c.model.res_channels = 32
  c.model.num_res_blocks = 2
  c.model.levels = 3
  c.model.first_stride = 8
  c.model.level_stride = 2
  c.model.dtype = "bfloat16"
  c.vq.num_codes = 512
  c.vq.code_dim = 64

  c.optim.lr = 3e-4
  c.train.steps = 200_000
  c.ckpt.every_steps = 2000
  c.log.every_steps = 100
  c.log.eval_every_steps = 10_000
  c.log.eval_batches = 16
  c.log.image_every_steps = 2000
  c.log.num_images = 8

  return configs.apply_variant(c, arg, {"smoke": _smoke})


def _smoke(c: ml_collections.ConfigDict) -> None:
  configs.shrink_for_smoke(c)
  c.model.first_stride = 2  # 32x32 images -> 16, 8 and 4 square code maps
