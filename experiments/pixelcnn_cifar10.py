"""Gated PixelCNN prior over the 8x8 codes of the CIFAR-10 VQ-VAE (van den Oord et al. 2017
train a PixelCNN over the latents; the gated architecture is van den Oord et al. 2016's
"Conditional Image Generation with PixelCNN Decoders": 15 gated layers).

Run after stage 1 (experiments/vqvae_cifar10.py) and code extraction:
  python -m vqjax.extract_codes --workdir STAGE1 --out CODES
  python -m vqjax.train --config experiments/pixelcnn_cifar10.py --workdir RUN \
      --config.data.codes_dir=CODES
Class-conditional on the CIFAR-10 label. The VQ-VAE paper reports 4.67 bits/dim for its
CIFAR-10 model with prior (reported here as eval bits_per_dim). `:smoke` runs one CPU step on
synthetic codes.
"""

import ml_collections

from vqjax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10 code prior; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.prior_config("", level=0, model="pixelcnn")
  c.vq.num_codes = 512
  c.prior.class_conditional = True
  c.prior.num_classes = 10
  c.data.batch_size = 128
  c.data.eval_batch_size = 500
  c.model.update(channels=128, num_layers=15, kernel_size=5, dropout=0.0)
  c.optim.lr = 3e-4
  c.train.steps = 200_000
  c.ckpt.every_steps = 5000
  c.log.every_steps = 100
  c.log.eval_every_steps = 10_000
  return configs.apply_variant(c, arg, {"smoke": configs.shrink_prior_for_smoke})
