"""Learning curves and a markdown report of a training work directory.

`write_report(workdir)` reads `<workdir>/metrics.jsonl` and the latest
checkpoint's metadata and writes two files into the work directory:

- curves.png: train and eval loss and accuracy against the epoch;
- report.md: final and best metrics, the curves, steps, wall time and
  img/s, the model and its parameter count, the config, and the hardware
  and software versions.

Both files are replaced on every call, so the report follows a resumed run.
The training program writes one metrics.jsonl record per line: train
records ('step', 'epoch', 'train_loss', 'train_accuracy',
'images_per_second'), eval records ('step', 'epoch', 'eval_loss',
'eval_accuracy', 'eval_count') and, where it records sessions, start
records ('event': 'start', 'step', 'time', 'environment'). A 'time' field,
in seconds since the Unix epoch, dates a record.
"""

import dataclasses
import datetime
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from pinet_jax import environment, inference, progress
from pinet_jax.errors import UserInputError

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
REPORT_FILE = 'report.md'

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Curve:
  """One metric against the epoch, sorted by step.

  Attributes:
    epochs: float (points,), the epoch (fractional for train records) of
      each point.
    values: float (points,), the metric; accuracies are fractions.
  """

  epochs: np.ndarray
  values: np.ndarray


@dataclasses.dataclass(frozen=True)
class ReportPaths:
  """The files that `write_report` wrote."""

  markdown: str
  curves: str


def read_metrics(path: str) -> list[Record]:
  """Return the records of a metrics.jsonl file, in file order.

  A line that is not a JSON object, such as a record cut short when a
  process was killed mid-write, is skipped with a warning.

  Raises:
    pinet_jax.errors.UserInputError: the file is missing.
  """
  try:
    # Bytes that are not UTF-8 become U+FFFD instead of stopping the read.
    with open(path, encoding='utf-8', errors='replace') as metrics:
      lines = metrics.read().splitlines()
  except FileNotFoundError as error:
    raise UserInputError(
      f'{path} not found: the training program writes it into its '
      '--workdir; pass the --workdir of a training run'
    ) from error
  except OSError as error:
    raise UserInputError(
      f'cannot read {path}: {error.strerror}; pass the --workdir of a '
      'training run'
    ) from error
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if not isinstance(record, dict):
      logging.warning('Skipped %s line %d: not a JSON object.', path, number)
      continue
    records.append(record)
  return records


def _latest_per_step(records: Sequence[Record], key: str) -> list[Record]:
  """Return the records that have `key`, one per step, sorted by step.

  A resumed run logs the steps after its checkpoint a second time. A
  finished run that is started again logs its evaluation again. The later
  record of a step is kept.
  """
  by_step = {record['step']: record for record in records if key in record}
  return [by_step[step] for step in sorted(by_step)]


def learning_curves(records: Sequence[Record]) -> dict[str, Curve]:
  """Return the learning curves of metrics.jsonl `records`.

  The keys are 'train_loss', 'train_accuracy', 'eval_loss' and
  'eval_accuracy'; a curve without records has no points.
  """
  curves = {}
  for key in ('train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy'):
    selected = _latest_per_step(records, key)
    curves[key] = Curve(
      epochs=np.array([record['epoch'] for record in selected], float),
      values=np.array([record[key] for record in selected], float),
    )
  return curves


# Losses spanning more than this factor get a logarithmic axis.
LOG_LOSS_SPAN = 1e3


def _wide_span(curves: Sequence[Curve]) -> bool:
  """Return whether the curves' positive finite values span > LOG_LOSS_SPAN.

  A polynomial network can give a few test images huge logits, so one
  evaluation's loss may be 1e20 while the others are near 1. On a linear
  axis that point flattens every other one to zero.
  """
  values = np.concatenate([curve.values for curve in curves])
  values = values[np.isfinite(values) & (values > 0)]
  return values.size > 0 and values.max() > LOG_LOSS_SPAN * values.min()


