"""The lock that keeps a second training run out of a work directory."""

import pytest

from pinet_jax import workdir_lock
from pinet_jax.errors import ConfigError

from conftest import assert_one_line_error, command, run


def test_second_holder_is_rejected(tmp_path):
  with (
    workdir_lock.hold(str(tmp_path)),
    pytest.raises(ConfigError, match='is in use by another training run'),
    workdir_lock.hold(str(tmp_path)),
  ):
    pass
  # Released on exit, and the lock left no file behind.
  with workdir_lock.hold(str(tmp_path)):
    assert list(tmp_path.iterdir()) == []


def test_run_into_locked_workdir_fails(data_flags, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with workdir_lock.hold(str(workdir)):
    result = run(command('tiny', workdir, *data_flags), timeout=240)
  assert result.returncode == 1, result.stderr[-3000:]
  assert_one_line_error(
    result, f'--workdir {workdir} is in use by another training run'
  )
  assert list(workdir.iterdir()) == []
