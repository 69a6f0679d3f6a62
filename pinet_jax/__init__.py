"""Π-nets: deep polynomial networks in JAX and Flax.

The package root imports nothing heavy: `pinet_jax.models` is usable without
TensorFlow, and the training modules import it only where they need data.
"""

__version__ = '0.1.0'
