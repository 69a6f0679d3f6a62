"""ccp_conv of degree 4, width 32, on CIFAR-10.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/ccp_conv_cifar10.py \\
      --workdir workdirs/ccp_conv_cifar10 \\
      --config.data_dir=/path/to/cifar10

The recipe is `pinet_jax.config.polynomial_config`'s: Adam, batch 128,
one-cycle schedule to lr 1e-3, 10 epochs.
"""

from pinet_jax.config import polynomial_config


def get_config():
  return polynomial_config(
    'cifar10', 'ccp_conv', degree=4, width=32, num_epochs=10
  )
