"""A/B timing of one experiment's train step under several config overrides, in one process.

Each variant is a space-separated list of "group.field=value" overrides ("" = the config as
is) and "xla.OPTION=value" XLA options for that variant's executable alone (XLA's debug
options, as in XLA_FLAGS without the dashes: `xla.xla_cpu_use_fusion_emitters=false`; values
true/false, integers and other text), which a process-wide XLA_FLAGS cannot compare in one
run. Every variant's step (the exact `trainer.jit_train_step` of `benchmarks/train_step.py`) is
built and compiled first; then the variants are timed in turn, `--rounds` times over, and the
best round of each is kept. Interleaving makes the comparison fair on a machine whose speed
drifts (a shared CPU, a GPU warming up), which separate processes are not:

  python benchmarks/variants.py --config experiments/fashion_mnist.py:reference \\
      --dtype float32 --variant "" --variant "model.upconv_impl=subpixel model.downconv_impl=lax"
  python benchmarks/variants.py --config vqvae2_imagenet --dtype bfloat16 --variant "" \\
      --variant "model.upconv_impl=adjoint" --variant "vq.distance_impl=pallas"

With `--baseline-dir CLONE` (a clone of rosinality/vq-vae-2-pytorch, as `suite.py` takes) the
reference's train step of the same workload (its VQ-VAE-2 or PixelSNAIL at the config's sizes)
is timed in the same rounds, interleaved with the variants, and every row gets its ratio to it.

Prints one JSON line per variant (img/s or sample/s, ms/step, the ratio to the first variant,
compile time; a variant that fails to build or compile gets a "failed" line and the rest
go on) and checks that every variant's loss after the same warm-up steps matches the
first one's to 1e-3 relative (the forms are the same function; a larger gap is reported).
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import baseline_torch
import jax
import train_step

from vqjax import errors
from vqjax.training import trainer


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
  at_least = train_step.at_least
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/vqvae2_imagenet.py")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=at_least(0), default=0, help="global batch (0 = the config's)")
  p.add_argument("--variant", action="append", default=[], help="overrides; repeat per variant")
  p.add_argument("--steps", type=at_least(1), default=3, help="steps per timed round")
  p.add_argument("--rounds", type=at_least(1), default=5)
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  p.add_argument("--baseline-dir", default="", help="a clone of rosinality/vq-vae-2-pytorch")
  p.add_argument("--set", action="append", default=[], help="override applied to every variant")
  a = p.parse_args(argv)
  if len(a.variant) < 1:
    p.error('give at least one --variant ("" for the config as it is)')
  return a


def main(argv: Sequence[str] | None = None) -> list[dict]:
  a = parse(argv)
  if a.baseline_dir:
    # Torch shares the accelerator: JAX must not take most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  trainer.setup_compilation_cache(a.cache)

  # Every variant's overrides are checked before the first compiles (UserError: raised).
  built = []
  for variant in a.variant:
    # (flag, token): an error names the flag its token came from.
    tokens = [*(("--set", t) for t in a.set), *(("--variant", t) for t in variant.split())]
    options = compiler_options([t for t in tokens if t[1].startswith("xla.")])
    overrides = [t for t in tokens if not t[1].startswith("xla.")]
    built.append((variant, train_step.load_config(a.config, a.dtype, overrides), options))

  benches, compile_s, losses, variants = [], [], [], []
  for variant, config, options in built:
    try:
      b = train_step.setup(config, a.batch)
      seconds = train_step.compile_step(b, options)
      for _ in range(2):  # the codebook init runs in the first step
        jax.block_until_ready(train_step.run_step(b))
    except Exception as e:  # noqa: BLE001 -- a form this backend rejects: report, go on
      first = (str(e).strip().splitlines() or [""])[0][:300]
      print(json.dumps({"variant": variant, "failed": f"{type(e).__name__}: {first}"}))
      continue
    print(f"variants: {variant!r} compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    compile_s.append(seconds)
    losses.append(float(b.metrics["loss"]))
    benches.append(b)
    variants.append(variant)
  if not benches:
    raise errors.UserError("every variant failed to build or compile")

  reference = _reference(a, benches[0]) if a.baseline_dir else None
  best = [float("inf")] * len(benches)
  ref_best = float("inf")
  for _ in range(a.rounds):
    for i, b in enumerate(benches):
      t0 = time.perf_counter()
      for _ in range(a.steps):
        train_step.run_step(b)
      jax.block_until_ready(b.metrics)
      best[i] = min(best[i], (time.perf_counter() - t0) / a.steps)
    if reference is not None:
      ref_best = min(ref_best, reference[0].timed(reference[1], a.steps, warmup=0))

  item = "img/s" if "image" in benches[0].batch else "sample/s"
  rows = []
  for i, (variant, b) in enumerate(zip(variants, benches, strict=True)):
    gap = abs(losses[i] - losses[0]) / max(abs(losses[0]), 1e-12)
    row = {
      "config": a.config,
      "variant": variant,
      "dtype": a.dtype,
      "batch": b.batch_size,
      item: round(b.batch_size / best[i], 1),
      "ms_per_step": round(1000 * best[i], 2),
      "vs_first": round(best[0] / best[i], 3),
      "compile_s": round(compile_s[i], 2),
      "loss": losses[i],
      "loss_matches_first": gap <= 1e-3,
      **({"vs_reference": round(ref_best / best[i], 3)} if reference else {}),
      "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(),
      "jax": jax.__version__,
    }
    print(json.dumps(row), flush=True)
    rows.append(row)
  if reference is not None:
    ref_row = {
      "config": a.config,
      "variant": baseline_torch.REFERENCE,
      "dtype": "float32",
      "precision": reference[0].precision,
      "batch": benches[0].batch_size,
      item: round(benches[0].batch_size / ref_best, 1),
      "ms_per_step": round(1000 * ref_best, 2),
      "device": reference[0].device_kind,
      "torch": reference[0].version,
    }
    print(json.dumps(ref_row), flush=True)
    rows.append(ref_row)
  mismatched = [r["variant"] for r in rows if not r.get("loss_matches_first", True)]
  if mismatched:
    print(f"variants: loss differs from the first variant's for {mismatched}", file=sys.stderr)
  return rows


def compiler_options(tokens: Sequence[str | tuple[str, str]]) -> dict[str, bool | int | str]:
  """{"xla_...": value} from "xla.OPTION=value" tokens, each alone or as (flag, token) with the
  command-line flag it came from; UserError (naming the flag) for a malformed one."""
  options = {}
  for item in tokens:
    flag, token = ("", item) if isinstance(item, str) else (f"{item[0]} ", item[1])
    name, sep, value = token.removeprefix("xla.").partition("=")
    if not sep or not name.startswith("xla_"):
      raise errors.UserError(f"{flag}{token!r}: an XLA option is given as xla.xla_OPTION=value")
    if value.lower() in ("true", "false"):
      options[name] = value.lower() == "true"
    else:
      try:
        options[name] = int(value)
      except ValueError:
        options[name] = value
  return options


def _reference(a: argparse.Namespace, b: train_step.Bench):
  """(Baseline, its train closure) for the workload of `b`, warmed up; None (said on stderr)
  when the reference cannot run it."""
  try:
    base = baseline_torch.Baseline(a.baseline_dir, jax.default_backend())
  except baseline_torch.Unavailable as e:
    print(f"variants: no {baseline_torch.REFERENCE} row: {e}", file=sys.stderr)
    return None
  config = b.config
  if "image" in b.batch:
    kwargs = baseline_torch.vqvae_kwargs(config)
    if kwargs is None:
      print("variants: the reference has no model of this architecture", file=sys.stderr)
      return None
    fn = base.stage1_fns(kwargs, b.batch_size, b.batch["image"].shape[1])[0]
  else:
    shapes, level = config.prior.code_shapes, config.prior.level
    kwargs = baseline_torch.pixelsnail_kwargs(config.model, config.vq.num_codes, shapes[level])
    fn = base.prior_fn(kwargs, b.batch_size, tuple(shapes[level - 1]) if level else None)
  t0 = time.perf_counter()
  base.timed(fn, 1, warmup=2)  # cuDNN's algorithm search and the allocator, untimed
  seconds = time.perf_counter() - t0
  print(f"variants: {baseline_torch.REFERENCE} warmed up in {seconds:.1f} s", file=sys.stderr)
  return base, fn


if __name__ == "__main__":
  with errors.one_line("variants"):
    main()
