"""Datasets: raw MNIST and CIFAR-10 readers, tfds builders, input pipeline."""
