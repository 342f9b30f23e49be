"""Toy tasks, configs and log readers shared by the trainer tests (test_train*.py): a task
over integer code maps with a frozen table, its evaluators and random data, the smoke configs
and CLI command lines, the readers of a run's metrics.jsonl, and what a library call must leave
as it found it."""

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging as absl_logging

from vqjax import configs
from vqjax.data import sources
from vqjax.training import evaluators, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
  not sources.fashion_mnist_files_exist(FMNIST), reason="Fashion-MNIST idx files not installed"
)


def load_config(name: str, arg: str | None = None):
  return configs.load_experiment(f"{name}:{arg}" if arg else name)


def quick(config, cache_dir):
  """Shortens a smoke config for the in-process runs (and shares compiled programs)."""
  config.log.tensorboard = True
  config.log.compilation_cache = str(cache_dir)
  config.optim.schedule = "constant"
  return config


def cli_env(num_devices: int = 8) -> dict:
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
    PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
  )
  return env


def cli(workdir, *overrides, config="experiments/fashion_mnist.py:smoke"):
  return [
    sys.executable,
    "-m",
    "vqjax.train",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def process_state() -> tuple:
  """The process-wide state a library call must leave as it found it (tests/
  test_process_state.py checks imports): `sys.unraisablehook` and the loggers' filters."""
  handlers = logging.getLogger().handlers + [absl_logging.get_absl_handler()]
  return (
    sys.unraisablehook,
    {n: list(logging.getLogger(n).filters) for n in ("", "absl", "jax._src.xla_bridge")},
    [list(h.filters) for h in handlers],
  )


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  """step -> loss; a step logged twice (before a kill and after the resume) keeps the last."""
  return {
    r["step"]: r["loss"]
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if r["split"] == "train"
  }


@evaluators.register("toy_codes")
class _CodesEvaluator(evaluators.BatchEvaluator):
  """The toy task's eval: the frozen table's mean over the codes, the mean label."""

  def sums(self, variables, batch, frozen=None):
    mask = batch["mask"]
    values = frozen["table"][batch["codes"]].sum(axis=(1, 2, 3))
    return {
      "table_sum": jnp.sum(values * mask),
      "count": jnp.sum(mask),
      "label_sum": jnp.sum(batch["label"] * mask),
    }

  def summary(self, sums):
    n = float(sums["count"])
    return {
      "table_mean": float(sums["table_sum"]) / n,
      "label_mean": float(sums["label_sum"]) / n,
      "examples": n,
    }


@evaluators.register("toy_count")
class _CountEvaluator(evaluators.BatchEvaluator):
  """How many real examples the eval split holds."""

  def sums(self, variables, batch, frozen=None):
    return {"count": jnp.sum(batch["mask"])}

  def summary(self, sums):
    return {"examples": float(sums["count"])}


class _CodesTask(tasks.Task):
  """A task over integer code maps: a linear classifier of the label from code embeddings,
  with dropout drawn from the step key, and a frozen table read by its evaluator ("toy_codes")
  and image steps."""

  evals = ("toy_codes",)
  unit = "codes"
  progress_keys = ("loss", "noise")
  config_sections = ("task",)
  K, CLASSES = 6, 3

  def __init__(self, config):
    self.tx = optax.sgd(0.1)
    self.table = np.arange(self.K * 2, dtype=np.float32).reshape(self.K, 2) / 7.0

  def dummy_batch(self):
    return {"codes": np.zeros((1, 4, 4), np.int32), "label": np.zeros((1,), np.int32)}

  def init(self, rng, batch):
    assert batch["codes"].dtype == jnp.int32
    params = {"emb": jax.random.normal(rng, (self.K, self.CLASSES)) * 0.1}
    return tasks.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), model_state={}
    )

  def frozen(self):
    return {"table": self.table}

  def train_step(self, state, batch, rng, frozen):
    def loss_fn(params):
      keep = jax.random.bernoulli(rng, 0.9, batch["codes"].shape)
      feats = jnp.mean(params["emb"][batch["codes"]] * keep[..., None], axis=(1, 2))
      return optax.softmax_cross_entropy_with_integer_labels(feats, batch["label"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state)
    state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return state, {"loss": loss, "noise": jax.random.uniform(rng)}

  def images(self, state, batch, rng, frozen):
    maps = frozen["table"][batch["codes"]][..., :1] / self.table.max() * 2 - 1
    return {"samples": {"codes": maps}}


def _codes_data(n, seed):
  rng = np.random.default_rng(seed)
  return {
    "codes": rng.integers(0, _CodesTask.K, (n, 4, 4)).astype(np.int32),
    "label": rng.integers(0, _CodesTask.CLASSES, n).astype(np.int32),
  }


def on_codes(config, codes_dir: str):
  """A smoke prior config switched to the code dataset in `codes_dir`, its synthetic-code fields
  back to unset (config_checks.validate refuses them for another data.name)."""
  defaults = configs.base_config().data
  config.data.update(
    name="codes",
    codes_dir=codes_dir,
    train_split="train",
    eval_split="test",
    synthetic_shapes=defaults.synthetic_shapes,
    synthetic_num_codes=defaults.synthetic_num_codes,
    synthetic_examples=defaults.synthetic_examples,
  )
  return config


def _toy_codes_config(monkeypatch, steps: int, **ckpt):
  """A base config over in-memory code maps (the "toy_codes" source, registered for the test),
  batch 8, a check every step, no eval or images; `ckpt` sets config.ckpt fields."""
  data = {"train": _codes_data(48, 0), "test": _codes_data(8, 1)}
  monkeypatch.setitem(
    sources.SOURCES, "toy_codes", lambda data_config, split: sources.ArraySource(data[split])
  )
  config = configs.base_config()
  config.data.update(name="toy_codes", reader="local", batch_size=8, eval_batch_size=8)
  config.train.steps = steps
  config.ckpt.update(**ckpt)
  config.log.update(every_steps=1, eval_every_steps=0, image_every_steps=0, tensorboard=False)
  return config
