"""The product block, the only nonlinearity of a Π-net.

A product block applies two convolutions with identical hyperparameters to
the same input and multiplies their outputs element-wise (a Hadamard
product). Stacking k blocks makes the output a polynomial of degree 2^k in
the input, with no activation function anywhere.

The block can compute its two convolutions in several mathematically equal
ways (`FORMULATIONS`). All of them read the same parameters, stored as two
standard Flax convolutions, so checkpoints do not depend on the choice.

References:
  Chrysos, Moschoglou, Bouritsas, Panagakis, Deng, Zafeiriou. "Π-nets: Deep
  Polynomial Neural Networks". CVPR 2020. arXiv:2003.03828.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.custom_derivatives import SymbolicZero

from pinet_jax.models import initializers

# 'plain': two convolutions. 'fused': one convolution with both kernels
# concatenated along the output channels, then split. 'im2col': gather the
# kernel-sized patches once and multiply them by both kernels in one matrix
# product. XLA:CPU computes the gradients of that product much faster than
# those of a strided convolution. 's2d': as 'im2col', but a stride-2 block
# with an even kernel first moves each 2x2 pixel group into the channels
# (space-to-depth), which turns it into a stride-1 block with half the
# kernel size and so gathers 4x fewer, contiguous slices. Both matrix
# formulations multiply through `patch_matmul`, whose kernel gradient
# XLA:CPU runs in its faster matrix library.
FORMULATIONS = ('plain', 'fused', 'im2col', 's2d')


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Return a convolution's output size along one spatial axis.

  PyTorch's formula for symmetric padding: floor((size + 2p - k) / s) + 1.
  """
  return (size + 2 * padding - kernel) // stride + 1


def block_output_sizes(
  image_size: int, specs: Sequence[tuple[int, int, int]]
) -> list[int]:
  """Return the spatial size after each block of (kernel, stride, padding)."""
  sizes = []
  for kernel, stride, padding in specs:
    image_size = conv_output_size(image_size, kernel, stride, padding)
    sizes.append(image_size)
  return sizes


class ConvParams(nn.Module):
  """The kernel and bias of one convolution, laid out as `nn.Conv`'s.

  Attributes:
    shape: kernel shape (kh, kw, in_channels, out_channels).
    init: initialisers for this layer's fan-in.
  """

  shape: tuple[int, int, int, int]
  init: initializers.LayerInit
  use_bias: bool = True

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """Return the kernel and the bias; zeros stand in for no bias."""
    kernel = self.param('kernel', self.init.kernel, self.shape)
    if not self.use_bias:
      return kernel, jnp.zeros(self.shape[-1:], kernel.dtype)
    bias = self.param('bias', self.init.bias, self.shape[-1:])
    return kernel, bias


def _conv(
  x: jax.Array, kernel: jax.Array, strides: int, padding: int
) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(strides, strides),
    padding=[(padding, padding)] * 2,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def _patches(x: jax.Array, size: int, strides: int, padding: int):
  """Return the (size x size) patches of `x` as rows of a matrix.

  Shape (batch, out_h, out_w, size * size * channels), ordered (kh, kw, c)
  like a flattened HWIO kernel, so `patches @ kernel.reshape(-1, out)` is
  the convolution.
  """
  x = jnp.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  out_h = conv_output_size(x.shape[1], size, strides, 0)
  out_w = conv_output_size(x.shape[2], size, strides, 0)
  slices = [
    x[
      :,
      row : row + strides * (out_h - 1) + 1 : strides,
      col : col + strides * (out_w - 1) + 1 : strides,
      :,
    ]
    for row in range(size)
    for col in range(size)
  ]
  return jnp.concatenate(slices, axis=-1)


@jax.custom_jvp
def patch_matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """Return `patches @ kernel`, with a faster kernel gradient on CPU.

  Args:
    patches: (..., k) rows, such as the (batch, h, w, k) output of
      `_patches`.
    kernel: (k, n).

  Returns:
    (..., n), the same values as `patches @ kernel`. Only the derivative
    differs, and only in how it is computed (see `_patch_matmul_jvp`).
  """
  return patches @ kernel


def _patch_matmul_jvp(primals, tangents):
  """Differentiate `patch_matmul` as a product, with a transposed copy.

  Reverse mode transposes the kernel's term of the tangent into the
  kernel gradient, (rows, k)^T @ (rows, n) summed over every row. Written
  as the plain product `patches @ d_kernel`, that transpose contracts the
  patches over their first axis. XLA:CPU hands such a product to Eigen,
  which took about 30% longer than YNNPACK takes for the standard form.
  That was measured on the 144x2048 patches of the reference network's
  block 5, on a 2-core x86-64 CPU. So on CPU the tangent reads the
  patches from a transposed (k, rows) copy, whose transpose is the
  standard form, and `optimization_barrier` keeps XLA from folding the
  copy away. The copy costs one pass over the patches; other platforms
  skip it.
  """
  patches, kernel = primals
  d_patches, d_kernel = tangents
  out = patches @ kernel
  terms = []
  if not isinstance(d_patches, SymbolicZero):
    terms.append(d_patches @ kernel)
  if not isinstance(d_kernel, SymbolicZero):
    rows = patches.reshape(-1, patches.shape[-1])
    columns = jax.lax.platform_dependent(
      rows,
      cpu=lambda rows: jax.lax.optimization_barrier(rows.T),
      default=lambda rows: rows.T,
    )
    terms.append((columns.T @ d_kernel).reshape(out.shape))
  # JAX calls the rule only when at least one tangent is not zero.
  return out, sum(terms[1:], terms[0])


