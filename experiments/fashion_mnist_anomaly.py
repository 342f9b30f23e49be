"""Anomaly detection, stage 1: a small VQ-VAE-2 trained on Fashion-MNIST without class 8 ("bag").

Run (stage 1, its codes, one unconditional prior per level, then every score):
  python -m vqjax.train --config experiments/fashion_mnist_anomaly.py --workdir /tmp/anom/stage1
  python -m vqjax.extract_codes --workdir /tmp/anom/stage1 --out /tmp/anom/codes
  python -m vqjax.train --config experiments/fashion_mnist_anomaly_prior.py \
      --config.data.codes_dir=/tmp/anom/codes --workdir /tmp/anom/prior_top
  python -m vqjax.train --config experiments/fashion_mnist_anomaly_prior.py:bottom \
      --config.data.codes_dir=/tmp/anom/codes --workdir /tmp/anom/prior_bottom
  python -m vqjax.anomaly --workdir /tmp/anom/stage1 \
      --priors /tmp/anom/prior_top,/tmp/anom/prior_bottom --score nll
The last command reads the whole test split, calls bags anomalous and the other nine classes
normal, and writes anomaly.json (ROC AUC, true and false positive rates of every score) and
anomaly.png (inputs, reconstructions, restorations and maps) into the stage-1 workdir.

This is the leave-one-out setting of `benchmarks/anomaly.py` for class 8, and the same small
model the benchmark trains for every class: top codes 4x4, bottom codes 8x8 (4x4 pixels each),
64 codes of 16 dimensions per level, 32 channels, 300 steps of 64 images. The train split keeps
its 54,000 non-bag images. The measured figures are in benchmarks/RESULTS.md (anomaly section).
`:smoke` runs one step in seconds.
"""

import ml_collections

from vqjax import configs

ANOMALY_LABELS = (8,)  # Fashion-MNIST "bag"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The anomaly benchmark's stage 1 without `ANOMALY_LABELS`; `arg="smoke"`: one CPU step."""
  c = configs.load_experiment("fashion_mnist")
  c.data.exclude_labels = ANOMALY_LABELS
  c.model.update(channels=32, res_channels=16, num_res_blocks=1, first_stride=4, level_stride=2)
  c.vq.update(num_codes=64, code_dim=16)
  c.data.update(batch_size=64, eval_batch_size=500, eval_split="test")
  c.optim.update(lr=2e-3, warmup_steps=50)
  c.train.steps = 300
  c.ckpt.every_steps = 300
  # One eval, at the end; no image grids (the anomaly CLI draws its own figure).
  c.log.update(every_steps=100, eval_every_steps=0, image_every_steps=0)
  c.seed = 0
  return configs.apply_variant(c, arg, {"smoke": _smoke})


def _smoke(c: ml_collections.ConfigDict) -> None:
  configs.shrink_for_smoke(c)
  c.model.update(first_stride=4, level_stride=2)
