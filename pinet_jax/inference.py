"""Load a trained model from a training work directory, without TensorFlow.

  from pinet_jax import inference

  classifier = inference.load_model('workdirs/mnist')  # latest checkpoint
  probabilities = classifier(images)  # uint8 (batch, 28, 28, 1) -> (batch, 10)

The training program writes `<workdir>/checkpoints/<step>/` with two orbax
items: 'state' (the `steps.TrainState` as a state dict) and 'metadata'
(JSON with the run's config). The config names the model and the dataset,
which fix the architecture and the input shape, so a work directory is all
that loading needs. Only orbax, Flax and JAX are used, so TensorFlow stays
unimported.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from pinet_jax import checkpoints, models, preprocessing
from pinet_jax.checkpoints import CheckpointError
from pinet_jax.data import raw_files, sources

CHECKPOINTS_FOLDER = 'checkpoints'
# Class names in label order; tfds's MNIST labels are the digits.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
  'mnist': tuple(str(digit) for digit in range(10)),
  'cifar10': raw_files.CIFAR10_CLASS_NAMES,
}


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A checkpoint's location and metadata, read without its arrays.

  Attributes:
    workdir: absolute path of the training work directory.
    step: training steps taken when the checkpoint was saved.
    path: the checkpoint's folder, `<workdir>/checkpoints/<step>`.
    config: the config of the run that saved it.
    metadata: the saved JSON: 'config', 'total_steps', 'metrics' (the
      evaluation at that step) and, where the training program recorded
      them, 'normalization' statistics.
  """

  workdir: str
  step: int
  path: str
  config: ml_collections.ConfigDict
  metadata: dict[str, Any]

  @property
  def normalization(self) -> preprocessing.ChannelStatistics | None:
    """The recorded (mean, std) per channel, or None where none is recorded."""
    value = self.metadata.get('normalization')
    if value is None:
      return None
    try:
      return preprocessing.normalization_from_json(value)
    except ValueError as error:
      raise CheckpointError(f'checkpoint {self.path}: {error}') from error

  @property
  def needs_normalization(self) -> bool:
    """Whether the run standardised inputs but recorded no statistics."""
    return bool(self.config.normalize) and self.normalization is None


