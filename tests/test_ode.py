"""Solvers: closed forms, convergence order, scipy, gradients, failures, XLA."""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import ode
from tfp_ffjord.ode import controllers
from tfp_ffjord.ode import runge_kutta
from tfp_ffjord.ode import tableaus
from tests.helpers import (RUN_MODES, SLOW_TO_LOWER, graph_op_types,
                           run_in_mode)

tfb = tfp.bijectors

# Tolerances. Adaptive solvers are run at rtol=atol=TIGHT and must land within
# a small multiple of it; fixed-step ones at FIXED_STEPS steps, where the
# global error bound of a method of order p is ~ C * (1/FIXED_STEPS)^p.
TIGHT = {tf.float32: 1e-6, tf.float64: 1e-10}
ADAPTIVE_ERROR = {tf.float32: 2e-5, tf.float64: 1e-8}
FIXED_STEPS = 64
FIXED_ERROR = {'Euler': 5e-2, 'Midpoint': 5e-4, 'RK4': 1e-7}
FLOAT32_FLOOR = 2e-5  # float32 rounding over ~100 steps
ORDER_SLACK = 0.5
GRADIENT_RTOL = 1e-4  # adjoint vs backprop vs finite differences, float64
FD_EPS = 1e-6


def make_solvers(dtype, gradient=None):
  kw = {} if gradient is None else {'gradient': gradient}
  return {
      'Euler': ode.Euler(num_steps=FIXED_STEPS, **kw),
      'Midpoint': ode.Midpoint(num_steps=FIXED_STEPS, **kw),
      'RK4': ode.RK4(num_steps=FIXED_STEPS, **kw),
      'DormandPrince': ode.DormandPrince(rtol=TIGHT[dtype], atol=TIGHT[dtype],
                                         **kw),
      'Tsit5': ode.Tsit5(rtol=TIGHT[dtype], atol=TIGHT[dtype], **kw),
  }


SOLVER_NAMES = ['Euler', 'Midpoint', 'RK4', 'DormandPrince', 'Tsit5']


def tolerance(name, dtype):
  if name in FIXED_ERROR:
    tol = FIXED_ERROR[name]
    return max(tol, FLOAT32_FLOOR) if dtype == tf.float32 else tol
  return ADAPTIVE_ERROR[dtype]


# ----------------------------------------------------------------- tableaus


def test_tableaus_are_consistent_and_fsal_is_detected():
  for tab in (tableaus.EULER, tableaus.MIDPOINT, tableaus.RK4,
              tableaus.DORMAND_PRINCE, tableaus.TSITOURAS5):
    a, b, c = tab.as_numpy()
    np.testing.assert_allclose(a.sum(1), c, atol=1e-12, err_msg=tab.name)
    np.testing.assert_allclose(b.sum(), 1., atol=1e-12, err_msg=tab.name)
  assert tableaus.DORMAND_PRINCE.fsal and tableaus.TSITOURAS5.fsal
  assert not tableaus.RK4.fsal
  assert tableaus.TSITOURAS5.b_embedded is not None
  assert tableaus.RK4.b_embedded is None


def test_tableau_rejects_inconsistent_rows():
  with pytest.raises(ValueError, match='row 0 of `a` sums to'):
    tableaus.ButcherTableau(name='bad', a=((0.4,),), b=(0.5, 0.5), c=(0.5,),
                            order=2)
  with pytest.raises(ValueError, match='`b` sums to'):
    tableaus.ButcherTableau(name='bad', a=((0.5,),), b=(0.5, 0.6), c=(0.5,),
                            order=2)


