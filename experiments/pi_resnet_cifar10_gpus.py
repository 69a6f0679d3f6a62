"""Π-net ResNet-18 on CIFAR-10 on one machine of 1, 2, 4 or 8 GPUs.

Command:
  python -m pinet_jax.main --config experiments/pi_resnet_cifar10_gpus.py \\
      --workdir workdirs/pi_resnet_cifar10_gpus \\
      --config.data_dir=/path/to/cifar10

JAX uses every visible GPU; CUDA_VISIBLE_DEVICES=0,1 restricts it. The
global batch of 512, and evaluation batches of 1,024, split evenly over 1,
2, 4 or 8 GPUs, and the recipe
is `pinet_jax.config.resnet_config`'s at the full width of 64 with the
peak learning rate scaled linearly to 0.2. Activations are bfloat16;
parameters, optimiser state and BatchNorm statistics stay float32.

NOTE: not run yet; no GPU was available when it was written. Replace this
note with the accuracy and time of the first complete run.
"""

from pinet_jax.config import resnet_config


def get_config():
  config = resnet_config('cifar10', 'pi_resnet', width=64, num_epochs=100)
  config.batch_size = 512
  config.learning_rate = 0.2
  config.eval_batch_size = 1024
  config.dtype = 'bfloat16'
  return config