def _checkpoints_dir(workdir: str) -> str:
  """Return `<workdir>/checkpoints`, checking that it exists."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    raise CheckpointError(
      f'work directory {workdir} does not exist or is not a folder; pass '
      'the --workdir of a training run'
    )
  directory = os.path.join(path, CHECKPOINTS_FOLDER)
  if not os.path.isdir(directory):
    raise CheckpointError(
      f'{path} is not a training work directory: it has no '
      f'{CHECKPOINTS_FOLDER}/ folder; pass the --workdir of a training run'
    )
  return directory


def checkpoint_steps(workdir: str) -> list[int]:
  """Return the steps of the committed checkpoints in `workdir`, ascending.

  Raises:
    CheckpointError: `workdir` is not a training work directory.
  """
  manager = checkpoints.open_reader(_checkpoints_dir(workdir))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _select_step(
  manager: ocp.CheckpointManager, workdir: str, step: int | None
) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise CheckpointError(
      f'no checkpoint in {manager.directory}: training saves one after '
      'each epoch; train longer or pass another --workdir'
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(
      f'no checkpoint at step {step} in {workdir}; available steps: {steps}'
    )
  return step


def _unreadable(path: str, error: Exception) -> CheckpointError:
  return checkpoints.unreadable(
    path,
    error,
    'load another step (--step) or check that the folder was copied whole',
  )


def _read_info(
  manager: ocp.CheckpointManager, workdir: str, step: int
) -> CheckpointInfo:
  path = os.path.join(str(manager.directory), str(step))
  try:
    metadata = manager.restore(
      step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    )['metadata']
  except (OSError, ValueError, KeyError) as error:
    raise _unreadable(path, error) from error
  if not isinstance(metadata, dict) or 'config' not in metadata:
    raise CheckpointError(
      f'checkpoint {path} has no config in its metadata; it was not '
      'written by the pinet_jax training program'
    )
  return CheckpointInfo(
    workdir=os.path.dirname(str(manager.directory)),
    step=step,
    path=path,
    config=ml_collections.ConfigDict(metadata['config']),
    metadata=metadata,
  )


def read_checkpoint(workdir: str, step: int | None = None) -> CheckpointInfo:
  """Return the location and metadata of a checkpoint in `workdir`.

  Args:
    workdir: the `--workdir` of a training run.
    step: the checkpoint's step; None selects the latest.

  Raises:
    CheckpointError: `workdir` is not a training work directory, has no
      checkpoint, or has none at `step` (the message lists those it has).
  """
  manager = checkpoints.open_reader(_checkpoints_dir(workdir))
  try:
    return _read_info(manager, workdir, _select_step(manager, workdir, step))
  finally:
    manager.close()


def build_model(
  config: ml_collections.ConfigDict,
) -> tuple[nn.Module, tuple[int, int, int]]:
  """Return the config's model and its input shape (height, width, channels).

  Raises:
    CheckpointError: the config names an unknown dataset or model, or
      model arguments the model does not take.
  """
  if config.dataset not in sources.DATASET_SHAPES:
    raise CheckpointError(
      f'unknown dataset {config.dataset!r} in the config; known datasets: '
      f'{sorted(sources.DATASET_SHAPES)}'
    )
  num_classes, image_shape = sources.DATASET_SHAPES[config.dataset]
  try:
    model = models.get_model(
      config.model,
      num_classes=num_classes,
      in_channels=image_shape[-1],
      **config.model_kwargs,
    )
  except (TypeError, ValueError) as error:
    raise CheckpointError(
      f'cannot build model {config.model!r} with arguments '
      f'{config.model_kwargs.to_dict()}: {error}'
    ) from error
  return model, image_shape


def _restore_variables(
  manager: ocp.CheckpointManager, info: CheckpointInfo, expected: Any
) -> dict[str, Any]:
  """Restore the Flax variables of `info`'s checkpoint onto one device.

  The arrays go to the default device whatever devices saved them, so a
  checkpoint written on a GPU loads on a CPU-only machine.
  """
  try:
    state = checkpoints.restore_on_one_device(manager, info.step)
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise _unreadable(info.path, error) from error
  variables = {'params': state['params']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  shapes = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), variables)
  expected_shapes = jax.tree.map(
    lambda leaf: (leaf.shape, leaf.dtype), expected
  )
  if shapes != expected_shapes:
    raise CheckpointError(
      f'the arrays of checkpoint {info.path} do not match model '
      f'{info.config.model!r} with arguments '
      f'{info.config.model_kwargs.to_dict()} from its own config'
    )
  return variables


class Classifier:
  """A trained model as a function from images to class probabilities.

  A call preprocesses images as the training program did: integer pixels
  are divided by 255 in float32, float pixels must already be in [0, 1],
  and runs with config.normalize are standardised per channel. The model runs
  in evaluation mode (`train=False`), so BatchNorm uses its running
  averages, and in float32 even for a run trained with
  --config.dtype=bfloat16. Each new batch size compiles once.

  Attributes:
    model: the Flax module.
    variables: its 'params' and, for BatchNorm models, 'batch_stats'.
    checkpoint: where the variables came from.
    image_shape: (height, width, channels) the model takes.
    class_names: one name per logit, in label order.
    normalization: the (mean, std) applied after scaling, or None.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: dict[str, Any],
    checkpoint: CheckpointInfo,
    normalization: preprocessing.ChannelStatistics | None,
  ):
    self.model = model
    self.variables = variables
    self.checkpoint = checkpoint
    self.image_shape = sources.DATASET_SHAPES[checkpoint.config.dataset][1]
    self.class_names = CLASS_NAMES[checkpoint.config.dataset]
    self.normalization = normalization
    self._logits_fn = jax.jit(functools.partial(model.apply, train=False))

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    """Return the float32 model inputs for `images` (batch, H, W, C).

    Raises:
      ValueError: `images` has another shape than (batch, *image_shape),
        or pixels outside the ranges above.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != tuple(self.image_shape):
      height, width, channels = self.image_shape
      raise ValueError(
        f'images must have shape (batch, {height}, {width}, {channels}) for '
        f'this model, got {images.shape}; pinet_jax.predict.load_image '
        'converts an image file to that shape'
      )
    return preprocessing.to_model_input(images, self.normalization)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Return float32 logits (batch, classes) of `images` (batch, H, W, C)."""
    inputs = self.preprocess(images)
    return np.asarray(self._logits_fn(self.variables, jnp.asarray(inputs)))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Return float32 class probabilities (batch, classes); rows sum to 1."""
    return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))


def load_model(
  workdir: str,
  step: int | None = None,
  *,
  normalization: preprocessing.ChannelStatistics | None = None,
) -> Classifier:
  """Load a checkpoint of `workdir` as a `Classifier`.

  Args:
    workdir: the `--workdir` of a training run.
    step: the checkpoint's step; None loads the latest.
    normalization: (mean, std) per channel, for a run with config.normalize
      whose checkpoint records no statistics; it replaces recorded ones.
      `pinet_jax.evaluate.training_normalization` recomputes them from the
      training split, with TensorFlow.

  Raises:
    CheckpointError: no such work directory or checkpoint, a config that
      does not build a model, arrays that do not match the model, or a run
      with config.normalize whose statistics are neither recorded nor given.
  """
  manager = checkpoints.open_reader(_checkpoints_dir(workdir))
  try:
    info = _read_info(manager, workdir, _select_step(manager, workdir, step))
    normalization = _input_normalization(info, normalization)
    model, image_shape = build_model(info.config)
    expected = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)
    )
    variables = _restore_variables(manager, info, expected)
  finally:
    manager.close()
  return Classifier(model, variables, info, normalization)


def _input_normalization(
  info: CheckpointInfo, given: preprocessing.ChannelStatistics | None
) -> preprocessing.ChannelStatistics | None:
  """Return the statistics that inputs of `info`'s run are standardised with."""
  if not info.config.normalize:
    if given is not None:
      raise CheckpointError(
        f'checkpoint {info.path} comes from a run without config.normalize, '
        'whose inputs were not standardised; pass no normalization'
      )
    return None
  if given is not None:
    mean, std = given
    return preprocessing.ChannelStatistics(
      np.asarray(mean, np.float32), np.asarray(std, np.float32)
    )
  # Checkpoints saved before the training program recorded the statistics
  # lack them.
  if info.normalization is None:
    raise CheckpointError(
      f'checkpoint {info.path} comes from a run with config.normalize but '
      'does not record the normalisation statistics; pass '
      'normalization=pinet_jax.evaluate.training_normalization(config)'
    )
  return info.normalization
