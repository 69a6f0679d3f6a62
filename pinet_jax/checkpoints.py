"""Saving and restoring the training state with orbax.

A checkpoint holds the train state (step, parameters, optimiser state) and a
JSON record of the config that wrote it. The step is the number of training
batches consumed, which fixes the epoch and the position inside it, so a
resumed run continues the same data order.
"""

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from pinet_jax.errors import ConfigError
from pinet_jax.steps import TrainState

# Config fields that change the parameters' shapes or the data order: a
# checkpoint written with other values cannot continue this run.
RESUME_KEYS = (
  'dataset',
  'train_split',
  'model',
  'model_kwargs',
  'batch_size',
  'seed',
  'optimizer',
)
# Model arguments that change how the model computes, not its parameters.
LAYOUT_FREE_MODEL_KWARGS = ('formulation',)


def create_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """Return a manager of the checkpoints in `directory`, keeping `keep`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=options,
    item_names=('state', 'metadata'),
  )


def save(
  manager: ocp.CheckpointManager,
  state: TrainState,
  config: ml_collections.ConfigDict,
  metrics: dict[str, float] | None = None,
) -> None:
  """Save `state` at its step; the write finishes in the background.

  Call `manager.wait_until_finished()` before the process exits.
  """
  step = int(state.step)
  metadata = {'config': config.to_dict(), 'metrics': metrics or {}}
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(serialization.to_state_dict(state)),
      metadata=ocp.args.JsonSave(metadata),
    ),
    force=True,
  )
  logging.info('Saving checkpoint at step %d to %s', step, manager.directory)


def _check_compatible(
  saved: dict[str, Any], config: ml_collections.ConfigDict, path: str
) -> None:
  def comparable(values: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(values.get('model_kwargs') or {})
    for key in LAYOUT_FREE_MODEL_KWARGS:
      kwargs.pop(key, None)
    return {**values, 'model_kwargs': kwargs}

  saved, current = comparable(saved), comparable(config.to_dict())
  for key in RESUME_KEYS:
    if saved.get(key) != current.get(key):
      raise ConfigError(
        f'checkpoint {path} was written with {key}={saved.get(key)!r} but '
        f'the config has {key}={current.get(key)!r}; use a new --workdir '
        'or the same config'
      )


def restore_latest(
  manager: ocp.CheckpointManager,
  template: TrainState,
  config: ml_collections.ConfigDict,
) -> TrainState | None:
  """Return the latest checkpoint's state, or None when there is none.

  Args:
    manager: from `create_manager`.
    template: a freshly initialised state with the same structure.
    config: the run's config, checked against the checkpoint's.

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
  _check_compatible(metadata['config'], config, path)
  target = serialization.to_state_dict(template)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
  )['state']
  logging.info('Restored checkpoint %s', path)
  return serialization.from_state_dict(template, restored)
