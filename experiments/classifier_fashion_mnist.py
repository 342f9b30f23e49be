"""A small residual classifier on Fashion-MNIST (28x28 padded to 32x32, 1 channel).

It scores samples for classifier-based rejection sampling (vqjax/sampling/rejection.py) and
gives the evaluation of Fashion-MNIST samples its feature space (`Classifier.features`).

Run:
  python -m vqjax.train --config experiments/classifier_fashion_mnist.py \
    --workdir /tmp/vqjax_fmnist_classifier
Reads Debian's idx files (`apt install dataset-fashion-mnist`, or point
`--config.data.local_dir` at the four idx .gz files); nothing is downloaded.

Model: widths 16/32/64 over three stages (32x32, 16x16, 8x8), one pre-activation residual
block each, GroupNorm, about 80k parameters; AdamW 2e-3 with cosine decay, random left-right
flips, batch 64, 3,000 steps (3.2 epochs).
Expected (measured once on 2 CPU cores shared with other jobs, before the task was registered,
through the same trainer): 10 minutes wall for 3,000 steps plus two evals of the 10k test images
(155-550 img/s, first step after 14 s); test accuracy 85.8% at step 1,500 and 89.3% at 3,000,
mean NLL 0.295 nats, top-5 99.8%.
`:smoke` runs one step in seconds.

`:anomaly` trains the same classifier without bags (label 8), 1,500 steps and one eval at the
end: the `classifier` anomaly score of `python -m vqjax.anomaly --classifier` for the stage 1 of
experiments/fashion_mnist_anomaly.py (docs/anomaly.md). benchmarks/anomaly.py trains it for
every held-out class of its leave-one-out protocol. Measured there (2-core CPU): about 720
img/s, 2.4 minutes with compiling, 92.2% test accuracy over the nine classes without shirts.
"""

import ml_collections

from vqjax import configs


def _smoke(c: ml_collections.ConfigDict) -> None:
  configs.shrink_for_smoke(c)
  # The shared shrink also sizes a quantizer; a classifier run reads none, and its fields stay
  # at their defaults (validation rejects a changed field that nothing reads).
  defaults = configs.base_config()
  c.vq.update(num_codes=defaults.vq.num_codes, code_dim=defaults.vq.code_dim)
  c.model.update(res_channels=defaults.model.res_channels, channels=8, num_blocks=2)
  c.log.image_every_steps = 0


def _anomaly(c: ml_collections.ConfigDict) -> None:
  c.data.exclude_labels = (8,)  # experiments/fashion_mnist_anomaly.py's ANOMALY_LABELS
  c.train.steps = c.ckpt.every_steps = 1500
  c.log.eval_every_steps = 0  # the trainer's final eval only


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Fashion-MNIST classifier config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.task = "classifier"
  c.data.name = "fashion_mnist"
  c.data.reader = "local"
  c.data.image_size = 32
  c.data.channels = 1
  c.data.resize = "pad"
  c.data.random_flip = True  # clothes are left-right symmetric
  c.data.batch_size = 64
  c.data.eval_batch_size = 500

  c.model.name = "classifier"
  c.model.channels = 16  # first stage; doubles at every stage
  c.model.num_blocks = 3  # stages
  c.model.num_res_blocks = 1  # residual blocks per stage
  c.classifier.num_classes = 10
  # No smoothing: rejection sampling thresholds the predicted probability, and smoothed
  # targets would cap it near 1 - label_smoothing.
  c.classifier.label_smoothing = 0.0

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.train.steps = 3000

  c.ckpt.every_steps = 1000
  c.log.every_steps = 50
  c.log.eval_every_steps = 1500
  c.log.image_every_steps = 0  # a classifier has no image grid

  return configs.apply_variant(c, arg, {"smoke": _smoke, "anomaly": _anomaly})
