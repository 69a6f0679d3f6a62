"""Optimisers and learning-rate schedules built from the config."""

import ml_collections
import optax


def learning_rate_schedule(
  config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
  """Return the learning rate as a function of the step.

  Args:
    config: reads learning_rate, schedule and warmup_fraction.
    total_steps: optimiser steps in the whole run; cosine schedules reach 0
      there.
  """
  peak = config.learning_rate
  if config.schedule == 'constant':
    return optax.constant_schedule(peak)
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
  """Return the optimiser named by config.optimizer with its schedule."""
  schedule = learning_rate_schedule(config, total_steps)
  if config.optimizer == 'adam':
    return optax.adam(schedule)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  )
