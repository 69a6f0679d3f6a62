"""The divergence guard: find the first training step that went non-finite.

Each product of a polynomial network multiplies activation scales, so a run
whose activations overflow once stays NaN from then on. The training loop
passes every step's metrics through `find_divergence` before it logs,
evaluates or saves a checkpoint, so a diverged state never replaces the
last good checkpoint.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence


class DivergenceError(FloatingPointError):
  """Training produced a NaN or infinite loss or gradient and stopped."""


@dataclasses.dataclass(frozen=True)
class Divergence:
  """The first step whose non-finite values the run did not skip.

  Attributes:
    step: the step's number, counted like the state's step. The state had
      consumed `step - 1` batches before it, and the step trained on the
      next one.
    loss: the step's training loss.
    grads_finite: whether every gradient of the step was finite.
    consecutive_nonfinite: steps in a row, up to this one, whose gradients
      were not finite; 0 when non-finite updates are not skipped.
  """

  step: int
  loss: float
  grads_finite: bool
  consecutive_nonfinite: int


class Diverged(Exception):
  """Raised inside the training loop to carry a `Divergence` out of it."""

  def __init__(self, divergence: Divergence):
    super().__init__(divergence)
    self.divergence = divergence


def is_finite(record: Mapping[str, float]) -> bool:
  """Return whether a step's loss and gradients were all finite."""
  return math.isfinite(record['loss']) and bool(record['grads_finite'])


def was_skipped(
  record: Mapping[str, float], max_consecutive_skips: int | None
) -> bool:
  """Return whether `optax.apply_if_finite` skipped this step's update.

  Args:
    record: the step's metrics, with 'consecutive_nonfinite' when updates
      are skipped (see `pinet_jax.optim.skip_counters`).
    max_consecutive_skips: the wrapper's max_consecutive_errors, or None
      when non-finite updates are not skipped.
  """
  if max_consecutive_skips is None:
    return False
  # The count is 0 after a step with finite gradients, and apply_if_finite
  # applies the update anyway once the count exceeds the maximum.
  consecutive = int(record['consecutive_nonfinite'])
  return 1 <= consecutive <= max_consecutive_skips


def find_divergence(
  records: Sequence[Mapping[str, float]],
  first_step: int,
  max_consecutive_skips: int | None,
) -> Divergence | None:
  """Return the first step of `records` that diverged, or None.

  A step diverged when its loss or a gradient is not finite and its update
  was not skipped. Without skipping, every such step diverged. With
  skipping, a step diverged when it passed the limit of consecutive skips,
  or when its loss was not finite but its gradients were, because
  apply_if_finite then applied the update.

  Args:
    records: per-step metrics on the host, in step order, each with 'loss',
      'grads_finite' and, when skipping, 'consecutive_nonfinite'.
    first_step: the step number of records[0], see `Divergence.step`.
    max_consecutive_skips: see `was_skipped`.
  """
  for offset, record in enumerate(records):
    if is_finite(record) or was_skipped(record, max_consecutive_skips):
      continue
    return Divergence(
      step=first_step + offset,
      loss=float(record['loss']),
      grads_finite=bool(record['grads_finite']),
      consecutive_nonfinite=int(record.get('consecutive_nonfinite', 0)),
    )
  return None


def first_overflowing_block(rms: Mapping[str, float]) -> str | None:
  """Return the first block, in call order, whose activations are not finite.

  Args:
    rms: block name to activation RMS, from `pinet_jax.models.activation_rms`.
  """
  return next(
    (name for name, value in rms.items() if not math.isfinite(value)), None
  )


def describe(
  divergence: Divergence,
  rms: Mapping[str, float],
  steps_per_epoch: int,
  kept_step: int | None,
  max_consecutive_skips: int | None,
) -> str:
  """Return a one-line message: the step, what overflowed and what to do.

  Args:
    divergence: from `find_divergence`.
    rms: each block's activation RMS on the diverging step's batch, with
      the parameters that the step started from.
    steps_per_epoch: training batches per epoch, to give the epoch.
    kept_step: the step of the latest checkpoint, or None when none exists.
    max_consecutive_skips: see `was_skipped`.
  """
  step = divergence.step
  epoch = (step - 1) // steps_per_epoch + 1
  parts = [f'training diverged at step {step} (epoch {epoch}): ']
  if max_consecutive_skips is not None and not divergence.grads_finite:
    parts.append(
      f'{divergence.consecutive_nonfinite} steps in a row had non-finite '
      f'gradients, more than --config.max_consecutive_skips='
      f'{max_consecutive_skips}. '
    )
  else:
    gradients = 'finite' if divergence.grads_finite else 'not all finite'
    parts.append(
      f'the loss is {divergence.loss} and the gradients are {gradients}. '
    )
  block = first_overflowing_block(rms)
  values = ', '.join(f'{name} {value:.3g}' for name, value in rms.items())
  if block is None:
    parts.append(
      "Every block's activations were finite on that batch, so the "
      'overflow is in the loss or the backward pass (activation RMS: '
      f'{values}). '
    )
  else:
    parts.append(
      f'{block} is the first block whose activations overflowed on that '
      f'batch (activation RMS: {values}). '
    )
  if kept_step is None:
    parts.append('No checkpoint was saved. ')
  else:
    parts.append(f'The last checkpoint, step {kept_step}, is kept. ')
  parts.append(
    'Lower --config.learning_rate or change --config.model_kwargs.init_scheme'
    ' (kernel_init for the ResNets)'
  )
  if max_consecutive_skips is None:
    parts.append(
      ', or set --config.skip_nonfinite_updates=True to skip such steps'
    )
  return ''.join(parts)
