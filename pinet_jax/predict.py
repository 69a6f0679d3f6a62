"""Classify image files with a trained model: top-k classes and probabilities.

Image files in any format Pillow reads (PNG, JPEG, BMP, GIF, TIFF, WebP,
...) are converted to the model's input: grayscale or RGB to match its
channels, and resized to its height and width. Only Pillow and
`pinet_jax.inference` are used, so TensorFlow stays unimported.
"""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pinet_jax import inference
from pinet_jax.errors import UserInputError

# Pillow modes of 16-bit grayscale images, which Image.convert('L') would
# clip to 255 instead of rescaling.
_SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N')
# Pillow modes whose pixel range is not fixed by the mode, so no conversion
# to 8 bits is right for every file.
_UNSCALED_MODES = ('I', 'F')
# Images per model call; bounds memory for long lists of files.
BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The top classes of one image file, most probable first.

  Attributes:
    path: the image file.
    classes: label indices, length k.
    names: the class names of `classes`.
    probabilities: float, the model's probability of each of `classes`.
  """

  path: str
  classes: tuple[int, ...]
  names: tuple[str, ...]
  probabilities: tuple[float, ...]


def _to_eight_bits(image: Image.Image, path: str) -> Image.Image:
  if image.mode in _SIXTEEN_BIT_MODES:
    pixels = np.asarray(image, dtype=np.uint16)
    # 65535 / 257 = 255: the 16-bit range maps onto the 8-bit range.
    return Image.fromarray(np.round(pixels / 257.0).astype(np.uint8), 'L')
  if image.mode in _UNSCALED_MODES:
    raise UserInputError(
      f'image {path} has 32-bit pixels (Pillow mode {image.mode!r}) with no '
      'fixed range; save it as 8- or 16-bit grayscale or RGB'
    )
  return image


def load_image(path: str, image_shape: Sequence[int]) -> np.ndarray:
  """Read an image file as uint8 pixels of shape `image_shape`.

  The EXIF orientation is applied. An alpha channel is dropped, color
  becomes grayscale by ITU-R 601-2 luma for one-channel models, and
  grayscale is repeated into RGB for three-channel ones. A size other than
  the model's is resized bilinearly to (height, width), without keeping the
  aspect ratio.

  Args:
    path: the image file.
    image_shape: (height, width, channels), channels 1 or 3.

  Raises:
    pinet_jax.errors.UserInputError: the file is missing or not an image
      that Pillow can read.
  """
  height, width, channels = image_shape
  try:
    with Image.open(path) as opened:
      image = ImageOps.exif_transpose(opened)
      image = _to_eight_bits(image, path)
      image = image.convert('L' if channels == 1 else 'RGB')
  except FileNotFoundError as error:
    raise UserInputError(f'image file {path} not found') from error
  except (UnidentifiedImageError, OSError) as error:
    raise UserInputError(
      f'cannot read {path} as an image: {error}; pass a PNG, JPEG or other '
      'file that Pillow reads'
    ) from error
  if image.size != (width, height):
    image = image.resize((width, height), Image.Resampling.BILINEAR)
  pixels = np.asarray(image, dtype=np.uint8)
  return pixels.reshape(height, width, channels)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Return the k most probable classes of each row and their probabilities.

  Args:
    probabilities: (batch, classes).
    k: from 1 to the number of classes.

  Returns:
    int (batch, k) class indices and (batch, k) probabilities, most
    probable first; equal probabilities keep the lower index first.

  Raises:
    ValueError: k is out of range.
  """
  classes = probabilities.shape[-1]
  if not 1 <= k <= classes:
    raise ValueError(f'k must be between 1 and {classes}, got {k}')
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(probabilities, order, axis=-1)


def predict_files(
  classifier: inference.Classifier, paths: Sequence[str], k: int
) -> list[Prediction]:
  """Return the top-k classes of each image file, in the order of `paths`.

  Raises:
    pinet_jax.errors.UserInputError: an image cannot be read, or k is not
      between 1 and the number of classes.
  """
  classes = len(classifier.class_names)
  if not 1 <= k <= classes:
    raise UserInputError(
      f'top_k={k} is out of range: the model has {classes} classes, so '
      f'pass 1 to {classes}'
    )
  predictions = []
  for start in range(0, len(paths), BATCH_SIZE):
    chunk = [os.fspath(path) for path in paths[start : start + BATCH_SIZE]]
    images = np.stack(
      [load_image(path, classifier.image_shape) for path in chunk]
    )
    indices, probabilities = top_k(classifier(images), k)
    for path, row, row_probabilities in zip(
      chunk, indices, probabilities, strict=True
    ):
      predictions.append(
        Prediction(
          path=path,
          classes=tuple(int(index) for index in row),
          names=tuple(classifier.class_names[index] for index in row),
          probabilities=tuple(float(p) for p in row_probabilities),
        )
      )
  return predictions


def format_text(prediction: Prediction) -> str:
  """Return one line: the path, then each class with its probability."""
  ranked = ', '.join(
    f'{name} {100 * probability:.2f}%'
    for name, probability in zip(
      prediction.names, prediction.probabilities, strict=True
    )
  )
  return f'{prediction.path}: {ranked}'
