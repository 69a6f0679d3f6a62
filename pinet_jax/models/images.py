"""The input check every image classifier here shares."""

import jax
import jax.numpy as jnp


def check_images(images: jax.Array, in_channels: int, model: str) -> None:
  """Raise ValueError unless `images` is a float (batch, H, W, C) array.

  Args:
    images: the model's input.
    in_channels: the channel count C the model was built for.
    model: the model's name, for the message.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    # Pixels of 0..255 overflow a high-degree polynomial to NaN.
    raise ValueError(
      f'{model} expects floating-point images scaled to [0, 1], got dtype '
      f'{images.dtype}; convert with images / 255'
    )
  if images.ndim != 4 or images.shape[-1] != in_channels:
    raise ValueError(
      f'{model} expects images of shape (batch, height, width, '
      f'{in_channels}), got {images.shape}; set in_channels to the '
      'number of image channels'
    )
