"""Reference Π-net on CIFAR-10, with a one-cycle learning-rate schedule.

Command:
  make train-cifar10 DATA=/path/to/cifar10

The network is the reference one unchanged (five product blocks, width 16,
PyTorch initialisation, pixels in [0, 1], no augmentation). The recipe is
the reference's (Adam, batch 64, 10 epochs) except for the schedule: a
linear warm-up over the first 10% of the steps to lr 1e-3, then cosine
decay to 0, where the reference keeps lr 1e-3 constant. The constant rate
made the degree-32 network diverge late in some runs; see
experiments/cifar10_reference.py. Set --config.augment=True for random
crops and flips.

Expected: 64.36% test accuracy (72.3% train) with seed 0, in about 6
minutes on 2 cores of an x86-64 CPU with AVX-512.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'cifar10'
  config.schedule = 'one_cycle'
  config.warmup_fraction = 0.1
  return config
