"""Times full-recompute (naive) and incremental (cached) sampling of both priors, synthetic weights.

Two code levels as in VQ-VAE-2: a top prior (class-conditional) and a bottom prior conditioned on
random top codes. The default sizes are the Fashion-MNIST quickstart's PixelSNAIL priors
(experiments/fashion_mnist_prior_top.py: 8x8, attention; fashion_mnist_prior_bottom.py: 16x16,
conditioned on the top; K=128) and a Gated PixelCNN of experiments/pixelcnn_cifar10.py's network
(15 layers, 128 channels, k=5) over the same maps; `--rosinality` takes rosinality's ImageNet
sizes (experiments/pixelsnail_{top,bottom}_imagenet.py: 32x32 with attention, 64x64, K=512), for
an accelerator:

  python benchmarks/sampling.py                      # quickstart sizes, every prior and sampler
  python benchmarks/sampling.py --prior pixelcnn --level top --batch 4
  python benchmarks/sampling.py --rosinality --dtype bfloat16 --batch 32

Each figure is the best of `--repeats` calls after a first call that compiles (its time is
printed too). A naive sampler over a map of more than `--naive-max-positions` positions is not
run: its time is estimated as H * W timed full forwards (the work it does), marked "estimated".
Prints one row per figure: prior, level, sampler, batch, map size, seconds, first call, device.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from arguments import at_least

from vqjax import _cli
from vqjax.models.pixelcnn import GatedPixelCNN
from vqjax.models.pixelsnail import PixelSNAIL
from vqjax.sampling import cached, naive

NUM_CLASSES = 10


def network_sizes(a) -> dict:
  """Map sides and networks of the top and bottom priors."""
  if a.rosinality:
    sides = {"top": 32, "bottom": 64}
    snail = dict(
      channels=256, res_channels=256, kernel_size=5, num_blocks=4, num_res_blocks=4, num_heads=8
    )
    cond = dict(num_cond_res_blocks=3, cond_res_channels=256)
  else:
    sides = {"top": 8, "bottom": 16}
    snail = dict(
      channels=64, res_channels=64, kernel_size=3, num_blocks=2, num_res_blocks=2, num_heads=4
    )
    cond = dict(num_cond_res_blocks=2, cond_res_channels=64)
  pixelcnn = dict(channels=a.pixelcnn_channels, num_layers=a.pixelcnn_layers, kernel_size=5)
  return dict(sides=sides, snail=snail, snail_cond=cond, pixelcnn=pixelcnn)


def build(prior: str, level: str, a) -> tuple:
  """(model, shape, condition or None, label or None) of one prior at one level."""
  sizes = network_sizes(a)
  sides = {"top": a.top_side, "bottom": a.bottom_side}
  sides = {name: given or sizes["sides"][name] for name, given in sides.items()}
  side, top_side = sides[level], sides["top"]
  kw = dict(num_codes=a.num_codes, dtype=jnp.dtype(a.dtype))
  rng = np.random.default_rng(0)
  condition = label = None
  if level == "top":
    label = jnp.asarray(rng.integers(0, NUM_CLASSES, (a.batch,)), jnp.int32)
  else:
    condition = (
      jnp.asarray(rng.integers(0, a.num_codes, (a.batch, top_side, top_side)), jnp.int32),
    )
  if prior == "pixelsnail":
    extra = (
      dict(attention=True, num_classes=NUM_CLASSES)
      if level == "top"
      else dict(attention=False, **sizes["snail_cond"])
    )
    model = PixelSNAIL(shape=(side, side), dropout=0.0, **sizes["snail"], **extra, **kw)
  else:
    extra = (
      dict(num_classes=NUM_CLASSES) if level == "top" else dict(cond_channels=a.pixelcnn_channels)
    )
    model = GatedPixelCNN(**sizes["pixelcnn"], **extra, **kw)
  return model, (side, side), condition, label


def random_variables(model, shape, condition, label, batch: int):
  """Variables of the model's shapes filled with scaled normal draws (no init compile)."""
  codes = jnp.zeros((batch, *shape), jnp.int32)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), codes, condition=condition, label=label)
  )
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "weight_g" in name:
      x = rng.uniform(0.5, 1.0, leaf.shape)
    elif "kernel" in name or "weight_v" in name:
      x = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(best seconds of `repeats` calls, seconds of the first call, which compiles)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best, first