def draw_curves(
  curves: dict[str, Curve], eval_split: str, title: str
) -> Figure:
  """Return a figure: loss (left) and accuracy in % (right) per epoch.

  Each panel has a 'train' line and an eval line with markers, labelled
  with `eval_split`. The loss axis is logarithmic when the losses span
  more than a factor LOG_LOSS_SPAN.
  """
  figure = Figure(figsize=(10, 4), dpi=100, layout='constrained')
  figure.suptitle(title)
  loss_axes, accuracy_axes = figure.subplots(1, 2)
  panels = ((loss_axes, 'loss', 1.0), (accuracy_axes, 'accuracy', 100.0))
  for axes, metric, scale in panels:
    train = curves[f'train_{metric}']
    evaluation = curves[f'eval_{metric}']
    axes.plot(train.epochs, scale * train.values, label='train')
    axes.plot(
      evaluation.epochs,
      scale * evaluation.values,
      marker='o',
      label=eval_split,
    )
    axes.set_xlabel('epoch')
    axes.set_ylabel('accuracy (%)' if metric == 'accuracy' else 'loss')
    if metric == 'loss' and _wide_span((train, evaluation)):
      axes.set_yscale('log')
      axes.set_ylabel('loss (log scale)')
    axes.grid(alpha=0.3)
    axes.legend()
  return figure


def _at(record: Record) -> str:
  return f'step {record["step"]:,}, epoch {record["epoch"]:.2f}'


def _format_metric(record: Record, key: str) -> str:
  """Format an accuracy as a percentage and a loss with 4 decimals.

  A train record's mean is None (JSON null) when every update of its
  interval was skipped as non-finite.
  """
  value = record[key]
  if value is None:
    return 'n/a'
  if key.endswith('accuracy'):
    return f'{100 * value:.2f}%'
  return f'{value:.4f}'


def _results_section(records: Sequence[Record], eval_split: str) -> list[str]:
  evals = _latest_per_step(records, 'eval_accuracy')
  trains = _latest_per_step(records, 'train_loss')
  lines = ['## Results', '']
  if not evals and not trains:
    return [*lines, 'metrics.jsonl has no train or eval records yet.', '']
  lines += ['| metric | final | best |', '|---|---|---|']
  if evals:
    final = evals[-1]
    best = {
      'eval_accuracy': max(evals, key=lambda record: record['eval_accuracy']),
      'eval_loss': min(evals, key=lambda record: record['eval_loss']),
    }
    for key, record in best.items():
      name = key.removeprefix('eval_')
      lines.append(
        f'| {eval_split} {name} | {_format_metric(final, key)} '
        f'({_at(final)}) | {_format_metric(record, key)} ({_at(record)}) |'
      )
  if trains:
    # Train records are means over a logging interval of noisy batches,
    # so their best value means little. Only the last one is shown.
    final = trains[-1]
    for key in ('train_accuracy', 'train_loss'):
      name = key.removeprefix('train_')
      lines.append(
        f'| train {name}, last interval | {_format_metric(final, key)} '
        f'({_at(final)}) | |'
      )
  return [*lines, '']


def _sessions(records: Sequence[Record]) -> list[list[Record]]:
  """Split `records` at start records; records before the first are dropped."""
  sessions: list[list[Record]] = []
  for record in records:
    if record.get('event') == 'start':
      sessions.append([record])
    elif sessions:
      sessions[-1].append(record)
  return sessions


def wall_time(records: Sequence[Record]) -> tuple[float, int] | None:
  """Return (seconds, sessions) spent training, or None if not recorded.

  Each session counts from its start record to its last record, so time
  between an interruption and the resume is left out. The times need
  start records and a 'time' field in every record.
  """
  sessions = _sessions(records)
  if not sessions or any(
    'time' not in record for session in sessions for record in session
  ):
    return None
  seconds = sum(
    session[-1]['time'] - session[0]['time'] for session in sessions
  )
  return seconds, len(sessions)


def _run_section(
  records: Sequence[Record], info: inference.CheckpointInfo | None
) -> list[str]:
  trains = _latest_per_step(records, 'train_loss')
  steps = [record['step'] for record in records if 'step' in record]
  last_step = max(steps, default=0)
  total = f' of {info.metadata["total_steps"]:,}' if info else ''
  epoch = max((record.get('epoch', 0.0) for record in records), default=0.0)
  timed = wall_time(records)
  if timed is None:
    duration = 'not recorded: metrics.jsonl has no start records with times'
  else:
    seconds, count = timed
    plural = 's' if count > 1 else ''
    duration = f'{progress.format_duration(seconds)} in {count} session{plural}'
  rates = [record['images_per_second'] for record in trains]
  if rates:
    throughput = (
      f'{statistics.median(rates):,.0f} img/s, the median of {len(rates)} '
      'logged intervals'
    )
  else:
    throughput = 'no train records yet'
  return [
    '## Run',
    '',
    '| | |',
    '|---|---|',
    f'| steps | {last_step:,}{total} ({epoch:.2f} epochs) |',
    f'| wall time | {duration} |',
    f'| train throughput | {throughput} |',
    '',
  ]


