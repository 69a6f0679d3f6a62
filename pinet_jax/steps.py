"""Pure training and evaluation steps, and the state they transform."""

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


def train_step(
  state: TrainState, batch: Batch, rng: jax.Array
) -> tuple[TrainState, Metrics]:
  """Take one optimiser step on `batch`.

  Args:
    state: the current state; a jitted caller may donate it.
    batch: 'image' float32 (batch, H, W, C) and 'label' int32 (batch,).
    rng: the run's base key; the step's key is fold_in(rng, state.step), so
      a resumed run draws the same randomness as an uninterrupted one.

  Returns:
    The new state and the batch's mean 'loss' and 'accuracy' before the
    update.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params: Any) -> tuple[jax.Array, jax.Array]:
    logits = state.apply_fn(
      {'params': params}, batch['image'], rngs={'dropout': step_rng}
    )
    return cross_entropy(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return state.apply_gradients(grads=grads), {
    'loss': loss,
    'accuracy': accuracy,
  }


def eval_step(state: TrainState, batch: Batch) -> Metrics:
  """Return sums over the unmasked examples of `batch`.

  Args:
    state: parameters to evaluate.
    batch: as for `train_step`, plus 'mask' float32 (batch,) that is 0 on
      padding.

  Returns:
    'loss_sum', 'correct' and 'count', each a float32 scalar, so batches
    add up to exact totals.
  """
  logits = state.apply_fn({'params': state.params}, batch['image'])
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
