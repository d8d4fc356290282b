"""The fast-to-compile elementwise helpers equal TensorFlow's ops exactly."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_ffjord import _lowering
from tests.helpers import (RUN_MODES, SLOW_TO_LOWER, graph_op_types,
                           run_in_mode)


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

  types = graph_op_types(f.get_concrete_function(
      tf.TensorSpec([3], tf.float32)))
  assert not types & SLOW_TO_LOWER, types


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_adam_takes_sonnets_steps_and_restores_its_checkpoints(dtype, mode,
                                                                tmp_path):
  import sonnet as snt
  from tfp_ffjord.training.adam import Adam

  rng = np.random.RandomState(1)
  start = [rng.randn(3, 2), rng.randn(2)]

  def run(optimizer):
    params = [tf.Variable(tf.constant(p, dtype)) for p in start]
    optimizer._initialize(params)   # pylint: disable=protected-access

    def step(x):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.tanh(tf.matmul(x, params[0]) + params[1])
                             ** 2)
      optimizer.apply(tape.gradient(loss, params), params)
      return loss

    run_step = run_in_mode(step, mode)
    for k in range(5):
      run_step(tf.constant(rng.randn(4, 3) * (k + 1), dtype))
    return params, optimizer

  rng = np.random.RandomState(2)
  ours, our_adam = run(Adam(0.05))
  rng = np.random.RandomState(2)
  theirs, their_adam = run(snt.optimizers.Adam(0.05))
  for a, b in zip(ours + our_adam.m + our_adam.v,
                  theirs + their_adam.m + their_adam.v):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # The same checkpoint layout: Sonnet's state restores into ours.
  path = tf.train.Checkpoint(opt=their_adam).write(str(tmp_path / 'adam'))
  fresh = Adam(0.05)
  fresh._initialize(ours)   # pylint: disable=protected-access
  tf.train.Checkpoint(opt=fresh).read(path).assert_consumed()
  assert int(fresh.step.numpy()) == 5
  for a, b in zip(fresh.m + fresh.v, their_adam.m + their_adam.v):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
