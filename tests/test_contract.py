"""One contract, every solver: what a TFP user may rely on.

For every solver x {exact, Hutchinson} trace x {adjoint, backprop}
gradient (x `unroll_stages` for Tsit5), in float64 on a small MLP flow:
`log_prob` parameter gradients against central finite differences of the
same loss, the round trip `inverse(forward(x)) = x`,
`fldj(x) = -ildj(forward(x))`, the log-det against `slogdet` of the
autodiff Jacobian (exact trace, backprop), and `regularize=True` leaving
the number of dynamics evaluations unchanged. Every combination runs under XLA;
`tf.function` runs for each solver and eager mode for RK4 (eager mode
runs the loops op by op: an adaptive adjoint case alone took ~2 min).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode
from tests.helpers import run_in_mode

tfd = tfp.distributions

# Each case compiles a flow with its gradients (~10-25 s on 2 cores).
pytestmark = pytest.mark.slow

DIM = 2
ADAPTIVE_TOL = 1e-10
# Fixed-step grids: fine enough that the continuous adjoint of the grid and
# the discrete solve agree to the tolerances below.
NUM_STEPS = {'euler': 32, 'midpoint': 16, 'rk4': 8}
FD_EPSILON = 1e-5
NUM_DIRECTIONS = 1
# Relative error of directional derivatives against central differences of
# the same loss (FD error ~ eps^2 ~ 1e-10, rounding ~ 1e-16 / eps ~ 1e-11).
# Backprop differentiates the discrete solve: exact up to FD error. The
# adjoint solves a continuous adjoint on the solver's grid (fixed step) or
# to its tolerance (adaptive): error of the method's order.
GRAD_RTOL = {
    'backprop': 1e-6,
    ('adjoint', 'euler'): 1e-1,
    ('adjoint', 'midpoint'): 5e-3,
    ('adjoint', 'rk4'): 1e-5,
    ('adjoint', 'dopri5'): 1e-6,
    ('adjoint', 'tsit5'): 1e-6,
}
# inverse(forward(x)) and fldj + ildj(forward(x)): exact for the continuous
# flow, so the error is the method's global error on each grid.
ROUND_TRIP_ATOL = {'euler': 5e-2, 'midpoint': 2e-3, 'rk4': 1e-5,
                   'dopri5': 1e-8, 'tsit5': 1e-8}
SLOGDET_ATOL = ROUND_TRIP_ATOL


def make_solver(name, gradient, unroll=False):
  if name in NUM_STEPS:
    cls = {'euler': ode.Euler, 'midpoint': ode.Midpoint, 'rk4': ode.RK4}[name]
    return cls(num_steps=NUM_STEPS[name], gradient=gradient,
               unroll_stages=unroll)
  cls = {'dopri5': ode.DormandPrince, 'tsit5': ode.Tsit5}[name]
  return cls(rtol=ADAPTIVE_TOL, atol=ADAPTIVE_TOL, gradient=gradient,
             unroll_stages=unroll)


def make_flow(solver, trace):
  tf.random.set_seed(11)
  mlp = tfp_ffjord.MLPODE([4], DIM)
  mlp(tf.constant(0., tf.float64), tf.zeros([1, DIM], tf.float64))
  trace_fn = (tfp_ffjord.trace_jacobian_exact if trace == 'exact'
              else tfp_ffjord.trace_jacobian_hutchinson)
  bijector = tfp_ffjord.FFJORD(mlp, ode_solve_fn=solver.solve,
                               trace_augmentation_fn=trace_fn,
                               dtype=tf.float64)
  base = tfd.MultivariateNormalDiag(tf.zeros([DIM], tf.float64),
                                    tf.fill([DIM], tf.constant(.8, tf.float64)))
  return tfd.TransformedDistribution(base, bijector), bijector, mlp


POINTS = np.array([[0.3, -0.7], [1.1, 0.4], [-0.5, 0.9]])
SEED = 5   # Hutchinson probes: the same for every evaluation of the loss


CASES = [(s, t, g, False) for s in ('euler', 'midpoint', 'rk4', 'dopri5',
                                    'tsit5')
         for t in ('exact', 'hutchinson') for g in ('adjoint', 'backprop')]
CASES += [('tsit5', t, g, True) for t in ('exact', 'hutchinson')
          for g in ('adjoint', 'backprop')]
MODE_CASES = [('xla',) + c for c in CASES]
# Eager and tf.function: every solver in tf.function, RK4 eagerly too.
MODE_CASES += [('function', s, 'exact', 'adjoint' if s in ('dopri5', 'tsit5')
                else 'backprop', False)
               for s in ('euler', 'midpoint', 'rk4', 'dopri5', 'tsit5')]
MODE_CASES += [('eager', 'rk4', 'exact', 'backprop', False)]


def _id(case):
  mode, solver, trace, gradient, unroll = case
  return '-'.join([mode, solver, trace, gradient] + (['unroll'] if unroll
                                                      else []))


@pytest.mark.parametrize('case', MODE_CASES, ids=[_id(c) for c in MODE_CASES])
def test_contract(case):
  mode, solver_name, trace, gradient, unroll = case
  flow, bijector, mlp = make_flow(make_solver(solver_name, gradient, unroll),
                                  trace)
  variables = list(mlp.trainable_variables)
  x = tf.constant(POINTS)
  kwargs = {'seed': SEED}

  # The log-det against slogdet of the autodiff Jacobian: for the exact
  # trace (Hutchinson's log-det is an estimate) and backprop (the forward
  # solve, hence fldj, is the same in both gradient modes; the Jacobian
  # through the adjoint is checked in test_bijector and test_conformance).
  # It is taken in the same compiled function as the parameter gradients,
  # on a persistent tape.
  with_jacobian = trace == 'exact' and gradient == 'backprop'

  def run(x):
    with tf.GradientTape() as tape:
      value = tf.reduce_sum(flow.log_prob(x, bijector_kwargs=kwargs))
    grads = tape.gradient(value, variables)
    y = bijector.solve_forward(x, **kwargs)
    back = bijector.solve_inverse(y.value, **kwargs)
    regular = bijector.solve_inverse(y.value, regularize=True, **kwargs)
    jacobian = tf.zeros([])
    if with_jacobian:
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = bijector.solve_forward(x).value
        columns = [out[:, i] for i in range(DIM)]
      jacobian = tf.stack([tape.gradient(c, x) for c in columns], axis=-2)
    return (value, grads, y.log_det_jacobian, back.value,
            back.log_det_jacobian,
            back.diagnostics.num_ode_fn_evaluations,
            regular.diagnostics.num_ode_fn_evaluations, jacobian)

  run = run_in_mode(run, mode)
  (value, grads, fldj, x_back, ildj, nfe_plain, nfe_regular,
   jacobian) = run(x)

  # Gradients: directional derivatives against central differences.
  rng = np.random.default_rng(3)
  rtol = GRAD_RTOL.get(gradient, GRAD_RTOL.get((gradient, solver_name)))
  start = [v.numpy() for v in variables]
  for _ in range(NUM_DIRECTIONS):
    direction = [rng.standard_normal(s.shape) for s in start]
    analytic = sum(float(np.sum(g.numpy() * d))
                   for g, d in zip(grads, direction))
    values = []
    for sign in (1., -1.):
      for v, s, d in zip(variables, start, direction):
        v.assign(s + sign * FD_EPSILON * d)
      values.append(float(run(x)[0]))   # the same compiled function
    for v, s in zip(variables, start):
      v.assign(s)
    numeric = (values[0] - values[1]) / (2. * FD_EPSILON)
    assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-8), (
        analytic, numeric)

  atol = ROUND_TRIP_ATOL[solver_name]
  np.testing.assert_allclose(x_back.numpy(), POINTS, atol=atol)
  np.testing.assert_allclose(fldj.numpy(), -ildj.numpy(), atol=atol)
  assert int(nfe_regular) == int(nfe_plain)
  if with_jacobian:
    np.testing.assert_allclose(np.sum(fldj.numpy(), -1),
                               tf.linalg.slogdet(jacobian)[1].numpy(),
                               atol=SLOGDET_ATOL[solver_name])
