"""Kill a training run with SIGKILL at random moments and check its resumes.

  python -m pinet_jax.chaos --data_dir=/path/to/mnist --kills=10

1. Trains the config (by default experiments/tiny.py) for --num_train_steps
   without interruption, keeping every checkpoint: the reference.
2. Trains it again with the same command, saving a checkpoint every
   --checkpoint_every_steps steps, and kills the process with SIGKILL
   --kills times. Each kill comes after the process logged one to three
   new saves (a random number), either at once, while orbax is usually
   still writing the last one, or after a random delay of up to
   --max_delay seconds. The seed makes these choices repeatable; the
   moments of the kills still depend on the machine's speed.
3. Before each restart, finds the latest complete checkpoint, which the
   restarted run must choose, and compares it bit for bit with the
   reference's checkpoint of the same step. A checkpoint that cannot be read
   or differs, or a restart that resumes from another step, counts as a
   corrupt checkpoint chosen.
4. Compares the finished run's final parameters and optimiser state with
   the reference's, bit for bit.

Prints one summary line and exits with status 0 only when every requested
kill happened, each was followed by a resume, no corrupt checkpoint was
chosen and the final states are bitwise equal. Exact equality holds on CPU.
"""

import dataclasses
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging

from pinet_jax import checkpoints
from pinet_jax.log_filters import QuietLibraryInfo

FLAGS = flags.FLAGS

flags.DEFINE_string(
  'data_dir', None, 'Folder with the raw MNIST files (make DATA=...).'
)
flags.DEFINE_string(
  'config', 'experiments/tiny.py', 'Experiment config file to train.'
)
flags.DEFINE_string(
  'tfds_data_dir', '', "Where tfds prepares the data; empty: tfds's default."
)
flags.DEFINE_string(
  'workdir',
  '',
  'Folder for both runs; empty: a new temporary folder, deleted when every '
  'check passed.',
)
flags.DEFINE_integer('kills', 10, 'SIGKILLs to send to the training run.')
flags.DEFINE_integer('num_train_steps', 200, 'Length of both runs in steps.')
flags.DEFINE_integer(
  'checkpoint_every_steps', 2, 'Checkpoint interval of both runs in steps.'
)
flags.DEFINE_float(
  'max_delay', 0.2, 'Longest wait in seconds between a save and its kill.'
)
flags.DEFINE_integer('seed', 0, 'Seed of the kill moments.')
flags.DEFINE_integer(
  'timeout', 600, 'Seconds that one training process may run.'
)
flags.mark_flag_as_required('data_dir')

SAVE_LINE = re.compile(r'Saving checkpoint at step (\d+)')
RESUME_LINE = re.compile(r'Resuming at step (\d+) ')
TEMPORARY_SUFFIX = '.orbax-checkpoint-tmp'


@dataclasses.dataclass
class Tally:
  """Counts of one chaos run; `passed` applies the pass criteria."""

  kills: int = 0
  kills_during_save: int = 0
  resumes: int = 0
  corrupt_chosen: int = 0
  final_match: bool = False

  def passed(self, requested_kills: int) -> bool:
    return (
      self.kills == requested_kills
      and self.resumes == self.kills
      and self.corrupt_chosen == 0
      and self.final_match
    )

  def summary(self) -> str:
    match = 'bitwise equal' if self.final_match else 'DIFFERENT'
    return (
      f'chaos: {self.kills} kills ({self.kills_during_save} during a save), '
      f'{self.resumes} resumes, {self.corrupt_chosen} corrupt checkpoints '
      f'chosen, final parameters and optimiser state {match} to the '
      'uninterrupted run'
    )


class Training:
  """A training subprocess whose log lines arrive on a queue."""

  def __init__(self, command: Sequence[str]):
    self.process = subprocess.Popen(
      command,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.lines: queue.Queue[str | None] = queue.Queue()
    self.log: list[str] = []
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self) -> None:
    for line in self.process.stderr:
      self.lines.put(line)
    self.lines.put(None)

  def next_match(self, pattern: re.Pattern, deadline: float) -> re.Match | None:
    """Return the next log line's match of `pattern`; None once it exits."""
    while True:
      try:
        line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
      except queue.Empty as error:
        self.process.kill()
        raise TimeoutError(
          f'no line matching {pattern.pattern!r} in time; log tail:\n'
          + ''.join(self.log[-20:])
        ) from error
      if line is None:
        return None
      self.log.append(line)
      match = pattern.search(line)
      if match:
        return match


def training_command(workdir: str, keep_checkpoints: int) -> list[str]:
  """Return the command line of one training process writing to `workdir`."""
  command = [
    sys.executable,
    '-m',
    'pinet_jax.main',
    f'--config={FLAGS.config}',
    f'--workdir={workdir}',
    f'--config.data_dir={FLAGS.data_dir}',
    f'--config.num_train_steps={FLAGS.num_train_steps}',
    f'--config.checkpoint_every_steps={FLAGS.checkpoint_every_steps}',
    f'--config.keep_checkpoints={keep_checkpoints}',
  ]
  if FLAGS.tfds_data_dir:
    command.append(f'--config.tfds_data_dir={FLAGS.tfds_data_dir}')
  return command


def run_to_end(command: Sequence[str]) -> None:
  """Run `command` to completion, raising if it fails."""
  result = subprocess.run(
    command,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    timeout=FLAGS.timeout,
    check=False,
  )
  if result.returncode != 0:
    raise RuntimeError(
      f'{" ".join(command)} failed with status {result.returncode}:\n'
      f'{result.stderr[-3000:]}'
    )


