"""The divergence guard and skipping of non-finite updates."""

import functools
import gzip
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pinet_jax import checkpoints, divergence, models, optim, steps, train
from pinet_jax.config import default_config
from pinet_jax.data import pipeline, raw_files, sources

from conftest import idx_bytes, restore_latest_state

NAN = float('nan')


def record(loss, grads_finite=True, consecutive=None):
  values = {'loss': loss, 'grads_finite': float(grads_finite)}
  if consecutive is not None:
    values['consecutive_nonfinite'] = consecutive
  return values


@pytest.mark.parametrize(
  'records, max_skips, expected',
  [
    ([record(2.3), record(2.2)], None, None),
    ([record(2.3), record(NAN, False)], None, (11, False, 0)),
    ([record(math.inf), record(NAN, False)], None, (10, True, 0)),
    # Skipped updates up to the limit pass, the one past it stops.
    ([record(NAN, False, 1), record(NAN, False, 2)], 2, None),
    ([record(NAN, False, 2), record(NAN, False, 3)], 2, (11, False, 3)),
    # A non-finite loss with finite gradients is applied, so it stops.
    ([record(2.3, True, 0), record(math.inf, True, 0)], 2, (11, True, 0)),
  ],
)
def test_find_divergence(records, max_skips, expected):
  found = divergence.find_divergence(records, 10, max_skips)
  if expected is None:
    assert found is None
  else:
    step, grads_finite, consecutive = expected
    assert found.step == step
    assert found.grads_finite == grads_finite
    assert found.consecutive_nonfinite == consecutive


def test_describe_names_step_block_and_checkpoint():
  found = divergence.Divergence(
    step=17, loss=NAN, grads_finite=False, consecutive_nonfinite=0
  )
  rms = {'block_1': 1.0, 'block_2': 3e30, 'block_3': math.inf, 'head': NAN}
  message = divergence.describe(
    found, rms, 15, kept_step=15, max_consecutive_skips=None
  )
  assert message.startswith('training diverged at step 17 (epoch 2): ')
  assert 'block_3 is the first block whose activations overflowed' in message
  assert 'block_2 3e+30, block_3 inf, head nan' in message
  assert 'The last checkpoint, step 15, is kept.' in message
  assert '--config.skip_nonfinite_updates=True' in message
  assert '\n' not in message


def test_skipped_update_leaves_state_unchanged():
  config = default_config()
  config.skip_nonfinite_updates = True
  model = models.PolyNet(width=4)
  state = steps.create_train_state(
    model, optim.create_optimizer(config, 10), (28, 28, 1), jax.random.key(0)
  )
  good = {
    'image': jax.random.uniform(jax.random.key(1), (8, 28, 28, 1)),
    'label': jnp.arange(8) % 10,
  }
  bad = {**good, 'image': good['image'].at[0, 0, 0, 0].set(jnp.nan)}
  step = jax.jit(steps.train_step)

  skipped, metrics = step(state, bad, jax.random.key(2))
  assert float(metrics['grads_finite']) == 0.0
  assert int(skipped.step) == 1
  chex.assert_trees_all_equal(skipped.params, state.params)
  chex.assert_trees_all_equal(
    skipped.opt_state.inner_state, state.opt_state.inner_state
  )
  assert optim.skip_counters(skipped.opt_state) == {
    'nonfinite_updates': 1,
    'consecutive_nonfinite': 1,
  }

  applied, metrics = step(skipped, good, jax.random.key(2))
  assert float(metrics['grads_finite']) == 1.0
  assert int(applied.step) == 2
  assert not np.array_equal(
    applied.params['head']['kernel'], state.params['head']['kernel']
  )
  assert optim.skip_counters(applied.opt_state) == {
    'nonfinite_updates': 1,
    'consecutive_nonfinite': 0,
  }


def first_overflowing_block_after_one_step(config):
  """Train one step as the loop does; return the block that step 2 overflows."""
  builder = sources.get_builder(config)
  data = pipeline.load_split(builder, config.train_split)
  first, second = list(
    pipeline.train_batches(
      data, batch_size=config.batch_size, seed=config.seed, epoch=0
    )
  )[:2]
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  model = models.get_model(
    config.model, num_classes=10, in_channels=1, **config.model_kwargs
  )
  state = steps.create_train_state(
    model, optim.create_optimizer(config, 30), (28, 28, 1), init_rng
  )
  microbatch = steps.resolve_microbatch_size(
    0, config.batch_size, jax.default_backend()
  )
  step = jax.jit(
    functools.partial(steps.train_step, microbatch_size=microbatch)
  )
  state, _ = step(state, first, step_rng)
  rms = models.activation_rms(
    model, state.variables(), jnp.asarray(second['image']), train=True
  )
  return divergence.first_overflowing_block(rms)


