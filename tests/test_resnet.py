"""The activation-free Π-net ResNets: sizes, identities at init, degree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from pinet_jax import models, steps
from pinet_jax.models import degree, resnet


def expected_parameters(
  in_channels: int,
  stage_sizes,
  width: int,
  num_classes: int,
  stem: int,
  product_conv: bool,
  regularised: bool = False,
) -> int:
  """Count a PiResNet's parameters from its definition, layer by layer."""
  total = stem * stem * in_channels * width + 2 * width
  channels = width
  for stage, size in enumerate(stage_sizes):
    features = width * 2**stage
    for index in range(size):
      strides = 2 if stage > 0 and index == 0 else 1
      # Two 3x3 convolutions, BN_1 (or IBN, with as many affine pairs),
      # BN_2 and BN_3.
      total += 9 * channels * features + 9 * features * features
      total += 3 * 2 * features
      if strides != 1 or channels != features:
        total += channels * features + 2 * features
      if product_conv or regularised:
        total += features * features
      if regularised:
        total += 1  # alpha
      channels = features
  return total + channels * num_classes + num_classes


def count(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def init(model, shape, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *shape)))


@pytest.mark.parametrize(
  'name, kwargs, shape, stem, product_conv',
  [
    ('pi_resnet', {}, (32, 32, 3), 3, False),
    ('pi_resnet', {'product_conv': True}, (32, 32, 3), 3, True),
    ('pi_resnet', {'in_channels': 1, 'width': 16}, (28, 28, 1), 3, False),
    ('pi_resnet_imagenet', {}, (64, 64, 3), 7, False),
  ],
)
def test_parameter_counts(name, kwargs, shape, stem, product_conv):
  model = models.get_model(name, **kwargs)
  variables = init(model, shape)
  expected = expected_parameters(
    shape[-1],
    model.stage_sizes,
    model.width,
    model.num_classes,
    stem,
    product_conv,
  )
  assert count(variables['params']) == expected


def test_resnet18_sizes_add_bn3_to_torchvision():
  # torchvision's resnet18() has 11,689,512 parameters; each of the eight
  # blocks adds BN_3 with 2 * features.
  variables = init(models.PiResNetImageNet(), (64, 64, 3))
  bn3 = 2 * 2 * (64 + 128 + 256 + 512)
  assert count(variables['params']) == 11_689_512 + bn3


def test_r_polynet_parameter_count():
  model = models.RPolyNet(stage_sizes=(1, 2), width=8)
  variables = init(model, (32, 32, 3))
  assert count(variables['params']) == expected_parameters(
    3, (1, 2), 8, 10, 3, product_conv=False, regularised=True
  )


def test_imagenet_layout_at_224_is_finite():
  model = models.PiResNetImageNet(num_classes=5, width=8)
  state = steps.create_train_state(
    model, optax.sgd(0.1), (224, 224, 3), jax.random.key(0)
  )
  batch = {
    'image': jax.random.uniform(jax.random.key(1), (2, 224, 224, 3)),
    'label': jnp.array([0, 4], jnp.int32),
  }
  logits = model.apply(state.variables(), batch['image'])
  assert logits.shape == (2, 5)
  new, metrics = jax.jit(steps.train_step)(state, batch, jax.random.key(2))
  chex.assert_tree_all_finite((logits, metrics, new.params, new.batch_stats))


def test_pi_block_starts_as_the_identity():
  block = resnet.ResidualBlock(features=6)
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6))
  variables = block.init(jax.random.key(1), x, train=False)
  out, _ = block.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(block.apply(variables, x, train=False), x)


def test_regularised_block_starts_without_its_product_branch():
  block = resnet.ResidualBlock(features=6, block='regularised')
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6))
  variables = block.init(jax.random.key(1), x, train=False)
  assert float(variables['params']['alpha']) == 0.0
  out = block.apply(variables, x, train=False)
  params = dict(variables['params'], alpha=jnp.array(1.0))
  with_product = block.apply({**variables, 'params': params}, x, train=False)
  # With α = 0 the output is o + x; with α = 1 it also carries the product.
  assert not np.allclose(out, with_product)

  def loss(alpha):
    moved = {**variables, 'params': dict(variables['params'], alpha=alpha)}
    return jnp.sum(block.apply(moved, x, train=False) ** 2)

  assert float(jax.grad(loss)(jnp.array(0.0))) != 0.0


