"""The one config schema every experiment starts from, and the loader of experiments.

Experiments in `experiments/` call `base_config()` and change fields; they never add top-level
keys, so a misspelled override (`--config.optim.lrr=1`) fails instead of being ignored.
`load_experiment("fashion_mnist:smoke")` loads one the way `python -m vqjax.train --config`
does. The checks of a config's values, and the reading of a saved one, are in
`vqjax/config_checks.py` (`validate`, `read_config`).
"""

import importlib.util
import os
import textwrap
from collections.abc import Callable, Mapping

import ml_collections

from vqjax import errors

# The repository's experiments/, next to the vqjax package (an editable install or a checkout).
EXPERIMENTS_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)


def base_config() -> ml_collections.ConfigDict:
  """Returns the default config with every field a run may set."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What is trained (training/tasks.py): "autoencoder" (stage 1), "prior" (stage 2) or
  # "classifier" (for rejection sampling and evaluation features).
  c.task = "autoencoder"
  # The evaluators (training/evaluators.py registry) the trainer runs every
  # log.eval_every_steps and vqjax.evaluate runs on the saved run; () = the task's own.
  c.evals = ()

  # --- data -------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"  # tfds name, or fashion_mnist, folder, codes, prepared
  # "auto" (resolved once per run and recorded) | "grain" (tfds.data_source) | "tfdata"
  # (tfds.load) | "local" (Fashion-MNIST idx files, in-memory sources) | "folder"
  c.data.reader = "auto"
  c.data.data_dir = ""  # tfds data dir; "" = the tfds default (or ~/.cache/vqjax for local data)
  c.data.folder = ""  # image folder for name="folder"
  c.data.local_dir = "/usr/share/datasets/fashion-mnist"  # Debian's Fashion-MNIST idx files
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32  # square output size; images are resized / cropped / padded to it
  c.data.channels = 1
  c.data.resize = "pad"  # "pad" (centre-pad, for 28->32), "resize_crop", "center_crop"
  c.data.random_flip = False
  c.data.batch_size = 128  # global batch, split over processes and devices
  c.data.eval_batch_size = 256
  c.data.num_workers = 0  # read/decode threads (grain), tf.data parallel calls; 0 = none
  # grain readers: read and decode batches in this many worker processes (each with
  # num_workers threads; batches return through shared memory), free of the trainer's GIL;
  # 0 = in the trainer's process. Same batches and resume point for every count.
  c.data.worker_processes = 0
  c.data.download = False  # tfds may download when True (never in tests)
  c.data.codes_dir = ""  # name="codes": the directory written by `python -m vqjax.extract_codes`
  # name="prepared": images decoded and fitted once by `python -m vqjax.prepare` (data/prepared.py)
  c.data.prepared_dir = ""
  # name="synthetic_codes": random code maps of these shapes (coarsest first) over
  # `synthetic_num_codes` codes, for smoke runs and benchmarks without a stage-1 model.
  c.data.synthetic_shapes = ml_collections.config_dict.placeholder(list)
  c.data.synthetic_num_codes = 0
  c.data.synthetic_examples = 256
  # Examples whose "label" is one of these are left out of every split (data/sources.py
  # make_source): a stage-1 model of the "normal" classes for `python -m vqjax.anomaly`. A
  # tuple, as config flags cannot override lists: --config.data.exclude_labels=9 (repeatable).
  c.data.exclude_labels = ()

  # --- model ------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  # "vqvae" | "vqvae2" (see models/registry.py), or a plugin: a registered name or an import
  # path "package.module:Name" (vqjax/plugins.py), whose settings are model.options.
  c.model.name = "vqvae2"
  c.model.channels = 128  # hidden channels of encoders and decoders
  c.model.res_channels = 32
  c.model.num_res_blocks = 2
  c.model.levels = 2  # vqvae2: number of levels (2 = top + bottom, 3 for FFHQ-1024)
  c.model.first_stride = 4  # vqvae2: stride of the first (bottom) encoder, 2 or 4
  c.model.level_stride = 2  # vqvae2: stride between consecutive levels
  c.model.downsample = 2  # vqvae: number of stride-2 convs (2 -> /4)
  # The *_impl fields and channel_multiple below pick exact alternative forms of the same
  # function; models/impl.py resolves them, "auto" to the fastest measured on the platform,
  # once when the model is built. Stride-2 convs and transposed convs (models/strided.py):
  c.model.upconv_impl = "auto"  # "auto" | "subpixel" | "lax" | "adjoint"
  c.model.downconv_impl = "auto"  # "auto" | "lax" | "adjoint"
  # Pad the image-side convolutions' channels (RGB in, RGB out) to a multiple of this with
  # zeros (0 = as they are; -1 = auto: 8 on GPUs, whose tensor cores take multiples of 8 and
  # where cuDNN otherwise pads on every call: +7.4% ImageNet-256 steps on an H100; 0 elsewhere).
  # The same function and parameters.
  c.model.channel_multiple = -1
  c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16"
  c.model.param_dtype = "float32"

  # Priors (task="prior", model.name "pixelcnn" | "pixelsnail"); channels, res_channels and
  # num_res_blocks above are shared with the autoencoders.
  c.model.kernel_size = 5  # causal conv kernel
  c.model.num_layers = 15  # pixelcnn: gated layers
  c.model.num_blocks = 4  # pixelsnail: blocks (each num_res_blocks gated residual blocks)
  c.model.attention = True  # pixelsnail: causal self-attention in every block
  c.model.num_heads = 8  # pixelsnail attention heads
  c.model.dropout = 0.0
  c.model.cond_channels = 0  # pixelcnn: channels of the coarser-codes conditioning stack
  c.model.num_cond_res_blocks = 0  # pixelsnail: conditioning residual blocks
  c.model.cond_res_channels = 0  # pixelsnail: their channels
  c.model.cond_res_kernel = 3
  c.model.num_out_res_blocks = 0  # pixelsnail: residual blocks after the last block
  # pixelsnail: recompute each block's activations in the backward pass instead of keeping
  # them (jax.checkpoint): much less memory for about a third more compute. Same function.
  c.model.remat = False
  # pixelsnail: form of the k x k causal convolutions (models/pixelsnail_layers.py): "masked"
  # (one convolution whose masked taps multiply zeros, as the reference) or "split" (two
  # convolutions that skip them: 22 of 25 taps at k = 5), or "auto" (split on GPUs: +8.8% on
  # an H200; masked elsewhere). The same function.
  c.model.causal_conv_impl = "auto"
  # A plugin model's own settings (free-form; its from_config reads and checks them). The
  # flat fields above are the built-ins': a plugin reads only name, dtype and param_dtype.
  c.model.options = ml_collections.ConfigDict()

  # --- vector quantizer -------------------------------------------------------------------
  c.vq = ml_collections.ConfigDict()
  # "vq" (nearest codeword) | "gumbel" (Gumbel-softmax, models/gumbel.py), or a plugin: a
  # registered name or an import path "package.module:Name" (vqjax/plugins.py), which reads
  # num_codes, code_dim and its own vq.options (the other fields are the built-ins').
  c.vq.kind = "vq"
  c.vq.options = ml_collections.ConfigDict()
  c.vq.num_codes = 512
  c.vq.code_dim = 64
  c.vq.beta = 0.25  # weight of the commitment term ||z - sg[e]||^2
  c.vq.ema = True  # EMA codebook (no codebook loss) or loss-trained codebook
  c.vq.decay = 0.99
  c.vq.eps = 1e-5  # Laplace smoothing of the EMA cluster sizes
  c.vq.bias_correction = False
  c.vq.init = "kmeans++"  # "normal" | "uniform" | "kmeans++" | "kmeans" (from the first batch)
  c.vq.kmeans_iters = 10
  c.vq.restart_after = 100  # re-seed codes unused for this many steps; 0 = never
  c.vq.temperature = 1.0  # gumbel only: relaxation temperature
  c.vq.kl_weight = 5e-4  # gumbel only: weight of KL(q || uniform)
  # Per-code counts/sums: "onehot" (faster on GPUs), "scatter" (faster on the CPU) or "auto".
  c.vq.stats_impl = "auto"
  # Nearest code: "xla", "pallas" (models/vq_kernel.py) or "auto" (pallas on Hopper-class GPUs
  # with bf16 matmuls, where it was measured faster; xla elsewhere).
  c.vq.distance_impl = "auto"
  # The distance and EMA-sum matmuls: "float32" (HIGHEST), "bf16" (bfloat16 models only:
  # bfloat16 matmuls whose products are exact in float32, models/quantizer.py split_bf16) or
  # "auto" (bf16 for a bfloat16 model on a GPU/TPU, float32 otherwise). Same values either way
  # up to float32 summation order.
  c.vq.matmul_impl = "auto"

  # --- prior (task="prior") ---------------------------------------------------------------
  c.prior = ml_collections.ConfigDict()
  c.prior.level = 0  # which code map is modelled: 0 = the coarsest (top); finer ones are
  #                    conditioned on every coarser map
  c.prior.class_conditional = False  # condition on data "label" too
  c.prior.num_classes = 0  # labels in [0, num_classes) when class_conditional
  # Filled from the code dataset's metadata when the run starts (and recorded with it, so a
  # trained prior can be loaded without the codes): the code-map shapes of every level,
  # coarsest first, and the image shape they encode.
  c.prior.code_shapes = ml_collections.config_dict.placeholder(list)
  c.prior.image_shape = ml_collections.config_dict.placeholder(list)
  # Filled from the code dataset too: the stage-1 run the codes were extracted from (its
  # workdir), whose decoder turns the prior's samples into images (`vqjax.sample`).
  c.prior.stage1 = ""
  # ... and its identity: the stage-1 run's id (training/identity.py) and the checkpoint step
  # the codes were extracted at (-1: not recorded). Sampling refuses a stage-1 run that is not
  # this one (--allow_mismatch to override).
  c.prior.stage1_run_id = ""
  c.prior.stage1_step = -1

  # --- classifier (task="classifier") -----------------------------------------------------
  # A residual CNN (models/classifier.py) sized by config.model: channels (first-stage width,
  # doubled at every stage), num_blocks (stages), num_res_blocks (residual blocks per stage),
  # dropout, dtype, param_dtype. For rejection sampling and the evaluation's feature space.
  c.classifier = ml_collections.ConfigDict()
  c.classifier.num_classes = 10  # logits; labels in [0, num_classes)
  c.classifier.label_smoothing = 0.0  # train targets (1 - s) one_hot + s / num_classes
  c.classifier.stem_stride = 1  # 1: 3x3 stem; k > 1: k x k stride-k patchify stem (4 at 256px)

  # --- optimiser --------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"  # "adam" | "adamw"
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"  # "constant" | "cosine" (both after a linear warmup)
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off

  # --- training loop ----------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  # Generator of the training randomness (dropout, flips, codebook restarts): "threefry"
  # (JAX's default; the same streams on any mesh) | "rbg" | "unsafe_rbg" (XLA's RngBitGenerator
  # for the bits: fewer integer operations per random number, so cheaper dropout on GPUs;
  # its streams may depend on how the arrays are sharded). A resumed run draws the same
  # randomness either way: the keys are a function of the seed and the step.
  c.train.rng_impl = "threefry"

  # --- device mesh ------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all devices not used by the other axis
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14  # parameters smaller than this stay replicated

  # --- multi-host -------------------------------------------------------------------------
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # "auto" (from the environment) | "yes" | "no"
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  # --- checkpoints ------------------------------------------------------------------------
  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 500
  c.ckpt.keep = 3
  c.ckpt.async_save = True
  c.ckpt.init_from = ""  # a workdir or checkpoint dir to start from when the workdir is empty

  # --- logs -------------------------------------------------------------------------------
  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.eval_every_steps = 500
  c.log.eval_batches = 0  # 0 = the whole eval split
  c.log.image_every_steps = 500
  c.log.num_images = 16
  c.log.tensorboard = True
  c.log.compilation_cache = ""  # directory for JAX's persistent compilation cache; "" = off
  # (start, stop): a JAX profiler trace of steps start + 1 ... stop in workdir/profile; () = off
  c.log.profile_steps = ()
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns an experiment config into a one-step CPU run of a tiny model on 64 local
  Fashion-MNIST images (padded to 32x32, in the experiment's channel count); no download.

  Experiments call this for their `:smoke` variant, then adjust what their model needs
  (e.g. strides that fit 32x32 images).
  """
  c.data.update(
    name="fashion_mnist",
    reader="local",
    image_size=32,
    resize="pad",
    random_flip=False,
    train_split="train[:64]",
    eval_split="test[:16]",
    batch_size=8,
    eval_batch_size=8,
    num_workers=0,
    worker_processes=0,
  )
  c.model.update(channels=16, res_channels=8, dtype="float32")
  c.vq.update(num_codes=32, code_dim=8)
  c.optim.warmup_steps = 0
  c.train.steps = 1
  c.log.update(every_steps=1, eval_batches=1, num_images=8)
  return c


