"""Curves and reports from metrics.jsonl records of interrupted runs."""

import json
import os

import jax
import numpy as np
import pytest

from pinet_jax import environment, progress, report
from pinet_jax.errors import UserInputError


def train_record(step, loss, time=None):
  record = {
    'step': step,
    'epoch': step / 10,
    'train_loss': loss,
    'train_accuracy': 1 - loss,
    'images_per_second': 100.0 * step,
  }
  if time is not None:
    record['time'] = time
  return record


def eval_record(step, accuracy, time=None):
  record = {
    'step': step,
    'epoch': step / 10,
    'eval_loss': 1 - accuracy,
    'eval_accuracy': accuracy,
    'eval_count': 500.0,
  }
  if time is not None:
    record['time'] = time
  return record


# A run stopped at step 15 after its checkpoint at step 10, then resumed
# from step 10: steps 15 and the evaluation at 10 are logged twice, and
# the second values count.
RESUMED = [
  train_record(5, 0.9),
  eval_record(10, 0.5),
  train_record(15, 0.8),
  train_record(15, 0.7),
  eval_record(10, 0.55),
  eval_record(20, 0.6),
]


def write_metrics(folder, records):
  lines = [json.dumps(record) for record in records]
  (folder / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')


def test_learning_curves_keep_the_last_record_per_step():
  curves = report.learning_curves(RESUMED)
  np.testing.assert_array_equal(curves['train_loss'].epochs, [0.5, 1.5])
  np.testing.assert_array_equal(curves['train_loss'].values, [0.9, 0.7])
  np.testing.assert_array_equal(curves['eval_accuracy'].epochs, [1.0, 2.0])
  np.testing.assert_array_equal(curves['eval_accuracy'].values, [0.55, 0.6])


def test_wall_time_sums_sessions():
  records = [
    {'event': 'start', 'step': 0, 'time': 1000.0},
    train_record(5, 0.9, time=1030.0),
    eval_record(10, 0.5, time=1060.0),
    {'event': 'start', 'step': 10, 'time': 5000.0},
    eval_record(20, 0.6, time=5045.0),
  ]
  assert report.wall_time(records) == (105.0, 2)


def test_wall_time_needs_starts_and_times():
  assert report.wall_time(RESUMED) is None
  no_time = [{'event': 'start', 'step': 0, 'time': 1.0}, eval_record(10, 0.5)]
  assert report.wall_time(no_time) is None


def test_report_without_checkpoint(tmp_path):
  write_metrics(tmp_path, RESUMED)
  paths = report.write_report(str(tmp_path))
  assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'
  markdown = (tmp_path / 'report.md').read_text()
  assert paths.markdown == str(tmp_path / 'report.md')
  assert '| eval accuracy | 60.00% (step 20, epoch 2.00) | 60.00% ' in markdown
  assert '| eval loss | 0.4000 (step 20, epoch 2.00) | 0.4000 ' in markdown
  assert '| train loss, last interval | 0.7000 (step 15, epoch 1.50) | |' in (
    markdown
  )
  assert '| steps | 20 (2.00 epochs) |' in markdown
  assert 'not recorded: metrics.jsonl has no start records with times' in (
    markdown
  )
  # The median of the img/s of steps 5 and 15, the latter's last record.
  assert '| train throughput | 1,000 img/s, the median of 2 logged' in markdown
  assert 'No checkpoint yet, so the model and config are not recorded.' in (
    markdown
  )
  assert 'this is the machine that wrote the report' in markdown


def test_report_shows_skipped_interval_as_na(tmp_path):
  skipped = train_record(10, 0.5)
  skipped.update(train_loss=None, train_accuracy=None)
  write_metrics(tmp_path, [train_record(5, 0.9), skipped])
  report.write_report(str(tmp_path))
  markdown = (tmp_path / 'report.md').read_text()
  assert '| train loss, last interval | n/a (step 10, epoch 1.00) | |' in (
    markdown
  )
  curves = report.learning_curves(
    report.read_metrics(str(tmp_path / 'metrics.jsonl'))
  )
  np.testing.assert_array_equal(curves['train_loss'].values, [0.9, np.nan])


def test_report_best_differs_from_final(tmp_path):
  write_metrics(
    tmp_path,
    [eval_record(10, 0.7), eval_record(20, 0.65), eval_record(30, 0.6)],
  )
  report.write_report(str(tmp_path))
  markdown = (tmp_path / 'report.md').read_text()
  assert (
    '| eval accuracy | 60.00% (step 30, epoch 3.00) | 70.00% '
    '(step 10, epoch 1.00) |'
  ) in markdown


def test_report_uses_recorded_environment(tmp_path):
  environment = {'cpu': 'Test CPU', 'jax': '0.0.1'}
  write_metrics(
    tmp_path,
    [
      {'event': 'start', 'step': 0, 'time': 10.0, 'environment': environment},
      eval_record(10, 0.5, time=70.0),
    ],
  )
  report.write_report(str(tmp_path))
  markdown = (tmp_path / 'report.md').read_text()
  assert 'Recorded when training last started, at step 0.' in markdown
  assert '| cpu | Test CPU |' in markdown
  assert '| wall time | 1m00s in 1 session |' in markdown


def test_report_rejects_missing_metrics(tmp_path):
  with pytest.raises(UserInputError, match='metrics.jsonl not found'):
    report.write_report(str(tmp_path))
  assert list(tmp_path.iterdir()) == []


def test_metrics_reader_skips_invalid_lines(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  # A record cut short by a kill, an array, bytes that are not UTF-8 and
  # an empty line.
  path.write_bytes(b'{"step": 1}\n{"step": \n[1, 2]\n\xff\xfe\n\n{"step": 2}\n')
  assert report.read_metrics(str(path)) == [{'step': 1}, {'step': 2}]


def test_report_of_a_file_is_one_line_error(tmp_path):
  workdir = tmp_path / 'notes.txt'
  workdir.write_text('not a work directory')
  with pytest.raises(UserInputError, match='cannot read .*notes.txt'):
    report.write_report(str(workdir))


def test_metrics_file_ends_partial_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2, "train_lo')
  metrics_file = progress.MetricsFile(str(path))
  metrics_file.write({'step': 3})
  lines = path.read_text().splitlines()
  assert lines[:2] == ['{"step": 1}', '{"step": 2, "train_lo']
  assert json.loads(lines[2])['step'] == 3
  assert [record['step'] for record in report.read_metrics(str(path))] == [1, 3]


def test_environment_describes_this_process():
  description = environment.describe()
  assert description['jax'] == jax.__version__
  assert description['cpu_count'] == str(os.cpu_count())
  assert description['devices'].endswith(f'({jax.default_backend()})')
  assert json.loads(json.dumps(description)) == description
