"""The chaos check: a run killed with SIGKILL resumes bit for bit."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_chaos_two_kills_resume_exactly(prepared_mnist, mnist_dir, tmp_path):
  tfds_data_dir = Path(prepared_mnist.data_dir).parents[1]
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'pinet_jax.chaos',
      f'--data_dir={mnist_dir}',
      f'--tfds_data_dir={tfds_data_dir}',
      f'--workdir={tmp_path}',
      '--kills=2',
      '--num_train_steps=40',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = result.stdout.strip().splitlines()
  assert len(summary) == 1
  assert summary[0].startswith('chaos: 2 kills (')
  assert summary[0].endswith(
    '2 resumes, 0 corrupt checkpoints chosen, final parameters and '
    'optimiser state bitwise equal to the uninterrupted run'
  )
  # Every process after a kill resumed from a complete checkpoint.
  assert result.stderr.count('Kill ') == 2
