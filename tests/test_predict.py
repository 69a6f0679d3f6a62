"""Reading image files into the model's shape, and ranking classes."""

import numpy as np
import pytest
from PIL import Image

from pinet_jax import predict
from pinet_jax.data import raw_files
from pinet_jax.errors import UserInputError

MNIST_SHAPE = (28, 28, 1)
CIFAR10_SHAPE = (32, 32, 3)


@pytest.fixture
def digit(mnist_dir):
  images, _ = raw_files.load_mnist(mnist_dir, 'test')
  return images[0, ..., 0]


def test_grayscale_png_is_read_exactly(digit, tmp_path):
  path = tmp_path / 'digit.png'
  Image.fromarray(digit, 'L').save(path)
  pixels = predict.load_image(str(path), MNIST_SHAPE)
  assert pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, digit[..., np.newaxis])


def test_gray_rgb_png_becomes_the_same_grayscale(digit, tmp_path):
  # Luma of equal R, G and B is that value, so the conversion is exact.
  path = tmp_path / 'digit_rgb.png'
  Image.fromarray(np.stack([digit] * 3, axis=-1), 'RGB').save(path)
  np.testing.assert_array_equal(
    predict.load_image(str(path), MNIST_SHAPE), digit[..., np.newaxis]
  )


def test_sixteen_bit_png_is_rescaled(digit, tmp_path):
  path = tmp_path / 'digit16.png'
  Image.fromarray(digit.astype(np.uint16) * 257).save(path)
  assert Image.open(path).mode == 'I;16'
  np.testing.assert_array_equal(
    predict.load_image(str(path), MNIST_SHAPE), digit[..., np.newaxis]
  )


def test_grayscale_becomes_rgb(digit, tmp_path):
  path = tmp_path / 'digit.png'
  Image.fromarray(np.pad(digit, 2), 'L').save(path)
  pixels = predict.load_image(str(path), CIFAR10_SHAPE)
  assert pixels.shape == CIFAR10_SHAPE
  for channel in range(3):
    np.testing.assert_array_equal(pixels[..., channel], np.pad(digit, 2))


def test_color_jpeg_is_resized_and_converted(tmp_path):
  # A flat color survives JPEG coding and resizing nearly unchanged, and
  # its luma is 0.299 * 100 + 0.587 * 150 + 0.114 * 200 = 140.75.
  path = tmp_path / 'flat.jpg'
  Image.new('RGB', (40, 56), (100, 150, 200)).save(path, quality=100)
  pixels = predict.load_image(str(path), MNIST_SHAPE)
  assert pixels.shape == MNIST_SHAPE
  assert np.abs(pixels.astype(int) - 141).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
  pixels = np.zeros((2, 4), np.uint8)
  pixels[0, 0] = 255
  exif = Image.Exif()
  # Orientation 6: the stored image must be turned 90 degrees clockwise.
  exif[0x0112] = 6
  path = tmp_path / 'rotated.png'
  Image.fromarray(pixels, 'L').save(path, exif=exif)
  loaded = predict.load_image(str(path), (4, 2, 1))
  np.testing.assert_array_equal(loaded[..., 0], np.rot90(pixels, k=-1))


def test_unreadable_files_are_named(tmp_path):
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  with pytest.raises(UserInputError, match=f'cannot read {text} as an image'):
    predict.load_image(str(text), MNIST_SHAPE)
  missing = tmp_path / 'missing.png'
  with pytest.raises(UserInputError, match=f'image file {missing} not found'):
    predict.load_image(str(missing), MNIST_SHAPE)
  floats = tmp_path / 'floats.tiff'
  Image.fromarray(np.zeros((4, 4), np.float32), 'F').save(floats)
  with pytest.raises(UserInputError, match="Pillow mode 'F'"):
    predict.load_image(str(floats), MNIST_SHAPE)


def test_top_k_orders_by_probability():
  probabilities = np.array([[0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.4, 0.1]])
  classes, top = predict.top_k(probabilities, 3)
  np.testing.assert_array_equal(classes, [[1, 3, 0], [2, 0, 1]])
  np.testing.assert_array_equal(top, [[0.6, 0.2, 0.1], [0.4, 0.25, 0.25]])
  with pytest.raises(ValueError, match='k must be between 1 and 4, got 5'):
    predict.top_k(probabilities, 5)


def test_format_text_lists_classes():
  prediction = predict.Prediction(
    path='a.png', classes=(7, 1), names=('7', '1'), probabilities=(0.9, 0.05)
  )
  assert predict.format_text(prediction) == 'a.png: 7 90.00%, 1 5.00%'
