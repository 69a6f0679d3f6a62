"""Reference Π-net on CIFAR-10, with the reference training setup.

Command:
  make train-cifar10 DATA=/path/to/cifar10

Adam, lr 1e-3, batch 64, 10 epochs, pixels in [0, 1], no augmentation: the
setup of the reference implementation, which reported about 70% test
accuracy with training accuracy far above it. Set --config.augment=True for
random crops and flips.

Expected: 65.53% test accuracy (68.5% train) with seed 0, in about 11
minutes on 2 cores of an x86-64 CPU with AVX-512. The run is fragile: it
sits at chance for the first epochs, and a run that differed only in float
rounding ended at 43.81%.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'cifar10'
  return config
