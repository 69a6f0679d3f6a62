"""Saving and restoring the training state with orbax.

A checkpoint contains the train state (step, parameters, optimiser state,
batch statistics) and a JSON record of the config that wrote it, the run's
length, the latest evaluation and the input standardisation. The step is
the number of training batches consumed, which fixes the epoch and the
position inside it, so a resumed run continues the same data order. With
config.skip_nonfinite_updates the optimiser state also counts the skipped
updates (see `pinet_jax.optim.skip_counters`).

On a local file system, orbax (orbax-checkpoint 0.12.8) writes each
checkpoint into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
when every file is written. A process killed during a save therefore leaves
only the temporary folder, which orbax never lists as a step. A manager
from `create_manager` deletes such folders before its first save.
"""

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from pinet_jax import config as config_lib
from pinet_jax import preprocessing
from pinet_jax.errors import CheckpointSaveError, ConfigError, UserInputError
from pinet_jax.steps import TrainState

# Config fields that a resumed run must share with the checkpoint: they
# change the parameters' shapes, the data order or the optimisation, so a
# run continued with other values would be neither of the two configs.
# num_epochs and num_train_steps may change, to extend a run, but only
# with the constant schedule (see `_check_compatible`).
RESUME_KEYS = (
  'dataset',
  'train_split',
  'normalize',
  'augment',
  'crop_padding',
  'flip',
  'model',
  'model_kwargs',
  'batch_size',
  'seed',
  'optimizer',
  'learning_rate',
  'schedule',
  'warmup_fraction',
  'decay_fractions',
  'decay_factor',
  'momentum',
  'weight_decay',
  'label_smoothing',
  'grad_clip_norm',
  'skip_nonfinite_updates',
  'max_consecutive_skips',
)
# Model arguments that change how the model computes, not its parameters.
LAYOUT_FREE_MODEL_KWARGS = ('formulation',)
# The items of every checkpoint step.
ITEM_NAMES = ('state', 'metadata')


class CheckpointError(UserInputError):
  """A checkpoint that is missing, incomplete or unreadable."""


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
  """One complete checkpoint: the folder of its steps and the step."""

  directory: str
  step: int

  @property
  def path(self) -> str:
    return os.path.join(self.directory, str(self.step))


def create_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """Return a manager of the checkpoints in `directory`, keeping `keep`."""
  # Removing temporary folders of an interrupted save keeps the directory
  # to committed checkpoints only; orbax never picks one for restore.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory), options=options, item_names=ITEM_NAMES
  )


def latest_complete_step(directory: str) -> int | None:
  """Return the latest step in `directory` whose save finished, or None."""
  if not os.path.isdir(directory):
    return None
  return max(ocp.step.checkpoint_steps(directory), default=None)


def open_reader(directory: str) -> ocp.CheckpointManager:
  """Return a manager that reads the checkpoints in `directory`.

  It never writes: no folder is created and no temporary folder removed,
  since a running training job may be saving there at the same time. It
  serves this process alone, so one process of a multi-process run can
  read without the others.
  """
  this_process = jax.process_index()
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      create=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=this_process, active_processes={this_process}
      ),
    ),
    item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'metadata': ocp.JsonCheckpointHandler(),
    },
  )


