"""Pure training and evaluation steps, and the state they transform."""

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Step counter, parameters and optimiser state.

  `step` counts the training batches consumed since the start of the run.
  """


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
    model: maps images (batch, *image_shape) to logits.
    optimizer: optax transformation of the gradients.
    image_shape: (height, width, channels) of one image.
    rng: key for the initialisers.
  """
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(model.init)(rng, dummy)
  return TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=optimizer
  )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Return the per-example softmax cross-entropy, shape (batch,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# Microbatch size that `resolve_microbatch_size` prefers on CPU. With the
# reference network at batch 128 on a 2-core x86-64 CPU, microbatches of 16
# made train steps 1.7x and eval steps 1.4x faster than the whole batch.
# The likely reason is that a 16-image working set fits the caches. Sizes
# 8 and 32 were slower. NOTE: measured only on that 2-core machine; other
# CPUs may prefer another size, which --config.microbatch_size sets.
CPU_MICROBATCH_SIZE = 16


def resolve_microbatch_size(
  requested: int, batch_size: int, platform: str
) -> int:
  """Return how many examples each forward and backward pass should take.

  Args:
    requested: a positive size that divides `batch_size`, or 0 to choose:
      on CPU the largest divisor of `batch_size` from `CPU_MICROBATCH_SIZE`
      down to half of it, otherwise (and when none divides) the whole batch.
      Accelerators keep the whole batch, which they fill best.
    batch_size: examples per step.
    platform: `jax.default_backend()`, such as 'cpu', 'gpu' or 'tpu'.

  Raises:
    ValueError: `requested` is negative or does not divide `batch_size`.
  """
  if requested < 0 or (requested and batch_size % requested):
    raise ValueError(
      f'microbatch size {requested} must be 0 (automatic) or a divisor of '
      f'the batch size {batch_size}'
    )
  if requested:
    return requested
  if platform == 'cpu':
    for size in range(CPU_MICROBATCH_SIZE, CPU_MICROBATCH_SIZE // 2 - 1, -1):
      if batch_size % size == 0:
        return size
  return batch_size


def _split_batch(batch: Batch, microbatch_size: int) -> Batch:
  """Reshape every (batch, ...) array to (microbatches, size, ...)."""
  return {
    key: value.reshape(-1, microbatch_size, *value.shape[1:])
    for key, value in batch.items()
  }


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
) -> tuple[Metrics, Any]:
  """Return the batch's mean loss, its accuracy and the loss's gradients.

  With `microbatch_size` smaller than the batch, the forward and backward
  passes run on one microbatch after another and the gradients are summed,
  which gives the whole batch's gradients up to rounding for models whose
  examples do not interact. That holds for every model here: none has
  batch statistics.

  Args:
    state: parameters and `apply_fn`.
    batch: 'image' float (batch, H, W, C) and 'label' int32 (batch,).
    rng: the step's key, passed to the model as its 'dropout' stream; each
      microbatch gets its own key split from it.
    microbatch_size: a Python int that divides the batch size (static
      under jax.jit); None takes the whole batch at once.

  Returns:
    {'loss', 'accuracy'} as scalars, and gradients shaped like
    `state.params`.
  """
  batch_size = _check_divides(microbatch_size, batch)

  def loss_fn(params, part, part_rng):
    logits = state.apply_fn(
      {'params': params}, part['image'], rngs={'dropout': part_rng}
    )
    # Each part contributes its share of the whole batch's mean, so the
    # parts' gradients add up to the mean's gradient.
    loss = cross_entropy(logits, part['label']).sum() / batch_size
    correct = jnp.sum(jnp.argmax(logits, -1) == part['label'])
    return loss, correct

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatch_size in (None, batch_size):
    (loss, correct), grads = grad_fn(state.params, batch, rng)
  else:

    def accumulate(totals, inputs):
      (loss, correct), grads = grad_fn(state.params, *inputs)
      return jax.tree.map(jnp.add, totals, (loss, correct, grads)), None

    parts = _split_batch(batch, microbatch_size)
    keys = jax.random.split(rng, batch_size // microbatch_size)
    # The sums start at zeros of the dtypes one microbatch gives, which
    # depend on the parameters' dtype and on JAX's x64 mode.
    shapes = jax.eval_shape(
      grad_fn, state.params, jax.tree.map(lambda x: x[0], parts), keys[0]
    )
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
    (loss, correct), grads = zeros
    (loss, correct, grads), _ = jax.lax.scan(
      accumulate, (loss, correct, grads), (parts, keys)
    )
  metrics = {'loss': loss, 'accuracy': correct.astype(jnp.float32) / batch_size}
  return metrics, grads


def train_step(
  state: TrainState,
  batch: Batch,
  rng: jax.Array,
  microbatch_size: int | None = None,
) -> tuple[TrainState, Metrics]:
  """Take one optimiser step on `batch`.

  Args:
    state: the current state; a jitted caller may donate it.
    batch: 'image' float32 (batch, H, W, C) and 'label' int32 (batch,).
    rng: the run's base key; the step's key is fold_in(rng, state.step), so
      a resumed run draws the same randomness as an uninterrupted one.
    microbatch_size: see `loss_and_grads`; a speed setting that leaves the
      update equal up to rounding, except for models that draw from the
      'dropout' stream, whose microbatches get keys of their own.

  Returns:
    The new state and the batch's mean 'loss' and 'accuracy' before the
    update.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  metrics, grads = loss_and_grads(state, batch, step_rng, microbatch_size)
  return state.apply_gradients(grads=grads), metrics


def eval_step(
  state: TrainState, batch: Batch, microbatch_size: int | None = None
) -> Metrics:
  """Return sums over the unmasked examples of `batch`.

  Args:
    state: parameters to evaluate.
    batch: as for `train_step`, plus 'mask' float32 (batch,) that is 0 on
      padding.
    microbatch_size: a Python int that divides the batch size (static
      under jax.jit); the logits are computed for one microbatch after
      another, which gives the same values and is faster on CPU. None takes
      the whole batch at once.

  Returns:
    'loss_sum', 'correct' and 'count', each a float32 scalar, so batches
    add up to exact totals.
  """
  batch_size = _check_divides(microbatch_size, batch)

  def logits_of(images: jax.Array) -> jax.Array:
    return state.apply_fn({'params': state.params}, images)

  if microbatch_size in (None, batch_size):
    logits = logits_of(batch['image'])
  else:
    parts = _split_batch({'image': batch['image']}, microbatch_size)
    logits = jax.lax.map(logits_of, parts['image'])
    logits = logits.reshape(batch_size, -1)
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
