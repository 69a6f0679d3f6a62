"""The training program's input preprocessing in numpy, without TensorFlow.

The input pipeline (`pinet_jax.data.pipeline`) scales uint8 pixels to
[0, 1] in float32. With config.normalize it also standardises each channel
with the training split's mean and standard deviation. `to_model_input`
computes the same float32 values, so a model applied outside the pipeline
receives inputs like the ones it was trained on. The checkpoint metadata
can store the standardisation statistics as JSON, written by
`normalization_to_json` and read by `normalization_from_json`.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np


class ChannelStatistics(NamedTuple):
  """Per-channel statistics of pixels scaled to [0, 1].

  `pinet_jax.data.pipeline.Normalization` is this type.
  """

  mean: np.ndarray  # float32, (channels,)
  std: np.ndarray  # float32, (channels,)


def scale_pixels(images: np.ndarray) -> np.ndarray:
  """Return `images` as float32 pixels in [0, 1].

  Args:
    images: integer pixels in [0, 255] (uint8, as decoded from image files),
      or float pixels already scaled to [0, 1].

  Raises:
    ValueError: a pixel is outside those ranges, or the dtype is neither
      integer nor float.
  """
  images = np.asarray(images)
  if np.issubdtype(images.dtype, np.integer):
    if images.size and (images.min() < 0 or images.max() > 255):
      raise ValueError(
        f'integer pixels must be in [0, 255], got values in '
        f'[{images.min()}, {images.max()}]'
      )
    # float32 division by 255, as the pipeline's tf.cast and division.
    return images.astype(np.float32) / np.float32(255.0)
  if np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32)
    if images.size and not (
      np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    ):
      raise ValueError(
        'float pixels must be finite and in [0, 1], got values in '
        f'[{images.min()}, {images.max()}]; divide 0..255 pixels by 255 or '
        'pass them as uint8'
      )
    return images
  raise ValueError(
    f'pixels must be an integer or float array, got dtype {images.dtype}'
  )


def to_model_input(
  images: np.ndarray, normalization: ChannelStatistics | None
) -> np.ndarray:
  """Return float32 model inputs for `images` (..., channels).

  Args:
    images: pixels as `scale_pixels` accepts them.
    normalization: (mean, std) per channel to standardise with, or None
      for pixels in [0, 1].
  """
  pixels = scale_pixels(images)
  if normalization is None:
    return pixels
  mean, std = normalization
  return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalization_to_json(normalization: ChannelStatistics) -> dict[str, Any]:
  """Return {'mean': [...], 'std': [...]}, one float per channel.

  A float32 value survives the JSON round trip exactly: it converts to a
  Python float without rounding, and JSON writes that float's shortest
  exact representation.
  """
  mean, std = normalization
  return {
    'mean': [float(value) for value in np.asarray(mean, np.float32)],
    'std': [float(value) for value in np.asarray(std, np.float32)],
  }


def normalization_from_json(value: Mapping[str, Any]) -> ChannelStatistics:
  """Return the float32 (mean, std) that `normalization_to_json` wrote.

  Raises:
    ValueError: `value` lacks 'mean' or 'std', or their lengths differ.
  """
  try:
    mean = np.asarray(value['mean'], np.float32)
    std = np.asarray(value['std'], np.float32)
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(
      f'normalization statistics must be {{"mean": [...], "std": [...]}}, '
      f'got {value!r}'
    ) from error
  if mean.ndim != 1 or mean.shape != std.shape:
    raise ValueError(
      'normalization mean and std must be lists of equal length, got '
      f'{mean.tolist()} and {std.tolist()}'
    )
  return ChannelStatistics(mean, std)
