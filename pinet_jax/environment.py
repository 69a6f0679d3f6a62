"""The hardware and software a process runs on, for reports and run records."""

import importlib.metadata
import os
import platform

import jax

# Distributions whose versions decide results or speed; TensorFlow is
# 'tensorflow-cpu' on Linux and 'tensorflow' on macOS.
PACKAGES = (
  'pinet_jax',
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'orbax-checkpoint',
  'numpy',
  'tensorflow-cpu',
  'tensorflow',
  'tensorflow-datasets',
)


def _cpu_name() -> str:
  """Return the CPU model, such as 'Intel(R) Xeon(R) ...', where known."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    # No /proc (macOS, Windows): platform has a coarser name.
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  except (AttributeError, OSError, ValueError):
    # sysconf or these names are missing on some systems, such as Windows.
    return None


def _accelerators() -> str:
  devices = jax.devices()
  kinds = sorted({device.device_kind for device in devices})
  return f'{len(devices)} x {", ".join(kinds)} ({jax.default_backend()})'


def describe() -> dict[str, str]:
  """Return a JSON-serialisable description of this machine and software.

  Keys: 'os', 'cpu', 'cpu_count', 'memory', 'devices' (JAX's devices, such
  as '1 x cpu (cpu)'), 'python' and one per installed package of
  `PACKAGES`, valued with its version. Calling it initialises JAX's
  backend.
  """
  memory = _memory_gib()
  description = {
    'os': platform.platform(),
    'cpu': _cpu_name(),
    'cpu_count': str(os.cpu_count()),
    'memory': 'unknown' if memory is None else f'{memory:.1f} GiB',
    'devices': _accelerators(),
    'python': platform.python_version(),
  }
  for package in PACKAGES:
    try:
      description[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      # Only one of tensorflow-cpu and tensorflow is installed.
      continue
  return description
