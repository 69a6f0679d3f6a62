"""The benchmark command runs end to end and prints its table."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_bench(*flags):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'pinet_jax.bench',
      '--steps=2',
      '--rounds=1',
      '--batch_size=8',
      '--width=4',
      *flags,
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def table_rows(stdout):
  rows = [line for line in stdout.splitlines() if line.startswith('| ')]
  return {row.split(' | ')[0].lstrip('| '): row for row in rows}


def test_bench_table_without_torch(mnist_dir):
  result = run_bench(
    '--notorch',
    '--formulation=s2d',
    '--microbatch_size=4',
    f'--data_dir={mnist_dir}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = table_rows(result.stdout)
  for metric in (
    'train-step compile',
    'JAX s2d, microbatch 4 train img/s',
    'JAX s2d, whole batch train img/s',
    'JAX s2d, microbatch 4 eval img/s',
    'train speed ratio JAX s2d, microbatch 4 / JAX s2d, whole batch',
    'XLA f32 matmul peak',
    'JAX train step',
    'input pipeline img/s',
    'process peak RSS',
  ):
    assert metric in rows, result.stdout
  assert 'skipped (--notorch)' in rows['PyTorch']
  assert '% of peak' in rows['JAX train step']


def test_bench_rejects_a_microbatch_that_does_not_divide():
  result = run_bench('--notorch', '--microbatch_size=3')
  assert result.returncode != 0
  assert '--microbatch_size: microbatch size 3 must be' in result.stderr
  assert 'Traceback' not in result.stderr


def test_bench_compares_with_torch():
  pytest.importorskip('torch')
  result = run_bench('--formulation=plain')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = table_rows(result.stdout)
  ratios = [name for name in rows if name.startswith('train speed ratio')]
  assert len(ratios) == 2, result.stdout


def test_bench_rejects_a_missing_data_dir_before_timing(tmp_path):
  result = run_bench('--notorch', f'--data_dir={tmp_path / "absent"}')
  assert result.returncode != 0
  assert f'--data_dir={tmp_path / "absent"}: MNIST folder' in result.stderr
  assert 'Traceback' not in result.stderr
  assert '| metric |' not in result.stdout
