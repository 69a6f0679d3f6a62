"""Shared fixtures: real datasets, tiny raw files and a network guard.

The real MNIST and CIFAR-10 files are read from `../shared/data` relative to
the repository root. Tests that need them skip when that folder is missing,
and fail instead when the environment variable CI is 'true'.
"""

import contextlib
import gzip
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from pinet_jax.data import raw_files

REPO_ROOT = Path(__file__).resolve().parents[1]
# PINET_JAX_TEST_DATA overrides the default, ../shared/data beside the repo.
REAL_DATA_ROOT = Path(
  os.environ.get('PINET_JAX_TEST_DATA') or REPO_ROOT.parent / 'shared' / 'data'
)


def pytest_configure(config):
  del config
  # Reuse compiled programs across test processes and CLI subprocesses;
  # CI points JAX_COMPILATION_CACHE_DIR into its own checkout.
  import jax

  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    cache = REPO_ROOT / '.pytest_cache' / 'xla'
    os.environ['JAX_COMPILATION_CACHE_DIR'] = str(cache)
    jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)


def _real_data_dir(name: str) -> Path:
  path = REAL_DATA_ROOT / name
  if not path.is_dir():
    reason = (
      f'real {name} data not found at {path}; set PINET_JAX_TEST_DATA to '
      'the folder that contains mnist/ and cifar10/'
    )
    if os.environ.get('CI') == 'true':
      pytest.fail(f'{reason}, and CI=true requires it')
    pytest.skip(reason)
  return path


@pytest.fixture(scope='session')
def mnist_dir() -> Path:
  """Folder with the four official MNIST IDX files (gzipped)."""
  return _real_data_dir('mnist')


@pytest.fixture(scope='session')
def cifar10_dir() -> Path:
  """Folder that contains the official cifar-10-batches-bin folder."""
  return _real_data_dir('cifar10')


@contextlib.contextmanager
def forbid_network() -> Iterator[list[str]]:
  """Make socket connections and DNS lookups raise OSError, and record them.

  Code under test may catch the OSError (tfds treats an unreachable GCS as
  absent), so callers must also check that the returned list is empty.
  """
  attempts: list[str] = []

  def reject(call: str):
    def raise_os_error(*args, **kwargs):
      attempts.append(f'{call}{args!r}')
      raise OSError(f'network access is forbidden in this test: {call}')

    return raise_os_error

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, 'connect', reject('socket.connect'))
    patch.setattr(socket.socket, 'connect_ex', reject('socket.connect_ex'))
    patch.setattr(socket, 'create_connection', reject('create_connection'))
    patch.setattr(socket, 'getaddrinfo', reject('getaddrinfo'))
    yield attempts


@pytest.fixture
def no_network() -> Iterator[list[str]]:
  """Forbid network access during the test and return the attempts made."""
  with forbid_network() as attempts:
    yield attempts


def _prepare_offline(name: str, raw_dir: Path, data_dir: Path):
  # Imported here so that collecting tests that never prepare does not
  # import TensorFlow.
  from pinet_jax.data import builders

  with forbid_network() as attempts:
    builder = builders.prepare_local(name, raw_dir, data_dir)
  if attempts:
    pytest.fail(f'preparing {name} tried to use the network: {attempts}')
  return builder


@pytest.fixture(scope='session')
def prepared_mnist(mnist_dir, tmp_path_factory):
  """`local_mnist` builder prepared once per session from the real files."""
  data_dir = tmp_path_factory.mktemp('tfds_mnist')
  return _prepare_offline('mnist', mnist_dir, data_dir)


@pytest.fixture(scope='session')
def prepared_cifar10(cifar10_dir, tmp_path_factory):
  """`local_cifar10` builder prepared once per session from the real files."""
  data_dir = tmp_path_factory.mktemp('tfds_cifar10')
  return _prepare_offline('cifar10', cifar10_dir, data_dir)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """Encode a uint8 array as an IDX file, with its correct magic by default."""
  if magic is None:
    magic = 0x00000800 | array.ndim
  header = struct.pack(f'>{1 + array.ndim}I', magic, *array.shape)
  return header + array.astype(np.uint8).tobytes()


