"""Import PyTorch weights into `PolyNet` and `PiResNet`.

`polynet_from_torch` reads the reference network, whose layers are named
`conv11`, `conv12` (the two convolutions of block 1), ... `conv52` and
`fc`, each with `.weight` and `.bias`. `piresnet_from_torch` reads a Π-net
ResNet with the 'pi' block named as torchvision names its ResNets (`conv1`,
`bn1`, `layer1.0.conv1`, ... `layer1.0.downsample.0`, `fc`), as
`pinet_jax.torch_reference.TorchPiResNet` saves it.

PyTorch stores convolution kernels as (out, in, kh, kw) and Linear weights
as (out, in); Flax uses (kh, kw, in, out) and (in, out). The reference
network also flattens its last feature map in (channel, row, column) order
before `fc`, where `PolyNet` flattens in (row, column, channel) order. The
functions here convert all of these, so the imported network computes the
same logits for the same images (NCHW there, NHWC here). Reading a
state_dict needs numpy only: tensors are converted with
`.detach().cpu().numpy()` when they have those methods.

Both functions take a `key_map` from the expected layer name (the key
without `.weight`, `.bias`, ...) to the layer's name in the state_dict, for
checkpoints that name their layers differently.
"""

import math
import re
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import numpy as np

from pinet_jax.models.polynet import POLYNET_BLOCKS, PolyNet
from pinet_jax.models.resnet import PiResNet

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


class _RenamedState(NamedTuple):
  """A state_dict with the layer names that the importer expects."""

  # The state_dict's values, not yet converted, by the expected keys.
  tensors: dict[str, Any]
  # Keys of layers that key_map gives another name, so they are unexpected.
  stray_keys: list[str]


def _split_key(key: str) -> tuple[str, str]:
  """Split 'layer1.0.bn1.running_mean' into ('layer1.0.bn1', 'running_mean')."""
  layer, _, tensor = key.rpartition('.')
  return layer, tensor


def _state_dict_key(key: str, key_map: Mapping[str, str]) -> str:
  """Return the state_dict's name for the expected `key`."""
  layer, tensor = _split_key(key)
  return f'{key_map[layer]}.{tensor}' if layer in key_map else key


def _rename_layers(
  state_dict: Mapping[str, Any], key_map: Mapping[str, str]
) -> _RenamedState:
  """Strip the wrapper prefix and give each mapped layer its expected name."""
  expected_layer = {name: layer for layer, name in key_map.items()}
  if len(expected_layer) != len(key_map):
    raise ValueError(
      f'key_map gives two layers the same name: {dict(key_map)}; map each '
      'layer to a distinct name'
    )
  tensors, stray_keys = {}, []
  for key, value in _strip_wrapper_prefix(state_dict).items():
    layer, tensor = _split_key(key)
    if layer in expected_layer:
      tensors[f'{expected_layer[layer]}.{tensor}'] = value
    elif layer in key_map:
      stray_keys.append(key)
    else:
      tensors[key] = value
  return _RenamedState(tensors, stray_keys)


def _check_keys(
  state: _RenamedState,
  expected: list[str],
  optional: Collection[str],
  key_map: Mapping[str, str],
  network: str,
  example: str,
) -> None:
  """Raise ValueError unless `state` has exactly the `expected` keys.

  Args:
    state: the state_dict after `_rename_layers`.
    expected: the keys that the network needs, in its layers' order.
    optional: further keys that may be present and are ignored.
    key_map: as passed to the importer, to name keys as the state_dict does.
    network: the network's description, for the messages.
    example: a key_map for the messages.
  """
  layers = list(dict.fromkeys(_split_key(key)[0] for key in expected))
  unknown_layers = sorted(set(key_map) - set(layers))
  if unknown_layers:
    raise ValueError(
      f'key_map names layers {unknown_layers} that {network} does not '
      f'have; its layers are {layers}'
    )
  missing = sorted(
    _state_dict_key(key, key_map)
    for key in expected
    if key not in state.tensors
  )
  expected_or_optional = set(expected) | set(optional)
  unexpected = sorted(
    state.stray_keys
    + [
      _state_dict_key(key, key_map)
      for key in state.tensors
      if key not in expected_or_optional
    ]
  )
  if missing or unexpected:
    raise ValueError(
      f'the state_dict does not match {network}: missing keys {missing}, '
      f'unexpected keys {unexpected}; pass key_map to rename layers, for '
      f'example key_map={example}'
    )


