"""Benchmark training speed against PyTorch, the input pipeline and XLA.

  python -m pinet_jax.bench --dataset=mnist --batch_size=128 \\
      --data_dir=/path/to/mnist

Prints a markdown table with these rows:
- train-step and eval img/s, compile time and memory of the JAX model;
- the same network in PyTorch eager, channels-first and channels-last,
  timed in alternation with JAX so that a drift in machine speed affects
  both alike, and the JAX/PyTorch ratio of each round;
- the input pipeline's img/s through tfds, when --data_dir is given;
- XLA's matmul rate, of which the train step's FLOP rate is a percentage.
Figures are medians over rounds.
"""

import dataclasses
import functools
import os
import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from pinet_jax import config as config_lib
from pinet_jax import models, steps
from pinet_jax.errors import UserInputError

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'mnist', ['mnist', 'cifar10'], 'Input shape.')
flags.DEFINE_integer('batch_size', 128, 'Images per train and eval step.')
flags.DEFINE_integer('width', 16, 'Channels of the first product block.')
flags.DEFINE_enum(
  'formulation',
  config_lib.default_config().model_kwargs.formulation,
  list(models.product_block.FORMULATIONS),
  'How the product blocks compute their convolutions.',
)
flags.DEFINE_integer(
  'microbatch_size',
  0,
  'Examples per forward and backward pass in a step; 0 chooses as training '
  'does. A smaller size than the batch adds a whole-batch JAX row.',
)
flags.DEFINE_integer('steps', 20, 'Train steps per timed round.')
flags.DEFINE_integer(
  'rounds', 5, 'Timed rounds; each round times every JAX and PyTorch row once.'
)
flags.DEFINE_bool(
  'torch', True, 'Time the PyTorch reference too, when torch is installed.'
)
flags.DEFINE_string(
  'data_dir',
  '',
  'Folder of raw dataset files for the input-pipeline figure; empty skips it.',
)

flags.DEFINE_string(
  'tfds_data_dir',
  '',
  'Where tfds keeps the prepared dataset; empty means TFDS_DATA_DIR or '
  '~/tensorflow_datasets.',
)
for _name in ('batch_size', 'width', 'steps', 'rounds'):
  flags.register_validator(
    _name, lambda value: value >= 1, message=f'--{_name} must be at least 1'
  )

# Side of the square float32 matrices of the matmul peak measurement.
MATMUL_SIZE = 2048


