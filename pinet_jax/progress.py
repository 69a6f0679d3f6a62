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

  Call `report` with the current step. The rate covers the steps since the
  previous report. The ETA divides the remaining steps by the mean rate
  since this object was created, because an interval of a few steps, such
  as the end of an epoch, is too short to predict the rest of the run.
  """

  def __init__(
    self,
    step: int,
    total_steps: int,
    batch_size: int,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self._clock = clock
    self._start_step, self._start_time = step, clock()
    self._step, self._time = self._start_step, self._start_time
    self._total_steps = total_steps
    self._batch_size = batch_size

  def report(self, step: int) -> tuple[float, float]:
    """Return (images per second, seconds left) and restart the interval."""
    now = self._clock()
    interval_rate = _steps_per_second(step - self._step, now - self._time)
    mean_rate = _steps_per_second(
      step - self._start_step, now - self._start_time
    )
    self._step, self._time = step, now
    remaining = self._total_steps - step
    eta = remaining / mean_rate if mean_rate else float('inf')
    return interval_rate * self._batch_size, eta


def _steps_per_second(steps: int, seconds: float) -> float:
  return steps / max(seconds, 1e-9)


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
    if enabled:
      _end_last_line(path)

  def write(self, record: dict[str, Any]) -> None:
    """Append `record` with its 'time', then pass it to `on_write`."""
    if not self._enabled:
      return
    record = {**record, 'time': time.time()}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    if self._on_write is not None:
      self._on_write(record)


def _end_last_line(path: str) -> None:
  """Terminate the last line of `path` if a killed process cut it short.

  The next record then starts a line of its own instead of extending the
  partial one into a second line that is not valid JSON.
  """
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return
  with open(path, 'rb+') as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b'\n':
      f.write(b'\n')
