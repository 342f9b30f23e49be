"""The optax optimiser and learning-rate schedule built from `config.optim`.

Adam / AdamW after a linear warmup, then a constant or cosine-decayed rate, with optional
global-norm clipping. The schedule is returned too so the trainer can log the current rate.
"""

import ml_collections
import optax

from vqjax import errors


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr`, then constant or cosine decay to 0.

  Args:
    optim: `config.optim`.
    total_steps: the run's length (`config.train.steps`), the end of the cosine decay.

  Returns:
    A function step -> learning rate.
  """
  warmup = max(int(optim.warmup_steps), 0)
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, decay_steps=max(total_steps - warmup, 1))
  else:
    raise errors.UserError(
      f"unknown optim.schedule {optim.schedule!r}; expected 'constant' or 'cosine'"
    )
  if warmup == 0:
    return after
  ramp = optax.linear_schedule(0.0, optim.lr, transition_steps=warmup)
  return optax.join_schedules([ramp, after], boundaries=[warmup])


def make_optimizer(
  optim: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimiser from `config.optim`.

  Args:
    optim: `config.optim` (name, lr, b1, b2, weight_decay, schedule, warmup_steps, grad_clip).
    total_steps: the run's length, used by the cosine schedule.

  Returns:
    (optimiser, schedule).
  """
  schedule = make_schedule(optim, total_steps)
  if optim.name == "adam":
    if optim.weight_decay:
      # Adam's L2 term differs from decoupled decay; refuse rather than silently pick one.
      raise errors.UserError("optim.weight_decay needs optim.name='adamw'")
    tx = optax.adam(schedule, b1=optim.b1, b2=optim.b2)
  elif optim.name == "adamw":
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  else:
    raise errors.UserError(f"unknown optim.name {optim.name!r}; expected 'adam' or 'adamw'")
  if optim.grad_clip and optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx, schedule
