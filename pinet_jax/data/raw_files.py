"""Parse and validate the publishers' raw MNIST and CIFAR-10 files.

This module uses only numpy and the standard library, so the files can be
checked without importing TensorFlow. Every problem with a file raises
`DataFileError` with a one-line message: the file, what was expected,
what was found and how to fix it.

Layouts read here:

* MNIST: four IDX files (LeCun et al.), each plain or gzipped.
* CIFAR-10: the binary version (Krizhevsky, 2009), either as the extracted
  `cifar-10-batches-bin` folder or as the `cifar-10-binary.tar.gz` archive.
"""

import gzip
import math
import os
import struct
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from pinet_jax.errors import UserInputError

PathLike = str | os.PathLike[str]

NUM_CLASSES = 10

# Split -> (images file, labels file), as the publisher names them.
MNIST_FILES: Mapping[str, tuple[str, str]] = MappingProxyType(
  {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
  }
)
# Every MNIST file name, in MNIST_FILES order.
MNIST_FILE_NAMES = tuple(name for pair in MNIST_FILES.values() for name in pair)
MNIST_SPLIT_SIZES: Mapping[str, int] = MappingProxyType(
  {'train': 60_000, 'test': 10_000}
)
MNIST_IMAGE_SHAPE = (28, 28)

# IDX magic numbers: two zero bytes, the value type (0x08 = unsigned byte)
# and the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

CIFAR10_FOLDER = 'cifar-10-batches-bin'
CIFAR10_ARCHIVE = 'cifar-10-binary.tar.gz'
CIFAR10_META_FILE = 'batches.meta.txt'
CIFAR10_FILES: Mapping[str, tuple[str, ...]] = MappingProxyType(
  {
    'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
    'test': ('test_batch.bin',),
  }
)
CIFAR10_RECORDS_PER_FILE = 10_000
# Label order of the publisher's batches.meta.txt.
CIFAR10_CLASS_NAMES = (
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
)
CIFAR10_IMAGE_SHAPE = (32, 32, 3)
# One label byte, then the red, green and blue planes, each row-major.
_CIFAR10_RECORD_BYTES = 1 + math.prod(CIFAR10_IMAGE_SHAPE)

_REDOWNLOAD = 'Re-download the official file.'
# The option that names the raw files' folder, in training and in the
# pinet-jax commands.
_DATA_OPTION = '--config.data_dir (make DATA=...; --data_dir of pinet-jax)'
_CIFAR10_WHERE = (
  f'Point {_DATA_OPTION} at {CIFAR10_FOLDER}, at a folder that contains '
  f'it, or at a folder that contains {CIFAR10_ARCHIVE}.'
)


class DataFileError(UserInputError):
  """A raw data file or folder that is missing, truncated or malformed."""


