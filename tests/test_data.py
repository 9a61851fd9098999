"""The MNIST loader against the facts in shared/data.md."""

import numpy as np

from kfac_jax_ext import datasets as data


def test_mnist_matches_published_facts():
  x_train, y_train, x_test, y_test = data.load_mnist()
  assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
  np.testing.assert_array_equal(y_train[:50000][:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
  np.testing.assert_array_equal(np.bincount(y_train, minlength=10),
                                [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                 5949])
  assert abs(float(np.mean(x_train * 256)) - 33.32) < 0.05
  np.testing.assert_array_equal(np.rint(x_train * 256), x_train * 256)


def test_fashion_mnist_matches_published_facts():
  try:
    x_train, y_train, x_test, y_test = data.load_fashion_mnist()
  except data.DatasetUnavailable as e:
    import pytest
    pytest.skip(str(e))
  assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
  assert abs(float(x_train.mean()) - 0.2860) < 5e-4
  assert abs(float(x_train.std()) - 0.3530) < 5e-4
