"""Routine library INFO records are dropped; warnings and our own pass."""

import logging
import os

import pytest

from pinet_jax.log_filters import QuietLibraryInfo


def record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


SITE = os.path.join(os.sep, 'venv', 'site-packages')


@pytest.mark.parametrize(
  'path, level, shown',
  [
    (
      os.path.join(SITE, 'orbax', 'checkpoint', 'manager.py'),
      logging.INFO,
      False,
    ),
    (
      os.path.join(SITE, 'tensorflow_datasets', 'core', 'reader.py'),
      logging.INFO,
      False,
    ),
    (os.path.join(SITE, 'jax', '_src', 'xla_bridge.py'), logging.INFO, False),
    (
      os.path.join(SITE, 'orbax', 'checkpoint', 'manager.py'),
      logging.WARNING,
      True,
    ),
    (os.path.join(SITE, 'jax', '_src', 'xla_bridge.py'), logging.ERROR, True),
    (os.path.join(SITE, 'jax', '_src', 'compiler.py'), logging.INFO, True),
    (os.path.join(os.sep, 'repo', 'pinet_jax', 'train.py'), logging.INFO, True),
  ],
)
def test_filter(path, level, shown):
  assert QuietLibraryInfo().filter(record(path, level)) is shown
