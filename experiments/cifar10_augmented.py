"""Reference Π-net on CIFAR-10 with augmentation, weight decay and smoothing.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/cifar10_augmented.py \\
      --workdir workdirs/cifar10_augmented --config.data_dir=/path/to/cifar10

The network is the reference one unchanged (five product blocks, width 16,
PyTorch initialisation, pixels in [0, 1]). The recipe counters the
reference's overfitting with random crops after 4-pixel padding,
horizontal flips, AdamW with decoupled weight decay 0.01 and label
smoothing 0.1. It trains for 60 epochs at batch 128 with a one-cycle
schedule: 10% linear warm-up to lr 1e-3, then cosine decay.

Expected: 79.45% test accuracy with seed 0 (88.7% train accuracy on
augmented images), in 34.5 minutes on 2 cores of an x86-64 CPU with
AVX-512. It passed 78% at epoch 36. Seeds 1 and 2 are not run yet.
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'cifar10'
  config.batch_size = 128
  config.num_epochs = 60
  config.optimizer = 'adamw'
  config.weight_decay = 0.01
  config.schedule = 'one_cycle'
  config.warmup_fraction = 0.1
  config.augment = True
  config.label_smoothing = 0.1
  return config