@dataclasses.dataclass
class Row:
  """One line of the result table."""

  metric: str
  value: str
  note: str = ''


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_gflops(size: int = MATMUL_SIZE, repeats: int = 10) -> float:
  """Return XLA's float32 matmul rate in GFLOP/s on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2 * size**3 / seconds / 1e9


def _image_shape(dataset: str) -> tuple[int, int, int]:
  return {'mnist': (28, 28, 1), 'cifar10': (32, 32, 3)}[dataset]


def _synthetic_batch(shape, batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch_size, *shape)).astype(np.float32)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  return images, labels


class JaxBench:
  """A compiled train and eval step of the JAX model on a fixed batch."""

  def __init__(
    self,
    shape,
    batch_size: int,
    width: int,
    formulation: str,
    microbatch_size: int,
  ):
    model = models.PolyNet(
      in_channels=shape[-1], width=width, formulation=formulation
    )
    self.state = steps.create_train_state(
      model, optax.adam(1e-3), shape, jax.random.key(0)
    )
    images, labels = _synthetic_batch(shape, batch_size)
    self.batch = jax.device_put({'image': images, 'label': labels})
    self.eval_batch = jax.device_put(
      {**self.batch, 'mask': np.ones(batch_size, np.float32)}
    )
    self.rng = jax.random.key(1)
    start = time.perf_counter()
    train_step = functools.partial(
      steps.train_step, microbatch_size=microbatch_size
    )
    lowered = jax.jit(train_step, donate_argnums=0).lower(
      self.state, self.batch, self.rng
    )
    self.train_fn = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    eval_step = functools.partial(
      steps.eval_step, microbatch_size=microbatch_size
    )
    self.eval_fn = (
      jax.jit(eval_step).lower(self.state, self.eval_batch).compile()
    )
    # XLA's cost analysis counts a loop's body once, so the FLOPs come from
    # the whole-batch step, which has no loop.
    self.flops_per_step = (
      jax.jit(steps.train_step)
      .lower(self.state, self.batch, self.rng)
      .cost_analysis()['flops']
    )
    memory = self.train_fn.memory_analysis()
    self.temp_bytes = memory.temp_size_in_bytes

  def train(self, count: int) -> None:
    metrics = None
    for _ in range(count):
      self.state, metrics = self.train_fn(self.state, self.batch, self.rng)
    jax.block_until_ready(metrics)

  def evaluate(self, count: int) -> None:
    sums = [self.eval_fn(self.state, self.eval_batch) for _ in range(count)]
    jax.block_until_ready(sums)


class TorchBench:
  """The same network and step in PyTorch eager, in one memory layout."""

  def __init__(self, shape, batch_size: int, width: int, channels_last: bool):
    import torch

    from pinet_jax.torch_reference import TorchPolyNet

    self.torch = torch
    torch.manual_seed(0)
    height, _, channels = shape
    self.model = TorchPolyNet(channels, 10, width, height)
    images, labels = _synthetic_batch(shape, batch_size)
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    self.labels = torch.from_numpy(labels).long()
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
      self.images = self.images.contiguous(memory_format=torch.channels_last)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
    self.loss_fn = torch.nn.CrossEntropyLoss()

  def train(self, count: int) -> None:
    for _ in range(count):
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.loss_fn(self.model(self.images), self.labels)
      loss.backward()
      self.optimizer.step()

  def evaluate(self, count: int) -> None:
    with self.torch.no_grad():
      for _ in range(count):
        self.model(self.images)


def _torch_benches(shape) -> dict[str, TorchBench] | str:
  """Return the PyTorch benches, or why there are none."""
  if not FLAGS.torch:
    return 'skipped (--notorch)'
  try:
    import torch  # noqa: F401
  except ImportError:
    return (
      'torch is not installed; .venv/bin/pip install -c constraints.txt '
      'torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu adds '
      'the comparison (the CPU build)'
    )
  return {
    f'PyTorch {torch_version()} {layout}': TorchBench(
      shape, FLAGS.batch_size, FLAGS.width, layout == 'channels_last'
    )
    for layout in ('channels_first', 'channels_last')
  }


def torch_version() -> str:
  """Return the installed torch version."""
  import torch

  return torch.__version__


def _time_rounds(benches: dict[str, object], method: str, count: int):
  """Call each bench's `method` in turn per round; return times per name."""
  for bench in benches.values():
    getattr(bench, method)(max(1, count // 4))  # warm-up
  times = {name: [] for name in benches}
  for _ in range(FLAGS.rounds):
    for name, bench in benches.items():
      start = time.perf_counter()
      getattr(bench, method)(count)
      times[name].append(time.perf_counter() - start)
  return times


def load_train_split():
  """Load the training split of --data_dir through tfds, or return None.

  Raises:
    pinet_jax.errors.UserInputError: the folder or its files are invalid.
  """
  if not FLAGS.data_dir:
    return None
  from pinet_jax.data import pipeline, sources

  config = config_lib.default_config()
  config.dataset = FLAGS.dataset
  config.data_dir = FLAGS.data_dir
  config.tfds_data_dir = FLAGS.tfds_data_dir
  return pipeline.load_split(sources.get_builder(config), 'train')


def _pipeline_images_per_second(data) -> float:
  """Return img/s of one training epoch of `data` through tf.data."""
  from pinet_jax.data import pipeline

  start = time.perf_counter()
  count = 0
  for batch in pipeline.train_batches(
    data,
    batch_size=FLAGS.batch_size,
    seed=0,
    epoch=0,
    augment=FLAGS.dataset == 'cifar10',
  ):
    count += len(batch['label'])
  return count / (time.perf_counter() - start)


def run_benchmarks(train_data=None) -> list[Row]:
  """Run every measurement and return the table rows.

  Args:
    train_data: `load_train_split()`'s result; None skips the input
      pipeline row.
  """
  shape = _image_shape(FLAGS.dataset)
  batch = FLAGS.batch_size
  rows = [
    Row(
      'setup',
      f'{FLAGS.dataset} {shape}, batch {batch}, width {FLAGS.width}',
      f'{jax.devices()[0].device_kind}, '
      f'{os.cpu_count()} CPUs, jax {jax.__version__}',
    ),
  ]
  microbatch = steps.resolve_microbatch_size(
    FLAGS.microbatch_size, batch, jax.default_backend()
  )
  jax_bench = JaxBench(shape, batch, FLAGS.width, FLAGS.formulation, microbatch)
  jax_name = f'JAX {FLAGS.formulation}, ' + (
    'whole batch' if microbatch == batch else f'microbatch {microbatch}'
  )
  rows.append(
    Row(
      'train-step compile',
      f'{jax_bench.compile_seconds:.1f} s',
      'lower + compile, persistent cache off',
    )
  )
  rows.append(
    Row('train-step XLA temp memory', f'{jax_bench.temp_bytes / 2**20:.0f} MiB')
  )
  benches = {jax_name: jax_bench}
  if microbatch < batch:
    benches[f'JAX {FLAGS.formulation}, whole batch'] = JaxBench(
      shape, batch, FLAGS.width, FLAGS.formulation, batch
    )
  torch_benches = _torch_benches(shape)
  if isinstance(torch_benches, str):
    rows.append(Row('PyTorch', torch_benches))
  else:
    benches.update(torch_benches)

  train_times = _time_rounds(benches, 'train', FLAGS.steps)
  eval_times = _time_rounds(benches, 'evaluate', FLAGS.steps)
  for name in benches:
    rate = batch * FLAGS.steps / statistics.median(train_times[name])
    rows.append(Row(f'{name} train img/s', f'{rate:,.0f}'))
  for name in benches:
    rate = batch * FLAGS.steps / statistics.median(eval_times[name])
    rows.append(Row(f'{name} eval img/s', f'{rate:,.0f}'))
  for name in benches:
    if name == jax_name:
      continue
    ratios = [
      other / own
      for own, other in zip(
        train_times[jax_name], train_times[name], strict=True
      )
    ]
    rows.append(
      Row(
        f'train speed ratio {jax_name} / {name}',
        f'{statistics.median(ratios):.2f}',
        f'per-round min {min(ratios):.2f}, max {max(ratios):.2f}',
      )
    )

  peak = matmul_gflops()
  step_seconds = statistics.median(train_times[jax_name]) / FLAGS.steps
  achieved = jax_bench.flops_per_step / step_seconds / 1e9
  rows.append(
    Row(
      'XLA f32 matmul peak',
      f'{peak:.0f} GFLOP/s',
      f'{MATMUL_SIZE}x{MATMUL_SIZE} matmul',
    )
  )
  rows.append(
    Row(
      'JAX train step',
      f'{achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of peak',
      f'{jax_bench.flops_per_step / batch / 1e6:.0f} MFLOP per image (XLA '
      'cost analysis)',
    )
  )
  if train_data is not None:
    rate = _pipeline_images_per_second(train_data)
    train_rate = batch * FLAGS.steps / statistics.median(train_times[jax_name])
    rows.append(
      Row(
        'input pipeline img/s',
        f'{rate:,.0f}',
        f'{rate / train_rate:.1f}x the JAX train rate; one '
        'epoch through tfds and tf.data',
      )
    )
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  rows.append(
    Row(
      'process peak RSS',
      f'{peak_rss:,.0f} MiB',
      'all of the above in one process',
    )
  )
  return rows


def format_table(rows: list[Row]) -> str:
  """Return `rows` as a markdown table."""
  lines = ['| metric | value | note |', '|---|---|---|']
  lines += [f'| {row.metric} | {row.value} | {row.note} |' for row in rows]
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    steps.resolve_microbatch_size(
      FLAGS.microbatch_size, FLAGS.batch_size, jax.default_backend()
    )
  except ValueError as error:
    raise app.UsageError(f'--microbatch_size: {error}') from error
  # Reading the data first reports a wrong folder before minutes of timing.
  try:
    train_data = load_train_split()
  except UserInputError as error:
    message = str(error).replace('--config.data_dir', '--data_dir')
    raise app.UsageError(f'--data_dir={FLAGS.data_dir}: {message}') from error
  print(format_table(run_benchmarks(train_data)), flush=True)


if __name__ == '__main__':
  app.run(main)
