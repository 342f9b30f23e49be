"""A residual classifier on ImageNet at 256x256: the judge of VQ-VAE-2 ImageNet samples.

Razavi et al. 2019 reject class-conditional ImageNet samples that a pretrained classifier does
not assign to their class (vqjax/sampling/rejection.py); this config trains such a classifier
on the same 256px images the VQ-VAE-2 of experiments/vqvae2_imagenet.py sees, and gives the
evaluation of its samples a feature space (`Classifier.features`).

Run:
  python -m vqjax.train --config experiments/classifier_imagenet.py \
    --workdir /tmp/vqjax_imagenet_classifier
Needs tfds `imagenet2012` prepared beforehand (manual download; ArrayRecord for the grain
reader, TFRecord with TensorFlow for `--config.data.reader=tfdata`).

Model: a 4x4 stride-4 patchify stem (256 -> 64x64), widths 64/128/256/512 over four stages
(64, 32, 16, 8), two pre-activation residual blocks each (ResNet-18 widths and depth),
GroupNorm, 11.7M parameters; AdamW 2e-3, weight decay 0.05, cosine decay after 5 epochs of
warmup, random left-right flips and the shorter-side resize + centre crop of the data layer
(no random-resized crops), batch 256, 450k steps (90 epochs); no label smoothing, so the
predicted probabilities stay usable as rejection scores.
Expected: top-1 accuracy in the 60-70% range of a ResNet-18 trained without crop augmentation
(not measured here: no ImageNet on the project's machines); `--config.model.dtype=bfloat16`
for speed on accelerators.
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
  # 32x32 smoke images: a stride-2 stem and two stages still exercise the patchify path.
  c.model.update(
    res_channels=defaults.model.res_channels, channels=8, num_blocks=2, num_res_blocks=1
  )
  c.classifier.stem_stride = 2
  c.data.channels = 3
  c.log.image_every_steps = 0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ImageNet-256 classifier config; `arg="smoke"` shrinks it to one CPU step."""
  c = configs.base_config()
  c.task = "classifier"
  c.data.name = "imagenet2012"
  c.data.reader = "auto"
  c.data.image_size = 256
  c.data.channels = 3
  c.data.resize = "resize_crop"
  c.data.random_flip = True
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.batch_size = 256
  c.data.eval_batch_size = 250
  c.data.num_workers = 16

  c.model.name = "classifier"
  c.model.channels = 64  # first stage; doubles at every stage
  c.model.num_blocks = 4  # stages
  c.model.num_res_blocks = 2  # residual blocks per stage
  c.classifier.num_classes = 1000
  # No smoothing: rejection sampling thresholds the predicted probability, and smoothed
  # targets would cap it near 1 - label_smoothing.
  c.classifier.label_smoothing = 0.0
  c.classifier.stem_stride = 4  # 256 -> 64x64 before the first stage

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 25_000  # 5 epochs of 5k steps
  c.optim.schedule = "cosine"
  c.optim.grad_clip = 1.0
  c.train.steps = 450_000

  c.ckpt.every_steps = 10_000
  c.log.every_steps = 100
  c.log.eval_every_steps = 25_000
  c.log.image_every_steps = 0  # a classifier has no image grid

  return configs.apply_variant(c, arg, {"smoke": _smoke})
