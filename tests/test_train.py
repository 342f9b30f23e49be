"""End-to-end tests of the training system (vqjax/train.py, vqjax/training/trainer.py,
experiments/*.py): one real step per smoke config, a full short run with its outputs, a task
with integer inputs and frozen weights, and `load_run`. Divergence is tested in
test_train_divergence.py, stops and resumes across processes in test_train_stop.py, how the
trainer feeds its devices in test_train_input.py. Nothing downloads: data are the
local Fashion-MNIST idx files, in-memory arrays or a temporary folder."""

import json
import logging
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_helpers import (
  _codes_data,
  _CodesTask,
  _toy_codes_config,
  load_config,
  needs_fmnist,
  process_state,
  quick,
  read_jsonl,
  train_losses,
)

import vqjax
from vqjax import configs, errors, runs
from vqjax.data import pipeline, sources
from vqjax.training import checkpoint, checkpoint_integrity, feed, sharding, tasks, trainer

EXPERIMENTS = ("fashion_mnist", "vqvae_cifar10", "vqvae2_imagenet", "vqvae2_ffhq1024")


# --- one real step for each experiment's smoke variant -----------------------------------------


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_config_takes_one_real_step(name):
  config = load_config(name, "smoke")
  assert config.train.steps == 1
  task = tasks.make_task(config)
  mesh = sharding.make_mesh(config.mesh)
  it = pipeline.make_train_iterator(config.data, config.seed)
  batch = sharding.global_batch(next(it), mesh)
  it.close()
  init = jax.jit(task.init)
  state = init(jax.random.key(0, impl="rbg"), {"image": batch["image"][:1]})
  before = jax.device_get(state.params)
  new_state, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1), None)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  assert 0 < float(metrics["mse"]) < 4
  after = jax.device_get(new_state.params)
  changed = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
  ]
  assert sum(changed) > len(changed) // 2


