"""The training loop: data, model, steps, logging and checkpoints together.

`train_and_evaluate(config, workdir)` is the whole program behind the
command line; tests call it directly.
"""

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from pinet_jax import (
  checkpoints,
  constant_output,
  divergence,
  environment,
  models,
  optim,
  progress,
  report,
  sharding,
  steps,
  summaries,
  workdir_lock,
)
from pinet_jax import config as config_lib
from pinet_jax.data import pipeline, sources
from pinet_jax.errors import ConfigError
from pinet_jax.interrupts import (
  StopRequest,
  TrainingInterrupted,
  stop_on_signals,
)
from pinet_jax.train_log import TrainLog


def evaluate(
  eval_fn: Any,
  state: steps.TrainState,
  data: pipeline.SplitArrays,
  batch_size: int,
  normalization: pipeline.Normalization | None,
  mesh: jax.sharding.Mesh,
) -> dict[str, float]:
  """Return 'loss', 'accuracy' and 'count' over every example of `data`.

  Each process reads its own rows of every batch of `batch_size`, a
  multiple of the device count; `eval_fn` sums over the global batch.
  """
  totals = None
  batches = pipeline.eval_batches(
    data,
    batch_size=batch_size,
    normalization=normalization,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  for batch in _prefetch_to_device(batches, mesh):
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


def _build_model(config: ml_collections.ConfigDict):
  """Build config.model for the images and classes of config.dataset."""
  num_classes, image_shape = sources.DATASET_SHAPES[config.dataset]
  from_dataset = {'num_classes': num_classes, 'in_channels': image_shape[-1]}
  kwargs = config.model_kwargs.to_dict()
  for name, value in from_dataset.items():
    if kwargs.get(name, value) != value:
      raise ConfigError(
        f'--config.model_kwargs.{name}={kwargs[name]} does not match '
        f'dataset {config.dataset!r}: images of shape {image_shape}, '
        f'{num_classes} classes; remove the option, the dataset sets it'
      )
  try:
    return models.get_model(config.model, **{**kwargs, **from_dataset})
  except TypeError as error:
    raise ConfigError(
      f'invalid --config.model_kwargs for model {config.model!r}: {error}'
    ) from error


def _parameter_count(params: Any) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


@dataclasses.dataclass
class _Run:
  """Data, model, schedule and outputs of a run, built once per process.

  `init_state` returns the freshly initialised state, the same on every
  call. `resume_source` is the checkpoint of --config.resume_from, if any.
  """

  config: ml_collections.ConfigDict
  train_data: pipeline.SplitArrays
  eval_data: pipeline.SplitArrays
  normalization: pipeline.Normalization | None
  steps_per_epoch: int
  total_steps: int
  train_microbatch_size: int
  eval_batch_size: int
  mesh: jax.sharding.Mesh
  step_rng: jax.Array
  model: Any
  init_state: Callable[[], steps.TrainState]
  resume_source: checkpoints.CheckpointPath | None
  manager: Any
  metrics_file: progress.MetricsFile
  writer: Any
  workdir: str

  @property
  def max_consecutive_skips(self) -> int | None:
    """The limit of skipped updates in a row, None without skipping."""
    if not self.config.skip_nonfinite_updates:
      return None
    return self.config.max_consecutive_skips


def _lock_workdir(workdir: str, resources: contextlib.ExitStack) -> None:
  """Lock `workdir` until `resources` closes, or stop if a run holds it.

  The processes of one run share the work directory, so process 0 locks
  it for all of them and broadcasts whether the lock was free.

  Raises:
    workdir_lock.WorkdirInUseError: another run holds the lock.
  """
  in_use = False
  if jax.process_index() == 0:
    try:
      resources.enter_context(workdir_lock.hold(workdir))
    except workdir_lock.WorkdirInUseError:
      in_use = True
  if jax.process_count() > 1:
    in_use = bool(multihost_utils.broadcast_one_to_all(np.int32(in_use)))
  if in_use:
    raise workdir_lock.in_use_error(workdir)


def _check_workdir_name(workdir: str) -> None:
  """Reject a work directory name that is empty or looks like a flag.

  An empty name would write into the current folder, over any report.md
  there. A name starting with '-' is usually the next flag, taken as the
  value of an empty --workdir.
  """
  if not workdir.strip():
    raise ConfigError(
      '--workdir is empty; give the folder for this run, such as workdirs/mnist'
    )
  if workdir.startswith('-'):
    raise ConfigError(
      f'--workdir {workdir} starts with "-", so it is probably a flag that '
      'followed an empty --workdir; give the folder for this run'
    )


def _make_workdir(workdir: str) -> str:
  """Create `workdir` if needed and return its absolute path."""
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
  checkpoints_path = os.path.join(path, 'checkpoints')
  if os.path.exists(checkpoints_path) and not os.path.isdir(checkpoints_path):
    raise ConfigError(
      f'{checkpoints_path} is a file, where the run saves its checkpoints; '
      'move it away or choose another --workdir'
    )
  return path


def _prepare(
  config: ml_collections.ConfigDict,
  workdir: str,
  resources: contextlib.ExitStack,
):
  """Load the data and build the initial state, restoring a checkpoint.

  The config, the resume path, the work directory and the model are checked
  before the data is loaded, so that a mistake in them fails in seconds.
  The checkpoint manager and the TensorBoard writer are closed when
  `resources` closes.
  """
  config_lib.validate(config)
  workdir = os.fspath(workdir)
  _check_workdir_name(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size, mesh, '--config.batch_size')
  resume_source = _resume_source(config, workdir)
  workdir = _make_workdir(workdir)
  _lock_workdir(workdir, resources)
  model = _build_model(config)
  builder = _prepared_builder(config)
  train_data = pipeline.load_checked_split(
    builder, config.train_split, '--config.train_split'
  )
  eval_data = pipeline.load_checked_split(
    builder, config.eval_split, '--config.eval_split'
  )
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

  # Keys and state are built replicated on every device, which a run of
  # several processes cannot assemble from host values.
  init_rng, step_rng = sharding.place_replicated(
    lambda: tuple(jax.random.split(jax.random.key(config.seed))), mesh
  )
  init_state = functools.partial(
    sharding.place_replicated,
    functools.partial(
      steps.create_train_state,
      model,
      optim.create_optimizer(config, total_steps),
      train_data.images.shape[1:],
      init_rng,
    ),
    mesh,
  )
  try:
    state = init_state()
  except ValueError as error:
    # The models check their arguments when they are first applied.
    raise ConfigError(
      f'invalid --config.model_kwargs for model {config.model!r}: {error}'
    ) from error
  logging.info(
    'Model %s with %s parameters.',
    config.model,
    f'{_parameter_count(state.params):,}',
  )
  logging.info(sharding.describe(mesh, config.batch_size))
  manager = checkpoints.create_manager(
    os.path.join(workdir, 'checkpoints'), config.keep_checkpoints
  )
  resources.callback(manager.close)
  restored = _restore_start(manager, state, config, total_steps, resume_source)
  if restored is not None:
    state = restored
    logging.info('Resuming at step %d of %d.', state.step, total_steps)
  train_microbatch_size = _train_microbatch_size(config, state, mesh)
  # Every check has passed: from here on the run writes into the work
  # directory. In a multi-process run only the first process writes
  # metrics and TensorBoard events.
  first_process = jax.process_index() == 0
  writer = summaries.create_writer(workdir, enabled=first_process)
  resources.callback(writer.close)
  summaries.write_hparams(writer, config)
  metrics_file = progress.MetricsFile(
    os.path.join(workdir, 'metrics.jsonl'),
    on_write=lambda record: summaries.write_record(writer, record),
    enabled=first_process,
  )
  # Each session of a run starts with the machine it ran on, for reports.
  metrics_file.write(
    {
      'event': 'start',
      'step': int(state.step),
      'environment': environment.describe(),
    }
  )
  run = _Run(
    config=config,
    train_data=train_data,
    eval_data=eval_data,
    normalization=(
      pipeline.normalization_of(train_data.images) if config.normalize else None
    ),
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    train_microbatch_size=train_microbatch_size,
    eval_batch_size=sharding.round_up_batch(
      config.eval_batch_size, mesh, '--config.eval_batch_size'
    ),
    mesh=mesh,
    step_rng=step_rng,
    model=model,
    init_state=init_state,
    resume_source=resume_source,
    manager=manager,
    metrics_file=metrics_file,
    writer=writer,
    workdir=workdir,
  )
  return run, state


def _prepared_builder(config: ml_collections.ConfigDict) -> Any:
  """Return the prepared tfds builder, preparing it in process 0 first.

  Two processes that prepare the same folder at once make one of them fail,
  and the processes of a run often share the folder. The others wait at a
  barrier, then find the data prepared. NOTE: if process 0 fails to
  prepare, the others wait at the barrier until JAX's timeout.
  """
  if jax.process_count() == 1:
    return sources.get_builder(config)
  builder = sources.get_builder(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('pinet_jax: data prepared')
  return builder or sources.get_builder(config)


def _resume_source(
  config: ml_collections.ConfigDict, workdir: str
) -> checkpoints.CheckpointPath | None:
  """Return the checkpoint of --config.resume_from, if the run uses it.

  The work directory's own checkpoints come first, so rerunning a command
  with --config.resume_from continues where that run stopped, even when
  the source has been deleted since.
  """
  if not config.resume_from:
    return None
  own = os.path.join(
    os.path.abspath(os.path.expanduser(workdir)), 'checkpoints'
  )
  if checkpoints.latest_complete_step(own) is not None:
    logging.info(
      '%s already has checkpoints, so the run resumes from its latest '
      'instead of --config.resume_from=%s.',
      own,
      config.resume_from,
    )
    return None
  return checkpoints.find_checkpoint(config.resume_from, '--config.resume_from')


def _restore_start(
  manager: Any,
  template: steps.TrainState,
  config: ml_collections.ConfigDict,
  total_steps: int,
  resume_source: checkpoints.CheckpointPath | None,
) -> steps.TrainState | None:
  """Return the state to resume from, or None to start at step 0.

  The work directory's own latest checkpoint comes first; see
  `_resume_source`.
  """
  restored = checkpoints.restore_latest(manager, template, config, total_steps)
  if restored is None and resume_source is not None:
    logging.info('Starting from --config.resume_from=%s', resume_source.path)
    return checkpoints.restore_from(
      resume_source, template, config, total_steps
    )
  return restored


def _compile(
  function: Any,
  *args: Any,
  mesh: jax.sharding.Mesh,
  donate: bool = False,
  **static: Any,
):
  """Compile `function` for `args` once, logging the time it took.

  The loop calls the compiled executable, which raises on a shape it was
  not compiled for instead of silently compiling again. The inputs keep
  their shardings and every output is replicated on `mesh`. `static`
  keyword arguments are fixed at compile time.
  """
  start = time.perf_counter()
  jitted = jax.jit(
    functools.partial(function, **static),
    donate_argnums=0 if donate else (),
    out_shardings=sharding.replicated(mesh),
  )
  compiled = jitted.lower(*args).compile()
  logging.info(
    'Compiled %s in %.1f s.', function.__name__, time.perf_counter() - start
  )
  return compiled


def _prefetch_to_device(
  batches: Iterator[dict[str, np.ndarray]],
  mesh: jax.sharding.Mesh,
  size: int = 2,
) -> Iterator[dict[str, jax.Array]]:
  """Yield this process's rows of `batches` as global batches on `mesh`.

  The copies to the devices return at once, so sending `size` batches
  ahead overlaps them with the steps.
  """
  queue = collections.deque()
  to_devices = sharding.batch_sharding(mesh)
  for batch in batches:
    queue.append(sharding.shard_batch(batch, to_devices))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _evaluate_and_log(
  run: _Run, eval_fn: Any, state: steps.TrainState
) -> dict[str, float]:
  step = int(state.step)
  start = time.perf_counter()
  metrics = evaluate(
    eval_fn,
    state,
    run.eval_data,
    run.eval_batch_size,
    run.normalization,
    run.mesh,
  )
  if not math.isfinite(metrics['loss']):
    raise divergence.DivergenceError(
      f'evaluation loss is {metrics["loss"]} at step {step}: the polynomial '
      'overflowed; lower --config.learning_rate or change '
      '--config.model_kwargs.init_scheme (kernel_init for the ResNets)'
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
  num_classes = sources.DATASET_SHAPES[run.config.dataset][0]
  if jax.process_index() == 0 and constant_output.looks_constant(
    metrics['loss'], metrics['accuracy'], num_classes
  ):
    logging.warning(
      constant_output.warning(metrics['loss'], metrics['accuracy'], num_classes)
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
  checkpoints.save(
    run.manager,
    state,
    run.config,
    run.total_steps,
    normalization=run.normalization,
  )
  checkpoints.wait_for_saves(run.manager)
  raise TrainingInterrupted(
    f'stopped at step {int(state.step)}; checkpoint saved in '
    f'{run.manager.directory}: rerun the same command to resume'
  )


def _train_batches(
  run: _Run, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
  """Yield the training batches of the steps after `start_step`, in order.

  Each epoch's order depends only on the seed and the epoch, so a run that
  resumes at `start_step` reads the same batches as an uninterrupted one.
  """
  step = start_step
  while step < run.total_steps:
    epoch, offset = divmod(step, run.steps_per_epoch)
    count = min(run.steps_per_epoch - offset, run.total_steps - step)
    batches = pipeline.train_batches(
      run.train_data,
      batch_size=run.config.batch_size,
      seed=run.config.seed,
      epoch=epoch,
      start_batch=offset,
      augment=run.config.augment,
      crop_padding=run.config.crop_padding,
      flip=run.config.flip,
      normalization=run.normalization,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    yield from itertools.islice(batches, count)
    step += count


def _stop_agreed(run: _Run, stop: StopRequest, step: int) -> bool:
  """Return whether every process should stop after `step`.

  One process alone cannot stop: the others would wait for it in the next
  step's collectives. Processes see a Ctrl-C at different steps, so with
  several of them the requests are gathered every log_every_steps steps,
  all processes at the same step, and all stop if any asked to.
  """
  if jax.process_count() == 1:
    return stop.requested
  if step % run.config.log_every_steps:
    return False
  requests = multihost_utils.process_allgather(np.array(stop.requested))
  return bool(np.any(requests))


def _checkpoint_due(config: ml_collections.ConfigDict, step: int) -> bool:
  every = config.checkpoint_every_steps
  return every > 0 and step % every == 0


def _train(
  run: _Run, state: steps.TrainState, stop: StopRequest
) -> tuple[steps.TrainState, dict[str, float] | None]:
  """Run the remaining steps; return the state and the last evaluation.

  Every evaluation and checkpoint follows a check that each step since the
  previous one is finite, so a diverged state is never saved.

  Raises:
    divergence.DivergenceError: a step's loss or gradients were not
      finite and its update was not skipped.
    TrainingInterrupted: `stop` was requested, or orbax reported a
      preemption; the checkpoint of the current step is committed.
  """
  config = run.config
  step = int(state.step)
  train_fn = eval_fn = None
  last_eval = None
  log = TrainLog(
    run.metrics_file,
    run.steps_per_epoch,
    run.total_steps,
    config.batch_size,
    run.max_consecutive_skips,
    optim.learning_rate_schedule(config, run.total_steps),
  )
  try:
    for batch in _prefetch_to_device(_train_batches(run, step), run.mesh):
      if train_fn is None:
        train_fn = _compile_train(run, state, batch)
      state, metrics = train_fn(state, batch, run.step_rng)
      step += 1
      log.record(step, metrics)
      # orbax's check is true only with several JAX processes, once every
      # process reached the step at which they all save (see
      # `_stop_signals`).
      stopping = _stop_agreed(run, stop, step) or (
        run.manager.reached_preemption(step)
      )
      epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
      if step % config.log_every_steps == 0:
        log.end_interval(step)
      if not (epoch_end or stopping or _checkpoint_due(config, step)):
        continue
      log.flush(step)
      if epoch_end:
        if eval_fn is None:
          eval_fn = _compile_eval(run, state)
        last_eval = _evaluate_and_log(run, eval_fn, state)
        # Evaluation time must not lower the next report's img/s.
        log.restart_rate()
      checkpoints.save(
        run.manager,
        state,
        config,
        run.total_steps,
        last_eval if epoch_end else None,
        run.normalization,
      )
      if stopping:
        _save_and_stop(run, state)
  except divergence.Diverged as diverged:
    raise _divergence_error(run, train_fn, diverged.divergence) from None
  return state, last_eval


def _compile_train(
  run: _Run, state: steps.TrainState, batch: dict[str, jax.Array]
) -> Any:
  """Compile `steps.train_step` with the skip counters in its metrics."""

  def train_step(state, batch, rng, **static):
    state, metrics = steps.train_step(state, batch, rng, **static)
    return state, {**metrics, **optim.skip_counters(state.opt_state)}

  return _compile(
    train_step,
    state,
    batch,
    run.step_rng,
    mesh=run.mesh,
    donate=True,
    microbatch_size=run.train_microbatch_size,
    label_smoothing=run.config.label_smoothing,
    compute_dtype=config_lib.compute_dtype(run.config),
  )


def _divergence_error(
  run: _Run, train_fn: Any, found: divergence.Divergence
) -> divergence.DivergenceError:
  """Return the error for `found`, naming the first block that overflowed.

  The state that the diverging step started from was donated to the steps
  queued after it, so it is rebuilt: the latest checkpoint before it is
  restored and the steps in between are replayed with the same batches.
  NOTE: the replay is bitwise exact on CPU; on GPU and TPU, where some
  reductions are not deterministic, it may differ by rounding, which can
  move the first non-finite block in borderline cases.
  """
  checkpoints.wait_for_saves(run.manager)
  kept = run.manager.latest_step()
  logging.warning(
    'Training diverged at step %d; replaying the steps since the last '
    'checkpoint to find the block that overflowed.',
    found.step,
  )
  state = _state_at(run, train_fn, found.step - 1)
  batches = _train_batches(run, found.step - 1)
  batch = next(_prefetch_to_device(batches, run.mesh))
  # In the step's dtype, which may be the one that overflowed.
  dtype = config_lib.compute_dtype(run.config)
  variables = {
    **state.variables(),
    'params': steps.cast_floats(state.params, dtype),
  }
  rms = models.activation_rms(
    run.model, variables, steps.cast_floats(batch['image'], dtype), train=True
  )
  return divergence.DivergenceError(
    divergence.describe(
      found, rms, run.steps_per_epoch, kept, run.max_consecutive_skips
    )
  )


def _state_at(run: _Run, train_fn: Any, step: int) -> steps.TrainState:
  """Rebuild the state after `step` steps from the latest checkpoint before.

  Falls back to --config.resume_from's checkpoint and then to the initial
  state when the work directory has no checkpoint at or before `step`.
  """
  saved = [done for done in run.manager.all_steps() if done <= step]
  if saved:
    state = checkpoints.restore(
      run.manager, max(saved), run.init_state(), run.config, run.total_steps
    )
  elif run.resume_source is not None and run.resume_source.step <= step:
    state = checkpoints.restore_from(
      run.resume_source, run.init_state(), run.config, run.total_steps
    )
  else:
    state = run.init_state()
  start = int(state.step)
  batches = itertools.islice(_train_batches(run, start), step - start)
  for batch in _prefetch_to_device(batches, run.mesh):
    state, _ = train_fn(state, batch, run.step_rng)
  return state


def _compile_eval(run: _Run, state: steps.TrainState) -> Any:
  """Compile `steps.eval_step` for the shapes that every eval batch shares."""
  batches = pipeline.eval_batches(
    run.eval_data,
    batch_size=run.eval_batch_size,
    normalization=run.normalization,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  example = next(_prefetch_to_device(batches, run.mesh))
  return _compile(
    steps.eval_step,
    state,
    example,
    mesh=run.mesh,
    # Evaluation always chooses, because its microbatches change no result.
    microbatch_size=_microbatch_size('Eval', 0, run.eval_batch_size, run.mesh),
    compute_dtype=config_lib.compute_dtype(run.config),
  )


def _train_microbatch_size(
  config: ml_collections.ConfigDict,
  state: steps.TrainState,
  mesh: jax.sharding.Mesh,
) -> int:
  """Resolve the train step's microbatch size for the model's state."""
  try:
    return _microbatch_size(
      'Train',
      config.microbatch_size,
      config.batch_size,
      mesh,
      batch_statistics=bool(state.batch_stats),
    )
  except ValueError as error:
    raise ConfigError(
      f'--config.microbatch_size={config.microbatch_size} does not suit '
      f'model {config.model!r} on {sharding.data_parallel_size(mesh)} '
      f'device(s): {error}'
    ) from error


def _microbatch_size(
  step: str,
  requested: int,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  batch_statistics: bool = False,
) -> int:
  """Resolve and log the microbatch size of the `step` ('Train' or 'Eval')."""
  size = steps.resolve_microbatch_size(
    requested,
    batch_size,
    jax.default_backend(),
    batch_statistics,
    devices=sharding.data_parallel_size(mesh),
  )
  logging.info(
    '%s step: %d microbatches of %d examples (batch %d).',
    step,
    batch_size // size,
    size,
    batch_size,
  )
  return size


def _stop_signals() -> tuple[signal.Signals, ...]:
  """Return the signals that stop training with a checkpoint.

  With several JAX processes (jax.distributed.initialize), JAX's
  preemption service receives SIGTERM and orbax's `reached_preemption`
  names the step at which every process saves, so a handler here would
  stop one process alone. NOTE: that SIGTERM path is untested; the
  two-process test runs to the end, and no test sends it a signal.
  """
  if jax.process_count() > 1:
    return (signal.SIGINT,)
  return (signal.SIGINT, signal.SIGTERM)


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
    TrainingInterrupted: SIGINT or SIGTERM arrived, or orbax reported a
      preemption; a checkpoint was committed.
    pinet_jax.errors.UserInputError: invalid config, data or checkpoint.
    pinet_jax.divergence.DivergenceError: a training step's loss or
      gradients, or the evaluation loss, became NaN or infinite.
  """
  with contextlib.ExitStack() as resources:
    with _new_folders_removed_on_error(workdir):
      run, state = _prepare(config, workdir, resources)
    try:
      with (
        config_lib.matmul_precision(config),
        stop_on_signals(_stop_signals()) as stop,
      ):
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
      checkpoints.wait_for_saves(run.manager)
  logging.info(
    'Final %s accuracy: %.2f%% at step %d; checkpoints in %s, metrics in %s',
    config.eval_split,
    100 * final['eval_accuracy'],
    final['step'],
    run.manager.directory,
    run.metrics_file.path,
  )
  if jax.process_index() == 0:
    _write_report(run.workdir)
  return final


@contextlib.contextmanager
def _new_folders_removed_on_error(workdir: str) -> Iterator[None]:
  """Remove the folders that a failed start created, if still empty.

  A run rejected before it trains, for a bad config or an incompatible
  checkpoint, then leaves the file system as it found it.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  candidates = [os.path.join(path, 'checkpoints'), path]
  parent = os.path.dirname(path)
  while parent != os.path.dirname(parent) and not os.path.exists(parent):
    candidates.append(parent)
    parent = os.path.dirname(parent)
  new = [folder for folder in candidates if not os.path.exists(folder)]
  try:
    yield
  except workdir_lock.WorkdirInUseError:
    # The run that has the lock may have created those folders.
    raise
  except BaseException:
    for folder in new:
      # os.rmdir removes only empty folders: anything written stays.
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    raise


def _write_report(workdir: str) -> None:
  """Write the curves and the markdown report; a failure only warns.

  The run is finished and saved by then, so a problem with the report
  must not turn it into a failed run.
  """
  try:
    paths = report.write_report(workdir)
  # Any error: a full disk, a read-only folder or a plotting failure alike.
  except Exception as error:  # noqa: BLE001
    logging.warning(
      'No report written: %s; `pinet-jax report --workdir %s` retries',
      error,
      workdir,
    )
    return
  logging.info('Report in %s, curves in %s', paths.markdown, paths.curves)
