"""Tests for the local tfds builders and `prepare_local`.

Tiny raw files cover preparing, reuse, mismatched sources and interrupted
runs quickly. The real files, prepared once per session, must give tfds's
features, split sizes and the parsed arrays back.
"""

import gzip
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pinet_jax.data import builders, raw_files
from pinet_jax.data.raw_files import DataFileError

from conftest import idx_bytes


def as_numpy_examples(builder, split: str) -> list[dict]:
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def sorted_pairs(images: np.ndarray, labels: np.ndarray) -> list:
  """Return (image bytes, label) pairs in a canonical order."""
  return sorted(
    zip((image.tobytes() for image in images), labels.tolist(), strict=True)
  )


# Features, compared with tfds's own builders without preparing them.


@pytest.mark.parametrize(
  ('ours', 'theirs'),
  [(builders.LocalMnist, 'mnist'), (builders.LocalCifar10, 'cifar10')],
)
def test_features_equal_tfds(ours, theirs, tmp_path):
  local = ours(data_dir=tmp_path).info
  official = tfds.builder(theirs, data_dir=tmp_path).info
  assert local.features.to_json() == official.features.to_json()
  assert repr(local.features) == repr(official.features)
  assert local.features.dtype == official.features.dtype
  assert local.features.shape == official.features.shape
  assert local.supervised_keys == official.supervised_keys


def test_cifar10_label_names(tmp_path):
  # tfds's cifar10 only learns its names while preparing, from the same
  # batches.meta.txt, so they are compared with the publisher's list here.
  features = builders.LocalCifar10(data_dir=tmp_path).info.features
  assert features['label'].names == [
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
  ]


def test_builders_registered(tmp_path):
  registered = tfds.list_builders(with_community_datasets=False)
  assert 'local_mnist' in registered
  assert 'local_cifar10' in registered
  assert isinstance(
    tfds.builder('local_mnist', data_dir=tmp_path), builders.LocalMnist
  )
  assert str(builders.LocalMnist.VERSION) == '1.0.0'
  assert str(builders.LocalCifar10.VERSION) == '1.0.0'


def test_manual_instructions_name_files():
  for names in raw_files.MNIST_FILES.values():
    for name in names:
      assert name in builders.LocalMnist.MANUAL_DOWNLOAD_INSTRUCTIONS
  instructions = builders.LocalCifar10.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert raw_files.CIFAR10_ARCHIVE in instructions
  assert 'data_batch_5.bin' in instructions
  assert 'test_batch.bin' in instructions


# prepare_local on tiny files.


def test_prepare_tiny_mnist_round_trip(tiny_mnist, tmp_path, no_network):
  builder = builders.prepare_local(
    'mnist', tiny_mnist.directory, tmp_path / 'tfds'
  )
  assert no_network == []
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.splits['test'].num_examples == 2
  for split, (images, labels) in tiny_mnist.splits.items():
    examples = as_numpy_examples(builder, split)
    got_images = np.stack([example['image'] for example in examples])
    got_labels = np.array([example['label'] for example in examples])
    assert sorted_pairs(got_images, got_labels) == sorted_pairs(images, labels)


@pytest.mark.parametrize('pass_archive_path', [False, True])
def test_prepare_tiny_cifar10_archive(
  tiny_cifar10, tmp_path, no_network, pass_archive_path
):
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  raw_dir = tmp_path / 'archive_only'
  raw_dir.mkdir()
  # Any name works when the archive's own path is passed.
  archive_name = (
    'cifar10.tgz' if pass_archive_path else raw_files.CIFAR10_ARCHIVE
  )
  archive = raw_dir / archive_name
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(batches, arcname=raw_files.CIFAR10_FOLDER)

  raw_path = archive if pass_archive_path else raw_dir
  builder = builders.prepare_local('cifar10', raw_path, tmp_path / 'tfds')
  assert no_network == []
  for split, (images, labels) in tiny_cifar10.splits.items():
    examples = as_numpy_examples(builder, split)
    ids = sorted(example['id'].decode() for example in examples)
    assert ids == [f'{split}_{index:05d}' for index in range(len(labels))]
    for example in examples:
      index = int(example['id'].decode().split('_')[1])
      np.testing.assert_array_equal(example['image'], images[index])
      assert example['label'] == labels[index]


