"""Stopping training cleanly on SIGINT (Ctrl-C) and SIGTERM.

The training loop checks a `StopRequest` between steps, saves a
checkpoint and raises `TrainingInterrupted`, so a rerun resumes where the
run stopped.
"""

import contextlib
import signal
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging


class TrainingInterrupted(Exception):
  """SIGINT or SIGTERM stopped training after its checkpoint was committed."""


class InterruptedTwice(KeyboardInterrupt):
  """A second SIGINT or SIGTERM, which stops without saving."""


class StopRequest:
  """Records SIGINT and SIGTERM so the loop stops at a step boundary.

  The first signal sets `requested`; a second one raises InterruptedTwice
  at once, for a user who does not want to wait for the checkpoint.
  """

  def __init__(self):
    self.requested = False

  def __call__(self, signum: int, frame: Any) -> None:
    del frame
    if self.requested:
      raise InterruptedTwice
    self.requested = True
    logging.warning(
      'Received %s: finishing the steps already queued, then saving a '
      'checkpoint and stopping; send it again to stop at once without '
      'saving.',
      signal.Signals(signum).name,
    )


@contextlib.contextmanager
def stop_on_signals(
  signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[StopRequest]:
  """Install a `StopRequest` for `signums` within the block."""
  request = StopRequest()
  previous = {signum: signal.signal(signum, request) for signum in signums}
  try:
    yield request
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
