"""CCP and NCP polynomial layers of degree N, and classifiers built on them.

Notation: z is the layer's input, ⊙ the element-wise product, and U_n, A_n,
S_n learned linear maps (dense layers, or convolutions for images).

- CCP, the coupled CP decomposition: x_1 = U_1 z, then
  x_n = (U_n z) ⊙ x_{n-1} + x_{n-1} for n = 2..N.
- NCP, the nested CP decomposition: x_1 = A_1 z, then a_n = A_n z,
  s_n = S_n x_{n-1} and x_n = a_n ⊙ s_n + a_n for n = 2..N. NCP-Skip adds
  x_{n-1} to each x_n.

Each x_n is a polynomial of degree n in z, so x_N has degree N; a linear
head on top keeps the degree. Every linear map has a bias, which folds the
lower-degree terms in.

References:
  Chrysos, Moschoglou, Bouritsas, Panagakis, Deng, Zafeiriou. "Π-nets: Deep
  Polynomial Neural Networks". CVPR 2020. arXiv:2003.03828.
  Chrysos, Moschoglou, Bouritsas, Deng, Panagakis, Zafeiriou. "Deep
  Polynomial Neural Networks". IEEE T-PAMI 2021. arXiv:2006.13026.
"""

import jax
from flax import linen as nn

from pinet_jax.models import initializers
from pinet_jax.models.images import check_images

DECOMPOSITIONS = ('ccp', 'ncp', 'ncp_skip')


class PolynomialLayer(nn.Module):
  """A CCP, NCP or NCP-Skip polynomial of degree `degree` in its input.

  Attributes:
    features: width of every x_n and of the output.
    degree: N >= 1.
    decomposition: one of `DECOMPOSITIONS`.
    kernel_size: 0 for dense maps on the last axis. A positive side
      makes U_n and A_n square convolutions on NHWC images and S_n 1x1
      convolutions, so every x_n has the same spatial size.
    strides: stride of the convolutions on the input.
    padding: zeros on every side of the input, as PyTorch's `padding=p`.
    init_scheme: a key of `initializers.SCHEMES`.
  """

  features: int
  degree: int
  decomposition: str = 'ccp'
  kernel_size: int = 0
  strides: int = 1
  padding: int = 0
  init_scheme: str = 'pytorch'

  def _map(self, name: str, in_features: int, on_input: bool) -> nn.Module:
    """Return a linear map: U_n or A_n on the input, else S_n on x_{n-1}.

    Dense layers when kernel_size is 0. Otherwise the input maps are the
    layer's convolutions and the state maps 1x1 convolutions.
    """
    size = self.kernel_size if on_input else min(self.kernel_size, 1)
    if size == 0:
      return initializers.dense(
        self.features, in_features, self.init_scheme, name
      )
    init = initializers.layer_init(self.init_scheme, in_features * size**2)
    padding = self.padding if on_input else 0
    # NOTE: XLA's convolution is slow on CPU at small batches (about 1,000
    # img/s for CCPConv on CIFAR-10 in microbatches of 16). The input maps
    # share their input and hyperparameters, so one patch gather and one
    # matrix product, as ProductBlock's 'im2col', would serve them all.
    return nn.Conv(
      self.features,
      (size, size),
      strides=self.strides if on_input else 1,
      padding=[(padding, padding)] * 2,
      kernel_init=init.kernel,
      bias_init=init.bias,
      name=name,
    )

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Return x_N, shape (..., features).

    For convolutions the spatial size is the input maps' output size.
    """
    if self.decomposition not in DECOMPOSITIONS:
      raise ValueError(
        f'unknown decomposition {self.decomposition!r}; choose one of '
        f'{list(DECOMPOSITIONS)}'
      )
    if self.degree < 1:
      raise ValueError(f'degree must be >= 1, got {self.degree}')
    in_features = z.shape[-1]
    x = self._map('input_1', in_features, on_input=True)(z)
    for n in range(2, self.degree + 1):
      term = self._map(f'input_{n}', in_features, on_input=True)(z)
      if self.decomposition == 'ccp':
        x = term * x + x
        continue
      state = self._map(f'state_{n}', self.features, on_input=False)(x)
      new = term * state + term
      x = new + x if self.decomposition == 'ncp_skip' else new
    return x


class PolynomialClassifier(nn.Module):
  """A polynomial layer on the images, then a linear head.

  The logits are a polynomial of degree `degree` in the pixels. Dense
  layers (`kernel_size=0`) flatten each image first.

  Attributes:
    num_classes: logits per image.
    in_channels: channels of the input images; inputs with other channel
      counts are rejected.
    width: features of the polynomial layer.
    degree: the polynomial degree N.
    decomposition: one of `DECOMPOSITIONS`.
    kernel_size, strides, padding: of the convolutions; kernel_size 0
      makes the layer dense.
    init_scheme: a key of `initializers.SCHEMES`.
  """

  num_classes: int = 10
  in_channels: int = 1
  width: int = 64
  degree: int = 4
  decomposition: str = 'ccp'
  kernel_size: int = 0
  strides: int = 1
  padding: int = 0
  init_scheme: str = 'pytorch'

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Map float images (batch, H, W, in_channels) to (batch, classes)."""
    check_images(images, self.in_channels, type(self).__name__)
    x = images
    if self.kernel_size == 0:
      x = x.reshape(x.shape[0], -1)
    x = PolynomialLayer(
      features=self.width,
      degree=self.degree,
      decomposition=self.decomposition,
      kernel_size=self.kernel_size,
      strides=self.strides,
      padding=self.padding,
      init_scheme=self.init_scheme,
      name='polynomial',
    )(x)
    x = x.reshape(x.shape[0], -1)
    return initializers.dense(
      self.num_classes, x.shape[-1], self.init_scheme, 'head'
    )(x)


class CCPDense(PolynomialClassifier):
  """CCP of degree N on flattened pixels, then a linear head."""

  decomposition: str = 'ccp'
  kernel_size: int = 0


class NCPDense(PolynomialClassifier):
  """NCP of degree N on flattened pixels, then a linear head."""

  decomposition: str = 'ncp'
  kernel_size: int = 0


class ConvClassifier(PolynomialClassifier):
  """Defaults of the convolutional classifiers: 4x4 maps with stride 2.

  The maps halve the image side: MNIST 28 -> 14, CIFAR-10 32 -> 16.
  """

  width: int = 32
  kernel_size: int = 4
  strides: int = 2
  padding: int = 1


class CCPConv(ConvClassifier):
  """Convolutional CCP of degree N, then a linear head."""

  decomposition: str = 'ccp'


class NCPSkipConv(ConvClassifier):
  """Convolutional NCP-Skip of degree N, then a linear head."""

  decomposition: str = 'ncp_skip'
