"""Activation-free residual networks whose nonlinearity is a product.

Two residual blocks, each with a main branch o and a shortcut s(x) (the
identity, or a 1x1 convolution and BatchNorm when the shape changes):

- Π-net product block (the authors' ImageNet code):
  o = BN_2(conv3x3(BN_1(conv3x3(x)))) and
  y = o + s(x) + BN_3(o ⊙ s(x)), with an optional 1x1 convolution on the
  product before BN_3. BN_2 starts with γ = 0, so o = 0 at initialisation
  and every block starts as its shortcut: the identity, or BN(conv1x1(x))
  where the shape changes.
- R-PolyNet regularised block: o = BN_2(conv(IBN(conv(x)))), where IBN
  normalises the first 80% of the channels per example (instance norm) and
  the rest over the batch, and y = o + s(x) + α · BN_3(conv1x1(o ⊙ s(x)))
  with a learned scalar α that starts at 0. Kernels are drawn from
  N(0, 16 / fan_in).

There is no activation function anywhere. In evaluation every BatchNorm is
an affine map, so each block doubles the polynomial degree of its input.

Layouts: 'cifar' has a 3x3 stem and no max-pool, for 32x32 images;
'imagenet' has a 7x7 stride-2 stem and a 3x3 stride-2 max-pool, for
224x224 images. Both end in global average pooling and a linear head.

References:
  Chrysos et al. "Π-nets: Deep Polynomial Neural Networks". CVPR 2020.
  Chrysos, Wang, Deng, Cevher. "Regularization of polynomial networks for
  image recognition". CVPR 2023.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from pinet_jax.models import initializers, norms
from pinet_jax.models.images import check_images

BLOCKS = ('pi', 'regularised')
LAYOUTS = ('cifar', 'imagenet')

# Kernel initialisers by name. 'kaiming_fan_out' is torchvision's ResNet
# default, N(0, 2 / fan_out); 'rpolynet' is N(0, 16 / fan_in).
KERNEL_INITS = {
  'kaiming_fan_out': nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
  'rpolynet': nn.initializers.variance_scaling(16.0, 'fan_in', 'normal'),
}

# Share of the channels that IBN normalises per example.
INSTANCE_FRACTION = 0.8


def _conv(
  features: int, size: int, strides: int, init: str, name: str
) -> nn.Module:
  """Return a bias-free square convolution padded like PyTorch's.

  A BatchNorm follows every convolution here, and its β plays the bias.
  """
  padding = (size - 1) // 2
  return nn.Conv(
    features,
    (size, size),
    strides=strides,
    padding=[(padding, padding)] * 2,
    use_bias=False,
    kernel_init=KERNEL_INITS[init],
    name=name,
  )


class InstanceBatchNorm(nn.Module):
  """IBN: instance norm on the first channels, batch norm on the rest.

  Attributes:
    instance_fraction: share of the channels, rounded to a whole number,
      normalised per example; at least one channel goes to each part.
  """

  instance_fraction: float = INSTANCE_FRACTION

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Normalise NHWC `x`; the output has x's shape."""
    channels = x.shape[-1]
    if channels < 2:
      raise ValueError(
        f'IBN needs at least 2 channels, one per normalisation, got {channels}'
        '; use a larger width'
      )
    split = min(max(round(self.instance_fraction * channels), 1), channels - 1)
    instance = norms.instance_norm('instance')(x[..., :split])
    batch = norms.batch_norm(train, 'batch')(x[..., split:])
    return jnp.concatenate([instance, batch], axis=-1)


