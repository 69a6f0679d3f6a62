"""tf.data pipelines that turn a prepared tfds split into numpy batches.

A split is decoded once into memory (MNIST and CIFAR-10 are 47 and 150 MB as
uint8). Each training epoch is then a new tf.data pipeline over those arrays,
shuffled with a seed derived from (seed, epoch). The order therefore changes
every epoch and repeats exactly for the same seed, and any epoch can be
rebuilt without replaying the earlier ones. A resumed run skips the batches
it has already consumed. Augmentation draws from stateless random ops seeded by
(epoch seed, example position), so it is reproducible as well.
"""

import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pinet_jax import preprocessing
from pinet_jax.data.raw_files import DataFileError
from pinet_jax.errors import ConfigError

# Zero padding on each side before the random crop of the augmentation, by
# default: the crop shifts an image by up to this many pixels.
CROP_PADDING = 4
# Threads of the per-example map, and batches prepared ahead. Fixed values
# rather than tf.data.AUTOTUNE: the autotuner's background thread sleeps
# for up to a minute between rounds, and destroying a finished iterator
# waits for it, which stalled every epoch change by 15-30 s on a 2-core
# machine (TensorFlow 2.21).
MAP_THREADS = max(os.cpu_count() or 1, 1)
PREFETCH_BATCHES = 2


def hide_accelerators_from_tensorflow() -> None:
  """Keep TensorFlow off GPUs and TPUs, so JAX keeps all their memory."""
  for device_type in ('GPU', 'TPU'):
    # RuntimeError: TensorFlow already initialised its devices, which
    # happens only if something used TensorFlow before this module.
    # ValueError: this TensorFlow build has no such device type.
    with contextlib.suppress(RuntimeError, ValueError):
      tf.config.set_visible_devices([], device_type)


hide_accelerators_from_tensorflow()


class SplitArrays(NamedTuple):
  """A whole split in memory."""

  images: np.ndarray  # uint8, (N, height, width, channels)
  labels: np.ndarray  # int32, (N,)


# Per-channel statistics of pixels scaled to [0, 1]. Defined where no
# TensorFlow import is needed, so that inference can read them too.
Normalization = preprocessing.ChannelStatistics


def _without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> SplitArrays:
  """Decode the tfds split `split` (slices such as 'train[:10%]' work).

  Raises:
    DataFileError: a file of the prepared dataset is truncated or damaged.
  """
  try:
    images, labels = tfds.as_numpy(
      builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    )
  except tf.errors.DataLossError as error:
    raise DataFileError(
      f'the prepared dataset in {builder.data_dir} is damaged '
      f'({error.message}); delete that folder, and a run with '
      '--config.data_dir prepares it again'
    ) from error
  return SplitArrays(images, labels.astype(np.int32))


def load_checked_split(
  builder: tfds.core.DatasetBuilder, split: str, option: str
) -> SplitArrays:
  """Load the tfds split `split`, which the user chose with `option`.

  Raises:
    ConfigError: the split does not exist or selects no examples; the
      message names `option` and lists the dataset's splits.
  """
  splits = sorted(builder.info.splits)
  try:
    size = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as error:
    message = str(error).replace('\n', ' ')
    raise ConfigError(
      f'invalid {option}={split!r}: {message}; the dataset has splits {splits}'
    ) from error
  if size <= 0:
    raise ConfigError(
      f'{option}={split!r} selects no examples; the dataset has splits {splits}'
    )
  return load_split(builder, split)