def prior_config(codes_dir: str, level: int, model: str) -> ml_collections.ConfigDict:
  """The base of a stage-2 experiment: a `model` prior ("pixelcnn" | "pixelsnail") over level
  `level` (0 = top) of the code dataset in `codes_dir`."""
  c = base_config()
  c.task = "prior"
  c.data.name = "codes"
  c.data.codes_dir = codes_dir
  c.data.reader = "local"
  c.model.name = model
  c.prior.level = level
  return c


def shrink_prior_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a prior experiment into a one-step CPU run of a tiny prior on synthetic codes of the
  quickstart's shapes (top 4x4, bottom 8x8, 32 codes); no stage-1 run needed."""
  c.data.update(
    name="synthetic_codes",
    codes_dir="",  # read by name="codes" only
    synthetic_shapes=[[4, 4], [8, 8]],
    synthetic_num_codes=32,
    synthetic_examples=64,
    train_split="train",
    eval_split="test[:16]",
    batch_size=8,
    eval_batch_size=8,
    num_workers=0,
    worker_processes=0,
  )
  c.vq.num_codes = 32
  c.model.update(channels=16, dtype="float32")
  if c.model.name == "pixelsnail":
    c.model.update(res_channels=16, num_heads=2, num_blocks=1, num_res_blocks=1)
    if c.model.num_cond_res_blocks:
      c.model.update(num_cond_res_blocks=1, cond_res_channels=16)
  else:
    c.model.num_layers = 3
    if c.model.cond_channels:
      c.model.cond_channels = 8
  c.optim.warmup_steps = 0
  c.train.steps = 1
  c.log.update(every_steps=1, eval_batches=1)
  return c


