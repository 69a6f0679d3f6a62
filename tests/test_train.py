"""Training mechanics on real MNIST slices: steps, traces, eval, resume."""

import functools
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pinet_jax import checkpoints, models, optim, steps, train
from pinet_jax import config as config_lib
from pinet_jax.config import default_config
from pinet_jax.data import raw_files
from pinet_jax.errors import ConfigError


def metrics_lines(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def test_train_step_lowers_loss_on_fixed_batch(mnist_dir):
  images, labels = raw_files.load_mnist(mnist_dir, 'test')
  batch = {
    'image': jnp.asarray(images[:32] / 255.0, jnp.float32),
    'label': jnp.asarray(labels[:32], jnp.int32),
  }
  model = models.PolyNet(width=4, formulation='im2col')
  state = steps.create_train_state(
    model, optax.adam(3e-3), (28, 28, 1), jax.random.key(0)
  )
  step_fn = jax.jit(steps.train_step)
  losses = []
  for _ in range(40):
    state, metrics = step_fn(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert int(state.step) == 40
  # A degree-32 polynomial starts with logits near zero (loss ln 10) and
  # needs some steps to leave that plateau; 40 steps reach about 1.5.
  np.testing.assert_allclose(losses[0], np.log(10), rtol=0.01)
  assert losses[-1] < 0.8 * losses[0]


def mnist_batch(mnist_dir, size):
  images, labels = raw_files.load_mnist(mnist_dir, 'test')
  return {
    'image': jnp.asarray(images[:size] / 255.0, jnp.float32),
    'label': jnp.asarray(labels[:size], jnp.int32),
  }


@pytest.mark.parametrize('microbatch_size', [8, 16, 32])
def test_microbatches_give_the_whole_batch_gradients(
  mnist_dir, microbatch_size
):
  batch = mnist_batch(mnist_dir, 64)
  model = models.PolyNet(width=8, formulation='s2d')
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(3)
  )
  rng = jax.random.key(4)
  whole_metrics, whole = jax.jit(steps.loss_and_grads)(state, batch, rng)
  split = functools.partial(
    steps.loss_and_grads, microbatch_size=microbatch_size
  )
  # The option must really loop over microbatches, not fall back.
  assert 'stablehlo.while' in jax.jit(split).lower(state, batch, rng).as_text()
  metrics, grads = jax.jit(split)(state, batch, rng)

  np.testing.assert_allclose(metrics['loss'], whole_metrics['loss'], rtol=1e-6)
  assert float(metrics['accuracy']) == float(whole_metrics['accuracy'])
  for path, leaf in jax.tree_util.tree_leaves_with_path(whole):
    scale = float(jnp.max(jnp.abs(leaf)))
    assert scale > 0, path
    got = functools.reduce(lambda tree, key: tree[key.key], path, grads)
    np.testing.assert_allclose(got, leaf, rtol=0, atol=1e-5 * scale)


def test_microbatched_eval_equals_whole_batch():
  model = models.PolyNet(width=4, formulation='s2d')
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  batch = {
    'image': jax.random.uniform(jax.random.key(2), (8, 28, 28, 1)),
    'label': jnp.arange(8) % 10,
    'mask': jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32),
  }
  whole = steps.eval_step(state, batch)
  parts = steps.eval_step(state, batch, microbatch_size=2)
  np.testing.assert_allclose(parts['loss_sum'], whole['loss_sum'], rtol=1e-6)
  assert float(parts['correct']) == float(whole['correct'])
  assert float(parts['count']) == 6.0


def zero_batch_setup():
  """Return a width-4 PolyNet state and an all-zero eval batch of 8."""
  model = models.PolyNet(width=4, formulation='s2d')
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  batch = {
    'image': jnp.zeros((8, 28, 28, 1)),
    'label': jnp.zeros(8, jnp.int32),
    'mask': jnp.ones(8),
  }
  return state, batch


def test_microbatched_eval_loops_under_jit():
  state, batch = zero_batch_setup()
  step = jax.jit(steps.eval_step, static_argnames='microbatch_size')
  assert 'stablehlo.while' in step.lower(state, batch, 4).as_text()
  assert 'stablehlo.while' not in step.lower(state, batch, 8).as_text()


