"""TensorBoard summaries of a training run, through clu's metric writers.

The training loop calls, in this order:

  writer = summaries.create_writer(workdir, enabled=jax.process_index() == 0)
  summaries.write_hparams(writer, config)
  summaries.write_record(writer, record)  # each metrics.jsonl record
  writer.close()  # in a `finally`, so the last values reach the disk

Event files go into the work directory itself, so `tensorboard --logdir
WORKDIR` shows one run, and `tensorboard --logdir workdirs` compares the
runs in it. A resumed run appends a new event file to the same folder.
TensorBoard (2.21) keeps the points of both files, so each step that the
resumed run repeats after its checkpoint appears twice.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
from clu import metric_writers

from pinet_jax.data import pipeline

# Record fields that are not metrics: the x axis, and bookkeeping.
NOT_PLOTTED = frozenset({'step', 'epoch', 'eval_count', 'time'})


def create_writer(
  workdir: str, *, enabled: bool
) -> metric_writers.MetricWriter:
  """Return a writer of TensorBoard event files into `workdir`.

  Args:
    workdir: the run's work directory; it must exist.
    enabled: whether this process writes. Pass `jax.process_index() == 0`,
      so that in a multi-process run one process writes; the others get a
      writer that drops everything.
  """
  if not enabled:
    return metric_writers.MultiWriter([])
  # The summary writer initialises TensorFlow's devices; they must be
  # hidden first, or TensorFlow would claim the accelerators' memory.
  pipeline.hide_accelerators_from_tensorflow()
  return metric_writers.SummaryWriter(workdir)


def tag(key: str) -> str:
  """Return the TensorBoard tag of metrics.jsonl field `key`.

  'eval_loss' becomes 'eval/loss' and 'train_accuracy' 'train/accuracy',
  and any other field, such as 'images_per_second' or 'learning_rate', is a
  train metric: 'train/images_per_second'. TensorBoard groups tags by the
  part before the slash.
  """
  for prefix in ('train', 'eval'):
    if key.startswith(f'{prefix}_'):
      return f'{prefix}/{key[len(prefix) + 1 :]}'
  return f'train/{key}'


def write_record(
  writer: metric_writers.MetricWriter, record: Mapping[str, Any]
) -> None:
  """Write the metrics of a metrics.jsonl `record` as scalars at its step.

  Args:
    writer: from `create_writer`.
    record: a train or eval record with an int 'step'. Its int and float
      fields except `NOT_PLOTTED` are written under `tag(field)`, and
      None values (JSON null) are left out. Records with an 'event' field,
      which mark points in a run rather than measure it, are skipped.
  """
  if 'event' in record:
    return
  scalars = {
    tag(key): value
    for key, value in record.items()
    if key not in NOT_PLOTTED
    and isinstance(value, int | float)
    and not isinstance(value, bool)
  }
  if scalars:
    writer.write_scalars(int(record['step']), scalars)


def write_hparams(
  writer: metric_writers.MetricWriter, config: ml_collections.ConfigDict
) -> None:
  """Write `config` for TensorBoard's HParams dashboard.

  Nested fields are flattened with dots ('model_kwargs.width'), and the
  items of a tuple are numbered ('model_kwargs.stage_sizes.0').
  """
  writer.write_hparams(config.to_dict())
