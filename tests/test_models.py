"""The reference network's exact structure, sizes and initialisation."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pinet_jax import models, steps

# (in_channels, image size, parameter count, spatial size after each block)
DATASETS = {
  'mnist': (1, 28, 1_220_362, [28, 14, 7, 6, 3]),
  'cifar10': (3, 32, 1_220_938, [32, 16, 8, 7, 3]),
}


def init_polynet(in_channels, size, **kwargs):
  model = models.PolyNet(in_channels=in_channels, **kwargs)
  variables = jax.jit(model.init)(
    jax.random.key(0), jnp.zeros((1, size, size, in_channels))
  )
  return model, variables


@pytest.mark.parametrize('dataset', sorted(DATASETS))
def test_parameter_count(dataset):
  in_channels, size, expected, _ = DATASETS[dataset]
  _, variables = init_polynet(in_channels, size)
  count = sum(leaf.size for leaf in jax.tree.leaves(variables))
  assert count == expected


@pytest.mark.parametrize('dataset', sorted(DATASETS))
def test_block_output_sizes(dataset):
  in_channels, size, _, expected_sizes = DATASETS[dataset]
  model, variables = init_polynet(in_channels, size)
  _, state = model.apply(
    variables,
    jnp.zeros((2, size, size, in_channels)),
    capture_intermediates=True,
    mutable=['intermediates'],
  )
  inter = state['intermediates']
  for index, expected in enumerate(expected_sizes, start=1):
    (output,) = inter[f'block_{index}']['__call__']
    channels = 16 * 2 ** (index - 1)
    chex.assert_shape(output, (2, expected, expected, channels))


@pytest.mark.parametrize('dataset', sorted(DATASETS))
def test_block_sizes_match_pytorch_formula(dataset):
  _, size, _, expected_sizes = DATASETS[dataset]
  specs = [
    (spec.kernel_size, spec.strides, spec.padding)
    for spec in models.POLYNET_BLOCKS
  ]
  sizes = []
  for kernel, stride, padding in specs:
    # PyTorch's Conv2d: floor((H + 2p - k) / s) + 1.
    size = int(np.floor((size + 2 * padding - kernel) / stride)) + 1
    sizes.append(size)
  assert sizes == expected_sizes
  assert models.block_output_sizes(DATASETS[dataset][1], specs) == sizes


@pytest.mark.parametrize('dataset', sorted(DATASETS))
def test_logits_shape(dataset):
  in_channels, size, _, _ = DATASETS[dataset]
  model, variables = init_polynet(in_channels, size)
  logits = model.apply(variables, jnp.full((3, size, size, in_channels), 0.5))
  chex.assert_shape(logits, (3, 10))
  chex.assert_tree_all_finite(logits)


def test_head_input_is_flattened_final_map():
  _, variables = init_polynet(1, 28)
  chex.assert_shape(variables['params']['head']['kernel'], (256 * 3 * 3, 10))


def test_wrong_channel_count_raises():
  model = models.PolyNet(in_channels=1)
  expected = r'got \(1, 28, 28, 3\); set in_channels'
  with pytest.raises(ValueError, match=expected):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))


def test_too_small_input_raises():
  model = models.PolyNet(in_channels=1)
  with pytest.raises(ValueError, match='block 5'):
    model.init(jax.random.key(0), jnp.zeros((1, 10, 10, 1)))


def test_product_block_is_hadamard_product_of_twin_convs():
  block = models.ProductBlock(features=5, kernel_size=3, padding=1)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  variables = block.init(jax.random.key(2), x)
  params = variables['params']

  def conv(p):
    out = jax.lax.conv_general_dilated(
      x,
      p['kernel'],
      (1, 1),
      [(1, 1), (1, 1)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return out + p['bias']

  expected = conv(params['conv_1']) * conv(params['conv_2'])
  np.testing.assert_allclose(
    block.apply(variables, x), expected, rtol=1e-5, atol=1e-6
  )


def test_product_block_is_degree_two():
  # A degree-2 homogeneous part plus lower terms: with zero biases the
  # output scales exactly as t^2 when the input scales as t.
  block = models.ProductBlock(features=3, kernel_size=3, padding=1)
  x = jax.random.normal(jax.random.key(3), (1, 5, 5, 2))
  variables = block.init(jax.random.key(4), x)
  variables = jax.tree.map(
    lambda leaf: jnp.zeros_like(leaf) if leaf.ndim == 1 else leaf, variables
  )
  np.testing.assert_allclose(
    block.apply(variables, 3.0 * x),
    9.0 * block.apply(variables, x),
    rtol=1e-4,
  )


def test_pytorch_init_bounds_and_spread():
  _, variables = init_polynet(1, 28)
  params = variables['params']
  layers = {
    f'block_{i}/conv_{j}': params[f'block_{i}'][f'conv_{j}']
    for i in range(1, 6)
    for j in (1, 2)
  }
  layers['head'] = params['head']
  for name, layer in layers.items():
    kernel = np.asarray(layer['kernel'])
    fan_in = int(np.prod(kernel.shape[:-1]))
    bound = fan_in**-0.5
    assert np.abs(kernel).max() <= bound, name
    assert np.abs(layer['bias']).max() <= bound, name
    # U(-b, b) has standard deviation b / sqrt(3).
    if kernel.size >= 1000:
      np.testing.assert_allclose(
        kernel.std(), bound / np.sqrt(3), rtol=0.05, err_msg=name
      )
  # Biases are not zero: PyTorch draws them from the same uniform.
  assert np.abs(params['block_5']['conv_1']['bias']).max() > 0


def test_lecun_normal_init_statistics():
  _, variables = init_polynet(1, 28, init_scheme='lecun_normal')
  layer = variables['params']['block_5']['conv_1']
  kernel = np.asarray(layer['kernel'])
  fan_in = int(np.prod(kernel.shape[:-1]))
  assert np.all(np.asarray(layer['bias']) == 0)
  np.testing.assert_allclose(kernel.std(), fan_in**-0.5, rtol=0.05)


def test_unknown_init_scheme_raises():
  with pytest.raises(ValueError, match="'xavier'.*lecun_normal"):
    init_polynet(1, 28, init_scheme='xavier')


def test_get_model_by_name():
  model = models.get_model('polynet', in_channels=3, width=8)
  assert isinstance(model, models.PolyNet)
  assert model.width == 8
  with pytest.raises(ValueError, match="'resnet'.*polynet"):
    models.get_model('resnet')


def test_registry_lists_every_model():
  # A new model also needs its parameter counts in test_polynomial.py,
  # whose guard fails without them.
  assert models.list_models() == [
    'ccp_conv',
    'ccp_dense',
    'ncp_dense',
    'ncp_skip_conv',
    'pi_resnet',
    'pi_resnet_imagenet',
    'polynet',
    'r_polynet',
  ]


def test_models_import_without_tensorflow():
  code = (
    'import sys, pinet_jax.models; '
    'bad = [m for m in ("tensorflow", "tensorflow_datasets") '
    'if m in sys.modules]; '
    'sys.exit(f"imported {bad}" if bad else 0)'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('formulation', ['fused', 'im2col', 's2d'])
@pytest.mark.parametrize('dataset', sorted(DATASETS))
def test_formulations_match_plain(dataset, formulation):
  in_channels, size, _, _ = DATASETS[dataset]
  images = jax.random.uniform(jax.random.key(7), (3, size, size, in_channels))
  labels = jnp.array([1, 4, 9])
  plain, variables = init_polynet(in_channels, size)
  other = models.PolyNet(in_channels=in_channels, formulation=formulation)
  # One parameter tree serves both: the layout does not depend on it.
  chex.assert_trees_all_equal_structs(
    variables,
    jax.eval_shape(other.init, jax.random.key(0), images),
  )

  def loss(model, variables, images):
    logits = model.apply(variables, images)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

  grad_fn = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
  expected = grad_fn(plain, variables, images)
  actual = grad_fn(other, variables, images)
  np.testing.assert_allclose(
    other.apply(variables, images),
    plain.apply(variables, images),
    rtol=1e-5,
    atol=1e-7,
  )
  for want, got in zip(
    jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True
  ):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize('formulation', ['im2col', 's2d'])
def test_forward_mode_matches_plain(formulation):
  # patch_matmul defines its own derivative rule: forward mode and a
  # Hessian-vector product (forward over reverse) must still equal plain.
  images = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))
  plain, variables = init_polynet(1, 28)
  other = models.PolyNet(formulation=formulation)
  params = variables['params']
  direction = jax.tree.map(
    lambda leaf: jax.random.normal(jax.random.key(5), leaf.shape), params
  )

  def logits(model, params):
    return model.apply({'params': params}, images)

  def squared(model, params):
    return jnp.sum(logits(model, params) ** 2)

  def derivatives(model):
    _, jvp = jax.jvp(lambda p: logits(model, p), (params,), (direction,))
    _, hvp = jax.jvp(
      jax.grad(lambda p: squared(model, p)), (params,), (direction,)
    )
    return jvp, hvp

  expected = jax.jit(derivatives, static_argnums=0)(plain)
  actual = jax.jit(derivatives, static_argnums=0)(other)
  for want, got in zip(
    jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True
  ):
    scale = float(jnp.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


def _unfused_dot_shapes(hlo: str) -> list[str]:
  """Return the output shapes of the dots outside fusions in `hlo`.

  On CPU a dot inside a fusion runs in YNNPACK; one outside runs in Eigen.
  """
  shapes = []
  computation = ''
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      computation = line.split()[0]
    elif ' dot(' in line and not computation.startswith('%fused_computation'):
      shapes.append(line.split('=')[1].split('{')[0].strip())
  return shapes


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU only')
def test_block_products_run_in_ynnpack():
  # The 's2d' train step's speed on CPU rests on every product of a block,
  # its kernel gradients included, reaching YNNPACK. Only the head's kernel
  # gradient (a 2304x10 output) stays with Eigen.
  model = models.PolyNet(formulation='s2d')
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  batch = {
    'image': jnp.zeros((32, 28, 28, 1)),
    'label': jnp.zeros((32,), jnp.int32),
  }
  compiled = (
    jax.jit(steps.train_step, static_argnames='microbatch_size')
    .lower(state, batch, jax.random.key(1), microbatch_size=16)
    .compile()
  )
  hlo = compiled.as_text()
  if 'ynn_fusion' not in hlo:
    pytest.skip('this XLA:CPU build or CPU does not use YNNPACK')
  assert _unfused_dot_shapes(hlo) == ['f32[2304,10]']


def test_unknown_formulation_raises():
  with pytest.raises(ValueError, match="'winograd'.*im2col"):
    init_polynet(1, 28, formulation='winograd')


def test_integer_images_raise():
  model = models.PolyNet(in_channels=1)
  with pytest.raises(ValueError, match=r'uint8; convert with images / 255'):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))
