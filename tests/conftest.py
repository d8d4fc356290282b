"""Shared test set-up: quiet TensorFlow, deterministic seeds.

Helpers that test modules import live in `tests/helpers.py`.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
  tf.random.set_seed(1234)
  np.random.seed(1234)
  yield