class ResidualBlock(nn.Module):
  """One product-polynomial residual block, 'pi' or 'regularised'.

  Attributes:
    features: output channels.
    strides: stride of the first 3x3 convolution and of the shortcut.
    block: one of `BLOCKS`.
    product_conv: a 1x1 convolution on the product before BN_3 ('pi' only;
      'regularised' always has it).
    kernel_init: a key of `KERNEL_INITS`.
  """

  features: int
  strides: int = 1
  block: str = 'pi'
  product_conv: bool = False
  kernel_init: str = 'kaiming_fan_out'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Map (batch, H, W, C) to (batch, H / strides, W / strides, features)."""
    regularised = self.block == 'regularised'
    out = _conv(self.features, 3, self.strides, self.kernel_init, 'conv_1')(x)
    if regularised:
      out = InstanceBatchNorm(name='norm_1')(out, train)
    else:
      out = norms.batch_norm(train, 'norm_1')(out)
    out = _conv(self.features, 3, 1, self.kernel_init, 'conv_2')(out)
    out = norms.batch_norm(train, 'norm_2', zero_scale=not regularised)(out)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv(
        self.features, 1, self.strides, self.kernel_init, 'shortcut_conv'
      )(x)
      shortcut = norms.batch_norm(train, 'shortcut_norm')(shortcut)
    product = out * shortcut
    if regularised or self.product_conv:
      product = _conv(self.features, 1, 1, self.kernel_init, 'product_conv')(
        product
      )
    product = norms.batch_norm(train, 'norm_3')(product)
    if regularised:
      product = self.param('alpha', nn.initializers.zeros, ()) * product
    return out + shortcut + product


class PiResNet(nn.Module):
  """A ResNet of product-polynomial blocks with no activation functions.

  Attributes:
    num_classes: logits per image.
    in_channels: channels of the input images.
    stage_sizes: residual blocks per stage; (2, 2, 2, 2) is ResNet-18's.
    width: channels of the stem and the first stage; stage i has
      width * 2^i and starts with a stride-2 block when i > 0.
    layout: one of `LAYOUTS`.
    block: one of `BLOCKS`.
    product_conv: the 'pi' block's 1x1 convolution on the product.
    kernel_init: a key of `KERNEL_INITS`.
  """

  num_classes: int = 10
  in_channels: int = 3
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  layout: str = 'cifar'
  block: str = 'pi'
  product_conv: bool = False
  kernel_init: str = 'kaiming_fan_out'

  def _check(self) -> None:
    for name, value, choices in (
      ('layout', self.layout, LAYOUTS),
      ('block', self.block, BLOCKS),
      ('kernel_init', self.kernel_init, tuple(KERNEL_INITS)),
    ):
      if value not in choices:
        raise ValueError(
          f'unknown {name} {value!r}; choose one of {list(choices)}'
        )
    if not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError(
        'stage_sizes must list at least one stage of at least one block, '
        f'got {tuple(self.stage_sizes)}'
      )
    if self.width < 1:
      raise ValueError(f'width must be positive, got {self.width}')

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Compute logits (batch, num_classes) from float NHWC images.

    Args:
      images: (batch, H, W, in_channels); 32x32 for 'cifar', 224x224 for
        'imagenet', though any size the strides leave non-empty works.
      train: normalise with batch statistics and update their running
        averages (apply with mutable=['batch_stats']); False uses the
        averages.
    """
    self._check()
    check_images(images, self.in_channels, type(self).__name__)
    cifar = self.layout == 'cifar'
    stem_size, stem_strides = (3, 1) if cifar else (7, 2)
    x = _conv(
      self.width, stem_size, stem_strides, self.kernel_init, 'stem_conv'
    )(images)
    x = norms.batch_norm(train, 'stem_norm')(x)
    if not cifar:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, size in enumerate(self.stage_sizes):
      for index in range(size):
        x = ResidualBlock(
          features=self.width * 2**stage,
          strides=2 if stage > 0 and index == 0 else 1,
          block=self.block,
          product_conv=self.product_conv,
          kernel_init=self.kernel_init,
          name=f'stage_{stage + 1}_block_{index + 1}',
        )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return initializers.dense(self.num_classes, x.shape[-1], 'pytorch', 'head')(
      x
    )


class PiResNetImageNet(PiResNet):
  """PiResNet with the ImageNet layout and 1000 classes."""

  num_classes: int = 1000
  layout: str = 'imagenet'


class RPolyNet(PiResNet):
  """PiResNet of R-PolyNet regularised blocks and N(0, 16/fan_in) kernels."""

  block: str = 'regularised'
  kernel_init: str = 'rpolynet'
