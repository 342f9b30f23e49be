"""The one config schema every experiment starts from.

Experiments in `experiments/` call `base_config()` and change fields; they never add top-level
keys, so a misspelled override (`--config.optim.lrr=1`) fails instead of being ignored.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the default config with every field a run may set."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "autoencoder"  # the step functions used by the trainer (training/steps.py)

  # --- data -------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"  # tfds catalogue name, "fashion_mnist", or "folder"
  c.data.reader = "auto"  # "auto" | "grain" (tfds.data_source) | "tfdata" (tfds.load) | "local"
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
  c.data.num_workers = 0  # reader threads (grain prefetch threads for tfds data); 0 = none
  c.data.download = False  # tfds may download when True (never in tests)

  # --- model ------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = "vqvae2"  # "vqvae" | "vqvae2" (see models/registry.py)
  c.model.channels = 128  # hidden channels of encoders and decoders
  c.model.res_channels = 32
  c.model.num_res_blocks = 2
  c.model.levels = 2  # vqvae2: number of levels (2 = top + bottom, 3 for FFHQ-1024)
  c.model.first_stride = 4  # vqvae2: stride of the first (bottom) encoder, 2 or 4
  c.model.level_stride = 2  # vqvae2: stride between consecutive levels
  c.model.downsample = 2  # vqvae: number of stride-2 convs (2 -> /4)
  c.model.upconv_impl = "subpixel"  # transposed convs: "subpixel" or "lax" (same function)
  c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16"
  c.model.param_dtype = "float32"

  # --- vector quantizer -------------------------------------------------------------------
  c.vq = ml_collections.ConfigDict()
  c.vq.kind = "vq"  # "vq" (nearest codeword) | "gumbel" (Gumbel-softmax, models/gumbel.py)
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
  c.vq.stats_impl = "onehot"  # per-code counts/sums: "onehot" (faster on GPU) or "scatter"

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
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns an experiment config into a one-step CPU run of a tiny model on 64 local
  Fashion-MNIST images (padded to 32x32, in the experiment's channel count); no download.

  Experiments call this for their `:smoke` variant, then adjust what their model needs
  (e.g. strides that fit 32x32 images).
  """
  c.data.update(name="fashion_mnist", reader="local", image_size=32, resize="pad",
                random_flip=False, train_split="train[:64]", eval_split="test[:16]",
                batch_size=8, eval_batch_size=8, num_workers=0)
  c.model.update(channels=16, res_channels=8, dtype="float32")
  c.vq.update(num_codes=32, code_dim=8)
  c.optim.warmup_steps = 0
  c.train.steps = 1
  c.log.update(every_steps=1, eval_batches=1, num_images=8)
  return c
