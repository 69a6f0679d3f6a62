"""PyTorch weights of the reference network, converted to PolyNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pinet_jax.models import torch_import
from pinet_jax.models.polynet import POLYNET_BLOCKS


def numpy_state_dict(in_channels=1, width=2, side=3, classes=10, seed=0):
  """Random float32 arrays with the reference network's names and shapes."""
  rng = np.random.default_rng(seed)
  state, channels = {}, in_channels
  for index, spec in enumerate(POLYNET_BLOCKS, start=1):
    out = width * spec.width_multiplier
    kernel = (out, channels, spec.kernel_size, spec.kernel_size)
    for twin in (1, 2):
      state[f'conv{index}{twin}.weight'] = rng.normal(size=kernel)
      state[f'conv{index}{twin}.bias'] = rng.normal(size=out)
    channels = out
  state['fc.weight'] = rng.normal(size=(classes, channels * side * side))
  state['fc.bias'] = rng.normal(size=classes)
  return {key: value.astype(np.float32) for key, value in state.items()}


def test_kernels_move_to_flax_layout():
  state = numpy_state_dict()
  model, params = torch_import.polynet_from_torch(state)
  assert (model.in_channels, model.width, model.num_classes) == (1, 2, 10)
  kernel = params['block_2']['conv_1']['kernel']
  assert kernel.shape == (4, 4, 2, 4)
  # Flax (kh, kw, in, out) against PyTorch (out, in, kh, kw).
  np.testing.assert_array_equal(
    kernel[1, 3, 0, 2], state['conv21.weight'][2, 0, 1, 3]
  )
  np.testing.assert_array_equal(
    params['block_5']['conv_2']['bias'], state['conv52.bias']
  )


def test_head_reads_nhwc_features_as_pytorch_reads_nchw():
  state = numpy_state_dict(width=2, side=3)
  _, params = torch_import.polynet_from_torch(state)
  features = np.random.default_rng(1).normal(size=(4, 3, 3, 32))
  torch_order = features.transpose(0, 3, 1, 2).reshape(4, -1)
  expected = torch_order @ state['fc.weight'].T + state['fc.bias']
  got = features.reshape(4, -1) @ params['head']['kernel']
  np.testing.assert_allclose(got + params['head']['bias'], expected, 1e-5)


def test_converted_params_fit_the_model():
  model, params = torch_import.polynet_from_torch(
    numpy_state_dict(in_channels=3, width=2)
  )
  template = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  shapes = jax.tree.map(lambda leaf: leaf.shape, template['params'])
  assert jax.tree.map(np.shape, params) == shapes


def test_data_parallel_prefix_is_removed():
  state = {f'module.{k}': v for k, v in numpy_state_dict().items()}
  _, params = torch_import.polynet_from_torch(state)
  assert params['head']['kernel'].shape == (3 * 3 * 32, 10)


def test_key_map_renames_layers():
  state = numpy_state_dict()
  state['stem.a.weight'] = state.pop('conv11.weight')
  state['stem.a.bias'] = state.pop('conv11.bias')
  _, params = torch_import.polynet_from_torch(
    state, key_map={'conv11': 'stem.a'}
  )
  np.testing.assert_array_equal(
    params['block_1']['conv_1']['bias'], state['stem.a.bias']
  )


def test_missing_and_unexpected_keys_are_named():
  state = numpy_state_dict()
  state['extra.weight'] = state.pop('conv31.weight')
  with pytest.raises(
    ValueError,
    match=r"missing keys \['conv31.weight'\], unexpected keys "
    r"\['extra.weight'\]; pass key_map",
  ):
    torch_import.polynet_from_torch(state)


def test_key_map_of_unknown_layer_is_rejected():
  with pytest.raises(ValueError, match=r"key_map names layers \['conv61'\]"):
    torch_import.polynet_from_torch(numpy_state_dict(), {'conv61': 'x'})


def test_wrong_shape_is_named():
  state = numpy_state_dict()
  state['conv41.weight'] = state['conv41.weight'][:, :, :1]
  with pytest.raises(
    ValueError,
    match=r'conv41.weight has shape \(16, 8, 1, 2\), expected '
    r'\(16, 8, 2, 2\) for the reference network of width 2',
  ):
    torch_import.polynet_from_torch(state)


def test_non_square_head_is_rejected():
  state = numpy_state_dict()
  state['fc.weight'] = state['fc.weight'][:, :-32]
  with pytest.raises(ValueError, match='not 32 channels of a square'):
    torch_import.polynet_from_torch(state)