def cifar10_batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
  """Encode (N, 32, 32, 3) images and labels as CIFAR-10 binary records."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  records = np.concatenate([labels[:, np.newaxis], planes], axis=1)
  return records.astype(np.uint8).tobytes()


class TinyData(NamedTuple):
  """Tiny raw files and the arrays that they encode, per split."""

  directory: Path
  splits: dict[str, tuple[np.ndarray, np.ndarray]]


# Examples per split of the tiny datasets.
TINY_MNIST_SIZES = {'train': 3, 'test': 2}
TINY_CIFAR10_RECORDS_PER_FILE = 2


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch) -> TinyData:
  """Gzipped MNIST IDX files with 3 train and 2 test images.

  The official split sizes are patched to match for the test's duration.
  """
  monkeypatch.setattr(raw_files, 'MNIST_SPLIT_SIZES', TINY_MNIST_SIZES)
  directory = tmp_path / 'mnist'
  directory.mkdir()
  rng = np.random.default_rng(0)
  splits = {}
  for split, (images_name, labels_name) in raw_files.MNIST_FILES.items():
    count = TINY_MNIST_SIZES[split]
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    for name, array in ((images_name, images), (labels_name, labels)):
      (directory / f'{name}.gz').write_bytes(gzip.compress(idx_bytes(array)))
    splits[split] = (images[..., np.newaxis], labels.astype(np.int64))
  return TinyData(directory, splits)


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch) -> TinyData:
  """A cifar-10-batches-bin folder with 2 records per batch file.

  `directory` is the folder that contains cifar-10-batches-bin. The
  official records per file are patched to match for the test's duration.
  """
  monkeypatch.setattr(
    raw_files, 'CIFAR10_RECORDS_PER_FILE', TINY_CIFAR10_RECORDS_PER_FILE
  )
  directory = tmp_path / 'cifar10'
  batches = directory / raw_files.CIFAR10_FOLDER
  batches.mkdir(parents=True)
  (batches / raw_files.CIFAR10_META_FILE).write_text(
    '\n'.join(raw_files.CIFAR10_CLASS_NAMES) + '\n\n'
  )
  rng = np.random.default_rng(1)
  splits = {}
  for split, names in raw_files.CIFAR10_FILES.items():
    shape = (TINY_CIFAR10_RECORDS_PER_FILE * len(names), 32, 32, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 10, len(images)).astype(np.int64)
    for i, name in enumerate(names):
      part = slice(
        i * TINY_CIFAR10_RECORDS_PER_FILE,
        (i + 1) * TINY_CIFAR10_RECORDS_PER_FILE,
      )
      batch = cifar10_batch_bytes(images[part], labels[part])
      (batches / name).write_bytes(batch)
    splits[split] = (images, labels)
  return TinyData(directory, splits)


@pytest.fixture(scope='session')
def load_experiment():
  """Return a function that loads experiments/NAME.py's config."""

  def load(name: str):
    path = REPO_ROOT / 'experiments' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'experiment_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()

  return load


@pytest.fixture
def tiny_config(prepared_mnist, mnist_dir, load_experiment):
  """The tiny experiment, reading MNIST prepared once per session."""
  config = load_experiment('tiny')
  config.data_dir = str(mnist_dir)
  # The builder's data_dir is <root>/local_mnist/<version>.
  config.tfds_data_dir = str(Path(prepared_mnist.data_dir).parents[1])
  return config


def restore_latest_state(workdir: Path, config, total_steps: int):
  """Restore the latest checkpoint in `workdir` into a fresh template.

  The model is the config's, built for MNIST's 28x28x1 images.
  """
  # Imported here, as in `_prepare_offline`, to keep collection light.
  import jax

  from pinet_jax import checkpoints, models, optim, steps

  model = models.get_model(
    config.model, num_classes=10, in_channels=1, **config.model_kwargs
  )
  template = steps.create_train_state(
    model,
    optim.create_optimizer(config, total_steps),
    (28, 28, 1),
    jax.random.key(0),
  )
  manager = checkpoints.create_manager(str(workdir / 'checkpoints'), 3)
  try:
    return checkpoints.restore_latest(manager, template, config, total_steps)
  finally:
    manager.close()


def command(config, workdir, *overrides):
  """Return the command line that trains experiments/<config>.py."""
  config_file = REPO_ROOT / 'experiments' / f'{config}.py'
  return command_for_file(config_file, workdir, *overrides)


def command_for_file(config_file, workdir, *overrides):
  return [
    sys.executable,
    '-m',
    'pinet_jax.main',
    f'--config={config_file}',
    f'--workdir={workdir}',
    *overrides,
  ]


def run(args, timeout=600, env=None):
  """Run `args` in the repository, adding `env` to this environment."""
  return subprocess.run(
    args,
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **(env or {})},
  )


def read_metrics(workdir):
  lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.fixture
def data_flags(prepared_mnist, mnist_dir):
  root = Path(prepared_mnist.data_dir).parents[1]
  return [f'--config.data_dir={mnist_dir}', f'--config.tfds_data_dir={root}']


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  errors = [
    line for line in result.stderr.splitlines() if line.startswith('error: ')
  ]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0]