# ------------------------------------------------------------ closed forms


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.parametrize('name', SOLVER_NAMES)
@pytest.mark.matrix
def test_exponential_decay(name, dtype):
  solver = make_solvers(dtype)[name]
  y0 = tf.constant([1., -2., 0.5], dtype)
  times = np.array([0.25, 0.5, 1.0])
  res = solver.solve(lambda t, y: -1.5 * y, 0., y0, times)
  expected = np.exp(-1.5 * times)[:, None] * y0.numpy()[None]
  np.testing.assert_allclose(res.states.numpy(), expected,
                             atol=tolerance(name, dtype))
  np.testing.assert_allclose(res.times.numpy(), times, rtol=1e-6)
  assert int(res.diagnostics.status) == ode.Status.SUCCEEDED
  assert res.states.dtype == dtype


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.parametrize('name', SOLVER_NAMES)
@pytest.mark.matrix
def test_linear_system_matches_expm(name, dtype):
  a = np.array([[-0.5, 1.0, 0.0], [-1.0, -0.5, 0.3], [0.0, -0.3, -0.2]])
  y0 = np.array([1.0, 0.0, -1.0])
  solver = make_solvers(dtype)[name]
  a_t = tf.constant(a, dtype)
  res = solver.solve(lambda t, y: tf.linalg.matvec(a_t, y), 0.,
                     tf.constant(y0, dtype), [2.0])
  expected = scipy.linalg.expm(2.0 * a) @ y0
  np.testing.assert_allclose(res.states.numpy()[-1], expected,
                             atol=4 * tolerance(name, dtype))


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
@pytest.mark.parametrize('name', SOLVER_NAMES)
@pytest.mark.matrix
def test_time_dependent_and_reverse_time(name, dtype):
  # y' = cos(t) y  =>  y(t) = y(t0) exp(sin t - sin t0)
  solver = make_solvers(dtype)[name]
  fn = lambda t, y: tf.cos(t) * y
  y1 = solver.solve(fn, 1.0, tf.constant([2.0], dtype), [3.0]).states[-1]
  expected = 2.0 * np.exp(np.sin(3.0) - np.sin(1.0))
  np.testing.assert_allclose(y1.numpy(), [expected],
                             atol=4 * tolerance(name, dtype))
  # Backwards from t=3 to t=1 recovers the start.
  back = solver.solve(fn, 3.0, y1, [2.0, 1.0])
  np.testing.assert_allclose(back.states.numpy()[-1], [2.0],
                             atol=8 * tolerance(name, dtype))
  assert float(back.diagnostics.final_time) == pytest.approx(1.0)


@pytest.mark.parametrize('name', SOLVER_NAMES)
def test_nested_state_and_solution_time_at_start(name):
  solver = make_solvers(tf.float64)[name]
  state = {'a': tf.constant([1.0], tf.float64),
           'b': (tf.constant([[2.0, 3.0]], tf.float64),)}
  fn = lambda t, y: {'a': -y['a'], 'b': (tf.zeros_like(y['b'][0]),)}
  res = solver.solve(fn, 0., state, [0., 0., 1.])
  assert res.states['a'].shape == (3, 1)
  assert res.states['b'][0].shape == (3, 1, 2)
  np.testing.assert_allclose(res.states['a'][:2].numpy(), [[1.], [1.]])
  np.testing.assert_allclose(res.states['a'][2].numpy(), [np.exp(-1.)],
                             atol=tolerance(name, tf.float64))
  np.testing.assert_allclose(res.states['b'][0].numpy(),
                             np.tile([[[2., 3.]]], [3, 1, 1]))


def _forced_decay_solution(t):
  """Closed form of y' = -y + sin(3t), y(0) = 1."""
  return 1.3 * np.exp(-t) + (np.sin(3 * t) - 3 * np.cos(3 * t)) / 10


@pytest.mark.parametrize('name,order', [('Euler', 1), ('Midpoint', 2),
                                        ('RK4', 4)])
def test_fixed_step_order_of_convergence(name, order):
  cls = getattr(ode, name)
  fn = lambda t, y: -y + tf.sin(3. * t)
  exact = _forced_decay_solution(1.0)
  steps = np.array([8, 16, 32, 64])
  errors = [abs(float(cls(num_steps=int(n)).solve(
      fn, 0., tf.constant([1.0], tf.float64), [1.0]).states[-1, 0]) - exact)
            for n in steps]
  slope = np.polyfit(np.log(1.0 / steps), np.log(errors), 1)[0]
  assert abs(slope - order) <= ORDER_SLACK, (name, slope, errors)


@pytest.mark.parametrize('name', ['DormandPrince', 'Tsit5'])
@pytest.mark.matrix
def test_adaptive_method_order_of_convergence(name):
  # Error vs step size of the underlying 5th-order method, with fixed steps
  # forced by a huge tolerance and a given first step.
  cls = getattr(ode, name)
  fn = lambda t, y: -y + tf.sin(3. * t)
  exact = _forced_decay_solution(1.0)
  hs = np.array([1 / 8, 1 / 16, 1 / 32, 1 / 64])
  errors = []
  for h in hs:
    solver = cls(rtol=1e6, atol=1e6, first_step_size=float(h),
                 max_step_factor=1.0 + 1e-9, min_step_factor=0.1,
                 safety_factor=1.0)
    res = solver.solve(fn, 0., tf.constant([1.0], tf.float64), [1.0])
    errors.append(abs(float(res.states[-1, 0]) - exact))
  slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
  assert abs(slope - 5) <= ORDER_SLACK, (name, slope, errors)


@pytest.mark.parametrize('name', ['DormandPrince', 'Tsit5'])
@pytest.mark.matrix
def test_adaptive_agrees_with_scipy_on_van_der_pol(name):
  mu = 1.5

  def vdp(t, y):
    return tf.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

  times = np.linspace(0.5, 6.0, 12)
  res = getattr(ode, name)(rtol=1e-9, atol=1e-9).solve(
      vdp, 0., tf.constant([2.0, 0.0], tf.float64), times)
  ref = scipy.integrate.solve_ivp(
      lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]], (0, 6.0),
      [2.0, 0.0], t_eval=times, rtol=1e-12, atol=1e-12, method='DOP853')
  np.testing.assert_allclose(res.states.numpy(), ref.y.T, atol=1e-6)


