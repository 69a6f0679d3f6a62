"""The `pinet-jax` command: train, evaluate, predict, report and bench.

  pinet-jax train --config experiments/mnist.py --workdir DIR \\
      --config.data_dir=/path/to/mnist
  pinet-jax evaluate --workdir DIR [--step N] [--split test]
  pinet-jax predict --workdir DIR [--top_k 3] IMAGE [IMAGE ...]
  pinet-jax report --workdir DIR
  pinet-jax bench [--dataset mnist] [--data_dir DIR]

`train` and `bench` replace this process with `python -m pinet_jax.main`
and `python -m pinet_jax.bench`, so they take those programs' flags and
behave exactly as they do, signals and exit status included. Invalid input
ends the other commands with one line on stderr and exit status 1;
--debug shows the traceback instead.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pinet_jax.errors import UserInputError

# Subcommands that run another program's command line, with its own flags.
DELEGATED = {
  'train': (
    'pinet_jax.main',
    'train and evaluate from an experiment config, resuming from the work '
    "directory's latest checkpoint (flags: pinet-jax train --help)",
  ),
  'bench': (
    'pinet_jax.bench',
    'time the train step, evaluation and input pipeline, printed as a '
    'markdown table (flags: pinet-jax bench --help)',
  ),
}
# Exit status for invalid input, for an invalid command line (argparse's
# status), and for Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
  """An argument parser that reports a usage error on one line."""

  def error(self, message: str) -> NoReturn:
    self.exit(
      EXIT_USAGE,
      f'{self.prog}: error: {message}; {self.prog} --help lists the options\n',
    )


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    '--workdir',
    required=True,
    help='work directory of a training run (its --workdir), which contains '
    'checkpoints/ and metrics.jsonl',
  )
  parser.add_argument(
    '--step',
    type=int,
    default=None,
    help='checkpoint to load, named by its training step (batches '
    'consumed); default: the latest',
  )


def _add_data_options(parser: argparse.ArgumentParser, purpose: str) -> None:
  parser.add_argument(
    '--data_dir',
    default=None,
    help=f'folder of the raw dataset files {purpose}; default: the '
    "training config's data_dir",
  )
  parser.add_argument(
    '--tfds_data_dir',
    default=None,
    help="folder of prepared tfds datasets; default: the training config's "
    'tfds_data_dir',
  )


def _add_output_options(
  parser: argparse.ArgumentParser, json_help: str | None
) -> None:
  """Add --debug and, where `json_help` is given, --json."""
  if json_help is not None:
    parser.add_argument('--json', action='store_true', help=json_help)
  parser.add_argument(
    '--debug',
    action='store_true',
    help='show the traceback of invalid-input errors too',
  )


def build_parser() -> argparse.ArgumentParser:
  """Return the parser of every subcommand but the delegated ones' flags."""
  parser = _Parser(
    prog='pinet-jax',
    description='Train, evaluate and use Π-nets (deep polynomial networks).',
  )
  commands = parser.add_subparsers(
    dest='command', required=True, metavar='COMMAND'
  )
  for name, (_, description) in DELEGATED.items():
    commands.add_parser(name, help=description, add_help=False)

  evaluate = commands.add_parser(
    'evaluate',
    help='accuracy, per-class accuracy and confusion matrix of a checkpoint',
    description='Evaluate a checkpoint on a split of its dataset. On the '
    "config's eval split this reproduces the eval_accuracy that training "
    'logged for that step.',
  )
  _add_checkpoint_options(evaluate)
  evaluate.add_argument(
    '--split',
    default=None,
    help="tfds split to evaluate, such as 'test' or 'test[:1000]'; default: "
    "the training config's eval_split",
  )
  _add_data_options(evaluate, 'to read the split from')
  _add_output_options(evaluate, 'print one JSON object instead of text')

  predict = commands.add_parser(
    'predict',
    help='top-k classes of image files',
    description="Classify image files. Each image is converted to the model's"
    ' channels (grayscale or RGB) and resized to its height and width.',
  )
  _add_checkpoint_options(predict)
  predict.add_argument(
    'images',
    nargs='+',
    metavar='IMAGE',
    help='image files in a format Pillow reads: PNG, JPEG, BMP, GIF, TIFF, '
    'WebP, ...',
  )
  predict.add_argument(
    '--top_k',
    type=int,
    default=3,
    help='classes to print per image, most probable first (default: 3)',
  )
  _add_data_options(
    predict,
    'to recompute the normalisation statistics from, needed only for runs '
    'with config.normalize whose checkpoint does not record them',
  )
  _add_output_options(
    predict, 'print one JSON object per image instead of text'
  )

  report = commands.add_parser(
    'report',
    help='learning curves (PNG) and a markdown report of a work directory',
    description='Write curves.png and report.md into the work directory, '
    'replacing earlier ones.',
  )
  report.add_argument(
    '--workdir',
    required=True,
    help='work directory of a training run, which contains metrics.jsonl',
  )
  _add_output_options(report, None)
  return parser


def _evaluate(args: argparse.Namespace) -> None:
  # Imported here: evaluation loads TensorFlow, which the other commands
  # do without.
  from pinet_jax import evaluate

  evaluation = evaluate.evaluate_checkpoint(
    args.workdir,
    args.step,
    args.split,
    data_dir=args.data_dir,
    tfds_data_dir=args.tfds_data_dir,
  )
  if args.json:
    print(json.dumps(evaluate.to_json(evaluation), indent=2))
  else:
    print(evaluate.format_text(evaluation))


def _predict(args: argparse.Namespace) -> None:
  from pinet_jax import inference, predict

  info = inference.read_checkpoint(args.workdir, args.step)
  normalization = None
  if info.needs_normalization:
    # Only checkpoints without recorded statistics need TensorFlow here.
    from pinet_jax import evaluate

    config = evaluate.with_data_dirs(
      info.config, args.data_dir, args.tfds_data_dir
    )
    normalization = evaluate.training_normalization(config)
  classifier = inference.load_model(
    args.workdir, info.step, normalization=normalization
  )
  for prediction in predict.predict_files(classifier, args.images, args.top_k):
    if args.json:
      print(json.dumps(vars(prediction)))
    else:
      print(predict.format_text(prediction))


def _report(args: argparse.Namespace) -> None:
  from pinet_jax import report

  paths = report.write_report(args.workdir)
  print(paths.markdown)
  print(paths.curves)


HANDLERS = {'evaluate': _evaluate, 'predict': _predict, 'report': _report}


def _delegate(command: str, argv: Sequence[str]) -> None:
  """Replace this process with the program behind `command`."""
  module = DELEGATED[command][0]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, '-m', module, *argv])


def main(argv: Sequence[str] | None = None) -> int:
  """Run the command line `argv` (default: sys.argv[1:]); return the status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in DELEGATED:
    _delegate(argv[0], argv[1:])
  args = build_parser().parse_args(argv)
  try:
    HANDLERS[args.command](args)
  except UserInputError as error:
    if args.debug:
      raise
    print(f'error: {error}', file=sys.stderr)
    return EXIT_INVALID
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


if __name__ == '__main__':
  sys.exit(main())
