"""Explicit Runge-Kutta solvers with TFP's `solve` contract.

Fixed step: `Euler`, `Midpoint`, `RK4`. Adaptive: `DormandPrince`, `Tsit5`.
Each `solve` returns `tfp_ffjord.ode.Results` and can be passed wherever
`tfp.math.ode.DormandPrince().solve` is accepted (including `tfb.FFJORD`).

A solver is three parts: its method (a `ButcherTableau`), its step-size
controller (`controller`: `controllers.ConstantStepSize` or
`controllers.PIController`) and how it is differentiated
(`gradient_method`: `gradients.Adjoint` or `gradients.Backprop`, named by
`gradient='adjoint'` or `'backprop'`). `solve` hands them to the driver
(`driver.py`), whose stepping loop is `runge_kutta.integrate`.

Gradients (`gradient=`):
  * `'adjoint'`: the continuous adjoint method (Chen et al., 2018). The
    backward pass solves the adjoint ODE from the last solution time back to
    the initial time with the same method and tolerances; memory does not
    grow with the number of steps. Each backward segment starts with the
    step size the forward solve proposed on reaching its solution time (no
    probe), and every adjoint state, the parameters' and `constants`'
    included, is in the error norm: their gradient integrals get the same
    error control as the state. All segments run in one loop, whose state
    is one flat vector when the shapes are static; `max_num_steps` bounds
    each segment.
  * `'backprop'`: the exact derivative of the discrete solution
    (discretise-then-optimise). The forward pass records the start state,
    time and size of every accepted step (memory `max_num_steps` x state);
    the backward pass recomputes one step at a time and applies its
    vector-Jacobian product. Step sizes are treated as constants.

Both return gradients with respect to `initial_state`, the floating
`constants`, and the trainable variables that `ode_fn` reads. Gradients with
respect to the times are not computed (they are `None`).
"""

import tensorflow as tf

from tfp_ffjord import _checks
from tfp_ffjord import protocols
from tfp_ffjord.ode import base
from tfp_ffjord.ode import checked as checked_lib
from tfp_ffjord.ode import controllers
from tfp_ffjord.ode import driver
from tfp_ffjord.ode import gradients
from tfp_ffjord.ode import tableaus

__all__ = [
    'Solver',
    'FixedStepSolver',
    'AdaptiveSolver',
    'Euler',
    'Midpoint',
    'RK4',
    'DormandPrince',
    'Tsit5',
]

GRADIENT_MODES = gradients.GRADIENT_MODES


