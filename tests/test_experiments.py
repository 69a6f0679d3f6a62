"""Every experiment config validates and builds its model."""

import jax
import jax.numpy as jnp
import pytest

from pinet_jax import config as config_lib
from pinet_jax import train
from pinet_jax.data import sources

from conftest import REPO_ROOT

EXPERIMENTS = sorted(
  path.stem for path in (REPO_ROOT / 'experiments').glob('*.py')
)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiment_builds_its_model(load_experiment, name):
  config = load_experiment(name)
  config_lib.validate(config)
  _, image_shape = sources.DATASET_SHAPES[config.dataset]
  model = train._build_model(config)
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, *image_shape))
  )
  logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, *image_shape)))
  assert logits.shape == (2, 10)


def test_experiments_are_found():
  assert {'mnist', 'cifar10', 'ccp_dense_mnist'} <= set(EXPERIMENTS)
