"""Per-block activation statistics, to see where a polynomial network blows up.

Every product multiplies magnitudes, so an activation scale a little above
or below 1 compounds with depth: a diverging configuration shows as an RMS
that grows block by block until it overflows.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn


def activation_rms(
  model: nn.Module,
  variables: Mapping[str, Any],
  images: jax.Array,
  train: bool = False,
) -> dict[str, float]:
  """Return the root-mean-square output of each top-level submodule.

  Args:
    model: a Flax module whose direct submodules are its blocks, such as
      `PolyNet` (block_1 ... block_5 and head).
    variables: the model's variables, {'params': ...} and 'batch_stats'
      for models with BatchNorm layers.
    images: one batch, as the model takes it.
    train: pass train=True to the model, as a train step does, so
      BatchNorm layers normalise with the batch's statistics. The running
      averages in `variables` are left unchanged. False calls the model
      without a `train` argument.

  Returns:
    Submodule name to the RMS of its output over the batch, in call order,
    with 'output' for the model's own output last. A value is inf or nan
    exactly where the activations contain inf or nan.
  """
  mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
  mode = {'train': True} if train else {}
  output, state = model.apply(
    variables,
    images,
    capture_intermediates=lambda module, _: len(module.path) == 1,
    mutable=mutable,
    **mode,
  )
  rms = {}
  for name, captured in state['intermediates'].items():
    if name == '__call__':
      continue
    (value,) = captured['__call__']
    rms[name] = _rms(value)
  rms['output'] = _rms(output)
  return rms


def _rms(value: jax.Array) -> float:
  """Return the RMS of `value`, inf or nan only where `value` contains them.

  The squares are taken in float64 after dividing by the maximum magnitude,
  so they cannot overflow, as float32 squares of values above 1.8e19 do.
  """
  value = np.asarray(value, np.float64)
  if not np.all(np.isfinite(value)):
    return float('nan') if np.isnan(value).any() else float('inf')
  scale = np.max(np.abs(value), initial=0.0)
  if scale == 0:
    return 0.0
  return float(scale * np.sqrt(np.mean(np.square(value / scale))))