def parameter_count(info: inference.CheckpointInfo) -> int:
  """Return the number of parameters of the model `info`'s config builds."""
  model, image_shape = inference.build_model(info.config)
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)
  )
  return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


def _model_and_config_sections(
  info: inference.CheckpointInfo | None,
) -> list[str]:
  if info is None:
    return [
      '## Model',
      '',
      'No checkpoint yet, so the model and config are not recorded.',
      '',
    ]
  config = info.config
  return [
    '## Model',
    '',
    f'`{config.model}` with arguments '
    f'`{json.dumps(config.model_kwargs.to_dict(), sort_keys=True)}`: '
    f'{parameter_count(info):,} parameters, trained on {config.dataset} '
    f'split `{config.train_split}`.',
    '',
    '## Config',
    '',
    f'From the checkpoint at step {info.step:,}:',
    '',
    '```json',
    json.dumps(config.to_dict(), indent=2, sort_keys=True),
    '```',
    '',
  ]


def _environment_section(records: Sequence[Record]) -> list[str]:
  starts = [record for record in records if record.get('event') == 'start']
  if starts and 'environment' in starts[-1]:
    values = starts[-1]['environment']
    source = (
      f'Recorded when training last started, at step {starts[-1]["step"]:,}.'
    )
  else:
    values = environment.describe()
    source = (
      'metrics.jsonl records no environment, so this is the machine that '
      'wrote the report, which may not be the one that trained.'
    )
  lines = ['## Environment', '', source, '', '| | |', '|---|---|']
  lines += [f'| {key} | {value} |' for key, value in values.items()]
  return [*lines, '']


def render_markdown(
  workdir: str,
  records: Sequence[Record],
  info: inference.CheckpointInfo | None,
) -> str:
  """Return the report of `workdir`'s `records` and latest checkpoint."""
  eval_split = info.config.eval_split if info else 'eval'
  written = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
  lines = [
    '# Training report',
    '',
    f'Work directory `{workdir}`, report written {written}.',
    '',
    *_results_section(records, eval_split),
    '## Curves',
    '',
    f'![Loss and accuracy per epoch]({CURVES_FILE})',
    '',
    *_run_section(records, info),
    *_model_and_config_sections(info),
    *_environment_section(records),
  ]
  return '\n'.join(lines)


def _latest_checkpoint(workdir: str) -> inference.CheckpointInfo | None:
  if not os.path.isdir(os.path.join(workdir, inference.CHECKPOINTS_FOLDER)):
    return None
  if not inference.checkpoint_steps(workdir):
    return None
  return inference.read_checkpoint(workdir)


def write_report(workdir: str) -> ReportPaths:
  """Write curves.png and report.md into `workdir`, replacing older ones.

  Args:
    workdir: the `--workdir` of a training run; it must contain
      metrics.jsonl, and the config comes from its latest checkpoint,
      where there is one.

  Returns:
    The paths of the two files.

  Raises:
    pinet_jax.errors.UserInputError: `workdir` has no metrics.jsonl, or
      an invalid one or an unreadable checkpoint.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  records = read_metrics(os.path.join(workdir, METRICS_FILE))
  info = _latest_checkpoint(workdir)
  eval_split = info.config.eval_split if info else 'eval'
  paths = ReportPaths(
    markdown=os.path.join(workdir, REPORT_FILE),
    curves=os.path.join(workdir, CURVES_FILE),
  )
  title = os.path.basename(workdir)
  if info is not None:
    title = f'{title}: {info.config.model} on {info.config.dataset}'
  figure = draw_curves(learning_curves(records), eval_split, title)
  figure.savefig(paths.curves, format='png')
  with open(paths.markdown, 'w', encoding='utf-8') as markdown:
    markdown.write(render_markdown(workdir, records, info))
  return paths
