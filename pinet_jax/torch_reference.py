"""Reference networks in PyTorch, for speed and parity comparisons.

`TorchPolyNet` names its layers as the published PyTorch implementation
does (`conv11`, `conv12`, ... `conv52`, `fc`), so its state_dict keys match
the reference checkpoints. `TorchPiResNet` is the Flax `PiResNet` with the
'pi' block, named as torchvision names its ResNets (`conv1`, `bn1`,
`layer1.0.conv1`, ... `fc`). Importing this module needs torch, an
optional dependency (`pip install 'pinet_jax[torch]'`). Nothing else in the
package imports it.
"""

from collections.abc import Sequence

import torch
from torch import nn

from pinet_jax.models.polynet import POLYNET_BLOCKS
from pinet_jax.models.resnet import LAYOUTS


class TorchPolyNet(nn.Module):
  """Five product blocks and a linear head, PyTorch's default init.

  Args:
    in_channels: 1 for MNIST, 3 for CIFAR-10.
    num_classes: logits per image.
    width: channels of the first block.
    image_size: input height and width, which fixes the head's input size.
  """

  def __init__(
    self,
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 16,
    image_size: int = 28,
  ):
    super().__init__()
    channels, size = in_channels, image_size
    for index, spec in enumerate(POLYNET_BLOCKS, start=1):
      out = width * spec.width_multiplier
      for twin in (1, 2):
        conv = nn.Conv2d(
          channels, out, spec.kernel_size, spec.strides, spec.padding
        )
        self.add_module(f'conv{index}{twin}', conv)
      channels = out
      size = (size + 2 * spec.padding - spec.kernel_size) // spec.strides + 1
    self.fc = nn.Linear(channels * size * size, num_classes)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """Map images (batch, channels, height, width) to logits."""
    x = images
    for index in range(1, len(POLYNET_BLOCKS) + 1):
      first = getattr(self, f'conv{index}1')(x)
      second = getattr(self, f'conv{index}2')(x)
      x = first * second
    return self.fc(torch.flatten(x, 1))


def _conv(
  in_channels: int, out_channels: int, size: int, stride: int = 1
) -> nn.Conv2d:
  # A BatchNorm follows every convolution, and its bias plays the conv's.
  return nn.Conv2d(
    in_channels, out_channels, size, stride, (size - 1) // 2, bias=False
  )


class TorchPiBlock(nn.Module):
  """The Π-net product block: y = o + s(x) + BN_3([conv1x1](o ⊙ s(x))).

  The main branch is o = bn2(conv2(bn1(conv1(x)))), and the shortcut s is
  the identity, or `downsample` (a 1x1 convolution and BatchNorm) when the
  stride or the channel count changes. `conv3` is the optional 1x1
  convolution on the product.

  Args:
    in_channels: channels of the input x.
    channels: channels of the output y.
    stride: stride of conv1 and of the downsample convolution.
    product_conv: add `conv3`.
  """

  def __init__(
    self, in_channels: int, channels: int, stride: int, product_conv: bool
  ):
    super().__init__()
    self.conv1 = _conv(in_channels, channels, 3, stride)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = _conv(channels, channels, 3)
    self.bn2 = nn.BatchNorm2d(channels)
    # As in PiResNet: o = 0 at initialisation, so the block is the identity.
    nn.init.zeros_(self.bn2.weight)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Sequential(
        _conv(in_channels, channels, 1, stride), nn.BatchNorm2d(channels)
      )
    self.conv3 = _conv(channels, channels, 1) if product_conv else None
    self.bn3 = nn.BatchNorm2d(channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Map (batch, in_channels, H, W) to (batch, channels, H / s, W / s)."""
    out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
    shortcut = x if self.downsample is None else self.downsample(x)
    product = out * shortcut
    if self.conv3 is not None:
      product = self.conv3(product)
    return out + shortcut + self.bn3(product)


class TorchPiResNet(nn.Module):
  """The Flax `PiResNet` with block='pi', in PyTorch.

  Initialised like torchvision's ResNets and like `PiResNet`: kernels from
  N(0, 2 / fan_out), BatchNorm scales 1 (0 for every block's bn2) and
  biases 0, PyTorch's default for `fc`.

  Args:
    num_classes: logits per image.
    in_channels: channels of the input images.
    stage_sizes: blocks per stage, in `layer1`, `layer2`, ...
    width: channels of the stem and of `layer1`. `layerK` has
      width * 2^(K-1) channels and, for K > 1, starts with a stride-2 block.
    layout: 'cifar' (3x3 stem, no max-pool) or 'imagenet' (7x7 stride-2
      stem and a 3x3 stride-2 max-pool).
    product_conv: a 1x1 convolution on each block's product.
  """

  def __init__(
    self,
    num_classes: int = 10,
    in_channels: int = 3,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    width: int = 64,
    layout: str = 'cifar',
    product_conv: bool = False,
  ):
    super().__init__()
    if layout not in LAYOUTS:
      raise ValueError(f'unknown layout {layout!r}; choose one of {LAYOUTS}')
    imagenet = layout == 'imagenet'
    stem_size, stem_stride = (7, 2) if imagenet else (3, 1)
    self.conv1 = _conv(in_channels, width, stem_size, stem_stride)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
    channels = width
    for stage, size in enumerate(stage_sizes):
      out = width * 2**stage
      blocks = []
      for index in range(size):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(TorchPiBlock(channels, out, stride, product_conv))
        channels = out
      self.add_module(f'layer{stage + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.fc = nn.Linear(channels, num_classes)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(
          module.weight, mode='fan_out', nonlinearity='relu'
        )

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """Map images (batch, in_channels, H, W) to logits (batch, classes)."""
    x = self.maxpool(self.bn1(self.conv1(images)))
    for stage in range(1, self.num_stages + 1):
      x = getattr(self, f'layer{stage}')(x)
    x = nn.functional.adaptive_avg_pool2d(x, 1)
    return self.fc(torch.flatten(x, 1))
