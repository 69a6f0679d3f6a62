"""The tf.data pipeline: order, reshuffling, resume, augmentation, padding."""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pinet_jax.data import pipeline
from pinet_jax.data.raw_files import DataFileError


def make_split(num_examples=96, size=8, channels=1):
  # Each image is filled with its own index, so a batch reveals which
  # examples it contains and in which order.
  index = np.arange(num_examples)
  images = np.broadcast_to(
    (index % 256)[:, None, None, None], (num_examples, size, size, channels)
  ).astype(np.uint8)
  return pipeline.SplitArrays(images, (index % 10).astype(np.int32))


def epoch_order(data, epoch, seed=0, batch_size=16, **kwargs):
  batches = pipeline.train_batches(
    data, batch_size=batch_size, seed=seed, epoch=epoch, **kwargs
  )
  return np.concatenate(
    [np.rint(b['image'][:, 0, 0, 0] * 255).astype(int) for b in batches]
  )


def test_train_batch_shapes_and_dtypes():
  batch = next(
    pipeline.train_batches(make_split(), batch_size=16, seed=0, epoch=0)
  )
  assert batch['image'].shape == (16, 8, 8, 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,)
  assert batch['label'].dtype == np.int32
  assert 0.0 <= batch['image'].min() <= batch['image'].max() <= 1.0


def test_same_seed_same_order():
  data = make_split()
  np.testing.assert_array_equal(epoch_order(data, 0), epoch_order(data, 0))


def test_order_changes_every_epoch():
  data = make_split()
  orders = [epoch_order(data, epoch) for epoch in range(3)]
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[1], orders[2])
  # Every epoch is a permutation of all examples (96 = 6 full batches).
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(96))


def test_other_seed_other_order():
  data = make_split()
  assert not np.array_equal(
    epoch_order(data, 0, seed=0), epoch_order(data, 0, seed=1)
  )


def test_partial_batch_is_dropped():
  data = make_split(num_examples=100)
  order = epoch_order(data, 0)
  assert len(order) == 96
  assert len(set(order)) == 96
  assert pipeline.num_train_batches(100, 16) == 6


def test_resume_mid_epoch_continues_same_order():
  data = make_split()
  full = epoch_order(data, 2)
  resumed = epoch_order(data, 2, start_batch=4)
  np.testing.assert_array_equal(resumed, full[4 * 16 :])


def test_augmentation_is_seeded_and_positional():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  data = pipeline.SplitArrays(images, np.zeros(64, np.int32))

  def images_of(epoch, start_batch=0):
    return np.concatenate(
      [
        b['image']
        for b in pipeline.train_batches(
          data,
          batch_size=16,
          seed=0,
          epoch=epoch,
          start_batch=start_batch,
          augment=True,
        )
      ]
    )

  first = images_of(0)
  np.testing.assert_array_equal(first, images_of(0))
  np.testing.assert_array_equal(first[32:], images_of(0, start_batch=2))
  assert first.shape == (64, 8, 8, 3)
  plain = np.concatenate(
    [
      b['image']
      for b in pipeline.train_batches(data, batch_size=16, seed=0, epoch=0)
    ]
  )
  # Same example order, but crops and flips change most images.
  changed = np.mean(np.any(first != plain, axis=(1, 2, 3)))
  assert changed > 0.5


def test_augmented_image_is_a_shifted_or_flipped_original():
  image = np.arange(8 * 8, dtype=np.uint8).reshape(1, 8, 8, 1) + 1
  data = pipeline.SplitArrays(np.repeat(image, 32, 0), np.zeros(32, np.int32))
  batches = pipeline.train_batches(
    data, batch_size=32, seed=3, epoch=0, augment=True
  )
  augmented = np.rint(next(batches)['image'][..., 0] * 255).astype(int)
  padded = np.pad(image[0, :, :, 0].astype(int), pipeline.CROP_PADDING)
  candidates = [
    view[top : top + 8, left : left + 8]
    for view in (padded, padded[:, ::-1])
    for top in range(9)
    for left in range(9)
  ]
  for result in augmented:
    assert any(np.array_equal(result, c) for c in candidates)


@pytest.mark.parametrize('padding', [0, 1, 2])
def test_shift_without_flip_keeps_orientation(padding):
  image = np.arange(8 * 8, dtype=np.uint8).reshape(1, 8, 8, 1) + 1
  data = pipeline.SplitArrays(np.repeat(image, 64, 0), np.zeros(64, np.int32))
  batches = pipeline.train_batches(
    data,
    batch_size=64,
    seed=3,
    epoch=0,
    augment=True,
    crop_padding=padding,
    flip=False,
  )
  augmented = np.rint(next(batches)['image'][..., 0] * 255).astype(int)
  padded = np.pad(image[0, :, :, 0].astype(int), padding)
  shifts = set()
  for result in augmented:
    matches = [
      (top, left)
      for top in range(2 * padding + 1)
      for left in range(2 * padding + 1)
      if np.array_equal(result, padded[top : top + 8, left : left + 8])
    ]
    assert len(matches) == 1
    shifts.add(matches[0])
  # Every image matched one shift within `padding`, and the draws vary:
  # all 9 shifts of padding 1 appear, and at least as many of padding 2.
  assert len(shifts) >= min((2 * padding + 1) ** 2, 9)


