"""Reference Π-net on MNIST with shifted digits and label smoothing.

Command:
  .venv/bin/python -m pinet_jax.main --config experiments/mnist_augmented.py \\
      --workdir workdirs/mnist_augmented --config.data_dir=/path/to/mnist

The network is the reference one unchanged. The recipe starts from
experiments/mnist.py's: Adam at batch 128, one-cycle schedule to lr 2e-3.
It trains for 15 epochs instead of 5 and adds label smoothing 0.1. Each
training digit is shifted by up to 2 pixels in each direction, by random
crops of the zero-padded image without flips.

Expected: 99.68% ± 0.02% test accuracy over seeds 0, 1 and 2 (99.70%,
99.67%, 99.66%), each in about 8 minutes on 2 cores of an x86-64 CPU with
AVX-512. The three runs passed 99.4% after epoch 2, 4 and 4.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'mnist'
  config.batch_size = 128
  config.num_epochs = 15
  config.schedule = 'one_cycle'
  config.learning_rate = 2e-3
  config.warmup_fraction = 0.1
  config.augment = True
  config.crop_padding = 2
  config.flip = False
  config.label_smoothing = 0.1
  return config
