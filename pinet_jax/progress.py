"""Progress reports and the metrics file of a training run."""

import json
import os
import time
from collections.abc import Callable
from typing import Any

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
  """Format `seconds` as '1h02m03s', '2m03s' or '3s'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{seconds:02d}s'
  if minutes:
    return f'{minutes}m{seconds:02d}s'
  return f'{seconds}s'


def progress_bar(done: int, total: int) -> str:
  """Return a bar such as '[#####---------------]  25%'."""
  fraction = min(max(done / total, 0.0), 1.0) if total else 1.0
  filled = int(fraction * BAR_WIDTH)
  return f'[{"#" * filled}{"-" * (BAR_WIDTH - filled)}] {fraction:4.0%}'


class Throughput:
  """Images per second between reports, and the time left for a run.

  Call `report` with the current step; the rate covers the steps since the
  previous report, and the ETA assumes that rate for the remaining steps.
  """

  def __init__(self, step: int, total_steps: int, batch_size: int):
    self._step = step
    self._time = time.perf_counter()
    self._total_steps = total_steps
    self._batch_size = batch_size

  def report(self, step: int) -> tuple[float, float]:
    """Return (images per second, seconds left) and restart the interval."""
    now = time.perf_counter()
    elapsed = max(now - self._time, 1e-9)
    steps_per_second = (step - self._step) / elapsed
    self._step, self._time = step, now
    remaining = self._total_steps - step
    eta = remaining / steps_per_second if steps_per_second else float('inf')
    return steps_per_second * self._batch_size, eta


class MetricsFile:
  """Appends one JSON object per line to `path`, flushing each line.

  Appending keeps the lines of earlier, resumed runs in the same file. Every
  record gets 'time', the Unix time at which it was written, from which
  reports compute the wall time of a run.
  """

  def __init__(
    self,
    path: str,
    on_write: Callable[[dict[str, Any]], None] | None = None,
    enabled: bool = True,
  ):
    """Create the file's folder if needed.

    Args:
      path: the JSON-lines file.
      on_write: called with each record after it is written, such as a
        TensorBoard writer.
      enabled: False drops every record, for all but one process of a
        multi-process run.
    """
    self.path = path
    self._on_write = on_write
    self._enabled = enabled
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, record: dict[str, Any]) -> None:
    """Append `record` with its 'time', then pass it to `on_write`."""
    if not self._enabled:
      return
    record = {**record, 'time': time.time()}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    if self._on_write is not None:
      self._on_write(record)