def test_adaptive_diagnostics_count_evaluations():
  calls = []

  def fn(t, y):
    calls.append(1)
    return -y

  res = ode.Tsit5().solve(fn, 0., tf.constant([1.0]), [1.0])
  d = res.diagnostics
  # Eagerly every evaluation is a Python call (plus one trace-free check).
  assert int(d.num_ode_fn_evaluations) == len(calls)
  # FSAL: 6 evaluations per attempted step, plus the first and the
  # initial-step estimate.
  attempts = int(d.num_accepted_steps) + int(d.num_rejected_steps)
  assert int(d.num_ode_fn_evaluations) == 6 * attempts + 2


# ---------------------------------------------------------------- gradients


def _gradient_problem(solver):
  w = tf.Variable([[0.3, -0.8], [0.6, 0.1]], dtype=tf.float64)
  y0 = tf.constant([[1.0, -0.5], [0.2, 0.4]], tf.float64)
  c = tf.constant([0.7, -0.2], tf.float64)

  def fn(t, y, c):
    return tf.tanh(tf.matmul(y, w)) + c * tf.sin(t)

  @tf.function
  def loss_fn(y0, c):
    res = solver.solve(fn, 0.1, y0, [0.6, 1.2], constants={'c': c})
    return tf.reduce_sum(res.states[0] ** 2) + tf.reduce_sum(
        tf.sin(res.states[1]))

  return w, y0, c, loss_fn


def _grads(solver):
  w, y0, c, loss_fn = _gradient_problem(solver)

  @tf.function
  def grads(y0, c):
    with tf.GradientTape() as tape:
      tape.watch([y0, c])
      loss = loss_fn(y0, c)
    return tape.gradient(loss, [y0, c, w])

  return [g.numpy() for g in grads(y0, c)]


def _finite_differences(solver):
  w, y0, c, loss_fn = _gradient_problem(solver)
  out = []
  for target in ('y0', 'c', 'w'):
    base = {'y0': y0, 'c': c, 'w': w}[target].numpy()
    grad = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
      vals = []
      for sign in (1, -1):
        pert = base.copy()
        pert[idx] += sign * FD_EPS
        if target == 'w':
          w.assign(pert)
          vals.append(float(loss_fn(y0, c)))
          w.assign(base)
        elif target == 'y0':
          vals.append(float(loss_fn(tf.constant(pert), c)))
        else:
          vals.append(float(loss_fn(y0, tf.constant(pert))))
      grad[idx] = (vals[0] - vals[1]) / (2 * FD_EPS)
    out.append(grad)
  return out


# Fixed-step methods: steps such that the continuous adjoint's discretisation
# error is below its tolerance (error ~ steps^-order).
FIXED_GRADIENT_STEPS = {'Euler': 2000, 'Midpoint': 300, 'RK4': 40}
# Euler's adjoint converges at first order: 2000 steps leave ~1e-3.
ADJOINT_RTOL = {'Euler': 2e-3}


@pytest.mark.parametrize('name', SOLVER_NAMES)
@pytest.mark.matrix
def test_adjoint_backprop_and_finite_differences_agree(name):
  tol = 1e-11
  if name in ('DormandPrince', 'Tsit5'):
    make = lambda g: getattr(ode, name)(rtol=tol, atol=tol, gradient=g)
  else:
    n = FIXED_GRADIENT_STEPS[name]
    make = lambda g: getattr(ode, name)(num_steps=n, gradient=g)
  adjoint = _grads(make('adjoint'))
  backprop = _grads(make('backprop'))
  # Finite differences of the same discrete solve: backprop is its exact
  # derivative, so it must match to finite-difference accuracy.
  fd = _finite_differences(make('backprop'))
  for label, a, b, f in zip(('y0', 'c', 'w'), adjoint, backprop, fd):
    scale = np.max(np.abs(f))
    np.testing.assert_allclose(b, f, atol=GRADIENT_RTOL * scale,
                               err_msg=f'backprop vs FD for {label}')
    np.testing.assert_allclose(
        a, f, atol=ADJOINT_RTOL.get(name, GRADIENT_RTOL) * scale,
        err_msg=f'adjoint vs FD for {label}')


# Closed form of the test below: y(t) = y0 exp(a t), so
# d/da sum_k sum y(t_k) = sum_k t_k sum y(t_k).
END_STEP_RTOL = 1e-6


