"""Stage 2 end to end: code extraction (vqjax/extract_codes.py, vqjax/data/codes.py), the code
dataset as a source, and `PriorTask` (vqjax/training/tasks.py) through the trainer: bits per
code against NumPy, exact resume, the smoke configs, and clear errors for codes that do not fit.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_helpers import on_codes

import vqjax
from vqjax import configs, convert, errors, extract_codes, runs
from vqjax.data import codes, pipeline, sources
from vqjax.models import registry
from vqjax.training import logs, tasks, trainer

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
  not sources.fashion_mnist_files_exist(FMNIST), reason="Fashion-MNIST idx files not installed"
)


def test_record_round_trip():
  example = {"codes0": np.arange(16, dtype=np.uint16).reshape(4, 4), "label": np.int32(7)}
  back = codes.decode_example(codes.encode_example(example))
  assert back["codes0"].dtype == np.int32 and back["label"].shape == ()
  np.testing.assert_array_equal(back["codes0"], example["codes0"])
  assert int(back["label"]) == 7


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A (randomly initialised) Fashion-MNIST smoke VQ-VAE-2 saved as a model directory."""
  if not sources.fashion_mnist_files_exist(FMNIST):
    pytest.skip("Fashion-MNIST idx files not installed")
  config = configs.load_experiment("fashion_mnist:smoke")
  config.data.update(train_split="train[:24]", eval_split="test[:10]", eval_batch_size=8)
  model = registry.build_model(config)
  x = jnp.zeros((1, 32, 32, 1))
  variables = jax.jit(model.init)(
    {"params": jax.random.key(0, impl="rbg"), "vq": jax.random.key(1)}, x
  )
  out = tmp_path_factory.mktemp("stage1") / "model"
  convert.save_converted(str(out), config, dict(variables))
  return str(out), config, model, dict(variables)