def test_normalization_standardises_training_pixels():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 200, (64, 4, 4, 3), dtype=np.uint8)
  data = pipeline.SplitArrays(images, np.zeros(64, np.int32))
  stats = pipeline.normalization_of(images)
  np.testing.assert_allclose(
    stats.mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-6
  )
  batch = next(
    pipeline.train_batches(
      data, batch_size=64, seed=0, epoch=0, normalization=stats
    )
  )
  pixels = batch['image'].reshape(-1, 3)
  np.testing.assert_allclose(pixels.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(pixels.std(0), 1.0, rtol=1e-4)


def test_eval_batches_pad_and_mask_last_batch():
  data = make_split(num_examples=70)
  batches = list(pipeline.eval_batches(data, batch_size=32))
  assert [b['image'].shape[0] for b in batches] == [32, 32, 32]
  assert [int(b['mask'].sum()) for b in batches] == [32, 32, 6]
  last = batches[-1]
  np.testing.assert_array_equal(last['mask'][:6], 1.0)
  np.testing.assert_array_equal(last['mask'][6:], 0.0)
  np.testing.assert_array_equal(last['image'][6:], 0.0)
  seen = np.concatenate(
    [np.rint(b['image'][b['mask'] > 0, 0, 0, 0] * 255) for b in batches]
  )
  # Every example exactly once, in dataset order.
  np.testing.assert_array_equal(seen, np.arange(70))


def test_processes_split_every_training_batch():
  data = make_split()
  options = {'batch_size': 16, 'seed': 3, 'epoch': 1, 'augment': True}
  whole = list(pipeline.train_batches(data, **options, start_batch=2))
  parts = [
    list(
      pipeline.train_batches(
        data, **options, start_batch=2, process_index=rank, process_count=4
      )
    )
    for rank in range(4)
  ]
  assert len(whole) == 4
  assert all(len(batches) == len(whole) for batches in parts)
  for step, batch in enumerate(whole):
    shares = [batches[step] for batches in parts]
    assert all(share['image'].shape == (4, 8, 8, 1) for share in shares)
    # Process r yields rows r, r + 4, ... of the one-process batch, with
    # the same augmentation.
    for rank, share in enumerate(shares):
      np.testing.assert_array_equal(share['image'], batch['image'][rank::4])
      np.testing.assert_array_equal(share['label'], batch['label'][rank::4])


def test_processes_evaluate_every_example_once():
  data = make_split(num_examples=65)
  shares = [
    list(
      pipeline.eval_batches(
        data, batch_size=32, process_index=rank, process_count=4
      )
    )
    for rank in range(4)
  ]
  # 65 examples in batches of 32 take 3 steps. Process 0's 17 examples
  # fill 1 row of its third batch of 8; the others hold 16 examples and
  # pad a third batch of padding only, so that they take the same steps.
  assert [len(batches) for batches in shares] == [3, 3, 3, 3]
  assert [int(batches[-1]['mask'].sum()) for batches in shares] == [1, 0, 0, 0]
  assert all(b['image'].shape[0] == 8 for batches in shares for b in batches)
  seen = np.concatenate(
    [
      np.rint(b['image'][b['mask'] > 0, 0, 0, 0] * 255)
      for batches in shares
      for b in batches
    ]
  )
  np.testing.assert_array_equal(np.sort(seen), np.arange(65))


def test_epoch_seed_is_pure_and_distinct():
  assert pipeline.epoch_seed(0, 1) == pipeline.epoch_seed(0, 1)
  seeds = {
    pipeline.epoch_seed(seed, epoch) for seed in range(3) for epoch in range(10)
  }
  assert len(seeds) == 30


@pytest.mark.parametrize('split,count', [('train', 60_000), ('test', 10_000)])
def test_load_real_mnist_split(prepared_mnist, split, count):
  data = pipeline.load_split(prepared_mnist, split)
  assert data.images.shape == (count, 28, 28, 1)
  assert data.images.dtype == np.uint8
  assert data.labels.dtype == np.int32
  assert set(np.unique(data.labels)) == set(range(10))


def test_truncated_prepared_dataset_is_named(prepared_mnist, tmp_path):
  copy = tmp_path / 'tfds'
  shutil.copytree(prepared_mnist.data_dir, copy / 'local_mnist' / '1.0.0')
  record = (
    copy / 'local_mnist' / '1.0.0' / 'local_mnist-test.tfrecord-00000-of-00001'
  )
  record.write_bytes(record.read_bytes()[:-1000])
  builder = tfds.builder('local_mnist', data_dir=str(copy))
  with pytest.raises(DataFileError) as raised:
    pipeline.load_split(builder, 'test')
  message = str(raised.value)
  assert message.startswith(
    f'the prepared dataset in {copy / "local_mnist" / "1.0.0"} is damaged'
  )
  assert message.endswith(
    'delete that folder, and a run with --config.data_dir prepares it again'
  )
