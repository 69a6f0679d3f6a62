"""Parameter initialisation schemes for convolution and dense layers.

A product network multiplies the outputs of its layers, so the scale of every
layer compounds through the whole network: the initialiser decides whether
a degree-32 polynomial starts near zero, near one or overflows. The schemes
here are selected by name so that a config can switch between them.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]


class LayerInit(NamedTuple):
  """Kernel and bias initialisers for one layer with a known fan-in."""

  kernel: Initializer
  bias: Initializer


def _uniform(bound: float) -> Initializer:
  """Return an initialiser that draws from U(-bound, bound)."""

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pytorch(fan_in: int) -> LayerInit:
  # PyTorch's Conv2d and Linear defaults: kaiming_uniform with a = sqrt(5)
  # gives a kernel bound of sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in),
  # and the bias uses the same bound.
  bound = fan_in**-0.5
  return LayerInit(kernel=_uniform(bound), bias=_uniform(bound))


def _lecun_normal(fan_in: int) -> LayerInit:
  del fan_in  # lecun_normal reads the fan-in from the kernel shape.
  return LayerInit(
    kernel=nn.initializers.lecun_normal(), bias=nn.initializers.zeros
  )


SCHEMES: dict[str, Callable[[int], LayerInit]] = {
  'pytorch': _pytorch,
  'lecun_normal': _lecun_normal,
}


def layer_init(scheme: str, fan_in: int) -> LayerInit:
  """Return the initialisers of `scheme` for a layer with `fan_in` inputs.

  Args:
    scheme: 'pytorch' (kernel and bias from U(-1/sqrt(fan_in),
      1/sqrt(fan_in)), PyTorch's Conv2d and Linear defaults) or
      'lecun_normal' (Flax's default: truncated normal kernel with std
      1/sqrt(fan_in), zero bias).
    fan_in: inputs per output unit, in_channels * kh * kw for a convolution.

  Raises:
    ValueError: `scheme` is not one of `SCHEMES`.
  """
  if scheme not in SCHEMES:
    raise ValueError(
      f'unknown initialisation scheme {scheme!r}; '
      f'choose one of {sorted(SCHEMES)}'
    )
  if fan_in < 1:
    raise ValueError(f'fan_in must be positive, got {fan_in}')
  return SCHEMES[scheme](fan_in)


def dense(
  features: int,
  fan_in: int,
  scheme: str,
  name: str,
  dtype: jnp.dtype | None = None,
  use_bias: bool = True,
) -> nn.Dense:
  """Return an `nn.Dense` initialised by `scheme` for `fan_in` inputs."""
  init = layer_init(scheme, fan_in)
  return nn.Dense(
    features,
    use_bias=use_bias,
    kernel_init=init.kernel,
    bias_init=init.bias,
    dtype=dtype,
    name=name,
  )
