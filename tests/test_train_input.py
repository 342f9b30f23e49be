"""Tests of how the trainer feeds its devices (vqjax/training/trainer.py with
vqjax/data/pipeline.py): the prefetching loop against a NumPy replay (every batch once, exact
resume, worker processes, flips on the devices) and the data-wait share and its input-bound
warning. Data are in-memory arrays; nothing downloads."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import _codes_data, _CodesTask, read_jsonl, train_losses

from vqjax import configs
from vqjax.data import device_transform, pipeline, sources
from vqjax.training import checkpoint, sharding, tasks, trainer


class _LinearImageTask(tasks.Task):
  """Least squares from images to labels through one weight per pixel, plain SGD, images
  through `device_transform`: small enough to replay step by step in NumPy."""

  config_sections = ("task",)
  evals = ("toy_count",)
  LR = 0.02

  def __init__(self, config):
    self.config = config
    self.tx = optax.sgd(self.LR)

  def dummy_batch(self):
    return {"image": np.zeros((1, 6, 6, 1), np.uint8), "label": np.zeros((1,), np.int32)}

  def init(self, rng, batch):
    image = device_transform.device_transform(batch, None, self.config.data)["image"]
    params = {"w": jnp.zeros(image.shape[1:], jnp.float32)}
    return tasks.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), model_state={}
    )

  def train_step(self, state, batch, rng, frozen):
    batch = device_transform.device_transform(batch, rng, self.config.data)
    x, y = batch["image"], batch["label"].astype(jnp.float32)

    def loss_fn(params):
      return jnp.mean(jnp.square(jnp.sum(x * params["w"], axis=(1, 2, 3)) - y))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state)
    state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return state, {"loss": loss}


def _image_run_config(steps, every_ckpt=0, processes=0):
  config = configs.base_config()
  config.data.update(
    name="toy_images", reader="local", batch_size=8, eval_batch_size=8, image_size=6
  )
  config.data.update(random_flip=True, worker_processes=processes)
  config.train.steps = steps
  config.ckpt.every_steps = every_ckpt
  config.log.update(every_steps=1, eval_every_steps=0, image_every_steps=0, tensorboard=False)
  return config


def _toy_images(n, seed):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8),
    "label": rng.integers(0, 4, n).astype(np.int32),
  }


def _saved_params(workdir, task, config):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  abstract = jax.eval_shape(
    lambda k: task.init(k, task.dummy_batch()), jax.random.key(0, impl="rbg")
  )
  mesh = sharding.make_mesh(config.mesh)
  target = checkpoint.abstract_with_shardings(abstract, sharding.state_shardings(abstract, mesh, 1))
  state, _ = ckpt.restore(target)
  ckpt.close()
  return np.asarray(jax.device_get(state.params["w"]))


def _numpy_replay(config, steps):
  """The run's parameters computed in float64 NumPy: the data order read from the pipeline
  directly, the flips drawn from the documented key (fold_in(step key, "flip")), the SGD
  update of least squares written out."""
  it = pipeline.make_train_iterator(config.data, config.seed)
  w = np.zeros((6, 6, 1))
  base = jax.random.key(config.seed + 1)
  for step in range(steps):
    batch = next(it)
    x = batch["image"].astype(np.float64) / 127.5 - 1
    key = jax.random.fold_in(jax.random.fold_in(base, step), 0x666C6970)
    flip = np.asarray(jax.random.bernoulli(key, 0.5, (len(x),)))
    x[flip] = x[flip][:, :, ::-1]
    residual = np.sum(x * w, axis=(1, 2, 3)) - batch["label"]
    w -= _LinearImageTask.LR * 2 * np.mean(residual[:, None, None, None] * x, axis=0)
  it.close()
  return w


@pytest.mark.slow
def test_prefetching_loop_feeds_every_batch_once_and_resumes_exactly(tmp_path, monkeypatch):
  """N steps straight, and N/2 + resume + N/2 (the second half reading in worker processes),
  give the same parameters, equal to a NumPy replay of the same batches and flips: the batch
  read ahead of a checkpoint is neither skipped nor fed twice."""
  data = {"train": _toy_images(48, 0), "test": _toy_images(8, 1)}  # 6 batches per epoch
  monkeypatch.setitem(
    sources.SOURCES, "toy_images", lambda data_config, split: sources.ArraySource(data[split])
  )
  total = 8
  straight = str(tmp_path / "straight")
  config = _image_run_config(total)
  trainer.train_and_evaluate(config, straight, task=_LinearImageTask(config))
  split = str(tmp_path / "split")
  config = _image_run_config(total // 2, every_ckpt=total // 2)
  trainer.train_and_evaluate(config, split, task=_LinearImageTask(config))
  config = _image_run_config(total, processes=2)
  result = trainer.train_and_evaluate(config, split, task=_LinearImageTask(config))
  assert result["step"] == total
  task = _LinearImageTask(config)
  w_straight = _saved_params(straight, task, config)
  np.testing.assert_array_equal(_saved_params(split, task, config), w_straight)
  np.testing.assert_allclose(w_straight, _numpy_replay(config, total), rtol=1e-4, atol=1e-6)
  assert np.abs(w_straight).max() > 0.01  # it trained
  assert train_losses(split) == train_losses(straight)
  # The share of time the devices waited for data is logged from the second step on.
  records = [r for r in read_jsonl(os.path.join(split, "metrics.jsonl")) if r["split"] == "train"]
  waits = [r["data_wait"] for r in records if r["step"] not in (1, total // 2 + 1)]
  assert len(waits) == total - 2 and all(0 <= w <= 1 for w in waits)


class _SlowSource(sources.ArraySource):
  """An in-memory source that takes a quarter of a second per batch, like a slow disk."""

  def read_batch(self, indices):
    time.sleep(0.25)
    return super().read_batch(indices)


def test_an_input_bound_run_reports_its_data_wait_and_warns(tmp_path, monkeypatch, caplog):
  data = {"train": _codes_data(48, 0), "test": _codes_data(8, 1)}
  monkeypatch.setitem(
    sources.SOURCES, "toy_codes", lambda data_config, split: _SlowSource(data[split])
  )
  config = configs.base_config()
  config.data.update(name="toy_codes", reader="local", batch_size=8, eval_batch_size=8)
  config.train.steps = 5
  config.ckpt.every_steps = 0
  config.log.update(every_steps=1, eval_every_steps=0, image_every_steps=0, tensorboard=False)
  workdir = str(tmp_path / "slow")
  with caplog.at_level("WARNING"):
    trainer.train_and_evaluate(config, workdir, task=_CodesTask(config))
  records = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  waits = {r["step"]: r["data_wait"] for r in records if "data_wait" in r}
  # A tiny step every 0.25 s of reading: the devices were idle most of the time.
  assert sorted(waits) == [2, 3, 4, 5] and all(waits[s] > 0.5 for s in (3, 4)), waits
  warnings = [r.getMessage() for r in caplog.records if "input-bound" in r.getMessage()]
  assert len(warnings) == 1 and "config.data.worker_processes" in warnings[0]