class Solver:
  """Base class: an explicit Runge-Kutta method given by a `ButcherTableau`.

  Subclasses set `tableau` and provide `controller`. Use `FixedStepSolver`
  or `AdaptiveSolver`.

  Args:
    gradient: 'adjoint', 'backprop', or an `Adjoint` / `Backprop` object.
    max_num_steps: the bound on step attempts, or None.
    error_components: how many leading state components the error norm
      measures (None: all).
    raise_on_failure: raise `SolverError` on a failed eager solve.
    unroll_stages: unroll the stage loop in the graph.
    make_adjoint_solver_fn: the adjoint's backward solver, as in TFP.
    validate_args: check the arguments at run time.
    name: the solver's name. Default: the class name.
  """
  tableau: tableaus.ButcherTableau = None

  def __init__(self, gradient='adjoint', max_num_steps=None,
               error_components=None, raise_on_failure=True,
               unroll_stages=False, make_adjoint_solver_fn=None,
               validate_args=False, name=None):
    method = gradients.gradient_method(gradient, make_adjoint_solver_fn)
    max_num_steps = _checks.positive_int('max_num_steps', max_num_steps,
                                         allow_none=True)
    if error_components is not None and (
        isinstance(error_components, bool)
        or not isinstance(error_components, int) or error_components < 1):
      raise ValueError('`error_components` must be None or a positive int; '
                       f'got {error_components!r}.')
    # The settings as plain attributes (`settings_key` compares them).
    self.gradient = method.name
    self.make_adjoint_solver_fn = getattr(method, 'make_solver_fn', None)
    self.max_num_steps = max_num_steps
    self.error_components = error_components
    self.raise_on_failure = bool(raise_on_failure)
    self.unroll_stages = bool(unroll_stages)
    self.validate_args = bool(validate_args)
    self.name = name or type(self).__name__

  @property
  def controller(self):
    """The step-size controller (a frozen dataclass of the settings)."""
    raise NotImplementedError

  @property
  def gradient_method(self):
    """`gradients.Adjoint(make_adjoint_solver_fn)` or
    `gradients.Backprop()`."""
    if self.gradient == 'backprop':
      return gradients.Backprop()
    return gradients.Adjoint(self.make_adjoint_solver_fn)

  def step_bound(self, t0, ts, segmented=False):
    """Bound on step attempts for a solve from `t0` through `ts`; None:
    unbounded."""
    return self.controller.max_iterations(t0, ts, segmented,
                                          self.max_num_steps)

  def __repr__(self):
    return f'{self.name}(gradient={self.gradient!r})'

  def settings_key(self):
    """A hashable summary of the class and every setting: two solvers with
    equal keys solve alike (`tfp_ffjord.fusion` lets FFJORD blocks built
    with separate but equal solvers share one solve)."""
    def key(value):
      if value is None or isinstance(value, (bool, int, float, str)):
        return value
      return ('object', id(value))   # callables, Tensors: by identity
    return (type(self),) + tuple(sorted(
        (name, key(value)) for name, value in vars(self).items()))

  @protocols.accepts(protocols.ERROR_COMPONENTS, protocols.SEGMENTED,
                     protocols.SEGMENT_RELATIVE)
  def solve(self, ode_fn, initial_time, initial_state, solution_times,
            jacobian_fn=None, jacobian_sparsity=None, batch_ndims=None,
            previous_solver_internal_state=None, constants=None,
            error_components=None, segmented=False, segment_relative=None):
    """Solves `dy/dt = ode_fn(t, y, **constants)`, `y(initial_time) = initial_state`.

    Args:
      ode_fn: `ode_fn(t, y, **constants)` returning a structure like `y`.
      initial_time: scalar float.
      initial_state: Tensor or nested structure of floating or complex
        Tensors (time stays real; error norms use magnitudes).
      solution_times: 1-D floating Tensor (or list), sorted in the direction
        of integration; may be below `initial_time` to integrate backwards.
        Or `tfp.math.ode.ChosenBySolver(final_time)`: the results then hold
        the initial time, the end of every accepted step and `final_time`
        (fixed-step methods: the grid of their steps, which XLA can
        compile; adaptive methods: not under XLA, whose results need a
        length known before the solve).
      jacobian_fn: ignored (explicit methods need no Jacobian); accepted for
        compatibility with `tfp.math.ode.Solver.solve`.
      jacobian_sparsity: ignored, as above.
      batch_ndims: ignored, as above.
      previous_solver_internal_state: ignored, as above.
      constants: optional dict of Tensors passed to `ode_fn` as keyword
        arguments; gradients flow to its floating entries.
      error_components: for this call, keep only the first this many leaves
        of the state in the error norm (the smaller of this and the
        solver's own setting). `FFJORD` uses it to leave the RNODE
        regulariser states out of the error control.
      segmented: if True, each solution time ends a segment with dynamics
        of its own: `ode_fn(t, y, segment=k, **constants)` gets `k`, the
        index in `solution_times` of the segment's end (an int32 scalar
        Tensor), and the solve restarts at every solution time (fresh
        derivative, step size and error history; a fixed-step method takes
        `num_steps` steps per segment), as if each segment were a separate
        solve from the previous one's end. All segments run in one loop, so
        `ode_fn` is traced (and compiled) once: this is how
        `tfp_ffjord.StackedFFJORD` solves K blocks for the price of one.
        Not with `ChosenBySolver`.
      segment_relative: with `segmented`, indices of leaves of the
        flattened state whose error (and first-step estimate) is measured
        from their value at the start of each segment, as separate solves
        that each started them at zero would measure them. With it, a
        quantity that accumulates across segments (FFJORD's log-det) is
        controlled segment by segment and the forward solve takes the steps
        of separate solves (the adjoint's backward solve still sees the
        accumulated value).

    Returns:
      `tfp_ffjord.ode.Results`.

    Raises:
      ValueError: for malformed `solution_times`, or an adaptive
        `ChosenBySolver` solve under XLA.
      tfp_ffjord.ode.SolverError: eagerly, or after the call of a
        `checked_function` (also under XLA), when the solver fails and
        `raise_on_failure=True`; it names the solver, the reason, the time
        reached and the step count as attributes.
      tf.errors.InvalidArgumentError: the same failure in a plain
        `tf.function` or a TF1 `Session` (a run-time assertion; XLA compiles
        it away: then the states are NaN and `diagnostics.status` says
        why), and, with `validate_args=True`, non-finite or unsorted
        inputs. With `raise_on_failure=False` a failed solve returns NaN
        states (never a partial solution) and its status.
    """
    del jacobian_fn, jacobian_sparsity, batch_ndims
    del previous_solver_internal_state
    with tf.name_scope(self.name):
      problem = driver.prepare(self, driver.Call(
          ode_fn, initial_time, initial_state, solution_times, constants,
          error_components, segmented, segment_relative))
      g = driver.flat_dynamics(self.name, ode_fn, problem)
      return driver.run(self, problem, g)

  def _failure_assertions(self, solve, status, t_reached, num_steps):
    """`tf.debugging.Assert`s that fire for each failing `status` code."""
    where = '' if solve.stage is None else f' in the {solve.stage}'
    hint = base.max_num_steps_hint(solve.solver_class, solve.max_num_steps,
                                   solve.recorded)
    checks = []
    for code in (base.Status.MAX_NUM_STEPS_EXCEEDED,
                 base.Status.STEP_SIZE_UNDERFLOW,
                 base.Status.NON_FINITE_STATE):
      suffix = f': {hint}' if code == base.Status.MAX_NUM_STEPS_EXCEEDED else ''
      checks.append(tf.debugging.Assert(
          tf.not_equal(status, code),
          [f'{solve.solver} failed{where}: {base.status_message(code)}; time '
           'reached', t_reached, 'after', num_steps, 'step attempts',
           f'(max_num_steps={solve.max_num_steps}{suffix})']))
    return checks

  def checked(self, tensors, status, t_reached, num_steps, bound,
              recorded=False, stage=None):
    """Raises on failure; poisons `tensors` with NaN always.

    Serves the forward solve (its states) and, with `stage`, the adjoint's
    backward solve (its gradients; `None` entries pass through). Eagerly a
    failure raises `SolverError` at once. Traced inside a
    `checked_function`, the status is registered and checked on the host
    after the call (also under XLA). Traced elsewhere, assertions built
    from XLA-compatible ops raise `tf.errors.InvalidArgumentError` at run
    time (XLA compiles them away). A failed solve always returns NaN; under
    XLA `diagnostics.status` says why.
    """
    failed = tf.not_equal(status, base.Status.SUCCEEDED)
    checks = []
    if self.raise_on_failure:
      solve = checked_lib.Solve(self.name, type(self).__name__, bound, recorded,
                            stage)
      if tf.executing_eagerly():
        error = checked_lib.error_for(solve, status.numpy(), t_reached.numpy(),
                                  num_steps.numpy())
        if error is not None:
          raise error
      elif not checked_lib.register(solve, status, t_reached, num_steps):
        checks = self._failure_assertions(solve, status, t_reached, num_steps)
    with tf.control_dependencies(checks):
      return [None if x is None else
              tf.where(failed, tf.constant(float('nan'), x.dtype), x)
              for x in tensors]


