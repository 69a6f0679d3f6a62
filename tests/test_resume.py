"""Stopping, checkpointing and resuming: exact on CPU and safe from kill -9."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import ml_collections
import optax
import pytest

from pinet_jax import checkpoints, models, progress, steps, train
from pinet_jax.config import default_config
from pinet_jax.errors import ConfigError
from pinet_jax.interrupts import TrainingInterrupted

from conftest import restore_latest_state

# tiny: 1,000 training images in batches of 64, so 15 steps per epoch.
STEPS_PER_EPOCH = 15


def assert_same_state(first, second):
  assert int(first.step) == int(second.step)
  chex.assert_trees_all_equal(first.params, second.params)
  chex.assert_trees_all_equal(first.opt_state, second.opt_state)


def progress_records(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def unfinished_saves(directory):
  return [
    name for name in os.listdir(directory) if 'orbax-checkpoint-tmp' in name
  ]


def test_resume_mid_epoch_matches_uninterrupted_run(tiny_config, tmp_path):
  # Augmentation makes the random crops and flips part of the check.
  tiny_config.augment = True
  tiny_config.num_train_steps = 20
  train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))

  # Stop after 10 steps, in the middle of the first epoch, then train 10 more.
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  tiny_config.num_train_steps = 20
  final = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  assert final['step'] == 20

  straight = restore_latest_state(tmp_path / 'straight', tiny_config, 20)
  resumed = restore_latest_state(tmp_path / 'resumed', tiny_config, 20)
  assert int(resumed.step) == 20
  assert_same_state(straight, resumed)


def test_sigterm_saves_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
  tiny_config.num_train_steps = 20
  tiny_config.log_every_steps = 1
  train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))

  write = progress.MetricsFile.write

  def write_then_terminate(metrics_file, record):
    write(metrics_file, record)
    if record.get('step') == 7 and 'train_loss' in record:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(progress.MetricsFile, 'write', write_then_terminate)
  workdir = tmp_path / 'stopped'
  with pytest.raises(TrainingInterrupted) as stopped:
    train.train_and_evaluate(tiny_config, str(workdir))
  monkeypatch.undo()
  # Step 7's line is written while step 8 runs, so step 8 is the one that
  # finishes and is saved.
  assert 'stopped at step 8;' in str(stopped.value)
  assert checkpoints.latest_complete_step(str(workdir / 'checkpoints')) == 8
  assert unfinished_saves(workdir / 'checkpoints') == []

  final = train.train_and_evaluate(tiny_config, str(workdir))
  assert final['step'] == 20
  assert_same_state(
    restore_latest_state(tmp_path / 'straight', tiny_config, 20),
    restore_latest_state(workdir, tiny_config, 20),
  )


def test_checkpoint_every_k_steps(tiny_config, tmp_path):
  tiny_config.num_train_steps = 20
  tiny_config.checkpoint_every_steps = 4
  tiny_config.keep_checkpoints = 10
  train.train_and_evaluate(tiny_config, str(tmp_path))
  manager = checkpoints.create_manager(str(tmp_path / 'checkpoints'), 10)
  assert manager.all_steps() == [4, 8, 12, STEPS_PER_EPOCH, 16, 20]
  manager.close()
  # The last save was asynchronous and is committed before the return.
  assert unfinished_saves(tmp_path / 'checkpoints') == []


# A script that saves two checkpoints of a PolyNet and kills itself with
# SIGKILL right after the second save returned. orbax is then still writing
# the 1.2M parameters and their Adam moments in the background, and the test
# checks that the save was unfinished.
KILLED_DURING_SAVE = """
import os, signal, sys
import jax, optax
from pinet_jax import checkpoints, models, steps
from pinet_jax.config import default_config

