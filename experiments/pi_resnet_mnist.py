"""Π-net ResNet-18 layout at width 16 on MNIST, one epoch.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/pi_resnet_mnist.py \\
      --workdir workdirs/pi_resnet_mnist \\
      --config.data_dir=/path/to/mnist

`pinet_jax.config.resnet_config`'s recipe without crops and flips, which do
not suit digits.
"""

from pinet_jax.config import resnet_config


def get_config():
  return resnet_config('mnist', 'pi_resnet', width=16, num_epochs=1)