@pytest.mark.parametrize('name', ['Tsit5', 'DormandPrince'])
def test_adjoint_segments_start_from_the_forwards_proposed_steps(
    name, monkeypatch):
  """The backward segment from each solution time starts with the step the
  forward solve proposed on reaching that time (no probe of its own), and
  the gradient stays right; a first step the adjoint solver sets itself
  still wins."""
  calls = []
  integrate = runge_kutta.integrate

  def spy(*args, **kwargs):
    result = integrate(*args, **kwargs)
    calls.append((args[-1].first_step, result))
    return result

  monkeypatch.setattr(runge_kutta, 'integrate', spy)
  a = tf.Variable(-0.7, dtype=tf.float64)
  y0 = tf.constant([1., 2.], tf.float64)
  ts = tf.constant([0.5, 1.0, 2.0], tf.float64)

  def gradient(solver):
    calls.clear()
    with tf.GradientTape() as tape:
      states = solver.solve(lambda t, y: a * y, 0., y0, ts).states
      loss = tf.reduce_sum(states)
    return tape.gradient(loss, a)

  exact = np.sum(ts.numpy()[:, None] * y0.numpy() * np.exp(-0.7 * ts.numpy()[
      :, None]))
  grad = gradient(getattr(ode, name)(rtol=1e-8, atol=1e-10,
                                     gradient='adjoint'))
  np.testing.assert_allclose(grad, exact, rtol=END_STEP_RTOL)
  (first, forward), (backward, _) = calls
  assert first is None
  proposed = forward.end_steps.numpy()
  assert proposed.shape == (3,) and np.all(proposed > 0)
  # One backward loop, its segments from the last time back: k = 2, 1, 0.
  np.testing.assert_array_equal(backward, proposed[::-1])
  # With `first_step_size` on the adjoint solver, the probe-free start is
  # that size, not the forward's proposal.
  solver = getattr(ode, name)(
      rtol=1e-8, atol=1e-10, gradient='adjoint',
      make_adjoint_solver_fn=lambda: getattr(ode, name)(
          rtol=1e-8, atol=1e-10, first_step_size=1e-3))
  np.testing.assert_allclose(gradient(solver), exact, rtol=END_STEP_RTOL)
  assert all(step is None for step, _ in calls[1:])


# The adjoint's backward solve runs every segment in one loop, restarting
# the state at each solution time. Times equal to the initial time or to
# each other are zero-length segments that must still add their cotangents.
# Closed form: y' = a y, z' = -a z, so with L = sum_k w_k (sum y(t_k) +
# sum z(t_k)), dL/dy0 = sum_k w_k e^(a t_k), dL/dz0 = sum_k w_k e^(-a t_k),
# dL/da = sum_k w_k t_k (e^(a t_k) sum y0 - e^(-a t_k) sum z0).
RESTART_TIMES = (0., 0.5, 0.5, 1.0, 1.0)
RESTART_WEIGHTS = (1., 2., 3., 4., 5.)
RESTART_RTOL = 1e-6
RESTART_SOLVERS = {
    'tsit5': lambda: ode.Tsit5(rtol=1e-10, atol=1e-12),
    'tsit5-unrolled': lambda: ode.Tsit5(rtol=1e-10, atol=1e-12,
                                        unroll_stages=True),
    # z outside the error norm: the adjoint packs the rest into one vector.
    'tsit5-first-leaf': lambda: ode.Tsit5(rtol=1e-10, atol=1e-12,
                                          error_components=1),
    'rk4': lambda: ode.RK4(num_steps=100, gradient='adjoint'),
}


@pytest.mark.parametrize('mode', ['eager', 'xla'])
@pytest.mark.parametrize('name', sorted(RESTART_SOLVERS))
def test_adjoint_restarts_at_repeated_and_initial_solution_times(name, mode):
  solver = RESTART_SOLVERS[name]()
  assert solver.gradient == 'adjoint'
  a = tf.Variable(-0.7, dtype=tf.float64)
  ts = tf.constant(RESTART_TIMES, tf.float64)
  w = tf.constant(RESTART_WEIGHTS, tf.float64)

  def gradients(y0, z0):
    with tf.GradientTape() as tape:
      tape.watch([y0, z0])
      ys, zs = solver.solve(lambda t, s: (a * s[0], -a * s[1]), 0.,
                            (y0, z0), ts).states
      loss = tf.reduce_sum(w * (tf.reduce_sum(ys, -1)
                                + tf.reduce_sum(zs, -1)))
    return tape.gradient(loss, [y0, z0, a])

  y0 = tf.constant([1., 2.], tf.float64)
  z0 = tf.constant([0.5, -1., 3.], tf.float64)
  got = run_in_mode(gradients, mode)(y0, z0)
  t, wn = np.array(RESTART_TIMES), np.array(RESTART_WEIGHTS)
  up, down = np.exp(-0.7 * t), np.exp(0.7 * t)
  want = [np.full(2, np.sum(wn * up)), np.full(3, np.sum(wn * down)),
          np.sum(wn * t * (up * 3. - down * 2.5))]
  for g, ref in zip(got, want):
    np.testing.assert_allclose(g, ref, rtol=RESTART_RTOL)


