"""Data parallelism over every device of every process.

Training runs one jitted step over a `Mesh` of all devices: each batch is
split along the mesh's 'data' axis, and the parameters, optimiser state
and batch statistics are replicated. XLA inserts the reductions across
devices, so the mean loss, the gradients and BatchNorm's statistics are
those of the global batch, whatever the device count. The mesh also has a
'model' axis of size 1, where model parallelism would shard parameters.

With several processes (a TPU pod slice, a GPU cluster), every process runs
the same program after `initialize_processes`. Each one feeds only its own
part of every batch, and `shard_batch` assembles the global arrays.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pinet_jax.errors import ConfigError

DATA_AXIS = 'data'
MODEL_AXIS = 'model'


def initialize_processes(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Connect this process to the others of a multi-process run.

  Call it once, before anything touches a device. On Cloud TPU and under
  SLURM, Open MPI and Kubernetes job sets (the last with the `kubernetes`
  package installed), JAX finds the coordinator and this process's rank
  itself. Elsewhere pass all three arguments.
  CPU processes exchange their collectives through gloo.

  Args:
    coordinator_address: 'host:port' of process 0, which listens there.
    num_processes: processes in the run.
    process_id: this process's rank, in [0, num_processes).

  Raises:
    ConfigError: JAX found no cluster and not every argument was given,
      or the processes could not connect.
  """
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
  # ValueError: arguments missing outside a known cluster. RuntimeError:
  # no connection to the coordinator before the timeout.
  except (ValueError, RuntimeError) as error:
    reason = ' '.join(str(error).split())[:300]
    raise ConfigError(
      f'--distributed could not start: {reason}; outside Cloud TPU, SLURM, '
      'Open MPI and Kubernetes give --coordinator_address=HOST:PORT, '
      '--num_processes and --process_id, the same address on every process'
    ) from error
  logging.info(
    'Process %d of %d, with %d of the %d devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Return a (data, model) mesh of `devices`, by default all of them.

  The model axis has size 1: every device keeps a whole model. The device
  order follows the hardware's links on TPU slices (`jax.make_mesh`).
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(
    (len(devices), 1),
    (DATA_AXIS, MODEL_AXIS),
    # Shardings propagate through jit as in earlier JAX versions.
    axis_types=(AxisType.Auto, AxisType.Auto),
    devices=devices,
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split the leading (example) axis across the mesh's data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Return the sharding that keeps a whole copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """Return how many parts each batch is split into."""
  return mesh.shape[DATA_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh, option: str) -> int:
  """Return the examples per device of a global batch of `batch_size`.

  Args:
    batch_size: the global batch.
    mesh: from `create_mesh`.
    option: the config option that set `batch_size`, for the message.

  Raises:
    ConfigError: `batch_size` does not split evenly across the devices.
  """
  devices = data_parallel_size(mesh)
  if batch_size % devices:
    lower = batch_size // devices * devices
    suggestion = f'{lower} or {lower + devices}' if lower else str(devices)
    raise ConfigError(
      f'{option}={batch_size} does not split evenly across the {devices} '
      f'devices of the {_platform(mesh)} mesh; use a multiple of {devices}, '
      f'such as {suggestion}'
    )
  return batch_size // devices


def round_up_batch(batch_size: int, mesh: Mesh, option: str) -> int:
  """Return `batch_size` rounded up to a multiple of the device count.

  For evaluation, whose results do not depend on the batch size: any
  --config.eval_batch_size works on any number of devices. A change is
  logged with `option`, the config option that set `batch_size`.
  """
  devices = data_parallel_size(mesh)
  rounded = -(-batch_size // devices) * devices
  if rounded != batch_size:
    logging.info(
      '%s=%d rounded up to %d, a multiple of the %d devices.',
      option,
      batch_size,
      rounded,
      devices,
    )
  return rounded


def _platform(mesh: Mesh) -> str:
  return mesh.devices.flat[0].platform


def describe(mesh: Mesh, batch_size: int) -> str:
  """Return a log line with the mesh's shape and the per-device batch."""
  shape = ' x '.join(f'{name} {size}' for name, size in mesh.shape.items())
  devices = data_parallel_size(mesh)
  return (
    f'Mesh of {mesh.devices.size} {_platform(mesh)} devices ({shape}) in '
    f'{jax.process_count()} process(es): global batch {batch_size}, '
    f'{batch_size // devices} per device.'
  )


def shard_batch(
  local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Assemble global arrays from each process's part of a batch.

  Args:
    local_batch: this process's rows of the global batch, 1 /
      process_count of it; the whole batch in a single process.
    sharding: from `batch_sharding`.

  Returns:
    Arrays of the global batch shape, split across the mesh's devices:
    process p's rows fill block p of process_count equal blocks, in
    process order. Copies to the devices run in the background.
  """
  return {
    key: jax.make_array_from_process_local_data(sharding, value)
    for key, value in local_batch.items()
  }


def place_replicated(function: Any, mesh: Mesh) -> Any:
  """Run `function()` under jit, with every output replicated on `mesh`.

  Initialisation this way gives arrays that span every process's devices,
  which a program on several processes needs and cannot build from one
  process's host values.
  """
  return jax.jit(function, out_shardings=replicated(mesh))()