# ---- experiments ------------------------------------------------------------------------------


def list_experiments() -> list[str]:
  """Names of the experiment configs in the repository's experiments/ directory, sorted."""
  if not os.path.isdir(EXPERIMENTS_DIR):
    return []
  return sorted(
    f[:-3] for f in os.listdir(EXPERIMENTS_DIR) if f.endswith(".py") and not f.startswith("_")
  )


def resolve_experiment(path_or_name: str) -> tuple[str, str | None]:
  """Finds the file of an experiment spec.

  Args:
    path_or_name: "experiments/x.py[:variant]" (any path to a .py file), "x.py[:variant]" or a
      bare "x[:variant]"; the last two are looked up in `EXPERIMENTS_DIR` when not a file.

  Returns:
    (absolute path of the .py file, variant or None). A file that does not exist raises
    `errors.UserError` naming the available experiments.
  """
  path, _, variant = path_or_name.partition(":")
  candidates = [path] if path.endswith(".py") else []
  if os.sep not in path and "/" not in path:
    candidates.append(os.path.join(EXPERIMENTS_DIR, path if path.endswith(".py") else path + ".py"))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate), variant or None
  available = ", ".join(list_experiments()) or f"none (no {EXPERIMENTS_DIR})"
  raise errors.UserError(f"no experiment config {path!r}; available: {available}")