# Looping over stages and unrolling them run the same arithmetic in a
# different order of graph construction: agreement to rounding. With
# backprop this also checks the looped gradient (a reverse loop over each
# step's stages, `vjp.rk_step_vjp`) against a tape through the
# written-out stages: dropping or mis-weighting its stage-cotangent update
# fails every method with more than one stage.
UNROLL_RTOL = 1e-12


@pytest.mark.parametrize('gradient', ['adjoint', 'backprop'])
@pytest.mark.parametrize('name', SOLVER_NAMES)
@pytest.mark.matrix
def test_unrolled_stages_match_the_stage_loop(name, gradient):
  def make(unroll):
    if name in ('DormandPrince', 'Tsit5'):
      return getattr(ode, name)(rtol=1e-6, atol=1e-6, gradient=gradient,
                                unroll_stages=unroll)
    return getattr(ode, name)(num_steps=10, gradient=gradient,
                              unroll_stages=unroll)
  looped, unrolled = make(False), make(True)
  w, y0, c, loss_fn = _gradient_problem(looped)
  _, _, _, loss_unrolled = _gradient_problem(unrolled)
  np.testing.assert_allclose(float(loss_unrolled(y0, c)),
                             float(loss_fn(y0, c)), rtol=UNROLL_RTOL)
  for a, b in zip(_grads(looped), _grads(unrolled)):
    np.testing.assert_allclose(b, a, rtol=UNROLL_RTOL, atol=UNROLL_RTOL)


@pytest.mark.parametrize('gradient', ['adjoint', 'backprop'])
@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.matrix
def test_gradients_in_every_run_mode(gradient, mode):
  solver = ode.Tsit5(rtol=1e-8, atol=1e-8, gradient=gradient)
  w, y0, c, loss_fn = _gradient_problem(solver)

  def step(y0, c):
    with tf.GradientTape() as tape:
      tape.watch([y0, c])
      loss = loss_fn(y0, c)
    return tape.gradient(loss, [y0, c, w])

  expected = step(y0, c)
  got = run_in_mode(step, mode)(y0, c)
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------- failures


def _blow_up(t, y):
  return y * y  # y(t) = 1 / (1 - t) from y(0) = 1: infinite at t = 1.


@pytest.mark.parametrize('mode', ['eager', 'function'])
def test_step_limit_raises_with_solver_and_time(mode):
  solver = ode.DormandPrince(max_num_steps=5)
  fn = run_in_mode(
      lambda y0: solver.solve(lambda t, y: -50. * y, 0., y0, [10.]).states,
      mode)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'DormandPrince failed:.*max_num_steps'):
    fn(tf.constant([1.0]))


@pytest.mark.parametrize('mode', ['eager', 'function'])
def test_blow_up_raises_step_size_underflow(mode):
  solver = ode.Tsit5(max_num_steps=10000)
  fn = run_in_mode(
      lambda y0: solver.solve(_blow_up, 0., y0, [2.0]).states, mode)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'Tsit5 failed:.*(step size underflow|non-finite)'):
    fn(tf.constant([1.0], tf.float64))


@pytest.mark.parametrize('mode', ['eager', 'function'])
def test_non_finite_dynamics_raise(mode):
  solver = ode.RK4(num_steps=10)
  fn = run_in_mode(
      lambda y0: solver.solve(lambda t, y: y * np.nan, 0., y0, [1.]).states,
      mode)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'RK4 failed:.*non-finite'):
    fn(tf.constant([1.0]))


def test_failure_under_xla_poisons_states_and_reports_status():
  solver = ode.DormandPrince(max_num_steps=5)

  @tf.function(jit_compile=True)
  def fn(y0):
    res = solver.solve(lambda t, y: -50. * y, 0., y0, [10.])
    return res.states, res.diagnostics.status

  states, status = fn(tf.constant([1.0]))
  assert int(status) == ode.Status.MAX_NUM_STEPS_EXCEEDED
  assert np.all(np.isnan(states.numpy()))


@pytest.mark.parametrize('jit', [True, False])
def test_checked_function_raises_under_xla(jit):
  solver = ode.DormandPrince(max_num_steps=20)

  @ode.checked_function(jit_compile=jit)
  def fn(y0, rate):
    return solver.solve(lambda t, y: -rate * y, 0., y0, [10.]).states

  np.testing.assert_allclose(fn(tf.constant([1.0]), tf.constant(0.1)).numpy(),
                             [[np.exp(-1.)]], rtol=1e-3)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'(?s)DormandPrince failed: exceeded '
                     r'`max_num_steps`.*time reached.*20'):
    fn(tf.constant([1.0]), tf.constant(500.))


