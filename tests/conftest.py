"""Shared test set-up: quiet TensorFlow, deterministic seeds, run modes."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# How a function under test is run: eagerly, traced, or traced and compiled.
RUN_MODES = ('eager', 'function', 'xla')


def run_in_mode(fn, mode):
  """Wraps `fn` for `mode` in RUN_MODES."""
  if mode == 'eager':
    return fn
  return tf.function(fn, jit_compile=(mode == 'xla'), reduce_retracing=True)


@pytest.fixture(autouse=True)
def _seed():
  tf.random.set_seed(1234)
  np.random.seed(1234)
  yield
