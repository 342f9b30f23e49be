"""The evaluation network of Fashion-MNIST: the feature space that judges samples.

  python -m vqjax.features --data fashion_mnist        # trains it once, then reuses the cache
  python -m vqjax.train --config experiments/features_fashion_mnist.py --workdir DIR

A residual classifier (widths 32/64/128 over 32x32, 16x16 and 8x8, two pre-activation residual
blocks per stage, GroupNorm, dropout 0.1) trained to convergence on the 60k training images
with random left-right flips. It is kept apart from the rejection classifier on purpose: a
sample filter and the judge of the filtered samples must not be the same network, and the judge
must be strong. Its pooled 128-d features are the space of the Frechet distance, precision /
recall and CAS that `vqjax.evaluate` and the pipeline report, and its test accuracy goes into
every `eval.json` beside the run and step that made the features.
`:smoke` runs one CPU step in seconds.
"""

import ml_collections

from vqjax import configs


def _smoke(c: ml_collections.ConfigDict) -> None:
  configs.shrink_for_smoke(c)
  defaults = configs.base_config()
  c.vq.update(num_codes=defaults.vq.num_codes, code_dim=defaults.vq.code_dim)
  c.model.update(res_channels=defaults.model.res_channels, channels=8, num_blocks=2)
  c.log.image_every_steps = 0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The Fashion-MNIST evaluation network; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.task = "classifier"
  c.data.name = "fashion_mnist"
  c.data.reader = "local"
  c.data.image_size = 32
  c.data.channels = 1
  c.data.resize = "pad"
  c.data.random_flip = True
  c.data.batch_size = 128
  c.data.eval_batch_size = 500

  c.model.name = "classifier"
  c.model.channels = 48
  c.model.num_blocks = 3
  c.model.num_res_blocks = 1
  c.model.dropout = 0.1
  c.classifier.num_classes = 10
  c.classifier.stem_stride = 2  # 2x2 patches: the stages run at 16x16, 8x8 and 4x4
  c.classifier.label_smoothing = 0.0

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.train.steps = 6000  # 12.8 epochs

  c.ckpt.every_steps = 1000
  c.log.every_steps = 100
  c.log.eval_every_steps = 2000
  c.log.image_every_steps = 0

  return configs.apply_variant(c, arg, {"smoke": _smoke})
