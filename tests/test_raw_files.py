"""Tests for the raw MNIST and CIFAR-10 parsers.

Tiny files written here cover valid layouts and each kind of damage. The
real files, when present, must give the publishers' label counts.
"""

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pinet_jax.data import raw_files
from pinet_jax.data.raw_files import DataFileError

from conftest import idx_bytes

MNIST_TRAIN_COUNTS = [
  5923,
  6742,
  5958,
  6131,
  5842,
  5421,
  5918,
  6265,
  5851,
  5949,
]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def assert_one_line(error: pytest.ExceptionInfo, *parts: object) -> None:
  message = str(error.value)
  assert '\n' not in message
  for part in parts:
    assert str(part) in message


def rewrite_gz(path: Path, data: bytes) -> None:
  path.write_bytes(gzip.compress(data))


# MNIST, valid files.


def test_mnist_tiny_gzipped_arrays(tiny_mnist):
  for split, (images, labels) in tiny_mnist.splits.items():
    got_images, got_labels = raw_files.load_mnist(tiny_mnist.directory, split)
    assert got_images.dtype == np.uint8
    assert got_images.shape == (len(labels), 28, 28, 1)
    assert got_labels.dtype == np.int64
    assert got_labels.shape == (len(labels),)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_mnist_plain_files(tiny_mnist):
  for path in tiny_mnist.directory.iterdir():
    path.with_suffix('').write_bytes(gzip.decompress(path.read_bytes()))
    path.unlink()
  images, labels = raw_files.load_mnist(tiny_mnist.directory, 'test')
  np.testing.assert_array_equal(images, tiny_mnist.splits['test'][0])
  np.testing.assert_array_equal(labels, tiny_mnist.splits['test'][1])


def test_mnist_prefers_plain_over_gz(tiny_mnist):
  _, labels_name = raw_files.MNIST_FILES['test']
  plain_labels = np.array([7, 8], np.uint8)
  (tiny_mnist.directory / labels_name).write_bytes(idx_bytes(plain_labels))
  _, labels = raw_files.load_mnist(tiny_mnist.directory, 'test')
  np.testing.assert_array_equal(labels, plain_labels)


def test_mnist_images_writable(tiny_mnist):
  images, labels = raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert images.flags.writeable
  assert labels.flags.writeable


def test_mnist_expected_count_argument(tiny_mnist):
  images, _ = raw_files.load_mnist(tiny_mnist.directory, 'train', 3)
  assert len(images) == 3


def test_mnist_unknown_split(tiny_mnist):
  with pytest.raises(ValueError, match="'validation'") as error:
    raw_files.load_mnist(tiny_mnist.directory, 'validation')
  assert not isinstance(error.value, DataFileError)
  assert "['train', 'test']" in str(error.value)


# MNIST, missing and damaged files.


def test_mnist_missing_directory(tmp_path):
  directory = tmp_path / 'absent'
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(directory, 'train')
  assert_one_line(error, directory, 'does not exist')
  for images_name, labels_name in raw_files.MNIST_FILES.values():
    assert_one_line(error, images_name, labels_name)


def test_mnist_empty_directory(tmp_path):
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tmp_path, 'train')
  assert_one_line(
    error,
    tmp_path,
    'train-images-idx3-ubyte[.gz]',
    'train-labels-idx1-ubyte[.gz]',
  )


def test_mnist_missing_labels_file(tiny_mnist):
  (tiny_mnist.directory / 't10k-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'test')
  assert_one_line(error, tiny_mnist.directory, 't10k-labels-idx1-ubyte[.gz]')
  assert 't10k-images' not in str(error.value)


def test_mnist_wrong_magic(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  images = tiny_mnist.splits['train'][0][..., 0]
  rewrite_gz(path, idx_bytes(images, magic=0x00000801))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, '0x00000801', 'expected 0x00000803')


def test_mnist_labels_wrong_magic(tiny_mnist):
  path = tiny_mnist.directory / 'train-labels-idx1-ubyte.gz'
  rewrite_gz(path, idx_bytes(tiny_mnist.splits['train'][1], magic=0x0803))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, '0x00000803', 'expected 0x00000801')