model = models.PolyNet()
state = steps.create_train_state(
  model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
)
manager = checkpoints.create_manager(sys.argv[1], 3)
checkpoints.save(manager, state, default_config(), 10)
manager.wait_until_finished()
checkpoints.save(manager, state.replace(step=1), default_config(), 10)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_save_keeps_last_checkpoint(tmp_path):
  directory = tmp_path / 'checkpoints'
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(KILLED_DURING_SAVE), directory],
    capture_output=True,
    timeout=300,
  )
  assert result.returncode == -signal.SIGKILL
  assert sorted(os.listdir(directory)) == ['0', '1.orbax-checkpoint-tmp']
  assert checkpoints.latest_complete_step(str(directory)) == 0
  with pytest.raises(checkpoints.CheckpointError, match='does not exist'):
    checkpoints.find_checkpoint(str(directory / '1'), '--config.resume_from')

  model = models.PolyNet()
  saved = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  template = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(5)
  )
  manager = checkpoints.create_manager(str(directory), 3)
  restored = checkpoints.restore_latest(manager, template, default_config(), 10)
  assert_same_state(restored, saved)
  # The next save waits for the removal of the stale temporary folder.
  checkpoints.save(manager, saved.replace(step=2), default_config(), 10)
  manager.wait_until_finished()
  manager.close()
  assert sorted(os.listdir(directory)) == ['0', '2']


def test_find_checkpoint_accepts_three_layouts(tiny_config, tmp_path):
  tiny_config.num_train_steps = 4
  tiny_config.checkpoint_every_steps = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  folder = str(tmp_path / 'checkpoints')
  option = '--config.resume_from'
  found = [
    checkpoints.find_checkpoint(str(tmp_path), option),
    checkpoints.find_checkpoint(folder, option),
    checkpoints.find_checkpoint(f'{folder}/2', option),
  ]
  assert found == [
    checkpoints.CheckpointPath(folder, 4),
    checkpoints.CheckpointPath(folder, 4),
    checkpoints.CheckpointPath(folder, 2),
  ]


def test_resume_from_path_then_own(tiny_config, tmp_path):
  tiny_config.num_train_steps = 20
  train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, str(tmp_path / 'first'))

  tiny_config.resume_from = str(tmp_path / 'first' / 'checkpoints' / '10')
  tiny_config.num_train_steps = 20
  second = tmp_path / 'second'
  train.train_and_evaluate(tiny_config, str(second))
  train_steps = [
    record['step']
    for record in progress_records(second)
    if 'train_loss' in record
  ]
  assert train_steps[0] > 10
  assert_same_state(
    restore_latest_state(tmp_path / 'straight', tiny_config, 20),
    restore_latest_state(second, tiny_config, 20),
  )

  # A rerun with the same option continues from the run's own step 20,
  # even with the source gone.
  shutil.rmtree(tmp_path / 'first')
  tiny_config.num_train_steps = 22
  lines_before = len(progress_records(second))
  train.train_and_evaluate(tiny_config, str(second))
  added = progress_records(second)[lines_before:]
  assert [record['step'] for record in added if 'train_loss' in record] == [22]


def test_checkpoint_without_newer_fields_resumes(tmp_path):
  model = models.PolyNet(width=4)
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  newer = ('checkpoint_every_steps', 'resume_from', 'skip_nonfinite_updates')
  older = ml_collections.ConfigDict(
    {
      key: value
      for key, value in default_config().to_dict().items()
      if key not in newer and key != 'max_consecutive_skips'
    }
  )
  manager = checkpoints.create_manager(str(tmp_path), 3)
  checkpoints.save(manager, state, older, 10)
  manager.wait_until_finished()
  restored = checkpoints.restore_latest(manager, state, default_config(), 10)
  assert int(restored.step) == 0

  skipping = default_config()
  skipping.skip_nonfinite_updates = True
  with pytest.raises(ConfigError, match='skip_nonfinite_updates=False but'):
    checkpoints.restore_latest(manager, state, skipping, 10)
  manager.close()


def test_unreadable_checkpoint_is_checkpoint_error(tmp_path):
  model = models.PolyNet(width=4)
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  manager = checkpoints.create_manager(str(tmp_path), 3)
  checkpoints.save(manager, state, default_config(), 10)
  manager.wait_until_finished()
  (tmp_path / '0' / 'metadata' / 'metadata').write_text('{"config": ')
  with pytest.raises(
    checkpoints.CheckpointError,
    match=re.escape(f'cannot read checkpoint {tmp_path}/0'),
  ):
    checkpoints.restore_latest(manager, state, default_config(), 10)
  manager.close()
