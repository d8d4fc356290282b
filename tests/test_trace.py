"""Trace estimators against `trace(batch_jacobian)`, and Hutchinson statistics."""

import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode
from tests.helpers import RUN_MODES, run_in_mode

tfb, tfd = tfp.bijectors, tfp.distributions

EXACT_ATOL = {tf.float32: 1e-5, tf.float64: 1e-12}
NUM_SEEDS = 400          # Hutchinson draws for the mean test
SIGMA_MULTIPLE = 4.0     # mean must lie within 4 sigma / sqrt(N) of the truth
VARIANCE_DRAWS = 4000    # independent estimates for the variance test


def _mlp_dynamics(dim, dtype, seed=0):
  rng = np.random.RandomState(seed)
  w1 = tf.constant(rng.randn(dim + 1, 16) / 2, dtype)
  w2 = tf.constant(rng.randn(16, dim) / 2, dtype)

  def fn(t, z, **kwargs):
    tcol = tf.ones_like(z[..., :1]) * tf.cast(t, dtype)
    h = tf.tanh(tf.tensordot(tf.concat([tcol, z], -1), w1, 1))
    return tf.tensordot(h, w2, 1)

  return fn


def _jacobian_trace(fn, t, z):
  with tf.GradientTape() as tape:
    tape.watch(z)
    out = fn(t, z)
  return tf.linalg.trace(tape.batch_jacobian(out, z))


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('dim', [1, 2, 7, 24])
def test_exact_trace_matches_batch_jacobian(dim, mode, dtype):
  fn = _mlp_dynamics(dim, dtype)
  z = tf.random.normal([6, dim], dtype=dtype)
  aug = tfp_ffjord.trace_jacobian_exact(fn, z.shape, dtype)
  dz, diag = run_in_mode(lambda z: aug(0.3, (z, tf.zeros_like(z))), mode)(z)
  assert diag.shape == z.shape
  np.testing.assert_allclose(tf.reduce_sum(diag, -1).numpy(),
                             _jacobian_trace(fn, 0.3, z).numpy(),
                             atol=EXACT_ATOL[dtype])
  np.testing.assert_allclose(dz.numpy(), fn(0.3, z).numpy(),
                             atol=EXACT_ATOL[dtype])


@pytest.mark.parametrize('dim', [7, 24])
def test_exact_trace_gradient_compiles_under_xla(dim):
  # A training step differentiates the trace again. Above UNROLL_MAX_DIM
  # (the copies path) this failed to compile with `tf.vectorized_map`.
  rng = np.random.RandomState(0)
  w = tf.Variable(rng.randn(dim, dim) / dim ** .5, dtype=tf.float32)
  fn = lambda t, z: tf.tanh(tf.matmul(z, w)) * t
  z = tf.constant(rng.randn(5, dim), tf.float32)
  aug = tfp_ffjord.trace_jacobian_exact(fn, z.shape, tf.float32,
                                        regularize=True)

  def loss():
    with tf.GradientTape() as tape:
      _, diag, _, frob = aug(0.7, (z, tf.zeros_like(z), tf.zeros_like(z),
                                   tf.zeros_like(z)))
      value = tf.reduce_sum(diag) + tf.reduce_sum(frob)
    return value, tape.gradient(value, w)

  value, grad = tf.function(loss, jit_compile=True)()
  with tf.GradientTape() as tape:   # reference: the dense Jacobian
    with tf.GradientTape() as inner:
      inner.watch(z)
      out = fn(0.7, z)
    jac = inner.batch_jacobian(out, z)
    expected = tf.reduce_sum(tf.linalg.trace(jac)) + tf.reduce_sum(
        tf.square(jac))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, tape.gradient(expected, w), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('dim', [7, 24])