def test_status_only_mode_does_not_raise():
  solver = ode.DormandPrince(max_num_steps=5, raise_on_failure=False)
  res = solver.solve(lambda t, y: -50. * y, 0., tf.constant([1.0]), [10.])
  assert int(res.diagnostics.status) == ode.Status.MAX_NUM_STEPS_EXCEEDED
  assert float(res.diagnostics.final_time) < 10.
  assert 'max_num_steps' in ode.status_message(res.diagnostics.status)


@pytest.mark.parametrize('kwargs,match', [
    (dict(rtol=-1.), '`rtol` must be a positive finite number'),
    (dict(atol=0.), '`atol` must be a positive finite number'),
    (dict(max_num_steps=0), '`max_num_steps` must be None .no bound. or a positive int'),
    (dict(gradient='magic'), '`gradient` must be one of'),
    (dict(min_step_factor=2.), '`min_step_factor` must be < 1'),
    (dict(safety_factor=1.5), '`safety_factor` must be in'),
    (dict(error_components=0), '`error_components` must be None or'),
])
def test_adaptive_constructor_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ode.DormandPrince(**kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(), 'give exactly one of `step_size` and `num_steps`'),
    (dict(step_size=0.1, num_steps=3), 'give exactly one'),
    (dict(num_steps=0), '`num_steps` must be a positive int'),
    (dict(step_size=-0.1), '`step_size` must be a positive'),
])
def test_fixed_constructor_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ode.RK4(**kwargs)


# A solver is a method, a step-size controller and a gradient method; the
# objects say the same as the string and keyword settings. Checked against
# the closed form of y' = a y (dL/da for L = y(1) = y0 e^a is y0 e^a).
PARTS_RTOL = 1e-6


def test_gradient_and_controller_objects_equal_the_settings():
  a = tf.Variable(-0.7, dtype=tf.float64)
  y0 = tf.constant([1., 2.], tf.float64)
  backward = lambda: ode.RK4(num_steps=50, gradient='adjoint')

  def solve(solver):
    with tf.GradientTape() as tape:
      y1 = solver.solve(lambda t, y: a * y, 0., y0, [1.]).states[-1]
      loss = tf.reduce_sum(y1)
    return float(loss), float(tape.gradient(loss, a))

  by_name = ode.Tsit5(rtol=1e-8, atol=1e-10, make_adjoint_solver_fn=backward)
  by_object = ode.Tsit5(rtol=1e-8, atol=1e-10,
                        gradient=ode.Adjoint(backward))
  assert isinstance(by_object.gradient_method, ode.Adjoint)
  assert by_object.gradient == 'adjoint'
  assert by_object.settings_key() == by_name.settings_key()
  assert solve(by_object) == solve(by_name)
  value, grad = solve(by_object)
  exact = 3. * np.exp(-0.7)
  np.testing.assert_allclose(value, exact, rtol=PARTS_RTOL)
  np.testing.assert_allclose(grad, exact, rtol=PARTS_RTOL)
  backprop = ode.DormandPrince(rtol=1e-8, atol=1e-10,
                               gradient=ode.Backprop())
  assert backprop.gradient == 'backprop'
  assert solve(backprop) == solve(ode.DormandPrince(
      rtol=1e-8, atol=1e-10, gradient='backprop'))
  # The controllers: frozen settings, equal when the settings are.
  assert ode.Tsit5(rtol=1e-4).controller == ode.PIController(rtol=1e-4)
  assert ode.RK4(num_steps=8).controller == ode.ConstantStepSize(num_steps=8)
  assert ode.RK4(step_size=0.5).controller != ode.ConstantStepSize(
      step_size=0.25)
  with pytest.raises(ValueError, match='needs gradient=.adjoint.'):
    ode.Tsit5(gradient=ode.Backprop(), make_adjoint_solver_fn=backward)
  with pytest.raises(ValueError, match='both set the backward solver'):
    ode.Tsit5(gradient=ode.Adjoint(backward),
              make_adjoint_solver_fn=lambda: ode.Tsit5())
  with pytest.raises(TypeError, match='must be None or a callable'):
    ode.Adjoint('Tsit5')


