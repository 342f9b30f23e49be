"""The quickstart pipeline: Fashion-MNIST from images to evaluated samples in one command.

  python -m vqjax.pipeline --workdir workdirs/quickstart
  python -m vqjax.pipeline --config experiments/pipelines/fashion_mnist.py:smoke --workdir /tmp/q

Stages (each a run of its own under the workdir, skipped when complete, so the command resumes):
stage 1 (experiments/fashion_mnist.py, fewer steps), code extraction, the top and bottom
PixelSNAIL priors (fashion_mnist_prior_top.py / _bottom.py, fewer steps), the rejection
classifier (classifier_fashion_mnist.py, fewer steps), 64 samples without and with classifier
rejection, and the evaluation (stage-1 reconstruction and code usage, sample quality with and
without rejection, the temperature and rejection-threshold trade-offs). Every stage config can
be changed from the command line: `--config.stage1.train.steps=1200`,
`--config.sample.threshold=0.95`. The step counts are chosen to fit about 15 minutes on 2 CPU
cores; the single-stage experiments train longer (see their docstrings).

`:smoke` runs every stage for one step on 64 images (the tests run it end to end). `:long`
(about 45 minutes) has priors of the PyTorch reference's width.
"""

import ml_collections

from vqjax import configs, errors


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pipeline config; `arg="smoke"` shrinks every stage to one CPU step."""
  variant = ":smoke" if arg == "smoke" else ""
  if arg not in (None, "", "smoke", "long"):
    raise errors.UserError(f"unknown variant {arg!r}; known variants: smoke, long")
  c = ml_collections.ConfigDict()
  c.stage1 = configs.load_experiment("fashion_mnist" + variant)
  c.prior_top = configs.load_experiment("fashion_mnist_prior_top" + variant)
  c.prior_bottom = configs.load_experiment("fashion_mnist_prior_bottom" + variant)
  c.classifier = configs.load_experiment("classifier_fashion_mnist" + variant)
  # The evaluation network: the one vqjax ships (vqjax/evaluation/networks/), else trained
  # once with this config and cached (~/.cache/vqjax/features/fashion_mnist, or $VQJAX_CACHE),
  # shared by every pipeline; never the rejection classifier.
  c.features = configs.load_experiment("features_fashion_mnist" + variant)

  c.sample = ml_collections.ConfigDict()
  c.sample.num = 64  # images in each grid (samples.png, and with rejection)
  c.sample.seed = 0
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.threshold = 0.8  # classifier rejection: the least probability of the label kept
  # The rejection budget: at most ceil(num / min_acceptance) samples (here 20 batches of `num`)
  # are generated to fill the grid; below this acceptance rate the stage stops with an error.
  c.sample.min_acceptance = 0.05

  c.evaluate = ml_collections.ConfigDict()
  # Where the evaluation network is trained / read: "" = the shipped one, else the shared
  # cache; a relative path is inside the pipeline workdir.
  c.evaluate.features_dir = ""
  c.evaluate.num_samples = 500  # unfiltered samples the quality numbers are computed on
  c.evaluate.max_real = 10000  # real test images they are compared with
  c.evaluate.temperatures = [0.7, 0.85, 1.0]  # the quality / diversity trade-off
  c.evaluate.temperature_samples = 250  # samples per temperature
  c.evaluate.thresholds = [0.5, 0.7, 0.8, 0.9]  # the rejection trade-off

  if arg == "smoke":
    # Untrained, the classifier gives every class about 0.1 (some always less), and every slot
    # of the grid must pass: a threshold each class reaches, 2 batches of 8 at most.
    c.sample.update(num=8, min_acceptance=0.5, threshold=0.01)
    c.evaluate.update(
      features_dir="features",  # the smoke network stays inside the workdir
      num_samples=16,
      max_real=16,
      temperatures=[0.8, 1.0],
      temperature_samples=8,
      thresholds=[0.1, 0.5],
    )
    return c
  # Every stage evaluates once, at its end (the report reads those numbers).
  for name in ("stage1", "prior_top", "prior_bottom", "classifier"):
    c[name].log.eval_every_steps = 0
  # The quickstart: about 15 minutes on 2 CPU cores (benchmarks/RESULTS.md, the lever study).
  # Code maps of 4x4 (top) and 8x8 (bottom) codes; both priors attend over their maps.
  c.stage1.train.steps = 1000
  c.stage1.log.image_every_steps = 1000
  c.prior_top.train.steps = 800
  # The bottom prior draws most of the image, and steps are its lever: 800 -> 1200 steps gave
  # held-out 3.42 -> 3.25 bits per code, FD 0.95x -> 0.72x the blurred images' and CAS 0.77 ->
  # 0.82, where 1600 top-prior steps moved neither (the lever study in benchmarks/RESULTS.md).
  c.prior_bottom.train.steps = 1200
  c.prior_bottom.model.attention = True
  # Neither prior sees its codes twice in so few steps (1200 x 64 maps, 60,000 training
  # images): dropout only slowed them (800 steps, dropout 0.1 -> 0: 3.42 -> 3.38 bits, top
  # 3.04 -> 3.02).
  for name in ("prior_top", "prior_bottom"):
    c[name].model.dropout = 0.0
  # Conditioned on the label too, the bottom prior's samples follow their labels (CAS 0.53 ->
  # 0.75 at temperature 1).
  c.prior_bottom.prior.update(class_conditional=True, num_classes=10)
  # Temperature 0.85: FD 0.90x the blurred images' instead of 1.06x at 1.0, every class 6-14%
  # of the samples (800-step priors; the lever study in benchmarks/RESULTS.md).
  c.sample.temperature = 0.85
  # A stronger rejection classifier than 500 steps (82%), at a threshold every class reaches:
  # a confident but weak classifier keeps only the easy classes.
  c.classifier.train.steps = 1000
  c.sample.threshold = 0.6
  if arg == "long":
    # About 40 minutes on 2 shared cores: priors of the PyTorch reference's width (128 channels);
    # their samples: FD 0.54x the blurred images', CAS 0.85 (benchmarks/RESULTS.md).
    for name in ("prior_top", "prior_bottom"):
      c[name].model.update(channels=128, res_channels=128)
  return c
