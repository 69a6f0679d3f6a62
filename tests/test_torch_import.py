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
