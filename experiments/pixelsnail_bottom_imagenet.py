"""PixelSNAIL bottom prior of VQ-VAE-2 on ImageNet-256 (64x64 bottom codes conditioned on the
32x32 top codes, K=512), with the sizes of rosinality/vq-vae-2-pytorch's
`train_pixelsnail.py --hier bottom`: channel 256, kernel 5, 4 blocks of 4 gated residual blocks
with 256 channels, no attention, 3 conditioning residual blocks of 256 channels, dropout 0.1,
batch 32, Adam 3e-4.

Run after code extraction (see experiments/pixelsnail_top_imagenet.py):
  python -m vqjax.train --config experiments/pixelsnail_bottom_imagenet.py --workdir RUN \
      --config.data.codes_dir=CODES
About 90M parameters. `:smoke` runs one CPU step on synthetic codes. For batch 256 on one 80 GB
card add `--config.model.remat=True --config.data.batch_size=256` (24.9 GiB peak on an H100,
benchmarks/RESULTS.md run 5; without remat XLA's estimate was 84.5 GiB).
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ImageNet bottom prior; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.prior_config("", level=1, model="pixelsnail")
  c.vq.num_codes = 512
  c.prior.num_classes = 1000
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.model.update(
    channels=256,
    res_channels=256,
    kernel_size=5,
    num_blocks=4,
    num_res_blocks=4,
    attention=False,
    dropout=0.1,
    num_cond_res_blocks=3,
    cond_res_channels=256,
  )
  c.optim.lr = 3e-4
  c.train.steps = 1_000_000
  c.ckpt.every_steps = 5000
  c.log.every_steps = 100
  c.log.eval_every_steps = 10_000
  c.log.eval_batches = 100
  return configs.apply_variant(c, arg, {"smoke": configs.shrink_prior_for_smoke})
