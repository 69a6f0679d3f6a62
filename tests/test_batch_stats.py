"""Training with BatchNorm: statistics in the state, in steps and on disk."""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from pinet_jax import checkpoints, models, steps, train
from pinet_jax.config import default_config
from pinet_jax.errors import ConfigError

SHAPE = (12, 12, 3)


def small_resnet() -> models.PiResNet:
  return models.PiResNet(stage_sizes=(1, 1), width=4)


def new_state(seed: int = 0) -> steps.TrainState:
  return steps.create_train_state(
    small_resnet(), optax.sgd(0.1), SHAPE, jax.random.key(seed)
  )


def random_batch(size: int = 8, seed: int = 1) -> steps.Batch:
  images = jax.random.uniform(jax.random.key(seed), (size, *SHAPE))
  labels = jnp.arange(size, dtype=jnp.int32) % 10
  return {'image': images, 'label': labels}


def eval_batch(batch: steps.Batch) -> steps.Batch:
  return {**batch, 'mask': jnp.ones(batch['label'].shape, jnp.float32)}


def test_state_holds_initial_batch_statistics():
  state = new_state()
  stem = state.batch_stats['stem_norm']
  np.testing.assert_array_equal(stem['mean'], np.zeros(4))
  np.testing.assert_array_equal(stem['var'], np.ones(4))
  assert set(state.variables()) == {'params', 'batch_stats'}


def test_models_without_statistics_keep_an_empty_collection():
  state = steps.create_train_state(
    models.PolyNet(width=2), optax.sgd(0.1), (28, 28, 1), jax.random.key(0)
  )
  assert state.batch_stats == {}
  assert set(state.variables()) == {'params'}


def test_train_step_running_averages():
  state = new_state()
  batch = random_batch()
  new, _ = jax.jit(steps.train_step)(state, batch, jax.random.key(2))

  # The stem's statistics are those of its convolution's output, which the
  # parameters before the update determine.
  conv = state.params['stem_conv']['kernel']
  stem_out = jax.lax.conv_general_dilated(
    batch['image'],
    conv,
    (1, 1),
    [(1, 1), (1, 1)],
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  mean = stem_out.mean(axis=(0, 1, 2))
  var = stem_out.var(axis=(0, 1, 2))
  stats = new.batch_stats['stem_norm']
  np.testing.assert_allclose(stats['mean'], 0.1 * mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var, rtol=1e-5)

  # BN_2 starts with γ = 0, so each block's product is 0 in the first step.
  # BN_3 therefore receives mean 0 and variance 0.
  for block in ('stage_1_block_1', 'stage_2_block_1'):
    product = new.batch_stats[block]['norm_3']
    np.testing.assert_array_equal(
      product['mean'], np.zeros(product['mean'].shape)
    )
    np.testing.assert_allclose(product['var'], 0.9, rtol=1e-6)

  before = traverse_util.flatten_dict(state.batch_stats)
  after = traverse_util.flatten_dict(new.batch_stats)
  assert all(
    np.all(before[key] != after[key]) for key in before if key[-1] == 'var'
  )


def test_eval_step_reads_but_never_changes_statistics():
  state = new_state()
  batch = random_batch()
  state, _ = jax.jit(steps.train_step)(state, batch, jax.random.key(2))
  before = jax.tree.map(np.asarray, state.batch_stats)
  sums = jax.jit(steps.eval_step)(state, eval_batch(batch))
  chex.assert_trees_all_equal(state.batch_stats, before)
  logits = state.apply_fn(state.variables(), batch['image'], train=False)
  expected = steps.cross_entropy(logits, batch['label']).sum()
  np.testing.assert_allclose(sums['loss_sum'], expected, rtol=1e-6)


def test_eval_uses_running_averages_not_the_batch():
  state = new_state()
  state, _ = jax.jit(steps.train_step)(state, random_batch(), jax.random.key(2))
  images = random_batch(seed=5)['image']
  alone = state.apply_fn(state.variables(), images[:1], train=False)
  together = state.apply_fn(state.variables(), images, train=False)
  np.testing.assert_allclose(alone, together[:1], rtol=1e-5, atol=1e-6)


def test_eval_uses_the_current_parameters():
  state = new_state()
  batch = eval_batch(random_batch())
  first = jax.jit(steps.eval_step)(state, batch)
  state, _ = jax.jit(steps.train_step)(state, random_batch(), jax.random.key(2))
  second = jax.jit(steps.eval_step)(state, batch)
  assert float(first['loss_sum']) != float(second['loss_sum'])
  logits = state.apply_fn(state.variables(), batch['image'], train=False)
  expected = steps.cross_entropy(logits, batch['label']).sum()
  np.testing.assert_allclose(second['loss_sum'], expected, rtol=1e-6)


def test_microbatches_are_refused_with_batch_statistics():
  with pytest.raises(ValueError, match='batch statistics'):
    steps.loss_and_grads(new_state(), random_batch(), jax.random.key(0), 4)
  with pytest.raises(ValueError, match='microbatch size 4 .* batch statistics'):
    steps.resolve_microbatch_size(4, 8, 'cpu', batch_statistics=True)
  assert steps.resolve_microbatch_size(0, 64, 'cpu', True) == 64
  assert steps.resolve_microbatch_size(64, 64, 'cpu', True) == 64


def test_statistics_survive_a_checkpoint(tmp_path):
  state = new_state()
  for seed in range(2):
    state, _ = jax.jit(steps.train_step)(
      state, random_batch(seed=seed), jax.random.key(2)
    )
  config = default_config()
  manager = checkpoints.create_manager(str(tmp_path), 3)
  checkpoints.save(manager, state, config, total_steps=10)
  manager.wait_until_finished()
  restored = checkpoints.restore_latest(
    manager, new_state(seed=7), config, total_steps=10
  )
  manager.close()
  chex.assert_trees_all_equal(restored.batch_stats, state.batch_stats)
  chex.assert_trees_all_equal(restored.params, state.params)


def test_label_smoothing_matches_its_formula():
  logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
  labels = jnp.array([0, 2])
  smoothing = 0.3
  log_probs = jax.nn.log_softmax(logits)
  targets = (1 - smoothing) * jax.nn.one_hot(labels, 3) + smoothing / 3
  expected = -(targets * log_probs).sum(-1)
  np.testing.assert_allclose(
    steps.cross_entropy(logits, labels, smoothing), expected, rtol=1e-6
  )
  np.testing.assert_allclose(
    steps.cross_entropy(logits, labels),
    -jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0],
    rtol=1e-6,
  )


