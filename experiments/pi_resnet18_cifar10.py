"""Π-net ResNet-18 on CIFAR-10 with the published CIFAR-10 recipe.

Command, on an accelerator:
  python -m pinet_jax.main --config experiments/pi_resnet18_cifar10.py \\
      --workdir workdirs/pi_resnet18_cifar10 \\
      --config.data_dir=/path/to/cifar10

The network is the activation-free Π-net ResNet-18 at full width (64).
The recipe is the CIFAR-10 recipe of Chrysos et al., "Regularization of
polynomial networks for image recognition" (CVPR 2023):
- SGD with momentum 0.9, lr 0.1, weight decay 5e-4, batch 128;
- 120 epochs, with the rate divided by 10 at epochs 40, 60, 80 and 100;
- random crops after 4-pixel padding, horizontal flips;
- label smoothing 0.1.
The paper's DropBlock is not implemented. Inputs are standardised per
channel. That paper reports accuracy on par with a ResNet-18 with ReLUs,
about 94% on CIFAR-10.

NOTE: not run to completion: 120 epochs need an accelerator for hours.
Replace this note with the accuracy, time and hardware of the first
complete run. What a 2-core CPU managed is a reduced run (README, "Π-net
ResNet-18 with the published recipe"): --config.model_kwargs.width=16
--config.num_epochs=10, the decays at the same fractions of the run,
reached 62.34% test accuracy in 19 min 36 s.
"""

from pinet_jax.config import resnet_config


def get_config():
  config = resnet_config('cifar10', 'pi_resnet', width=64, num_epochs=120)
  config.schedule = 'step'
  config.warmup_fraction = 0.0
  config.decay_fractions = (1 / 3, 1 / 2, 2 / 3, 5 / 6)
  config.label_smoothing = 0.1
  return config