def test_mnist_wrong_dims(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  rewrite_gz(path, idx_bytes(np.zeros((3, 27, 28), np.uint8)))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, '(27, 28)', 'expected (28, 28)')


def test_mnist_truncated_file(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  data = gzip.decompress(path.read_bytes())
  rewrite_gz(path, data[:-1])
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  expected_size = 16 + 3 * 28 * 28
  assert_one_line(error, path, expected_size - 1, f'expected {expected_size}')


def test_mnist_extra_bytes(tiny_mnist):
  path = tiny_mnist.directory / 't10k-labels-idx1-ubyte.gz'
  rewrite_gz(path, idx_bytes(tiny_mnist.splits['test'][1]) + b'\0')
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'test')
  assert_one_line(error, path, 'is 11 bytes', 'expected 10')


def test_mnist_header_cut_short(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  rewrite_gz(path, idx_bytes(tiny_mnist.splits['train'][0][..., 0])[:10])
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, 'is 10 bytes', '16-byte IDX header')


def test_mnist_empty_file(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  rewrite_gz(path, b'')
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, 'is 0 bytes')


def test_mnist_truncated_gzip(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  compressed = path.read_bytes()
  path.write_bytes(compressed[: len(compressed) // 2])
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, 'gzip')


def test_mnist_corrupt_gzip_data(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  compressed = bytearray(path.read_bytes())
  # Past the 10-byte gzip header, inside the deflate stream.
  compressed[20:40] = bytes(20)
  path.write_bytes(bytes(compressed))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, 'gzip')


def test_mnist_not_gzip(tiny_mnist):
  path = tiny_mnist.directory / 'train-labels-idx1-ubyte.gz'
  path.write_bytes(idx_bytes(tiny_mnist.splits['train'][1]))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, 'not a valid gzip file')


def test_mnist_images_labels_count_mismatch(tiny_mnist):
  images_path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  labels_path = tiny_mnist.directory / 'train-labels-idx1-ubyte.gz'
  rewrite_gz(labels_path, idx_bytes(np.array([1, 2], np.uint8)))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, images_path, '3 images', labels_path, '2 labels')


def test_mnist_count_differs_from_expected(tiny_mnist):
  path = tiny_mnist.directory / 'train-images-idx3-ubyte.gz'
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train', expected_count=60000)
  assert_one_line(error, path, '3 images', 'expected 60000', 'train split')


def test_mnist_official_count_by_default(tiny_mnist, monkeypatch):
  monkeypatch.setattr(raw_files, 'MNIST_SPLIT_SIZES', {'train': 60000})
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, 'expected 60000')


def test_mnist_label_out_of_range(tiny_mnist):
  path = tiny_mnist.directory / 'train-labels-idx1-ubyte.gz'
  rewrite_gz(path, idx_bytes(np.array([0, 10, 255], np.uint8)))
  with pytest.raises(DataFileError) as error:
    raw_files.load_mnist(tiny_mnist.directory, 'train')
  assert_one_line(error, path, 'label 10 at index 1', 'expected 0..9')


# CIFAR-10, valid layouts.


def make_archive(batches: Path, archive: Path) -> Path:
  """Write a tar.gz of `batches` with the member names of the official one."""
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(batches, arcname=raw_files.CIFAR10_FOLDER)
  return archive


@pytest.fixture(params=['batches_folder', 'parent', 'archive', 'archive_dir'])
def cifar10_location(request, tiny_cifar10, tmp_path) -> Path:
  """Each accepted form of the CIFAR-10 `directory` argument."""
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  if request.param == 'batches_folder':
    return batches
  if request.param == 'parent':
    return tiny_cifar10.directory
  archive_dir = tmp_path / 'archive_only'
  archive_dir.mkdir()
  archive = make_archive(batches, archive_dir / raw_files.CIFAR10_ARCHIVE)
  return archive if request.param == 'archive' else archive_dir


