"""Polynomial network models, importable without TensorFlow.

`get_model(name, **kwargs)` builds a registered model by name, as the
training configs do. The classes are exported for direct use, with:
- `polynet_from_torch` and `piresnet_from_torch`, which import PyTorch
  weights of the reference network and of the Π-net ResNet;
- `certify_degree` and `homogeneity_error`, numerical checks of a model's
  polynomial degree;
- `activation_rms`, each block's output scale, to find where a run blows up.
"""

from collections.abc import Callable

from flax import linen as nn

from pinet_jax.models.degree import (
  DegreeCertificate,
  certify_degree,
  homogeneity_error,
)
from pinet_jax.models.diagnostics import activation_rms
from pinet_jax.models.initializers import SCHEMES as INIT_SCHEMES
from pinet_jax.models.initializers import layer_init
from pinet_jax.models.polynet import POLYNET_BLOCKS, BlockSpec, PolyNet
from pinet_jax.models.polynomial import (
  DECOMPOSITIONS,
  NORMALIZATIONS,
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
from pinet_jax.models.resnet import (
  PiResNet,
  PiResNetImageNet,
  ResidualBlock,
  RPolyNet,
)
from pinet_jax.models.torch_import import (
  piresnet_from_torch,
  polynet_from_torch,
)

MODELS: dict[str, Callable[..., nn.Module]] = {
  'polynet': PolyNet,
  'ccp_dense': CCPDense,
  'ncp_dense': NCPDense,
  'ccp_conv': CCPConv,
  'ncp_skip_conv': NCPSkipConv,
  'pi_resnet': PiResNet,
  'pi_resnet_imagenet': PiResNetImageNet,
  'r_polynet': RPolyNet,
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
  'NORMALIZATIONS',
  'NCPDense',
  'NCPSkipConv',
  'POLYNET_BLOCKS',
  'BlockSpec',
  'CCPConv',
  'CCPDense',
  'DegreeCertificate',
  'PiResNet',
  'PiResNetImageNet',
  'PolyNet',
  'PolynomialClassifier',
  'PolynomialLayer',
  'ProductBlock',
  'RPolyNet',
  'ResidualBlock',
  'activation_rms',
  'block_output_sizes',
  'certify_degree',
  'conv_output_size',
  'get_model',
  'homogeneity_error',
  'layer_init',
  'list_models',
  'piresnet_from_torch',
  'polynet_from_torch',
]