def _read_tensors(
  state_dict: Mapping[str, Any], key_map: Mapping[str, str]
) -> dict[str, np.ndarray]:
  """Return {'conv11.weight': array, ...}, checking that keys match."""
  expected = [
    f'{layer}.{tensor}'
    for layer in reference_layer_names()
    for tensor in ('weight', 'bias')
  ]
  state = _rename_layers(state_dict, key_map)
  _check_keys(
    state,
    expected,
    (),
    key_map,
    'the reference network',
    "{'conv11': 'block1.conv_a'}",
  )
  return {key: _to_numpy(state.tensors[key]) for key in expected}


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


class _Layer(NamedTuple):
  """One PyTorch layer of a `PiResNet` and its place in the Flax tree."""

  # torchvision-style name, such as 'layer2.0.downsample.0'.
  torch_name: str
  # Module path in the Flax tree, such as ('stage_2_block_1', 'shortcut_conv').
  flax_path: tuple[str, ...]
  # 'conv', 'batch_norm' or 'linear'.
  kind: str
  # The weight's shape in PyTorch's layout: (out, in, kh, kw) for 'conv',
  # (channels,) for 'batch_norm', (out, in) for 'linear'.
  shape: tuple[int, ...]


# Layers by name: layerK.N.* (stage K from 1, block N from 0), and a block's
# optional 1x1 convolution on the product.
_BLOCK_KEY = re.compile(r'layer(\d+)\.(\d+)\.')
_PRODUCT_CONV_KEY = re.compile(r'layer\d+\.\d+\.conv3\.')

# The tensors of each kind of layer. A BatchNorm's num_batches_tracked only
# counts training steps, so it may be present and is ignored.
_LAYER_TENSORS = {
  'conv': ('weight',),
  'batch_norm': ('weight', 'bias', 'running_mean', 'running_var'),
  'linear': ('weight', 'bias'),
}
_IGNORED_BATCH_NORM_TENSOR = 'num_batches_tracked'

_KEY_MAP_EXAMPLE = "{'layer1.0.conv1': 'stage1.0.conv_a'}"


def _block_layers(
  torch_prefix: str,
  flax_name: str,
  in_channels: int,
  channels: int,
  downsample: bool,
  product_conv: bool,
) -> list[_Layer]:
  """List one 'pi' block's layers, in `ResidualBlock`'s order."""

  def layer(
    name: str, flax_layer: str, kind: str, shape: tuple[int, ...]
  ) -> _Layer:
    return _Layer(
      f'{torch_prefix}.{name}', (flax_name, flax_layer), kind, shape
    )

  layers = [
    layer('conv1', 'conv_1', 'conv', (channels, in_channels, 3, 3)),
    layer('bn1', 'norm_1', 'batch_norm', (channels,)),
    layer('conv2', 'conv_2', 'conv', (channels, channels, 3, 3)),
    layer('bn2', 'norm_2', 'batch_norm', (channels,)),
  ]
  if downsample:
    layers += [
      layer(
        'downsample.0', 'shortcut_conv', 'conv', (channels, in_channels, 1, 1)
      ),
      layer('downsample.1', 'shortcut_norm', 'batch_norm', (channels,)),
    ]
  if product_conv:
    layers.append(
      layer('conv3', 'product_conv', 'conv', (channels, channels, 1, 1))
    )
  layers.append(layer('bn3', 'norm_3', 'batch_norm', (channels,)))
  return layers


def _piresnet_layers(model: PiResNet) -> list[_Layer]:
  """List the layers of `model` (block='pi') in torchvision-style names."""
  stem_size = 7 if model.layout == 'imagenet' else 3
  layers = [
    _Layer(
      'conv1',
      ('stem_conv',),
      'conv',
      (model.width, model.in_channels, stem_size, stem_size),
    ),
    _Layer('bn1', ('stem_norm',), 'batch_norm', (model.width,)),
  ]
  channels = model.width
  for stage, size in enumerate(model.stage_sizes):
    features = model.width * 2**stage
    for index in range(size):
      # PiResNet's rule: a stride-2 first block from the second stage on,
      # and a downsampling shortcut where the stride or the width changes.
      downsample = (stage > 0 and index == 0) or channels != features
      layers += _block_layers(
        f'layer{stage + 1}.{index}',
        f'stage_{stage + 1}_block_{index + 1}',
        channels,
        features,
        downsample,
        model.product_conv,
      )
      channels = features
  layers.append(
    _Layer('fc', ('head',), 'linear', (model.num_classes, channels))
  )
  return layers