@pytest.mark.parametrize('function', ['loss_and_grads', 'eval_step'])
@pytest.mark.parametrize('size', [0, 3, -4])
def test_steps_reject_invalid_microbatch_size(function, size):
  state, batch = zero_batch_setup()
  args = (jax.random.key(1),) if function == 'loss_and_grads' else ()
  with pytest.raises(ValueError, match=f'microbatch_size={size} must be a'):
    getattr(steps, function)(state, batch, *args, microbatch_size=size)


def test_traced_microbatch_size_is_rejected():
  state, batch = zero_batch_setup()
  with pytest.raises(TypeError, match="static_argnames='microbatch_size'"):
    jax.jit(steps.train_step)(state, batch, jax.random.key(1), 4)


def test_microbatches_work_in_float64():
  with jax.enable_x64(True):
    model = models.PolyNet(width=4, formulation='s2d', dtype=jnp.float64)
    state = steps.create_train_state(
      model, optax.sgd(0.1), (28, 28, 1), jax.random.key(0)
    )
    batch = {
      'image': jnp.full((8, 28, 28, 1), 0.5, jnp.float64),
      'label': jnp.arange(8) % 10,
    }
    whole, whole_grads = steps.loss_and_grads(state, batch, jax.random.key(1))
    parts, grads = steps.loss_and_grads(
      state, batch, jax.random.key(1), microbatch_size=2
    )
  # The loss is float64; the gradients keep the float32 parameters' dtype.
  assert parts['loss'].dtype == jnp.float64
  np.testing.assert_allclose(parts['loss'], whole['loss'], rtol=1e-12)
  chex.assert_trees_all_close(grads, whole_grads, rtol=1e-5, atol=1e-9)


def test_explicit_microbatch_size_trains(tiny_config, tmp_path):
  tiny_config.microbatch_size = 32
  tiny_config.num_train_steps = 3
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert final['step'] == 3
  assert np.isfinite(final['eval_loss'])


@pytest.mark.parametrize(
  'requested, batch_size, platform, expected',
  [
    (0, 128, 'cpu', 16),
    (0, 1000, 'cpu', 10),
    (0, 96, 'cpu', 16),
    (0, 36, 'cpu', 12),
    (0, 7, 'cpu', 7),
    (0, 128, 'gpu', 128),
    (0, 128, 'tpu', 128),
    (32, 128, 'cpu', 32),
    (32, 128, 'gpu', 32),
    (128, 128, 'cpu', 128),
  ],
)
def test_resolve_microbatch_size(requested, batch_size, platform, expected):
  assert (
    steps.resolve_microbatch_size(requested, batch_size, platform) == expected
  )


@pytest.mark.parametrize(
  'requested, batch_size, platform, expected',
  [
    (0, 128, 'cpu', 128),
    (0, 256, 'cpu', 128),
    (0, 1000, 'cpu', 1000),
    (0, 128, 'tpu', 128),
    (64, 128, 'cpu', 64),
  ],
)
def test_resolve_microbatch_size_on_eight_devices(
  requested, batch_size, platform, expected
):
  # The size counts all devices together; on CPU each device's share of a
  # microbatch is chosen as on one device.
  resolved = steps.resolve_microbatch_size(
    requested, batch_size, platform, devices=8
  )
  assert resolved == expected


def test_microbatch_shared_by_devices_must_split_evenly():
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    steps.resolve_microbatch_size(4, 128, 'cpu', devices=8)


def test_microbatches_take_strided_examples():
  # With the batch in consecutive blocks across devices, strided
  # microbatches take an equal share from every block.
  batch = {'image': jnp.arange(12.0).reshape(12, 1), 'label': jnp.arange(12)}
  parts = steps._split_batch(batch, 4)
  np.testing.assert_array_equal(parts['label'][1], [1, 4, 7, 10])
  np.testing.assert_array_equal(
    steps._merge_microbatches(parts['image']), batch['image']
  )


@pytest.mark.parametrize('requested', [-1, 5, 256])
def test_resolve_microbatch_size_rejects_non_divisors(requested):
  with pytest.raises(ValueError, match=f'microbatch size {requested} must'):
    steps.resolve_microbatch_size(requested, 128, 'cpu')


def test_eval_step_ignores_masked_examples():
  model = models.PolyNet(width=4)
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  images = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10
  full = steps.eval_step(
    state, {'image': images[:5], 'label': labels[:5], 'mask': jnp.ones(5)}
  )
  padded = steps.eval_step(
    state,
    {
      'image': images,
      'label': labels,
      'mask': jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32),
    },
  )
  assert float(padded['count']) == 5.0
  np.testing.assert_allclose(padded['loss_sum'], full['loss_sum'], rtol=1e-6)
  assert float(padded['correct']) == float(full['correct'])


