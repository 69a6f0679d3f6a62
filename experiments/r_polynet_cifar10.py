"""R-PolyNet regularised blocks in the ResNet-18 layout at width 16, CIFAR-10.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/r_polynet_cifar10.py \\
      --workdir workdirs/r_polynet_cifar10 \\
      --config.data_dir=/path/to/cifar10

`pinet_jax.config.resnet_config`'s recipe with label smoothing 0.1, as the
R-PolyNet paper trains. Its 120-epoch schedule with steps at epochs 40,
60, 80 and 100 is longer than this CPU budget; the one-cycle schedule
covers 4 epochs. The DropBlock regularisation of the R-PolyNet recipe
(Chrysos et al., CVPR 2023) is not part of this one.
"""

from pinet_jax.config import resnet_config


def get_config():
  config = resnet_config('cifar10', 'r_polynet', width=16, num_epochs=4)
  config.label_smoothing = 0.1
  return config
