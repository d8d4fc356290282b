"""tfp_ffjord.FFJORD: parity with tfb.FFJORD, closed forms, TFP's bugs fixed."""

import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode
from tests.helpers import RUN_MODES, run_in_mode

tfb, tfd = tfp.bijectors, tfp.distributions

PARITY_ATOL = 1e-5       # log_prob vs tfb.FFJORD, float64, same solver
CLOSED_FORM_ATOL = {tf.float32: 2e-5, tf.float64: 1e-8}
SLOGDET_ATOL = 1e-6      # float64, tight solver
ROUND_TRIP_ATOL = {tf.float32: 1e-4, tf.float64: 1e-7}
# Parameter gradients of a 2-block chain at Tsit5's default tolerances against
# a tight solve, relative to the largest entry of each variable's gradient:
# measured <= 6e-6 (adjoint), 2e-6 (backprop); different probes: ~1.
DEFAULT_TOL_GRAD = 1e-4


def tight_solver(dtype, gradient='adjoint'):
  tol = 1e-6 if dtype == tf.float32 else 1e-10
  return ode.Tsit5(rtol=tol, atol=tol, gradient=gradient).solve


def exact_ffjord(fn, dtype=tf.float64, **kwargs):
  kwargs.setdefault('ode_solve_fn', tight_solver(dtype))
  return tfp_ffjord.FFJORD(
      fn, trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact, dtype=dtype,
      **kwargs)


def fresh(t):
  """A copy the bijector cache has not seen."""
  return tf.constant(np.asarray(t))


# ----------------------------------------------------------------- parity


@pytest.mark.slow
def test_log_prob_matches_tfp_ffjord_with_the_same_solver():
  tf.random.set_seed(7)
  blocks = [tfp_ffjord.MLPODE([8, 8], 2, name=f'mlp_{i}') for i in range(2)]
  x = tf.random.normal([64, 2], dtype=tf.float64)
  for b in blocks:  # Build in float64.
    b(tf.constant(0., tf.float64), x)
  solve = tfp.math.ode.DormandPrince(rtol=1e-10, atol=1e-10).solve
  base = tfd.MultivariateNormalDiag(tf.zeros([2], tf.float64),
                                    tf.constant([.8, .8], tf.float64))

  def flow(cls, trace_fn):
    return tfd.TransformedDistribution(base, tfb.Chain([
        cls(b, ode_solve_fn=solve, trace_augmentation_fn=trace_fn,
            dtype=tf.float64) for b in blocks]))

  ours = flow(tfp_ffjord.FFJORD, tfp_ffjord.trace_jacobian_exact).log_prob(x)
  theirs = flow(tfb.FFJORD, tfb.ffjord.trace_jacobian_exact).log_prob(x)
  np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=PARITY_ATOL)
  # Our own solver at the same tolerance agrees too.
  ours_tsit5 = tfd.TransformedDistribution(base, tfb.Chain([
      exact_ffjord(b) for b in blocks])).log_prob(x)
  np.testing.assert_allclose(ours_tsit5.numpy(), theirs.numpy(),
                             atol=PARITY_ATOL)


# ------------------------------------------------------------ closed forms


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_constant_field_shifts_with_zero_log_det(dtype):
  bij = exact_ffjord(lambda t, z: tf.ones_like(z), dtype=dtype)
  x = tf.constant([[0.5, -1.0], [2.0, 3.0]], dtype)
  np.testing.assert_allclose(bij.forward(x).numpy(), x.numpy() + 1,
                             atol=CLOSED_FORM_ATOL[dtype])
  np.testing.assert_allclose(
      bij.forward_log_det_jacobian(fresh(x), event_ndims=1).numpy(), [0, 0],
      atol=CLOSED_FORM_ATOL[dtype])


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.matrix
def test_linear_field_log2_doubles(dtype):
  bij = exact_ffjord(lambda t, z: np.log(2.) * z, dtype=dtype)
  x = tf.constant([[0.5, -1.0, 3.0]], dtype)
  np.testing.assert_allclose(bij.forward(x).numpy(), 2 * x.numpy(),
                             rtol=CLOSED_FORM_ATOL[dtype])
  np.testing.assert_allclose(
      bij.forward_log_det_jacobian(fresh(x), event_ndims=0).numpy(),
      np.full([1, 3], np.log(2.)), atol=CLOSED_FORM_ATOL[dtype])


