"""Optimisers and learning-rate schedules built from the config."""

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(
  config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
  """Return the learning rate as a function of the step.

  Args:
    config: reads learning_rate, schedule, warmup_fraction, and for the
      'step' schedule decay_fractions and decay_factor.
    total_steps: optimiser steps in the whole run; cosine schedules reach 0
      there.
  """
  peak = config.learning_rate
  if config.schedule == 'constant':
    return optax.constant_schedule(peak)
  if config.schedule == 'step':
    # Multiply by decay_factor at each fraction of the run, so that a
    # shortened run keeps the recipe's proportions.
    boundaries = {
      int(fraction * total_steps): config.decay_factor
      for fraction in config.decay_fractions
    }
    return optax.piecewise_constant_schedule(peak, boundaries)
  if config.schedule == 'cosine':
    return optax.cosine_decay_schedule(peak, decay_steps=total_steps)
  warmup_steps = int(config.warmup_fraction * total_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
  )


def create_optimizer(
  config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """Return the optimiser named by config.optimizer with its schedule.

  With a positive config.grad_clip_norm, the gradients are first clipped
  to that global norm. With config.skip_nonfinite_updates, the optimiser
  is wrapped in `optax.apply_if_finite`: a step whose gradients are NaN or
  infinite leaves the parameters and the inner optimiser state unchanged,
  and `skip_counters` reads the counts from the state.
  """
  optimizer = _base_optimizer(
    config, learning_rate_schedule(config, total_steps)
  )
  if config.grad_clip_norm:
    optimizer = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm), optimizer
    )
  if config.skip_nonfinite_updates:
    return optax.apply_if_finite(
      optimizer, max_consecutive_errors=config.max_consecutive_skips
    )
  return optimizer


def _base_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  if config.optimizer == 'adam':
    return optax.adam(schedule)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  )


def skip_counters(opt_state: Any) -> dict[str, jax.Array]:
  """Return the counters of `optax.apply_if_finite` in `opt_state`.

  Returns:
    {} when the optimiser has no such wrapper. Otherwise
    'nonfinite_updates', the steps with non-finite gradients since the
    run began, and 'consecutive_nonfinite', those in a row up to the
    latest step, both int32 scalars. `apply_if_finite` skips such a step
    while 'consecutive_nonfinite' is at most its max_consecutive_errors and
    applies it after that.
  """
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return {}
  return {
    'nonfinite_updates': opt_state.total_notfinite,
    'consecutive_nonfinite': opt_state.notfinite_count,
  }