class FixedStepSolver(Solver):
  """A fixed-step method: give exactly one of `step_size` or `num_steps`.

  With `num_steps`, the span from `initial_time` to the last solution time is
  cut into `num_steps` equal steps; with `step_size`, steps have that length.
  Either way a step that would cross a solution time is shortened to end on
  it. The number of steps is known when the solve is traced, which makes the
  solver fully static (and cheap) under XLA.

  Args:
    step_size: the step length, or
    num_steps: the number of steps from `initial_time` to the last solution
      time.
    gradient: `'backprop'` (default) or `'adjoint'`; see the module docs.
    max_num_steps: optional bound on the steps; default `None`, the count
      the step size implies (no bound when that is unknown at trace time,
      except under XLA with backprop gradients, which records at most
      `XLA_BACKPROP_MAX_NUM_STEPS` steps).
    raise_on_failure: as for `AdaptiveSolver`.
    unroll_stages: as for `AdaptiveSolver`.
    make_adjoint_solver_fn: as for `AdaptiveSolver`.
    validate_args: as for `AdaptiveSolver`.
    name: defaults to the class name.
  """

  def __init__(self, step_size=None, num_steps=None, gradient='backprop',
               max_num_steps=None, raise_on_failure=True, unroll_stages=False,
               make_adjoint_solver_fn=None, validate_args=False, name=None):
    if (step_size is None) == (num_steps is None):
      raise ValueError(
          f'{name or type(self).__name__}: give exactly one of `step_size` '
          f'and `num_steps`; got step_size={step_size!r}, '
          f'num_steps={num_steps!r}.')
    self.num_steps = (None if num_steps is None else
                      _checks.positive_int('num_steps', num_steps))
    self.step_size = _checks.positive('step_size', step_size, allow_none=True)
    super().__init__(gradient=gradient, max_num_steps=max_num_steps,
                     raise_on_failure=raise_on_failure,
                     unroll_stages=unroll_stages,
                     make_adjoint_solver_fn=make_adjoint_solver_fn,
                     validate_args=validate_args, name=name)

  @property
  def controller(self) -> controllers.ConstantStepSize:
    """The `ConstantStepSize` of these settings."""
    return controllers.ConstantStepSize(step_size=self.step_size,
                                        num_steps=self.num_steps)