def test_cifar10_layouts_give_same_arrays(tiny_cifar10, cifar10_location):
  for split, (images, labels) in tiny_cifar10.splits.items():
    got_images, got_labels = raw_files.load_cifar10(cifar10_location, split)
    assert got_images.dtype == np.uint8
    assert got_images.shape == (len(labels), 32, 32, 3)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_cifar10_class_names_layouts(cifar10_location):
  names = raw_files.load_cifar10_class_names(cifar10_location)
  assert names == list(raw_files.CIFAR10_CLASS_NAMES)


def test_cifar10_record_layout_is_rgb_planes(tmp_path):
  # Red = row, green = column, blue = 7, written plane by plane by hand.
  rows, cols = np.mgrid[0:32, 0:32].astype(np.uint8)
  record = bytes([4]) + rows.tobytes() + cols.tobytes() + bytes([7] * 1024)
  (tmp_path / 'test_batch.bin').write_bytes(record)
  images, labels = raw_files.load_cifar10(tmp_path, 'test', records_per_file=1)
  assert labels.tolist() == [4]
  assert images[0, 5, 9].tolist() == [5, 9, 7]
  assert images[0, 31, 0].tolist() == [31, 0, 7]


def test_cifar10_folder_preferred_over_archive(tiny_cifar10):
  (tiny_cifar10.directory / raw_files.CIFAR10_ARCHIVE).write_bytes(b'junk')
  images, _ = raw_files.load_cifar10(tiny_cifar10.directory, 'test')
  np.testing.assert_array_equal(images, tiny_cifar10.splits['test'][0])


def test_cifar10_unknown_split(tiny_cifar10):
  with pytest.raises(ValueError, match="'valid'") as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'valid')
  assert not isinstance(error.value, DataFileError)


# CIFAR-10, missing and damaged files.


def test_cifar10_size_not_multiple_of_record(tiny_cifar10):
  path = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER / 'test_batch.bin'
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'test')
  assert_one_line(error, path, f'is {2 * 3073 - 5} bytes', '3073-byte')


def test_cifar10_empty_file(tiny_cifar10):
  path = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER / 'data_batch_3.bin'
  path.write_bytes(b'')
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'train')
  assert_one_line(error, path, 'is 0 bytes', 'positive multiple')


def test_cifar10_record_count(tiny_cifar10):
  path = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER / 'test_batch.bin'
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'test', records_per_file=3)
  assert_one_line(error, path, '2 records', 'expected 3')


def test_cifar10_official_count_by_default(tiny_cifar10, monkeypatch):
  monkeypatch.setattr(raw_files, 'CIFAR10_RECORDS_PER_FILE', 10000)
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'test')
  assert_one_line(error, '2 records', 'expected 10000')


def test_cifar10_label_out_of_range(tiny_cifar10):
  path = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER / 'data_batch_2.bin'
  data = bytearray(path.read_bytes())
  data[3073] = 12  # Label byte of record 1.
  path.write_bytes(bytes(data))
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'train')
  assert_one_line(error, path, 'label 12 at index 1', 'expected 0..9')


def test_cifar10_missing_files_listed(tiny_cifar10):
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  (batches / 'data_batch_2.bin').unlink()
  (batches / 'data_batch_4.bin').unlink()
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tiny_cifar10.directory, 'train')
  assert_one_line(error, batches, 'data_batch_2.bin, data_batch_4.bin')
  assert 'data_batch_1.bin' not in str(error.value)


def test_cifar10_empty_directory(tmp_path):
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tmp_path, 'train')
  assert_one_line(
    error,
    tmp_path,
    ', '.join(raw_files.CIFAR10_FILES['train']),
    raw_files.CIFAR10_ARCHIVE,
  )


