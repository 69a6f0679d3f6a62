"""CCP and NCP polynomial models: sizes, degree, normalisation and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from pinet_jax import models, steps
from pinet_jax.models import degree, polynomial

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
  # The ResNet-18 stage layout at width 64, counted layer by layer in
  # tests/test_resnet.py; the MNIST variants have a 1-channel stem.
  ('pi_resnet', 'cifar10'): 11_177_802,
  ('pi_resnet', 'mnist'): 11_177_802 - 9 * 2 * 64,
  ('pi_resnet_imagenet', 'cifar10'): 11_693_352,
  ('pi_resnet_imagenet', 'mnist'): 11_693_352 - 49 * 2 * 64,
  ('r_polynet', 'cifar10'): 11_874_130,
  ('r_polynet', 'mnist'): 11_874_130 - 9 * 2 * 64,
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
  # Shapes suffice to count, and skip compiling the initialisers.
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, *shape))
  )
  assert count(variables['params']) == PARAMETER_COUNTS[(name, dataset)]


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


# Small polynomial layers for the normalisation tests, dense and
# convolutional, each with its input shape.
LAYERS = {
  'dense': (dict(features=4, degree=3), (16, 6)),
  'conv': (
    dict(features=4, degree=3, kernel_size=3, padding=1),
    (4, 5, 5, 2),
  ),
}
# BatchNorm's epsilon.
EPSILON = 1e-5
NORMALIZED = [
  choice for choice in polynomial.NORMALIZATIONS if choice != 'none'
]

# The BatchNorm modules of a degree-3 layer, by normalisation.
BATCH_NORMS = {
  'none': set(),
  'product': {'norm_2', 'norm_3'},
  'output': {'norm_1', 'norm_2', 'norm_3'},
  'last': {'norm_out'},
}


def normal(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def train_batch_stats(model, variables, inputs, steps=2):
  """Return `variables` after `steps` train-mode applies on `inputs`.

  Each apply normalises a shifted and scaled copy of `inputs`, so the
  running averages move away from their initial 0 and 1.
  """
  for step in range(steps):
    shifted = inputs * (1.5 + step) + 0.3 * (step + 1)
    _, updates = model.apply(
      variables, shifted, train=True, mutable=['batch_stats']
    )
    variables = {**variables, **updates}
  return variables


def batch_norm_calls(apply):
  """Run `apply()` and record each BatchNorm call's input and output.

  Returns apply's result and a dict from module name to (input, output).
  """
  calls = {}

  def record(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.BatchNorm):
      calls[context.module.name] = (args[0], output)
    return output

  with nn.intercept_methods(record):
    result = apply()
  return result, calls


def small_layer(kind, decomposition, normalization):
  """Return a PolynomialLayer from `LAYERS` and a normal input batch."""
  attributes, shape = LAYERS[kind]
  layer = models.PolynomialLayer(
    **attributes, decomposition=decomposition, normalization=normalization
  )
  return layer, normal(shape)


def dense_classifier(decomposition, normalization, order):
  """Return a dense PolynomialClassifier of width 8 and degree `order`."""
  return models.PolynomialClassifier(
    width=8,
    degree=order,
    decomposition=decomposition,
    normalization=normalization,
  )


def dense_map(params, x):
  return x @ params['kernel'] + params['bias']


def reference_layer(variables, z, decomposition, normalization, train):
  """Compute a degree-3 dense PolynomialLayer by its formulas, in float64.

  BN uses the batch's mean and biased variance when `train`, else the
  running averages in `variables['batch_stats']`.
  """
  params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), variables)
  stats = params.get('batch_stats', {})
  params = params['params']
  z = np.asarray(z, np.float64)

  def norm(name, x):
    if train:
      mean, var = x.mean(axis=0), x.var(axis=0)
    else:
      mean, var = stats[name]['mean'], stats[name]['var']
    scale, bias = params[name]['scale'], params[name]['bias']
    return (x - mean) / np.sqrt(var + EPSILON) * scale + bias

  x = dense_map(params['input_1'], z)
  if normalization == 'output':
    x = norm('norm_1', x)
  for n in (2, 3):
    term = dense_map(params[f'input_{n}'], z)
    if decomposition == 'ccp':
      product, added = term * x, x
    else:
      product = term * dense_map(params[f'state_{n}'], x)
      added = term
    if normalization == 'product':
      product = norm(f'norm_{n}', product)
    skip = x if decomposition == 'ncp_skip' else 0.0
    x = product + added + skip
    if normalization == 'output':
      x = norm(f'norm_{n}', x)
  if normalization == 'last':
    x = norm('norm_out', x)
  return x


# Models for the BatchNorm counts, width w = 8 and degree 3, each with its
# image shape and its parameter count without normalisation:
#   ccp_dense on 6 x 6 x 1 images, d = 36 inputs: 3 (d w + w) + 10 w + 10.
#   ncp_skip_conv, 4 x 4 kernels with stride 2 on 8 x 8 x 1 images, so
#   4 x 4 outputs: 3 (16 w + w) + 2 (w^2 + w) + 10 * 4 * 4 w + 10.
NORMALIZED_COUNTS = {
  'ccp_dense': ((6, 6, 1), 3 * (36 * 8 + 8) + 10 * 8 + 10),
  'ncp_skip_conv': (
    (8, 8, 1),
    3 * (16 * 8 + 8) + 2 * (8 * 8 + 8) + 10 * 4 * 4 * 8 + 10,
  ),
}


@pytest.mark.parametrize('name', sorted(NORMALIZED_COUNTS))
@pytest.mark.parametrize('normalization', polynomial.NORMALIZATIONS)
def test_normalized_counts(name, normalization):
  # Every BatchNorm adds a scale and a bias per feature to the parameters
  # and a mean and a variance per feature to the batch statistics. The
  # features of a convolution are its channels.
  shape, plain_count = NORMALIZED_COUNTS[name]
  model = models.get_model(name, width=8, degree=3, normalization=normalization)
  variables = init(model, shape)
  batch_norms = len(BATCH_NORMS[normalization])
  stats = variables.get('batch_stats', {})
  assert count(variables['params']) == plain_count + 2 * 8 * batch_norms
  assert count(stats) == 2 * 8 * batch_norms
  assert set(stats.get('polynomial', {})) == BATCH_NORMS[normalization]


def test_product_normalization_at_degree_one_is_empty():
  model = models.CCPDense(width=8, degree=1, normalization='product')
  assert set(init(model, (6, 6, 1))) == {'params'}


def test_none_ignores_train():
  model = models.CCPDense(width=8, degree=3, normalization='none')
  variables = init(model, (6, 6, 1))
  images = jax.random.uniform(jax.random.key(1), (4, 6, 6, 1))
  logits = model.apply(variables, images)
  assert set(variables) == {'params'}
  np.testing.assert_array_equal(
    model.apply(variables, images, train=True), logits
  )
  np.testing.assert_array_equal(
    models.CCPDense(width=8, degree=3).apply(variables, images), logits
  )


@pytest.mark.parametrize('normalization', NORMALIZED)
def test_normalization_keeps_other_parameters(normalization):
  plain = init(models.NCPDense(width=8, degree=3), (6, 6, 1))
  normalized = init(
    models.NCPDense(width=8, degree=3, normalization=normalization),
    (6, 6, 1),
  )
  layer = normalized['params']['polynomial']
  maps = {name: value for name, value in layer.items() if 'norm' not in name}
  chex.assert_trees_all_equal(maps, plain['params']['polynomial'])
  chex.assert_trees_all_equal(
    normalized['params']['head'], plain['params']['head']
  )


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('normalization', polynomial.NORMALIZATIONS)
@pytest.mark.parametrize('decomposition', models.DECOMPOSITIONS)
def test_dense_layer_matches_formulas(decomposition, normalization, train):
  layer, z = small_layer('dense', decomposition, normalization)
  variables = train_batch_stats(layer, layer.init(jax.random.key(0), z), z)
  outputs, _ = layer.apply(variables, z, train=train, mutable=['batch_stats'])
  expected = reference_layer(variables, z, decomposition, normalization, train)
  np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind', sorted(LAYERS))
@pytest.mark.parametrize('normalization', NORMALIZED)
def test_train_mode_normalizes_over_batch(kind, normalization):
  layer, z = small_layer(kind, 'ncp_skip', normalization)
  variables = layer.init(jax.random.key(0), z)
  (_, updates), calls = batch_norm_calls(
    lambda: layer.apply(variables, z, train=True, mutable=['batch_stats'])
  )
  assert set(calls) == BATCH_NORMS[normalization]
  for name, (inputs, outputs) in calls.items():
    # Per feature over the batch and, for convolutions, space.
    axes = tuple(range(inputs.ndim - 1))
    mean, var = inputs.mean(axes), inputs.var(axes)
    # At init the scale is 1 and the bias 0.
    np.testing.assert_allclose(outputs.mean(axes), 0.0, atol=1e-4)
    np.testing.assert_allclose(
      outputs.var(axes), var / (var + EPSILON), rtol=1e-4
    )
    # Running averages start at mean 0 and variance 1.
    stats = updates['batch_stats'][name]
    np.testing.assert_allclose(stats['mean'], 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var, rtol=1e-5)


@pytest.mark.parametrize('kind', sorted(LAYERS))
@pytest.mark.parametrize('normalization', NORMALIZED)
def test_eval_mode_is_per_example(kind, normalization):
  layer, z = small_layer(kind, 'ccp', normalization)
  variables = train_batch_stats(layer, layer.init(jax.random.key(0), z), z)
  # The same first example among other ones.
  others = z.at[1:].set(3.0 * normal(z.shape, seed=2)[1:])

  outputs, updates = layer.apply(
    variables, z, train=False, mutable=['batch_stats']
  )
  chex.assert_trees_all_equal(updates['batch_stats'], variables['batch_stats'])
  np.testing.assert_allclose(
    layer.apply(variables, others)[0], outputs[0], rtol=1e-6, atol=1e-7
  )
  np.testing.assert_allclose(
    layer.apply(variables, z[:1])[0], outputs[0], rtol=1e-6, atol=1e-7
  )
  trained, _ = layer.apply(variables, z, train=True, mutable=['batch_stats'])
  trained_others, _ = layer.apply(
    variables, others, train=True, mutable=['batch_stats']
  )
  assert not np.allclose(trained_others[0], trained[0], rtol=1e-3)


@pytest.mark.parametrize('normalization', NORMALIZED)
@pytest.mark.parametrize('decomposition', models.DECOMPOSITIONS)
def test_eval_mode_has_the_claimed_degree(decomposition, normalization):
  model = dense_classifier(decomposition, normalization, order=3)
  images = jax.random.uniform(jax.random.key(1), (8, 6, 6, 1))
  variables = train_batch_stats(model, init(model, (6, 6, 1)), images)
  assert count(variables['batch_stats']) > 0
  variables = degree.to_float64(variables)
  x0 = np.random.default_rng(1).uniform(size=(6, 6, 1))

  def apply_fn(images):
    return model.apply(variables, images)

  assert degree.certify_degree(apply_fn, x0, 3, step=1.0).holds
  assert not degree.certify_degree(apply_fn, x0, 2, step=1.0).holds
  assert not degree.certify_degree(apply_fn, x0, 4, step=1.0).holds


def test_unknown_normalization_is_rejected():
  model = models.CCPDense(normalization='batch')
  message = (
    r"unknown normalization 'batch'; choose one of "
    r"\['none', 'product', 'output', 'last'\]"
  )
  with pytest.raises(ValueError, match=message):
    init(model, (28, 28, 1))


@pytest.mark.parametrize('normalization', NORMALIZED)
@pytest.mark.parametrize('decomposition', models.DECOMPOSITIONS)
def test_one_normalized_step_is_finite(decomposition, normalization):
  model = dense_classifier(decomposition, normalization, order=8)
  variables = init(model, (4, 4, 1))
  images = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1))
  labels = jnp.arange(8)

  def loss_fn(params):
    logits, updates = model.apply(
      {**variables, 'params': params},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    loss = steps.cross_entropy(logits, labels).mean()
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    variables['params']
  )
  chex.assert_tree_all_finite((loss, grads, updates))
  params = jax.tree.map(lambda p, g: p - 1e-3 * g, variables['params'], grads)
  logits = model.apply({**variables, **updates, 'params': params}, images)
  chex.assert_tree_all_finite(logits)