def temporary_folders(directory: str) -> list[str]:
  """Return the folders of saves that did not finish in `directory`."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    name for name in os.listdir(directory) if TEMPORARY_SUFFIX in name
  )


def states_equal(first: dict, second: dict) -> bool:
  """Return whether two restored states have bitwise equal arrays."""
  first_leaves = jax.tree_util.tree_leaves_with_path(first)
  second_leaves = jax.tree_util.tree_leaves_with_path(second)
  if [path for path, _ in first_leaves] != [path for path, _ in second_leaves]:
    return False
  return all(
    np.asarray(a).dtype == np.asarray(b).dtype
    and np.array_equal(np.asarray(a), np.asarray(b))
    for (_, a), (_, b) in zip(first_leaves, second_leaves, strict=True)
  )


def check_checkpoint(chaos_dir: str, reference_dir: str, step: int) -> None:
  """Check that `step` of `chaos_dir` equals the reference's bit for bit.

  Raises:
    checkpoints.CheckpointError: either checkpoint cannot be read, or they
      differ.
  """
  chosen = checkpoints.read_state_arrays(chaos_dir, step)
  expected = checkpoints.read_state_arrays(reference_dir, step)
  if not states_equal(chosen, expected):
    raise checkpoints.CheckpointError(
      f'checkpoint {step} in {chaos_dir} differs from the reference'
    )


def kill_after_saves(
  training: Training,
  resumed_at: int,
  saves: int,
  rng: random.Random,
  tally: Tally,
) -> bool:
  """Kill `training` after it logs `saves` saves past step `resumed_at`.

  The log line of a save comes after orbax finished the previous save, so
  with `saves` = 2 the process leaves at least one complete checkpoint.

  Returns:
    False when the process finished first, True when it was killed.
  """
  deadline = time.monotonic() + FLAGS.timeout
  while saves:
    match = training.next_match(SAVE_LINE, deadline)
    if match is None:
      training.process.wait()
      return False
    if int(match.group(1)) > resumed_at:
      saves -= 1
  # Half of the kills come at once, mostly while orbax writes the save.
  if rng.random() >= 0.5:
    time.sleep(rng.uniform(0, FLAGS.max_delay))
  training.process.send_signal(signal.SIGKILL)
  training.process.wait()
  tally.kills += 1
  return True


def run_chaos(workdir: str) -> Tally:
  """Run the reference, then the killed and resumed run; return the tally."""
  rng = random.Random(FLAGS.seed)
  reference = os.path.join(workdir, 'reference')
  chaos = os.path.join(workdir, 'chaos')
  # Every step could have a checkpoint, counting those after evaluations.
  keep_all = FLAGS.num_train_steps
  logging.info('Training the uninterrupted reference run in %s', reference)
  run_to_end(training_command(reference, keep_all))
  reference_checkpoints = os.path.join(reference, 'checkpoints')
  chaos_checkpoints = os.path.join(chaos, 'checkpoints')

  tally = Tally()
  resumed_at = 0
  while True:
    training = Training(training_command(chaos, keep_checkpoints=3))
    deadline = time.monotonic() + FLAGS.timeout
    if tally.kills:
      match = training.next_match(RESUME_LINE, deadline)
      if match is not None:
        tally.resumes += 1
        if int(match.group(1)) != resumed_at:
          logging.error(
            'Resumed at step %s instead of the latest complete checkpoint %d',
            match.group(1),
            resumed_at,
          )
          tally.corrupt_chosen += 1
    if tally.kills == FLAGS.kills:
      training.process.wait()
      break
    # The first process has no checkpoint to fall back on, so it is killed
    # only after one of its checkpoints is complete.
    saves = rng.randint(1, 3) + (0 if tally.kills else 1)
    if not kill_after_saves(training, resumed_at, saves, rng, tally):
      break
    stale = temporary_folders(chaos_checkpoints)
    if stale:
      tally.kills_during_save += 1
    latest = checkpoints.latest_complete_step(chaos_checkpoints)
    if latest is None:
      # The process saw a committed checkpoint before it was killed.
      logging.error('Kill %d left no complete checkpoint', tally.kills)
      tally.corrupt_chosen += 1
      break
    resumed_at = latest
    try:
      check_checkpoint(chaos_checkpoints, reference_checkpoints, resumed_at)
    except checkpoints.CheckpointError as error:
      logging.error('Corrupt checkpoint chosen: %s', error)
      tally.corrupt_chosen += 1
    logging.info(
      'Kill %d: latest complete checkpoint %d, unfinished saves %s',
      tally.kills,
      resumed_at,
      stale,
    )
  if training.process.returncode != 0:
    logging.error('The last run failed:\n%s', ''.join(training.log[-20:]))
    return tally
  final = FLAGS.num_train_steps
  tally.final_match = states_equal(
    checkpoints.read_state_arrays(chaos_checkpoints, final),
    checkpoints.read_state_arrays(reference_checkpoints, final),
  )
  return tally


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(QuietLibraryInfo())
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='pinet_jax_chaos_')
  tally = run_chaos(workdir)
  print(tally.summary())
  if not tally.passed(FLAGS.kills):
    logging.error('Chaos check failed; the runs are in %s', workdir)
    sys.exit(1)
  if not FLAGS.workdir:
    shutil.rmtree(workdir)


if __name__ == '__main__':
  app.run(main)
