"""Saving and restoring the training state with orbax.

A checkpoint contains the train state (step, parameters, optimiser state) and a
JSON record of the config that wrote it. The step is the number of training
batches consumed, which fixes the epoch and the position inside it, so a
resumed run continues the same data order.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from pinet_jax.errors import ConfigError
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
  'model',
  'model_kwargs',
  'batch_size',
  'seed',
  'optimizer',
  'learning_rate',
  'schedule',
  'warmup_fraction',
  'momentum',
  'weight_decay',
)
# Model arguments that change how the model computes, not its parameters.
LAYOUT_FREE_MODEL_KWARGS = ('formulation',)


def create_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """Return a manager of the checkpoints in `directory`, keeping `keep`."""
  # Removing temporary folders of an interrupted save keeps the directory
  # to committed checkpoints only; orbax never picks one for restore.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=options,
    item_names=('state', 'metadata'),
  )


def save(
  manager: ocp.CheckpointManager,
  state: TrainState,
  config: ml_collections.ConfigDict,
  total_steps: int,
  metrics: dict[str, float] | None = None,
) -> None:
  """Save `state` at its step; the write finishes in the background.

  A step that is already saved is left as it is. Call
  `manager.wait_until_finished()` before the process exits.

  Args:
    manager: from `create_manager`.
    state: the state to save.
    config: the run's config, recorded to check a later resume.
    total_steps: the run's length in steps, which schedules depend on.
    metrics: the latest evaluation, recorded for reference.
  """
  step = int(state.step)
  if step in manager.all_steps():
    return
  metadata = {
    'config': config.to_dict(),
    'total_steps': total_steps,
    'metrics': metrics or {},
  }
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(serialization.to_state_dict(state)),
      metadata=ocp.args.JsonSave(metadata),
    ),
  )
  logging.info('Saving checkpoint at step %d to %s', step, manager.directory)


def _check_compatible(
  metadata: dict[str, Any],
  config: ml_collections.ConfigDict,
  total_steps: int,
  path: str,
) -> None:
  def comparable(values: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(values.get('model_kwargs') or {})
    for key in LAYOUT_FREE_MODEL_KWARGS:
      kwargs.pop(key, None)
    # The saved config went through JSON, which turns tuples into lists.
    return json.loads(json.dumps({**values, 'model_kwargs': kwargs}))

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

  Args:
    manager: from `create_manager`.
    template: a freshly initialised state with the same structure.
    config: the run's config, checked against the checkpoint's.
    total_steps: the run's length in steps, checked likewise.

  Raises:
    ConfigError: the checkpoint was written by an incompatible config.
  """
  step = manager.latest_step()
  if step is None:
    return None
  path = os.path.join(str(manager.directory), str(step))
  metadata = manager.restore(
    step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
  )['metadata']
  _check_compatible(metadata, config, total_steps, path)
  target = serialization.to_state_dict(template)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
  )['state']
  logging.info('Restored checkpoint %s', path)
  return serialization.from_state_dict(template, restored)
