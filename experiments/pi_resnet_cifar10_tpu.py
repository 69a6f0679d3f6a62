"""Π-net ResNet-18 on CIFAR-10 on one TPU host of 8 chips, in bfloat16.

Command, on a TPU VM with 8 chips (for example a v5litepod-8):
  python -m pinet_jax.main --config experiments/pi_resnet_cifar10_tpu.py \\
      --workdir workdirs/pi_resnet_cifar10_tpu \\
      --config.data_dir=/path/to/cifar10

The recipe is `pinet_jax.config.resnet_config`'s at the full width of 64,
with the batch scaled to 128 per chip: a global batch of 1,024 and, by the
linear scaling rule, a peak learning rate of 0.4 after the 5% warm-up.
Evaluation batches of 1,024 split evenly over 4 to 1,024 chips.
Activations are bfloat16; parameters, optimiser state and BatchNorm
statistics stay float32. On a pod slice, add --distributed and run the
same command on every host (see README).

NOTE: not run yet; no TPU was available when it was written. Replace this
note with the accuracy and time of the first complete run.
"""

from pinet_jax.config import resnet_config


def get_config():
  config = resnet_config('cifar10', 'pi_resnet', width=64, num_epochs=100)
  config.batch_size = 1024
  config.learning_rate = 0.4
  config.eval_batch_size = 1024
  config.dtype = 'bfloat16'
  return config