def test_instance_part_of_ibn_normalises_each_example():
  norm = resnet.InstanceBatchNorm()
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (3, 4, 4, 10))
  variables = norm.init(jax.random.key(1), x, train=False)
  out, _ = norm.apply(variables, x, train=True, mutable=['batch_stats'])
  # 8 of the 10 channels are per example: zero mean over space for each.
  per_example = out[..., :8].mean(axis=(1, 2))
  np.testing.assert_allclose(per_example, 0.0, atol=1e-5)
  # The other 2 are over the batch: zero mean over batch and space only.
  np.testing.assert_allclose(out[..., 8:].mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  assert np.abs(out[..., 8:].mean(axis=(1, 2))).max() > 1e-3
  assert set(variables['batch_stats']['batch']['mean'].shape) == {2}


def test_ibn_needs_two_channels():
  norm = resnet.InstanceBatchNorm()
  with pytest.raises(ValueError, match='at least 2 channels, .* got 1'):
    norm.init(jax.random.key(0), jnp.ones((2, 3, 3, 1)), train=False)


def test_r_polynet_kernel_variance():
  variables = init(models.RPolyNet(stage_sizes=(1,), width=64), (8, 8, 3))
  kernel = variables['params']['stage_1_block_1']['conv_2']['kernel']
  fan_in = 9 * 64
  np.testing.assert_allclose(np.var(kernel), 16 / fan_in, rtol=0.05)


def randomised_statistics(model, shape, seed=0):
  """Variables whose every BN scale, bias and running statistic is random.

  At initialisation BN_2 has γ = 0, which would make each block the
  identity and hide the product from any check.
  """
  variables = degree.to_float64(init(model, shape))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    if key[-1] in ('scale', 'bias', 'mean') and 'head' not in key:
      flat[key] = rng.uniform(-1.0, 1.0, value.shape)
    elif key[-1] == 'var':
      flat[key] = rng.uniform(0.5, 2.0, value.shape)
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize('blocks, order', [((1,), 2), ((1, 1), 4)])
def test_eval_mode_degree(blocks, order):
  model = models.PiResNet(stage_sizes=blocks, width=2)
  variables = randomised_statistics(model, (6, 6, 3))
  x0 = np.random.default_rng(1).uniform(size=(6, 6, 3))

  def apply_fn(images):
    return model.apply(variables, images, train=False)

  assert degree.certify_degree(apply_fn, x0, order, step=1.0).holds
  assert not degree.certify_degree(apply_fn, x0, order - 1, step=1.0).holds


@pytest.mark.parametrize(
  'name, kwargs',
  [
    ('pi_resnet', {}),
    ('pi_resnet', {'product_conv': True}),
    ('r_polynet', {}),
    ('pi_resnet', {'in_channels': 1}),
  ],
)
def test_one_train_step_is_finite(name, kwargs):
  in_channels = kwargs.get('in_channels', 3)
  size = 28 if in_channels == 1 else 32
  model = models.get_model(name, stage_sizes=(1, 1, 1, 1), width=8, **kwargs)
  state = steps.create_train_state(
    model, optax.sgd(0.1, 0.9), (size, size, in_channels), jax.random.key(0)
  )
  batch = {
    'image': jax.random.uniform(
      jax.random.key(1), (8, size, size, in_channels)
    ),
    'label': jnp.arange(8, dtype=jnp.int32),
  }
  metrics, grads = jax.jit(steps.loss_and_grads)(
    state, batch, jax.random.key(2)
  )
  chex.assert_tree_all_finite((metrics, grads))
  # The branches leave the identity through BN_2's scale, which starts at 0.
  scale = grads['stage_1_block_1']['norm_2']['scale']
  assert float(jnp.abs(scale).max()) > 0


@pytest.mark.parametrize(
  'field, value',
  [
    ('layout', 'mobile'),
    ('block', 'bottleneck'),
    ('kernel_init', 'xavier'),
    ('stage_sizes', (2, 0)),
    ('width', 0),
  ],
)
def test_invalid_settings_name_the_field(field, value):
  model = models.PiResNet(**{field: value})
  with pytest.raises(ValueError, match=field):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
