"""Evaluate, predict, report, TensorBoard and `pinet-jax` on a real MNIST run.

One short training run per module feeds every test: a degree-2 CCP model
with BatchNorm, on standardised inputs, so that the batch statistics and
the standardisation statistics are exercised too.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from pinet_jax import (
  cli,
  evaluate,
  inference,
  predict,
  report,
  train,
)
from pinet_jax.checkpoints import CheckpointError
from pinet_jax.data import pipeline

from conftest import REPO_ROOT

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Test digits written to PNG files for prediction.
NUM_PNG_DIGITS = 40


class TrainedRun(NamedTuple):
  config: ml_collections.ConfigDict
  workdir: Path
  records: list[dict]


@pytest.fixture(scope='module')
def trained(prepared_mnist, mnist_dir, load_experiment, tmp_path_factory):
  """The tiny experiment with a model that learns in its 30 steps."""
  config = load_experiment('tiny')
  config.data_dir = str(mnist_dir)
  # The builder's data_dir is <root>/local_mnist/<version>.
  config.tfds_data_dir = str(Path(prepared_mnist.data_dir).parents[1])
  config.model = 'ccp_dense'
  config.model_kwargs = ml_collections.ConfigDict(
    {'width': 16, 'degree': 2, 'normalization': 'last'}
  )
  config.normalize = True
  workdir = tmp_path_factory.mktemp('trained')
  train.train_and_evaluate(config, str(workdir))
  # The training program writes its report and curves when it finishes.
  assert (workdir / 'report.md').read_text().startswith('# Training report')
  assert (workdir / 'curves.png').read_bytes().startswith(PNG_SIGNATURE)
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return TrainedRun(config, workdir, [json.loads(line) for line in lines])


@pytest.fixture(scope='module')
def final_evaluation(trained):
  return evaluate.evaluate_checkpoint(str(trained.workdir))


@pytest.fixture(scope='module')
def normalization(trained):
  return evaluate.training_normalization(trained.config)


@pytest.fixture(scope='module')
def digit_pngs(trained, prepared_mnist, tmp_path_factory):
  """The first test digits of the eval split as grayscale PNG files."""
  images = pipeline.load_split(prepared_mnist, trained.config.eval_split).images
  folder = tmp_path_factory.mktemp('digits')
  paths = []
  for index, image in enumerate(images[:NUM_PNG_DIGITS]):
    path = folder / f'digit_{index:02d}.png'
    Image.fromarray(image[..., 0], 'L').save(path)
    paths.append(str(path))
  return paths


def eval_records(records):
  return [record for record in records if 'eval_accuracy' in record]


def test_evaluate_reproduces_logged_metrics(trained):
  logged = eval_records(trained.records)
  assert [record['step'] for record in logged] == [15, 30]
  for record in logged:
    result = evaluate.evaluate_checkpoint(str(trained.workdir), record['step'])
    assert result.checkpoint.step == record['step']
    assert result.count == record['eval_count'] == 500
    assert result.accuracy == record['eval_accuracy']
    assert result.loss == record['eval_loss']
  # Far above chance, so that prediction tests below compare real classes.
  assert logged[-1]['eval_accuracy'] > 0.7


def test_evaluate_confusion_matrix_is_consistent(final_evaluation):
  matrix = final_evaluation.confusion_matrix
  assert matrix.shape == (10, 10)
  assert matrix.sum() == 500
  np.testing.assert_array_equal(
    matrix.sum(axis=1), np.bincount(final_evaluation.labels, minlength=10)
  )
  assert np.trace(matrix) / 500 == final_evaluation.accuracy
  np.testing.assert_array_equal(
    final_evaluation.per_class_accuracy, np.diag(matrix) / matrix.sum(axis=1)
  )


def test_predict_png_matches_evaluate(
  trained, final_evaluation, digit_pngs, normalization
):
  classifier = inference.load_model(
    str(trained.workdir), normalization=normalization
  )
  predictions = predict.predict_files(classifier, digit_pngs, k=3)
  top = [prediction.classes[0] for prediction in predictions]
  assert top == final_evaluation.predictions[:NUM_PNG_DIGITS].tolist()
  for prediction in predictions:
    assert len(prediction.classes) == 3
    assert list(prediction.probabilities) == sorted(
      prediction.probabilities, reverse=True
    )
    assert prediction.names == tuple(str(c) for c in prediction.classes)


def test_inference_runs_without_tensorflow(
  trained, final_evaluation, digit_pngs, normalization
):
  script = f"""