def test_exact_trace_training_step_through_a_solve_compiles_under_xla(dim):
  # The gradient of a log-likelihood through an RK4 solve (a while loop)
  # with the exact trace: with `tf.vectorized_map` above D = 16 this failed
  # to compile ("shape argument ... could not be evaluated at compile
  # time").
  dynamics = tfp_ffjord.MLPODE([16], dim)
  bij = tfp_ffjord.FFJORD(dynamics, ode_solve_fn=ode.RK4(num_steps=2).solve,
                          trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  dist = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros([dim])), bij)
  x = tf.random.stateless_normal([8, dim], (1, 2))
  dynamics(0., x)

  def step(x):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(dist.log_prob(x))
    return loss, tape.gradient(loss, dynamics.trainable_variables)

  loss, grads = tf.function(step, jit_compile=True)(x)
  eager_loss, eager_grads = step(x + 0.)
  np.testing.assert_allclose(loss, eager_loss, rtol=1e-5)
  for g, e in zip(grads, eager_grads):
    np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-5)


def test_exact_trace_without_batch_axis_is_right():
  # tfb.ffjord.trace_jacobian_exact treats the event axis of a [D] input as
  # a batch axis and returns a wrong value; ours gives the true diagonal.
  a = tf.constant([[1.0, 2.0, 0.0], [0.5, -3.0, 1.0], [0.0, 4.0, 0.25]],
                  tf.float64)
  fn = lambda t, z: tf.linalg.matvec(a, z)
  z = tf.constant([0.1, 0.2, 0.3], tf.float64)
  _, diag = tfp_ffjord.trace_jacobian_exact(fn, z.shape, z.dtype)(
      0., (z, tf.zeros_like(z)))
  np.testing.assert_allclose(diag.numpy(), np.diag(a.numpy()))
  _, tfp_diag = tfb.ffjord.trace_jacobian_exact(fn, z.shape, z.dtype)(
      0., (z, tf.zeros_like(z)))
  assert not np.allclose(np.sum(tfp_diag.numpy()), np.trace(a.numpy()))


def test_exact_trace_with_several_batch_axes_and_kwargs():
  fn0 = _mlp_dynamics(3, tf.float64)
  fn = lambda t, z, scale: fn0(t, z) * scale
  z = tf.random.normal([2, 4, 3], dtype=tf.float64)
  aug = tfp_ffjord.trace_jacobian_exact(fn, z.shape, z.dtype)
  _, diag = aug(0.5, (z, tf.zeros_like(z)), scale=tf.constant(2., tf.float64))
  flat = tf.reshape(z, [8, 3])
  expected = 2. * _jacobian_trace(fn0, 0.5, flat)
  np.testing.assert_allclose(tf.reshape(tf.reduce_sum(diag, -1), [8]).numpy(),
                             expected.numpy(), atol=1e-12)


@pytest.mark.parametrize('noise', ['gaussian', 'rademacher'])
def test_hutchinson_mean_is_within_k_sigma_of_exact(noise):
  dim = 5
  fn = _mlp_dynamics(dim, tf.float64, seed=3)
  z = tf.random.normal([3, dim], dtype=tf.float64)
  exact = _jacobian_trace(fn, 0.2, z).numpy()

  @tf.function
  def estimate(seed):
    aug = tfp_ffjord.trace_jacobian_hutchinson(fn, z.shape, z.dtype,
                                               seed=seed, noise=noise)
    return tf.reduce_sum(aug(0.2, (z, tf.zeros_like(z)))[1], -1)

  draws = np.stack([estimate(tf.constant([i, 7])).numpy()
                    for i in range(NUM_SEEDS)])
  mean, std = draws.mean(0), draws.std(0, ddof=1)
  bound = SIGMA_MULTIPLE * std / np.sqrt(NUM_SEEDS)
  assert np.all(np.abs(mean - exact) <= bound), (mean, exact, bound)
  assert np.all(std > 0)


