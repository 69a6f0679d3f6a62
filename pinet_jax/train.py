"""The training loop: data, model, steps, logging and checkpoints together.

`train_and_evaluate(config, workdir)` is the whole program behind the
command line; tests call it directly.
"""

import collections
import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pinet_jax import checkpoints, models, optim, progress, steps
from pinet_jax import config as config_lib
from pinet_jax.data import pipeline, sources
from pinet_jax.errors import ConfigError
from pinet_jax.interrupts import (
  StopRequest,
  TrainingInterrupted,
  stop_on_signals,
)


def evaluate(
  eval_fn: Any,
  state: steps.TrainState,
  data: pipeline.SplitArrays,
  config: ml_collections.ConfigDict,
  normalization: pipeline.Normalization | None,
) -> dict[str, float]:
  """Return 'loss', 'accuracy' and 'count' over every example of `data`."""
  totals = None
  for batch in pipeline.eval_batches(
    data, batch_size=config.eval_batch_size, normalization=normalization
  ):
    sums = eval_fn(state, batch)
    # Adding on the device keeps the host from waiting for every batch.
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {
    'loss': float(totals['loss_sum']) / count,
    'accuracy': float(totals['correct']) / count,
    'count': count,
  }


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {
    key: float(np.mean([metrics[key] for metrics in fetched]))
    for key in fetched[0]
  }


def _build_model(config: ml_collections.ConfigDict):
  num_classes, image_shape = sources.DATASET_SHAPES[config.dataset]
  try:
    return models.get_model(
      config.model,
      num_classes=num_classes,
      in_channels=image_shape[-1],
      **config.model_kwargs,
    )
  except TypeError as error:
    raise ConfigError(
      f'invalid --config.model_kwargs for model {config.model!r}: {error}'
    ) from error


def _load_split(builder, config: ml_collections.ConfigDict, option: str):
  """Load the split named by config.<option>, checking it first."""
  split = config[option]
  try:
    size = builder.info.splits[split].num_examples
  except ValueError as error:
    raise ConfigError(
      f'invalid --config.{option}={split!r}: {error}'.replace('\n', ' ')
    ) from error
  if size <= 0:
    raise ConfigError(
      f'--config.{option}={split!r} selects no examples; '
      f'{config.dataset} has splits {sorted(builder.info.splits)}'
    )
  return pipeline.load_split(builder, split)


def _parameter_count(params: Any) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


@dataclasses.dataclass
class _Run:
  """Data, schedule and outputs of a run, built once per process."""

  config: ml_collections.ConfigDict
  train_data: pipeline.SplitArrays
  eval_data: pipeline.SplitArrays
  normalization: pipeline.Normalization | None
  steps_per_epoch: int
  total_steps: int
  train_microbatch_size: int
  step_rng: jax.Array
  manager: Any
  metrics_file: progress.MetricsFile