@pytest.mark.slow
def test_diagonal_linear_field_in_10d():
  diag = np.linspace(-1.0, 1.5, 10)
  bij = exact_ffjord(lambda t, z: z * diag)
  x = tf.random.normal([5, 10], dtype=tf.float64)
  np.testing.assert_allclose(bij.forward(x).numpy(), x.numpy() * np.exp(diag),
                             rtol=1e-8)
  np.testing.assert_allclose(
      bij.forward_log_det_jacobian(fresh(x), event_ndims=1).numpy(),
      np.full([5], diag.sum()), atol=CLOSED_FORM_ATOL[tf.float64])


def _time_dependent(t, z):
  return t * z  # z(t) = z(t0) exp((t^2 - t0^2) / 2)


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.matrix
def test_time_dependent_field_with_initial_time_1(dtype):
  # initial_time=1, final_time=2: y = x exp(1.5), log-det 1.5 per element.
  bij = exact_ffjord(_time_dependent, dtype=dtype, initial_time=1.,
                     final_time=2.)
  x = tf.constant([[0.5, -1.0]], dtype)
  y = (x.numpy() * np.exp(1.5)).astype(dtype.as_numpy_dtype)
  tol = CLOSED_FORM_ATOL[dtype]
  np.testing.assert_allclose(bij.forward(x).numpy(), y, rtol=tol)
  np.testing.assert_allclose(bij.inverse(fresh(y)).numpy(), x.numpy(),
                             rtol=tol)
  np.testing.assert_allclose(
      bij.inverse_log_det_jacobian(fresh(y), event_ndims=1).numpy(), [-3.],
      atol=tol)


def test_tfp_inverse_with_nonzero_initial_time_is_wrong_and_ours_is_right():
  kwargs = dict(trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact,
                initial_time=1., final_time=2., dtype=tf.float64,
                ode_solve_fn=tight_solver(tf.float64))
  y = tf.constant([[1.0, 2.0]], tf.float64)
  expected = y.numpy() * np.exp(-1.5)
  theirs = tfb.FFJORD(_time_dependent, **kwargs).inverse(y)
  ours = tfp_ffjord.FFJORD(_time_dependent, **kwargs).inverse(fresh(y))
  assert not np.allclose(theirs.numpy(), expected, rtol=1e-3)
  np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-8)


def test_unbatched_input_gets_the_right_log_det():
  a = np.array([[0.1, 2.0], [-1.0, 0.3]])
  bij = exact_ffjord(lambda t, z: tf.linalg.matvec(tf.constant(a), z))
  x = tf.constant([0.4, -0.7], tf.float64)
  np.testing.assert_allclose(
      bij.forward_log_det_jacobian(x, event_ndims=1).numpy(), np.trace(a),
      atol=1e-8)


# ------------------------------------------- Jacobians and round trips


def _slogdet_of_forward(bij, x):
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    y = bij.forward(x)
    columns = [y[..., i] for i in range(x.shape[-1])]
  rows = [tape.gradient(c, x) for c in columns]
  jac = tf.stack(rows, axis=-2)  # [batch, D, D]
  return tf.linalg.slogdet(jac)[1]


