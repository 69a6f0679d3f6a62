"""Find a dataset: local raw files, a prepared tfds dataset, or a download.

Resolution order, first match wins:
  1. config.data_dir: the publisher's raw files, prepared into tfds format
     once (see `pinet_jax.data.builders`).
  2. A dataset already prepared in the tfds data directory, either tfds's
     own or one prepared from raw files in an earlier run.
  3. tfds's own download, only when config.download is true.
Otherwise it fails at once, naming the files it expects and the option that
points at them, instead of letting tfds's downloader retry for minutes on a
machine without internet access.
"""

import os

import ml_collections
import tensorflow_datasets as tfds

from pinet_jax.data import builders, raw_files
from pinet_jax.errors import DataNotFoundError

# (num_classes, (height, width, channels)) of each supported dataset.
DATASET_SHAPES: dict[str, tuple[int, tuple[int, int, int]]] = {
  'mnist': (10, (28, 28, 1)),
  'cifar10': (10, (32, 32, 3)),
}

_EXPECTED_FILES = {
  'mnist': (
    'the four MNIST IDX files ('
    + ', '.join(raw_files.MNIST_FILE_NAMES)
    + ', each optionally .gz)'
  ),
  'cifar10': (
    f'the CIFAR-10 binary version (the {raw_files.CIFAR10_FOLDER} folder or '
    f'{raw_files.CIFAR10_ARCHIVE})'
  ),
}


def tfds_data_dir(config: ml_collections.ConfigDict) -> str:
  """Return where prepared tfds datasets live for this config."""
  return os.path.expanduser(
    config.tfds_data_dir or tfds.core.constants.DATA_DIR
  )


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Return a prepared tfds builder of config.dataset.

  Raises:
    DataNotFoundError: the data is not local and downloading is off.
    pinet_jax.data.raw_files.DataFileError: a raw file is invalid.
  """
  name = config.dataset
  data_dir = tfds_data_dir(config)
  if config.data_dir:
    raw_dir = os.path.expanduser(config.data_dir)
    return builders.prepare_local(name, raw_dir, data_dir)
  for builder_name in (name, builders.LOCAL_BUILDERS[name].name):
    builder = tfds.builder(builder_name, data_dir=data_dir)
    if builder.is_prepared():
      return builder
  if config.download:
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    return builder
  raise DataNotFoundError(
    f'dataset {name!r} is not prepared in {data_dir} and no local files '
    f'were given: point --config.data_dir (make DATA=...) at a folder with '
    f'{_EXPECTED_FILES[name]}, or set --config.download=True on a machine '
    'with internet access'
  )
