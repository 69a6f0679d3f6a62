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

Optional batch normalisation (BN) takes one of `NORMALIZATIONS`:

- 'none': the formulas above.
- 'product': BN_n on the product term of every step n >= 2. CCP then has
  x_n = BN_n((U_n z) ⊙ x_{n-1}) + x_{n-1}, and NCP has
  x_n = BN_n(a_n ⊙ s_n) + a_n, plus x_{n-1} for NCP-Skip.
- 'output': BN_n on every x_n, n = 1..N, after it is formed.
- 'last': BN on x_N only.

The layer is a polynomial of degree N only in evaluation mode, where BN
applies fixed running averages and so is an affine map per feature. In
training mode BN uses the statistics of the batch, so an output depends on
the other examples and is not a polynomial of its own input alone. The degree
certificate does not apply there.

References:
  Chrysos, Moschoglou, Bouritsas, Panagakis, Deng, Zafeiriou. "Π-nets: Deep
  Polynomial Neural Networks". CVPR 2020. arXiv:2003.03828.
  Chrysos, Moschoglou, Bouritsas, Deng, Panagakis, Zafeiriou. "Deep
  Polynomial Neural Networks". IEEE T-PAMI 2021. arXiv:2006.13026.
"""

import jax
from flax import linen as nn

from pinet_jax.models import initializers, norms
from pinet_jax.models.images import check_images

DECOMPOSITIONS = ('ccp', 'ncp', 'ncp_skip')
NORMALIZATIONS = ('none', 'product', 'output', 'last')


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
  """Raise ValueError unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f'unknown {kind} {value!r}; choose one of {list(choices)}')


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
    normalization: one of `NORMALIZATIONS`. The BatchNorm submodules are
      `norm_n` on step n's product term ('product', n = 2..N) or on x_n
      ('output', n = 1..N), and `norm_out` on x_N ('last'). Each holds a
      scale and a bias in 'params' and a mean and a variance in
      'batch_stats', one per feature. 'product' at degree 1 has none.
  """

  features: int
  degree: int
  decomposition: str = 'ccp'
  kernel_size: int = 0
  strides: int = 1
  padding: int = 0
  init_scheme: str = 'pytorch'
  normalization: str = 'none'

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

  def _check_attributes(self) -> None:
    """Raise ValueError on an unknown choice or a degree below 1."""
    _check_choice('decomposition', self.decomposition, DECOMPOSITIONS)
    _check_choice('normalization', self.normalization, NORMALIZATIONS)
    if self.degree < 1:
      raise ValueError(f'degree must be >= 1, got {self.degree}')

  def _step(self, n: int, z: jax.Array, x: jax.Array, train: bool) -> jax.Array:
    """Return x_n from the input z and x = x_{n-1}, for n >= 2."""
    term = self._map(f'input_{n}', z.shape[-1], on_input=True)(z)
    if self.decomposition == 'ccp':
      product, added = term * x, x
    else:
      state = self._map(f'state_{n}', self.features, on_input=False)(x)
      product, added = term * state, term
    if self.normalization == 'product':
      product = norms.batch_norm(train, f'norm_{n}')(product)
    # Add in the formulas' order, (product + added) + x_{n-1}, so that
    # 'none' rounds exactly as the unnormalised layer always has.
    new = product + added
    return new + x if self.decomposition == 'ncp_skip' else new

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    """Return x_N, shape (..., features).

    For convolutions the spatial size is the input maps' output size.

    Args:
      z: the input, (batch, in_features) for dense maps or NHWC images for
        convolutions.
      train: normalise with the batch's statistics and update the running
        averages, which needs `mutable=['batch_stats']` in `apply`. False
        uses the running averages. Ignored when normalization is 'none'.
    """
    self._check_attributes()
    x = self._map('input_1', z.shape[-1], on_input=True)(z)
    if self.normalization == 'output':
      x = norms.batch_norm(train, 'norm_1')(x)
    for n in range(2, self.degree + 1):
      x = self._step(n, z, x, train)
      if self.normalization == 'output':
        x = norms.batch_norm(train, f'norm_{n}')(x)
    if self.normalization == 'last':
      x = norms.batch_norm(train, 'norm_out')(x)
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
    normalization: one of `NORMALIZATIONS`, see `PolynomialLayer`. Any
      choice but 'none' makes the logits a polynomial only with
      `train=False`.
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
  normalization: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Map float images (batch, H, W, in_channels) to (batch, classes).

    With `train=True` BatchNorm uses the batch's statistics, as in
    `PolynomialLayer`, and `apply` needs `mutable=['batch_stats']`.
    """
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
      normalization=self.normalization,
      name='polynomial',
    )(x, train=train)
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
