"""CCP and NCP polynomial models: sizes, degree, stability and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pinet_jax import models, steps
from pinet_jax.models import degree

SHAPES = {'mnist': (28, 28, 1), 'cifar10': (32, 32, 3)}

# Exact parameter counts of each registered model with its defaults and the
# given degree, from the layer formulas: d inputs, width w, degree N, k x k
# kernels on c channels, 10 classes.
#   ccp_dense: N (d w + w) + 10 w + 10
#   ncp_dense: N (d w + w) + (N - 1)(w^2 + w) + 10 w + 10
#   ccp_conv: N (k^2 c w + w) + 10 s^2 w + 10, s the output side
#   ncp_skip_conv: the conv count plus (N - 1)(w^2 + w)
PARAMETER_COUNTS = {
  ('polynet', 'mnist'): 1_220_362,
  ('polynet', 'cifar10'): 1_220_938,
  ('ccp_dense', 'mnist'): 4 * (784 * 64 + 64) + 650,
  ('ccp_dense', 'cifar10'): 4 * (3072 * 64 + 64) + 650,
  ('ncp_dense', 'mnist'): 4 * (784 * 64 + 64) + 3 * (64 * 64 + 64) + 650,
  ('ncp_dense', 'cifar10'): 4 * (3072 * 64 + 64) + 3 * (64 * 64 + 64) + 650,
  ('ccp_conv', 'mnist'): 4 * (16 * 32 + 32) + 14 * 14 * 320 + 10,
  ('ccp_conv', 'cifar10'): 4 * (48 * 32 + 32) + 16 * 16 * 320 + 10,
  ('ncp_skip_conv', 'mnist'): 4 * (16 * 32 + 32)
  + 3 * (32 * 32 + 32)
  + 14 * 14 * 320
  + 10,
  ('ncp_skip_conv', 'cifar10'): 4 * (48 * 32 + 32)
  + 3 * (32 * 32 + 32)
  + 16 * 16 * 320
  + 10,
}

POLYNOMIAL_MODELS = ['ccp_dense', 'ncp_dense', 'ccp_conv', 'ncp_skip_conv']


def init(model, shape, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *shape)))


def count(variables):
  return sum(leaf.size for leaf in jax.tree.leaves(variables))


def test_every_registered_model_has_counts():
  missing = [
    (name, dataset)
    for name in models.list_models()
    for dataset in SHAPES
    if (name, dataset) not in PARAMETER_COUNTS
  ]
  assert not missing, f'add parameter counts for {missing}'


@pytest.mark.parametrize('name, dataset', sorted(PARAMETER_COUNTS))
def test_parameter_count(name, dataset):
  shape = SHAPES[dataset]
  model = models.get_model(name, in_channels=shape[-1])
  assert count(init(model, shape)) == PARAMETER_COUNTS[(name, dataset)]


@pytest.mark.parametrize('name', POLYNOMIAL_MODELS)
@pytest.mark.parametrize('dataset', sorted(SHAPES))
def test_logits_shape(name, dataset):
  shape = SHAPES[dataset]
  model = models.get_model(name, in_channels=shape[-1], num_classes=7)
  variables = init(model, shape)
  logits = model.apply(variables, jnp.full((3, *shape), 0.5))
  assert logits.shape == (3, 7)


@pytest.mark.parametrize('name', POLYNOMIAL_MODELS)
@pytest.mark.parametrize('order', [1, 2, 3, 5])
def test_logits_have_the_claimed_degree(name, order):
  model = models.get_model(name, degree=order, width=8)
  variables = degree.to_float64(init(model, (28, 28, 1)))
  x0 = np.random.default_rng(1).uniform(size=(28, 28, 1))

  def apply_fn(images):
    return model.apply(variables, images)

  assert degree.certify_degree(apply_fn, x0, order, step=1.0).holds
  assert not degree.certify_degree(apply_fn, x0, order + 1, step=1.0).holds
  if order > 1:
    assert not degree.certify_degree(apply_fn, x0, order - 1, step=1.0).holds


@pytest.mark.parametrize('name', POLYNOMIAL_MODELS)
@pytest.mark.parametrize('order', [1, 4, 8])
def test_one_train_step_is_finite(name, order):
  model = models.get_model(name, degree=order)
  state = steps.create_train_state(
    model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0)
  )
  batch = {
    'image': jax.random.uniform(jax.random.key(1), (16, 28, 28, 1)),
    'label': jnp.arange(16) % 10,
  }
  metrics, grads = steps.loss_and_grads(state, batch, jax.random.key(2))
  chex.assert_tree_all_finite((metrics, grads))
  new_state, _ = steps.train_step(state, batch, jax.random.key(2))
  logits = model.apply({'params': new_state.params}, batch['image'])
  chex.assert_tree_all_finite(logits)


def test_unknown_decomposition_is_rejected():
  model = models.PolynomialClassifier(decomposition='tucker')
  with pytest.raises(ValueError, match="unknown decomposition 'tucker'"):
    init(model, (28, 28, 1))


def test_degree_zero_is_rejected():
  with pytest.raises(ValueError, match='degree must be >= 1, got 0'):
    init(models.CCPDense(degree=0), (28, 28, 1))


def test_wrong_channels_are_rejected():
  with pytest.raises(ValueError, match=r'\(batch, height, width, 1\)'):
    init(models.NCPDense(), (32, 32, 3))
