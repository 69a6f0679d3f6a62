"""Evaluate a checkpoint on a split: accuracy, per-class accuracy, confusion.

The data goes through the training program's input pipeline (tfds and
tf.data, with the config's eval batch size and zero padding), and the logits
are computed as `steps.eval_step` computes them, in the run's dtype and
matmul precision. Evaluating a checkpoint on the config's eval split
therefore gives the eval_accuracy that training logged in metrics.jsonl at
that step, bit for bit when training ran on one device. A run on several
devices summed in another order, which can move a borderline prediction.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pinet_jax import config as config_lib
from pinet_jax import inference, preprocessing, steps
from pinet_jax.data import pipeline, sources


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Results of one checkpoint on one split.

  Attributes:
    checkpoint: the evaluated checkpoint.
    split: the tfds split string, such as 'test' or 'test[:500]'.
    loss: mean cross-entropy over the split.
    accuracy: fraction of examples whose top logit is the label.
    labels: int32 (examples,), in the split's order.
    predictions: int32 (examples,), the top class of each example.
    class_names: one name per class, in label order.
  """

  checkpoint: inference.CheckpointInfo
  split: str
  loss: float
  accuracy: float
  labels: np.ndarray
  predictions: np.ndarray
  class_names: tuple[str, ...]

  @property
  def count(self) -> int:
    """Examples evaluated."""
    return len(self.labels)

  @property
  def confusion_matrix(self) -> np.ndarray:
    """int64 (classes, classes): row = true class, column = predicted class."""
    classes = len(self.class_names)
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (self.labels, self.predictions), 1)
    return matrix

  @property
  def per_class_accuracy(self) -> np.ndarray:
    """float64 (classes,): the accuracy on each true class; NaN if absent."""
    matrix = self.confusion_matrix
    totals = matrix.sum(axis=1)
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.diag(matrix) / totals


def with_data_dirs(
  config: ml_collections.ConfigDict,
  data_dir: str | None,
  tfds_data_dir: str | None,
) -> ml_collections.ConfigDict:
  """Return `config` with the data folders replaced where given."""
  config = ml_collections.ConfigDict(config.to_dict())
  if data_dir is not None:
    config.data_dir = data_dir
  if tfds_data_dir is not None:
    config.tfds_data_dir = tfds_data_dir
  return config


def training_normalization(
  config: ml_collections.ConfigDict,
) -> preprocessing.ChannelStatistics:
  """Recompute the standardisation statistics that training used.

  The training program computes them from config.train_split with
  `pipeline.normalization_of`; this does the same, for checkpoints that do
  not record them.

  Raises:
    pinet_jax.errors.UserInputError: the data cannot be found or read.
  """
  builder = sources.get_builder(config)
  train = pipeline.load_checked_split(
    builder, config.train_split, 'config.train_split'
  )
  return preprocessing.ChannelStatistics(
    *pipeline.normalization_of(train.images)
  )


def _predict_batch(
  apply_fn: Any,
  variables: Any,
  batch: dict[str, jax.Array],
  microbatch_size: int,
  compute_dtype: jnp.dtype | None,
) -> tuple[jax.Array, jax.Array]:
  """Return the top class (batch,) and the loss sum of the unmasked rows.

  The logits are those of `steps.eval_step`, so the predictions are those
  behind the logged accuracy.
  """
  logits = steps.eval_logits(
    apply_fn, variables, batch['image'], microbatch_size, compute_dtype
  )
  valid = batch['mask'] > 0
  losses = jnp.where(valid, steps.cross_entropy(logits, batch['label']), 0.0)
  return jnp.argmax(logits, -1).astype(jnp.int32), jnp.sum(losses)


