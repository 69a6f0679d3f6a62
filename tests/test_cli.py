"""The command line end to end, in real subprocesses on real MNIST."""

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest

from pinet_jax import steps

from conftest import REPO_ROOT

# The budget of the end-to-end run and the accuracy it must reach. The
# reference network with the MNIST config reached 96.11% after 300 steps
# of batch 128 (0.64 epochs; jax 0.10.2 on x86-64).
SMOKE_STEPS = 300
SMOKE_MIN_ACCURACY = 0.95


def command(config, workdir, *overrides):
  return [
    sys.executable,
    '-m',
    'pinet_jax.main',
    f'--config={REPO_ROOT / "experiments" / config}.py',
    f'--workdir={workdir}',
    *overrides,
  ]


def run(args, timeout=600):
  return subprocess.run(
    args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
  )


def read_metrics(workdir):
  lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.fixture
def data_flags(prepared_mnist, mnist_dir):
  root = Path(prepared_mnist.data_dir).parents[1]
  return [f'--config.data_dir={mnist_dir}', f'--config.tfds_data_dir={root}']


def test_train_mnist_reaches_accuracy(data_flags, tmp_path):
  result = run(
    command(
      'mnist',
      tmp_path,
      *data_flags,
      f'--config.num_train_steps={SMOKE_STEPS}',
      '--config.log_every_steps=50',
    )
  )
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stderr
  assert 'Compiled train_step' in log
  microbatch = steps.resolve_microbatch_size(0, 128, jax.default_backend())
  assert (
    f'Train step: {128 // microbatch} microbatches of {microbatch} '
    'examples (batch 128).'
  ) in log
  assert 'img/s, ETA' in log
  assert 'Final test accuracy' in log
  final = read_metrics(tmp_path)[-1]
  assert final['step'] == SMOKE_STEPS
  assert final['eval_count'] == 10_000
  assert final['eval_accuracy'] >= SMOKE_MIN_ACCURACY, final
  assert (tmp_path / 'checkpoints' / str(SMOKE_STEPS)).is_dir()


def wait_for_line(stream_lines, pattern, timeout):
  deadline = time.monotonic() + timeout
  seen = []
  while time.monotonic() < deadline:
    try:
      line = stream_lines.get(timeout=max(deadline - time.monotonic(), 0))
    except queue.Empty:
      break
    if line is None:
      break
    seen.append(line)
    if pattern in line:
      return seen
  raise AssertionError(f'{pattern!r} not logged; log:\n{"".join(seen)}')


def start(args):
  process = subprocess.Popen(
    args,
    cwd=REPO_ROOT,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  lines = queue.Queue()

  def pump():
    for line in process.stderr:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  return process, lines


def test_interrupt_saves_and_rerun_resumes(data_flags, tmp_path):
  args = command(
    'tiny',
    tmp_path,
    *data_flags,
    '--config.num_epochs=1000',
    '--config.log_every_steps=5',
  )
  process, lines = start(args)
  try:
    wait_for_line(lines, 'step 10/', timeout=300)
    process.send_signal(signal.SIGINT)
    log = ''.join(wait_for_line(lines, 'rerun the same command', timeout=60))
    assert process.wait(timeout=60) == 130
  finally:
    process.kill()
  assert 'Received SIGINT' in log
  interrupted_at = int(re.search(r'stopped at step (\d+)', log).group(1))
  assert interrupted_at >= 10
  saved = sorted(
    int(path.name)
    for path in (tmp_path / 'checkpoints').iterdir()
    if path.name.isdigit()
  )
  assert saved[-1] == interrupted_at

  result = run(args[:-2] + [f'--config.num_train_steps={interrupted_at + 5}'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming at step {interrupted_at} ' in result.stderr
  assert read_metrics(tmp_path)[-1]['step'] == interrupted_at + 5


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  errors = [
    line for line in result.stderr.splitlines() if line.startswith('error: ')
  ]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0]


def test_missing_data_fails_fast_naming_option(tmp_path):
  start_time = time.monotonic()
  result = run(
    command(
      'mnist', tmp_path / 'work', f'--config.tfds_data_dir={tmp_path / "tfds"}'
    ),
    timeout=120,
  )
  elapsed = time.monotonic() - start_time
  assert_one_line_error(
    result, 'train-images-idx3-ubyte', '--config.data_dir', 'DATA='
  )
  # No download retries: the time is the interpreter's start-up alone.
  assert elapsed < 60


def test_corrupt_file_names_the_file(mnist_dir, tmp_path):
  copy = tmp_path / 'mnist'
  shutil.copytree(mnist_dir, copy)
  labels = copy / 't10k-labels-idx1-ubyte.gz'
  labels.write_bytes(labels.read_bytes()[:100])
  result = run(
    command(
      'mnist',
      tmp_path / 'work',
      f'--config.data_dir={copy}',
      f'--config.tfds_data_dir={tmp_path / "tfds"}',
    ),
    timeout=120,
  )
  assert_one_line_error(result, str(labels))
  assert not (tmp_path / 'tfds' / 'local_mnist').exists()


@pytest.mark.parametrize(
  'override,fragment',
  [
    ('--config.learning_rate=-1', 'learning_rate must be positive'),
    ('--config.dataset=svhn', "unknown dataset 'svhn'"),
    ('--config.optimizer=lion', "unknown optimizer 'lion'"),
  ],
)
def test_invalid_config_value_is_one_line(tmp_path, override, fragment):
  result = run(command('mnist', tmp_path, override), timeout=120)
  assert_one_line_error(result, fragment)


def test_unknown_config_field_is_one_line(tmp_path):
  result = run(command('mnist', tmp_path, '--config.num_epoch=1'), timeout=120)
  assert_one_line_error(result, 'num_epoch', 'Did you mean "num_epochs"')


def test_missing_config_file_is_one_line(tmp_path):
  result = run(
    [
      sys.executable,
      '-m',
      'pinet_jax.main',
      '--config=experiments/mnst.py',
      f'--workdir={tmp_path}',
    ],
    timeout=120,
  )
  assert_one_line_error(result, 'experiments/mnst.py', 'No such file')


def test_debug_flag_shows_traceback(tmp_path):
  result = run(
    command('mnist', tmp_path, '--config.batch_size=0', '--debug'),
    timeout=120,
  )
  assert result.returncode != 0
  assert 'Traceback' in result.stderr
  assert 'ConfigError' in result.stderr


def test_workdir_is_required():
  result = run(
    [
      sys.executable,
      '-m',
      'pinet_jax.main',
      f'--config={REPO_ROOT / "experiments" / "mnist.py"}',
    ],
    timeout=120,
  )
  assert result.returncode != 0
  assert 'workdir' in result.stderr
