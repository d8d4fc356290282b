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


# Sequential float32 sums of ~1e3 terms of one sign agree with float64 to
# ~1e-7 relative; a wrong row, a dropped leaf or padding that is not zero
# is off by whole terms (>= 1e-3 relative here).
ROW_SUM_RTOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_row_sums_sum_each_row_of_leaves(dtype, mode):
  rng = np.random.RandomState(3)
  leaves = [rng.rand(256, 2), rng.rand(256), rng.rand(3), rng.rand(40, 1)]
  rows = [leaves[:2], leaves[2:], [], [leaves[0] ** 2]]

  def sums(a, b, c, d):
    return _lowering.row_sums([[a, b], [c, d], [], [a ** 2]],
                              tf.as_dtype(dtype))

  out = run_in_mode(sums, mode)(
      *[tf.constant(x, dtype) for x in leaves]).numpy()
  expected = [sum(np.sum(x) for x in row) for row in rows]
  assert out.dtype == dtype and out.shape == (4,)
  np.testing.assert_allclose(out, expected, rtol=ROW_SUM_RTOL[dtype])
  assert out[2] == 0.


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_a_sum_of_zeros_or_nan_is_zero_exactly_when_all_are_finite(dtype,
                                                                   mode):
  """`x * 0` survives XLA's simplifier (it must not become 0) for every
  kind of non-finite value, in any position of any leaf."""
  info = np.finfo(dtype)
  finite = np.array([0., -0., info.max, -info.max, info.tiny / 4, 1e30,
                     -7.], dtype)
  cases = []
  for bad in [np.inf, -np.inf, np.nan]:
    for where in [0, 3, 6]:
      x = finite.copy()
      x[where] = bad
      cases.append(x)

  def check(x, y, n):
    return [_lowering.row_sums([_lowering.zeros_or_nan([x, y, n])],
                               x.dtype)[0],
            _lowering.row_sums([_lowering.zeros_or_nan([y, x, n])],
                               x.dtype)[0]]

  run = run_in_mode(check, mode)
  ints = tf.constant([1, 2, 3])
  clean = tf.constant(np.tile(finite, 40))
  assert [v.numpy() for v in run(clean, clean, ints)] == [0., 0.]
  for x in cases:
    for v in run(tf.constant(np.tile(x, 40)), clean, ints):
      assert np.isnan(v.numpy()), x


def test_complex_leaves_are_checked_by_both_parts():
  x = tf.constant([1 + 1j, 2 - 3j], tf.complex128)
  z = _lowering.zeros_or_nan([x, tf.constant([1, 2])])
  assert [t.dtype for t in z] == [tf.float64, tf.float64]
  assert _lowering.row_sums([z], tf.float64).numpy()[0] == 0.
  for bad in [complex(np.inf, 0), complex(0, np.nan)]:
    y = tf.constant([1 + 1j, bad], tf.complex128)
    assert np.isnan(_lowering.row_sums([_lowering.zeros_or_nan([y])],
                                       tf.float64).numpy()[0])


def test_row_sums_is_one_reduction_for_static_shapes():
  @tf.function
  def f(a, b):
    return _lowering.row_sums([[a, b], _lowering.zeros_or_nan([a, b])],
                              tf.float32)

  graph = f.get_concrete_function(tf.TensorSpec([256, 2], tf.float32),
                                  tf.TensorSpec([256], tf.float32)).graph
  types = [op.type for op in graph.get_operations()]
  assert types.count('Sum') == 1, types
  assert not {'All', 'IsFinite'} & set(types), types
  # Dynamic shapes: one sum per row.
  g = tf.function(lambda a: _lowering.row_sums([[a], [a]], tf.float32))
  types = [op.type for op in g.get_concrete_function(
      tf.TensorSpec([None], tf.float32)).graph.get_operations()]
  assert types.count('Sum') == 2, types


@pytest.mark.parametrize('mode', RUN_MODES)
def test_adam_where_false_leaves_weights_state_and_step(mode):
  from tfp_ffjord.training.adam import Adam

  start = [np.array([[0.5, -1.], [2., 0.25]]), np.array([0.1, -0.3])]
  grads = [np.array([[0.2, 0.1], [-0.4, 0.3]]), np.array([1., -2.])]

  def run(flags):
    """Steps with `grads`; a step flagged False gets NaN gradients."""
    params = [tf.Variable(tf.constant(p, tf.float32)) for p in start]
    opt = Adam(0.1)
    opt._initialize(params)   # pylint: disable=protected-access
    plain = run_in_mode(lambda a, b: opt.apply([a, b], params), mode)
    masked = run_in_mode(lambda a, b, f: opt.apply([a, b], params, where=f),
                         mode)
    for flag in flags:
      g = [tf.constant(x * (1. if flag is not False else np.nan), tf.float32)
           for x in grads]
      if flag is None:
        plain(*g)
      else:
        masked(*g, tf.constant(flag))
    return [v.numpy() for v in params + opt.m + opt.v], int(opt.step.numpy())

  applied, applied_step = run([None])
  for flags in ([True], [False, True, False]):
    state, count = run(flags)
    assert count == applied_step == 1
    for a, b in zip(state, applied):
      np.testing.assert_array_equal(a, b)
  state, count = run([False])
  assert count == 0
  for a, b in zip(state, start + [np.zeros_like(x) for x in start] * 2):
    np.testing.assert_array_equal(a, np.float32(b))
