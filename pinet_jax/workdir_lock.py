"""One training run per work directory at a time.

Two runs started into the same work directory would save checkpoints over
each other's and interleave their metrics.jsonl records, and both would
report success. The first run therefore holds an exclusive lock on the
directory itself, so the lock leaves no file behind, and a second run
stops at once.

NOTE: flock on a directory is checked on local Linux file systems only. A
network file system may refuse it, which gives a warning and no lock, or
may lock only within one host. A lock file opened for writing, locked
with fcntl.lockf, would cover NFS.
"""

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from absl import logging

from pinet_jax.errors import ConfigError


class WorkdirInUseError(ConfigError):
  """Another training run holds the lock of the work directory."""


def in_use_error(workdir: str) -> WorkdirInUseError:
  """Return the error for a `workdir` that another run is using."""
  return WorkdirInUseError(
    f'--workdir {workdir} is in use by another training run; wait for it '
    'to finish or choose another --workdir'
  )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Hold an exclusive lock on the existing folder `workdir` while inside.

  The operating system releases the lock when the process exits, however
  it exits. A folder that cannot be locked (one without read permission,
  or on a file system without locks) gets a warning and no lock.

  Raises:
    WorkdirInUseError: another process holds the lock.
  """
  try:
    descriptor = os.open(workdir, os.O_RDONLY)
  except OSError as error:
    _warn_unlocked(workdir, error)
    yield
    return
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise in_use_error(workdir) from error
      _warn_unlocked(workdir, error)
    yield
  finally:
    os.close(descriptor)


def _warn_unlocked(workdir: str, error: OSError) -> None:
  logging.warning(
    'Cannot lock --workdir %s (%s); make sure no other run uses it.',
    workdir,
    error.strerror,
  )