def test_label_smoothing_reaches_the_train_loss():
  state = new_state()
  batch = random_batch()
  plain, _ = steps.loss_and_grads(state, batch, jax.random.key(0))
  smooth, _ = steps.loss_and_grads(
    state, batch, jax.random.key(0), label_smoothing=0.1
  )
  logits, _ = state.apply_fn(
    state.variables(), batch['image'], train=True, mutable=['batch_stats']
  )
  expected = steps.cross_entropy(logits, batch['label'], 0.1).mean()
  np.testing.assert_allclose(smooth['loss'], expected, rtol=1e-5)
  assert float(smooth['loss']) != float(plain['loss'])


@pytest.fixture
def resnet_config(prepared_mnist, mnist_dir, load_experiment):
  config = load_experiment('tiny')
  config.data_dir = str(mnist_dir)
  config.tfds_data_dir = str(Path(prepared_mnist.data_dir).parents[1])
  config.model = 'pi_resnet'
  config.model_kwargs = {'stage_sizes': (1, 1), 'width': 4}
  config.num_train_steps = 3
  config.label_smoothing = 0.1
  return config


def test_resnet_trains_resumes_and_evaluates(resnet_config, tmp_path):
  final = train.train_and_evaluate(resnet_config, str(tmp_path))
  assert final['step'] == 3
  assert np.isfinite(final['eval_loss'])
  resnet_config.num_train_steps = 5
  resumed = train.train_and_evaluate(resnet_config, str(tmp_path))
  assert resumed['step'] == 5


def test_batch_norm_microbatches_config_error(resnet_config, tmp_path):
  resnet_config.microbatch_size = 16
  with pytest.raises(ConfigError, match='microbatch_size=16.*pi_resnet'):
    train.train_and_evaluate(resnet_config, str(tmp_path))


def test_non_finite_step_keeps_the_running_averages():
  state = new_state()
  batch = random_batch()
  state, _ = jax.jit(steps.train_step)(state, batch, jax.random.key(2))
  broken = {**batch, 'image': batch['image'].at[0, 0, 0, 0].set(jnp.inf)}
  new, metrics = jax.jit(steps.train_step)(state, broken, jax.random.key(3))
  assert float(metrics['grads_finite']) == 0.0
  chex.assert_trees_all_equal(new.batch_stats, state.batch_stats)


def test_label_smoothing_change_blocks_resume(resnet_config, tmp_path):
  train.train_and_evaluate(resnet_config, str(tmp_path))
  resnet_config.label_smoothing = 0.0
  resnet_config.num_train_steps = 5
  with pytest.raises(ConfigError, match='label_smoothing'):
    train.train_and_evaluate(resnet_config, str(tmp_path))
