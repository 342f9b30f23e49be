"""Anomaly detection, stage 2: an unconditional PixelSNAIL over one level of the codes of
`experiments/fashion_mnist_anomaly.py` (default the top 4x4 codes; `:bottom` the 8x8 ones,
conditioned on the top codes).

Run after the stage 1 and its code extraction (commands in fashion_mnist_anomaly.py):
  python -m vqjax.train --config experiments/fashion_mnist_anomaly_prior.py \
      --config.data.codes_dir=/tmp/anom/codes --workdir /tmp/anom/prior_top
Unconditional, because an image to screen has no label. Small, as `benchmarks/anomaly.py`
trains one per level for every class: 32 channels, the top with 2 PixelBlocks and causal
attention (2 heads), the bottom with 1 PixelBlock and a 1-block conditioning stack, 300 steps
of 64 maps each. `:smoke` and `:bottom_smoke` run one CPU step on synthetic codes.

`:rotation` and `:bottom_rotation` are the rotation priors of the `rotation` anomaly score
(vqjax/evaluation/rotation.py): the same models conditioned on the number of quarter turns,
trained 600 steps on `python -m vqjax.extract_codes --rotations 4` codes (four maps an image):
  python -m vqjax.extract_codes --workdir /tmp/anom/stage1 --out /tmp/anom/codes_rotated \
      --rotations 4
  python -m vqjax.train --config experiments/fashion_mnist_anomaly_prior.py:rotation \
      --config.data.codes_dir=/tmp/anom/codes_rotated --workdir /tmp/anom/rotation_top
"""

import ml_collections

from vqjax import configs
from vqjax.evaluation import rotation

NUM_CODES = 64  # the stage-1 codebook size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The top prior; variants "bottom", "rotation", "bottom_rotation", "smoke" (top) and
  "bottom_smoke"."""
  c = configs.prior_config("workdirs/fashion_mnist_anomaly_codes", level=0, model="pixelsnail")
  c.vq.num_codes = NUM_CODES
  c.model.update(
    channels=32,
    res_channels=32,
    kernel_size=3,
    num_blocks=2,
    num_res_blocks=2,
    attention=True,
    num_heads=2,
    dropout=0.1,
  )
  c.data.update(batch_size=64, eval_batch_size=500)
  c.optim.update(lr=2e-3, warmup_steps=50, schedule="cosine")
  c.train.steps = 300
  c.ckpt.every_steps = 300
  c.log.update(every_steps=100, eval_every_steps=0)
  c.seed = 0
  variants = {
    "bottom": _bottom,
    "rotation": _rotation,
    "bottom_rotation": lambda c: _rotation(_bottom(c)),
    "smoke": configs.shrink_prior_for_smoke,
    "bottom_smoke": lambda c: configs.shrink_prior_for_smoke(_bottom(c)),
  }
  return configs.apply_variant(c, arg, variants)


def _bottom(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.prior.level = 1
  c.model.update(num_blocks=1, attention=False, num_cond_res_blocks=1, cond_res_channels=32)
  return c


def _rotation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.prior.update(class_conditional=True, num_classes=rotation.ROTATIONS)
  c.train.steps = c.ckpt.every_steps = 600  # four rotated maps of every image: twice the steps
  return c