def _tensor_shapes(layer: _Layer) -> dict[str, tuple[int, ...]]:
  """Return {key: shape} of the tensors that `layer` has in a state_dict."""
  shapes = {}
  for tensor in _LAYER_TENSORS[layer.kind]:
    shape = layer.shape
    if layer.kind == 'linear' and tensor == 'bias':
      shape = layer.shape[:1]
    shapes[f'{layer.torch_name}.{tensor}'] = shape
  return shapes


def _stage_sizes(keys: Collection[str]) -> tuple[int, ...]:
  """Count the blocks of each stage from the layerK.N.* keys.

  Raises:
    ValueError: there are no such keys, or a stage or a block is missing
      between the first and the last.
  """
  blocks: dict[int, set[int]] = {}
  for key in keys:
    match = _BLOCK_KEY.match(key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if not blocks:
    raise ValueError(
      'the state_dict has no block keys layerK.N.* (stage K from 1, block N '
      'from 0), so its stages are unknown; pass key_map to rename the '
      f"blocks' layers, for example key_map={_KEY_MAP_EXAMPLE}"
    )
  stages = sorted(blocks)
  if stages != list(range(1, len(stages) + 1)):
    raise ValueError(
      'inconsistent stages: the state_dict has blocks in '
      f'{[f"layer{stage}" for stage in stages]}, expected layer1 to '
      f'layer{stages[-1]} with none missing'
    )
  for stage in stages:
    indices = sorted(blocks[stage])
    if indices != list(range(len(indices))):
      raise ValueError(
        f'inconsistent stage layer{stage}: the state_dict has its blocks '
        f'{indices}, expected 0 to {indices[-1]} with none missing'
      )
  return tuple(len(blocks[stage]) for stage in stages)


def _required_weight(
  tensors: Mapping[str, Any], key: str, ndim: int, key_map: Mapping[str, str]
) -> np.ndarray:
  """Return the weight that the architecture is read from, checking ndim."""
  name = _state_dict_key(key, key_map)
  if key not in tensors:
    raise ValueError(
      f'the state_dict has no {name}, from which the architecture is read; '
      'pass key_map if that layer has another name'
    )
  weight = _to_numpy(tensors[key])
  if weight.ndim != ndim:
    raise ValueError(
      f'{name} has shape {weight.shape}, expected {ndim} dimensions'
    )
  return weight


def _infer_piresnet(
  tensors: Mapping[str, Any], key_map: Mapping[str, str]
) -> PiResNet:
  """Build the `PiResNet` that the expected-name `tensors` describe."""
  stem = _required_weight(tensors, 'conv1.weight', 4, key_map)
  layouts = {(3, 3): 'cifar', (7, 7): 'imagenet'}
  if stem.shape[2:] not in layouts:
    raise ValueError(
      f'{_state_dict_key("conv1.weight", key_map)} has shape {stem.shape}, '
      'expected (width, in_channels, 3, 3) for the cifar layout or '
      '(width, in_channels, 7, 7) for the imagenet layout'
    )
  head = _required_weight(tensors, 'fc.weight', 2, key_map)
  return PiResNet(
    num_classes=head.shape[0],
    in_channels=stem.shape[1],
    stage_sizes=_stage_sizes(tensors),
    width=stem.shape[0],
    layout=layouts[stem.shape[2:]],
    block='pi',
    product_conv=any(_PRODUCT_CONV_KEY.match(key) for key in tensors),
  )


def _describe(model: PiResNet) -> str:
  """Describe `model` for error messages, with where each figure is from."""
  product_conv = ' and product_conv' if model.product_conv else ''
  return (
    f'a PiResNet with stage_sizes {tuple(model.stage_sizes)}, width '
    f'{model.width}, {model.in_channels} input channels, '
    f'{model.num_classes} classes, the {model.layout} layout{product_conv} '
    '(read from conv1.weight, the layerK.N.* keys and fc.weight)'
  )


def _flax_variables(
  layer: _Layer, arrays: Mapping[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
  """Return {collection: {name: array}} of `layer` in Flax's layout."""
  name = layer.torch_name
  weight = arrays[f'{name}.weight']
  if layer.kind == 'conv':
    return {'params': {'kernel': weight.transpose(2, 3, 1, 0)}}
  if layer.kind == 'linear':
    return {'params': {'kernel': weight.T, 'bias': arrays[f'{name}.bias']}}
  return {
    'params': {'scale': weight, 'bias': arrays[f'{name}.bias']},
    'batch_stats': {
      'mean': arrays[f'{name}.running_mean'],
      'var': arrays[f'{name}.running_var'],
    },
  }


def _checked_arrays(
  state: _RenamedState,
  shapes: Mapping[str, tuple[int, ...]],
  key_map: Mapping[str, str],
  network: str,
) -> dict[str, np.ndarray]:
  """Convert the tensors named in `shapes`, checking each one's shape."""
  arrays = {}
  for key, shape in shapes.items():
    arrays[key] = _to_numpy(state.tensors[key])
    if arrays[key].shape != shape:
      raise ValueError(
        f'{_state_dict_key(key, key_map)} has shape {arrays[key].shape}, '
        f'expected {shape} for {network}'
      )
  return arrays


def _flax_tree(
  layers: list[_Layer], arrays: Mapping[str, np.ndarray]
) -> dict[str, Any]:
  """Return {'params': ..., 'batch_stats': ...} nested as in `PiResNet`."""
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for layer in layers:
    for collection, leaves in _flax_variables(layer, arrays).items():
      module = variables[collection]
      for name in layer.flax_path:
        module = module.setdefault(name, {})
      module.update(leaves)
  return variables


def piresnet_from_torch(
  state_dict: Mapping[str, Any],
  key_map: Mapping[str, str] | None = None,
) -> tuple[PiResNet, dict[str, Any]]:
  """Convert a PyTorch Π-net ResNet's weights to a `PiResNet`.

  The architecture is read from the state_dict. conv1's kernel size gives
  the layout (3: 'cifar', 7: 'imagenet') and its shape the width and the
  input channels. The layerK.N.* keys give the stage sizes, layerK.N.conv3
  keys turn on product_conv, and fc.weight gives the classes.

  Convolution kernels (out, in, kh, kw) become (kh, kw, in, out), and
  fc.weight (classes, features) becomes (features, classes). A BatchNorm's
  weight, bias, running_mean and running_var become its scale, bias, mean
  and var. Its num_batches_tracked is ignored.

  Args:
    state_dict: `model.state_dict()` of a
      `pinet_jax.torch_reference.TorchPiResNet` or of a network with the
      same layers and names, torch tensors or numpy arrays. A 'module.'
      prefix on every key, as DataParallel saves them, is removed.
    key_map: expected layer name (such as 'conv1', 'layer2.0.downsample.0'
      or 'fc') to the layer's name in `state_dict` after that prefix is
      removed. The tensor suffixes (.weight, .running_mean, ...) stay, and
      unmapped layers keep their expected names.

  Returns:
    The model (block='pi') and its variables {'params': ...,
    'batch_stats': ...} as float32 numpy arrays:
    `model.apply(variables, images)` with NHWC images gives the PyTorch
    model's logits in evaluation mode for the same images in NCHW.

  Raises:
    ValueError: keys are missing or unexpected, the stages are
      inconsistent, or a tensor's shape does not fit the architecture. The
      message names the keys as the state_dict has them, less a 'module.'
      prefix.
  """
  key_map = key_map or {}
  state = _rename_layers(state_dict, key_map)
  model = _infer_piresnet(state.tensors, key_map)
  layers = _piresnet_layers(model)
  shapes = {
    key: shape
    for layer in layers
    for key, shape in _tensor_shapes(layer).items()
  }
  ignored = [
    f'{layer.torch_name}.{_IGNORED_BATCH_NORM_TENSOR}'
    for layer in layers
    if layer.kind == 'batch_norm'
  ]
  network = _describe(model)
  _check_keys(state, list(shapes), ignored, key_map, network, _KEY_MAP_EXAMPLE)
  arrays = _checked_arrays(state, shapes, key_map, network)
  return model, _flax_tree(layers, arrays)