def test_cifar10_missing_directory(tmp_path):
  directory = tmp_path / 'absent'
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(directory, 'test')
  assert_one_line(error, directory, 'does not exist')


def test_cifar10_truncated_archive(tiny_cifar10, tmp_path):
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  archive = make_archive(batches, tmp_path / raw_files.CIFAR10_ARCHIVE)
  data = archive.read_bytes()
  archive.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(archive, 'test')
  assert_one_line(error, archive, 'truncated')


def test_cifar10_archive_not_tar(tmp_path):
  archive = tmp_path / raw_files.CIFAR10_ARCHIVE
  archive.write_bytes(b'not an archive at all')
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(tmp_path, 'test')
  assert_one_line(error, archive, 'not a readable tar archive')


def test_cifar10_archive_missing_member(tiny_cifar10, tmp_path):
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  (batches / 'test_batch.bin').unlink()
  archive = make_archive(batches, tmp_path / raw_files.CIFAR10_ARCHIVE)
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(archive, 'test')
  assert_one_line(error, archive, 'cifar-10-batches-bin/test_batch.bin')


def test_cifar10_archive_member_in_message(tiny_cifar10, tmp_path):
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  (batches / 'test_batch.bin').write_bytes(bytes(3073 * 2 + 1))
  archive = make_archive(batches, tmp_path / raw_files.CIFAR10_ARCHIVE)
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10(archive, 'test')
  assert_one_line(error, f'{archive}:cifar-10-batches-bin/test_batch.bin')


def test_cifar10_class_names_wrong_count(tiny_cifar10):
  path = (
    tiny_cifar10.directory
    / raw_files.CIFAR10_FOLDER
    / raw_files.CIFAR10_META_FILE
  )
  path.write_text('cat\ndog\n')
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10_class_names(tiny_cifar10.directory)
  assert_one_line(error, path, 'lists 2 class names', 'expected 10')


def test_cifar10_class_names_not_text(tiny_cifar10):
  path = (
    tiny_cifar10.directory
    / raw_files.CIFAR10_FOLDER
    / raw_files.CIFAR10_META_FILE
  )
  path.write_bytes(b'\xff\xfe' * 10)
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10_class_names(tiny_cifar10.directory)
  assert_one_line(error, path, 'UTF-8')


def test_cifar10_class_names_missing(tiny_cifar10):
  batches = tiny_cifar10.directory / raw_files.CIFAR10_FOLDER
  (batches / raw_files.CIFAR10_META_FILE).unlink()
  with pytest.raises(DataFileError) as error:
    raw_files.load_cifar10_class_names(tiny_cifar10.directory)
  assert_one_line(error, batches, raw_files.CIFAR10_META_FILE)


# Real files.


@pytest.mark.parametrize(
  ('split', 'counts'),
  [('train', MNIST_TRAIN_COUNTS), ('test', MNIST_TEST_COUNTS)],
)
def test_real_mnist_label_counts(mnist_dir, split, counts):
  images, labels = raw_files.load_mnist(mnist_dir, split)
  assert images.shape == (sum(counts), 28, 28, 1)
  assert np.bincount(labels, minlength=10).tolist() == counts


def test_real_mnist_mean_pixel(mnist_dir):
  images, _ = raw_files.load_mnist(mnist_dir, 'train')
  assert round(float(images.mean()) / 255, 4) == 0.1307


@pytest.mark.parametrize(
  ('split', 'per_class'), [('train', 5000), ('test', 1000)]
)
def test_real_cifar10_label_counts(cifar10_dir, split, per_class):
  images, labels = raw_files.load_cifar10(cifar10_dir, split)
  assert images.shape == (10 * per_class, 32, 32, 3)
  assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_real_cifar10_class_names(cifar10_dir):
  names = raw_files.load_cifar10_class_names(cifar10_dir)
  assert names == [
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
