"""Per-block activation RMS of the reference network."""

import jax
import jax.numpy as jnp
import numpy as np

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
