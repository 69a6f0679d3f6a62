"""Import the weights of the reference PyTorch network into `PolyNet`.

The reference implementation names its layers `conv11`, `conv12` (the two
convolutions of block 1), ... `conv52` and `fc`, each with `.weight` and
`.bias`. PyTorch stores convolution kernels as (out, in, kh, kw) and
flattens the last feature map in (channel, row, column) order before `fc`;
Flax uses (kh, kw, in, out) kernels and `PolyNet` flattens in (row,
column, channel) order. `polynet_from_torch` converts both, so the
imported network computes the same logits for the same images (NCHW there,
NHWC here). Reading the state_dict needs numpy only: tensors are converted
with `.detach().cpu().numpy()` when they have those methods.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pinet_jax.models.polynet import POLYNET_BLOCKS, PolyNet

# Prefix that torch.nn.DataParallel and DistributedDataParallel add to
# every key of a wrapped model's state_dict.
WRAPPER_PREFIX = 'module.'


def reference_layer_names() -> list[str]:
  """Return the reference network's layer names, in order."""
  names = [
    f'conv{index}{twin}'
    for index in range(1, len(POLYNET_BLOCKS) + 1)
    for twin in (1, 2)
  ]
  return [*names, 'fc']


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):
    # float() first: numpy has no bfloat16, so .numpy() rejects it.
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
    return {key[len(WRAPPER_PREFIX) :]: v for key, v in state_dict.items()}
  return dict(state_dict)


def _read_tensors(
  state_dict: Mapping[str, Any], key_map: Mapping[str, str]
) -> dict[str, np.ndarray]:
  """Return {'conv11.weight': array, ...}, checking that keys match."""
  state_dict = _strip_wrapper_prefix(state_dict)
  unknown_layers = sorted(set(key_map) - set(reference_layer_names()))
  if unknown_layers:
    raise ValueError(
      f'key_map names layers {unknown_layers} that the reference network '
      f'does not have; its layers are {reference_layer_names()}'
    )
  expected = {
    f'{layer}.{kind}': f'{key_map.get(layer, layer)}.{kind}'
    for layer in reference_layer_names()
    for kind in ('weight', 'bias')
  }
  missing = sorted(key for key in expected.values() if key not in state_dict)
  unexpected = sorted(set(state_dict) - set(expected.values()))
  if missing or unexpected:
    raise ValueError(
      f'the state_dict does not match the reference network: missing keys '
      f'{missing}, unexpected keys {unexpected}; pass key_map to rename '
      "layers, for example key_map={'conv11': 'block1.conv_a'}"
    )
  return {name: _to_numpy(state_dict[key]) for name, key in expected.items()}


def polynet_from_torch(
  state_dict: Mapping[str, Any],
  key_map: Mapping[str, str] | None = None,
  formulation: str = 's2d',
) -> tuple[PolyNet, dict[str, Any]]:
  """Convert the reference network's PyTorch weights to a `PolyNet`.

  Args:
    state_dict: `model.state_dict()` of the reference network, torch
      tensors or numpy arrays. A 'module.' prefix on every key, as
      DataParallel saves them, is removed.
    key_map: reference layer name to the name in `state_dict`, for
      checkpoints whose layers are named differently; unmapped layers keep
      their reference names.
    formulation: passed to `PolyNet`; it changes speed, not results.

  Returns:
    The model, with in_channels, width and num_classes read from the
    weights, and its parameters as float32 numpy arrays:
    `model.apply({'params': params}, images)` with NHWC images gives the
    PyTorch model's logits for the same images in NCHW. The last feature
    map is taken as square, as it is for square images such as MNIST's and
    CIFAR-10's. Weights trained on non-square images would convert with
    the head's rows and columns mixed up.

  Raises:
    ValueError: keys are missing or unexpected, or a tensor's shape does
      not fit the reference network; the message names the tensor.
  """
  tensors = _read_tensors(state_dict, key_map or {})
  first = tensors['conv11.weight']
  if first.ndim != 4:
    raise ValueError(
      f'conv11.weight has shape {first.shape}, expected (out, in, kh, kw)'
    )
  width, in_channels = first.shape[:2]

  def check_shape(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if tensors[name].shape != shape:
      raise ValueError(
        f'{name} has shape {tensors[name].shape}, expected {shape} for the '
        f'reference network of width {width} on {in_channels}-channel '
        'images (both read from conv11.weight)'
      )
    return tensors[name]

  params: dict[str, Any] = {}
  channels = in_channels
  for index, spec in enumerate(POLYNET_BLOCKS, start=1):
    out = width * spec.width_multiplier
    block = {}
    for twin in (1, 2):
      name = f'conv{index}{twin}'
      kernel = check_shape(
        f'{name}.weight', (out, channels, spec.kernel_size, spec.kernel_size)
      )
      bias = check_shape(f'{name}.bias', (out,))
      block[f'conv_{twin}'] = {
        'kernel': kernel.transpose(2, 3, 1, 0),
        'bias': bias,
      }
    params[f'block_{index}'] = block
    channels = out

  weight = tensors['fc.weight']
  if weight.ndim != 2 or weight.shape[1] % channels:
    raise ValueError(
      f'fc.weight has shape {weight.shape}, expected (classes, '
      f'{channels} * height * width)'
    )
  num_classes = weight.shape[0]
  side = math.isqrt(weight.shape[1] // channels)
  if side * side * channels != weight.shape[1]:
    raise ValueError(
      f'fc.weight has {weight.shape[1]} inputs, which is not {channels} '
      'channels of a square feature map'
    )
  bias = check_shape('fc.bias', (num_classes,))
  # (classes, C*H*W) in NCHW order -> (H*W*C, classes) in NHWC order.
  kernel = weight.reshape(num_classes, channels, side, side)
  kernel = kernel.transpose(2, 3, 1, 0).reshape(-1, num_classes)
  params['head'] = {'kernel': kernel, 'bias': bias}

  model = PolyNet(
    num_classes=num_classes,
    in_channels=in_channels,
    width=width,
    formulation=formulation,
  )
  return model, params
