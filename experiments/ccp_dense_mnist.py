"""ccp_dense of degree 4, width 64, on MNIST.

Command:
  .venv/bin/python -m pinet_jax.main \\
      --config experiments/ccp_dense_mnist.py \\
      --workdir workdirs/ccp_dense_mnist \\
      --config.data_dir=/path/to/mnist

The recipe is `pinet_jax.config.polynomial_config`'s: Adam, batch 128,
one-cycle schedule to lr 1e-3, 3 epochs.
"""

from pinet_jax.config import polynomial_config


def get_config():
  return polynomial_config(
    'mnist', 'ccp_dense', degree=4, width=64, num_epochs=3
  )
