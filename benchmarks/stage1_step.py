"""Times the VQ-VAE-2 stage-1 training step and forward pass on synthetic images.

The model is the VQ-VAE-2 of the paper / the common PyTorch re-implementation (channel 128,
2 residual blocks of 32 channels, 64-dim codes, K=512 per level, EMA codebooks), trained with
Adam on MSE + 0.25 * commitment. Only jax, flax and optax are needed, so it runs on machines
without the data or config stack.

  python benchmarks/stage1_step.py --size 256 --batch 128 --dtypes float32,bfloat16

Prints one JSON line per configuration: img/s for the training step and for reconstruction
(forward only), compile time and peak device memory.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

from vqjax.models.hierarchy import VQVAE2


def build(dtype, upconv_impl, codebook_init, stats_impl):
  return VQVAE2(
      out_channels=3, channels=128, res_channels=32, num_res_blocks=2, levels=2,
      quantizer=dict(num_codes=512, code_dim=64, codebook_init=codebook_init, restart_after=100,
                     stats_impl=stats_impl),
      upconv_impl=upconv_impl, dtype=dtype,
  )


def peak_memory_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def time_fn(fn, args, steps, carry_first=False):
  """Runs fn `steps` times after one warm-up call; returns (seconds per call, compile s)."""
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    if carry_first:
      out = fn(out[0], *args[1:])
    else:
      out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps, compile_s


def bench(size, batch, dtype_name, upconv_impl, steps, codebook_init, stats_impl):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  model = build(dtype, upconv_impl, codebook_init, stats_impl)
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)({"params": jax.random.key(1)}, x)
  tx = optax.adam(3e-4)
  state = (variables["params"], variables["vq_state"], tx.init(variables["params"]))

  def train_step(state, x, rng):
    params, vq_state, opt_state = state

    def loss_fn(params):
      (_, aux), upd = model.apply(
          {"params": params, "vq_state": vq_state}, x, train=True, rngs={"vq": rng},
          mutable=["vq_state"],
      )
      return aux["loss"], (aux, upd["vq_state"])

    (loss, (aux, vq_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, vq_state, opt_state), loss

  step = jax.jit(train_step, donate_argnums=0)
  rng = jax.random.key(2)
  step_s, step_compile = time_fn(step, (state, x, rng), steps, carry_first=True)
  # The donated state was consumed; rebuild variables for the forward pass.
  variables = jax.jit(model.init)({"params": jax.random.key(1)}, x)
  recon = jax.jit(lambda v, x: model.apply(v, x)[0])
  fwd_s, fwd_compile = time_fn(recon, (variables, x), steps)
  return {
      "size": size, "batch": batch, "dtype": dtype_name, "upconv": upconv_impl,
      "stats": stats_impl,
      "train_img_s": round(batch / step_s, 1), "train_ms": round(1000 * step_s, 2),
      "recon_img_s": round(batch / fwd_s, 1), "compile_train_s": round(step_compile, 2),
      "compile_recon_s": round(fwd_compile, 2), "peak_mem_gib": round(peak_memory_gib(), 2),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--upconv", default="subpixel", help="comma list of subpixel,lax")
  p.add_argument("--init", default="kmeans++", help="codebook init (kmeans++ or normal)")
  p.add_argument("--stats", default="scatter", help="comma list of scatter,onehot")
  p.add_argument("--steps", type=int, default=20)
  a = p.parse_args()
  for dtype in a.dtypes.split(","):
    for impl in a.upconv.split(","):
      for stats in a.stats.split(","):
        r = bench(a.size, a.batch, dtype, impl, a.steps, a.init, stats)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
