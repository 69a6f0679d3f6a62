"""Filters that keep libraries' routine log records out of program output.

NOTE: TensorFlow's C++ start-up lines (the oneDNN notice and absl's
"before absl::InitializeLog()" warning) go to stderr before Python logging
starts, and this TensorFlow ignores TF_CPP_MIN_LOG_LEVEL, so they still
show. Silence them here once TensorFlow honours that variable again.
"""

import logging
import os

# Libraries whose INFO records repeat routine steps: orbax logs a dozen
# lines per checkpoint, tfds one per dataset it opens, and JAX names every
# accelerator backend it did not find.
_ROUTINE_INFO_SOURCES = (
  f'{os.sep}orbax{os.sep}',
  f'{os.sep}tensorflow_datasets{os.sep}',
  f'{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py',
)


class QuietLibraryInfo(logging.Filter):
  """Drop INFO records of orbax, tfds and JAX's backend discovery.

  Their warnings and errors pass, as do every record of this program.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(
      source in record.pathname for source in _ROUTINE_INFO_SOURCES
    )
