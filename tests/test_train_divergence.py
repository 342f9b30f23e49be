"""Divergence and the last good checkpoint (vqjax/training/health.py through the trainer): a
non-finite loss stops the run with the checkpoints after the last good one recorded bad, a
resume continues from it; a finite loss that explodes is survived once and stops the run when
it stays."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import (
  _CodesTask,
  _toy_codes_config,
  load_config,
  needs_fmnist,
  quick,
  train_losses,
)

from vqjax import errors
from vqjax.training import checkpoint, trainer


@pytest.mark.slow
@needs_fmnist
def test_divergence_keeps_the_last_good_checkpoint_and_resumes_from_it(tmp_path, shared_cache):
  config = quick(load_config("fashion_mnist", "smoke"), shared_cache)
  config.train.steps = 4
  config.ckpt.every_steps = 1
  config.ckpt.keep = 2
  config.log.update(eval_every_steps=0, image_every_steps=0)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  good = train_losses(workdir)

  # The same run continued at a learning rate that blows the parameters up.
  config.optim.lr = 1e30
  config.train.steps = 12
  with pytest.raises(errors.DivergenceError) as e:
    trainer.train_and_evaluate(config, workdir)
  msg = str(e.value)
  assert "non-finite" in msg and f"{workdir}/checkpoints/4" in msg and "\n" not in msg
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  # Steps after 4 were saved from exploded parameters: recorded bad, and step 4 kept although
  # keep=2 would have rotated it out.
  assert ckpt.latest_step() == 4 and ckpt.last_good_step() == 4
  assert 4 in ckpt.all_steps() and all(s in ckpt.bad_steps() for s in ckpt.all_steps() if s > 4)
  ckpt.close()

  # Back at a sane learning rate the run resumes from step 4 and trains on with finite losses.
  config.optim.lr = load_config("fashion_mnist", "smoke").optim.lr
  config.train.steps = 6
  result = trainer.train_and_evaluate(config, workdir)
  losses = train_losses(workdir)
  assert result["step"] == 6 and all(np.isfinite(losses[s]) for s in (5, 6))
  assert [losses[s] for s in (1, 2, 3, 4)] == [good[s] for s in (1, 2, 3, 4)]


def test_divergence_before_any_checkpoint_says_so(tmp_path, monkeypatch):
  class Exploding(_CodesTask):
    def train_step(self, state, batch, rng, frozen):
      state, metrics = super().train_step(state, batch, rng, frozen)
      metrics["loss"] = jnp.where(state.step >= 2, jnp.nan, metrics["loss"])
      return state, metrics

  config = _toy_codes_config(monkeypatch, 5, every_steps=100)
  with pytest.raises(errors.DivergenceError, match="No checkpoint was saved before it diverged"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"), task=Exploding(config))


@pytest.mark.parametrize("spike_steps", [(4,), (4, 5, 6, 7, 8)])
def test_a_finite_loss_that_stays_exploded_stops_the_run(tmp_path, monkeypatch, spike_steps):
  """A loss 1e6 times its usual size at one step is survived (the checkpoints before it are
  not trusted); staying there for three checks stops the run as a non-finite loss does, with
  the last good checkpoint kept and named."""

  class Spiking(_CodesTask):
    def train_step(self, state, batch, rng, frozen):
      state, metrics = super().train_step(state, batch, rng, frozen)
      spike = jnp.isin(state.step, jnp.asarray(spike_steps))
      metrics["loss"] = jnp.where(spike, metrics["loss"] * 1e6 + 1e6, metrics["loss"])
      return state, metrics

  config = _toy_codes_config(monkeypatch, 10, every_steps=1, keep=2)
  workdir = str(tmp_path / "w")
  if len(spike_steps) == 1:
    assert trainer.train_and_evaluate(config, workdir, task=Spiking(config))["step"] == 10
    return
  with pytest.raises(errors.DivergenceError, match="exploded by step 4 .*by step 6") as e:
    trainer.train_and_evaluate(config, workdir, task=Spiking(config))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  # Checkpoint 3's parameters gave step 4's loss: 2 is the last good one, kept although keep=2.
  assert ckpt.latest_step() == 2 and ckpt.last_good_step() == 2
  assert f"{workdir}/checkpoints/2" in str(e.value) and "\n" not in str(e.value)
  assert all(s in ckpt.bad_steps() for s in ckpt.all_steps() if s > 2)
  ckpt.close()
