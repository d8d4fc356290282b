"""Shared test set-up: quiet TensorFlow, deterministic seeds, the quick subset.

Helpers that test modules import live in `tests/helpers.py`.

`pytest -m "not slow"` is the quick subset (under 5 minutes on 2 cores):
end-to-end tests are marked `slow`, and a test marked `matrix` (a
parametrized matrix of solvers, dtypes, run modes) runs its first case in
the quick subset and the others only in the whole suite.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Command-line runs in tests compile afresh and leave ~/.cache alone (the
# cache's own tests give their processes a directory).
os.environ.setdefault('TFP_FFJORD_XLA_CACHE', '0')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


def pytest_collection_modifyitems(items):
  seen = set()
  for item in items:
    if item.get_closest_marker('matrix') is None:
      continue
    function = (item.module.__name__, item.originalname)
    if function in seen:
      item.add_marker(pytest.mark.slow)
    seen.add(function)


@pytest.fixture(autouse=True)
def _seed():
  tf.random.set_seed(1234)
  np.random.seed(1234)
  yield


# Property-based tests (tests/test_properties.py): a bounded, reproducible
# search by default; HYPOTHESIS_PROFILE=long for a longer one.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    'ci', max_examples=6, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    'long', max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))