@pytest.mark.parametrize(
  'in_channels, image_size', [(1, 28), (3, 32)], ids=['mnist', 'cifar10']
)
def test_logits_match_pytorch(in_channels, image_size):
  torch = pytest.importorskip('torch')
  from pinet_jax.torch_reference import TorchPolyNet

  torch.manual_seed(0)
  reference = TorchPolyNet(in_channels, 10, 16, image_size).eval()
  images = (
    np.random.default_rng(2)
    .uniform(size=(8, image_size, image_size, in_channels))
    .astype(np.float32)
  )
  with torch.no_grad():
    expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  model, params = torch_import.polynet_from_torch(reference.state_dict())
  logits = model.apply({'params': params}, images)
  scale = float(np.max(np.abs(expected.numpy())))
  np.testing.assert_allclose(
    logits, expected.numpy(), rtol=1e-5, atol=1e-5 * scale
  )


def test_bfloat16_tensors_convert():
  torch = pytest.importorskip('torch')
  state = {
    key: torch.from_numpy(value).to(torch.bfloat16)
    for key, value in numpy_state_dict().items()
  }
  _, params = torch_import.polynet_from_torch(state)
  kernel = params['block_1']['conv_1']['kernel']
  assert kernel.dtype == np.float32
  expected = state['conv11.weight'].float().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel, expected)


def piresnet_state_dict(
  stage_sizes=(1, 2),
  width=2,
  in_channels=3,
  classes=5,
  stem_size=3,
  product_conv=False,
):
  """Random numpy tensors with TorchPiResNet's names and shapes."""
  rng = np.random.default_rng(0)
  state = {}

  def conv(name, out, inputs, size):
    shape = (out, inputs, size, size)
    state[f'{name}.weight'] = rng.normal(size=shape).astype(np.float32)

  def batch_norm(name, channels):
    for tensor in ('weight', 'bias', 'running_mean', 'running_var'):
      values = rng.uniform(0.5, 1.5, size=channels).astype(np.float32)
      state[f'{name}.{tensor}'] = values
    state[f'{name}.num_batches_tracked'] = np.array(7, dtype=np.int64)

  conv('conv1', width, in_channels, stem_size)
  batch_norm('bn1', width)
  channels = width
  for stage, size in enumerate(stage_sizes, start=1):
    out = width * 2 ** (stage - 1)
    for index in range(size):
      block = f'layer{stage}.{index}'
      conv(f'{block}.conv1', out, channels, 3)
      batch_norm(f'{block}.bn1', out)
      conv(f'{block}.conv2', out, out, 3)
      batch_norm(f'{block}.bn2', out)
      if stage > 1 and index == 0:
        conv(f'{block}.downsample.0', out, channels, 1)
        batch_norm(f'{block}.downsample.1', out)
      if product_conv:
        conv(f'{block}.conv3', out, out, 1)
      batch_norm(f'{block}.bn3', out)
      channels = out
  state['fc.weight'] = rng.normal(size=(classes, channels)).astype(np.float32)
  state['fc.bias'] = rng.normal(size=classes).astype(np.float32)
  return state


@pytest.mark.parametrize(
  'stem_size, layout',
  [(3, 'cifar'), (7, 'imagenet')],
  ids=['cifar', 'imagenet'],
)
def test_piresnet_architecture_is_read(stem_size, layout):
  state = piresnet_state_dict(
    stage_sizes=(2, 1, 3),
    width=4,
    in_channels=1,
    classes=7,
    stem_size=stem_size,
    product_conv=True,
  )
  model, _ = torch_import.piresnet_from_torch(state)
  assert model.layout == layout
  assert tuple(model.stage_sizes) == (2, 1, 3)
  assert model.width == 4
  assert model.in_channels == 1
  assert model.num_classes == 7
  assert model.product_conv
  assert model.block == 'pi'


def test_piresnet_product_conv_absent_without_conv3():
  model, _ = torch_import.piresnet_from_torch(piresnet_state_dict())
  assert not model.product_conv


@pytest.mark.parametrize('product_conv', [False, True])
def test_piresnet_variables_fit_the_model(product_conv):
  state = piresnet_state_dict(stage_sizes=(2, 2), product_conv=product_conv)
  model, variables = torch_import.piresnet_from_torch(state)
  template = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))
  )
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
    lambda leaf: leaf.shape, template
  )


