"""A seconds-long MNIST run for tests and smoke checks, not for results.

Width 4 instead of 16 and 1,000 training examples; every code path of a
real run (data, compile, train, evaluate, checkpoint) still runs.

Command:
  python -m pinet_jax.main --config experiments/tiny.py --workdir /tmp/tiny \\
      --config.data_dir=/path/to/mnist
"""

from pinet_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'mnist'
  config.train_split = 'train[:1000]'
  config.eval_split = 'test[:500]'
  config.model_kwargs.width = 4
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 2
  config.log_every_steps = 5
  return config
