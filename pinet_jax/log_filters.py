"""Filters that keep libraries' routine log records out of program output."""

import logging
import os


class QuietLibraryInfo(logging.Filter):
  """Drop INFO records of orbax, which logs a dozen lines per checkpoint."""

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f'{os.sep}orbax{os.sep}' in record.pathname
    return record.levelno >= logging.WARNING or not from_orbax
