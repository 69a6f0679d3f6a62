"""The training log: each step's metrics, checked and reported per interval.

A step's metrics stay on the device until their interval is written, which
happens after the next step is queued, so logging does not idle the device.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from pinet_jax import divergence, progress


class TrainLog:
  """Checks every step's metrics and logs them, one line per interval.

  Writing an interval first passes each of its steps through
  `divergence.find_divergence` and raises `divergence.Diverged` for the
  first step that diverged. The line then reports the mean loss and
  accuracy of the steps whose updates were applied, the img/s since the
  previous line, an ETA and, with skipping, the skipped updates so far.
  """

  def __init__(
    self,
    metrics_file: progress.MetricsFile,
    steps_per_epoch: int,
    total_steps: int,
    batch_size: int,
    max_consecutive_skips: int | None,
    learning_rate: Callable[[int], Any],
  ):
    """Create an empty log.

    Args:
      metrics_file: receives one JSON record per line written.
      steps_per_epoch: training batches per epoch, to report the epoch.
      total_steps: the run's length, for the progress bar and ETA.
      batch_size: examples per step, for img/s.
      max_consecutive_skips: see `divergence.was_skipped`.
      learning_rate: the optimiser's schedule, step -> rate; each line
        reports the rate of its interval's last update.
    """
    self._metrics_file = metrics_file
    self._steps_per_epoch = steps_per_epoch
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._max_consecutive_skips = max_consecutive_skips
    self._learning_rate = learning_rate
    self._pending: list[dict[str, jax.Array]] = []
    self._deferred: tuple[int, list[dict[str, jax.Array]]] | None = None
    self._throughput: progress.Throughput | None = None

  def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Add the metrics of the step that brought the state to `step`.

    Call it right after queueing the step: an interval deferred by
    `end_interval` is written first, while the device runs this step.
    """
    if self._throughput is None:
      self._throughput = progress.Throughput(
        step - 1, self._total_steps, self._batch_size
      )
    if self._deferred is not None:
      deferred, self._deferred = self._deferred, None
      self._write(*deferred)
    self._pending.append(metrics)

  def end_interval(self, step: int) -> None:
    """End the interval at `step`, for the next `record` to write."""
    self._deferred, self._pending = (step, self._pending), []

  def flush(self, step: int) -> None:
    """Write every step up to `step`, waiting for them to finish."""
    if self._deferred is not None:
      deferred, self._deferred = self._deferred, None
      self._write(*deferred)
    if self._pending:
      pending, self._pending = self._pending, []
      self._write(step, pending)

  def restart_rate(self) -> None:
    """Start the next img/s measurement at the next step, e.g. after eval."""
    self._throughput = None

  def _write(self, step: int, pending: list[dict[str, jax.Array]]) -> None:
    records = jax.device_get(pending)
    found = divergence.find_divergence(
      records, step - len(records) + 1, self._max_consecutive_skips
    )
    if found is not None:
      raise divergence.Diverged(found)

    applied = [record for record in records if divergence.is_finite(record)]
    loss = _mean(applied, 'loss')
    accuracy = _mean(applied, 'accuracy')
    images_per_second, eta = self._throughput.report(step)
    epoch = step / self._steps_per_epoch
    skip_count = 0
    if self._max_consecutive_skips is not None:
      skip_count = int(records[-1]['nonfinite_updates'])
    record = {
      'step': step,
      'epoch': epoch,
      'train_loss': loss,
      'train_accuracy': accuracy,
      'grad_norm': _mean(applied, 'grad_norm'),
      'param_norm': _mean(applied, 'param_norm'),
      # The schedule counts applied updates from 0, so the last update of
      # the interval used the rate of its count before it: the steps so
      # far, less one, less the skipped ones.
      'learning_rate': float(self._learning_rate(step - 1 - skip_count)),
      'images_per_second': images_per_second,
    }

    skipped = ''
    if self._max_consecutive_skips is not None:
      record['skipped_updates'] = skip_count
      skipped = f', {record["skipped_updates"]} updates skipped so far'
    logging.info(
      '%s step %d/%d (epoch %.2f): train_loss %s, train_accuracy %s, '
      '%.0f img/s, ETA %s%s',
      progress.progress_bar(step, self._total_steps),
      step,
      self._total_steps,
      epoch,
      'n/a' if loss is None else f'{loss:.4f}',
      'n/a' if accuracy is None else f'{100 * accuracy:.2f}%',
      images_per_second,
      progress.format_duration(eta),
      skipped,
    )
    self._metrics_file.write(record)


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
  """Return the mean of `key` over `records`, None when there are none."""
  if not records:
    return None
  return float(np.mean([record[key] for record in records]))