@pytest.mark.slow
def test_extraction_round_trip_and_restart(stage1, tmp_path):
  workdir, config, model, variables = stage1
  out = str(tmp_path / "codes")
  meta = extract_codes.extract(workdir, out, batch_size=8, examples_per_shard=10)
  assert meta["levels"] == [{"name": "top", "shape": [4, 4]}, {"name": "bottom", "shape": [8, 8]}]
  assert meta["splits"] == {
    "train": {"num_examples": 24, "num_shards": 3},
    "test": {"num_examples": 10, "num_shards": 1},
  }
  assert meta["has_labels"] and meta["num_codes"] == config.vq.num_codes

  # The codes decode to the stage-1 reconstructions of the same images, in example order.
  source = codes.CodesSource(out, "train")
  images = sources.make_source(config.data, "train")
  idx = np.arange(24)
  batch = pipeline.transform_batch(pipeline.load_batch(images, idx, config.data), config.data)
  recon, _ = model.apply(variables, jnp.asarray(batch["image"]))
  records = source.__getitems__(list(idx))
  maps = tuple(jnp.asarray(np.stack([r[f"codes{i}"] for r in records])) for i in range(2))
  decoded = model.apply(variables, maps, method="decode_from_indices")
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(recon), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal([int(r["label"]) for r in records], batch["label"])

  # A restart rewrites only what is missing or damaged: a shard cut short (`truncate -s 50%`)
  # is named by a reader in one line, and rewritten.
  shards = sorted(f for f in os.listdir(out) if f.startswith("train-") and f.endswith("record"))
  assert len(shards) == 3
  kept = os.path.join(out, shards[0])
  before = os.stat(kept).st_mtime_ns
  cut = os.path.join(out, shards[2])
  os.truncate(cut, os.path.getsize(cut) // 2)
  with pytest.raises(errors.UserError, match=f"{shards[2]} is damaged: it has") as e:
    codes.CodesSource(out, "train")
  assert "\n" not in str(e.value)
  os.remove(os.path.join(out, shards[1]))
  extract_codes.extract(workdir, out, batch_size=8, examples_per_shard=10)
  assert os.stat(kept).st_mtime_ns == before
  assert codes.shard_problem(cut) == ""
  again = codes.CodesSource(out, "train")
  for i in (5, 15, 23):
    np.testing.assert_array_equal(again[i]["codes1"], source[i]["codes1"])


@pytest.mark.slow
def test_codes_of_another_model_are_refused(stage1, tmp_path):
  workdir, config, _, _ = stage1
  out = str(tmp_path / "codes")
  extract_codes.extract(workdir, out, splits=["test"], batch_size=8)
  meta = codes.read_metadata(out)
  meta["stage1"]["fingerprint"] = "0" * 16
  codes.write_metadata(out, meta)
  with pytest.raises(errors.UserError, match="another stage-1 model"):
    extract_codes.extract(workdir, out, splits=["test"], batch_size=8)


def test_shards_of_another_checkpoint_step_or_slice_are_refused(stage1, tmp_path):
  """Existing shards count as done only for the same stage-1 step and split slices: a model
  trained on, or another slice, is a one-line error instead of stale codes kept silently."""
  workdir, _, _, _ = stage1
  out = str(tmp_path / "codes")
  extract_codes.extract(workdir, out, splits=["test[:5]"], batch_size=8)
  with pytest.raises(errors.UserError, match=r"split 'test\[:5\]' \(now 'test\[5:10\]'\)"):
    extract_codes.extract(workdir, out, splits=["test[5:10]"], batch_size=8)
  # The same request again, and a new split beside it, are fine.
  extract_codes.extract(workdir, out, splits=["test[:5]", "train[:4]"], batch_size=8)
  record = os.path.join(out, "extraction.json")
  with open(record) as f:
    done = json.load(f)
  assert done["splits"] == {"test": "test[:5]", "train": "train[:4]"}
  done["stage1_step"] = 7  # as if the shards came from step 7 of a run trained on since
  with open(record, "w") as f:
    json.dump(done, f)
  with pytest.raises(errors.UserError, match="stage1_step 7 \\(now None\\)"):
    extract_codes.extract(workdir, out, splits=["test[:5]"], batch_size=8)


def test_rotated_extraction_writes_four_turns_of_every_image_labelled_by_turns(stage1, tmp_path):
  """`rotations=4`: example 4i + t holds the codes of image i turned t quarter turns counter-
  clockwise (out[i, j] = x[j, W - 1 - i], by index here), labelled t; a run of another rotation
  setting into the same directory is a one-line error, as older records (no setting) count as
  unrotated."""
  workdir, config, model, variables = stage1
  out = str(tmp_path / "rotated")
  meta = extract_codes.extract(workdir, out, splits=["test[:6]"], batch_size=4, rotations=4)
  assert meta["splits"] == {"test": {"num_examples": 24, "num_shards": 1}}
  assert meta["has_labels"] and meta["rotations"] == 4
  source = codes.CodesSource(out, "test")
  images = sources.make_source(config.data, "test[:6]")
  batch = pipeline.transform_batch(
    pipeline.load_batch(images, np.arange(6), config.data), config.data
  )
  turned = np.asarray(batch["image"])
  n = turned.shape[1]
  for t in range(4):
    maps = model.apply(variables, jnp.asarray(turned), method="encode_to_indices")
    for i in range(6):
      record = source[4 * i + t]
      assert int(record["label"]) == t
      for level in range(2):
        np.testing.assert_array_equal(record[f"codes{level}"], np.asarray(maps[level][i]))
    quarter = np.empty_like(turned)
    for r in range(n):
      for c in range(n):
        quarter[:, r, c] = turned[:, c, n - 1 - r]
    turned = quarter
  with pytest.raises(errors.UserError, match=r"rotations 4 \(now 0\)") as e:
    extract_codes.extract(workdir, out, splits=["test[:6]"], batch_size=4)
  assert "\n" not in str(e.value)
  with pytest.raises(errors.UserError, match="--rotations must be 0 or 4, got 3"):
    extract_codes.extract(workdir, str(tmp_path / "three"), rotations=3)
  plain = str(tmp_path / "plain")
  extract_codes.extract(workdir, plain, splits=["test[:6]"], batch_size=4)
  record = os.path.join(plain, "extraction.json")
  with open(record) as f:
    done = json.load(f)
  del done["rotations"]  # as an older vqjax wrote it
  with open(record, "w") as f:
    json.dump(done, f)
  extract_codes.extract(workdir, plain, splits=["test[:6]"], batch_size=4)  # unrotated: fine
  with pytest.raises(errors.UserError, match=r"rotations 0 \(now 4\)"):
    extract_codes.extract(workdir, plain, splits=["test[:6]"], batch_size=4, rotations=4)


def test_extraction_from_a_workdir_without_checkpoint_is_a_clear_error(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(errors.UserError, match="no checkpoint"):
    extract_codes.extract(str(tmp_path), str(tmp_path / "out"))


def _write_codes(out, shapes, num_codes, n_train, n_test, labels=True, seed=0):
  """A hand-made code dataset: row r of every map is code (r + label) % num_codes, so the
  codes are structured and predictable from the label."""
  rng = np.random.default_rng(seed)
  from array_record.python.array_record_module import ArrayRecordWriter

  meta = {
    "format": codes.FORMAT,
    "levels": [{"name": f"l{i}", "shape": list(s)} for i, s in enumerate(shapes)],
    "num_codes": num_codes,
    "image_shape": [32, 32, 1],
    "stage1": {"workdir": "hand-made", "step": 0, "fingerprint": "x"},
    "splits": {},
    "has_labels": labels,
  }
  for split, n in (("train", n_train), ("test", n_test)):
    writer = ArrayRecordWriter(os.path.join(out, codes.shard_name(split, 0, 1)), "group_size:1")
    for _ in range(n):
      label = int(rng.integers(0, 4))
      ex = {}
      for i, (h, w) in enumerate(shapes):
        rows = (np.arange(h)[:, None] + label + np.zeros((1, w), int)) % num_codes
        noise = rng.random((h, w)) < 0.1
        ex[f"codes{i}"] = np.where(noise, rng.integers(0, num_codes, (h, w)), rows).astype(
          np.uint16
        )
      if labels:
        ex["label"] = np.int32(label)
      writer.write(codes.encode_example(ex))
    writer.close()
    meta["splits"][split] = {"num_examples": n, "num_shards": 1}
  codes.write_metadata(out, meta)
  return meta


def _prior_config(codes_dir, model="pixelcnn", level=0):
  c = configs.load_experiment(
    "pixelcnn_cifar10:smoke" if model == "pixelcnn" else "fashion_mnist_prior_bottom:smoke"
  )
  on_codes(c, codes_dir)
  c.vq.num_codes = 8
  c.prior.level = level
  c.prior.class_conditional = False
  c.log.update(eval_every_steps=0, image_every_steps=0, tensorboard=False, eval_batches=0)
  return c


@pytest.mark.slow
def test_prior_training_reports_bits_and_resumes_exactly(tmp_path):
  codes_dir = str(tmp_path / "codes")
  os.makedirs(codes_dir)
  _write_codes(codes_dir, [(4, 4), (8, 8)], 8, n_train=64, n_test=13)
  config = _prior_config(codes_dir)
  config.train.steps = 4
  config.ckpt.every_steps = 2
  ref = trainer.train_and_evaluate(config, str(tmp_path / "ref"))
  # Held-out bits per code: the eval mean cross-entropy over the 13 maps, from the final
  # parameters, computed here independently with NumPy in float64.
  cfg, model, variables = runs.load_run(str(tmp_path / "ref"))
  assert cfg.prior.code_shapes == [[4, 4], [8, 8]] and cfg.prior.image_shape == [32, 32, 1]
  test = codes.CodesSource(codes_dir, "test")
  maps = np.stack([test[i]["codes0"] for i in range(len(test))])
  logits = np.asarray(model.apply(variables, jnp.asarray(maps), train=False), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, maps[..., None], -1).mean()
  assert ref["eval/examples"] == 13
  assert math.isclose(ref["eval/bits_per_code"], nll / math.log(2), rel_tol=1e-4)
  # 16 codes encode 32 * 32 image dimensions: bits/dim = 16 * bits/code / 1024.
  assert math.isclose(ref["eval/bits_per_dim"], ref["eval/bits_per_code"] * 16 / 1024, rel_tol=1e-6)

  # Stopped after 2 steps and resumed, the run gives the same losses.
  config.train.steps = 2
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config.train.steps = 4
  trainer.train_and_evaluate(config, str(tmp_path / "run"))

  def losses(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]

  assert losses(str(tmp_path / "run")) == losses(str(tmp_path / "ref"))


@pytest.mark.slow
def test_bottom_prior_is_conditioned_on_the_top_codes(tmp_path):
  codes_dir = str(tmp_path / "codes")
  os.makedirs(codes_dir)
  _write_codes(codes_dir, [(4, 4), (8, 8)], 8, n_train=16, n_test=8)
  config = _prior_config(codes_dir, model="pixelsnail", level=1)
  task = tasks.make_task(config)
  batch = {k: jnp.asarray(v) for k, v in task.dummy_batch().items()}
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), batch)
  variables = {"params": state.params, **state.model_state}
  bottom = jnp.zeros((1, 8, 8), jnp.int32)
  a = task.model.apply(variables, bottom, condition=(jnp.zeros((1, 4, 4), jnp.int32),))
  b = task.model.apply(variables, bottom, condition=(jnp.ones((1, 4, 4), jnp.int32),))
  assert a.shape == (1, 8, 8, 8) and not np.allclose(a, b)