def test_solve_argument_errors():
  solver = ode.RK4(num_steps=4)
  y0 = tf.constant([1.0])
  with pytest.raises(ValueError, match='sorted in the direction'):
    solver.solve(lambda t, y: y, 0., y0, [0.5, 0.2])
  with pytest.raises(ValueError, match='must not be empty'):
    solver.solve(lambda t, y: y, 0., y0, tf.zeros([0]))
  with pytest.raises(TypeError, match='floating'):
    solver.solve(lambda t, y: y, 0., tf.constant([1]), [1.])
  with pytest.raises(ValueError, match='returned shape'):
    solver.solve(lambda t, y: tf.concat([y, y], 0), 0., y0, [1.])
  with pytest.raises(TypeError, match='`ode_fn` must be callable'):
    solver.solve(None, 0., y0, [1.])


# TFP's own ode tests (`test_bad_initial_state_dtype`) match this message.
TFP_DTYPE_MESSAGE = ('`initial_state` must have a floating point or complex '
                     'floating point dtype')


@pytest.mark.parametrize('name', SOLVER_NAMES)
@pytest.mark.parametrize('dtype', [tf.int32, tf.int64, tf.bool])
def test_bad_initial_state_dtype_uses_tfps_message(name, dtype):
  fixed = name in ('Euler', 'Midpoint', 'RK4')
  solver = getattr(ode, name)(**({'num_steps': 2} if fixed else {}))
  with pytest.raises(TypeError, match=TFP_DTYPE_MESSAGE + '.*got a Tensor '
                     f'of dtype {dtype.name}'):
    solver.solve(lambda t, y: y, 0., tf.ones([2], dtype), [1.])


# ------------------------------------------------------- XLA and TFP plug-in


def test_fixed_step_runs_exactly_num_steps():
  res = ode.RK4(num_steps=20).solve(lambda t, y: -y, 0.,
                                    tf.constant([1.0], tf.float64), [0.5, 1.0])
  assert int(res.diagnostics.num_accepted_steps) == 20
  assert int(res.diagnostics.num_ode_fn_evaluations) == 80


def test_error_components_excludes_trailing_leaves():
  # The second leaf grows fast; excluding it from the error norm must let the
  # solver take fewer steps while the first leaf stays accurate.
  fn = lambda t, y: (-y[0], 40. * tf.cos(40. * t) * tf.ones_like(y[1]))
  y0 = (tf.constant([1.0], tf.float64), tf.constant([0.0], tf.float64))
  full = ode.Tsit5(rtol=1e-6, atol=1e-6).solve(fn, 0., y0, [1.])
  first = ode.Tsit5(rtol=1e-6, atol=1e-6, error_components=1).solve(
      fn, 0., y0, [1.])
  assert (int(first.diagnostics.num_ode_fn_evaluations)
          < int(full.diagnostics.num_ode_fn_evaluations))
  np.testing.assert_allclose(first.states[0][-1].numpy(), [np.exp(-1.)],
                             atol=1e-5)


@pytest.mark.parametrize('name', ['RK4', 'Tsit5'])
def test_plugs_into_tfp_ffjord(name):
  solver = (ode.RK4(num_steps=32) if name == 'RK4'
            else ode.Tsit5(rtol=1e-8, atol=1e-8))
  bij = tfb.FFJORD(state_time_derivative_fn=lambda t, z: 0.5 * z,
                   ode_solve_fn=solver.solve,
                   trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact,
                   dtype=tf.float64)
  x = tf.constant([[1.0, 2.0]], tf.float64)
  np.testing.assert_allclose(bij.forward(x).numpy(), x.numpy() * np.exp(0.5),
                             rtol=1e-6)
  np.testing.assert_allclose(
      bij.forward_log_det_jacobian(x, event_ndims=1).numpy(), [1.0],
      rtol=1e-6)


# --------------------------------------------------------- compile latency


@pytest.mark.parametrize('segmented', [False, True])
@pytest.mark.parametrize('solver', [
    ode.Tsit5(), ode.DormandPrince(first_step_size=0.1), ode.RK4(num_steps=4),
    ode.Euler(num_steps=4)], ids=['tsit5', 'dopri5-first-step', 'rk4', 'euler'])
def test_a_traced_solve_builds_the_dynamics_once(solver, segmented):
  # The stage loop evaluates a step's first derivative and the step-size
  # probe itself, at the start of the solve and of each segment: the
  # dynamics are traced (and compiled) once, not three times.
  traces = []

  def fn(t, y, segment=None):
    del segment
    traces.append(None)
    return -y

  @tf.function(jit_compile=True)
  def solve(y0):
    res = solver.solve(fn, 0., y0, [0.5, 1.], segmented=segmented)
    return res.states, res.diagnostics.num_ode_fn_evaluations

  states, nfe = solve(tf.constant([1.0, 2.0], tf.float64))
  assert len(traces) == 1
  # Four Euler steps are 14% off; the others' tolerances allow ~1e-3.
  np.testing.assert_allclose(states[-1].numpy(), [np.exp(-1.), 2 * np.exp(-1.)],
                             rtol=0.2 if isinstance(solver, ode.Euler) else 2e-3)
  if isinstance(solver, ode.RK4):
    assert int(nfe) == 4 * 4 * (2 if segmented else 1)