import json, sys
import numpy as np
from pinet_jax import inference, predict, preprocessing
statistics = preprocessing.ChannelStatistics({normalization.mean.tolist()},
                                             {normalization.std.tolist()})
classifier = inference.load_model({str(trained.workdir)!r},
                                  normalization=statistics)
paths = {digit_pngs!r}
images = np.stack(
  [predict.load_image(path, classifier.image_shape) for path in paths]
)
probabilities = classifier(images)
print(json.dumps({{
  'tensorflow_imported': 'tensorflow' in sys.modules,
  'classes': probabilities.argmax(axis=-1).tolist(),
  'row_sums': probabilities.sum(axis=-1).tolist(),
}}))
"""
  result = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  output = json.loads(result.stdout.splitlines()[-1])
  assert output['tensorflow_imported'] is False
  expected = final_evaluation.predictions[:NUM_PNG_DIGITS].tolist()
  assert output['classes'] == expected
  np.testing.assert_allclose(output['row_sums'], 1.0, rtol=1e-5)


def test_checkpoint_records_normalization_statistics(trained, normalization):
  classifier = inference.load_model(str(trained.workdir))
  np.testing.assert_array_equal(
    classifier.normalization.mean, normalization.mean
  )
  np.testing.assert_array_equal(classifier.normalization.std, normalization.std)


def test_report_files(trained, normalization):
  paths = report.write_report(str(trained.workdir))

  png = Path(paths.curves).read_bytes()
  assert png.startswith(PNG_SIGNATURE)
  with Image.open(paths.curves) as image:
    assert image.size == (1000, 400)

  markdown = Path(paths.markdown).read_text()
  for heading in (
    '# Training report',
    '## Results',
    '## Curves',
    '## Run',
    '## Model',
    '## Config',
    '## Environment',
  ):
    assert f'\n{heading}\n' in f'\n{markdown}', heading
  assert '![Loss and accuracy per epoch](curves.png)' in markdown
  final = eval_records(trained.records)[-1]
  assert f'| test[:500] accuracy | {100 * final["eval_accuracy"]:.2f}% ' in (
    markdown
  )
  classifier_params = inference.load_model(
    str(trained.workdir), normalization=normalization
  ).variables['params']
  count = sum(leaf.size for leaf in jax.tree.leaves(classifier_params))
  assert '`ccp_dense` with arguments ' in markdown
  assert f': {count:,} parameters' in markdown
  assert '| steps | 30 of 30 (2.00 epochs) |' in markdown
  assert '| jax | ' in markdown


def test_report_curves_are_the_logged_values(trained):
  records = report.read_metrics(str(trained.workdir / 'metrics.jsonl'))
  curves = report.learning_curves(records)
  evals = eval_records(trained.records)
  trains = [record for record in trained.records if 'train_loss' in record]
  np.testing.assert_array_equal(curves['eval_loss'].epochs, [1.0, 2.0])
  np.testing.assert_array_equal(
    curves['eval_accuracy'].values, [r['eval_accuracy'] for r in evals]
  )
  np.testing.assert_array_equal(
    curves['train_loss'].values, [r['train_loss'] for r in trains]
  )
  figure = report.draw_curves(curves, 'test[:500]', 'run')
  loss_axes, accuracy_axes = figure.axes
  train_line, eval_line = accuracy_axes.lines
  assert eval_line.get_label() == 'test[:500]'
  np.testing.assert_array_equal(
    eval_line.get_ydata(), [100 * r['eval_accuracy'] for r in evals]
  )
  np.testing.assert_array_equal(
    train_line.get_xdata(), [r['epoch'] for r in trains]
  )
  np.testing.assert_array_equal(
    loss_axes.lines[1].get_ydata(), [r['eval_loss'] for r in evals]
  )
  assert loss_axes.get_yscale() == 'linear'


def curves_with_eval_loss(eval_loss):
  epochs = np.arange(1.0, len(eval_loss) + 1)
  return {
    'train_loss': report.Curve(epochs, np.linspace(2.0, 1.0, len(epochs))),
    'train_accuracy': report.Curve(epochs, np.full(len(epochs), 0.5)),
    'eval_loss': report.Curve(epochs, np.array(eval_loss, float)),
    'eval_accuracy': report.Curve(epochs, np.full(len(epochs), 0.5)),
  }


@pytest.mark.parametrize(
  ('eval_loss', 'scale'),
  [
    # The reduced Π-net ResNet-18 run logged a test loss of 2.6e21.
    ([1.9, 2.6e21, 1.3], 'log'),
    # The train loss ends at 1.0, so the span is the eval loss's peak.
    ([1.9, 1001.0, 1.3], 'log'),
    ([1.9, 1000.0, 1.3], 'linear'),
    # Skipped intervals (NaN) and infinities do not decide the scale.
    ([1.9, float('nan'), float('inf'), 1.3], 'linear'),
  ],
)
def test_loss_axis_log_for_wide_spans(eval_loss, scale):
  figure = report.draw_curves(curves_with_eval_loss(eval_loss), 'test', 'run')
  loss_axes, accuracy_axes = figure.axes
  assert loss_axes.get_yscale() == scale
  assert accuracy_axes.get_yscale() == 'linear'


def read_scalars(logdir):
  accumulator = event_accumulator.EventAccumulator(
    str(logdir), size_guidance={event_accumulator.TENSORS: 0}
  )
  accumulator.Reload()
  return accumulator


def test_tensorboard_events_of_the_run(trained):
  # The training program wrote these events into its work directory.
  accumulator = read_scalars(trained.workdir)
  tags = set(accumulator.Tags()['tensors'])
  assert {
    'train/loss',
    'train/accuracy',
    'train/images_per_second',
    'train/learning_rate',
    'train/grad_norm',
    'train/param_norm',
    'eval/loss',
    'eval/accuracy',
  } <= tags
  assert not {'train/step', 'train/epoch', 'eval/count', 'train/time'} & tags

  train_records = [r for r in trained.records if 'train_loss' in r]
  losses = accumulator.Tensors('train/loss')
  assert [event.step for event in losses] == [r['step'] for r in train_records]
  assert [float(tensor_util.make_ndarray(e.tensor_proto)) for e in losses] == [
    float(np.float32(record['train_loss'])) for record in train_records
  ]

  evals = eval_records(trained.records)
  events = accumulator.Tensors('eval/accuracy')
  assert [event.step for event in events] == [15, 30]
  # TensorBoard stores scalars as float32.
  assert [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events] == [
    float(np.float32(record['eval_accuracy'])) for record in evals
  ]

  content = accumulator.PluginTagToContent('hparams')
  hparams = plugin_data_pb2.HParamsPluginData.FromString(
    content['_hparams_/session_start_info']
  ).session_start_info.hparams
  assert hparams['model'].string_value == 'ccp_dense'
  assert hparams['model_kwargs.width'].number_value == 16
  assert hparams['normalize'].bool_value is True


def run_cli(capsys, *args):
  status = cli.main(list(args))
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def test_cli_evaluate_json(trained, capsys):
  status, out, err = run_cli(
    capsys,
    'evaluate',
    f'--workdir={trained.workdir}',
    '--step=15',
    '--split=test[500:600]',
    '--json',
  )
  assert status == 0, err
  result = json.loads(out)
  assert result['step'] == 15
  assert result['split'] == 'test[500:600]'
  assert result['count'] == 100
  matrix = np.array(result['confusion_matrix'])
  assert matrix.sum() == 100
  assert result['accuracy'] == np.trace(matrix) / 100


def test_cli_evaluate_text(trained, final_evaluation, capsys):
  status, out, err = run_cli(
    capsys, 'evaluate', '--workdir', str(trained.workdir)
  )
  assert status == 0, err
  assert f'accuracy: {100 * final_evaluation.accuracy:.2f}%' in out
  assert 'confusion matrix (rows: true class, columns: predicted):' in out


def test_cli_predict_matches_evaluate(
  trained, final_evaluation, digit_pngs, capsys
):
  status, out, err = run_cli(
    capsys,
    'predict',
    f'--workdir={trained.workdir}',
    '--top_k=2',
    '--json',
    *digit_pngs,
  )
  assert status == 0, err
  lines = [json.loads(line) for line in out.splitlines()]
  assert [line['path'] for line in lines] == digit_pngs
  assert [line['classes'][0] for line in lines] == (
    final_evaluation.predictions[:NUM_PNG_DIGITS].tolist()
  )
  assert all(len(line['classes']) == 2 for line in lines)


@pytest.mark.parametrize(
  ('args', 'message'),
  [
    (
      ['--step=7'],
      'no checkpoint at step 7 in .*; available steps: \\[15, 30\\]',
    ),
    (['--split=validation'], "invalid --split='validation'"),
  ],
)
def test_cli_evaluate_errors(trained, capsys, args, message):
  status, out, err = run_cli(
    capsys, 'evaluate', f'--workdir={trained.workdir}', *args
  )
  assert status == cli.EXIT_INVALID
  assert out == ''
  assert len(err.strip().splitlines()) == 1
  assert err.startswith('error: ')
  assert re.search(message, err), err


def test_cli_predict_errors(trained, digit_pngs, capsys, tmp_path):
  workdir = f'--workdir={trained.workdir}'
  missing = tmp_path / 'missing.png'
  status, _, err = run_cli(capsys, 'predict', workdir, str(missing))
  assert status == cli.EXIT_INVALID
  assert err == f'error: image file {missing} not found\n'

  status, _, err = run_cli(
    capsys, 'predict', workdir, '--top_k=11', *digit_pngs
  )
  assert status == cli.EXIT_INVALID
  assert err == (
    'error: top_k=11 is out of range: the model has 10 classes, so pass 1 '
    'to 10\n'
  )


def test_cli_debug_raises(trained):
  with pytest.raises(CheckpointError, match='available steps'):
    cli.main(
      ['evaluate', f'--workdir={trained.workdir}', '--step=7', '--debug']
    )


def test_cli_report(trained, capsys):
  status, out, err = run_cli(capsys, 'report', f'--workdir={trained.workdir}')
  assert status == 0, err
  assert out.splitlines() == [
    str(trained.workdir / 'report.md'),
    str(trained.workdir / 'curves.png'),
  ]


@pytest.mark.parametrize('command', ['evaluate', 'predict', 'report'])
def test_cli_rejects_a_folder_without_a_run(command, capsys, tmp_path):
  extra = [str(tmp_path / 'digit.png')] if command == 'predict' else []
  status, _, err = run_cli(capsys, command, f'--workdir={tmp_path}', *extra)
  assert status == cli.EXIT_INVALID
  assert len(err.strip().splitlines()) == 1
  assert err.startswith('error: ')
  assert str(tmp_path) in err
  assert 'pass the --workdir of a training run' in err
  assert list(tmp_path.iterdir()) == []


def test_cli_names_the_folder_of_an_empty_workdir(
  capsys, tmp_path, monkeypatch
):
  # An empty --workdir is the current folder; the message names it.
  monkeypatch.chdir(tmp_path)
  status, _, err = run_cli(capsys, 'evaluate', '--workdir=')
  assert status == cli.EXIT_INVALID
  assert err.startswith(f'error: {tmp_path} is not a training work directory')


def test_cli_help_states_defaults(capsys):
  for command, expected in (
    (
      'evaluate',
      ['default: the latest', "default: the training config's eval_split"],
    ),
    ('predict', ['(default: 3)', 'PNG, JPEG']),
    ('report', ['replacing earlier ones']),
  ):
    with pytest.raises(SystemExit) as exit_info:
      cli.main([command, '--help'])
    assert exit_info.value.code == 0
    out = ' '.join(capsys.readouterr().out.split())
    for text in expected:
      assert text in out, (command, text)


def console_script():
  return str(Path(sys.executable).with_name('pinet-jax'))


def test_console_script_lists_commands():
  result = subprocess.run(
    [console_script(), '--help'], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr
  for command in ('train', 'evaluate', 'predict', 'report', 'bench'):
    assert f'    {command} ' in result.stdout, command


@pytest.mark.parametrize(
  ('command', 'flag'), [('train', '--workdir'), ('bench', '--batch_size')]
)
def test_console_script_delegates_flags(command, flag):
  result = subprocess.run(
    [console_script(), command, '--help'],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert flag in result.stdout, result.stderr[-2000:]


def test_cli_usage_error_is_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['evaluate', '--step=latest'])
  assert exit_info.value.code == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert err == (
    "pinet-jax evaluate: error: argument --step: invalid int value: 'latest'"
    '; pinet-jax evaluate --help lists the options\n'
  )
