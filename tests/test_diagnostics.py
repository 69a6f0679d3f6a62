"""Per-block activation RMS of the reference network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pinet_jax import models
from pinet_jax.models import diagnostics


def setup_polynet():
  model = models.PolyNet(width=4)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  return model, variables, images


def test_reports_every_block_in_call_order():
  model, variables, images = setup_polynet()
  rms = diagnostics.activation_rms(model, variables, images)
  names = [f'block_{index}' for index in range(1, 6)]
  assert list(rms) == [*names, 'head', 'output']
  assert all(np.isfinite(value) and value > 0 for value in rms.values())


def test_block_rms_matches_the_block_alone():
  model, variables, images = setup_polynet()
  rms = diagnostics.activation_rms(model, variables, images)
  block = models.ProductBlock(features=4, kernel_size=3, padding=1)
  out = block.apply({'params': variables['params']['block_1']}, images)
  np.testing.assert_allclose(rms['block_1'], np.sqrt(np.mean(out**2)), 1e-6)
  logits = model.apply(variables, images)
  np.testing.assert_allclose(rms['output'], np.sqrt(np.mean(logits**2)), 1e-6)
  assert rms['head'] == rms['output']


def test_overflow_shows_in_late_blocks():
  model, variables, images = setup_polynet()
  # Pixels of 0..255 instead of [0, 1]: each block squares the scale.
  rms = diagnostics.activation_rms(model, variables, images * 255)
  assert np.isfinite(rms['block_1'])
  assert rms['block_2'] > rms['block_1']
  assert not np.isfinite(rms['output'])


class Scaled(nn.Module):
  """Two blocks: the input times `scale`, then that plus 1."""

  scale: float

  @nn.compact
  def __call__(self, x):
    x = Multiply(self.scale, name='grow')(x)
    return Multiply(1.0, name='keep')(x) + 1


class Multiply(nn.Module):
  factor: float

  def __call__(self, x):
    return x * self.factor


@pytest.mark.parametrize(
  'scale, expected',
  [(1e30, 1e30), (jnp.inf, jnp.inf), (jnp.nan, jnp.nan)],
)
def test_rms_overflows_only_on_inf_or_nan(scale, expected):
  # The float32 squares of 1e30 overflow, but the RMS must not.
  images = jnp.ones((2, 4, 4, 1), jnp.float32)
  rms = diagnostics.activation_rms(Scaled(scale), {}, images)
  np.testing.assert_allclose(rms['grow'], expected, rtol=1e-6)
  np.testing.assert_allclose(rms['keep'], expected, rtol=1e-6)


def test_train_mode_normalises_with_batch_statistics():
  model = models.get_model(
    'pi_resnet', num_classes=10, in_channels=1, width=4, stage_sizes=(1,)
  )
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  rms = diagnostics.activation_rms(model, variables, images, train=True)
  assert all(np.isfinite(value) and value > 0 for value in rms.values())
  evaluated = diagnostics.activation_rms(model, variables, images)
  # BatchNorm normalises with the batch's statistics only in train mode.
  assert rms['output'] != evaluated['output']