@pytest.mark.parametrize('gradient', ['backprop', 'adjoint'])
def test_solver_graphs_use_no_ops_that_are_slow_to_lower(gradient):
  w = tf.Variable([[0.3, -0.8], [0.6, 0.1]])
  solver = ode.Tsit5(gradient=gradient)

  @tf.function(jit_compile=True)
  def loss(y0):
    with tf.GradientTape() as tape:
      tape.watch(y0)
      res = solver.solve(lambda t, y: tf.matmul(y, w), 0., y0, [0.5, 1.])
      out = tf.reduce_sum(res.states[-1] ** 2)
    return out, tape.gradient(out, [y0, w])

  y0 = tf.constant([[1.0, -0.5]])
  types = graph_op_types(loss.get_concrete_function(y0))
  assert {'While', 'StatelessWhile'} & types
  assert not types & SLOW_TO_LOWER, sorted(types & SLOW_TO_LOWER)


@pytest.mark.parametrize('solver', [ode.Tsit5(), ode.RK4(step_size=0.25)],
                         ids=['Tsit5', 'RK4'])
def test_a_step_measures_and_checks_its_state_with_one_reduction(
    solver, monkeypatch):
  # Under XLA each reduction of more than 32 elements is three kernels (~30
  # ms of compilation): a step sums its error norm and both finiteness
  # checks (first derivative, new state) together, and the step-size probe
  # its three norms, instead of one sum and one check per leaf.
  calls = []
  row_sums = runge_kutta.row_sums

  def counted(rows, dtype):
    calls.append(len(rows))
    return row_sums(rows, dtype)

  monkeypatch.setattr(runge_kutta, 'row_sums', counted)
  monkeypatch.setattr(controllers, 'row_sums', counted)   # the probe's norms

  @tf.function(jit_compile=True)
  def solve(a, b, c):
    res = solver.solve(lambda t, y: [-y[0], 0.5 * y[1], -y[2] * y[0][:1]],
                       0., [a, b, c], [1.])
    return res.states

  leaves = [tf.ones([64, 2]), tf.ones([64]), tf.ones([1, 2])]
  concrete = solve.get_concrete_function(*leaves)
  adaptive = isinstance(solver, ode.Tsit5)
  # The step: [k1, new state(, error)]; the probe: [y0, f0, f1 - f0].
  assert sorted(calls) == ([3, 3] if adaptive else [2])
  types = graph_op_types(concrete)
  assert not types & {'All', 'IsFinite'}, sorted(types)
  states = solve(*leaves)
  np.testing.assert_allclose(states[0][-1].numpy(), np.exp(-1.), rtol=2e-3)
  np.testing.assert_allclose(states[1][-1].numpy(), np.exp(0.5), rtol=2e-3)


@pytest.mark.parametrize('name', ['DormandPrince', 'Tsit5'])
def test_segment_relative_steps_as_separate_solves(name):
  """A leaf that accumulates over segments, measured from each segment's
  start (`segment_relative`), gets the steps and increments of separate
  solves that start it at zero; carried over, it gets other steps."""
  solver = getattr(ode, name)(rtol=1e-4, atol=1e-5, gradient='backprop')
  rates = tf.constant([1.5, -2., 3.], tf.float64)

  def fn(t, y, segment):
    x, q = y
    rate = tf.gather(rates, segment)
    return rate * tf.sin(t) * x, 5. * tf.square(x)

  y0 = (tf.constant([1., .5], tf.float64), tf.zeros([2], tf.float64))
  ends = tf.constant([1., 2., 3.], tf.float64)
  fused = solver.solve(fn, 0., y0, ends, segmented=True, segment_relative=[1])
  carried = solver.solve(fn, 0., y0, ends, segmented=True)
  x, q_total = y0[0], tf.zeros([2], tf.float64)
  counts = []
  for k in range(3):
    alone = solver.solve(lambda t, y, k=k: fn(t, y, k), float(k),
                         (x, tf.zeros([2], tf.float64)), [k + 1.])
    x, q = alone.states[0][-1], alone.states[1][-1]
    q_total += q
    counts.append(int(alone.diagnostics.num_ode_fn_evaluations))
    np.testing.assert_allclose(fused.states[0][k], x, rtol=1e-12)
    np.testing.assert_allclose(fused.states[1][k], q_total, rtol=1e-12)
  np.testing.assert_array_equal(fused.diagnostics.segment_counts[:, 0],
                                counts)
  assert list(carried.diagnostics.segment_counts[:, 0].numpy()) != counts
  with pytest.raises(ValueError, match='`segment_relative` needs'):
    solver.solve(fn, 0., y0, ends, segment_relative=[1])