@pytest.mark.parametrize('gradient', ['adjoint', 'backprop'])
@pytest.mark.matrix
def test_log_det_equals_slogdet_of_autodiff_jacobian(gradient):
  mlp = tfp_ffjord.MLPODE([16], 3)
  x = tf.random.normal([4, 3], dtype=tf.float64)
  mlp(tf.constant(0., tf.float64), x)
  bij = exact_ffjord(mlp, ode_solve_fn=tight_solver(tf.float64, gradient))
  expected = _slogdet_of_forward(bij, x)
  got = bij.forward_log_det_jacobian(fresh(x), event_ndims=1)
  np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=SLOGDET_ATOL)


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.matrix
def test_round_trip_and_log_det_symmetry(dtype):
  mlp = tfp_ffjord.MLPODE([16, 16], 2)
  x = tf.random.normal([32, 2], dtype=dtype)
  mlp(tf.constant(0., dtype), x)
  bij = exact_ffjord(mlp, dtype=dtype)
  y = bij.forward(x)
  np.testing.assert_allclose(bij.inverse(fresh(y)).numpy(), x.numpy(),
                             atol=ROUND_TRIP_ATOL[dtype])
  fldj = bij.forward_log_det_jacobian(fresh(x), event_ndims=1)
  ildj = bij.inverse_log_det_jacobian(fresh(y), event_ndims=1)
  np.testing.assert_allclose(fldj.numpy(), -ildj.numpy(),
                             atol=ROUND_TRIP_ATOL[dtype])


# ------------------------------------------------------------- Hutchinson


def test_hutchinson_seed_per_call_and_state_independent_dynamics():
  mlp = tfp_ffjord.MLPODE([8], 2)
  bij = tfp_ffjord.FFJORD(mlp)
  x = tf.random.normal([16, 2])
  a = bij.forward_log_det_jacobian(x, event_ndims=1, seed=3)
  b = bij.forward_log_det_jacobian(fresh(x), event_ndims=1, seed=3)
  c = bij.forward_log_det_jacobian(fresh(x), event_ndims=1, seed=4)
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.allclose(a.numpy(), c.numpy())
  # Seeds go through TransformedDistribution and Chain (routed by name).
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)), tfb.Chain([bij]))
  lp = lambda s: flow.log_prob(fresh(x), bijector_kwargs={bij.name: {
      'seed': s}})
  np.testing.assert_array_equal(lp(5).numpy(), lp(5).numpy())
  # Dynamics that ignore the state: zero trace, no error (TFP fails here).
  const = tfp_ffjord.FFJORD(lambda t, z: tf.ones_like(z) * 2.)
  np.testing.assert_allclose(
      const.forward_log_det_jacobian(x, event_ndims=1, seed=1).numpy(),
      np.zeros([16]))
  np.testing.assert_allclose(const.forward(fresh(x)).numpy(),
                             x.numpy() + 2., atol=1e-5)


def test_stacked_blocks_given_one_seed_draw_different_probes():
  mlp = tfp_ffjord.MLPODE([8], 2)
  x = tf.random.normal([16, 2])
  one, two = tfp_ffjord.FFJORD(mlp), tfp_ffjord.FFJORD(mlp)
  a = one.forward_log_det_jacobian(x, event_ndims=1, seed=9)
  b = two.forward_log_det_jacobian(fresh(x), event_ndims=1, seed=9)
  assert not np.allclose(a.numpy(), b.numpy())


def test_seed_with_a_trace_fn_that_takes_none_is_an_error():
  bij = tfp_ffjord.FFJORD(lambda t, z: -z,
                          trace_augmentation_fn=lambda f, s, d: (
                              tfp_ffjord.trace_jacobian_exact(f, s, d)))
  with pytest.raises(ValueError, match='does not declare a `seed` argument'):
    bij.forward(tf.ones([2, 2]), seed=1)


# ------------------------------------------------------ diagnostics, cost


