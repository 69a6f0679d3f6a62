"""Pure training and evaluation steps, and the state they transform."""

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from flax.training import train_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Step counter, parameters, optimiser state and batch statistics.

  `step` counts the training batches consumed since the start of the run.
  `batch_stats` holds the running averages of the model's BatchNorm layers,
  updated by every train step and read by evaluation; it is an empty dict
  for models without batch statistics.
  """

  batch_stats: Any = struct.field(default_factory=dict)

  def variables(self, params: Any = None) -> dict[str, Any]:
    """Return the Flax variables to apply the model with.

    Args:
      params: parameters to use instead of `self.params`, such as the
        ones being differentiated.
    """
    variables = {'params': self.params if params is None else params}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    return variables


def create_train_state(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
  rng: jax.Array,
) -> TrainState:
  """Initialise the model's parameters and the optimiser state.

  Initialisation runs as one jitted computation: run eagerly, every
  initialiser of a different shape would compile on its own.

  Args:
    model: maps images (batch, *image_shape) to logits; its `__call__`
      takes a keyword `train`, True in train steps and False in evaluation,
      as every model in `pinet_jax.models` does. BatchNorm layers keep their
      running averages in the 'batch_stats' collection.
    optimizer: optax transformation of the gradients.
    image_shape: (height, width, channels) of one image.
    rng: key for the initialisers.
  """
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(model.init)(rng, dummy)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=optimizer,
    batch_stats=variables.get('batch_stats', {}),
  )


def cross_entropy(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Return the per-example softmax cross-entropy, shape (batch,).

  Args:
    logits: (batch, classes).
    labels: int (batch,).
    label_smoothing: the weight moved from the true class onto a uniform
      distribution over all classes; 0 is the plain cross-entropy.
  """
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(
    jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
    label_smoothing,
  )
  return optax.softmax_cross_entropy(logits, targets)


# Microbatch size that `resolve_microbatch_size` prefers on CPU. With the
# reference network at batch 128 on a 2-core x86-64 CPU, microbatches of 16
# made train steps 1.7x and eval steps 1.4x faster than the whole batch.
# The likely reason is that a 16-image working set fits the caches. Sizes
# 8 and 32 were slower. NOTE: measured only on that 2-core machine; other
# CPUs may prefer another size, which --config.microbatch_size sets.
CPU_MICROBATCH_SIZE = 16