def load_experiment(path_or_name: str) -> ml_collections.ConfigDict:
  """Loads an experiment config as `python -m vqjax.train --config` does, without absl flags.

  Args:
    path_or_name: see `resolve_experiment`, e.g. "experiments/fashion_mnist.py:smoke" or
      "fashion_mnist:smoke".

  Returns:
    The experiment's `get_config(variant)`, locked like the CLI's config: fields can be set,
    new fields cannot be added. A missing file or unknown variant raises `errors.UserError`.
  """
  path, variant = resolve_experiment(path_or_name)
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"vqjax_experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:  # IndentationError too: the file, line and message, in one line
    raise errors.UserError(
      f"{e.filename or path}:{e.lineno}: {type(e).__name__}: {e.msg}"
    ) from None
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except errors.UserError as e:
    raise errors.UserError(f"{name}: {e}") from e
  config.lock()
  return config


# Fields vqjax once had and no longer reads -> the default they had. A config saved before (a
# run's config.json or checkpoint record, a converted model's config.json) still loads:
# `drop_retired` removes them, whatever their value, as every value of each selected a form of
# the same function. Model fingerprints (training/checkpoint_records.py config_meta) still hash the
# default, so a run's fingerprint, recorded e.g. with its code dataset, stays the same.
RETIRED_FIELDS = {
  # "jax" | "output" | "stored" | "auto": what the ReLUs kept for the backward pass, the same
  # values and gradients in every form; the models now use jax.nn.relu (issue 22).
  "model.relu_impl": "auto",
}