def test_diagnostics_are_exposed():
  bij = exact_ffjord(lambda t, z: -z)
  y, ldj, diag = bij.solve_forward(tf.ones([3, 2], tf.float64))[:3]
  assert int(diag.num_ode_fn_evaluations) > 0
  assert int(diag.status) == 0
  assert bij.last_diagnostics is diag
  np.testing.assert_allclose(ldj.numpy(), -np.ones([3, 2]), atol=1e-8)
  np.testing.assert_allclose(y.numpy(), np.exp(-1) * np.ones([3, 2]),
                             atol=1e-8)


def test_log_prob_costs_one_solve_also_with_condition_kwargs():
  calls = []
  solver = ode.RK4(num_steps=4)

  def counting_solve(**kwargs):
    calls.append(1)
    return solver.solve(**kwargs)

  def fn(t, z, scale=None):
    return -z if scale is None else -z * scale

  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)),
      tfp_ffjord.FFJORD(fn, ode_solve_fn=counting_solve,
                        trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact))
  x = tf.ones([3, 2])
  flow.log_prob(x)
  assert len(calls) == 1
  calls.clear()
  flow.log_prob(x, bijector_kwargs={'scale': tf.constant(2.)})
  assert len(calls) == 1


@pytest.mark.parametrize('solver', ['tfp_dormand_prince', 'tfp_bdf'])
@pytest.mark.matrix
def test_tfp_solvers_work_in_our_ffjord(solver):
  solve = {'tfp_dormand_prince': tfp.math.ode.DormandPrince(
      rtol=1e-8, atol=1e-8).solve,
           'tfp_bdf': tfp.math.ode.BDF(rtol=1e-8, atol=1e-8).solve}[solver]
  bij = exact_ffjord(lambda t, z: np.log(2.) * z, ode_solve_fn=solve)
  x = tf.constant([[1.0, -2.0]], tf.float64)
  np.testing.assert_allclose(bij.forward(x).numpy(), 2 * x.numpy(), rtol=1e-6)
  np.testing.assert_allclose(
      bij.forward_log_det_jacobian(x, event_ndims=1).numpy(),
      [2 * np.log(2.)], rtol=1e-6)
  assert int(bij.last_diagnostics.num_ode_fn_evaluations) > 0


# ---------------------------------------------- kwargs, gradients, modes