def resolve_microbatch_size(
  requested: int,
  batch_size: int,
  platform: str,
  batch_statistics: bool = False,
  devices: int = 1,
) -> int:
  """Return how many examples each forward and backward pass should take.

  The size counts the examples of all devices together: with a batch split
  across `devices`, each device computes 1 / devices of every microbatch.

  Args:
    requested: a positive multiple of `devices` that divides `batch_size`,
      or 0 to choose: on CPU the largest divisor of each device's share
      from `CPU_MICROBATCH_SIZE` down to half of it (times `devices`),
      otherwise (and when none divides) the whole batch. Accelerators keep
      the whole batch, which they fill best.
    batch_size: examples per step, a multiple of `devices`.
    platform: `jax.default_backend()`, such as 'cpu', 'gpu' or 'tpu'.
    batch_statistics: the model normalises with batch statistics in
      training. Its train step then needs the whole batch in one pass, so 0
      chooses the whole batch and a smaller size is an error.
    devices: devices that the batch is split across.

  Raises:
    ValueError: `requested` is negative, does not divide `batch_size` or is
      not a multiple of `devices`, or is smaller than the batch of a model
      with batch statistics.
  """
  if requested < 0 or (requested and batch_size % requested):
    raise ValueError(
      f'microbatch size {requested} must be 0 (automatic) or a divisor of '
      f'the batch size {batch_size}'
    )
  if requested % devices:
    raise ValueError(
      f'microbatch size {requested} must be a multiple of the {devices} '
      'devices that share each microbatch'
    )
  if batch_statistics:
    if requested not in (0, batch_size):
      raise ValueError(_batch_statistics_message(requested, batch_size))
    return batch_size
  if requested:
    return requested
  share = batch_size // devices
  if platform == 'cpu':
    for size in range(CPU_MICROBATCH_SIZE, CPU_MICROBATCH_SIZE // 2 - 1, -1):
      if share % size == 0:
        return size * devices
  return batch_size


def _batch_statistics_message(microbatch_size: int, batch_size: int) -> str:
  return (
    f'microbatch size {microbatch_size} is smaller than the batch size '
    f'{batch_size}, but the model normalises with batch statistics, which '
    'would then come from each microbatch alone; use 0 (automatic) or the '
    'batch size'
  )


def _split_batch(batch: Batch, microbatch_size: int) -> Batch:
  """Reshape every (batch, ...) array to (microbatches, size, ...).

  Microbatch i takes examples i, i + m, i + 2m, ... of the m microbatches.
  A batch split across devices in consecutive blocks thus gives every
  microbatch the same share of each device's examples, and the split moves
  no data between devices.
  """
  return {
    key: _strided_parts(value, microbatch_size) for key, value in batch.items()
  }


def _strided_parts(value: jax.Array, microbatch_size: int) -> jax.Array:
  rows = value.reshape(microbatch_size, -1, *value.shape[1:])
  return jnp.swapaxes(rows, 0, 1)


def _merge_microbatches(parts: jax.Array) -> jax.Array:
  """Invert `_split_batch` for one (microbatches, size, ...) array."""
  return jnp.swapaxes(parts, 0, 1).reshape(-1, *parts.shape[2:])


def cast_floats(tree: Any, dtype: jnp.dtype | None) -> Any:
  """Return `tree` with its floating-point arrays cast to `dtype`."""
  if dtype is None:
    return tree
  return jax.tree.map(
    lambda leaf: (
      leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
    ),
    tree,
  )


def _at_least_float32(logits: jax.Array) -> jax.Array:
  """Return `logits` in float32, or float64 if they are; for the loss."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_divides(microbatch_size: int | None, batch: Batch) -> int:
  """Return the batch size, checking that `microbatch_size` divides it."""
  batch_size = batch['label'].shape[0]
  if microbatch_size is None:
    return batch_size
  if not isinstance(microbatch_size, numbers.Integral):
    raise TypeError(
      f'microbatch_size must be a Python int, got {type(microbatch_size)}; '
      "under jax.jit pass it with static_argnames='microbatch_size' or "
      'functools.partial'
    )
  if microbatch_size <= 0 or batch_size % microbatch_size:
    raise ValueError(
      f'microbatch_size={microbatch_size} must be a positive divisor of the '
      f'batch size {batch_size}'
    )
  return batch_size


def loss_and_grads(
  state: TrainState,
  batch: Batch,
  rng: jax.Array,
  microbatch_size: int | None = None,
  label_smoothing: float = 0.0,
  compute_dtype: jnp.dtype | None = None,
) -> tuple[Metrics, Any]:
  """Return the batch's mean loss, its accuracy and the loss's gradients.

  `train_step` without the update; see `_forward_backward` for the
  arguments.

  Returns:
    {'loss', 'accuracy'} as scalars, and gradients shaped like
    `state.params`.
  """
  metrics, grads, _ = _forward_backward(
    state, batch, rng, microbatch_size, label_smoothing, compute_dtype
  )
  return metrics, grads


def _forward_backward(
  state: TrainState,
  batch: Batch,
  rng: jax.Array,
  microbatch_size: int | None,
  label_smoothing: float,
  compute_dtype: jnp.dtype | None,
) -> tuple[Metrics, Any, Any]:
  """Apply the model in training mode and differentiate its loss.

  With `microbatch_size` smaller than the batch, the forward and backward
  passes run on one microbatch after another and the gradients are summed,
  which gives the whole batch's gradients up to rounding for models whose
  examples do not interact. Models with batch statistics make examples
  interact, so for them a smaller microbatch size is an error.

  Args:
    state: parameters, batch statistics and `apply_fn`.
    batch: 'image' float (batch, H, W, C) and 'label' int32 (batch,).
    rng: the step's key, passed to the model as its 'dropout' stream; each
      microbatch gets its own key split from it.
    microbatch_size: a Python int that divides the batch size (static
      under jax.jit); None takes the whole batch at once.
    label_smoothing: see `cross_entropy`; the reported loss includes it.
    compute_dtype: the dtype of the forward and backward passes, such as
      jnp.bfloat16, or None for the parameters' own. The parameters are
      cast to it inside the step, so they, their gradients and the batch
      statistics keep their dtype. The loss is computed in float32.

  Returns:
    The metrics, the gradients and the batch statistics after this batch
    (`state.batch_stats` itself when the model has none).
  """
  batch_size = _check_divides(microbatch_size, batch)
  whole = microbatch_size in (None, batch_size)
  if state.batch_stats and not whole:
    raise ValueError(_batch_statistics_message(microbatch_size, batch_size))

  def loss_fn(params, part, part_rng):
    outputs = state.apply_fn(
      state.variables(cast_floats(params, compute_dtype)),
      cast_floats(part['image'], compute_dtype),
      train=True,
      rngs={'dropout': part_rng},
      mutable=['batch_stats'],
    )
    logits, updates = outputs
    logits = _at_least_float32(logits)
    losses = cross_entropy(logits, part['label'], label_smoothing)
    # Each part contributes its share of the whole batch's mean, so the
    # parts' gradients add up to the mean's gradient.
    loss = losses.sum() / batch_size
    correct = jnp.sum(jnp.argmax(logits, -1) == part['label'])
    return loss, (correct, updates.get('batch_stats', state.batch_stats))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if whole:
    (loss, (correct, batch_stats)), grads = grad_fn(state.params, batch, rng)
  else:

    def accumulate(totals, inputs):
      (loss, (correct, _)), grads = grad_fn(state.params, *inputs)
      return jax.tree.map(jnp.add, totals, (loss, correct, grads)), None

    parts = _split_batch(batch, microbatch_size)
    keys = jax.random.split(rng, batch_size // microbatch_size)
    # The sums start at zeros of the dtypes one microbatch gives, which
    # depend on the parameters' dtype and on JAX's x64 mode.
    (loss, (correct, _)), grads = jax.eval_shape(
      grad_fn, state.params, jax.tree.map(lambda x: x[0], parts), keys[0]
    )
    zeros = jax.tree.map(
      lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), (loss, correct, grads)
    )
    (loss, correct, grads), _ = jax.lax.scan(accumulate, zeros, (parts, keys))
    batch_stats = state.batch_stats
  metrics = {'loss': loss, 'accuracy': correct.astype(jnp.float32) / batch_size}
  return metrics, grads, batch_stats


def train_step(
  state: TrainState,
  batch: Batch,
  rng: jax.Array,
  microbatch_size: int | None = None,
  label_smoothing: float = 0.0,
  compute_dtype: jnp.dtype | None = None,
) -> tuple[TrainState, Metrics]:
  """Take one optimiser step on `batch`.

  Args:
    state: the current state; a jitted caller may donate it.
    batch: 'image' float32 (batch, H, W, C) and 'label' int32 (batch,).
    rng: the run's base key; the step's key is fold_in(rng, state.step), so
      a resumed run draws the same randomness as an uninterrupted one.
    microbatch_size: a Python int that divides the batch size (static under
      jax.jit), or None for the whole batch; a speed setting that leaves the
      update equal up to rounding, except for models that draw from the
      'dropout' stream, whose microbatches get keys of their own. Models
      with batch statistics need the whole batch.
    label_smoothing: a Python float in [0, 1); see `cross_entropy`.
    compute_dtype: see `_forward_backward`; static under jax.jit.

  Returns:
    The new state, with the batch statistics of this batch folded into the
    running averages, and the metrics: the batch's mean 'loss' and
    'accuracy' before the update, 'grads_finite', 1.0 when every
    gradient is finite and 0.0 when one is NaN or infinite, and the global
    L2 norms 'grad_norm' of the gradients and 'param_norm' of the updated
    parameters.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  metrics, grads, batch_stats = _forward_backward(
    state, batch, step_rng, microbatch_size, label_smoothing, compute_dtype
  )
  finite = all_finite(grads)
  metrics['grads_finite'] = finite.astype(jnp.float32)
  metrics['grad_norm'] = optax.tree.norm(grads)
  state = state.apply_gradients(grads=grads)
  metrics['param_norm'] = optax.tree.norm(state.params)
  # A step whose gradients are not finite either stops the run or is
  # skipped by the optimiser; its statistics must not reach the state.
  batch_stats = jax.tree.map(
    lambda new, old: jnp.where(finite, new, old),
    batch_stats,
    state.batch_stats,
  )
  return state.replace(batch_stats=batch_stats), metrics


def all_finite(tree: Any) -> jax.Array:
  """Return a boolean scalar: whether every element of `tree` is finite."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def eval_logits(
  apply_fn: Any,
  variables: Any,
  images: jax.Array,
  microbatch_size: int | None = None,
  compute_dtype: jnp.dtype | None = None,
) -> jax.Array:
  """Return the evaluation-mode logits (batch, classes) of `images`.

  The logits are float32, or float64 for a float64 model.

  Args:
    apply_fn: the model's `apply`.
    variables: {'params': ...}, and 'batch_stats' for models with them.
    images: float (batch, H, W, C).
    microbatch_size: a Python int that divides the batch size (static
      under jax.jit). The logits are computed for one microbatch after
      another, which gives the same values and is faster on CPU. None
      takes the whole batch at once.
    compute_dtype: see `_forward_backward`.
  """
  batch_size = images.shape[0]
  # The batch statistics stay float32, as in training.
  variables = {
    **variables,
    'params': cast_floats(variables['params'], compute_dtype),
  }
  images = cast_floats(images, compute_dtype)

  def logitsof(part: jax.Array) -> jax.Array:
    return _at_least_float32(apply_fn(variables, part, train=False))

  if microbatch_size in (None, batch_size):
    return logitsof(images)
  parts = _split_batch({'image': images}, microbatch_size)['image']
  return _merge_microbatches(jax.lax.map(logitsof, parts))


def eval_step(
  state: TrainState,
  batch: Batch,
  microbatch_size: int | None = None,
  compute_dtype: jnp.dtype | None = None,
) -> Metrics:
  """Return sums over the unmasked examples of `batch`.

  Args:
    state: parameters and running batch statistics to evaluate with.
    batch: as for `train_step`, plus 'mask' float32 (batch,) that is 0 on
      padding.
    microbatch_size: see `eval_logits`.
    compute_dtype: see `_forward_backward`.

  Returns:
    'loss_sum', 'correct' and 'count', each a float32 scalar, so batches
    add up to exact totals.
  """
  _check_divides(microbatch_size, batch)
  logits = eval_logits(
    state.apply_fn,
    state.variables(),
    batch['image'],
    microbatch_size,
    compute_dtype,
  )
  valid = batch['mask'] > 0
  # where, not a product with the mask: a NaN on a padding row would
  # survive a multiplication by zero.
  losses = jnp.where(valid, cross_entropy(logits, batch['label']), 0.0)
  correct = valid & (jnp.argmax(logits, -1) == batch['label'])
  return {
    'loss_sum': jnp.sum(losses),
    'correct': jnp.sum(correct, dtype=jnp.float32),
    'count': jnp.sum(valid, dtype=jnp.float32),
  }