def restore_on_one_device(
  manager: ocp.CheckpointManager, step: int
) -> dict[str, Any]:
  """Return the train state saved at `step` as nested dicts of arrays.

  Needs no template. The arrays go to this process's first device,
  whatever devices saved them, so a checkpoint written across 8 GPUs or
  several hosts loads on one CPU. `manager` comes from `open_reader`.

  Raises:
    OSError, ValueError, KeyError, TypeError: the checkpoint is unreadable.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved = manager.item_metadata(step)['state']
  target = jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
    saved,
  )
  return manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
  )['state']


def read_state_arrays(directory: str, step: int) -> dict[str, Any]:
  """Return the train state saved at `step`; see `restore_on_one_device`.

  Raises:
    CheckpointError: the checkpoint cannot be read.
  """
  manager = open_reader(directory)
  try:
    return restore_on_one_device(manager, step)
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise unreadable(os.path.join(directory, str(step)), error) from error
  finally:
    manager.close()


def find_checkpoint(path: str, option: str) -> CheckpointPath:
  """Return the complete checkpoint that `path` names.

  Args:
    path: a step folder (`.../checkpoints/1200`), a folder of step folders,
      or a work directory with a `checkpoints` folder. For the last two,
      their latest complete step is used.
    option: the option that gave `path`, for messages.

  Raises:
    CheckpointError: `path` does not exist, is a step folder whose save
      did not finish, or contains no complete checkpoint.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(
      f'{option}={path} does not exist or is not a folder; give a '
      'checkpoint step folder such as WORKDIR/checkpoints/1200, a '
      'checkpoints folder or a work directory'
    )
  name = os.path.basename(path)
  if name.isdigit():
    parent = os.path.dirname(path)
    if int(name) not in ocp.step.checkpoint_steps(parent):
      raise CheckpointError(
        f'{option}={path} is not a complete checkpoint (its save did not '
        f'finish); choose another step in {parent}'
      )
    return CheckpointPath(parent, int(name))
  for directory in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(directory):
      saved = ocp.step.checkpoint_steps(directory)
      if saved:
        return CheckpointPath(directory, max(saved))
  raise CheckpointError(
    f'{option}={path} contains no complete checkpoint; give a checkpoint '
    'step folder such as WORKDIR/checkpoints/1200, a checkpoints folder or '
    'a work directory'
  )


