"""Tests of vqjax/models/classifier.py and vqjax/training/classifier_task.py: the features feed
the dense head, the task's losses and eval sums match NumPy, the classifier learns a separable
toy problem, one real run through the trainer on Fashion-MNIST, and (once registered) every
classifier experiment's smoke config takes a step."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqjax import config_checks, configs
from vqjax.data import sources
from vqjax.models import classifier
from vqjax.training import classifier_task, evaluators, tasks, trainer

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
  not sources.fashion_mnist_files_exist(FMNIST), reason="Fashion-MNIST idx files not installed"
)


def make_config(num_classes=10, label_smoothing=0.0, lr=3e-3, steps=100):
  """base_config() with the classifier fields (added here while base_config lacks them)."""
  c = configs.base_config()
  if "classifier" not in c:
    with c.unlocked():
      c.classifier = ml_collections.ConfigDict(
        {"num_classes": 10, "label_smoothing": 0.0, "stem_stride": 1}
      )
  c.classifier.num_classes = num_classes
  c.classifier.label_smoothing = label_smoothing
  c.optim.lr = lr
  c.train.steps = steps
  return c


def small(num_classes, **kw):
  return classifier.Classifier(num_classes=num_classes, channels=8, num_stages=2, **kw)


def log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_features_shape_and_logits_are_the_dense_head_of_the_features():
  model = classifier.Classifier(num_classes=5, channels=8, num_stages=3, num_blocks=2)
  x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
  # Parameters from rbg keys: XLA compiles a flax init far faster with them than threefry.
  variables = jax.jit(model.init)({"params": jax.random.key(1, impl="rbg")}, x)
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, x)
  assert feats.shape == (3, 8 * 4) and feats.dtype == jnp.float32
  assert model.feature_dim == 32
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (3, 5)
  head = variables["params"]["head"]
  want = np.asarray(feats, np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(
    head["bias"], np.float64
  )
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)
  # Features depend on the image (not a constant of the parameters).
  assert np.abs(np.asarray(feats[0] - feats[1])).max() > 1e-4


def test_patchify_stem_and_dropout():
  model = classifier.Classifier(num_classes=3, channels=8, num_stages=2, stem_stride=4, dropout=0.5)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)({"params": jax.random.key(1, impl="rbg")}, x)
  assert variables["params"]["stem"]["kernel"].shape == (4, 4, 3, 8)
  # Make the residual branches non-zero so dropout has something to drop.
  variables = jax.tree.map(lambda p: p + 0.05, variables)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a, eval_b = apply(variables, x), apply(variables, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  train_b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
  assert np.abs(np.asarray(train_a - train_b)).max() > 1e-4


def brightness_data(n, seed):
  """Two classes told apart by mean brightness only (per-pixel noise dwarfs no image)."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 2, n).astype(np.int32)
  level = np.where(label == 1, 0.4, -0.4)[:, None, None, None]
  image = level + 0.3 * rng.standard_normal((n, 8, 8, 1))
  return {"image": np.clip(image, -1, 1).astype(np.float32), "label": label}


@pytest.mark.slow
def test_the_classifier_learns_a_brightness_task():
  config = make_config(num_classes=2, lr=3e-3, steps=40)
  task = classifier_task.ClassifierTask(config, model=small(2))
  train, test = brightness_data(40 * 16, 0), brightness_data(200, 1)
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {k: v[:1] for k, v in train.items()})
  step = jax.jit(task.train_step)
  for i in range(40):
    batch = {k: v[i * 16 : (i + 1) * 16] for k, v in train.items()}
    state, metrics = step(state, batch, jax.random.key(i), None)
  assert np.isfinite(float(metrics["loss"]))
  evaluator = classifier_task.ClassifierEvaluator.from_config(config, task.model)
  summary = evaluator.run({"params": state.params, **state.model_state}, [test])
  assert summary["accuracy"] > 0.9, summary
  assert summary["nll"] < np.log(2)  # better than chance