def test_divergence_names_step_and_block(tiny_config, tmp_path):
  # A learning rate of 1e4 makes step 2 overflow the degree-32 polynomial.
  tiny_config.learning_rate = 1e4
  tiny_config.checkpoint_every_steps = 1
  block = first_overflowing_block_after_one_step(tiny_config)
  assert block is not None
  with pytest.raises(divergence.DivergenceError) as raised:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  message = str(raised.value)
  assert message.startswith('training diverged at step 2 (epoch 1): ')
  assert f'{block} is the first block whose activations overflowed' in message
  assert 'The last checkpoint, step 1, is kept.' in message
  folder = str(tmp_path / 'checkpoints')
  assert checkpoints.latest_complete_step(folder) == 1
  kept = checkpoints.read_state_arrays(folder, 1)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(kept))


def test_skip_limit_stops_training(tiny_config, tmp_path):
  # With lr 1 every step after the first overflows; two skips are allowed.
  tiny_config.learning_rate = 1.0
  tiny_config.skip_nonfinite_updates = True
  tiny_config.max_consecutive_skips = 2
  tiny_config.checkpoint_every_steps = 1
  with pytest.raises(divergence.DivergenceError) as raised:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  message = str(raised.value)
  assert message.startswith('training diverged at step 4 (epoch 1): ')
  assert '3 steps in a row had non-finite gradients' in message
  assert 'max_consecutive_skips=2' in message
  folder = str(tmp_path / 'checkpoints')
  assert checkpoints.latest_complete_step(folder) == 3
  after_one = checkpoints.read_state_arrays(folder, 1)
  after_three = checkpoints.read_state_arrays(folder, 3)
  # Steps 2 and 3 were skipped: the parameters did not move.
  chex.assert_trees_all_equal(after_three['params'], after_one['params'])
  assert int(after_three['step']) == 3
  assert int(after_three['opt_state']['total_notfinite']) == 2
  assert int(after_three['opt_state']['notfinite_count']) == 2


# A few training images with a bright 3x3 patch among black ones. Standardised
# by the training set's tiny pixel variance, the patch reaches about 170,
# which overflows the degree-32 polynomial, while black pixels become -0.006.
BRIGHT_SIZES = {'train': 1024, 'test': 16}
BRIGHT_IMAGES = (5, 400, 777)
BRIGHT_LABEL = 9


@pytest.fixture
def rare_bright_mnist(tmp_path, monkeypatch):
  """MNIST-format files whose rare bright images make a step overflow."""
  monkeypatch.setattr(raw_files, 'MNIST_SPLIT_SIZES', BRIGHT_SIZES)
  rng = np.random.default_rng(0)
  images = np.zeros((BRIGHT_SIZES['train'], 28, 28), np.uint8)
  labels = rng.integers(0, BRIGHT_LABEL, BRIGHT_SIZES['train']).astype(np.uint8)
  for index in BRIGHT_IMAGES:
    images[index, 12:15, 12:15] = 255
    labels[index] = BRIGHT_LABEL
  test_images = np.zeros((BRIGHT_SIZES['test'], 28, 28), np.uint8)
  test_labels = np.zeros(BRIGHT_SIZES['test'], np.uint8)
  directory = tmp_path / 'raw'
  directory.mkdir()
  arrays = {'train': (images, labels), 'test': (test_images, test_labels)}
  for split, names in raw_files.MNIST_FILES.items():
    for name, array in zip(names, arrays[split], strict=True):
      (directory / f'{name}.gz').write_bytes(gzip.compress(idx_bytes(array)))
  config = default_config()
  config.data_dir = str(directory)
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.model_kwargs.width = 4
  config.normalize = True
  config.batch_size = 32
  config.eval_batch_size = 16
  config.log_every_steps = 8
  config.skip_nonfinite_updates = True
  return config


def batches_with_bright_image(config, epochs):
  data = pipeline.load_split(sources.get_builder(config), 'train')
  return sum(
    bool(np.any(batch['label'] == BRIGHT_LABEL))
    for epoch in range(epochs)
    for batch in pipeline.train_batches(
      data, batch_size=config.batch_size, seed=config.seed, epoch=epoch
    )
  )


def last_skipped_count(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return [r['skipped_updates'] for r in records if 'train_loss' in r][-1]


def test_skipped_updates_survive_resume(rare_bright_mnist, tmp_path):
  config = rare_bright_mnist
  total = 2 * BRIGHT_SIZES['train'] // config.batch_size
  config.num_train_steps = total
  final = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  expected = batches_with_bright_image(config, epochs=2)
  assert expected >= 2
  assert final['step'] == total
  assert math.isfinite(final['eval_loss'])
  assert last_skipped_count(tmp_path / 'straight') == expected

  # Stop in the middle of the second epoch, then resume.
  config.num_train_steps = total - 10
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  config.num_train_steps = total
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert last_skipped_count(tmp_path / 'resumed') == expected

  straight = restore_latest_state(tmp_path / 'straight', config, total)
  resumed = restore_latest_state(tmp_path / 'resumed', config, total)
  # The step counts every batch; the skipped updates are counted apart.
  assert int(resumed.step) == total
  assert int(resumed.opt_state.total_notfinite) == expected
  chex.assert_trees_all_equal(straight.params, resumed.params)
  chex.assert_trees_all_equal(straight.opt_state, resumed.opt_state)
