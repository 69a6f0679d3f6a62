"""Command line: train and evaluate a Π-net from an experiment config.

  python -m pinet_jax.main --config experiments/mnist.py --workdir DIR \\
      --config.data_dir=/path/to/mnist

Any config field can be overridden with --config.FIELD=VALUE. This file
only parses flags; the program is `pinet_jax.train.train_and_evaluate`, so
tests and notebooks can call it directly.
"""

import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from pinet_jax import config as config_lib
from pinet_jax import sharding
from pinet_jax.errors import CheckpointSaveError, UserInputError
from pinet_jax.interrupts import InterruptedTwice, TrainingInterrupted
from pinet_jax.log_filters import QuietLibraryInfo

FLAGS = flags.FLAGS

flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints and metrics; reruns resume.'
)
flags.DEFINE_bool(
  'debug', False, 'Show the traceback of invalid-input errors too.'
)
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file, e.g. experiments/mnist.py.'
)
flags.DEFINE_bool(
  'distributed',
  False,
  'Run as one of several processes (TPU pod slice, GPU cluster): start '
  'the same command on every host. JAX finds the others on Cloud TPU and '
  'under SLURM, Open MPI and Kubernetes (with the kubernetes package '
  'installed); elsewhere set the next three flags.',
)
flags.DEFINE_string(
  'coordinator_address',
  None,
  'With --distributed: host:port where process 0 listens for the others.',
)
flags.DEFINE_integer(
  'num_processes', None, 'With --distributed: processes in the run.'
)
flags.DEFINE_integer(
  'process_id', None, 'With --distributed: this process, from 0.'
)
flags.mark_flags_as_required(['config', 'workdir'])

# Exit status of a run stopped by SIGINT or SIGTERM after its checkpoint,
# 128 + SIGINT as shells report an interrupted command.
EXIT_INTERRUPTED = 130


def enable_compilation_cache() -> None:
  """Reuse compiled XLA programs across processes.

  A second run with the same shapes then starts in about a second instead of
  compiling again. JAX_COMPILATION_CACHE_DIR overrides the location.
  """
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update(
      'jax_compilation_cache_dir',
      os.path.join(os.path.expanduser('~'), '.cache', 'pinet_jax', 'xla'),
    )
  # Cache small programs such as parameter initialisation too.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)


def parse_flags(argv: list[str]) -> list[str]:
  """Parse the command line; a bad config path or field exits with one line.

  ml_collections raises while parsing for an unknown --config.FIELD, and
  on first access for a config file that cannot be loaded.
  """
  try:
    remaining = FLAGS(argv)
    # A config file that failed to load raises on first attribute access.
    FLAGS.config.keys()
  except flags.Error as error:
    sys.exit(f'error: {error}\nPass --help to list the flags.')
  except SyntaxError as error:
    sys.exit(
      f'error: --config file {error.filename} line {error.lineno}: '
      f'{error.msg}; fix the file'
    )
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as error:
    message = ' '.join(str(error).replace('\\n', ' ').strip('\'"').split())
    if message.isidentifier():
      # ml_collections names only the key for a field the config lacks.
      sys.exit(
        f'error: the config has no field {message!r}; a --config.FIELD '
        'override sets only fields that the config file defines (the '
        'model_kwargs of another model need a config file that sets them)'
      )
    sys.exit(f'error: invalid --config or --config.FIELD: {message}')
  return remaining


def _process_options() -> dict[str, object]:
  """Return the arguments of `sharding.initialize_processes` from the flags.

  Raises:
    UserInputError: a process flag without --distributed, or an id
      outside the process count.
  """
  options = {
    'coordinator_address': FLAGS.coordinator_address,
    'num_processes': FLAGS.num_processes,
    'process_id': FLAGS.process_id,
  }
  given = [f'--{name}' for name, value in options.items() if value is not None]
  if given and not FLAGS.distributed:
    raise UserInputError(
      f'{", ".join(given)} only apply to runs of several processes; add '
      '--distributed or remove them'
    )
  count, rank = FLAGS.num_processes, FLAGS.process_id
  address = FLAGS.coordinator_address
  if address is not None and not address.rpartition(':')[2].isdigit():
    raise UserInputError(
      f'--coordinator_address={address} has no port; give HOST:PORT, such '
      'as 10.0.0.1:1234'
    )
  if rank is not None and rank < 0:
    raise UserInputError(f'--process_id must be >= 0, got {rank}')
  if count is not None and count < 1:
    raise UserInputError(f'--num_processes must be >= 1, got {count}')
  if count is not None and rank is not None and not 0 <= rank < count:
    raise UserInputError(
      f'--process_id={rank} must be in [0, {count}) for --num_processes={count}'
    )
  return options


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  enable_compilation_cache()
  logging.get_absl_handler().addFilter(QuietLibraryInfo())
  try:
    config_lib.validate(FLAGS.config)
    process_options = _process_options()
    if FLAGS.distributed:
      sharding.initialize_processes(**process_options)
      # The processes run the same steps, so process 0's log covers all.
      if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    # Imported after the check: the training program imports TensorFlow,
    # which takes seconds that an invalid value should not cost.
    from pinet_jax import train

    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except TrainingInterrupted as stopped:
    logging.warning('Training %s', stopped)
    sys.exit(EXIT_INTERRUPTED)
  except InterruptedTwice:
    logging.warning(
      'Interrupted twice: stopped without saving the current step; rerun to '
      'resume from the last checkpoint, if any.'
    )
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    logging.warning('Interrupted before training started; nothing was saved.')
    sys.exit(EXIT_INTERRUPTED)
  except CheckpointSaveError as error:
    if FLAGS.debug:
      traceback.print_exc()
    sys.stderr.write(f'error: {error}\n')
    sys.stderr.flush()
    # The run has closed its files. Exiting normally would wait for
    # orbax's threads of the failed save, which wait for its signals.
    os._exit(1)
  except (UserInputError, FloatingPointError) as error:
    if FLAGS.debug:
      raise
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