def evaluate_checkpoint(
  workdir: str,
  step: int | None = None,
  split: str | None = None,
  *,
  data_dir: str | None = None,
  tfds_data_dir: str | None = None,
) -> Evaluation:
  """Evaluate a checkpoint of `workdir` on a split of its dataset.

  Args:
    workdir: the `--workdir` of a training run.
    step: the checkpoint's step; None selects the latest.
    split: a tfds split string; None selects the config's eval_split.
    data_dir: the folder of raw dataset files, replacing the config's.
    tfds_data_dir: the tfds data folder, replacing the config's.

  Raises:
    pinet_jax.errors.UserInputError: no such checkpoint, an invalid split,
      or data that cannot be found or read.
  """
  info = inference.read_checkpoint(workdir, step)
  config = with_data_dirs(info.config, data_dir, tfds_data_dir)
  split = config.eval_split if split is None else split
  normalization = None
  if info.needs_normalization:
    normalization = training_normalization(config)
  classifier = inference.load_model(
    workdir, info.step, normalization=normalization
  )
  data = pipeline.load_checked_split(
    sources.get_builder(config), split, '--split'
  )
  batch_size = config.eval_batch_size
  predict = jax.jit(
    functools.partial(
      _predict_batch,
      classifier.model.apply,
      microbatch_size=steps.resolve_microbatch_size(
        0, batch_size, jax.default_backend()
      ),
      compute_dtype=config_lib.compute_dtype(config),
    )
  )
  predictions, loss_total = [], None
  batches = pipeline.eval_batches(
    data, batch_size=batch_size, normalization=classifier.normalization
  )
  # The first call compiles, under the run's matmul precision.
  with config_lib.matmul_precision(config):
    for batch in batches:
      batch_predictions, loss_sum = predict(classifier.variables, batch)
      predictions.append(batch_predictions)
      # Summed on the device in batch order, as the training program sums.
      loss_total = loss_sum if loss_total is None else loss_total + loss_sum
  count = len(data.labels)
  # Only the last batch has padding, at its end.
  predictions = np.concatenate(jax.device_get(predictions))[:count]
  return Evaluation(
    checkpoint=classifier.checkpoint,
    split=split,
    loss=float(loss_total) / count,
    accuracy=int(np.sum(predictions == data.labels)) / count,
    labels=data.labels,
    predictions=predictions,
    class_names=classifier.class_names,
  )


def to_json(evaluation: Evaluation) -> dict[str, Any]:
  """Return `evaluation` as JSON values, without the per-example arrays."""
  return {
    'workdir': evaluation.checkpoint.workdir,
    'step': evaluation.checkpoint.step,
    'split': evaluation.split,
    'count': evaluation.count,
    'loss': evaluation.loss,
    'accuracy': evaluation.accuracy,
    'class_names': list(evaluation.class_names),
    'per_class_accuracy': [
      None if np.isnan(value) else float(value)
      for value in evaluation.per_class_accuracy
    ],
    'confusion_matrix': evaluation.confusion_matrix.tolist(),
  }


def _per_class_lines(evaluation: Evaluation) -> list[str]:
  matrix = evaluation.confusion_matrix
  # MNIST's class names are the indices themselves.
  labels = [
    name if name == str(index) else f'{index} {name}'
    for index, name in enumerate(evaluation.class_names)
  ]
  width = max(len(label) for label in labels)
  lines = ['per-class accuracy:']
  for index, label in enumerate(labels):
    accuracy = evaluation.per_class_accuracy[index]
    accuracy_text = (
      'no examples' if np.isnan(accuracy) else f'{100 * accuracy:6.2f}%'
    )
    lines.append(
      f'  {label:<{width}}  {accuracy_text} of {matrix[index].sum():,}'
    )
  return lines


def _confusion_lines(matrix: np.ndarray) -> list[str]:
  cell = max(len(f'{matrix.max():,}'), 2)
  header = ' '.join(f'{index:>{cell}}' for index in range(len(matrix)))
  lines = [
    'confusion matrix (rows: true class, columns: predicted):',
    f'  {"":>2} {header}',
  ]
  for index, row in enumerate(matrix):
    cells = ' '.join(f'{value:>{cell},}' for value in row)
    lines.append(f'  {index:>2} {cells}')
  return lines


def format_text(evaluation: Evaluation) -> str:
  """Return `evaluation` as plain text: summary, per-class table, confusion."""
  lines = [
    f'checkpoint: {evaluation.checkpoint.path}',
    f'split: {evaluation.split} ({evaluation.count:,} examples)',
    f'accuracy: {100 * evaluation.accuracy:.2f}%',
    f'loss: {evaluation.loss:.4f}',
    '',
    *_per_class_lines(evaluation),
    '',
    *_confusion_lines(evaluation.confusion_matrix),
  ]
  return '\n'.join(lines)
