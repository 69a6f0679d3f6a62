"""The degree certificate on the reference network and a single block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pinet_jax import models
from pinet_jax.models import degree


def float64_apply(model, image_shape, seed=0):
  """Return model.apply with float64 parameters, ready for certify_degree."""
  variables = jax.jit(model.init)(
    jax.random.key(seed), jnp.zeros((1, *image_shape))
  )
  variables = degree.to_float64(variables)
  return lambda images: model.apply(variables, images)


def image(shape, seed=1):
  return np.random.default_rng(seed).uniform(size=shape)


@pytest.fixture(scope='module')
def polynet_mnist():
  return float64_apply(models.PolyNet(width=4), (28, 28, 1))


@pytest.mark.parametrize('step', [3.0, 10.0, 30.0])
def test_reference_network_has_degree_32(polynet_mnist, step):
  certificate = degree.certify_degree(
    polynet_mnist, image((28, 28, 1)), 32, step=step
  )
  assert certificate.holds, certificate
  assert certificate.next_difference <= 1e-6 * certificate.top_difference
  assert certificate.top_difference >= 1e3 * certificate.rounding_level


@pytest.mark.parametrize('claimed', [31, 33])
def test_reference_network_rejects_other_degrees(polynet_mnist, claimed):
  certificate = degree.certify_degree(
    polynet_mnist, image((28, 28, 1)), claimed
  )
  assert not certificate.holds, certificate


def test_cifar_network_has_degree_32():
  apply_fn = float64_apply(
    models.PolyNet(in_channels=3, width=4, formulation='plain'), (32, 32, 3)
  )
  certificate = degree.certify_degree(apply_fn, image((32, 32, 3)), 32)
  assert certificate.holds, certificate


def test_product_block_has_degree_2():
  block = models.ProductBlock(features=3, kernel_size=3, padding=1)
  apply_fn = float64_apply(block, (5, 5, 2))
  x0 = image((5, 5, 2))
  assert degree.certify_degree(apply_fn, x0, 2, step=1.0).holds
  assert not degree.certify_degree(apply_fn, x0, 1, step=1.0).holds


def test_direction_argument_sets_the_line():
  def square_of_first(points):
    return points[:, :1] ** 2

  x0 = np.array([0.5, 0.5])
  along = degree.certify_degree(
    square_of_first, x0, 2, step=1.0, direction=np.array([1.0, 0.0])
  )
  across = degree.certify_degree(
    square_of_first, x0, 2, step=1.0, direction=np.array([0.0, 1.0])
  )
  assert along.holds, along
  assert across.top_difference == 0.0
  assert not across.holds


def test_line_points_are_centred_and_evenly_spaced():
  x0 = jnp.ones((2, 2))
  points = degree.line_points(x0, jnp.full((2, 2), 2.0), degree=3, step=0.5)
  assert points.shape == (5, 2, 2)
  np.testing.assert_allclose(points[:, 0, 0], [-1.0, 0.0, 1.0, 2.0, 3.0])


def test_float32_parameters_are_rejected():
  model = models.ProductBlock(features=2, kernel_size=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match='returned float32.*to_float64'):
    degree.certify_degree(
      lambda x: model.apply(variables, x.astype(jnp.float32)),
      image((2, 2, 1)),
      2,
    )


def test_degree_below_one_is_rejected():
  with pytest.raises(ValueError, match='degree must be >= 1, got 0'):
    degree.certify_degree(lambda x: x, np.zeros(3), 0)


def test_overflowing_step_is_reported(polynet_mnist):
  with pytest.raises(ValueError, match='not finite with step 1e\\+20'):
    degree.certify_degree(polynet_mnist, image((28, 28, 1)), 32, step=1e20)


@pytest.mark.parametrize('dataset_shape', [(28, 28, 1), (32, 32, 3)])
def test_bias_free_network_is_homogeneous_of_degree_32(dataset_shape):
  model = models.PolyNet(in_channels=dataset_shape[-1], width=4, use_bias=False)
  apply_fn = float64_apply(model, dataset_shape)
  x = np.stack([image(dataset_shape, seed) for seed in (1, 2)])
  assert degree.homogeneity_error(apply_fn, x, 32, scale=1.5) < 1e-12
  assert degree.homogeneity_error(apply_fn, x, 32, scale=-0.5) < 1e-12
  assert degree.homogeneity_error(apply_fn, x, 31, scale=1.5) > 0.1
  certificate = degree.certify_degree(apply_fn, x[0], 32)
  assert certificate.holds, certificate


def test_biases_break_homogeneity(polynet_mnist):
  x = image((1, 28, 28, 1))
  assert degree.homogeneity_error(polynet_mnist, x, 32, scale=1.5) > 1e-3


def test_bias_free_network_has_no_bias_parameters():
  variables = jax.eval_shape(
    models.PolyNet(width=4, use_bias=False).init,
    jax.random.key(0),
    jnp.zeros((1, 28, 28, 1)),
  )
  names = {
    path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(variables)
  }
  assert names == {'kernel'}


@pytest.mark.parametrize('scale', [0.0, 1.0])
def test_homogeneity_rejects_trivial_scales(polynet_mnist, scale):
  with pytest.raises(
    ValueError, match=f'scale must be neither 0 nor 1, got {scale}'
  ):
    degree.homogeneity_error(polynet_mnist, image((1, 28, 28, 1)), 32, scale)