def test_eval_sums_and_smoothed_loss_match_numpy():
  num_classes, n = 7, 12
  config = make_config(num_classes=num_classes, label_smoothing=0.2)
  task = classifier_task.ClassifierTask(config, model=small(num_classes))
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
    "label": rng.integers(0, num_classes, n).astype(np.int32),
  }
  mask = np.array([1] * 9 + [0] * 3, np.float32)
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), batch)
  # Random heads so that the logits differ enough to rank.
  head = state.params["head"]
  head = {
    "kernel": jax.random.normal(jax.random.key(5), head["kernel"].shape),
    "bias": head["bias"],
  }
  state = state.replace(params={**state.params, "head": head})
  logits = np.asarray(jax.jit(task.logits)(state, batch["image"]), np.float64)
  logp = log_softmax64(logits)
  label = batch["label"]
  real = mask == 1

  evaluator = classifier_task.ClassifierEvaluator.from_config(config, task.model)
  variables = {"params": state.params, **state.model_state}
  (sums,) = evaluators.Suite([evaluator]).totals(variables, [{**batch, "mask": mask}])
  nll = -logp[np.arange(n), label]
  correct = logits.argmax(axis=1) == label
  top5 = np.array([label[i] in np.argsort(-logits[i])[:5] for i in range(n)])
  assert float(sums["count"]) == 9
  np.testing.assert_allclose(float(sums["nll"]), nll[real].sum(), rtol=1e-5)
  assert float(sums["correct"]) == correct[real].sum()
  assert float(sums["correct_top5"]) == top5[real].sum()
  summary = evaluator.summary(sums)
  np.testing.assert_allclose(summary["nll"], nll[real].mean(), rtol=1e-5)
  assert summary["accuracy"] == pytest.approx(correct[real].mean())
  assert summary["top5_accuracy"] == pytest.approx(top5[real].mean())
  assert summary["examples"] == 9

  # The training loss: cross-entropy against (1 - 0.2) one_hot + 0.2 / K (no dropout here).
  target = np.full((n, num_classes), 0.2 / num_classes)
  target[np.arange(n), label] += 0.8
  _, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1), None)
  np.testing.assert_allclose(float(metrics["loss"]), -(target * logp).sum(1).mean(), rtol=1e-5)
  assert float(metrics["accuracy"]) == pytest.approx(correct.mean())


def test_bad_classifier_fields_are_user_errors():
  from vqjax import errors

  with pytest.raises(errors.UserError, match="num_classes"):
    classifier_task.ClassifierTask(make_config(num_classes=1), model=small(1))
  with pytest.raises(errors.UserError, match="label_smoothing"):
    classifier_task.ClassifierTask(make_config(label_smoothing=1.0), model=small(10))


@pytest.mark.slow
@needs_fmnist
def test_one_real_run_through_the_trainer(tmp_path):
  config = configs.shrink_for_smoke(make_config(num_classes=10, lr=1e-3, steps=1))
  config.data.random_flip = True
  config.data.eval_split = "test[:21]"  # 21 = two full batches of 8 and a padded one
  # Image steps on: the task has no grids, and asking for them must not fail.
  config.log.update(eval_batches=0, image_every_steps=1, tensorboard=False)
  model = classifier.Classifier(num_classes=10, channels=8, num_stages=2)
  task = classifier_task.ClassifierTask(config, model=model)
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"), task=task)
  assert result["step"] == 1
  assert np.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
  assert result["eval/examples"] == 21
  assert 0 <= result["eval/accuracy"] <= 1
  # A fraction of the 21 real examples (the padding is not counted).
  assert result["eval/accuracy"] * 21 == pytest.approx(round(result["eval/accuracy"] * 21))
  assert 0 < result["eval/nll"] < 10
  assert os.path.isdir(tmp_path / "run" / "checkpoints")
  assert not os.listdir(tmp_path / "run" / "images")


EXPERIMENTS = ("classifier_fashion_mnist", "classifier_cifar10", "classifier_imagenet")


@pytest.mark.slow
@pytest.mark.skipif("classifier" not in tasks.TASKS, reason="classifier task not registered yet")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_configs_validate_and_take_a_step(name):
  config = configs.load_experiment(f"{name}:smoke")
  config_checks.validate(config)
  assert config.task == "classifier" and config.model.name == "classifier"
  task = tasks.make_task(config)
  batch = {
    "image": np.zeros((8, 32, 32, config.data.channels), np.float32),
    "label": np.arange(8, dtype=np.int32) % config.classifier.num_classes,
  }
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), batch)
  state, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1), None)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