def test_codes_that_do_not_fit_the_config_are_refused(tmp_path):
  codes_dir = str(tmp_path / "codes")
  os.makedirs(codes_dir)
  _write_codes(codes_dir, [(4, 4)], 8, n_train=8, n_test=8, labels=False)
  config = _prior_config(codes_dir)
  config.vq.num_codes = 16
  with pytest.raises(errors.UserError, match="use 8 codes per level.*num_codes=8"):
    tasks.make_task(config)
  config = _prior_config(codes_dir, level=1)
  with pytest.raises(errors.UserError, match="prior.level=1 but the codes have 1 level"):
    tasks.make_task(config)
  config = _prior_config(codes_dir)
  config.prior.update(class_conditional=True, num_classes=4)
  with pytest.raises(errors.UserError, match="no labels"):
    tasks.make_task(config)
  _write_codes(codes_dir, [(4, 4), (8, 8)], 8, n_train=8, n_test=8)
  config = _prior_config(codes_dir, level=1)  # a PixelCNN without a conditioning stack
  with pytest.raises(errors.UserError, match="cond_channels > 0"):
    tasks.make_task(config)
  config = _prior_config(str(tmp_path / "nowhere"))
  with pytest.raises(errors.UserError, match="extract_codes"):
    tasks.make_task(config)