def test_steps_compile_once_with_partial_batches(
  tiny_config, tmp_path, monkeypatch
):
  # 1000 training examples in batches of 64 leave a partial batch of 40
  # that is dropped; 500 evaluation examples in batches of 128 end in a
  # padded batch of 116. Two epochs and two evaluations, one trace each.
  monkeypatch.setattr(
    steps, 'train_step', chex.assert_max_traces(steps.train_step, n=1)
  )
  monkeypatch.setattr(
    steps, 'eval_step', chex.assert_max_traces(steps.eval_step, n=1)
  )
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert final['step'] == 2 * (1000 // 64)
  assert final['eval_count'] == 500


def test_eval_counts_every_test_example(tiny_config, tmp_path):
  tiny_config.eval_split = 'test'
  tiny_config.eval_batch_size = 768  # 10,000 = 13 * 768 + 16
  tiny_config.num_train_steps = 1
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert final['eval_count'] == 10_000


def test_checkpoints_saved_each_epoch_and_pruned(tiny_config, tmp_path):
  tiny_config.num_epochs = 4
  tiny_config.keep_checkpoints = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  manager = checkpoints.create_manager(str(tmp_path / 'checkpoints'), 2)
  assert manager.all_steps() == [45, 60]
  manager.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  evals = [line for line in lines if 'eval_accuracy' in line]
  assert len(evals) == 4


def test_finished_run_only_evaluates_again(tiny_config, tmp_path):
  first = train.train_and_evaluate(tiny_config, str(tmp_path))
  lines_before = len(metrics_lines(tmp_path))
  again = train.train_and_evaluate(tiny_config, str(tmp_path))
  added = metrics_lines(tmp_path)[lines_before:]
  # The session's start record, one evaluation record and no training one.
  assert [line.get('event') for line in added] == ['start', None]
  assert sorted(added[1]) == sorted([*first, 'time'])
  assert again == first


def test_checkpoint_round_trip_is_exact(tmp_path):
  model = models.PolyNet(width=4)
  optimizer = optax.adam(1e-3)
  state = steps.create_train_state(
    model, optimizer, (28, 28, 1), jax.random.key(0)
  )
  batch = {
    'image': jax.random.uniform(jax.random.key(1), (8, 28, 28, 1)),
    'label': jnp.arange(8, dtype=jnp.int32),
  }
  for _ in range(3):
    state, _ = jax.jit(steps.train_step)(state, batch, jax.random.key(2))
  config = default_config()
  manager = checkpoints.create_manager(str(tmp_path), 3)
  checkpoints.save(manager, state, config, total_steps=10)
  manager.wait_until_finished()
  # The template comes from another key, so nothing of it may survive.
  template = steps.create_train_state(
    model, optimizer, (28, 28, 1), jax.random.key(9)
  )
  restored = checkpoints.restore_latest(
    manager, template, config, total_steps=10
  )
  manager.close()
  assert int(restored.step) == 3
  chex.assert_trees_all_equal(restored.params, state.params)
  chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
  assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)


def test_saving_an_existing_step_keeps_it(tmp_path):
  model = models.PolyNet(width=4)
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  manager = checkpoints.create_manager(str(tmp_path), 3)
  checkpoints.save(manager, state, default_config(), 10, {'a': 1.0})
  checkpoints.save(manager, state, default_config(), 10, {'a': 2.0})
  manager.wait_until_finished()
  assert manager.all_steps() == [0]
  manager.close()


def test_schedule_length_change_is_rejected_on_resume(tiny_config, tmp_path):
  tiny_config.schedule = 'cosine'
  tiny_config.num_train_steps = 5
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.num_train_steps = 10
  with pytest.raises(ConfigError, match='run of 5 steps.*gives 10'):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_constant_schedule_run_can_be_extended(tiny_config, tmp_path):
  tiny_config.num_train_steps = 5
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.num_train_steps = 8
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert final['step'] == 8


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('train_split', 'trian', "train_split='trian'.*Unknown split"),
    ('eval_split', 'test[:0]', r"eval_split='test\[:0\]' selects no"),
    ('eval_split', 'test[:abc]', 'invalid --config.eval_split'),
    ('model_kwargs.init_scheme', 'xavier', 'model_kwargs.*xavier'),
    ('model_kwargs.formulation', 'fft', 'model_kwargs.*fft'),
    (
      'microbatch_size',
      48,
      r'microbatch_size=48 must be 0 \(automatic\) or a positive divisor '
      r'of --config.batch_size=64',
    ),
    ('microbatch_size', -16, r'microbatch_size=-16 must be 0'),
  ],
)
def test_invalid_value_is_config_error(
  tiny_config, tmp_path, field, value, message
):
  section, _, name = field.rpartition('.')
  target = tiny_config[section] if section else tiny_config
  target[name] = value
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_local_training_opens_no_socket(tiny_config, tmp_path, no_network):
  # Checking the raw files against the prepared dataset, training,
  # evaluating and checkpointing. test_builders covers preparing.
  tiny_config.num_train_steps = 3
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert final['step'] == 3
  assert no_network == []


