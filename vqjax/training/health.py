"""Which saved checkpoints are good, judged from the losses that followed them (the trainer's
divergence handling: a non-finite loss stops the run, an exploded one marks the checkpoints
before it bad and stops the run if it stays).

Every train step folds its loss into a device-side watch (`fold`): the worst loss since the
last check and the first step whose loss was non-finite. `Health.check`, on log and checkpoint
steps, pulls it to the host and judges the steps since the previous check.
"""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqjax import errors
from vqjax.training import checkpoint, sharding

# A check window whose worst loss exceeds this many times the median of the recent windows'
# worst losses is "exploded": the checkpoints before it are not trusted as good.
EXPLODED_RATIO = 100.0
# This many exploded windows in a row stop the run, as a non-finite loss does: a spike the
# run recovers from is survived, parameters blown up to finite garbage are not trained on.
EXPLODED_PATIENCE = 3
# "No non-finite loss yet" in the device-side watch of the losses.
NEVER = np.iinfo(np.int32).max


def new_watch(mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """The device-side loss watch with nothing seen yet, replicated over `mesh`."""
  repl = sharding.replicated(mesh)
  return {
    "worst": jax.device_put(jnp.float32(-jnp.inf), repl),
    "first_bad": jax.device_put(jnp.int32(NEVER), repl),
  }


def fold(watch: dict[str, jax.Array], loss: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
  """`watch` after the loss of `step` (pure, inside the jitted step): the largest loss so far
  (inf when non-finite) and the first step whose loss was non-finite."""
  loss = jnp.asarray(loss, jnp.float32)
  finite = jnp.isfinite(loss)
  worst = jnp.maximum(watch["worst"], jnp.where(finite, loss, jnp.inf))
  first = watch["first_bad"]
  return {"worst": worst, "first_bad": jnp.where(finite | (first != NEVER), first, step)}


class Health:
  """Decides which saved checkpoints are good from the losses that followed them.

  The train step folds each loss into `watch` on the device (`fold`); `check` pulls it on log
  and checkpoint steps. Checkpoints saved before a sane window are good; those saved before a
  non-finite or exploded window are bad.

  Args:
    ckpt: the run's checkpointer (bad and good steps are recorded in it).
    mesh: where the watch lives.
    pending: saved steps no window has judged yet (a resumed run's restored step).
  """

  def __init__(self, ckpt: checkpoint.Checkpointer, mesh: jax.sharding.Mesh, pending: list[int]):
    self.ckpt, self._mesh = ckpt, mesh
    self.watch = new_watch(mesh)  # the train step's input and output
    self.pending = list(pending)  # saved steps no window has judged yet
    self.history: list[float] = []  # worst loss of recent sane windows
    self.exploded: list[int] = []  # the steps ending the current run of exploded windows

  def check(self, step: int) -> None:
    """Judges the losses since the last check (pulls the watch and starts a new one)."""
    watch = jax.device_get(self.watch)
    worst = float(watch["worst"])
    if worst != -np.inf:  # a step ran since the last check
      self.watch = new_watch(self._mesh)
    self.judge(worst, int(watch["first_bad"]), step)

  def saved(self, step: int) -> None:
    """Notes a checkpoint saved at `step`: the next window judges it."""
    self.pending.append(step)

  def _resume_hint(self) -> str:
    self.ckpt.wait()
    good = self.ckpt.latest_step()
    if good is None:
      return "No checkpoint was saved before it diverged: there is nothing to resume from."
    return f"A resume continues from the last good checkpoint, {self.ckpt.directory}/{good}."

  def judge(self, worst: float, first_bad: int, step: int) -> None:
    """Judges the window of steps ending at `step`.

    Args:
      worst: the window's largest loss (inf if one was non-finite, -inf if no step ran).
      first_bad: the first step whose loss was non-finite (`NEVER` if none).
      step: the current step.

    Raises:
      errors.DivergenceError: the window's loss was non-finite.
    """
    if worst == -np.inf:  # no step since the last check: nothing to judge
      return
    if first_bad != NEVER:
      # Step t's loss is computed with the parameters checkpoint t - 1 holds: that checkpoint
      # and later ones are bad; earlier ones gave finite losses.
      bad = [s for s in self.pending if s >= first_bad - 1]
      self.ckpt.mark_bad(bad)
      self.ckpt.mark_good([s for s in self.pending if s < first_bad - 1])
      self.pending = []
      raise errors.DivergenceError(
        f"the loss became non-finite at step {first_bad}; stopped. {self._resume_hint()} Lower "
        "config.optim.lr, set config.optim.grad_clip or check the input data."
      )
    recent = self.history[-8:]
    if recent and worst > EXPLODED_RATIO * statistics.median(recent):
      logging.warning(
        "loss exploded to %.4g by step %d (recent worst %.4g); checkpoints %s are not trusted",
        worst,
        step,
        statistics.median(recent),
        self.pending or "(none)",
      )
      self.ckpt.mark_bad(self.pending)
      self.pending = []
      self.exploded.append(step)
      if len(self.exploded) >= EXPLODED_PATIENCE:
        raise errors.DivergenceError(
          f"the loss exploded by step {self.exploded[0]} and stayed there ({worst:.4g} by step "
          f"{step}, against {statistics.median(recent):.4g} before); stopped. "
          f"{self._resume_hint()} Lower config.optim.lr or set config.optim.grad_clip."
        )
      return
    self.exploded = []
    self.history.append(worst)
    self.ckpt.mark_good([s for s in self.pending if s < step])
    self.pending = [s for s in self.pending if s >= step]
