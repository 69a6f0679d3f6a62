"""Polynomial network models, importable without TensorFlow.

`get_model(name, **kwargs)` builds a registered model by name, as the
training configs do; the classes are exported for direct use, with
`polynet_from_torch` (PyTorch weights of the reference network) and
`certify_degree` (a numerical check of a model's polynomial degree) and
`activation_rms` (each block's output scale, to find where a run blows up).
"""

from collections.abc import Callable

from flax import linen as nn

from pinet_jax.models.degree import DegreeCertificate, certify_degree
from pinet_jax.models.diagnostics import activation_rms
from pinet_jax.models.initializers import SCHEMES as INIT_SCHEMES
from pinet_jax.models.initializers import layer_init
from pinet_jax.models.polynet import POLYNET_BLOCKS, BlockSpec, PolyNet
from pinet_jax.models.polynomial import (
  DECOMPOSITIONS,
  CCPConv,
  CCPDense,
  NCPDense,
  NCPSkipConv,
  PolynomialClassifier,
  PolynomialLayer,
)
from pinet_jax.models.product_block import (
  ProductBlock,
  block_output_sizes,
  conv_output_size,
)
from pinet_jax.models.torch_import import polynet_from_torch

MODELS: dict[str, Callable[..., nn.Module]] = {
  'polynet': PolyNet,
  'ccp_dense': CCPDense,
  'ncp_dense': NCPDense,
  'ccp_conv': CCPConv,
  'ncp_skip_conv': NCPSkipConv,
}


def get_model(name: str, **kwargs) -> nn.Module:
  """Build the registered model `name` with constructor arguments `kwargs`.

  Raises:
    ValueError: `name` is not registered.
  """
  if name not in MODELS:
    raise ValueError(
      f'unknown model {name!r}; registered models: {sorted(MODELS)}'
    )
  return MODELS[name](**kwargs)


def list_models() -> list[str]:
  """Return the registered model names, sorted."""
  return sorted(MODELS)


__all__ = [
  'DECOMPOSITIONS',
  'INIT_SCHEMES',
  'MODELS',
  'NCPDense',
  'NCPSkipConv',
  'POLYNET_BLOCKS',
  'BlockSpec',
  'CCPConv',
  'CCPDense',
  'DegreeCertificate',
  'PolyNet',
  'PolynomialClassifier',
  'PolynomialLayer',
  'ProductBlock',
  'activation_rms',
  'block_output_sizes',
  'certify_degree',
  'conv_output_size',
  'get_model',
  'layer_init',
  'list_models',
  'polynet_from_torch',
]