@pytest.mark.parametrize('noise', ['gaussian', 'rademacher'])
@pytest.mark.parametrize('num_samples', [1, 4])
def test_hutchinson_variance_matches_closed_form(noise, num_samples):
  # For f(z) = A z the estimate e^T A e has variance 2 ||S||_F^2 (Gaussian)
  # or 2 (||S||_F^2 - sum_i S_ii^2) (Rademacher), S = (A + A^T) / 2, divided
  # by the number of probes. Each row of a batch gets its own probes, so a
  # batch of identical rows gives independent draws in one call.
  rng = np.random.RandomState(0)
  a = rng.randn(4, 4)
  s_mat = (a + a.T) / 2
  frob = np.sum(s_mat ** 2)
  expected = 2 * (frob - np.sum(np.diag(s_mat) ** 2) if noise == 'rademacher'
                  else frob) / num_samples
  a_t = tf.constant(a, tf.float64)
  z = tf.ones([VARIANCE_DRAWS, 4], tf.float64)
  aug = tfp_ffjord.trace_jacobian_hutchinson(
      lambda t, z: tf.linalg.matvec(a_t, z), z.shape, z.dtype, seed=11,
      noise=noise, num_samples=num_samples)
  draws = tf.reduce_sum(aug(0., (z, tf.zeros_like(z)))[1], -1).numpy()
  assert abs(np.mean(draws) - np.trace(a)) <= (
      SIGMA_MULTIPLE * np.sqrt(expected / VARIANCE_DRAWS))
  # The sample variance of a quadratic form has relative s.d. below
  # sqrt(kurtosis / N) ~ 0.06 here; 25% is > 4 of those.
  assert np.var(draws, ddof=1) == pytest.approx(expected, rel=0.25)


def test_hutchinson_same_seed_same_value_and_state_independent_dynamics():
  fn = _mlp_dynamics(2, tf.float32)
  z = tf.random.normal([4, 2])
  est = lambda seed: tfp_ffjord.trace_jacobian_hutchinson(
      fn, z.shape, z.dtype, seed=seed)(0., (z, tf.zeros_like(z)))[1]
  np.testing.assert_array_equal(est(42).numpy(), est(42).numpy())
  assert not np.allclose(est(42).numpy(), est(43).numpy())
  # Dynamics that ignore the state: TFP's version fails on a None gradient.
  dz, trace = tfp_ffjord.trace_jacobian_hutchinson(
      lambda t, z: tf.broadcast_to(tf.constant([1., 2.]), tf.shape(z)),
      z.shape, z.dtype, seed=1)(0., (z, tf.zeros_like(z)))
  np.testing.assert_array_equal(trace.numpy(), np.zeros([4, 2]))
  np.testing.assert_array_equal(dz.numpy(), np.tile([1., 2.], [4, 1]))


def test_trace_estimators_plug_into_tfp_ffjord():
  # A linear field log(2) z doubles the volume per unit time in each axis.
  fn = lambda t, z: np.log(2.) * z
  # Rademacher probes are exact for a diagonal Jacobian: e^T (cI) e = c D.
  for trace_fn in (tfp_ffjord.trace_jacobian_exact,
                   functools.partial(tfp_ffjord.trace_jacobian_hutchinson,
                                     noise='rademacher')):
    bij = tfb.FFJORD(fn, trace_augmentation_fn=trace_fn, dtype=tf.float64,
                     ode_solve_fn=tfp.math.ode.DormandPrince(
                         rtol=1e-8, atol=1e-8).solve)
    x = tf.constant([[0.3, -0.2]], tf.float64)
    np.testing.assert_allclose(
        bij.forward_log_det_jacobian(x, event_ndims=1).numpy(),
        [2 * np.log(2.)], rtol=1e-6)


def test_hutchinson_argument_errors():
  fn = lambda t, z: z
  with pytest.raises(ValueError, match='`num_samples` must be a positive int'):
    tfp_ffjord.trace_jacobian_hutchinson(fn, [2], tf.float32, num_samples=0)
  with pytest.raises(ValueError, match='`noise` must be one of'):
    tfp_ffjord.trace_jacobian_hutchinson(fn, [2], tf.float32, noise='uniform')
  with pytest.raises(TypeError, match='`sample_fn` must be callable'):
    tfp_ffjord.trace_jacobian_hutchinson(fn, [2], tf.float32, sample_fn=3)