def run(prior: str, level: str, sampler: str, a) -> dict:
  """One figure: the time of sampling a batch of one level with one sampler."""
  model, shape, condition, label = build(prior, level, a)
  variables = random_variables(model, shape, condition, label, a.batch)
  rng = jax.random.key(0)
  positions = shape[0] * shape[1]
  note = ""
  if sampler == "naive" and positions > a.naive_max_positions:
    codes = jnp.zeros((a.batch, *shape), jnp.int32)
    forward = jax.jit(lambda v, c: model.apply(v, c, condition=condition, label=label))
    best, first = _timed(lambda: forward(variables, codes), a.repeats)
    # What the naive sampler does, H * W forwards; the first call is the forward's own.
    best, note = best * positions, f"estimated: {positions} x one full forward"
  else:
    module = naive if sampler == "naive" else cached
    best, first = _timed(
      lambda: module.sample(
        model, variables, a.batch, shape, rng, condition=condition, label=label
      ),
      a.repeats,
    )
  return dict(
    prior=prior,
    level=level,
    sampler=sampler,
    batch=a.batch,
    map=f"{shape[0]}x{shape[1]}",
    seconds=best,
    first_call=first,
    device=jax.devices()[0].device_kind,
    note=note,
  )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  """The options `run` reads, from command-line words (`benchmarks/suite.py` passes its own)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--prior", choices=["pixelsnail", "pixelcnn", "both"], default="both")
  p.add_argument("--level", choices=["top", "bottom", "both"], default="both")
  p.add_argument("--sampler", choices=["naive", "cached", "both"], default="both")
  p.add_argument("--batch", type=at_least(1), default=8)
  p.add_argument("--repeats", type=at_least(1), default=2, help="timed calls after the first")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--rosinality", action="store_true", help="rosinality's ImageNet sizes (GPU)")
  p.add_argument("--num-codes", type=at_least(0), default=0, help="K (0: 128, 512 rosinality)")
  p.add_argument("--top-side", type=at_least(0), default=0, help="side of the top map (0: default)")
  p.add_argument("--bottom-side", type=at_least(0), default=0, help="bottom map side (0: default)")
  p.add_argument("--pixelcnn-layers", type=at_least(1), default=15)
  p.add_argument("--pixelcnn-channels", type=at_least(1), default=128)
  p.add_argument("--naive-max-positions", type=at_least(0), default=256)
  a = p.parse_args(argv)
  a.num_codes = a.num_codes or (512 if a.rosinality else 128)
  return a


def main(argv: list[str] | None = None) -> None:
  a = parse(argv)
  _cli.set_cpu_xla_flag()  # XLA:CPU's convolution kernels, as the vqjax programs pick them
  both = lambda x, pair: list(pair) if x == "both" else [x]
  columns = ["prior", "level", "sampler", "batch", "map", "seconds", "first_call", "device"]
  print(" ".join(f"{c:>10}" for c in columns), "note", flush=True)
  for prior in both(a.prior, ("pixelsnail", "pixelcnn")):
    for level in both(a.level, ("top", "bottom")):
      for sampler in both(a.sampler, ("naive", "cached")):
        row = run(prior, level, sampler, a)
        cells = [
          f"{row[c]:>10.3f}" if isinstance(row[c], float) else f"{row[c]:>10}" for c in columns
        ]
        print(" ".join(cells), row["note"], flush=True)


if __name__ == "__main__":
  main()
