"""Notice a network whose predictions do not depend on its input yet.

Each product block multiplies activation scales, so at initialisation the
reference network's input-dependent signal shrinks block by block: its
logits differ across images by about 1e-7 while the biases set their mean.
Training has to grow that signal. A learning rate that rises too fast, such
as a one-cycle schedule over a single epoch, can shrink it further instead.
The run then ends where it started, with one prediction for every image, a
loss of ln(num_classes) and chance accuracy. No NaN stops it, so an
evaluation that looks like this gets a warning.
"""

import math

# A loss within this fraction of ln(num_classes) counts as a uniform guess.
LOSS_TOLERANCE = 0.01


def looks_constant(loss: float, accuracy: float, num_classes: int) -> bool:
  """Return whether an evaluation scores like one prediction for every image.

  Args:
    loss: mean cross-entropy over the evaluation split.
    accuracy: fraction of correct top-1 predictions.
    num_classes: classes of the dataset, 2 or more.

  Returns:
    True when the loss is within LOSS_TOLERANCE of ln(num_classes), the
    loss of a uniform prediction, and the accuracy is below twice chance.
    A network that has learned anything fails one of the two: its loss
    drops, or its predictions beat chance even when a few huge logits
    inflate its loss.
  """
  uniform_loss = math.log(num_classes)
  return (
    abs(loss - uniform_loss) <= LOSS_TOLERANCE * uniform_loss
    and accuracy < 2 / num_classes
  )


def warning(loss: float, accuracy: float, num_classes: int) -> str:
  """Return the log message for an evaluation where `looks_constant` holds."""
  return (
    f'eval_loss {loss:.4f} and eval_accuracy {100 * accuracy:.2f}% are those '
    f'of one prediction for every image (a uniform guess scores '
    f'ln {num_classes} = {math.log(num_classes):.4f}): the network has not '
    'learned to use its input. If this lasts, start again in a new work '
    'directory with a lower --config.learning_rate or a longer warm-up '
    "(--config.schedule='one_cycle' with a larger --config.warmup_fraction, "
    'or more --config.num_epochs).'
  )