def load_mnist(
  directory: PathLike, split: str, expected_count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Load one MNIST split from the IDX files in `directory`.

  Each file may be plain or gzipped (name + '.gz'). When both exist, the
  plain file is read.

  Args:
    directory: folder that contains the files named in `MNIST_FILES`.
    split: 'train' or 'test'.
    expected_count: number of examples the split must have. None means the
      official size, `MNIST_SPLIT_SIZES[split]`.

  Returns:
    images: uint8 array of shape (N, 28, 28, 1).
    labels: int64 array of shape (N,) with values in 0..9.

  Raises:
    DataFileError: a file is missing, unreadable or malformed, or the
      counts or labels are wrong.
    ValueError: `split` is unknown.
  """
  names = _lookup_split(MNIST_FILES, split, 'MNIST')
  if expected_count is None:
    expected_count = MNIST_SPLIT_SIZES[split]
  images_path, labels_path = _find_mnist_files(Path(directory), names)

  images = _parse_idx(
    _read_file(images_path), images_path, _IDX_IMAGES_MAGIC, MNIST_IMAGE_SHAPE
  )
  labels = _parse_idx(_read_file(labels_path), labels_path, _IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise DataFileError(
      f'{images_path} contains {len(images)} images but {labels_path} '
      f'contains {len(labels)} labels. Re-download both official files.'
    )
  if len(images) != expected_count:
    raise DataFileError(
      f'{images_path} contains {len(images)} images, expected '
      f'{expected_count} for the MNIST {split} split. {_REDOWNLOAD}'
    )
  _check_labels(labels, labels_path)
  return images[..., np.newaxis].copy(), labels.astype(np.int64)


def load_cifar10(
  directory: PathLike, split: str, records_per_file: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Load one CIFAR-10 split from the binary batches.

  `directory` may be the `cifar-10-batches-bin` folder, a folder that
  contains it, a folder that contains `cifar-10-binary.tar.gz`, or the
  archive itself. Members of an archive are read in memory, never
  extracted. A folder that contains both the extracted folder and the
  archive is read from the extracted folder.

  Args:
    directory: where the batches are, as above.
    split: 'train' (data_batch_1.bin .. data_batch_5.bin) or 'test'
      (test_batch.bin).
    records_per_file: number of records each batch file must have. None
      means the official `CIFAR10_RECORDS_PER_FILE`.

  Returns:
    images: uint8 array of shape (N, 32, 32, 3), height-width-channel.
    labels: int64 array of shape (N,) with values in 0..9.

  Raises:
    DataFileError: a file is missing, unreadable or malformed, or the
      counts or labels are wrong.
    ValueError: `split` is unknown.
  """
  names = _lookup_split(CIFAR10_FILES, split, 'CIFAR-10')
  if records_per_file is None:
    records_per_file = CIFAR10_RECORDS_PER_FILE
  location = _locate_cifar10(Path(directory))
  batches = [
    _parse_cifar10_batch(data, source, records_per_file)
    for source, data in _read_cifar10_files(location, names)
  ]
  images = np.concatenate([images for images, _ in batches])
  labels = np.concatenate([labels for _, labels in batches])
  return images, labels


def load_cifar10_class_names(directory: PathLike) -> list[str]:
  """Read the 10 class names, in label order, from batches.meta.txt.

  `directory` is located as in `load_cifar10`. Blank lines and surrounding
  whitespace are ignored.

  Raises:
    DataFileError: the file is missing, not UTF-8 text, or does not list
      exactly 10 names.
  """
  location = _locate_cifar10(Path(directory))
  [(source, data)] = _read_cifar10_files(location, [CIFAR10_META_FILE])
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as error:
    raise DataFileError(
      f'{source} is not UTF-8 text ({error}). {_REDOWNLOAD}'
    ) from error
  names = [line.strip() for line in text.splitlines() if line.strip()]
  if len(names) != NUM_CLASSES:
    raise DataFileError(
      f'{source} lists {len(names)} class names, expected {NUM_CLASSES}. '
      f'{_REDOWNLOAD}'
    )
  return names


def _lookup_split(
  table: Mapping[str, tuple[str, ...]], split: str, dataset: str
) -> tuple[str, ...]:
  if split not in table:
    raise ValueError(
      f'unknown {dataset} split {split!r}, expected one of {list(table)}'
    )
  return table[split]


def _read_file(path: Path) -> bytes:
  """Return the contents of `path`, gunzipped when its name ends in .gz."""
  try:
    if path.suffix == '.gz':
      with gzip.open(path, 'rb') as file:
        return file.read()
    return path.read_bytes()
  except (EOFError, zlib.error, gzip.BadGzipFile) as error:
    raise DataFileError(
      f'{path} is not a valid gzip file or is truncated '
      f'({_single_line(error)}). {_REDOWNLOAD}'
    ) from error
  except OSError as error:
    raise DataFileError(f'cannot read {path}: {_single_line(error)}') from error


def _single_line(error: Exception) -> str:
  # Some errors, such as tarfile's for an unknown compression, span lines.
  return ' '.join(str(error).split())


def _check_labels(labels: np.ndarray, source: object) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
  if bad.size:
    index = bad[0]
    raise DataFileError(
      f'{source} has label {labels[index]} at index {index}, expected '
      f'0..{NUM_CLASSES - 1}. {_REDOWNLOAD}'
    )


def _find_mnist_files(directory: Path, names: Sequence[str]) -> list[Path]:
  """Return the path of each named file, preferring it over name + '.gz'."""
  if not directory.is_dir():
    all_names = list(MNIST_FILE_NAMES)
    raise DataFileError(
      f'MNIST folder {directory} does not exist or is not a folder. Point '
      f'{_DATA_OPTION} at the folder that contains '
      f'{", ".join(all_names)} (each plain or .gz).'
    )
  paths, missing = [], []
  for name in names:
    plain, gzipped = directory / name, directory / f'{name}.gz'
    if plain.is_file():
      paths.append(plain)
    elif gzipped.is_file():
      paths.append(gzipped)
    else:
      missing.append(f'{name}[.gz]')
  if missing:
    raise DataFileError(
      f'{directory} is missing the MNIST files {", ".join(missing)}. Point '
      f'{_DATA_OPTION} at the folder that contains them.'
    )
  return paths


def _parse_idx(
  data: bytes, path: Path, magic: int, item_shape: tuple[int, ...] = ()
) -> np.ndarray:
  """Return the uint8 array of an IDX file whose items have `item_shape`.

  An IDX file is a big-endian uint32 magic number, one big-endian uint32
  per dimension, then the values in row-major order.
  """
  if len(data) < 4:
    raise DataFileError(
      f'{path} is {len(data)} bytes, too short for an IDX header. {_REDOWNLOAD}'
    )
  (found_magic,) = struct.unpack('>I', data[:4])
  if found_magic != magic:
    raise DataFileError(
      f'{path} has IDX magic number 0x{found_magic:08x}, expected '
      f'0x{magic:08x}. It is not an MNIST '
      f'{"image" if item_shape else "label"} file. {_REDOWNLOAD}'
    )
  ndim = 1 + len(item_shape)
  header_size = 4 * (1 + ndim)
  if len(data) < header_size:
    raise DataFileError(
      f'{path} is {len(data)} bytes, shorter than its {header_size}-byte IDX '
      f'header. {_REDOWNLOAD}'
    )
  shape = struct.unpack(f'>{ndim}I', data[4:header_size])
  if shape[1:] != item_shape:
    raise DataFileError(
      f'{path} has items of shape {shape[1:]}, expected {item_shape}. '
      f'{_REDOWNLOAD}'
    )
  expected_size = header_size + math.prod(shape)
  if len(data) != expected_size:
    raise DataFileError(
      f'{path} is {len(data)} bytes, expected {expected_size} for its header '
      f'and shape {shape}. The file is truncated or has extra bytes. '
      f'{_REDOWNLOAD}'
    )
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def _locate_cifar10(directory: Path) -> Path:
  """Return the folder of binary batches or the archive that contains them.

  Order: `directory` itself when it is a file (the archive), then
  `directory/cifar-10-batches-bin`, then `directory/cifar-10-binary.tar.gz`,
  and otherwise `directory` as the folder of batches.
  """
  if directory.is_file():
    return directory
  if not directory.is_dir():
    raise DataFileError(
      f'CIFAR-10 folder {directory} does not exist. {_CIFAR10_WHERE}'
    )
  if (directory / CIFAR10_FOLDER).is_dir():
    return directory / CIFAR10_FOLDER
  if (directory / CIFAR10_ARCHIVE).is_file():
    return directory / CIFAR10_ARCHIVE
  return directory


def _read_cifar10_files(
  location: Path, names: Sequence[str]
) -> list[tuple[str, bytes]]:
  """Return (source, contents) per named file of a folder or archive.

  `source` names the file in error messages: its path, or for an archive
  member 'ARCHIVE:cifar-10-batches-bin/NAME'.
  """
  if not location.is_dir():
    return _read_archive_members(location, names)
  missing = [name for name in names if not (location / name).is_file()]
  if missing:
    raise DataFileError(
      f'{location} is missing the CIFAR-10 files {", ".join(missing)}. '
      f'{_CIFAR10_WHERE}'
    )
  return [(str(location / name), _read_file(location / name)) for name in names]


def _read_archive_members(
  archive: Path, names: Sequence[str]
) -> list[tuple[str, bytes]]:
  """Read the named files of cifar-10-batches-bin/ from a tar archive."""
  expected_members = {f'{CIFAR10_FOLDER}/{name}' for name in names}
  contents = {}
  try:
    with tarfile.open(archive, 'r:*') as tar:
      # One pass over the members, because a gzipped tar cannot seek back
      # without decompressing again from the start.
      for member in tar:
        member_name = member.name.removeprefix('./')
        if member_name in expected_members and member.isfile():
          contents[member_name] = tar.extractfile(member).read()
          if len(contents) == len(expected_members):
            break
  except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
    raise DataFileError(
      f'{archive} is not a readable tar archive or is truncated '
      f'({_single_line(error)}). Re-download {CIFAR10_ARCHIVE}.'
    ) from error

  missing = sorted(expected_members - contents.keys())
  if missing:
    raise DataFileError(
      f'{archive} has no members {", ".join(missing)}. It is not '
      f'{CIFAR10_ARCHIVE} or is truncated. Re-download {CIFAR10_ARCHIVE}.'
    )
  sources = [f'{CIFAR10_FOLDER}/{name}' for name in names]
  return [(f'{archive}:{source}', contents[source]) for source in sources]


def _parse_cifar10_batch(
  data: bytes, source: str, records_per_file: int
) -> tuple[np.ndarray, np.ndarray]:
  """Return images (N, 32, 32, 3) and int64 labels (N,) of one batch file."""
  size = len(data)
  if size == 0 or size % _CIFAR10_RECORD_BYTES:
    raise DataFileError(
      f'{source} is {size} bytes, not a positive multiple of the '
      f'{_CIFAR10_RECORD_BYTES}-byte CIFAR-10 record. The file is truncated '
      f'or not a CIFAR-10 binary batch. {_REDOWNLOAD}'
    )
  count = size // _CIFAR10_RECORD_BYTES
  if count != records_per_file:
    raise DataFileError(
      f'{source} contains {count} records, expected {records_per_file}. '
      f'{_REDOWNLOAD}'
    )
  records = np.frombuffer(data, np.uint8).reshape(count, _CIFAR10_RECORD_BYTES)
  labels = records[:, 0].astype(np.int64)
  _check_labels(labels, source)
  height, width, channels = CIFAR10_IMAGE_SHAPE
  planes = records[:, 1:].reshape(count, channels, height, width)
  return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels
