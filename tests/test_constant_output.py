"""The warning for evaluations that score like a constant prediction."""

import math
import re

import pytest

from pinet_jax import constant_output

from conftest import command, read_metrics, run


@pytest.mark.parametrize(
  ('loss', 'accuracy', 'num_classes', 'expected'),
  [
    # A reference network that never left its starting point (1 epoch of
    # the MNIST config, seed 1): test loss 2.3010, accuracy 11.35%.
    (2.3010, 0.1135, 10, True),
    # The tolerance is 1% of ln 10 on either side.
    (1.01 * math.log(10) - 1e-6, 0.1, 10, True),
    (0.99 * math.log(10) - 1e-6, 0.1, 10, False),
    (1.01 * math.log(10) + 1e-6, 0.1, 10, False),
    # Twice chance is no longer constant.
    (2.3010, 0.2, 10, False),
    (2.3010, 0.1999, 10, True),
    # Trained networks: MNIST, and a Π-net ResNet whose loss a few huge
    # logits inflate while its accuracy is sensible.
    (0.0282, 0.9916, 10, False),
    (2.6e21, 0.5972, 10, False),
    (math.log(100), 0.015, 100, True),
  ],
)
def test_looks_constant_cases(loss, accuracy, num_classes, expected):
  assert constant_output.looks_constant(loss, accuracy, num_classes) is expected


def test_warning_names_values_and_options():
  message = constant_output.warning(2.3010, 0.1135, 10)
  assert message.startswith('eval_loss 2.3010 and eval_accuracy 11.35%')
  assert 'ln 10 = 2.3026' in message
  assert '--config.warmup_fraction' in message
  assert '--config.learning_rate' in message


def test_untrained_run_logs_warning(data_flags, tmp_path):
  # At lr 1e-9 the network stays at its initialisation, whose logits
  # barely depend on the image.
  result = run(
    command(
      'tiny',
      tmp_path,
      *data_flags,
      '--config.schedule=constant',
      '--config.learning_rate=1e-9',
      '--config.num_epochs=1',
    )
  )
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = re.findall(
    r'^W.*one prediction for every image.*$', result.stderr, re.M
  )
  assert len(warnings) == 1, result.stderr[-3000:]
  final = read_metrics(tmp_path)[-1]
  assert f'eval_loss {final["eval_loss"]:.4f}' in warnings[0]
