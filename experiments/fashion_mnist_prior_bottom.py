"""Quickstart, stage 2: a PixelSNAIL prior over the bottom (8x8) codes of the Fashion-MNIST
model, conditioned on the top codes.

Run after experiments/fashion_mnist_prior_top.py's code extraction (see there):
  python -m vqjax.train --config experiments/fashion_mnist_prior_bottom.py \
      --workdir workdirs/fashion_mnist_prior_bottom
As the paper's bottom prior (and rosinality's): no attention, the top codes through a
conditioning stack of gated residual blocks and a nearest x2 upsampling. `:smoke` runs one CPU
step on synthetic codes.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Bottom prior of the Fashion-MNIST quickstart; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.prior_config("workdirs/fashion_mnist_codes", level=1, model="pixelsnail")
  c.vq.num_codes = 128
  c.data.batch_size = 64
  c.data.eval_batch_size = 500
  c.model.update(
    channels=64,
    res_channels=64,
    kernel_size=3,
    num_blocks=2,
    num_res_blocks=2,
    attention=False,
    dropout=0.1,
    num_cond_res_blocks=2,
    cond_res_channels=64,
  )
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.train.steps = 1000
  c.ckpt.every_steps = 500
  c.log.every_steps = 50
  c.log.eval_every_steps = 500
  return configs.apply_variant(c, arg, {"smoke": configs.shrink_prior_for_smoke})