def test_piresnet_tensors_move_to_flax_layout():
  state = piresnet_state_dict(product_conv=True)
  _, variables = torch_import.piresnet_from_torch(state)
  params = variables['params']
  stats = variables['batch_stats']
  block = params['stage_2_block_1']

  # Flax (kh, kw, in, out) against PyTorch (out, in, kh, kw).
  np.testing.assert_array_equal(
    block['conv_1']['kernel'][2, 1, 0, 3],
    state['layer2.0.conv1.weight'][3, 0, 2, 1],
  )
  np.testing.assert_array_equal(
    block['shortcut_conv']['kernel'][0, 0, 1, 2],
    state['layer2.0.downsample.0.weight'][2, 1, 0, 0],
  )
  np.testing.assert_array_equal(
    block['product_conv']['kernel'][0, 0, 3, 1],
    state['layer2.0.conv3.weight'][1, 3, 0, 0],
  )

  np.testing.assert_array_equal(
    block['shortcut_norm']['scale'], state['layer2.0.downsample.1.weight']
  )
  np.testing.assert_array_equal(
    block['norm_3']['bias'], state['layer2.0.bn3.bias']
  )
  np.testing.assert_array_equal(
    stats['stage_2_block_2']['norm_2']['mean'],
    state['layer2.1.bn2.running_mean'],
  )
  np.testing.assert_array_equal(
    stats['stem_norm']['var'], state['bn1.running_var']
  )

  np.testing.assert_array_equal(params['head']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(params['head']['bias'], state['fc.bias'])


def test_piresnet_data_parallel_prefix_is_removed():
  state = {f'module.{k}': v for k, v in piresnet_state_dict().items()}
  model, variables = torch_import.piresnet_from_torch(state)
  assert tuple(model.stage_sizes) == (1, 2)
  np.testing.assert_array_equal(
    variables['params']['head']['bias'], state['module.fc.bias']
  )


def test_piresnet_key_map_renames_layers():
  state = piresnet_state_dict()
  renames = {'layer2.0.downsample.0': 'stages.1.0.skip_conv', 'fc': 'head'}
  for layer, name in renames.items():
    for key in [key for key in state if key.startswith(f'{layer}.')]:
      state[name + key[len(layer) :]] = state.pop(key)
  _, variables = torch_import.piresnet_from_torch(state, key_map=renames)
  params = variables['params']
  np.testing.assert_array_equal(
    params['stage_2_block_1']['shortcut_conv']['kernel'][0, 0, 1, 2],
    state['stages.1.0.skip_conv.weight'][2, 1, 0, 0],
  )
  np.testing.assert_array_equal(params['head']['bias'], state['head.bias'])


def test_piresnet_missing_key_is_named():
  state = piresnet_state_dict()
  del state['layer2.1.bn3.running_var']
  with pytest.raises(
    ValueError,
    match=r"missing keys \['layer2.1.bn3.running_var'\], unexpected keys "
    r'\[\]; pass key_map',
  ):
    torch_import.piresnet_from_torch(state)


def test_piresnet_missing_key_uses_mapped_name():
  state = piresnet_state_dict()
  state['head.weight'] = state.pop('fc.weight')
  del state['fc.bias']
  with pytest.raises(ValueError, match=r"missing keys \['head.bias'\]"):
    torch_import.piresnet_from_torch(state, key_map={'fc': 'head'})


def test_piresnet_unexpected_key_is_named():
  state = piresnet_state_dict()
  state['layer1.0.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(
    ValueError,
    match=r"missing keys \[\], unexpected keys \['layer1.0.extra.weight'\]",
  ):
    torch_import.piresnet_from_torch(state)


def test_piresnet_old_layer_name_is_unexpected():
  state = piresnet_state_dict()
  # key_map maps fc to head, so keys under the name fc are unexpected.
  state['head.weight'] = state['fc.weight']
  state['head.bias'] = state['fc.bias']
  with pytest.raises(
    ValueError, match=r"unexpected keys \['fc.bias', 'fc.weight'\]"
  ):
    torch_import.piresnet_from_torch(state, key_map={'fc': 'head'})


def test_piresnet_key_map_of_unknown_layer_is_rejected():
  with pytest.raises(
    ValueError, match=r"key_map names layers \['layer3.0.conv1'\]"
  ):
    torch_import.piresnet_from_torch(
      piresnet_state_dict(), {'layer3.0.conv1': 'x'}
    )


def test_piresnet_wrong_shape_is_named():
  state = piresnet_state_dict(width=2)
  state['layer2.0.conv2.weight'] = state['layer2.0.conv2.weight'][:, :3]
  with pytest.raises(
    ValueError,
    match=r'layer2.0.conv2.weight has shape \(4, 3, 3, 3\), expected '
    r'\(4, 4, 3, 3\) for a PiResNet with stage_sizes \(1, 2\), width 2',
  ):
    torch_import.piresnet_from_torch(state)


def test_piresnet_wrong_head_width_is_named():
  state = piresnet_state_dict(width=2)
  state['fc.weight'] = state['fc.weight'][:, :3]
  with pytest.raises(
    ValueError, match=r'fc.weight has shape \(5, 3\), expected \(5, 4\)'
  ):
    torch_import.piresnet_from_torch(state)


def test_piresnet_missing_stage_is_rejected():
  state = piresnet_state_dict(stage_sizes=(1, 1, 1))
  state = {k: v for k, v in state.items() if not k.startswith('layer2.')}
  with pytest.raises(
    ValueError,
    match=r"inconsistent stages: the state_dict has blocks in \['layer1', "
    r"'layer3'\], expected layer1 to layer3",
  ):
    torch_import.piresnet_from_torch(state)


def test_piresnet_missing_block_is_rejected():
  state = piresnet_state_dict(stage_sizes=(1, 3))
  state = {k: v for k, v in state.items() if not k.startswith('layer2.1.')}
  with pytest.raises(
    ValueError,
    match=r'inconsistent stage layer2: the state_dict has its blocks '
    r'\[0, 2\], expected 0 to 2',
  ):
    torch_import.piresnet_from_torch(state)


def test_piresnet_without_blocks_is_rejected():
  state = {
    k: v for k, v in piresnet_state_dict().items() if not k.startswith('layer')
  }
  with pytest.raises(ValueError, match=r'no block keys layerK\.N\.\*'):
    torch_import.piresnet_from_torch(state)


def test_piresnet_missing_stem_is_rejected():
  state = piresnet_state_dict()
  del state['conv1.weight']
  with pytest.raises(ValueError, match=r'the state_dict has no conv1.weight'):
    torch_import.piresnet_from_torch(state)


def test_piresnet_unknown_stem_kernel_is_rejected():
  state = piresnet_state_dict(stem_size=5)
  with pytest.raises(
    ValueError,
    match=r'conv1.weight has shape \(2, 3, 5, 5\), expected \(width, '
    r'in_channels, 3, 3\) for the cifar layout',
  ):
    torch_import.piresnet_from_torch(state)


def randomise_batch_norms(model, seed):
  """Give every BatchNorm random statistics, scales and biases.

  The initial values would hide conversion errors: every bn2 scale is 0, so
  each block is the identity, and every other BatchNorm has mean 0, var 1,
  scale 1 and bias 0.
  """
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        channels = module.num_features

        def uniform(low, high, channels=channels):
          values = torch.rand(channels, generator=generator)
          return low + (high - low) * values

        module.weight.copy_(uniform(0.5, 1.5))
        module.bias.copy_(uniform(-0.3, 0.3))
        module.running_mean.copy_(uniform(-0.3, 0.3))
        module.running_var.copy_(uniform(0.5, 1.5))


PARITY_CASES = {
  'cifar': (dict(stage_sizes=(1, 1), width=8), (3, 32)),
  'cifar_product_conv': (
    dict(stage_sizes=(1, 1), width=8, product_conv=True),
    (3, 32),
  ),
  'mnist': (dict(stage_sizes=(1, 1), width=8, in_channels=1), (1, 28)),
  'imagenet_64': (
    dict(stage_sizes=(1, 1, 1, 1), width=8, layout='imagenet'),
    (3, 64),
  ),
  'imagenet_224_product_conv': (
    dict(
      stage_sizes=(1, 1, 1, 1), width=8, layout='imagenet', product_conv=True
    ),
    (3, 224),
  ),
}


@pytest.mark.parametrize('case', list(PARITY_CASES))
def test_piresnet_logits_match_pytorch(case):
  torch = pytest.importorskip('torch')
  from pinet_jax.torch_reference import TorchPiResNet

  kwargs, (in_channels, side) = PARITY_CASES[case]
  torch.manual_seed(0)
  reference = TorchPiResNet(num_classes=10, **kwargs)
  randomise_batch_norms(reference, seed=1)
  reference.eval()
  images = (
    np.random.default_rng(2)
    .uniform(size=(2, in_channels, side, side))
    .astype(np.float32)
  )
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  model, variables = torch_import.piresnet_from_torch(reference.state_dict())
  logits = model.apply(variables, images.transpose(0, 2, 3, 1))
  scale = float(np.max(np.abs(expected)))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize('product_conv', [False, True])
def test_piresnet_state_dict_names_match_torch_reference(product_conv):
  pytest.importorskip('torch')
  from pinet_jax.torch_reference import TorchPiResNet

  reference = TorchPiResNet(
    num_classes=5,
    stage_sizes=(1, 2),
    width=2,
    layout='imagenet',
    product_conv=product_conv,
  )
  expected = piresnet_state_dict(stem_size=7, product_conv=product_conv)
  shapes = {key: tuple(v.shape) for key, v in reference.state_dict().items()}
  assert shapes == {key: v.shape for key, v in expected.items()}