def test_condition_kwargs_reach_dynamics_and_get_gradients():
  mlp = tfp_ffjord.MLPODE([8], 2, context_keys=['context'])
  bij = tfp_ffjord.FFJORD(mlp, trace_augmentation_fn=(
      tfp_ffjord.trace_jacobian_exact), dtype=tf.float64,
                          ode_solve_fn=tight_solver(tf.float64))
  x = tf.random.normal([4, 2], dtype=tf.float64)
  c = tf.constant([[0.5], [-1.0], [2.0], [0.0]], tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(c)
    y = bij.forward(x, context=c)
    loss = tf.reduce_sum(y ** 2)
  grad = tape.gradient(loss, c).numpy()
  eps = 1e-6
  sq_norm = tf.function(lambda x, c: tf.reduce_sum(
      bij.forward(x, context=c) ** 2))
  for i in range(4):
    dc = np.zeros([4, 1])
    dc[i] = eps
    up, down = sq_norm(x, c + dc), sq_norm(x, c - dc)
    np.testing.assert_allclose(grad[i, 0], (up - down) / (2 * eps),
                               rtol=1e-5)
  y0 = bij.forward(fresh(x), context=tf.zeros_like(c))
  assert not np.allclose(y0.numpy(), y.numpy())


@pytest.mark.parametrize('gradient', ['adjoint', 'backprop'])
@pytest.mark.matrix
def test_gradients_reach_every_variable(gradient):
  """Every weight of a 2-block chain gets the gradient a tight solve gives."""
  blocks = [tfp_ffjord.MLPODE([8, 8], 2, name=f'm{i}') for i in range(2)]

  def flow(solver):
    return tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)),
        tfb.Chain([tfp_ffjord.FFJORD(b, ode_solve_fn=solver.solve,
                                     seed_salt=i)   # the same probes
                   for i, b in enumerate(blocks)]))

  x = tf.random.normal([16, 2])

  def grads(solver):
    dist = flow(solver)
    with tf.GradientTape() as tape:   # TFP's default trace: Hutchinson's
      loss = -tf.reduce_mean(dist.log_prob(x, bijector_kwargs={
          'ffjord': {'seed': 1}}))
    variables = dist.trainable_variables
    assert len(variables) == 12  # 2 blocks x 3 layers x (w, b)
    return variables, tape.gradient(loss, variables)

  variables, got = grads(ode.Tsit5(gradient=gradient))
  _, want = grads(ode.Tsit5(rtol=1e-7, atol=1e-7, gradient='backprop'))
  for v, g, w in zip(variables, got, want):
    assert g is not None, f'no gradient for {v.name}'
    assert np.any(w.numpy() != 0), f'zero gradient for {v.name}'
    scale = np.abs(w.numpy()).max()
    np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=DEFAULT_TOL_GRAD,
                               atol=DEFAULT_TOL_GRAD * scale, err_msg=v.name)


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('trace', ['exact', 'hutchinson'])
@pytest.mark.matrix
def test_eager_function_and_xla_agree(mode, trace):
  mlp = tfp_ffjord.MLPODE([8, 8], 2)
  trace_fn = (tfp_ffjord.trace_jacobian_exact if trace == 'exact'
              else tfp_ffjord.trace_jacobian_hutchinson)
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2) * .8),
      tfp_ffjord.FFJORD(mlp, trace_augmentation_fn=trace_fn))
  x = tf.random.normal([32, 2])
  lp = lambda x: flow.log_prob(x, bijector_kwargs={'seed': 2})
  expected = lp(x).numpy()
  got = run_in_mode(lp, mode)(fresh(x)).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_hutchinson_loss_under_xla_with_a_tape_equals_eager():
  # Regression: with an adaptive adjoint solver, probes drawn by float
  # stateless RNG ops gave a different forward loss under XLA + GradientTape.
  mlp = tfp_ffjord.MLPODE([8], 2)
  mlp(0., tf.zeros([1, 2]))
  # A fixed salt: the default one counts the bijectors built before in the
  # process, so the probes (and the adaptive steps, eager and under XLA)
  # would depend on which tests ran first in the worker.
  bij = tfp_ffjord.FFJORD(mlp, ode_solve_fn=ode.Tsit5(atol=1e-4).solve,
                          seed_salt='xla-vs-eager')
  x = tf.random.normal([32, 2], seed=1)

  def loss_and_grads(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(bij.solve_forward(x, seed=3).log_det_jacobian)
    return loss, tape.gradient(loss, mlp.trainable_variables)

  eager_loss, eager_grads = loss_and_grads(x)
  xla_loss, xla_grads = tf.function(loss_and_grads, jit_compile=True)(x)
  np.testing.assert_allclose(xla_loss.numpy(), eager_loss.numpy(), rtol=1e-4)
  for e, g in zip(eager_grads, xla_grads):
    np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_function_with_none_batch_dimension():
  mlp = tfp_ffjord.MLPODE([8], 2)
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)),
      tfp_ffjord.FFJORD(mlp, trace_augmentation_fn=(
          tfp_ffjord.trace_jacobian_exact)))

  @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
  def log_prob(x):
    return flow.log_prob(x)

  for n in (3, 7):
    x = tf.random.normal([n, 2])
    np.testing.assert_allclose(log_prob(x).numpy(), flow.log_prob(x).numpy(),
                               atol=1e-5)
  hutch = tfp_ffjord.FFJORD(mlp)
  f = tf.function(lambda x: hutch.forward_log_det_jacobian(
      x, event_ndims=1, seed=1),
                  input_signature=[tf.TensorSpec([None, 2], tf.float32)])
  assert f(tf.ones([5, 2])).shape == (5,)


# ----------------------------------------------- composition and shapes