patch_matmul.defjvp(_patch_matmul_jvp, symbolic_zeros=True)


def _space_to_depth_matmul(
  x: jax.Array, kernel: jax.Array, padding: int
) -> jax.Array:
  """Compute a stride-2 convolution with an even kernel as 's2d' does.

  Args:
    x: (batch, height, width, in_channels).
    kernel: (k, k, in_channels, out_channels) with k even.
    padding: zeros on every side, as in the convolution.

  Returns:
    The convolution, (batch, out_h, out_w, out_channels).
  """
  size, _, in_channels, out_channels = kernel.shape
  out_h = conv_output_size(x.shape[1], size, 2, padding)
  out_w = conv_output_size(x.shape[2], size, 2, padding)
  # The padded input covers 2 * (out - 1) + k rows, and one more when
  # (height + 2p - k) is odd. That row is never read, so cropping it leaves
  # an even side.
  height = 2 * (out_h - 1) + size
  width = 2 * (out_w - 1) + size
  x = jnp.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  x = x[:, :height, :width, :]
  batch = x.shape[0]
  x = x.reshape(batch, height // 2, 2, width // 2, 2, in_channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(
    batch, height // 2, width // 2, 4 * in_channels
  )
  # Kernel tap (2a + p, 2b + q) becomes tap (a, b) of channel group (p, q).
  half = size // 2
  kernel = kernel.reshape(half, 2, half, 2, in_channels, out_channels)
  kernel = kernel.transpose(0, 2, 1, 3, 4, 5)
  patches = _patches(x, half, 1, 0)
  return patch_matmul(patches, kernel.reshape(-1, out_channels))


class ProductBlock(nn.Module):
  """Two parallel convolutions of one input, multiplied element-wise.

  Attributes:
    features: output channels of each convolution.
    kernel_size: square kernel side.
    strides: stride along both spatial axes.
    padding: zeros added on every side, as PyTorch's `padding=p`.
    init_scheme: initialisation scheme, a key of `initializers.SCHEMES`.
    formulation: how to compute the convolutions, one of `FORMULATIONS`;
      every choice gives the same function of the same parameters.
    use_bias: give both convolutions a bias. Without, the block is a
      homogeneous quadratic: block(c * x) = c^2 * block(x).
    dtype: computation dtype; None keeps the input's.
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  init_scheme: str = 'pytorch'
  formulation: str = 'plain'
  use_bias: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Apply the block.

    Args:
      x: images, shape (batch, height, width, in_channels).

    Returns:
      Shape (batch, height', width', features), where height' and width'
      follow `conv_output_size`; each entry is a degree-2 polynomial of x.
    """
    if self.formulation not in FORMULATIONS:
      raise ValueError(
        f'unknown formulation {self.formulation!r}; choose one of '
        f'{list(FORMULATIONS)}'
      )
    in_channels = x.shape[-1]
    shape = (self.kernel_size, self.kernel_size, in_channels, self.features)
    init = initializers.layer_init(
      self.init_scheme, in_channels * self.kernel_size**2
    )
    (kernel_1, bias_1), (kernel_2, bias_2) = (
      ConvParams(shape, init, self.use_bias, name=name)()
      for name in ('conv_1', 'conv_2')
    )
    x, kernel_1, bias_1, kernel_2, bias_2 = nn.dtypes.promote_dtype(
      x, kernel_1, bias_1, kernel_2, bias_2, dtype=self.dtype
    )
    if self.formulation == 'plain':
      first = _conv(x, kernel_1, self.strides, self.padding) + bias_1
      second = _conv(x, kernel_2, self.strides, self.padding) + bias_2
      return first * second
    kernel = jnp.concatenate([kernel_1, kernel_2], axis=-1)
    bias = jnp.concatenate([bias_1, bias_2])
    if self.formulation == 'fused':
      both = _conv(x, kernel, self.strides, self.padding)
    elif (
      self.formulation == 's2d'
      and self.strides == 2
      and self.kernel_size % 2 == 0
    ):
      both = _space_to_depth_matmul(x, kernel, self.padding)
    else:
      patches = _patches(x, self.kernel_size, self.strides, self.padding)
      both = patch_matmul(patches, kernel.reshape(-1, 2 * self.features))
    first, second = jnp.split(both + bias, 2, axis=-1)
    return first * second
