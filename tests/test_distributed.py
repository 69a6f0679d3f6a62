"""Training across devices and processes, on simulated CPU devices.

XLA splits the host CPU into N devices with
--xla_force_host_platform_device_count=N, which must be set before JAX
starts, so every run here is a real subprocess of the command line.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from pinet_jax import checkpoints, workdir_lock

from conftest import (
  REPO_ROOT,
  assert_one_line_error,
  command,
  read_metrics,
  run,
)

STEPS = 10


def devices(count):
  return {'XLA_FLAGS': f'--xla_force_host_platform_device_count={count}'}


def train(workdir, data_flags, device_count, *overrides, config='tiny'):
  result = run(
    command(
      config,
      workdir,
      *data_flags,
      f'--config.num_train_steps={STEPS}',
      f'--config.checkpoint_every_steps={STEPS // 2}',
      *overrides,
    ),
    env=devices(device_count),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def state_at(workdir, step):
  return checkpoints.read_state_arrays(str(workdir / 'checkpoints'), step)


def relative_difference(first, second):
  """Return ||a - b|| / ||b|| over all the arrays of two trees together.

  Per array, the zero-initialised BatchNorm biases, of norm 2e-4 after 10
  steps, would turn rounding of 2e-9 into a 1e-5 relative difference.
  """
  import jax

  def flat(tree):
    leaves = jax.tree.leaves(tree)
    return np.concatenate(
      [np.ravel(leaf).astype(np.float64) for leaf in leaves]
    )

  a, b = flat(first), flat(second)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# The reference network, and a Π-net ResNet whose BatchNorm statistics
# must come from the global batch for the runs to agree.
MODELS = {
  'polynet': [],
  'pi_resnet': [
    '--config.model=pi_resnet',
    '--config.model_kwargs=' + '{"width": 4, "stage_sizes": (1, 1)}',
    '--config.optimizer=sgd',
    '--config.learning_rate=0.05',
  ],
}


@pytest.mark.parametrize('model', sorted(MODELS))
def test_eight_devices_train_like_one(model, data_flags, tmp_path):
  overrides = [*MODELS[model], '--config.batch_size=128']
  # Evaluation batches round up to a multiple of the devices.
  sharded = train(
    tmp_path / 'eight',
    data_flags,
    8,
    *overrides,
    '--config.eval_batch_size=100',
  )
  single = train(tmp_path / 'one', data_flags, 1, *overrides)

  assert 'Mesh of 8 cpu devices (data 8 x model 1) in 1 process(es): ' in (
    sharded.stderr
  )
  assert 'global batch 128, 16 per device.' in sharded.stderr
  assert 'Mesh of 1 cpu devices' in single.stderr
  assert '--config.eval_batch_size=100 rounded up to 104' in sharded.stderr
  evaluations = [
    r for r in read_metrics(tmp_path / 'eight') if 'eval_count' in r
  ]
  assert evaluations[-1]['eval_count'] == 500
  eight, one = (
    state_at(tmp_path / 'eight', STEPS),
    state_at(tmp_path / 'one', STEPS),
  )
  for collection in ('params', 'batch_stats'):
    if one[collection]:
      difference = relative_difference(eight[collection], one[collection])
      assert difference < 1e-5, (collection, difference)
  # The last steps moved the parameters far more than the runs differ.
  halfway = state_at(tmp_path / 'one', STEPS // 2)
  assert relative_difference(one['params'], halfway['params']) > 1e-3


def test_batch_that_does_not_split_is_an_error(data_flags, tmp_path):
  workdir = tmp_path / 'run'
  result = run(
    command('tiny', workdir, *data_flags, '--config.batch_size=100'),
    env=devices(8),
  )
  assert result.returncode == 1
  assert_one_line_error(
    result,
    '--config.batch_size=100 does not split evenly across the 8 devices',
    'use a multiple of 8, such as 96 or 104',
  )
  assert not workdir.exists()


def free_local_port():
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def start_process(args, process_id, port):
  """Start one of 2 processes of a run, each with 2 CPU devices."""
  return subprocess.Popen(
    [
      *args,
      '--distributed',
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      f'--process_id={process_id}',
    ],
    cwd=REPO_ROOT,
    env={**os.environ, **devices(2)},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_two_processes_train_and_one_process_restores(data_flags, tmp_path):
  workdir = tmp_path / 'run'
  args = command(
    'tiny',
    workdir,
    *data_flags,
    f'--config.num_train_steps={STEPS}',
    f'--config.checkpoint_every_steps={STEPS // 2}',
  )
  port = free_local_port()
  processes = [start_process(args, rank, port) for rank in (0, 1)]
  logs = []
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    logs.append(stderr)
    assert process.returncode == 0, stderr[-3000:]

  first, second = logs
  assert 'Mesh of 4 cpu devices (data 4 x model 1) in 2 process(es): ' in first
  assert 'global batch 64, 16 per device.' in first
  # The second process logs warnings only, and writes no metrics.
  assert 'Mesh of' not in second
  records = read_metrics(workdir)
  assert [r['event'] for r in records if 'event' in r] == ['start']
  train_steps = [r['step'] for r in records if 'train_loss' in r]
  assert train_steps == sorted(set(train_steps))
  logged = [r for r in records if 'eval_accuracy' in r][-1]
  assert logged['step'] == STEPS
  assert logged['eval_count'] == 500
  assert checkpoints.latest_complete_step(str(workdir / 'checkpoints')) == STEPS

  # Each process fed its own rows: the run equals one process on 4 devices.
  train(tmp_path / 'one', data_flags, 4)
  two = state_at(workdir, STEPS)['params']
  one = state_at(tmp_path / 'one', STEPS)['params']
  assert relative_difference(two, one) < 1e-5

  # One process on one device reads the checkpoint of four devices.
  evaluated = run(
    [
      sys.executable,
      '-m',
      'pinet_jax.cli',
      'evaluate',
      f'--workdir={workdir}',
      '--json',
    ],
    env=devices(1),
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  evaluation = json.loads(evaluated.stdout)
  assert evaluation['step'] == STEPS
  assert evaluation['accuracy'] == logged['eval_accuracy']
  assert evaluation['loss'] == pytest.approx(logged['eval_loss'], rel=1e-5)
  # ... and resumes training from it.
  resumed = run([*args[:-2], f'--config.num_train_steps={STEPS + 5}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming at step {STEPS} of {STEPS + 5}.' in resumed.stderr


def test_locked_workdir_stops_every_process(data_flags, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  args = command('tiny', workdir, *data_flags)
  port = free_local_port()
  with workdir_lock.hold(str(workdir)):
    processes = [start_process(args, rank, port) for rank in (0, 1)]
    # Only process 0 tries the lock; process 1 learns the outcome from it
    # instead of waiting at the next barrier until JAX's timeout.
    for process in processes:
      _, stderr = process.communicate(timeout=300)
      assert process.returncode == 1, stderr[-3000:]
      assert (
        f'error: --workdir {workdir} is in use by another training run'
        in stderr
      )
  assert list(workdir.iterdir()) == []
