"""Quickstart, stage 2: a PixelSNAIL prior over the top (4x4) codes of the Fashion-MNIST model.

Run after the quickstart's stage 1 (experiments/fashion_mnist.py) and its code extraction:
  python -m vqjax.extract_codes --workdir workdirs/fashion_mnist --out workdirs/fashion_mnist_codes
  python -m vqjax.train --config experiments/fashion_mnist_prior_top.py \
      --workdir workdirs/fashion_mnist_prior_top
A small PixelSNAIL (64 channels, 2 blocks of 2 gated residual blocks, causal attention with 4
heads) on the 60k top code maps, class-conditional on the Fashion-MNIST label; reports held-out
bits per code on the 10k test maps. `:smoke` runs one CPU step on synthetic codes.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Top prior of the Fashion-MNIST quickstart; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.prior_config("workdirs/fashion_mnist_codes", level=0, model="pixelsnail")
  c.vq.num_codes = 128  # the quickstart's codebook size
  c.prior.class_conditional = True
  c.prior.num_classes = 10
  c.data.batch_size = 64
  c.data.eval_batch_size = 500
  c.model.update(
    channels=64,
    res_channels=64,
    kernel_size=3,
    num_blocks=2,
    num_res_blocks=2,
    attention=True,
    num_heads=4,
    dropout=0.1,
  )
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.train.steps = 1000
  c.ckpt.every_steps = 500
  c.log.every_steps = 50
  c.log.eval_every_steps = 500
  return configs.apply_variant(
    c, arg, {"smoke": configs.shrink_prior_for_smoke, "reference": _reference_sizes}
  )


def _reference_sizes(c: ml_collections.ConfigDict) -> None:
  """The PyTorch reference's top PixelSNAIL (rosinality/vq-vae-2-pytorch train_pixelsnail.py:
  kernel 5, 8 heads, dropout 0.1, no label) at 128 channels, 2 blocks of 2 residual blocks,
  over the 4x4 top codes (512) of `experiments/fashion_mnist.py:reference`, batch 64: the CPU
  speed comparison of benchmarks/RESULTS.md, there on random codes (`--set
  data.name=synthetic_codes`)."""
  c.data.codes_dir = "workdirs/fashion_mnist_reference_codes"
  c.vq.num_codes = 512
  c.prior.class_conditional = False
  c.data.batch_size = 64
  c.model.update(
    channels=128,
    res_channels=128,
    kernel_size=5,
    num_blocks=2,
    num_res_blocks=2,
    attention=True,
    num_heads=8,
    dropout=0.1,
    num_out_res_blocks=0,
  )