def _make_workdir(workdir: str) -> str:
  """Create `workdir` if needed and return its absolute path.

  Checked before the data is loaded, so a bad path fails in seconds.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise ConfigError(
      f'cannot create --workdir {workdir}: {error.strerror}; choose a '
      'writable folder'
    ) from error
  if not os.access(path, os.W_OK):
    raise ConfigError(f'--workdir {workdir} is not writable; choose another')
  return path


def _prepare(config: ml_collections.ConfigDict, workdir: str):
  """Load the data and build the initial state, restoring a checkpoint."""
  config_lib.validate(config)
  workdir = _make_workdir(workdir)
  builder = sources.get_builder(config)
  train_data = _load_split(builder, config, 'train_split')
  eval_data = _load_split(builder, config, 'eval_split')
  num_train = len(train_data.labels)
  steps_per_epoch = pipeline.num_train_batches(num_train, config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(
      f'--config.batch_size={config.batch_size} is larger than the '
      f'{num_train} examples of split {config.train_split!r}'
    )
  total_steps = (
    config.num_train_steps
    if config.num_train_steps > 0
    else config.num_epochs * steps_per_epoch
  )
  logging.info(
    'Dataset %s: %d training examples (%s), %d evaluation examples (%s); '
    '%d steps per epoch, %d steps in all.',
    config.dataset,
    num_train,
    config.train_split,
    len(eval_data.labels),
    config.eval_split,
    steps_per_epoch,
    total_steps,
  )

  model = _build_model(config)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  try:
    state = steps.create_train_state(
      model,
      optim.create_optimizer(config, total_steps),
      train_data.images.shape[1:],
      init_rng,
    )
  except ValueError as error:
    # The models check their arguments when they are first applied.
    raise ConfigError(
      f'invalid --config.model_kwargs for model {config.model!r}: {error}'
    ) from error
  logging.info(
    'Model %s with %s parameters on %s.',
    config.model,
    f'{_parameter_count(state.params):,}',
    jax.devices(),
  )
  manager = checkpoints.create_manager(
    os.path.join(workdir, 'checkpoints'), config.keep_checkpoints
  )
  restored = checkpoints.restore_latest(manager, state, config, total_steps)
  if restored is not None:
    state = restored
    logging.info('Resuming at step %d of %d.', state.step, total_steps)
  run = _Run(
    config=config,
    train_data=train_data,
    eval_data=eval_data,
    normalization=(
      pipeline.normalization_of(train_data.images) if config.normalize else None
    ),
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    train_microbatch_size=_train_microbatch_size(config, state),
    step_rng=step_rng,
    manager=manager,
    metrics_file=progress.MetricsFile(os.path.join(workdir, 'metrics.jsonl')),
  )
  return run, state


def _compile(function: Any, *args: Any, donate: bool = False, **static: Any):
  """Compile `function` for `args` once, logging the time it took.

  The loop calls the compiled executable, which raises on a shape it was
  not compiled for instead of silently compiling again. `static` keyword
  arguments are fixed at compile time.
  """
  start = time.perf_counter()
  jitted = jax.jit(
    functools.partial(function, **static),
    donate_argnums=0 if donate else (),
  )
  compiled = jitted.lower(*args).compile()
  logging.info(
    'Compiled %s in %.1f s.', function.__name__, time.perf_counter() - start
  )
  return compiled


def _prefetch_to_device(
  batches: Iterator[dict[str, np.ndarray]], size: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Yield `batches` as device arrays, copying `size` batches ahead.

  jax.device_put returns at once, so the copies overlap the steps.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(jax.device_put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _log_train(
  run: _Run,
  step: int,
  pending: list[dict[str, jax.Array]],
  throughput: progress.Throughput,
) -> None:
  metrics = _mean_metrics(pending)
  if not math.isfinite(metrics['loss']):
    raise FloatingPointError(
      f'training loss is {metrics["loss"]} at step {step}: the polynomial '
      'overflowed; lower --config.learning_rate or change '
      '--config.model_kwargs.init_scheme'
    )
  images_per_second, eta = throughput.report(step)
  epoch = step / run.steps_per_epoch
  logging.info(
    '%s step %d/%d (epoch %.2f): train_loss %.4f, train_accuracy %.2f%%, '
    '%.0f img/s, ETA %s',
    progress.progress_bar(step, run.total_steps),
    step,
    run.total_steps,
    epoch,
    metrics['loss'],
    100 * metrics['accuracy'],
    images_per_second,
    progress.format_duration(eta),
  )
  run.metrics_file.write(
    {
      'step': step,
      'epoch': epoch,
      'train_loss': metrics['loss'],
      'train_accuracy': metrics['accuracy'],
      'images_per_second': images_per_second,
    }
  )


def _evaluate_and_log(
  run: _Run, eval_fn: Any, state: steps.TrainState
) -> dict[str, float]:
  step = int(state.step)
  start = time.perf_counter()
  metrics = evaluate(
    eval_fn, state, run.eval_data, run.config, run.normalization
  )
  if not math.isfinite(metrics['loss']):
    raise FloatingPointError(
      f'evaluation loss is {metrics["loss"]} at step {step}: the polynomial '
      'overflowed; lower --config.learning_rate or change '
      '--config.model_kwargs.init_scheme'
    )
  logging.info(
    'Step %d (epoch %.2f): eval_loss %.4f, eval_accuracy %.2f%% '
    '(%d examples of %s, %.1f s)',
    step,
    step / run.steps_per_epoch,
    metrics['loss'],
    100 * metrics['accuracy'],
    metrics['count'],
    run.config.eval_split,
    time.perf_counter() - start,
  )
  record = {
    'step': step,
    'epoch': step / run.steps_per_epoch,
    'eval_loss': metrics['loss'],
    'eval_accuracy': metrics['accuracy'],
    'eval_count': metrics['count'],
  }
  run.metrics_file.write(record)
  return record


def _save_and_stop(run: _Run, state: steps.TrainState) -> None:
  """Save `state`, wait until the checkpoint is committed, then stop.

  Waiting here, while the signal handlers are still installed, means a
  repeated SIGTERM cannot kill the process halfway through the write.
  """
  checkpoints.save(run.manager, state, run.config, run.total_steps)
  run.manager.wait_until_finished()
  raise TrainingInterrupted(
    f'stopped at step {int(state.step)}; checkpoint saved in '
    f'{run.manager.directory}: rerun the same command to resume'
  )


def _train(
  run: _Run, state: steps.TrainState, stop: StopRequest
) -> tuple[steps.TrainState, dict[str, float] | None]:
  """Run the remaining steps; return the state and the last evaluation.

  Every evaluation and checkpoint follows a check that the losses since
  the previous one are finite, so a diverged state is never saved.
  """
  config = run.config
  step = int(state.step)
  train_fn = eval_fn = throughput = None
  last_eval = None
  while step < run.total_steps:
    epoch, offset = divmod(step, run.steps_per_epoch)
    batches = pipeline.train_batches(
      run.train_data,
      batch_size=config.batch_size,
      seed=config.seed,
      epoch=epoch,
      start_batch=offset,
      augment=config.augment,
      normalization=run.normalization,
    )
    pending, report = [], None
    remaining = min(run.steps_per_epoch - offset, run.total_steps - step)
    for batch in _prefetch_to_device(itertools.islice(batches, remaining)):
      if train_fn is None:
        train_fn = _compile(
          steps.train_step,
          state,
          batch,
          run.step_rng,
          donate=True,
          microbatch_size=run.train_microbatch_size,
          label_smoothing=config.label_smoothing,
        )
      if throughput is None:
        throughput = progress.Throughput(
          step, run.total_steps, config.batch_size
        )
      state, metrics = train_fn(state, batch, run.step_rng)
      if report is not None:
        # Reading metrics waits for their step. Reading the previous
        # interval's only now, with this step already queued, keeps the
        # device busy while the host logs.
        _log_train(run, *report, throughput)
        report = None
      pending.append(metrics)
      step += 1
      if step % config.log_every_steps == 0 or stop.requested:
        report, pending = (step, pending), []
      if stop.requested:
        _log_train(run, *report, throughput)
        _save_and_stop(run, state)
    if report is not None:
      _log_train(run, *report, throughput)
    if pending:
      _log_train(run, step, pending, throughput)
    if eval_fn is None:
      eval_fn = _compile_eval(run, state)
    last_eval = _evaluate_and_log(run, eval_fn, state)
    checkpoints.save(run.manager, state, config, run.total_steps, last_eval)
    if stop.requested:
      _save_and_stop(run, state)
    # Restart the rate so that evaluation time does not lower the next
    # report's img/s.
    throughput = None
  return state, last_eval


def _compile_eval(run: _Run, state: steps.TrainState) -> Any:
  """Compile `steps.eval_step` for the shapes that every eval batch shares."""
  example = next(
    pipeline.eval_batches(
      run.eval_data,
      batch_size=run.config.eval_batch_size,
      normalization=run.normalization,
    )
  )
  return _compile(
    steps.eval_step,
    state,
    example,
    # Evaluation always chooses, because its microbatches change no result.
    microbatch_size=_microbatch_size('Eval', 0, run.config.eval_batch_size),
  )


def _train_microbatch_size(
  config: ml_collections.ConfigDict, state: steps.TrainState
) -> int:
  """Resolve the train step's microbatch size for the model's state."""
  try:
    return _microbatch_size(
      'Train',
      config.microbatch_size,
      config.batch_size,
      batch_statistics=bool(state.batch_stats),
    )
  except ValueError as error:
    raise ConfigError(
      f'--config.microbatch_size={config.microbatch_size} does not suit '
      f'model {config.model!r}: {error}'
    ) from error


def _microbatch_size(
  step: str, requested: int, batch_size: int, batch_statistics: bool = False
) -> int:
  """Resolve and log the microbatch size of the `step` ('Train' or 'Eval')."""
  size = steps.resolve_microbatch_size(
    requested, batch_size, jax.default_backend(), batch_statistics
  )
  logging.info(
    '%s step: %d microbatches of %d examples (batch %d).',
    step,
    batch_size // size,
    size,
    batch_size,
  )
  return size


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Train on the config's dataset, evaluating and saving every epoch.

  Rerunning with the same `workdir` resumes from its latest checkpoint; a
  finished run only evaluates again.

  Args:
    config: see `pinet_jax.config.default_config`.
    workdir: receives checkpoints/ and metrics.jsonl.

  Returns:
    The final evaluation: 'step', 'epoch', 'eval_loss', 'eval_accuracy' and
    'eval_count' (examples evaluated).

  Raises:
    TrainingInterrupted: SIGINT or SIGTERM arrived; a checkpoint was
      committed.
    pinet_jax.errors.UserInputError: invalid config, data or checkpoint.
    FloatingPointError: the training loss became NaN or infinite.
  """
  run, state = _prepare(config, workdir)
  try:
    with stop_on_signals() as stop:
      state, final = _train(run, state, stop)
      if final is None:
        logging.info(
          'The checkpoint at step %d already completes this run of %d '
          'steps; evaluating it only.',
          state.step,
          run.total_steps,
        )
        eval_fn = _compile_eval(run, state)
        final = _evaluate_and_log(run, eval_fn, state)
  finally:
    run.manager.wait_until_finished()
    run.manager.close()
  logging.info(
    'Final %s accuracy: %.2f%% at step %d; checkpoints in %s, metrics in %s',
    config.eval_split,
    100 * final['eval_accuracy'],
    final['step'],
    run.manager.directory,
    run.metrics_file.path,
  )
  return final
