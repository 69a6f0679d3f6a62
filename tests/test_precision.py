"""bfloat16 computation with float32 parameters, statistics and loss."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pinet_jax import config as config_lib
from pinet_jax import models, steps, train
from pinet_jax.data import pipeline

STEPS = 50
MODELS = {
  'polynet': lambda: models.PolyNet(width=4, formulation='s2d'),
  'pi_resnet': lambda: models.PiResNet(
    in_channels=1, stage_sizes=(1, 1), width=4
  ),
}


@pytest.fixture(scope='module')
def mnist_batches(prepared_mnist):
  data = pipeline.load_split(prepared_mnist, f'train[:{64 * STEPS}]')
  return list(
    itertools.islice(
      pipeline.train_batches(data, batch_size=64, seed=0, epoch=0), STEPS
    )
  )


def float_dtypes(tree):
  return {
    leaf.dtype
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(leaf.dtype, jnp.floating)
  }


@pytest.mark.parametrize('name', sorted(MODELS))
def test_bfloat16_training_stays_finite_in_float32_state(name, mnist_batches):
  state = steps.create_train_state(
    MODELS[name](), optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  train_step = jax.jit(
    functools.partial(steps.train_step, compute_dtype=jnp.bfloat16),
    donate_argnums=0,
  )
  first_batch = mnist_batches[0]
  float32_loss = steps.loss_and_grads(state, first_batch, jax.random.key(1))[0]
  losses = []
  for batch in mnist_batches:
    state, metrics = train_step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
    assert float(metrics['grads_finite']) == 1.0

  assert np.all(np.isfinite(losses))
  # bfloat16 changed the first loss by its rounding, and no more.
  assert losses[0] != float(float32_loss['loss'])
  assert losses[0] == pytest.approx(float(float32_loss['loss']), rel=0.02)
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  for part in (state.params, state.opt_state, state.batch_stats):
    assert float_dtypes(part) <= {jnp.dtype(jnp.float32)}
  if name == 'pi_resnet':
    assert float_dtypes(state.batch_stats) == {jnp.dtype(jnp.float32)}

  eval_batch = {**first_batch, 'mask': np.ones(64, np.float32)}
  sums = steps.eval_step(state, eval_batch, compute_dtype=jnp.bfloat16)
  exact = steps.eval_step(state, eval_batch)
  assert sums['loss_sum'].dtype == jnp.float32
  assert float(sums['loss_sum']) == pytest.approx(
    float(exact['loss_sum']), rel=0.02
  )


def test_config_dtype_names_the_compute_dtype():
  config = config_lib.default_config()
  assert config_lib.compute_dtype(config) is None
  config.dtype = 'bfloat16'
  assert config_lib.compute_dtype(config) == jnp.bfloat16
  del config['dtype']
  assert config_lib.compute_dtype(config) is None


def test_training_program_applies_dtype_and_precision(tiny_config, tmp_path):
  # The options reach the compiled steps: record the dtype and precision
  # that each step is traced with.
  seen = []

  def spy(step):
    def traced(*args, compute_dtype=None, **kwargs):
      precision = jax.config.jax_default_matmul_precision
      seen.append((step.__name__, compute_dtype, precision))
      return step(*args, compute_dtype=compute_dtype, **kwargs)

    traced.__name__ = step.__name__
    return traced

  config = tiny_config
  config.dtype = 'bfloat16'
  config.matmul_precision = 'highest'
  config.num_train_steps = 2
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(steps, 'train_step', spy(steps.train_step))
    patch.setattr(steps, 'eval_step', spy(steps.eval_step))
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(seen) == [
    ('eval_step', jnp.bfloat16, 'highest'),
    ('train_step', jnp.bfloat16, 'highest'),
  ]
