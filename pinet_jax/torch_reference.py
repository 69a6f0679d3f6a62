"""The reference network in PyTorch, for speed and parity comparisons.

The layers and their names follow the published PyTorch implementation
(`conv11`, `conv12`, ... `conv52`, `fc`), so its state_dict keys match the
reference checkpoints. Importing this module needs torch, an optional
dependency (`pip install 'pinet_jax[torch]'`); nothing else in the package
imports it.
"""

import torch
from torch import nn

from pinet_jax.models.polynet import POLYNET_BLOCKS


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
