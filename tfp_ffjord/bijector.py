"""`FFJORD`: a drop-in replacement for `tfp.bijectors.FFJORD`."""

import tensorflow as tf

from tfp_ffjord import flow_base
from tfp_ffjord import fusion
from tfp_ffjord import ode
from tfp_ffjord import segments
from tfp_ffjord import trace as trace_lib
from tfp_ffjord.flow_base import default_ode_solve_fn
from tfp_ffjord.flow_base import FlowResult

__all__ = ['FFJORD', 'FlowResult', 'default_ode_solve_fn']


class FFJORD(flow_base.FlowSettings, flow_base.CachedFlow):
  """A continuous normalizing flow X -> Y defined by an ODE (FFJORD).

  `y = z(final_time)` where `dz/dt = f(t, z)` and `z(initial_time) = x`, with
  `f = state_time_derivative_fn`. The log-det of the Jacobian follows the
  instantaneous change of variables (Chen et al., 2018):

      log |det dy/dx| = integral_{t0}^{t1} Tr(df/dz(t, z(t))) dt

  which is integrated together with the state in a single solve; forward,
  inverse and both log-dets are cached together, so `log_prob` of a
  `tfd.TransformedDistribution` costs one solve.

  The constructor and the `ode_solve_fn` / `trace_augmentation_fn` contracts
  are those of `tfp.bijectors.FFJORD`: replace `tfb.FFJORD` by
  `tfp_ffjord.FFJORD` and nothing else needs to change. Differences:

  * The inverse evaluates the dynamics at the right times when
    `initial_time != 0` (TFP uses `final_time - t` instead of
    `initial_time + final_time - t`).
  * Hutchinson's estimator works for dynamics that ignore the state, and the
    exact trace is right for unbatched `[D]` inputs.
  * A `seed` keyword on every method (`forward(x, seed=s)`,
    `log_prob(x, bijector_kwargs={'seed': s})`) makes the Hutchinson noise
    reproducible; each FFJORD instance mixes its own salt into the seed, so
    stacked blocks given the same seed still draw independent probes.
  * The solver's diagnostics are kept: see `last_diagnostics`,
    `solve_forward` and `solve_inverse`.
  * The default solver is `tfp_ffjord.ode.DormandPrince` (TFP's method,
    tolerances and adjoint gradient), which compiles under XLA; any
    `tfp.math.ode` solver still works.

  Any other keyword argument of the bijector methods (for example
  `forward(x, context=c)`) is passed to `state_time_derivative_fn` as a
  keyword argument, and gradients flow to it.

  `state_time_derivative_fn` should be a `tf.Module` (e.g. a Sonnet module
  such as `tfp_ffjord.MLPODE`) so that the bijector tracks its variables
  (`bijector.trainable_variables`); a lambda that closes over a model hides
  them from the bijector (gradients still reach them through a tape).

  Example:

  ```python
  import tensorflow_probability as tfp
  import tfp_ffjord
  tfd = tfp.distributions
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(loc=[0., 0.], scale_diag=[.8, .8]),
      tfp_ffjord.FFJORD(
          tfp_ffjord.MLPODE(hidden_sizes=[8, 8], output_size=2),
          trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact))
  log_p = flow.log_prob([[0.5, 0.2]])
  ```

  References:
    Chen, R. T. Q., Rubanova, Y., Bettencourt, J., & Duvenaud, D. (2018).
      Neural ordinary differential equations. NeurIPS.
    Grathwohl, W., Chen, R. T. Q., Bettencourt, J., Sutskever, I., &
      Duvenaud, D. (2019). FFJORD: Free-form continuous dynamics for
      scalable reversible generative models. ICLR.
    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the
      influence matrix for Laplacian smoothing splines. Communications in
      Statistics - Simulation and Computation, 18(3), 1059-1076.
  """

  def __init__(self,
               state_time_derivative_fn,
               ode_solve_fn=None,
               trace_augmentation_fn=trace_lib.trace_jacobian_hutchinson,
               initial_time=0.,
               final_time=1.,
               validate_args=False,
               dtype=tf.float32,
               name='ffjord',
               seed_salt=None,
               fuse=True):
    """Builds the bijector.

    Args:
      state_time_derivative_fn: `f(time, state, **kwargs)` returning
        `d state / d time`, same shape and dtype as `state`.
      ode_solve_fn: `ode_solve_fn(ode_fn=, initial_time=, initial_state=,
        solution_times=[final_time], constants=kwargs)` returning an object
        with `.states` (leading time axis) and, optionally, `.diagnostics`
        (e.g. `tfp_ffjord.ode.Tsit5().solve` or
        `tfp.math.ode.DormandPrince().solve`). `initial_state` is the tuple
        `(state, zeros_like(state))`; `constants` is passed only when the
        call has keyword arguments, `error_components` only to a solver
        that declares it (`tfp_ffjord.protocols`). Default: `None`, meaning
        `tfp_ffjord.ode.DormandPrince().solve` (`default_ode_solve_fn`).
      trace_augmentation_fn: `trace_augmentation_fn(ode_fn, state_shape,
        dtype)` returning `augmented_fn(time, (state, log_det), **kwargs) ->
        (d state, unreduced trace)`. A per-call `seed` (and, for
        `regularize=True`, `regularize=True`) is passed only to a function
        that declares it (`tfp_ffjord.protocols`; ours do). Default:
        `tfp_ffjord.trace_jacobian_hutchinson`.
      initial_time: time of `x`. Default: 0.
      final_time: time of `y`; must be greater than `initial_time`.
        Default: 1.
      validate_args: check inputs for NaN/Inf at run time. Default: False.
      dtype: dtype of `x` and `y`. Default: `tf.float32`.
      name: name prefix. Default: 'ffjord'.
      seed_salt: a string mixed into per-call seeds (not in TFP's
        constructor). Default: `None`, a salt unique to this instance in
        this process (its creation order); give fixed, distinct salts to
        the blocks of a model so that its Hutchinson noise for a seed does
        not depend on how many bijectors the process built before.
      fuse: let consecutive compatible blocks of a `tfb.Chain` share one
        segmented solve (`tfp_ffjord.fusion`; not in TFP's constructor):
        same values, one solver loop to trace and compile instead of one
        per block. Default: True.

    Raises:
      TypeError: if a callable argument is not callable.
      ValueError: if `final_time <= initial_time`.
    """
    parameters = dict(locals())
    if not callable(state_time_derivative_fn):
      raise TypeError('`state_time_derivative_fn` must be callable; got '
                      f'{state_time_derivative_fn!r}.')
    with tf.name_scope(name) as name:
      self._configure(ode_solve_fn, trace_augmentation_fn, initial_time,
                      final_time, seed_salt)
      self._state_time_derivative_fn = state_time_derivative_fn
      self._fuse = bool(fuse)
      super().__init__(
          forward_min_event_ndims=0,
          dtype=dtype,
          validate_args=validate_args,
          parameters=parameters,
          name=name)

  @property
  def state_time_derivative_fn(self):
    """The dynamics `f(time, state, **kwargs)` (TFP's property)."""
    return self._state_time_derivative_fn

  @property
  def fuse(self) -> bool:
    """Whether this block may share a solve with its neighbours in a
    `tfb.Chain` (`tfp_ffjord.fusion`)."""
    return self._fuse

  def _inverse_time_derivative(self, time, state, **kwargs):
    # Runs time backwards: s in [t0, t1] maps to t = t0 + t1 - s.
    t = (ode.base.as_float(self._initial_time, time.dtype)
         + ode.base.as_float(self._final_time, time.dtype) - time)
    return -self._state_time_derivative_fn(t, state, **kwargs)

  def _solve(self, dynamics, x, kwargs, regularize=False):
    x = tf.convert_to_tensor(x, self.dtype)
    final_time = tf.reshape(ode.base.as_float(self._final_time, x.dtype), [1])
    results = flow_base.solve_augmented(self, dynamics, x, kwargs, final_time,
                                        dict(regularize=regularize))
    finals = tf.nest.map_structure(lambda s: s[-1], results.states)
    return flow_base.flow_result(finals,
                                 getattr(results, 'diagnostics', None))

  def solve_forward(self, x, regularize=False, **kwargs):
    """Runs the forward solve; returns a `FlowResult` (no caching).

    `regularize=True` also integrates RNODE's kinetic energy and Jacobian
    Frobenius norm as extra states of the same solve (our solvers leave
    them out of the error control), reusing the trace's vector-Jacobian
    products: see `FlowResult`. Like DiffEqFlux's FFJORD, which returns
    `logpx, λ₁, λ₂`.
    """
    self._check_input(x, 'x', 'solve_forward')
    return self._record(self._solve(self._state_time_derivative_fn, x,
                                    dict(kwargs), regularize))

  def solve_inverse(self, y, regularize=False, **kwargs):
    """Runs the inverse solve; returns a `FlowResult` (no caching).

    See `solve_forward` for `regularize`.
    """
    self._check_input(y, 'y', 'solve_inverse')
    return self._record(self._solve(self._inverse_time_derivative, y,
                                    dict(kwargs), regularize))

  def trajectory(self, x, times=None, num_times=10, **kwargs):
    """The path of `x` under the forward map, from one solve.

    Args:
      x: points, shaped like the bijector's input.
      times: increasing times in `[initial_time, final_time]` to report;
        default `num_times` evenly spaced ones from `initial_time` to
        `final_time` inclusive.
      num_times: used when `times` is None. Default: 10.
      **kwargs: as for `forward` (conditioning, `seed`).

    Returns:
      `(times, states, log_det_jacobians)`: `states` is `[T, *x.shape]` (the
      last equals `forward(x)`), `log_det_jacobians` the unreduced forward
      log-det from `initial_time` to each time.
    """
    self._check_input(x, 'x', 'trajectory')
    x = tf.convert_to_tensor(x, self.dtype)
    t0 = ode.base.as_float(self._initial_time, x.dtype)
    t1 = ode.base.as_float(self._final_time, x.dtype)
    if times is None:
      if (isinstance(num_times, bool) or not isinstance(num_times, int)
          or num_times < 2):
        raise ValueError(
            f'`num_times` must be an int >= 2; got {num_times!r}.')
      times = tf.linspace(t0, t1, num_times)
    times = ode.base.as_float(times, x.dtype)
    results = flow_base.solve_augmented(
        self, self._state_time_derivative_fn, x, kwargs, times)
    self._record(getattr(results, 'diagnostics', None))
    states, log_dets = results.states
    return times, states, log_dets

  def _augmented_forward(self, x, **kwargs):
    fused = self._fused(x, 'forward', kwargs)
    if fused is not None:
      return fused
    y, fldj = self.solve_forward(x, **kwargs)[:2]
    return y, {'fldj': fldj, 'ildj': -fldj}

  def _augmented_inverse(self, y, **kwargs):
    fused = self._fused(y, 'inverse', kwargs)
    if fused is not None:
      return fused
    x, ildj = self.solve_inverse(y, **kwargs)[:2]
    return x, {'ildj': ildj, 'fldj': -ildj}

  def _fused(self, value, direction, kwargs):
    """`(output, attrs)` from a solve shared with other blocks of a
    `tfb.Chain` (`tfp_ffjord.fusion`), or None: solve alone."""
    handed = fusion.take(self, direction, value, kwargs)
    if handed is None and self._fuse:
      run = fusion.find_run(self, direction, kwargs)
      if run is not None:
        handed = segments.solve_run(run, value)
    if handed is None:
      return None
    output, log_det, diagnostics = handed
    self._record(diagnostics)
    if direction == 'forward':
      return output, {'fldj': log_det, 'ildj': -log_det}
    return output, {'ildj': log_det, 'fldj': -log_det}
