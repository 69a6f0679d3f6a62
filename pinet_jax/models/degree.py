"""Numerical certificate that a model is a polynomial of a given degree.

Along a line x(t) = x0 + t * d, every output of a polynomial network is a
polynomial p(t) of degree at most D in t. Its D-th finite difference with
step h is the constant D! * h^D * (leading coefficient), and every higher
difference is zero. `certify_degree` evaluates the model in float64 at
D + 2 points centred on x0 and compares the (D+1)-th difference with the
D-th: the first must vanish to rounding, the second must not.

The step must be large enough that the top-degree term dominates
rounding. For the reference network (width 16, PyTorch's initialisation)
and x0 an image with pixels in [0, 1], steps of 3, 10 and 30 all separated
the two differences by a factor of about 4e9. When the D-th difference is not
clearly above `rounding_level`, try a larger step.

A network without biases whose every block multiplies two linear maps of
its input, such as `PolyNet(use_bias=False)`, is moreover homogeneous:
f(c * x) = c^D * f(x). `homogeneity_error` measures how far a model is
from that.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Default ratio (D+1)-th / D-th difference below which the degree holds.
TOLERANCE = 1e-6
# The D-th difference must exceed its own rounding error by this factor.
SIGNAL_FACTOR = 1e3


class DegreeCertificate(NamedTuple):
  """The finite differences behind a degree check.

  Attributes:
    degree: the degree D that was checked.
    top_difference: max |D-th difference| over the outputs.
    next_difference: max |(D+1)-th difference| over the outputs. Both
      maxima may come from different outputs, so an output whose
      differences are far smaller than the largest one's is checked only
      loosely.
    rounding_level: float64 eps * max over outputs of sum C(D, k) |f_k|,
      the rounding error of forming a D-th difference; the outputs' own
      rounding comes on top.
    holds: next_difference <= tolerance * top_difference, and
      top_difference >= SIGNAL_FACTOR * rounding_level.
  """

  degree: int
  top_difference: float
  next_difference: float
  rounding_level: float
  holds: bool


def line_points(
  x0: jax.Array, direction: jax.Array, degree: int, step: float
) -> jax.Array:
  """Return the D + 2 points x0 + t_k * direction, t_k centred on 0.

  Shape (degree + 2, *x0.shape), with t_k = (k - (degree + 1) / 2) * step.
  """
  offsets = (np.arange(degree + 2) - (degree + 1) / 2) * step
  offsets = jnp.asarray(offsets, x0.dtype).reshape(-1, *([1] * x0.ndim))
  return x0[None] + offsets * direction[None]


def certify_degree(
  apply_fn: Callable[[jax.Array], jax.Array],
  x0: np.ndarray,
  degree: int,
  *,
  step: float = 10.0,
  direction: np.ndarray | None = None,
  seed: int = 0,
  tolerance: float = TOLERANCE,
) -> DegreeCertificate:
  """Check numerically that `apply_fn` is a polynomial of degree `degree`.

  Args:
    apply_fn: maps a batch (n, *x0.shape) to outputs (n, ...). It is
      called in float64 mode (`jax.enable_x64`) and must return float64;
      `to_float64` converts parameters for models that compute in their
      parameters' dtype.
    x0: one input, the centre of the line, without a batch axis.
    degree: the claimed degree D >= 1.
    step: distance between consecutive points along `direction`.
    direction: the line's direction, shaped like x0; None draws a standard
      normal one from `seed` and scales it to unit RMS.
    seed: seed of the random direction.
    tolerance: the largest accepted (D+1)-th / D-th difference ratio.

  Returns:
    The differences and whether the degree holds.
  """
  if degree < 1:
    raise ValueError(f'degree must be >= 1, got {degree}')
  if direction is None:
    direction = np.random.default_rng(seed).standard_normal(np.shape(x0))
    direction /= np.sqrt(np.mean(direction**2))
  with jax.enable_x64(True):
    points = line_points(
      jnp.asarray(x0, jnp.float64),
      jnp.asarray(direction, jnp.float64),
      degree,
      step,
    )
    outputs = jax.jit(apply_fn)(points)
  if outputs.dtype != jnp.float64:
    raise ValueError(
      f'apply_fn returned {outputs.dtype}, expected float64; convert the '
      'parameters with to_float64'
    )
  outputs = np.asarray(outputs).reshape(degree + 2, -1)
  if not np.all(np.isfinite(outputs)):
    raise ValueError(
      f'the outputs along the line are not finite with step {step}; use a '
      'smaller step'
    )
  top = float(np.max(np.abs(np.diff(outputs, n=degree, axis=0))))
  following = float(np.max(np.abs(np.diff(outputs, n=degree + 1, axis=0))))
  # A D-th difference sums C(D, k) * f_k, so its rounding error is about
  # eps times the same sum of |f_k|, for either window of D + 1 points.
  weights = np.array([math.comb(degree, k) for k in range(degree + 1)])
  weighted = np.stack(
    [weights @ np.abs(outputs[:-1]), weights @ np.abs(outputs[1:])]
  )
  rounding = float(np.finfo(np.float64).eps * np.max(weighted))
  holds = following <= tolerance * top and top >= SIGNAL_FACTOR * rounding
  return DegreeCertificate(degree, top, following, rounding, holds)


def homogeneity_error(
  apply_fn: Callable[[jax.Array], jax.Array],
  x: np.ndarray,
  degree: int,
  scale: float = 2.0,
) -> float:
  """Return max |f(c x) - c^D f(x)| / max |c^D f(x)|, computed in float64.

  Zero up to rounding (about 1e-15 times D) for a homogeneous polynomial of
  degree D; of order one when D is wrong or the model has lower-degree
  terms, such as biases.

  Args:
    apply_fn: as for `certify_degree`.
    x: a batch of inputs (n, ...) for apply_fn.
    degree: the claimed degree D >= 1.
    scale: the factor c; neither 0 nor 1.
  """
  if degree < 1:
    raise ValueError(f'degree must be >= 1, got {degree}')
  if scale in (0.0, 1.0):
    raise ValueError(f'scale must be neither 0 nor 1, got {scale}')
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)
    outputs = jax.jit(apply_fn)(jnp.concatenate([x, scale * x]))
  if outputs.dtype != jnp.float64:
    raise ValueError(
      f'apply_fn returned {outputs.dtype}, expected float64; convert the '
      'parameters with to_float64'
    )
  plain, scaled = np.split(np.asarray(outputs), 2)
  expected = scale**degree * plain
  return float(np.max(np.abs(scaled - expected)) / np.max(np.abs(expected)))


def to_float64(tree):
  """Return `tree` with every floating-point leaf as a float64 numpy array.

  numpy arrays keep float64 outside JAX's x64 mode, and `certify_degree`
  applies the model inside that mode, so the parameters stay float64.
  """
  return jax.tree.map(
    lambda leaf: (
      np.asarray(leaf, np.float64)
      if np.issubdtype(np.asarray(leaf).dtype, np.floating)
      else leaf
    ),
    tree,
  )