class AdaptiveSolver(Solver):
  """An embedded Runge-Kutta pair with PI step-size control.

  The error of each step is measured as the RMS over the controlled state
  components of `|err| / (atol + rtol * max(|y|, |y_new|))`; a step is
  accepted when it is <= 1. The next step is the current one times
  `safety_factor * e_n^(-pi_alpha/k) * e_{n-1}^(pi_beta/k)` (k is the
  embedded order plus one), clipped to `[min_step_factor, max_step_factor]`.
  `pi_beta=0` gives the classical integral controller.

  The positional arguments are those of `tfp.math.ode.DormandPrince`, and
  TFP's keyword names are accepted too (`min_step_size_factor`,
  `max_step_size_factor`); the rest are keyword-only.

  Args:
    rtol: relative tolerance. Default 1e-3.
    atol: absolute tolerance. Default 1e-6.
    first_step_size: initial step; `None` (default) estimates it from the
      dynamics (Hairer et al., 1993), which costs one evaluation. (TFP's
      default is 1e-3.)
    safety_factor: default 0.9.
    min_step_factor: smallest factor between consecutive steps; default 0.2
      (TFP's `DormandPrince` uses 0.1). TFP's name: `min_step_size_factor`.
    max_step_factor: largest factor; default 10. TFP's name:
      `max_step_size_factor`.
    max_num_steps: bound on step attempts (accepted + rejected); exceeding
      it is a failure. Default `None`: no bound, as in TFP, except for
      backprop gradients under XLA, whose record of the steps needs a
      static size: there the bound is `XLA_BACKPROP_MAX_NUM_STEPS` (1000)
      and the failure message says to raise `max_num_steps`.
    make_adjoint_solver_fn: `None` (default) or a callable with no
      arguments returning a tfp_ffjord solver used for the adjoint's
      backward solve (its method, tolerances and step bound), as in TFP.
      Only with `gradient='adjoint'`.
    validate_args: check at run time that the initial state, the initial
      time and the solution times are finite and that the times are sorted
      (eager, `tf.function`, TF1 graphs; XLA drops such checks).
      Default False.
    name: defaults to the class name.
    pi_alpha: default 0.7.
    pi_beta: default 0.4.
    error_components: `None` (default) puts every leaf of the (flattened)
      state in the error norm. An int `k` uses only the first `k` leaves;
      `FFJORD`'s state is `(z, log_det)`, so `error_components=1` controls
      the error of `z` only, as in RNODE (Finlay et al., 2020). The default
      keeps the log-det accurate, which `log_prob` needs.
    gradient: `'adjoint'` (default) or `'backprop'`; see the module docs.
    raise_on_failure: raise (or, under XLA, return NaN states) when the
      solve fails; `False` returns NaN states and `diagnostics.status`
      without raising, so that an optimizer's line search can back off.
      Default True.
    unroll_stages: `False` (default) computes the stages of a step in a
      `tf.while_loop`, so the dynamics appear once in the graph: tracing and
      XLA compilation take about half as long (measured on the seed moons
      model). `True` builds every stage in the graph: slower to trace and
      compile, but no per-stage loop overhead when steps run.
    min_step_size_factor: TFP's name for `min_step_factor`.
    max_step_size_factor: TFP's name for `max_step_factor`.
  """

  def __init__(self, rtol=1e-3, atol=1e-6, first_step_size=None,
               safety_factor=0.9, min_step_factor=None, max_step_factor=None,
               max_num_steps=None, make_adjoint_solver_fn=None,
               validate_args=False, name=None, *, pi_alpha=0.7, pi_beta=0.4,
               error_components=None, gradient='adjoint',
               raise_on_failure=True, unroll_stages=False,
               min_step_size_factor=None, max_step_size_factor=None):
    min_step_factor = _checks.alias(
        'min_step_factor', min_step_factor, 'min_step_size_factor',
        min_step_size_factor, 0.2)
    max_step_factor = _checks.alias(
        'max_step_factor', max_step_factor, 'max_step_size_factor',
        max_step_size_factor, 10.)
    self.rtol = _checks.positive('rtol', rtol)
    self.atol = _checks.positive('atol', atol)
    self.first_step_size = _checks.positive(
        'first_step_size', first_step_size, allow_none=True)
    self.safety_factor = _checks.positive('safety_factor', safety_factor)
    self.min_step_factor = _checks.positive('min_step_factor',
                                            min_step_factor)
    self.max_step_factor = _checks.positive('max_step_factor',
                                            max_step_factor)
    if not self.min_step_factor < 1. < self.max_step_factor:
      raise ValueError(
          '`min_step_factor` must be < 1 < `max_step_factor`; got '
          f'{min_step_factor!r} and {max_step_factor!r}.')
    if not 0. < self.safety_factor <= 1.:
      raise ValueError(
          f'`safety_factor` must be in (0, 1]; got {safety_factor!r}.')
    self.pi_alpha = _checks.positive('pi_alpha', pi_alpha, allow_zero=True)
    self.pi_beta = _checks.positive('pi_beta', pi_beta, allow_zero=True)
    super().__init__(gradient=gradient, max_num_steps=max_num_steps,
                     error_components=error_components,
                     raise_on_failure=raise_on_failure,
                     unroll_stages=unroll_stages,
                     make_adjoint_solver_fn=make_adjoint_solver_fn,
                     validate_args=validate_args, name=name)

  # TFP's attribute names, read by code written for tfp.math.ode.
  @property
  def min_step_size_factor(self):
    """TFP's name of `min_step_factor`."""
    return self.min_step_factor

  @property
  def max_step_size_factor(self):
    """TFP's name of `max_step_factor`."""
    return self.max_step_factor

  @property
  def controller(self) -> controllers.PIController:
    """The `PIController` of these settings."""
    return controllers.PIController(
        rtol=self.rtol, atol=self.atol, first_step_size=self.first_step_size,
        safety_factor=self.safety_factor,
        min_step_factor=self.min_step_factor,
        max_step_factor=self.max_step_factor, pi_alpha=self.pi_alpha,
        pi_beta=self.pi_beta)

  def __repr__(self):
    return (f'{self.name}(rtol={self.rtol}, atol={self.atol}, '
            f'gradient={self.gradient!r})')


class Euler(FixedStepSolver):
  """Forward Euler, order 1."""
  tableau = tableaus.EULER


class Midpoint(FixedStepSolver):
  """Explicit midpoint rule, order 2."""
  tableau = tableaus.MIDPOINT


class RK4(FixedStepSolver):
  """The classical fourth-order Runge-Kutta method."""
  tableau = tableaus.RK4


class DormandPrince(AdaptiveSolver):
  """Dormand-Prince 5(4) (Dormand & Prince, 1980), FSAL, 6 evaluations a step."""
  tableau = tableaus.DORMAND_PRINCE


class Tsit5(AdaptiveSolver):
  """Tsitouras 5(4) (Tsitouras, 2011), FSAL, 6 evaluations a step."""
  tableau = tableaus.TSITOURAS5