@pytest.mark.parametrize(
  "name",
  [
    "fashion_mnist_prior_top",
    "fashion_mnist_prior_bottom",
    "pixelcnn_cifar10",
    "pixelsnail_top_imagenet",
    "pixelsnail_bottom_imagenet",
  ],
)
@pytest.mark.slow
def test_prior_smoke_configs_take_one_real_step(name):
  config = configs.load_experiment(f"{name}:smoke")
  task = tasks.make_task(config)
  it = pipeline.make_train_iterator(config.data, config.seed)
  batch = jax.tree.map(jnp.asarray, next(it))
  it.close()
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), jax.tree.map(lambda x: x[:1], batch))
  new, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1), None)
  # Uniform random codes over K=32: an untrained prior is near log2(32) = 5 bits per code.
  assert 4.0 < float(metrics["bits_per_code"]) < 7.0
  assert int(new.step) == 1


@pytest.mark.slow
def test_prior_logs_sample_grids_decoded_by_the_stage1_run(stage1, tmp_path):
  workdir, s1_config, model, variables = stage1
  codes_dir = str(tmp_path / "codes")
  extract_codes.extract(workdir, codes_dir, batch_size=8)
  config = on_codes(configs.load_experiment("fashion_mnist_prior_bottom:smoke"), codes_dir)
  config.log.update(image_every_steps=1, num_images=4, tensorboard=False, eval_every_steps=0)
  # runs.make_task gives the task the stage-1 run the codes record (as `vqjax.train` does).
  trainer.train_and_evaluate(config, str(tmp_path / "prior"), make_task=runs.make_task)
  grid = np.asarray(Image.open(tmp_path / "prior" / "images" / "samples_0000001.png"))
  # Two labelled rows (4 images of 32 px each): the real codes decoded, then the sampled bottom.
  assert grid.shape[0] == 2 * 34 + 2
  test = codes.CodesSource(codes_dir, "test")
  real = tuple(jnp.asarray(np.stack([test[i][f"codes{k}"] for i in range(4)])) for k in (0, 1))
  decoded = model.apply(variables, real, method="decode_from_indices")
  want = logs.to_uint8(np.clip(np.asarray(decoded), -1, 1))
  margin = grid.shape[1] - (8 * 34 + 2)  # rows of 8 cells, blanks after the 4 images
  np.testing.assert_array_equal(grid[2:34, margin + 2 : margin + 34], want[0, ..., 0])


