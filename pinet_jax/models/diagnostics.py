"""Per-block activation statistics, to see where a polynomial network blows up.

Every product multiplies magnitudes, so an activation scale a little above
or below 1 compounds with depth: a diverging configuration shows as an RMS
that grows block by block until it overflows.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def activation_rms(
  model: nn.Module, variables: Mapping[str, Any], images: jax.Array
) -> dict[str, float]:
  """Return the root-mean-square output of each top-level submodule.

  Args:
    model: a Flax module whose direct submodules are its blocks, such as
      `PolyNet` (block_1 ... block_5 and head).
    variables: the model's variables, {'params': ...}.
    images: one batch, as the model takes it.

  Returns:
    Submodule name to the RMS of its output over the batch, in call order,
    with 'output' for the model's own output last. A value is inf or nan
    where the activations overflowed.
  """
  output, state = model.apply(
    variables,
    images,
    capture_intermediates=lambda module, _: len(module.path) == 1,
    mutable=['intermediates'],
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
  return float(np.sqrt(jnp.mean(jnp.square(value.astype(jnp.float32)))))
