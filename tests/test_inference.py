"""Loading checkpoints for inference, and the preprocessing it applies.

Checkpoints here are written by `pinet_jax.checkpoints.save`, as the
training program writes them, from freshly initialised states.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from pinet_jax import checkpoints, inference, models, preprocessing, steps
from pinet_jax.checkpoints import CheckpointError
from pinet_jax.config import default_config
from pinet_jax.data import pipeline, raw_files

STEP = 5
MODEL_KWARGS = {'width': 8, 'degree': 2, 'normalization': 'last'}


def bn_config(normalize: bool) -> ml_collections.ConfigDict:
  config = default_config()
  config.model = 'ccp_dense'
  config.model_kwargs = ml_collections.ConfigDict(MODEL_KWARGS)
  config.normalize = normalize
  return config


def bn_state(width: int = MODEL_KWARGS['width']) -> steps.TrainState:
  """A ccp_dense state at step STEP with random batch statistics."""
  kwargs = {**MODEL_KWARGS, 'width': width}
  model = models.get_model('ccp_dense', num_classes=10, in_channels=1, **kwargs)
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  leaves, treedef = jax.tree.flatten(state.batch_stats)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  # Positive values, valid as both means and variances, and far from the
  # initial 0 and 1, so a model that ignored them would compute otherwise.
  random = [
    jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
    for key, leaf in zip(keys, leaves, strict=True)
  ]
  return state.replace(
    step=STEP, batch_stats=jax.tree.unflatten(treedef, random)
  )


def save(workdir, state, config):
  manager = checkpoints.create_manager(str(workdir / 'checkpoints'), 3)
  try:
    checkpoints.save(manager, state, config, total_steps=10)
    manager.wait_until_finished()
  finally:
    manager.close()


def file_tree(folder):
  return sorted(
    (str(path.relative_to(folder)), path.stat().st_mtime_ns)
    for path in folder.rglob('*')
  )


@pytest.fixture
def mnist_images(mnist_dir):
  images, labels = raw_files.load_mnist(mnist_dir, 'test')
  return pipeline.SplitArrays(images[:300], labels[:300].astype(np.int32))


def pipeline_inputs(data, normalization):
  batches = pipeline.eval_batches(
    data, batch_size=128, normalization=normalization
  )
  images = np.concatenate([batch['image'] for batch in batches])
  return images[: len(data.labels)]


def test_preprocessing_matches_pipeline_on_mnist(mnist_images):
  statistics = pipeline.normalization_of(mnist_images.images)
  for normalization in (None, statistics):
    expected = pipeline_inputs(mnist_images, normalization)
    got = preprocessing.to_model_input(mnist_images.images, normalization)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_preprocessing_matches_pipeline_on_rgb():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
  data = pipeline.SplitArrays(images, np.zeros(50, np.int32))
  statistics = pipeline.normalization_of(images)
  np.testing.assert_array_equal(
    preprocessing.to_model_input(images, statistics),
    pipeline_inputs(data, statistics),
  )


def test_float_pixels_are_taken_as_scaled():
  pixels = np.array([0.0, 0.25, 1.0], np.float64)
  got = preprocessing.scale_pixels(pixels)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, pixels.astype(np.float32))


@pytest.mark.parametrize(
  ('pixels', 'message'),
  [
    (np.full(3, 255.0), 'divide 0..255 pixels by 255 or pass them as uint8'),
    (np.array([0.5, np.nan]), 'must be finite and in \\[0, 1\\]'),
    (np.array([-1, 3]), 'integer pixels must be in \\[0, 255\\]'),
    (np.array([256, 3]), 'got values in \\[3, 256\\]'),
    (np.array([True, False]), 'got dtype bool'),
  ],
)
def test_scale_pixels_rejects(pixels, message):
  with pytest.raises(ValueError, match=message):
    preprocessing.scale_pixels(pixels)


def test_normalization_json_round_trip_is_exact():
  rng = np.random.default_rng(0)
  mean = rng.uniform(size=3).astype(np.float32)
  std = rng.uniform(0.1, 1.0, size=3).astype(np.float32)
  text = json.dumps(preprocessing.normalization_to_json((mean, std)))
  restored = preprocessing.normalization_from_json(json.loads(text))
  assert restored.mean.dtype == restored.std.dtype == np.float32
  np.testing.assert_array_equal(restored.mean, mean)
  np.testing.assert_array_equal(restored.std, std)


def test_normalization_from_json_rejects_mismatch():
  with pytest.raises(ValueError, match='lists of equal length'):
    preprocessing.normalization_from_json({'mean': [0.1, 0.2], 'std': [1.0]})
  with pytest.raises(ValueError, match='must be {"mean"'):
    preprocessing.normalization_from_json({'mean': [0.1]})


def test_load_model_applies_batch_stats_and_standardisation(tmp_path):
  state = bn_state()
  save(tmp_path, state, bn_config(normalize=True))
  statistics = preprocessing.ChannelStatistics(
    np.array([0.13], np.float32), np.array([0.31], np.float32)
  )
  classifier = inference.load_model(str(tmp_path), normalization=statistics)

  assert classifier.checkpoint.step == STEP
  assert classifier.image_shape == (28, 28, 1)
  assert classifier.class_names == tuple('0123456789')
  for name in ('params', 'batch_stats'):
    jax.tree.map(
      np.testing.assert_array_equal,
      classifier.variables[name],
      getattr(state, name),
    )
  images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), np.uint8)
  inputs = (images.astype(np.float32) / np.float32(255) - 0.13) / 0.31
  logits = state.apply_fn(state.variables(), inputs, train=False)
  np.testing.assert_allclose(classifier.logits(images), logits, rtol=1e-5)
  probabilities = classifier(images)
  np.testing.assert_allclose(
    probabilities, jax.nn.softmax(logits), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-6)


def test_load_model_reads_recorded_statistics(tmp_path):
  """A checkpoint whose metadata records the statistics, as JSON."""
  state = bn_state()
  statistics = (np.array([0.2], np.float32), np.array([0.5], np.float32))
  metadata = {
    'config': bn_config(normalize=True).to_dict(),
    'total_steps': 10,
    'metrics': {},
    'normalization': preprocessing.normalization_to_json(statistics),
  }
  manager = checkpoints.create_manager(str(tmp_path / 'checkpoints'), 3)
  manager.save(
    STEP,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(serialization.to_state_dict(state)),
      metadata=ocp.args.JsonSave(metadata),
    ),
  )
  manager.wait_until_finished()
  manager.close()

  classifier = inference.load_model(str(tmp_path))
  np.testing.assert_array_equal(classifier.normalization.mean, statistics[0])
  np.testing.assert_array_equal(classifier.normalization.std, statistics[1])
  images = np.full((1, 28, 28, 1), 51, np.uint8)
  np.testing.assert_array_equal(
    classifier.preprocess(images), np.full(images.shape, 0.0, np.float32)
  )


def test_load_model_leaves_workdir_unchanged(tmp_path):
  save(tmp_path, bn_state(), bn_config(normalize=False))
  before = file_tree(tmp_path)
  classifier = inference.load_model(str(tmp_path))
  assert classifier.normalization is None
  assert file_tree(tmp_path) == before


def test_checkpoint_steps_and_selection(tmp_path):
  config = bn_config(normalize=False)
  for step in (3, 7, 12):
    save(tmp_path, bn_state().replace(step=step), config)
  assert inference.checkpoint_steps(str(tmp_path)) == [3, 7, 12]
  assert inference.read_checkpoint(str(tmp_path)).step == 12
  assert inference.read_checkpoint(str(tmp_path), 7).step == 7


def test_load_model_rejects_missing_folders(tmp_path):
  missing = tmp_path / 'missing'
  with pytest.raises(
    CheckpointError, match='does not exist or is not a folder'
  ):
    inference.load_model(str(missing))
  assert not missing.exists()
  with pytest.raises(CheckpointError, match='has no checkpoints/ folder'):
    inference.load_model(str(tmp_path))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(CheckpointError, match='no checkpoint in'):
    inference.load_model(str(tmp_path))


def test_load_model_lists_available_steps(tmp_path):
  save(tmp_path, bn_state(), bn_config(normalize=False))
  with pytest.raises(
    CheckpointError,
    match=f'no checkpoint at step 4 .*available steps: \\[{STEP}\\]',
  ):
    inference.load_model(str(tmp_path), step=4)


def test_load_model_checks_normalization_argument(tmp_path):
  save(tmp_path / 'plain', bn_state(), bn_config(normalize=False))
  save(tmp_path / 'normalized', bn_state(), bn_config(normalize=True))
  statistics = (np.zeros(1, np.float32), np.ones(1, np.float32))
  with pytest.raises(CheckpointError, match='pass no normalization'):
    inference.load_model(str(tmp_path / 'plain'), normalization=statistics)
  with pytest.raises(
    CheckpointError, match='does not record the normalisation'
  ):
    inference.load_model(str(tmp_path / 'normalized'))


def test_load_model_rejects_arrays_of_another_model(tmp_path):
  save(tmp_path, bn_state(width=4), bn_config(normalize=False))
  with pytest.raises(CheckpointError, match='do not match model .ccp_dense.'):
    inference.load_model(str(tmp_path))


def test_load_model_reports_unreadable_checkpoint(tmp_path):
  save(tmp_path, bn_state(), bn_config(normalize=False))
  state_dir = tmp_path / 'checkpoints' / str(STEP) / 'state'
  for path in state_dir.iterdir():
    if path.is_dir():
      shutil.rmtree(path)
    elif path.name != 'commit_success.txt':
      os.remove(path)
  with pytest.raises(CheckpointError, match='cannot read checkpoint .*/5: '):
    inference.load_model(str(tmp_path))


def test_classifier_rejects_wrong_image_shape(tmp_path):
  save(tmp_path, bn_state(), bn_config(normalize=False))
  classifier = inference.load_model(str(tmp_path))
  with pytest.raises(
    ValueError, match='must have shape \\(batch, 28, 28, 1\\)'
  ):
    classifier(np.zeros((2, 32, 32, 3), np.uint8))