@pytest.mark.slow
def test_a_prior_loads_and_samples_without_its_code_dataset(stage1, tmp_path):
  """What loading and sampling a prior need is recorded with the run when it trains (code-map
  shapes, image shape, the stage-1 run): with its code dataset moved away, `vqjax.load_run`
  and `python -m vqjax.sample` work, the stage-1 run named by the priors' own config."""
  workdir, _, model, variables = stage1
  codes_dir = str(tmp_path / "codes")
  extract_codes.extract(workdir, codes_dir, batch_size=8)
  priors = []
  for name in ("fashion_mnist_prior_top", "fashion_mnist_prior_bottom"):
    config = on_codes(configs.load_experiment(f"{name}:smoke"), codes_dir)
    config.log.update(tensorboard=False, eval_every_steps=0, image_every_steps=0)
    trainer.train_and_evaluate(config, str(tmp_path / name))
    priors.append(str(tmp_path / name))
  os.rename(codes_dir, str(tmp_path / "moved"))

  config, prior, prior_variables = vqjax.load_run(priors[1])
  assert config.prior.code_shapes == [[4, 4], [8, 8]] and config.prior.image_shape == [32, 32, 1]
  assert config.prior.stage1 == workdir
  top = jnp.zeros((1, 4, 4), jnp.int32)
  logits = prior.apply(prior_variables, jnp.zeros((1, 8, 8), jnp.int32), condition=(top,))
  assert logits.shape == (1, 8, 8, config.vq.num_codes)

  out = tmp_path / "samples"
  argv = ["--workdir", priors[0], "--workdir", priors[1], "--num", "3", "--out", str(out)]
  done = subprocess.run(
    [sys.executable, "-m", "vqjax.sample", *argv], capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-2000:]
  with open(out / "settings.json") as f:
    assert json.load(f)["stage1"] == workdir
  maps = np.load(out / "codes.npz")
  decoded = model.apply(
    variables,
    (jnp.asarray(maps["codes0"]), jnp.asarray(maps["codes1"])),
    method="decode_from_indices",
  )
  want = logs.to_uint8(np.clip(np.asarray(decoded), -1, 1))
  np.testing.assert_array_equal(np.load(out / "images.npz")["image"], want)
