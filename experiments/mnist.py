"""Reference Π-net on MNIST, past 99% test accuracy in minutes on a CPU.

Command:
  make train-mnist DATA=/path/to/mnist

The network is the reference one unchanged (five product blocks, width 16,
PyTorch initialisation, pixels in [0, 1]). The training recipe differs from
the reference's (Adam, lr 1e-3, batch 64, constant rate, 10 epochs): Adam
at batch 128 with a one-cycle schedule (10% linear warm-up to lr 2e-3, then
cosine decay) over 5 epochs.

Expected: 99.16% test accuracy (99.12% after epoch 3) in about 3 minutes on
2 cores of an x86-64 CPU with AVX-512, measured with seed 0.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'mnist'
  config.batch_size = 128
  config.num_epochs = 5
  config.schedule = 'one_cycle'
  config.learning_rate = 2e-3
  config.warmup_fraction = 0.1
  return config
