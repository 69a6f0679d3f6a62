"""The reference Π-net: five product blocks and a linear classifier.

Every block doubles the polynomial degree, so the logits are a polynomial of
degree 2^5 = 32 in the pixels. There are no activations, no normalisation
and no skip connections; every convolution has a bias. With width 16 the
network has 1,220,362 parameters on MNIST and 1,220,938 on CIFAR-10.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from pinet_jax.models import initializers
from pinet_jax.models.images import check_images
from pinet_jax.models.product_block import ProductBlock


class BlockSpec(NamedTuple):
  """One product block of the reference network."""

  width_multiplier: int
  kernel_size: int
  strides: int
  padding: int


# Output channels are width * width_multiplier. On MNIST the maps go
# 28 -> 28 -> 14 -> 7 -> 6 -> 3, on CIFAR-10 32 -> 32 -> 16 -> 8 -> 7 -> 3.
POLYNET_BLOCKS: tuple[BlockSpec, ...] = (
  BlockSpec(1, 3, 1, 1),
  BlockSpec(2, 4, 2, 1),
  BlockSpec(4, 4, 2, 1),
  BlockSpec(8, 2, 1, 0),
  BlockSpec(16, 4, 2, 1),
)


class PolyNet(nn.Module):
  """The reference five-block product network.

  Attributes:
    num_classes: logits per image.
    in_channels: channels of the input images, 1 for MNIST and 3 for
      CIFAR-10; a mismatched input raises instead of silently building a
      different network.
    width: channels of the first block; block i has width * 2^(i-1).
    init_scheme: initialisation scheme, a key of `initializers.SCHEMES`. The
      default, 'pytorch', reproduces the reference implementation.
    formulation: how each product block computes its convolutions, one of
      `product_block.FORMULATIONS`. All give the same function of the same
      parameters; 's2d' trains fastest on CPU.
    use_bias: give every convolution and the head a bias, as the reference
      does. Without, the logits are a homogeneous polynomial:
      f(c * x) = c^32 * f(x).
    dtype: computation dtype; None keeps the input's.
  """

  num_classes: int = 10
  in_channels: int = 1
  width: int = 16
  init_scheme: str = 'pytorch'
  formulation: str = 'plain'
  use_bias: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Compute logits.

    Args:
      images: float, shape (batch, height, width, in_channels), pixels
        scaled to [0, 1] as the reference does; larger values overflow the
        degree-32 polynomial. MNIST is 28x28, CIFAR-10 32x32.
      train: accepted as every model's `__call__` does; this network
        computes the same function in training and evaluation.

    Returns:
      Logits, shape (batch, num_classes).

    Raises:
      ValueError: `width` is not positive, or `images` is not
        floating-point, not 4-D with `in_channels` channels, or too small
        for the five blocks.
    """
    del train  # No layer behaves differently in training.
    if self.width < 1:
      raise ValueError(f'PolyNet width must be positive, got {self.width}')
    check_images(images, self.in_channels, 'PolyNet')
    x = images
    for index, spec in enumerate(POLYNET_BLOCKS, start=1):
      if min(x.shape[1:3]) + 2 * spec.padding < spec.kernel_size:
        raise ValueError(
          f'PolyNet block {index} needs a map of at least '
          f'{spec.kernel_size - 2 * spec.padding} pixels, got '
          f'{x.shape[1:3]} from input {images.shape[1:3]}'
        )
      x = ProductBlock(
        features=self.width * spec.width_multiplier,
        kernel_size=spec.kernel_size,
        strides=spec.strides,
        padding=spec.padding,
        init_scheme=self.init_scheme,
        formulation=self.formulation,
        use_bias=self.use_bias,
        dtype=self.dtype,
        name=f'block_{index}',
      )(x)
    # NHWC flatten order (row, column, channel); PyTorch's NCHW flatten is
    # (channel, row, column), which matters only when importing weights.
    x = x.reshape(x.shape[0], -1)
    return initializers.dense(
      self.num_classes,
      x.shape[-1],
      self.init_scheme,
      'head',
      self.dtype,
      self.use_bias,
    )(x)
