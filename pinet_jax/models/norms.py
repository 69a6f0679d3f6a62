"""Normalisation layers with PyTorch's defaults, shared by the models.

Every model here normalises NHWC activations (or (batch, features) vectors)
over all axes but the last, as PyTorch's BatchNorm2d does over NCHW. In
training a BatchNorm layer normalises with the batch's statistics and folds
them into running averages in the 'batch_stats' collection. In evaluation
it uses those averages. It is then an affine map, so a polynomial network
stays a polynomial.
"""

from flax import linen as nn

# PyTorch's BatchNorm2d: running = 0.9 * running + 0.1 * batch, eps 1e-5.
MOMENTUM = 0.9
EPSILON = 1e-5


def batch_norm(train: bool, name: str, zero_scale: bool = False) -> nn.Module:
  """Return a BatchNorm layer in training or evaluation mode.

  Args:
    train: normalise with the batch's statistics and update the running
      averages; False uses the running averages.
    name: the layer's name in the parameter tree.
    zero_scale: start the scale γ at 0 instead of 1, so the layer outputs its
      bias β (0) until training moves γ; this makes a residual branch start
      as the identity.

  NOTE: the running variance here averages the batch's biased variance,
  where PyTorch averages the unbiased one (times n / (n - 1)). Evaluation
  of imported statistics is identical; training moves the averages by that
  factor differently, by 1% at 100 values per channel.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=MOMENTUM,
    epsilon=EPSILON,
    # The two-pass variance: E[x^2] - E[x]^2 cancels catastrophically on
    # the large activations that products of layers produce.
    use_fast_variance=False,
    scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
    name=name,
  )


def instance_norm(name: str) -> nn.Module:
  """Return an InstanceNorm layer with a learned scale and bias.

  It normalises each example's channels over the spatial axes, with no
  running statistics, so it is the same in training and evaluation. Like
  PyTorch's InstanceNorm2d(affine=True).
  """
  return nn.InstanceNorm(epsilon=EPSILON, use_fast_variance=False, name=name)