@pytest.mark.slow
@needs_fmnist
def test_bfloat16_train_step_tracks_float32():
  """The bf16 step (compute in bfloat16, float32 parameters, quantizer in float32) gives the
  float32 step's loss and moves the parameters the same way."""
  config = load_config("fashion_mnist", "smoke")
  it = pipeline.make_train_iterator(config.data, config.seed)
  batch = jax.tree.map(jnp.asarray, next(it))
  it.close()
  out = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    task = tasks.make_task(config)
    state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {"image": batch["image"][:1]})
    new, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1), None)
    delta = jax.tree.map(
      lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new.params, state.params
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    flat = np.concatenate([d.ravel() for d in jax.tree.leaves(delta)])
    out[dtype] = (float(metrics["loss"]), flat)
  (l32, d32), (l16, d16) = out["float32"], out["bfloat16"]
  assert abs(l16 - l32) < 0.05 * l32
  cosine = d32 @ d16 / np.linalg.norm(d32) / np.linalg.norm(d16)
  assert cosine > 0.9, cosine


@pytest.mark.parametrize(
  "name, shapes",
  [
    ("vqvae_cifar10", [(8, 8)]),  # van den Oord et al. 2017: 32x32 images -> 8x8 latents
    ("vqvae2_imagenet", [(32, 32), (64, 64)]),  # Razavi et al. 2019: 256px -> 32x32, 64x64
    ("vqvae2_ffhq1024", [(32, 32), (64, 64), (128, 128)]),  # FFHQ 1024px, three levels
  ],
)
def test_full_configs_give_the_papers_code_maps(name, shapes):
  config = load_config(name)
  task = tasks.make_task(config)
  batch = task.dummy_batch()
  variables = jax.eval_shape(
    lambda k: task.model.init({"params": k, "vq": k}, batch["image"]), jax.random.key(0)
  )
  codes = jax.eval_shape(
    lambda v: task.model.apply(v, batch["image"], method="encode_to_indices"), variables
  )
  assert [c.shape[1:] for c in codes] == shapes


# --- a whole run in-process ---------------------------------------------------------------------


@pytest.mark.slow
@needs_fmnist
@pytest.mark.usefixtures("damaged_checkpoint_reads")
def test_train_and_evaluate_writes_everything_resumes_and_loads(tmp_path, shared_cache, caplog):
  config = quick(load_config("fashion_mnist", "smoke"), shared_cache)
  config.data.reader = "auto"  # pinned to what this machine resolves, and recorded
  config.train.steps = 2
  config.ckpt.every_steps = 1
  config.log.image_every_steps = 2
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and result["first_step_s"] > 0
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  (ev,) = [r for r in records if r["split"] == "eval"]
  assert math.isclose(ev["psnr"], 10 * math.log10(4 / ev["mse"]), rel_tol=1e-6)
  assert ev["examples"] == 8  # one eval batch of 8
  assert 0 < ev["top/usage"] <= 1 and 1 <= ev["bottom/perplexity"] <= 32
  grid = np.asarray(Image.open(os.path.join(workdir, "images", "recon_0000002.png")))
  # 8 images of 32 px + 2 px padding in 2 rows, after a margin naming the rows.
  assert grid.shape[0] == 2 * 34 + 2 and grid.shape[1] > 8 * 34 + 2 + 20
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["train"]["steps"] == 2 and saved["data"]["reader"] == "local"
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [1, 2]

  # load_run: the trained model on disk reproduces the trainer's own eval of it, without
  # Orbax's notes on what it does on purpose (read-only, a partial restore).
  before = process_state()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    loaded_config, model, variables = vqjax.load_run(workdir)
  assert not [r.getMessage() for r in caplog.records if "/orbax/" in r.pathname]
  assert loaded_config.train.steps == 2 and set(variables) == {"params", "vq_state"}
  batch = next(iter(pipeline.make_eval_iterator(loaded_config.data, max_batches=1)))
  recon, _ = model.apply(variables, jnp.asarray(batch["image"]))
  mse = float(np.mean((np.asarray(recon, np.float64) - batch["image"]) ** 2))
  assert math.isclose(mse, ev["mse"], rel_tol=1e-4)

  # The newest step's arrays cut short (a copy interrupted): load_run skips it, as a resume
  # would, and reads step 1; asked for step 2 itself, it names the damage in one line.
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  for root, _, files in os.walk(os.path.join(damaged, "checkpoints", "2", "state")):
    for name in files if os.path.basename(root) == "d" else ():
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
  *_, step1_vars = vqjax.load_run(workdir, step=1)
  *_, fallback, step = runs.load_run_with_step(damaged)
  assert step == 1
  for a, b in zip(jax.tree.leaves(fallback), jax.tree.leaves(step1_vars), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(errors.CheckpointDamagedError, match="step 2") as e:
    vqjax.load_run(damaged, step=2)
  assert "\n" not in str(e.value)
  assert process_state() == before  # no unraisable hook or log filter left behind

  # A finished run is not trained or evaluated again.
  again = trainer.train_and_evaluate(config, workdir)
  assert again["step"] == 2 and again["eval/mse"] == ev["mse"] and "first_step_s" not in again
  assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == len(records)

  # Same workdir, more steps: resumes at 2, runs only step 3.
  config.train.steps = 3
  result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 3
  assert [
    r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"
  ] == [1, 2, 3]


@pytest.mark.slow
def test_reading_ahead_on_a_helper_thread_feeds_the_same_batches(
  tmp_path, shared_cache, monkeypatch
):
  """Where dispatch is synchronous (the CLIs on the CPU), batch t + 1 is read on a helper thread
  during step t: the same batches in the same order, so the same losses as reading on the loop's
  thread, and the same resume position."""
  import threading

  readers = []
  read = feed.DeviceFeed._read

  def recording_read(self):
    readers.append(threading.current_thread().name)
    return read(self)

  monkeypatch.setattr(feed.DeviceFeed, "_read", recording_read)
  losses = {}
  for helper in (False, True):
    monkeypatch.setattr(feed, "synchronous_dispatch", lambda helper=helper: helper)
    config = quick(load_config("fashion_mnist", "smoke"), shared_cache)
    config.train.steps, config.ckpt.every_steps, config.log.every_steps = 4, 2, 1
    config.log.image_every_steps = config.log.eval_every_steps = 0
    workdir = str(tmp_path / f"helper_{helper}")
    readers.clear()
    trainer.train_and_evaluate(config, workdir)
    losses[helper] = train_losses(workdir)
    # The first batch is read before the first step; the other three during the steps before.
    expected = ["MainThread"] + (["vqjax-read"] if helper else ["MainThread"]) * 3
    assert [name.split("_")[0] for name in readers] == expected
  assert list(losses[True]) == [1, 2, 3, 4]
  assert losses[True] == losses[False]


def test_a_task_with_integer_inputs_and_frozen_weights(tmp_path, monkeypatch, caplog):
  data = {"train": _codes_data(48, 0), "test": _codes_data(21, 1)}  # 21: eval pads
  monkeypatch.setitem(
    sources.SOURCES, "toy_codes", lambda data_config, split: sources.ArraySource(data[split])
  )
  config = configs.base_config()
  config.data.update(name="toy_codes", reader="local", batch_size=8, eval_batch_size=16)
  config.train.steps = 3
  config.ckpt.every_steps = 3
  config.log.update(every_steps=1, eval_every_steps=0, image_every_steps=3, tensorboard=False)
  workdir = str(tmp_path / "codes")
  result = trainer.train_and_evaluate(config, workdir, task=_CodesTask(config))

  # Each step's key is fold_in(key(seed + 1), step), whatever the task does with it.
  base = jax.random.key(config.seed + 1)
  expected = [float(jax.random.uniform(jax.random.fold_in(base, s))) for s in range(3)]
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r["split"] == "train"]
  np.testing.assert_allclose([r["noise"] for r in train], expected, rtol=1e-6)
  assert all(r["codes_per_s"] > 0 for r in train[1:])
  # The eval read the frozen table over the 21 real test examples only (padding masked).
  table = np.arange(12, dtype=np.float64).reshape(6, 2) / 7.0
  want = table[data["test"]["codes"]].sum(axis=(1, 2, 3)).mean()
  assert math.isclose(result["eval/table_mean"], want, rel_tol=1e-5)
  assert math.isclose(result["eval/label_mean"], data["test"]["label"].mean(), rel_tol=1e-6)
  assert result["eval/examples"] == 21
  assert os.path.exists(os.path.join(workdir, "images", "samples_0000003.png"))

  # Resumed for two more steps, the keys go on from step 3; the changed fields are logged.
  config.train.steps = 5
  config.vq.beta = 5.0
  with caplog.at_level("WARNING"):
    trainer.train_and_evaluate(config, workdir, task=_CodesTask(config))
  (warning,) = [r.getMessage() for r in caplog.records if "config differs" in r.getMessage()]
  assert "train.steps: 3 -> 5" in warning and "vq.beta: 0.25 -> 5.0" in warning
  train = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose(
    train[4]["noise"], float(jax.random.uniform(jax.random.fold_in(base, 4))), rtol=1e-6
  )


def test_an_unreadable_config_record_is_named_not_diffed_against_nothing(
  tmp_path, monkeypatch, caplog
):
  config = _toy_codes_config(monkeypatch, 2, every_steps=1)
  workdir = str(tmp_path / "w")
  trainer.train_and_evaluate(config, workdir, task=_CodesTask(config))
  with open(os.path.join(workdir, "checkpoints", "2", "meta", "metadata"), "w") as f:
    f.write("{bad")
  # As if written so at save time: its checksums match (else the step is damaged, and skipped).
  checkpoint_integrity.write_checksums(os.path.join(workdir, "checkpoints"), 2)
  config.train.steps = 3
  with caplog.at_level("WARNING"):
    assert trainer.train_and_evaluate(config, workdir, task=_CodesTask(config))["step"] == 3
  messages = [r.getMessage() for r in caplog.records]
  assert any("checkpoint 2's config record" in m and "cannot be read" in m for m in messages)
  assert not any("config differs" in m for m in messages)


@needs_fmnist
def test_missing_data_is_a_clear_error(tmp_path):
  config = load_config("fashion_mnist", "smoke")
  config.data.local_dir = str(tmp_path / "nowhere")
  with pytest.raises(errors.UserError, match="not found"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_load_run_of_an_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(errors.UserError, match="no checkpoint"):
    vqjax.load_run(str(tmp_path))


def test_the_tensorboard_hint_quotes_a_path_with_spaces(tmp_path, monkeypatch, caplog):
  config = _toy_codes_config(monkeypatch, 1, every_steps=1)
  workdir = str(tmp_path / "my runs" / "w")
  with caplog.at_level("INFO"):
    trainer.train_and_evaluate(config, workdir, task=_CodesTask(config))
  hint = [r.getMessage() for r in caplog.records if "tensorboard --logdir" in r.getMessage()]
  assert hint and f"--logdir '{workdir}/tb'`" in hint[-1]


def test_close_releases_everything_when_the_last_save_fails():
  """On a full disk the last save fails in close(): the log writer (whose tensorboardX thread
  otherwise died at exit with a traceback after the one-line error), the data iterator and the
  lock are still closed, and the save's error still surfaces."""
  closed = []

  class Part:
    def __init__(self, name, fail=False):
      self.name, self.fail = name, fail

    def close(self):
      closed.append(self.name)
      if self.fail:
        raise errors.CheckpointSaveError("could not write checkpoint step 10")

    def release(self):
      closed.append(self.name)

  run = trainer._Run.__new__(trainer._Run)
  run.stop = run.clock = None
  run.batches = Part("feed")
  run.ckpt, run.writer = Part("ckpt", fail=True), Part("writer")
  run.data, run.lock = Part("iterator"), Part("lock")
  with pytest.raises(errors.CheckpointSaveError, match="step 10"):
    run.close()
  assert closed == ["feed", "ckpt", "writer", "iterator", "lock"]
