"""The fast-to-compile elementwise helpers equal TensorFlow's ops exactly."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_ffjord import _lowering
from tests.helpers import RUN_MODES, run_in_mode


def special_values(dtype):
  info = np.finfo(dtype)
  rng = np.random.RandomState(0)
  wide = rng.randn(2000) * np.exp(rng.uniform(-40, 40, 2000))
  fixed = [0., -0., 1., -1., info.tiny, -info.tiny, info.tiny / 4,
           info.max, -info.max, np.inf, -np.inf, np.nan, -np.nan]
  return np.concatenate([fixed, wide]).astype(dtype)


def same_values(ours, theirs, x):
  """Equal values, NaN where the other is NaN, zeros of either sign alike.

  A subnormal input may come out as zero: TensorFlow's CPU kernels and XLA
  treat subnormals as zero in `max`, while `Abs` only clears the sign bit.
  """
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  if ours.dtype == bool:
    return np.array_equal(ours, theirs)
  info = np.finfo(x.dtype)
  flushed = (np.abs(x) < info.tiny) & (ours == 0)
  nan = np.isnan(ours)
  return (np.array_equal(nan, np.isnan(theirs))
          and np.array_equal(ours[~nan & ~flushed], theirs[~nan & ~flushed]))


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_helpers_equal_the_tensorflow_ops(dtype, mode):
  x = tf.constant(special_values(dtype))

  def both(x):
    return (_lowering.magnitude(x), tf.abs(x),
            _lowering.sqrt(tf.abs(x)), tf.sqrt(tf.abs(x)),
            _lowering.sqrt(x), tf.sqrt(x),
            _lowering.is_finite(x), tf.math.is_finite(x))

  out = [t.numpy() for t in run_in_mode(both, mode)(x)]
  inputs = [x.numpy(), np.abs(x.numpy()), x.numpy(), x.numpy()]
  for name, ours, theirs, x_in in zip(
      ['magnitude', 'sqrt', 'sqrt (negatives)', 'is_finite'], out[::2],
      out[1::2], inputs):
    assert ours.dtype == theirs.dtype, name
    assert same_values(ours, theirs, x_in), name


@pytest.mark.parametrize('mode', RUN_MODES)
def test_complex_inputs_fall_back_to_the_tensorflow_ops(mode):
  x = tf.constant([3 + 4j, np.inf + 1j, 1 + np.nan * 1j, -2j], tf.complex128)

  def both(x):
    return (_lowering.magnitude(x), _lowering.is_finite(x),
            _lowering.sqrt(x))

  magnitude, finite, root = [t.numpy() for t in run_in_mode(both, mode)(x)]
  np.testing.assert_array_equal(magnitude, np.abs(x.numpy()))
  np.testing.assert_array_equal(finite, [True, False, False, True])
  np.testing.assert_allclose(root, np.sqrt(x.numpy()), rtol=1e-15)


def test_the_helpers_build_no_op_that_is_slow_to_lower():
  @tf.function(jit_compile=True)
  def f(x):
    return (_lowering.magnitude(x), _lowering.sqrt(x),
            _lowering.is_finite(x))

  graph_def = f.get_concrete_function(
      tf.TensorSpec([3], tf.float32)).graph.as_graph_def()
  types = {node.op for node in graph_def.node}
  assert not types & {'Abs', 'Sqrt', 'IsFinite'}, types
