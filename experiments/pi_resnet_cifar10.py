"""Π-net ResNet-18 layout at width 16 on CIFAR-10.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/pi_resnet_cifar10.py \\
      --workdir workdirs/pi_resnet_cifar10 \\
      --config.data_dir=/path/to/cifar10

The recipe is `pinet_jax.config.resnet_config`'s: SGD with momentum 0.9,
weight decay 5e-4, batch 128, a one-cycle schedule to lr 0.1, random crops
and flips. Width 16 instead of ResNet-18's 64 keeps an epoch to minutes on
a CPU; --config.model_kwargs.width=64 gives the full network.
"""

from pinet_jax.config import resnet_config


def get_config():
  return resnet_config('cifar10', 'pi_resnet', width=16, num_epochs=4)