def normalization_of(images: np.ndarray) -> Normalization:
  """Return the per-channel mean and standard deviation of `images` / 255.

  Sums are accumulated in float64 over chunks, so CIFAR-10 needs a few MB
  of temporary memory instead of several float64 copies of the split.
  """
  channels = images.shape[-1]
  total = np.zeros(channels)
  total_squares = np.zeros(channels)
  for chunk in np.array_split(images, max(1, len(images) // 4096)):
    pixels = chunk.reshape(-1, channels).astype(np.float64) / 255.0
    total += pixels.sum(axis=0)
    total_squares += np.square(pixels).sum(axis=0)
  count = images.size // channels
  mean = total / count
  variance = np.maximum(total_squares / count - np.square(mean), 0.0)
  return Normalization(
    mean.astype(np.float32), np.sqrt(variance).astype(np.float32)
  )


def epoch_seed(seed: int, epoch: int) -> int:
  """Return the shuffle seed of `epoch`, a pure function of both values."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _to_float(images: tf.Tensor, normalization: Normalization | None):
  images = tf.cast(images, tf.float32) / 255.0
  if normalization is not None:
    images = (images - normalization.mean) / normalization.std
  return images


def _augment(
  image: tf.Tensor, seed: tf.Tensor, padding: int, flip: bool
) -> tf.Tensor:
  """Randomly crop after `padding` zeros per side, then maybe flip.

  The crop shifts the image by up to `padding` pixels in each direction;
  with `flip`, half of the images are also mirrored left-right.
  """
  height, width, channels = image.shape
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  crop_seed, flip_seed = tf.unstack(
    tf.random.experimental.stateless_split(seed, 2)
  )
  image = tf.image.stateless_random_crop(
    padded, (height, width, channels), seed=crop_seed
  )
  if not flip:
    return image
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def num_train_batches(num_examples: int, batch_size: int) -> int:
  """Return the full batches per epoch; the partial last batch is dropped."""
  return num_examples // batch_size


def train_batches(
  data: SplitArrays,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  start_batch: int = 0,
  augment: bool = False,
  crop_padding: int = CROP_PADDING,
  flip: bool = True,
  normalization: Normalization | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yield the training batches of one epoch, from batch `start_batch` on.

  In a run of several processes, each yields its own rows of every batch
  and decodes and augments only those: the examples at positions
  process_index, process_index + process_count, ... of the epoch's order.

  Args:
    data: the training split.
    batch_size: examples per batch. The last partial batch is dropped;
      reshuffling changes which examples fall there.
    seed: the run's seed.
    epoch: zero-based epoch; it selects the shuffle order.
    start_batch: batches of this epoch to skip, to resume mid-epoch.
    augment: apply `_augment` to each example.
    crop_padding: the augmentation's largest shift, in pixels.
    flip: the augmentation also mirrors half of the images; off for
      digits, whose mirror images are not digits.
    normalization: subtract the mean and divide by the std when given.
    process_index: this process's rank.
    process_count: processes that share each batch; it divides batch_size.

  Yields:
    {'image': float32 (rows, H, W, C), 'label': int32 (rows,)}, with
    rows = batch_size / process_count.
  """
  if batch_size % process_count:
    raise ValueError(
      f'batch size {batch_size} does not split evenly across '
      f'{process_count} processes'
    )
  num_examples = len(data.labels)
  shuffle_seed = epoch_seed(seed, epoch)
  dataset = tf.data.Dataset.from_tensor_slices(tuple(data))
  dataset = dataset.shuffle(
    num_examples, seed=shuffle_seed, reshuffle_each_iteration=False
  )
  # Number the examples before skipping, so that an example's augmentation
  # depends on its position in the epoch, not on where a run resumed.
  dataset = dataset.enumerate().skip(start_batch * batch_size)
  dataset = dataset.shard(process_count, process_index)

  def preprocess(position, example):
    image, label = example
    if augment:
      image = _augment(
        image, tf.stack([shuffle_seed, position]), crop_padding, flip
      )
    return {'image': _to_float(image, normalization), 'label': label}

  dataset = dataset.map(
    preprocess, num_parallel_calls=MAP_THREADS, deterministic=True
  )
  dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
  dataset = _without_autotune(dataset.prefetch(PREFETCH_BATCHES))
  yield from tfds.as_numpy(dataset)


def eval_batches(
  data: SplitArrays,
  *,
  batch_size: int,
  normalization: Normalization | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yield every example of `data` once, in batches of exactly `batch_size`.

  The last batch is padded with zeros so that one compiled evaluation step
  serves every batch; its 'mask' is 0 on the padding, 1 elsewhere. In a
  run of several processes, each yields its own rows of every batch: the
  examples process_index, process_index + process_count, ... of `data`,
  and every process yields the same number of batches.

  Yields:
    {'image': float32 (rows, H, W, C), 'label': int32 (rows,),
    'mask': float32 (rows,)}, with rows = batch_size / process_count.
  """
  if batch_size % process_count:
    raise ValueError(
      f'batch size {batch_size} does not split evenly across '
      f'{process_count} processes'
    )
  rows = batch_size // process_count
  num_batches = -(-len(data.labels) // batch_size)
  local = SplitArrays(*(array[process_index::process_count] for array in data))
  dataset = tf.data.Dataset.from_tensor_slices(tuple(local))
  dataset = dataset.map(
    lambda image, label: {
      'image': _to_float(image, normalization),
      'label': label,
    },
    num_parallel_calls=MAP_THREADS,
  )
  dataset = dataset.batch(rows).prefetch(PREFETCH_BATCHES)
  batches = tfds.as_numpy(_without_autotune(dataset))
  empty = {
    'image': np.zeros((0, *data.images.shape[1:]), np.float32),
    'label': np.zeros((0,), np.int32),
  }
  # A process whose share ends a batch early pads one more batch, so that
  # every process runs the same evaluation steps.
  for batch in itertools.islice(
    itertools.chain(batches, itertools.repeat(empty)), num_batches
  ):
    yield _pad_batch(batch, rows)


def _pad_batch(
  batch: dict[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
  size = len(batch['label'])
  padding = batch_size - size
  padded = {
    key: np.pad(value, [(0, padding)] + [(0, 0)] * (value.ndim - 1))
    for key, value in batch.items()
  }
  padded['mask'] = (np.arange(batch_size) < size).astype(np.float32)
  return padded
