"""Reference Π-net on CIFAR-10, with the reference training setup exactly.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/cifar10_reference.py \\
      --workdir workdirs/cifar10-reference --config.data_dir=/path/to/cifar10

Adam, constant lr 1e-3, batch 64, 10 epochs, pixels in [0, 1], no
augmentation: the setup of the reference implementation, which reported
about 70% test accuracy with training accuracy far above it.

The run is fragile, and float rounding decides how it ends. Measured with
seed 0 on 2 cores of an x86-64 CPU with AVX-512: whole-batch train steps
reached 65.53% test accuracy. Microbatches of 16, the CPU default and
equal to whole batches up to rounding, reached 61.04% after epoch 6, then
diverged in epoch 7 and ended at 18.67%. experiments/cifar10.py decays
the rate and did not diverge.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'cifar10'
  return config