def test_rejected_run_leaves_no_folders(tiny_config, tmp_path):
  tiny_config.model_kwargs.num_classes = 5
  workdir = tmp_path / 'new' / 'run'
  with pytest.raises(ConfigError, match='num_classes=5'):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert list(tmp_path.iterdir()) == []


def test_step_schedule_decays_at_fractions_of_the_run():
  config = default_config()
  config.schedule = 'step'
  config.learning_rate = 0.1
  config.decay_fractions = (1 / 3, 1 / 2, 2 / 3, 5 / 6)
  # 120 epochs of 390 steps: the rate drops at epochs 40, 60, 80 and 100.
  schedule = optim.learning_rate_schedule(config, 120 * 390)
  rates = [float(schedule(epoch * 390)) for epoch in (0, 39, 40, 60, 80, 100)]
  np.testing.assert_allclose(
    rates, [0.1, 0.1, 0.01, 0.001, 1e-4, 1e-5], rtol=1e-6
  )


@pytest.mark.parametrize(
  'fractions, message',
  [
    ((), 'needs --config.decay_fractions'),
    ((0.5, 0.25), 'increasing'),
    ((0.5, 1.0), 'in (0, 1)'),
  ],
)
def test_step_schedule_needs_increasing_fractions(fractions, message):
  config = default_config()
  config.schedule = 'step'
  config.decay_fractions = fractions
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.validate(config)


def test_clipping_scales_large_gradients():
  config = default_config()
  config.optimizer = 'sgd'
  config.momentum = 0.0
  config.learning_rate = 1.0
  config.grad_clip_norm = 2.0
  params = {'a': jnp.zeros(3), 'b': jnp.zeros(())}
  optimizer = optim.create_optimizer(config, 10)
  state = optimizer.init(params)
  # Global norm 10: scaled to norm 2. Norm 1: left as it is.
  large = {'a': jnp.array([6.0, 0.0, 0.0]), 'b': jnp.array(8.0)}
  small = {'a': jnp.array([0.6, 0.0, 0.0]), 'b': jnp.array(0.8)}
  for grads, scale in ((large, 0.2), (small, 1.0)):
    updates, _ = optimizer.update(grads, state, params)
    chex.assert_trees_all_close(
      updates, jax.tree.map(lambda g, s=scale: -s * g, grads), rtol=1e-6
    )


def test_no_clipping_keeps_optimizer_state():
  # Without clipping the state is the bare optimiser's, so checkpoints
  # written before the option existed still restore.
  config = default_config()
  params = {'w': jnp.ones((2, 2))}
  plain = optax.adam(optim.learning_rate_schedule(config, 10)).init(params)
  chex.assert_trees_all_equal_structs(
    optim.create_optimizer(config, 10).init(params), plain
  )
  config.grad_clip_norm = 1.0
  clipped = optim.create_optimizer(config, 10).init(params)
  assert jax.tree.structure(clipped) != jax.tree.structure(plain)


def test_negative_clip_norm_rejected():
  config = default_config()
  config.grad_clip_norm = -1.0
  message = r'grad_clip_norm must be >= 0.*got -1\.0'
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_logged_learning_rate_follows_the_schedule(tiny_config, tmp_path):
  tiny_config.schedule = 'cosine'
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, str(tmp_path))
  schedule = optim.learning_rate_schedule(tiny_config, 10)
  logged = [line for line in metrics_lines(tmp_path) if 'train_loss' in line]
  assert [line['step'] for line in logged] == [5, 10]
  # The update to step s used the rate the schedule gives at s - 1.
  assert [line['learning_rate'] for line in logged] == [
    float(schedule(4)),
    float(schedule(9)),
  ]