def test_chain_invert_and_batch_dimensions():
  mlp = tfp_ffjord.MLPODE([8], 2)
  bij = exact_ffjord(mlp, dtype=tf.float32,
                     ode_solve_fn=tight_solver(tf.float32))
  x = tf.random.normal([3, 4, 2])
  y = bij.forward(x)
  assert y.shape == (3, 4, 2)
  fldj = bij.forward_log_det_jacobian(fresh(x), event_ndims=1)
  assert fldj.shape == (3, 4)
  inv = tfb.Invert(bij)
  np.testing.assert_allclose(inv.inverse(fresh(x)).numpy(), y.numpy(),
                             atol=1e-5)
  chain = tfb.Chain([tfb.Shift(1.), bij, tfb.Scale(2.)])
  np.testing.assert_allclose(
      chain.forward(fresh(x)).numpy(),
      bij.forward(fresh(2 * x.numpy())).numpy() + 1, atol=1e-5)
  flat = bij.forward_log_det_jacobian(
      tf.reshape(fresh(x), [12, 2]), event_ndims=1)
  np.testing.assert_allclose(fldj.numpy().ravel(), flat.numpy(), atol=1e-5)


def test_float64_end_to_end_sampling_and_log_prob():
  mlp = tfp_ffjord.MLPODE([8], 2)
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2, tf.float64),
                                 tf.ones(2, tf.float64)),
      exact_ffjord(mlp))
  samples = flow.sample(5, seed=(1, 2))
  assert samples.dtype == tf.float64
  lp = flow.log_prob(samples)
  assert lp.dtype == tf.float64 and lp.shape == (5,)
  assert all(v.dtype == tf.float64 for v in mlp.trainable_variables)


def test_dynamics_module_variables_are_tracked_and_name_starts_with_ffjord():
  mlp = tfp_ffjord.MLPODE([8], 2)
  bij = tfp_ffjord.FFJORD(mlp)
  bij.forward(tf.ones([1, 2]))
  assert bij.name.startswith('ffjord')
  assert {v.ref() for v in bij.trainable_variables} == {
      v.ref() for v in mlp.trainable_variables}
  assert tfp_ffjord.ffjord.FFJORD is tfp_ffjord.FFJORD
  assert (tfp_ffjord.ffjord.trace_jacobian_exact
          is tfp_ffjord.trace_jacobian_exact)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(state_time_derivative_fn=3), TypeError,
     '`state_time_derivative_fn` must be callable'),
    (dict(ode_solve_fn='dopri'), TypeError, '`ode_solve_fn` must be callable'),
    (dict(trace_augmentation_fn=None), TypeError,
     '`trace_augmentation_fn` must be callable'),
    (dict(initial_time=1., final_time=1.), ValueError,
     '`final_time` must be greater than `initial_time`'),
    (dict(final_time=float('inf')), ValueError, '`final_time` must be finite'),
])
def test_constructor_errors(kwargs, error, match):
  kwargs.setdefault('state_time_derivative_fn', lambda t, z: z)
  with pytest.raises(error, match=match):
    tfp_ffjord.FFJORD(**kwargs)


def test_validate_args_rejects_nan_input():
  bij = tfp_ffjord.FFJORD(lambda t, z: -z, validate_args=True)
  with pytest.raises(tf.errors.InvalidArgumentError, match='NaN or Inf'):
    bij.forward(tf.constant([[np.nan, 1.0]]))


def test_functools_partial_trace_fn_receives_the_seed():
  trace_fn = functools.partial(tfp_ffjord.trace_jacobian_hutchinson,
                               noise='rademacher')
  bij = tfp_ffjord.FFJORD(lambda t, z: 0.5 * z, trace_augmentation_fn=trace_fn)
  ldj = bij.forward_log_det_jacobian(tf.ones([4, 3]), event_ndims=1, seed=1)
  np.testing.assert_allclose(ldj.numpy(), np.full([4], 1.5), rtol=1e-5)
