"""A residual classifier on CIFAR-10 (32x32 RGB): the judge of CIFAR-10 samples.

It scores samples for classifier-based rejection sampling (vqjax/sampling/rejection.py) and
gives the evaluation of CIFAR-10 samples its feature space (`Classifier.features`).

Run:
  python -m vqjax.train --config experiments/classifier_cifar10.py \
    --workdir /tmp/vqjax_cifar10_classifier
Needs tfds `cifar10` prepared beforehand (ArrayRecord for the grain reader, or TFRecord with
TensorFlow installed and `--config.data.reader=tfdata`); `--config.data.download=True` lets
tfds fetch it.

Model: widths 64/128/256 over three stages (32x32, 16x16, 8x8), two pre-activation residual
blocks each (a ResNet-18-like depth without its fourth stage), GroupNorm, dropout 0.1, about
2.8M parameters; AdamW 1e-3, weight decay 0.05, cosine decay after 1,000 warmup steps, random
left-right flips (the only augmentation the data layer has), batch 128, 40k steps (about 100
epochs); no label smoothing, so the predicted probabilities stay usable as rejection scores.
Expected: roughly 90% test accuracy (not measured here: no CIFAR-10 or GPU on the project's
machines; without random crops expect a little less than a ResNet's usual 93-95%).
`:smoke` runs one step on CPU in seconds from the local Fashion-MNIST files.
"""

import ml_collections

from vqjax import configs


def _smoke(c: ml_collections.ConfigDict) -> None:
  configs.shrink_for_smoke(c)
  # The shared shrink also sizes a quantizer; a classifier run reads none, and its fields stay
  # at their defaults (validation rejects a changed field that nothing reads).
  defaults = configs.base_config()
  c.vq.update(num_codes=defaults.vq.num_codes, code_dim=defaults.vq.code_dim)
  c.model.update(res_channels=defaults.model.res_channels, channels=8, num_res_blocks=1)
  c.log.image_every_steps = 0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10 classifier config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.task = "classifier"
  c.data.name = "cifar10"
  c.data.reader = "auto"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.resize = "center_crop"
  c.data.random_flip = True
  c.data.batch_size = 128
  c.data.eval_batch_size = 500

  c.model.name = "classifier"
  c.model.channels = 64  # first stage; doubles at every stage
  c.model.num_blocks = 3  # stages
  c.model.num_res_blocks = 2  # residual blocks per stage
  c.model.dropout = 0.1
  c.classifier.num_classes = 10
  # No smoothing: rejection sampling thresholds the predicted probability, and smoothed
  # targets would cap it near 1 - label_smoothing.
  c.classifier.label_smoothing = 0.0

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 1000
  c.optim.schedule = "cosine"
  c.train.steps = 40_000

  c.ckpt.every_steps = 5000
  c.log.every_steps = 100
  c.log.eval_every_steps = 5000
  c.log.image_every_steps = 0  # a classifier has no image grid

  return configs.apply_variant(c, arg, {"smoke": _smoke})