def drop_retired(record: dict) -> dict:
  """A saved config (nested dicts, as JSON) without the `RETIRED_FIELDS`; the rest as it is."""
  out = dict(record)
  for field in RETIRED_FIELDS:
    group, _, name = field.partition(".")
    if isinstance(out.get(group), dict) and name in out[group]:
      out[group] = {k: v for k, v in out[group].items() if k != name}
  return out


def resolve_config_argv(argv: list[str]) -> list[str]:
  """Command-line arguments with the --config value replaced by the experiment file's path (a
  bare name is looked up in experiments/), after loading it once so that a bad file or variant
  is one `errors.UserError` line rather than a traceback from the flag parser."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg in ("--config", "-config") and i + 1 < len(out):
      i, spec = i + 1, out[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      spec = arg.partition("=")[2]
    else:
      continue
    load_experiment(spec)
    path, variant = resolve_experiment(spec)
    resolved = path + (f":{variant}" if variant else "")
    out[i] = resolved if out[i] == spec else f"--config={resolved}"
  return out


def apply_variant(
  config: ml_collections.ConfigDict,
  variant: str | None,
  variants: Mapping[str, Callable[[ml_collections.ConfigDict], object]],
) -> ml_collections.ConfigDict:
  """Applies the named variant of an experiment (the text after ":" in `--config`).

  Args:
    config: the experiment's full config, changed in place.
    variant: None or "" for the full config, else a key of `variants`.
    variants: name -> function that changes the config in place.

  Returns:
    `config`; an unknown variant raises `errors.UserError` listing the known ones.
  """
  if not variant:
    return config
  if variant not in variants:
    known = ", ".join(sorted(variants)) or "none"
    raise errors.UserError(f"unknown variant {variant!r}; known variants: {known}")
  variants[variant](config)
  return config


def summarize_fields(config: ml_collections.ConfigDict | None = None, width: int = 100) -> str:
  """Every field as `group.field=default`, one wrapped paragraph per group (for --help).

  Args:
    config: the config to describe; `base_config()` when None.
    width: line width of the text.

  Returns:
    The text, one group per paragraph.
  """
  config = base_config() if config is None else config
  groups: dict[str, list[str]] = {"": []}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      groups[key] = [f"{key}.{k}={v!r}" for k, v in value.items()]
    else:
      groups[""].append(f"{key}={value!r}")
  return "\n".join(
    textwrap.fill(
      "  ".join(items), width, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False
    )
    for items in groups.values()
    if items
  )