def test_prepare_reuses_prepared_data(tiny_mnist, tmp_path):
  data_dir = tmp_path / 'tfds'
  first = builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  info_file = Path(first.data_path) / 'dataset_info.json'
  written = info_file.stat().st_mtime_ns
  second = builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  assert second.data_path == first.data_path
  assert info_file.stat().st_mtime_ns == written


def test_prepare_reuses_same_data_other_layout(tiny_mnist, tmp_path):
  data_dir = tmp_path / 'tfds'
  builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  plain = tmp_path / 'plain'
  plain.mkdir()
  for path in tiny_mnist.directory.iterdir():
    (plain / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
  builder = builders.prepare_local('mnist', plain, data_dir)
  assert builder.is_prepared()


def test_prepare_rejects_other_source(tiny_mnist, tmp_path):
  data_dir = tmp_path / 'tfds'
  builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  labels_path = tiny_mnist.directory / 'train-labels-idx1-ubyte.gz'
  labels = tiny_mnist.splits['train'][1]
  changed = ((labels + 1) % 10).astype(np.uint8)
  labels_path.write_bytes(gzip.compress(idx_bytes(changed)))
  with pytest.raises(DataFileError) as error:
    builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  message = str(error.value)
  assert str(data_dir / 'local_mnist' / '1.0.0') in message
  assert str(tiny_mnist.directory) in message
  assert 'Delete' in message


def test_prepare_bad_file_writes_nothing(tiny_mnist, tmp_path):
  path = tiny_mnist.directory / 't10k-images-idx3-ubyte.gz'
  path.write_bytes(path.read_bytes()[:20])
  data_dir = tmp_path / 'tfds'
  with pytest.raises(DataFileError, match=re.escape(str(path))):
    builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  assert not data_dir.exists()


def test_prepare_unknown_name(tmp_path):
  with pytest.raises(ValueError, match="'svhn'") as error:
    builders.prepare_local('svhn', tmp_path, tmp_path / 'tfds')
  assert "['mnist', 'cifar10']" in str(error.value)


def test_prepare_mnist_raw_path_invalid(tiny_mnist, tmp_path):
  raw_file = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  with pytest.raises(DataFileError, match='is not a folder'):
    builders.prepare_local('mnist', raw_file, tmp_path / 'tfds')
  with pytest.raises(DataFileError, match='does not exist'):
    builders.prepare_local('mnist', tmp_path / 'absent', tmp_path / 'tfds')
  assert not (tmp_path / 'tfds').exists()


def test_prepare_wrong_cifar10_class_names(tiny_cifar10, tmp_path):
  meta = (
    tiny_cifar10.directory
    / raw_files.CIFAR10_FOLDER
    / raw_files.CIFAR10_META_FILE
  )
  names = list(raw_files.CIFAR10_CLASS_NAMES)
  names[0], names[1] = names[1], names[0]
  meta.write_text('\n'.join(names))
  with pytest.raises(DataFileError, match='airplane') as error:
    builders.prepare_local('cifar10', tiny_cifar10.directory, tmp_path / 'x')
  assert raw_files.CIFAR10_META_FILE in str(error.value)


def test_prepare_after_interrupted_run(tiny_mnist, tmp_path, monkeypatch):
  data_dir = tmp_path / 'tfds'
  calls = []

  def fail_on_second_example(self, split, index, image, label):
    calls.append(index)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return {'image': image, 'label': label}

  with monkeypatch.context() as patch:
    patch.setattr(builders.LocalMnist, '_example', fail_on_second_example)
    with pytest.raises(KeyboardInterrupt):
      builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  # tfds removes its temporary folder when preparing raises.
  assert list((data_dir / 'local_mnist').iterdir()) == []

  builder = builders.prepare_local('mnist', tiny_mnist.directory, data_dir)
  assert builder.info.splits['train'].num_examples == 3


def test_prepare_ignores_stale_temporary_dir(tiny_mnist, tmp_path):
  # A killed process leaves tfds's temporary folder behind.
  stale = tmp_path / 'tfds' / 'local_mnist' / 'incomplete.ABC123_1.0.0'
  stale.mkdir(parents=True)
  (stale / 'local_mnist-train.tfrecord-00000-of-00001').write_bytes(b'junk')
  builder = builders.prepare_local(
    'mnist', tiny_mnist.directory, tmp_path / 'tfds'
  )
  assert len(as_numpy_examples(builder, 'train')) == 3
  assert stale.exists()


def test_fingerprint_depends_on_data():
  images = np.zeros((2, 28, 28, 1), np.uint8)
  labels = np.array([1, 2], np.int64)
  reference = builders.fingerprint_splits({'train': (images, labels)})
  assert len(reference) == 64
  assert reference == builders.fingerprint_splits(
    {'train': (images.copy(), labels.copy())}
  )
  assert reference != builders.fingerprint_splits({'test': (images, labels)})
  assert reference != builders.fingerprint_splits(
    {'train': (images, labels[::-1].copy())}
  )


# Real files, prepared once per session.


def test_real_mnist_splits(prepared_mnist):
  splits = prepared_mnist.info.splits
  assert splits['train'].num_examples == 60000
  assert splits['test'].num_examples == 10000


def test_real_mnist_element_spec(prepared_mnist):
  spec = prepared_mnist.as_dataset(split='test').element_spec
  assert spec['image'].shape == (28, 28, 1)
  assert spec['image'].dtype.name == 'uint8'
  assert spec['label'].shape == ()
  assert spec['label'].dtype.name == 'int64'


def test_real_mnist_first_example(prepared_mnist, mnist_dir):
  images, labels = raw_files.load_mnist(mnist_dir, 'train')
  first = next(iter(tfds.as_numpy(prepared_mnist.as_dataset(split='train'))))
  matches = np.flatnonzero((images == first['image']).all(axis=(1, 2, 3)))
  assert matches.size >= 1
  assert first['label'] in labels[matches]


def test_real_mnist_test_split_round_trip(prepared_mnist, mnist_dir):
  images, labels = raw_files.load_mnist(mnist_dir, 'test')
  examples = as_numpy_examples(prepared_mnist, 'test')
  got_images = np.stack([example['image'] for example in examples])
  got_labels = np.array([example['label'] for example in examples])
  assert sorted_pairs(got_images, got_labels) == sorted_pairs(images, labels)


def test_real_mnist_reloaded_by_name(prepared_mnist):
  builder = tfds.builder('local_mnist', data_dir=prepared_mnist.data_dir_root)
  assert builder.is_prepared()
  metadata = dict(builder.info.metadata.items())
  assert len(metadata[builders.SOURCE_SHA256_KEY]) == 64


def test_real_cifar10_splits(prepared_cifar10):
  splits = prepared_cifar10.info.splits
  assert splits['train'].num_examples == 50000
  assert splits['test'].num_examples == 10000


def test_real_cifar10_element_spec(prepared_cifar10):
  spec = prepared_cifar10.as_dataset(split='test').element_spec
  assert spec['id'].dtype.name == 'string'
  assert spec['image'].shape == (32, 32, 3)
  assert spec['image'].dtype.name == 'uint8'
  assert spec['label'].dtype.name == 'int64'


@pytest.mark.parametrize('split', ['train', 'test'])
def test_real_cifar10_first_example(prepared_cifar10, cifar10_dir, split):
  images, labels = raw_files.load_cifar10(cifar10_dir, split)
  dataset = prepared_cifar10.as_dataset(split=split)
  first = next(iter(tfds.as_numpy(dataset)))
  prefix, index = first['id'].decode().split('_')
  assert prefix == split
  np.testing.assert_array_equal(first['image'], images[int(index)])
  assert first['label'] == labels[int(index)]


def test_real_cifar10_names_after_reload(prepared_cifar10):
  root = prepared_cifar10.data_dir_root
  builder = tfds.builder('local_cifar10', data_dir=root)
  names = builder.info.features['label'].names
  assert names == list(raw_files.CIFAR10_CLASS_NAMES)
