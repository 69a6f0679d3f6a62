"""Reference Π-net on CIFAR-10, with the reference training setup.

Command:
  make train-cifar10 DATA=/path/to/cifar10

Adam, lr 1e-3, batch 64, 10 epochs, pixels in [0, 1], no augmentation: the
setup of the reference implementation, which reported about 70% test
accuracy with training accuracy far above it. Set --config.augment=True for
random crops and flips.

Expected: see the results table in README.md for the measured accuracy and
wall time.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'cifar10'
  return config