def save(
  manager: ocp.CheckpointManager,
  state: TrainState,
  config: ml_collections.ConfigDict,
  total_steps: int,
  metrics: dict[str, float] | None = None,
  normalization: preprocessing.ChannelStatistics | None = None,
) -> None:
  """Save `state` at its step; the write finishes in the background.

  A step that is already saved is left as it is. Call
  `wait_for_saves(manager)` before the process exits.

  Args:
    manager: from `create_manager`.
    state: the state to save.
    config: the run's config, recorded to check a later resume.
    total_steps: the run's length in steps, which schedules depend on.
    metrics: the latest evaluation, recorded for reference.
    normalization: the per-channel (mean, std) that the run standardises
      its inputs with, or None; recorded so that inference applies the
      same.
  """
  step = int(state.step)
  if step in manager.all_steps():
    return
  metadata = {
    'config': config.to_dict(),
    'total_steps': total_steps,
    'metrics': metrics or {},
  }
  if normalization is not None:
    metadata['normalization'] = preprocessing.normalization_to_json(
      normalization
    )
  with _save_failures(manager):
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        metadata=ocp.args.JsonSave(metadata),
      ),
    )
  logging.info('Saving checkpoint at step %d to %s', step, manager.directory)


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Wait until every save of `manager` is committed.

  Raises:
    CheckpointSaveError: a save failed, for example on a full disk or a
      folder that is not writable. The checkpoints committed before it
      stay.
  """
  with _save_failures(manager):
    manager.wait_until_finished()


@contextlib.contextmanager
def _save_failures(manager: ocp.CheckpointManager) -> Iterator[None]:
  """Turn an OSError of a save into CheckpointSaveError.

  Orbax raises a background save's error from the next call that waits for
  it: `wait_until_finished`, or the next `save`, which waits first.
  """
  try:
    yield
  except OSError as error:
    latest = manager.latest_step()
    latest_note = (
      f'the latest complete checkpoint is step {latest}'
      if latest is not None
      else 'no checkpoint is complete'
    )
    raise CheckpointSaveError(
      f'saving a checkpoint into {manager.directory} failed: {error}. Free '
      'disk space or make the folder writable, then rerun to resume; '
      f'{latest_note}'
    ) from error


def _check_compatible(
  metadata: dict[str, Any],
  config: ml_collections.ConfigDict,
  total_steps: int,
  path: str,
) -> None:
  defaults = config_lib.default_config().to_dict()

  def comparable(values: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(values.get('model_kwargs') or {})
    for key in LAYOUT_FREE_MODEL_KWARGS:
      kwargs.pop(key, None)
    # A field newer than the checkpoint had its default when it was saved.
    # The saved config went through JSON, which turns tuples into lists.
    return json.loads(
      json.dumps({**defaults, **values, 'model_kwargs': kwargs})
    )

  saved = comparable(metadata['config'])
  current = comparable(config.to_dict())
  for key in RESUME_KEYS:
    if saved.get(key) != current.get(key):
      raise ConfigError(
        f'checkpoint {path} was written with {key}={saved.get(key)!r} but '
        f'the config has {key}={current.get(key)!r}; use a new --workdir '
        'or the same config'
      )
  saved_total = metadata.get('total_steps')
  if config.schedule != 'constant' and saved_total != total_steps:
    raise ConfigError(
      f'checkpoint {path} belongs to a run of {saved_total} steps but the '
      f'config gives {total_steps}, and the {config.schedule!r} schedule '
      'depends on the run length; keep --config.num_epochs and '
      '--config.num_train_steps, or use a new --workdir'
    )


def restore_latest(
  manager: ocp.CheckpointManager,
  template: TrainState,
  config: ml_collections.ConfigDict,
  total_steps: int,
) -> TrainState | None:
  """Return the latest checkpoint's state, or None when there is none.

  `manager` comes from `create_manager`; see `restore` for the other
  arguments and the errors.
  """
  step = manager.latest_step()
  if step is None:
    return None
  return restore(manager, step, template, config, total_steps)


def restore_from(
  checkpoint: CheckpointPath,
  template: TrainState,
  config: ml_collections.ConfigDict,
  total_steps: int,
) -> TrainState:
  """Return the state of `checkpoint`, from any folder; see `restore`."""
  # create=False and no save: this manager never writes to the folder.
  manager = ocp.CheckpointManager(
    checkpoint.directory,
    options=ocp.CheckpointManagerOptions(create=False),
    item_names=ITEM_NAMES,
  )
  try:
    return restore(manager, checkpoint.step, template, config, total_steps)
  finally:
    manager.close()


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  template: TrainState,
  config: ml_collections.ConfigDict,
  total_steps: int,
) -> TrainState:
  """Return the state saved at `step`, after checking its config.

  Args:
    manager: the manager of the checkpoint's folder.
    step: a complete step of `manager`.
    template: a freshly initialised state with the same structure.
    config: the run's config, checked against the checkpoint's.
    total_steps: the run's length in steps, checked likewise.

  Raises:
    ConfigError: the checkpoint was written by an incompatible config.
    CheckpointError: the checkpoint cannot be read.
  """
  path = os.path.join(str(manager.directory), str(step))
  metadata = read_metadata(manager, step)
  _check_compatible(metadata, config, total_steps, path)
  target = serialization.to_state_dict(template)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
    )['state']
  except (OSError, ValueError, KeyError) as error:
    raise unreadable(path, error) from error
  logging.info('Restored checkpoint %s', path)
  return serialization.from_state_dict(template, restored)


def read_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """Return the metadata saved at `step`: 'config', 'total_steps', 'metrics'.

  Raises:
    CheckpointError: the metadata cannot be read.
  """
  try:
    return manager.restore(
      step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    )['metadata']
  except (OSError, ValueError, KeyError) as error:
    path = os.path.join(str(manager.directory), str(step))
    raise unreadable(path, error) from error


# The advice for a checkpoint that cannot be read when resuming.
_RESUME_ADVICE = (
  'move it out of its folder to resume from the one before, or use a new '
  '--workdir'
)


def unreadable(
  path: str, error: Exception, advice: str = _RESUME_ADVICE
) -> CheckpointError:
  """Return the error for checkpoint `path`, which raised `error` on reading.

  The message gives the reason in one line and then `advice`.
  """
  reason = ' '.join(str(error).split())[:300]
  return CheckpointError(
    f'cannot read checkpoint {path}: {type(error).__name__}: {reason}; {advice}'
  )
