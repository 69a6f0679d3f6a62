"""Π-net ResNet with a 1x1 convolution on each block's product, CIFAR-10.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/pi_resnet_1x1_cifar10.py \\
      --workdir workdirs/pi_resnet_1x1_cifar10 \\
      --config.data_dir=/path/to/cifar10

As experiments/pi_resnet_cifar10.py, with the variant that the Π-net paper
reports as the more accurate one on ImageNet.
"""

from pinet_jax.config import resnet_config


def get_config():
  config = resnet_config('cifar10', 'pi_resnet', width=16, num_epochs=4)
  config.model_kwargs.product_conv = True
  return config
