"""Explicit Runge-Kutta solvers with TFP's `solve` contract.

Fixed step: `Euler`, `Midpoint`, `RK4`. Adaptive: `DormandPrince`, `Tsit5`.
Each `solve` returns `tfp_ffjord.ode.Results` and can be passed wherever
`tfp.math.ode.DormandPrince().solve` is accepted (including `tfb.FFJORD`).

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

import contextlib
import dataclasses
import math
import numbers
from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import record as tape_record
from tensorflow_probability.python.math.ode import base as tfp_ode

from tfp_ffjord import _lowering
from tfp_ffjord import protocols
from tfp_ffjord.ode import base
from tfp_ffjord.ode import checked
from tfp_ffjord.ode import runge_kutta
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

# How a solve is differentiated (`tfp_ffjord.registry.GRADIENT_MODES` holds
# their descriptions for the command line; a test checks the two agree).
GRADIENT_MODES = ('adjoint', 'backprop')


@contextlib.contextmanager
def _tapes_resumed():
  """Undoes an enclosing `tape_record.stop_recording()` inside a block."""
  stopped = pywrap_tfe.TFE_Py_TapeSetIsStopped()
  if stopped:
    pywrap_tfe.TFE_Py_TapeSetRestartOnThread()
  try:
    yield
  finally:
    if stopped:
      pywrap_tfe.TFE_Py_TapeSetStopOnThread()


in_xla_context = _lowering.in_xla_context


def _static_number(name, value):
  """`value` as a Python number: numbers, NumPy scalars, constant Tensors."""
  if tf.is_tensor(value) or isinstance(value, np.ndarray):
    static = tf.get_static_value(value)
    if static is None or np.ndim(static) != 0:
      raise ValueError(
          f'`{name}` must be a Python number or a constant scalar; got '
          f'{value!r}.')
    value = static.item()
  elif isinstance(value, np.generic):
    value = value.item()
  return value


def _check_positive(name, value, allow_none=False, allow_zero=False):
  """Returns `value` as a positive (or, if allowed, zero) finite float, or
  None if allowed."""
  if value is None and allow_none:
    return None
  value = _static_number(name, value)
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value < 0 or (value == 0 and
                                                   not allow_zero)):
    what = 'non-negative' if allow_zero else 'positive'
    raise ValueError(f'`{name}` must be a {what} finite number; got {value!r}.')
  return float(value)


def _check_step_count(name, value, bound=True):
  """Returns `value` as a positive int, or None (for a `bound`: none)."""
  if value is None:
    return None
  value = _static_number(name, value)
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < 1):
    raise ValueError(
        f'`{name}` must be {"None (no bound) or " if bound else ""}a '
        f'positive int; got {value!r}.')
  return int(value)


def _alias(ours, ours_value, tfps, tfps_value, default):
  """One setting that TFP spells `tfps` and this package `ours`."""
  if ours_value is None and tfps_value is None:
    return default
  if ours_value is None:
    return tfps_value
  if tfps_value is not None and _static_number(tfps, tfps_value) != (
      _static_number(ours, ours_value)):
    raise ValueError(
        f'`{ours}` and `{tfps}` (TFP\'s name for it) disagree: got '
        f'{ours_value!r} and {tfps_value!r}; pass one of them.')
  return ours_value


def _is_float(x):
  return x.dtype.is_floating or x.dtype.is_complex


class Solver:
  """Base class: an explicit Runge-Kutta method given by a `ButcherTableau`.

  Subclasses set `tableau`. Use `FixedStepSolver` or `AdaptiveSolver`.
  """
  tableau: tableaus.ButcherTableau = None

  def __init__(self, gradient='adjoint', max_num_steps=None,
               error_components=None, raise_on_failure=True,
               unroll_stages=False, make_adjoint_solver_fn=None,
               validate_args=False, name=None):
    if gradient not in GRADIENT_MODES:
      raise ValueError(
          f'`gradient` must be one of {GRADIENT_MODES}; got {gradient!r}.')
    max_num_steps = _check_step_count('max_num_steps', max_num_steps)
    if error_components is not None and (
        isinstance(error_components, bool)
        or not isinstance(error_components, int) or error_components < 1):
      raise ValueError('`error_components` must be None or a positive int; '
                       f'got {error_components!r}.')
    if make_adjoint_solver_fn is not None:
      if not callable(make_adjoint_solver_fn):
        raise TypeError('`make_adjoint_solver_fn` must be None or a callable '
                        'that returns a solver; got '
                        f'{make_adjoint_solver_fn!r}.')
      if gradient != 'adjoint':
        raise ValueError(
            '`make_adjoint_solver_fn` sets the solver of the adjoint\'s '
            'backward solve, so it needs gradient=\'adjoint\'; got '
            f'gradient={gradient!r}.')
    self.gradient = gradient
    self.max_num_steps = max_num_steps
    self.error_components = error_components
    self.raise_on_failure = bool(raise_on_failure)
    self.unroll_stages = bool(unroll_stages)
    self.make_adjoint_solver_fn = make_adjoint_solver_fn
    self.validate_args = bool(validate_args)
    self.name = name or type(self).__name__

  # Subclasses provide the step-size settings.
  def _control(self) -> runge_kutta.StepControl:
    raise NotImplementedError

  def _max_iterations(self, t0, ts, segmented=False) -> Optional[int]:
    """Bound on step attempts for a solve through `ts`; None: unbounded."""
    del t0, ts, segmented
    return self.max_num_steps

  def _chosen_times(self, t0, final_time):
    """Explicit times equivalent to `ChosenBySolver(final_time)`, or None.

    None means the times are known only after the solve (adaptive steps).
    """
    del t0, final_time
    return None

  def _adjoint_solver(self):
    """The solver of the adjoint's backward solve (`make_adjoint_solver_fn`)."""
    if self.make_adjoint_solver_fn is None:
      return self
    solver = self.make_adjoint_solver_fn()
    if not isinstance(solver, Solver):
      raise TypeError(
          f'{self.name}: `make_adjoint_solver_fn` must return a tfp_ffjord.ode '
          f'solver (e.g. `lambda: tfp_ffjord.ode.Tsit5(rtol=1e-5)`); got '
          f'{solver!r}.')
    return solver

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
    if not callable(ode_fn):
      raise TypeError(f'`ode_fn` must be callable; got {ode_fn!r}.')
    constants = dict(constants or {})
    segmented = bool(segmented)
    segment_relative = sorted(set(segment_relative or ()))
    if segment_relative and not segmented:
      raise ValueError(f'{self.name}: `segment_relative` needs '
                       '`segmented=True`.')
    if segmented and 'segment' in constants:
      raise ValueError(
          f'{self.name}: with `segmented=True` the solver passes `segment` to '
          '`ode_fn`; `constants` must not hold a key named \'segment\'.')
    with tf.name_scope(self.name):
      y0_struct = initial_state
      y0 = [tf.convert_to_tensor(x) for x in tf.nest.flatten(initial_state)]
      if not y0:
        raise ValueError('`initial_state` must contain at least one Tensor.')
      dtype = y0[0].dtype
      for x in y0:
        if not _is_float(x):
          raise TypeError(
              '`initial_state` must have a floating point or complex '
              'floating point dtype; got a Tensor of dtype '
              f'{x.dtype.name}.')
        if x.dtype.real_dtype != dtype.real_dtype:
          raise TypeError(
              '`initial_state` must hold Tensors of one precision; got '
              f'{dtype.name} and {x.dtype.name}.')
      t_dtype = dtype.real_dtype
      t0 = base.as_float(initial_time, t_dtype)
      if t0.shape.rank not in (0, None):
        raise ValueError('`initial_time` must be a scalar; got shape '
                         f'{t0.shape}.')
      t0 = tf.reshape(t0, [])
      dense = False
      if isinstance(solution_times, tfp_ode.ChosenBySolver):
        if segmented:
          raise ValueError(
              f'{self.name}: `segmented=True` needs explicit '
              '`solution_times` (the ends of the segments), not '
              '`ChosenBySolver`.')
        final_time = base.as_float(solution_times.final_time, t_dtype)
        if final_time.shape.rank not in (0, None):
          raise ValueError('`ChosenBySolver.final_time` must be a scalar; got '
                           f'shape {final_time.shape}.')
        final_time = tf.reshape(final_time, [])
        solution_times = self._chosen_times(t0, final_time)
        if solution_times is None:
          if in_xla_context():
            raise ValueError(
                f'{self.name}: `tfp.math.ode.ChosenBySolver` returns one state '
                'per accepted step, a number known only after the solve, '
                'which XLA (jit_compile=True) cannot compile. Under XLA pass '
                'explicit `solution_times` (e.g. tf.linspace(t0, t1, n)) or '
                'use a fixed-step solver (RK4(num_steps=n) gives n + 1 '
                'times); outside XLA ChosenBySolver works as in TFP.')
          dense = True
          solution_times = final_time[tf.newaxis]
      ts = base.as_float(solution_times, t_dtype)
      if ts.shape.rank != 1:
        raise ValueError('`solution_times` must be a 1-D Tensor; got shape '
                         f'{ts.shape}.')
      if ts.shape[0] == 0:
        raise ValueError('`solution_times` must not be empty.')

      const_keys = sorted(constants)
      const_vals = [tf.convert_to_tensor(constants[k]) for k in const_keys]

      def user_fn(t, y_flat, c_flat, seg=None):
        y = tf.nest.pack_sequence_as(y0_struct, y_flat)
        kwargs = dict(zip(const_keys, c_flat))
        if segmented:
          kwargs['segment'] = seg
        dy = ode_fn(t, y, **kwargs)
        try:
          tf.nest.assert_same_structure(y, dy)
        except (ValueError, TypeError) as e:
          raise ValueError(
              f'{self.name}: `ode_fn` must return the structure of the state; '
              f'state {tf.nest.map_structure(lambda _: "*", y)}, got '
              f'{tf.nest.map_structure(lambda _: "*", dy)}.') from e
        dy = [tf.convert_to_tensor(d) for d in tf.nest.flatten(dy)]
        for d, yi in zip(dy, y_flat):
          if (d.shape.is_fully_defined() and yi.shape.is_fully_defined()
              and d.shape != yi.shape):
            raise ValueError(
                f'{self.name}: `ode_fn` returned shape {d.shape} for a state '
                f'of shape {yi.shape}; they must match.')
        return [tf.cast(d, yi.dtype) for d, yi in zip(dy, y_flat)]

      # Integrate in s = direction * t, so that s always increases.
      direction = tf.where(ts[-1] >= t0, tf.ones([], t_dtype),
                           -tf.ones([], t_dtype))
      s0, ss = direction * t0, direction * ts
      self._check_sorted(ss, s0)
      if self.validate_args:
        y0 = self._validated(y0, t0, ts, s0, ss)

      def g(s, y_flat, c_flat, seg=None):
        dy = user_fn(direction * s, y_flat, c_flat, seg)
        return [tf.cast(direction, d.dtype) * d for d in dy]

      limits = [k for k in (self.error_components, error_components)
                if k is not None]
      error_mask = [True] * len(y0)
      if limits:
        error_mask = [i < min(limits) for i in range(len(y0))]

      n_y = len(y0)
      control = self._control()
      max_iter = self._max_iterations(t0, ts, segmented)
      record = self.gradient == 'backprop' or dense
      adjoint_solver = (self._adjoint_solver() if self.gradient == 'adjoint'
                        else None)
      solver = self

      @tf.custom_gradient
      def solve_flat(*args):
        y_init = list(args[:n_y])
        c_flat = list(args[n_y:])

        def g_recorded(s, y, *seg):
          with _tapes_resumed():
            return g(s, y, c_flat, *seg)

        # The gradient is `grad_fn`: no enclosing tape needs the loop's own
        # ops. Left recorded, a persistent or nested tape makes TensorFlow
        # build the while loop's gradient at once (seconds of tracing; under
        # XLA, ops without a gradient). `ode_fn` itself runs with the tapes
        # on, for the tapes it opens (the exact trace) and variable reads.
        with tape_record.stop_recording():
          res = runge_kutta.integrate(
              g_recorded, solver.tableau, control, s0, y_init, ss, max_iter,
              error_mask, record_steps=record,
              record_capacity=base.XLA_BACKPROP_MAX_NUM_STEPS,
              segmented=segmented, count_segments=segmented,
              segment_relative=[i in segment_relative for i in range(n_y)],
              # The adjoint's backward segments start from the step the
              # forward proposed at each solution time: no probe.
              end_steps=(solver.gradient == 'adjoint' and not dense
                         and control.adaptive))
        outputs = list(res.outputs)
        steps, out_s = res.steps, ss
        if dense:
          # The start of every accepted step, then the final time.
          count = res.num_accepted
          outputs = [tf.concat([y_steps[:count], o[-1:]], 0)
                     for y_steps, o in zip(steps['y'], outputs)]
          out_s = tf.concat([steps['t'][:count], ss[-1:]], 0)
          steps = dict(steps, out=tf.range(count) + 2,
                       out_initial=tf.constant(1))

        def grad_fn(*dys, variables=None):
          dys = [tf.zeros_like(o) if d is None else d
                 for d, o in zip(dys[:n_y], outputs)]
          variables = list(variables or [])
          if solver.gradient == 'backprop':
            grads = _backprop_gradients(
                g, solver.tableau, steps, y_init, c_flat, variables, dys,
                out_s, max_iter, control.unroll_stages, segmented)
          else:
            first_steps = steps['h'] if dense else res.end_steps
            grads = solver._adjoint_gradients(
                adjoint_solver, g, s0, out_s, outputs, c_flat, variables, dys,
                error_mask, first_steps, segmented, ends=not dense)
          dy0, dc, dv = grads
          input_grads = list(dy0) + list(dc)
          if variables:
            return input_grads, list(dv)
          return input_grads

        diag = [res.t, res.num_fn_evals, res.num_accepted, res.num_rejected,
                res.status, out_s]
        if segmented:
          diag.append(res.segment_counts)
        return tuple(outputs + diag), grad_fn

      flat = solve_flat(*(y0 + const_vals))
      outputs = list(flat[:n_y])
      t_reached, nfe, n_acc, n_rej, status, out_s = flat[n_y:n_y + 6]
      segment_counts = flat[n_y + 6] if segmented else None
      t_reached = direction * t_reached
      outputs = self._check_status(outputs, status, t_reached, n_acc + n_rej,
                                   max_iter, record)
      zero = tf.constant(0, tf.int32)
      diagnostics = base.Diagnostics(
          num_ode_fn_evaluations=nfe, num_jacobian_evaluations=zero,
          num_matrix_factorizations=zero, num_accepted_steps=n_acc,
          num_rejected_steps=n_rej, status=status, final_time=t_reached,
          segment_counts=segment_counts)
      states = tf.nest.pack_sequence_as(y0_struct, outputs)
      times = direction * tf.stop_gradient(out_s) if dense else ts
      return base.Results(times=times, states=states,
                          diagnostics=diagnostics, solver_internal_state=None)

  def _check_sorted(self, ss, s0):
    static = tf.get_static_value(ss)
    static0 = tf.get_static_value(s0)
    if static is not None and static0 is not None:
      if (static[1:] < static[:-1]).any() or (static < static0).any():
        raise ValueError(
            f'{self.name}: `solution_times` must be sorted in the direction '
            'of integration, starting at or after `initial_time`.')

  def _validated(self, y0, t0, ts, s0, ss):
    """`validate_args=True`: run-time checks of the inputs (not under XLA)."""
    checks = [
        tf.debugging.Assert(tf.math.is_finite(t0), [
            f'{self.name}: `initial_time` must be finite; got', t0]),
        tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(ts)), [
            f'{self.name}: `solution_times` must be finite; got', ts]),
        tf.debugging.Assert(
            tf.reduce_all(ss[1:] >= ss[:-1]) & tf.reduce_all(ss >= s0), [
                f'{self.name}: `solution_times` must be sorted in the '
                'direction of integration, starting at or after '
                '`initial_time`; got', ts, 'from initial_time', t0]),
    ]
    for i, x in enumerate(y0):
      checks.append(tf.debugging.Assert(runge_kutta.all_finite([x]), [
          f'{self.name}: `initial_state` (leaf {i}) must be finite; it holds '
          'NaN or Inf']))
    with tf.control_dependencies(checks):
      return [tf.identity(x) for x in y0]

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

  def _check_status(self, tensors, status, t_reached, num_steps, bound,
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
      solve = checked.Solve(self.name, type(self).__name__, bound, recorded,
                            stage)
      if tf.executing_eagerly():
        error = checked.error_for(solve, status.numpy(), t_reached.numpy(),
                                  num_steps.numpy())
        if error is not None:
          raise error
      elif not checked.register(solve, status, t_reached, num_steps):
        checks = self._failure_assertions(solve, status, t_reached, num_steps)
    with tf.control_dependencies(checks):
      return [None if x is None else
              tf.where(failed, tf.constant(float('nan'), x.dtype), x)
              for x in tensors]

  def _adjoint_gradients(self, adjoint_solver, g, s0, ss, outputs, c_flat,
                         variables, dys, error_mask, first_steps,
                         segmented=False, ends=False):
    """The adjoint's gradients, NaN (and raising) if its backward solve fails."""
    # The bound of a solve over one segment, for each segment: the loop over
    # all of them may take that many times the number of segments.
    bound = adjoint_solver._max_iterations(-ss[-1], -s0[tf.newaxis])
    loop_bound = bound
    if bound is not None:
      num_t = ss.shape[0]
      loop_bound = bound * (num_t if num_t is not None else tf.shape(ss)[0])
    control = adjoint_solver._control()
    if control.first_step_size is not None and ends:
      first_steps = None   # the adjoint solver's own first step wins
    if (not control.adaptive and control.num_steps is not None
        and not segmented):
      # `num_steps` spans the whole solve: the backward solve keeps the
      # forward's step size on every segment (with `num_steps` per segment,
      # T solution times would cost T times the forward's steps).
      control = dataclasses.replace(
          control, num_steps=None,
          step_size=(ss[-1] - s0) / control.num_steps)
    dy0, dc, dv, status, u_reached, num_steps = _adjoint_gradients(
        g, adjoint_solver.tableau, control, s0, ss,
        outputs, c_flat, variables, dys, loop_bound, error_mask, first_steps,
        segmented, ends)
    grads = self._check_status(list(dy0) + list(dc) + list(dv), status,
                               -u_reached, num_steps, bound,
                               stage='adjoint backward solve')
    n, nc = len(dy0), len(dc)
    return grads[:n], grads[n:n + nc], grads[n + nc:]


def _gradient(tape, target, sources, output_gradients):
  """`tape.gradient` as dense Tensors, with zeros for unconnected sources.

  The backward loops carry these as `tf.while_loop` variables, which must be
  dense Tensors of a fixed shape (no `None`, no `tf.IndexedSlices`).
  """
  grads = tape.gradient(target, sources, output_gradients=output_gradients)
  out = []
  for g, src in zip(grads, sources):
    if g is None:
      shape = src.shape if src.shape.is_fully_defined() else tf.shape(src)
      g = tf.zeros(shape, src.dtype)
    elif isinstance(g, tf.IndexedSlices):
      g = tf.convert_to_tensor(g)
    out.append(g)
  return out


def _vjp(fn, s, y, c_flat, variables, cotangent):
  """`fn(s, y, c)` and the VJP of `cotangent` w.r.t. `(y, c, variables)`."""
  float_c = [c for c in c_flat if _is_float(c)]
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(y)
    tape.watch(float_c)
    tape.watch(variables)
    out = fn(s, y, c_flat)
  grads = _gradient(tape, out, list(y) + float_c + list(variables),
                    cotangent)
  n = len(y)
  gy, gc_float, gv = grads[:n], grads[n:n + len(float_c)], grads[n + len(float_c):]
  it = iter(gc_float)
  gc = [next(it) if _is_float(c) else None for c in c_flat]
  return out, gy, gc, gv


def _rk_step_vjp(fn, tableau, t, y, h, c_flat, variables, cotangent,
                 num_stages, dc0=None, dv0=None):
  """The exact VJP of one explicit Runge-Kutta step, by a reverse stage loop.

  The step is `y' = y + h sum_s b_s k_s`, `k_s = fn(t + c_s h, Y_s, c)`,
  `Y_s = y + h sum_{j<s} a_sj k_j`. With `K_s` the cotangent of `k_s`
  (initially `h b_s a'`), stage `s = S-1, ..., 0` takes the VJP of `fn` at
  `Y_s` with `K_s`, giving `Y'_s`; then `K_j += h a_sj Y'_s` for `j < s`,
  and `Y'_s` adds to the cotangent of `y`, the VJP's parameter parts to
  those of `c` and `variables`.

  The stage loop runs forward once (no tape) and the VJPs run in a second
  loop, each re-evaluating `fn` under its own tape. Differentiating the
  stage loop with `tf.GradientTape` instead builds TensorFlow's loop
  gradient, which stores every intermediate of `fn` and feeds constant zero
  cotangents to the loop's unused outputs; XLA names those constants in an
  order that varies between processes, so the compiled step's cache key
  did too.

  `dc0` and `dv0`, if given, are the cotangents of the float entries of
  `c_flat` and of `variables` accumulated so far (by the caller's loop over
  steps): the stage loop adds this step's to them, which saves the caller
  a zero-initialised sum and an addition per Tensor (each a kernel under
  XLA).

  Returns:
    `(dy, dc_float, dv)`: cotangents of `y`, of the float entries of
    `c_flat`, and of `variables` (dense, zeros where unconnected), with
    `dc0` and `dv0` added.
  """
  stages = runge_kutta.rk_stages(lambda s, z: fn(s, z, c_flat), tableau, t,
                                 y, h, num_stages=num_stages)
  a_coef, b_coef, c_coef = runge_kutta.stage_coefficients(tableau, t.dtype)
  float_c = [c for c in c_flat if _is_float(c)]

  def expand(w, x):
    return tf.reshape(tf.cast(w, x.dtype), [-1] + [1] * x.shape.rank)

  def cast_h(x):
    return tf.cast(h, x.dtype)

  k_bar = [expand(b_coef, a_i) * (cast_h(a_i) * a_i)[tf.newaxis]
           for a_i in cotangent]

  def body(s, k_bar, dy, dc, dv):
    y_s = runge_kutta.combine(y, h, stages, a_coef[s])
    k_bar_s = [tf.gather(k, s) for k in k_bar]
    _, gy, gc, gv = _vjp(fn, t + c_coef[s] * h, y_s, c_flat, variables,
                         k_bar_s)
    gc = [x for x, c in zip(gc, c_flat) if _is_float(c)]
    k_bar = [k + expand(a_coef[s], g_i) * (cast_h(g_i) * g_i)[tf.newaxis]
             for k, g_i in zip(k_bar, gy)]
    return (s - 1, k_bar, [x + d for x, d in zip(dy, gy)],
            [x + d for x, d in zip(dc, gc)], [x + d for x, d in zip(dv, gv)])

  dy0 = list(cotangent)
  if dc0 is None:
    dc0 = [tf.zeros_like(c) for c in float_c]
  if dv0 is None:
    dv0 = [tf.zeros_like(v) for v in variables]
  _, _, dy, dc, dv = tf.while_loop(
      lambda s, *_: s >= 0, body,
      (tf.constant(num_stages - 1), k_bar, dy0, dc0, dv0),
      maximum_iterations=num_stages)
  return dy, dc, dv


def _backprop_gradients(g, tableau, steps, y0, c_flat, variables, dys, ss,
                        max_iter, unroll_stages=False, segmented=False):
  """Reverse sweep over the recorded accepted steps (exact discrete VJP).

  Only the start of each accepted step is recorded. Each step is re-run
  and differentiated: with the stage loop (the default) by `_rk_step_vjp`,
  whose reverse stage loop holds the one VJP of `g` in the graph; with
  `unroll_stages` by a tape over the written-out stages. Recording the
  stages in the forward pass instead would save the re-run but multiply the
  buffer (which XLA sizes for `max_iter` steps) by the number of
  stages; measured, that cost more than it saved (6.7 vs 3.4 ms a step on
  the seed moons model, max_num_steps=1000).
  """
  out_range = tf.range(tf.shape(ss)[0])
  b_coef = tf.constant(tableau.b, steps['t'].dtype)
  # Stages after the last non-zero weight do not reach the new state (the
  # FSAL stage of DormandPrince and Tsit5): skip them.
  num_stages = max(i for i, w in enumerate(tableau.b) if w != 0.0) + 1

  def inject(a, lo, hi):
    mask = (out_range >= lo) & (out_range < hi)
    return [a_i + tf.reduce_sum(
        tf.where(tf.reshape(mask, [-1] + [1] * a_i.shape.rank), d,
                 tf.zeros_like(d)), axis=0) for a_i, d in zip(a, dys)]

  count = steps['count']
  float_c = [c for c in c_flat if _is_float(c)]
  float_idx = [i for i, c in enumerate(c_flat) if _is_float(c)]

  def cond(j, a, ac, av):
    del a, ac, av
    return j >= 0

  def body(j, a, ac, av):
    t_j = steps['t'][j]
    h_j = steps['h'][j]
    y_j = [y[j] for y in steps['y']]
    hi = steps['out'][j]
    lo = tf.where(j > 0, steps['out'][tf.maximum(j - 1, 0)],
                  steps['out_initial'])
    a = inject(a, lo, hi)
    # The step heads to output `lo`: with `segmented`, that is its segment.
    seg = (lo,) if segmented else ()
    if unroll_stages:
      # The stages are written out (no loop): one VJP of the whole step.
      def step(t, y, c):
        stages = runge_kutta.rk_stages(
            lambda s, z: g(s, z, c, *seg), tableau, t, y, h_j, unroll=True,
            num_stages=num_stages)
        return runge_kutta.combine(y, h_j, stages, b_coef)
      _, a, gc, gv = _vjp(step, t_j, y_j, c_flat, variables, a)
      gc = [x for x, c in zip(gc, c_flat) if _is_float(c)]
      ac = [x + d for x, d in zip(ac, gc)]
      av = [x + d for x, d in zip(av, gv)]
    else:
      a, ac, av = _rk_step_vjp(lambda s, y, c: g(s, y, c, *seg), tableau,
                               t_j, y_j, h_j, c_flat, variables, a,
                               num_stages, dc0=ac, dv0=av)
    return j - 1, a, ac, av

  a0 = [tf.zeros_like(y) for y in y0]
  ac0 = [tf.zeros_like(c) for c in float_c]
  av0 = [tf.zeros_like(v) for v in variables]
  _, a, ac, av = tf.while_loop(cond, body, (count - 1, a0, ac0, av0),
                               maximum_iterations=max_iter)
  a = inject(a, 0, steps['out_initial'])
  dc = [None] * len(c_flat)
  for i, grad in zip(float_idx, ac):
    dc[i] = grad
  return a, dc, av


class _Params:
  """Packs the parameters' cotangents (float constants, then variables).

  When they share a dtype and have static shapes they travel through the
  adjoint's backward solve as one flat vector: the loop's per-leaf work
  (stage updates, selects: each a kernel under XLA) then does not grow
  with their number. (`StackedFFJORD` passes its blocks' weights as
  constants: 6 Tensors for an MLP with 2 hidden layers, one vector here;
  for the seed model that cut ~0.5 s of XLA compilation. The backprop
  gradient's loops only accumulate these cotangents, and packing them there
  made no measurable difference.)
  """

  def __init__(self, float_c, variables):
    self.params = list(float_c) + list(variables)
    self.num_c = len(float_c)
    self.flat = bool(self.params) and all(
        x.shape.is_fully_defined() and x.dtype == self.params[0].dtype
        for x in self.params)

  @property
  def num_leaves(self):
    """How many Tensors `pack` returns."""
    return 1 if self.flat else len(self.params)

  def pack(self, gc, gv):
    """A list of Tensors (one if flat) from the cotangents of `c`, `v`."""
    parts = list(gc) + list(gv)
    if not self.flat:
      return parts
    return [tf.concat([tf.reshape(x, [-1]) for x in parts], 0)]

  def zeros(self):
    """`pack` of zero cotangents."""
    if self.flat:
      size = sum(x.shape.num_elements() for x in self.params)
      return [tf.zeros([size], self.params[0].dtype)]
    return [tf.zeros_like(x) for x in self.params]

  def unpack(self, packed):
    """`(gc, gv)` from `pack`'s list."""
    packed = list(packed)
    if self.flat:
      sizes = [x.shape.num_elements() for x in self.params]
      packed = [tf.reshape(part, x.shape) for part, x in
                zip(tf.split(packed[0], sizes), self.params)]
    return packed[:self.num_c], packed[self.num_c:]


class _Layout:
  """Packs the error-controlled leaves of the adjoint's state into one vector.

  The backward solve's loop does per-leaf work (stage sums, the error norm,
  selects: each a kernel under XLA); with the state `(y, a, a_params)` as
  one flat vector it does that work once. The leaves left out of the error
  norm stay apart (the norm sees only the vector). Only leaves of static
  shape and one dtype are packed; otherwise the state is left as it is.
  """

  def __init__(self, leaves, mask):
    self.mask = list(mask)
    inside = [x for x, use in zip(leaves, mask) if use]
    self.packed = len(inside) > 1 and all(
        x.shape.is_fully_defined() and x.dtype == inside[0].dtype
        for x in inside)
    self.shapes = [x.shape for x in leaves]
    self.sizes = [x.shape.num_elements() for x in inside]

  @property
  def error_mask(self):
    """The error mask of `pack`'s list."""
    if not self.packed:
      return self.mask
    return [True] + [False] * (len(self.mask) - sum(self.mask))

  def pack(self, xs, lead=(), flags=False):
    """One vector of the leaves in the error norm (each with leading dims
    `lead`), then the others. With `flags`, `xs` holds a Python bool per
    leaf: the packed vector becomes a bool Tensor, the others stay bools."""
    if not self.packed:
      return list(xs)
    if flags:
      inside = [tf.fill([size], flag) for size, flag in zip(
          self.sizes, [x for x, use in zip(xs, self.mask) if use])]
      return [tf.concat(inside, 0)] + [
          x for x, use in zip(xs, self.mask) if not use]
    lead = list(lead)
    inside = [tf.reshape(x, lead + [-1])
              for x, use in zip(xs, self.mask) if use]
    return [tf.concat(inside, len(lead))] + [
        x for x, use in zip(xs, self.mask) if not use]

  def unpack(self, packed):
    if not self.packed:
      return list(packed)
    inside = iter(tf.split(packed[0], self.sizes))
    outside = iter(packed[1:])
    return [tf.reshape(next(inside), shape) if use else next(outside)
            for shape, use in zip(self.shapes, self.mask)]


def _adjoint_gradients(g, tableau, control, s0, ss, outputs, c_flat,
                       variables, dys, max_iter, error_mask, first_steps=None,
                       segmented=False, ends=False):
  """Solves the adjoint ODE backwards through the solution times.

  With `u = -s`, the augmented state `(y, a, a_c, a_v)` obeys
  `dy/du = -g`, `da/du = a^T dg/dy`, `da_c/du = a^T dg/dc`,
  `da_v/du = a^T dg/dv`. The solve runs one segment per solution time, from
  `s_k` back to `s_{k-1}` (the last back to `s0`), all in one segmented
  loop (`runge_kutta.integrate`'s `restart_fn`): as segment `s_k` starts,
  `y` is reset to the forward solution there (no drift from integrating
  `y` backwards), the cotangent of `s_k` is added to `a`, and the
  parameters' adjoint restarts from zero. Each segment's contribution to
  the parameters' gradient is its adjoint at the segment's end (one output
  per segment); their sum is the gradient. The loop has no `tf.cond`, so
  pfor can vectorise it (batch Jacobians).

  Args:
    first_steps: optional first step sizes of the backward segments: with
      `ends`, `[T]`, the step the forward solve proposed when it reached
      each solution time (the backward segment from `s_k` starts where that
      step would have gone); otherwise `[T - 1]`, the sizes of segments
      `1..T-1` (dense output: the forward's accepted steps). `None`
      estimates them (Hairer's probe: one more evaluation of the augmented
      dynamics per segment, and the probe's code in the compiled loop).
    segmented: the forward solve was segmented: segment `k` runs `g` with
      segment index `k`.
    ends: `first_steps` is indexed by solution time (see above).

  Returns:
    `(dy0, dc, dv, status, u_reached, num_steps)`: the gradients, and the
    backward solve's status, the time `u` where it stopped and its step
    attempts.
  """
  n = len(outputs)
  float_c = [c for c in c_flat if _is_float(c)]
  float_idx = [i for i, c in enumerate(c_flat) if _is_float(c)]
  num_t = tf.shape(ss)[0]
  params = _Params(float_c, variables)
  # The parameters' adjoint is error-controlled too (not a seminorm that
  # leaves it out): otherwise a large first step integrates the parameter
  # gradients with no control at all. Each segment integrates its own
  # contribution from zero, which is what the norm sees: a segment's steps
  # do not depend on what the later segments added, so a segmented solve
  # steps exactly as separate solves would.
  mask = list(error_mask) * 2 + [True] * params.num_leaves
  state0 = ([o[-1] for o in outputs] + [tf.zeros_like(d[-1]) for d in dys]
            + params.zeros())
  layout = _Layout(state0, mask)

  # Backward segment j is forward segment k = T - 1 - j: from u = -s_k to
  # -s_{k-1} (-s0 for k = 0), with the dynamics of forward segment k.
  u_ends = -tf.concat([s0[tf.newaxis], ss[:-1]], 0)[::-1]

  def fn(u, state, j):
    k = num_t - 1 - j
    parts = layout.unpack(state)
    y, a = parts[:n], parts[n:2 * n]
    seg_g = (lambda s, y, c: g(s, y, c, k)) if segmented else g
    out, gy, gc, gv = _vjp(seg_g, -u, y, c_flat, variables, a)
    gc = [gc[i] for i in float_idx]
    return layout.pack([-o for o in out] + list(gy) + params.pack(gc, gv))

  # Restarting segment j sets the state to jumps[j] + (a's part of it):
  # `y` from the forward solution, the cotangent added to `a`, the
  # parameters' adjoint zero. Packed before the loop, so a step does one
  # gather and one select for it.
  ks = tf.range(num_t - 1, -1, -1)
  jumps = layout.pack(
      [tf.gather(o, ks) for o in outputs] + [tf.gather(d, ks) for d in dys]
      + [tf.zeros(tf.concat([[num_t], tf.shape(p)], 0), p.dtype)
         for p in params.zeros()], lead=[num_t])
  # Which entries keep their value (plus the jump): `a`'s. A leaf kept
  # apart is all or nothing (a Python bool: a constant Tensor captured by
  # the loop would get a per-process name from a graph pass, and the
  # compilation cache's key would change between processes).
  keeps = layout.pack([False] * n + [True] * n + [False] * params.num_leaves,
                      flags=True)

  def restart(j, state):
    out = []
    for x, jump, keep in zip(state, jumps, keeps):
      jump = tf.gather(jump, j)
      if isinstance(keep, bool):
        out.append(x + jump if keep else jump)
      else:
        out.append(tf.where(keep, x + jump, jump))
    return out

  first = None
  if first_steps is not None:
    first = tf.gather(first_steps, ks if ends else tf.maximum(ks - 1, 0))
  res = runge_kutta.integrate(fn, tableau, control, -ss[-1],
                              layout.pack(state0), u_ends, max_iter,
                              layout.error_mask, first_step=first,
                              segmented=True, restart_fn=restart)
  # Every segment's end is written once: the last holds dL/dy0, their sum
  # the parameters' gradient.
  last = layout.unpack([o[-1] for o in res.outputs])
  summed = layout.unpack([tf.reduce_sum(o, 0) for o in res.outputs])
  dy0 = last[n:2 * n]
  dc_float, dv = params.unpack(summed[2 * n:])
  dc = [None] * len(c_flat)
  for i, grad in zip(float_idx, dc_float):
    dc[i] = grad
  return (dy0, dc, dv, res.status, res.t,
          res.num_accepted + res.num_rejected)


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
    num_steps = _check_step_count('num_steps', num_steps, bound=False)
    self.step_size = _check_positive('step_size', step_size, allow_none=True)
    self.num_steps = num_steps
    super().__init__(gradient=gradient, max_num_steps=max_num_steps,
                     raise_on_failure=raise_on_failure,
                     unroll_stages=unroll_stages,
                     make_adjoint_solver_fn=make_adjoint_solver_fn,
                     validate_args=validate_args, name=name)

  def _control(self):
    return runge_kutta.StepControl(adaptive=False, step_size=self.step_size,
                                   num_steps=self.num_steps,
                                   unroll_stages=self.unroll_stages)

  def _max_iterations(self, t0, ts, segmented=False):
    """Static step count: steps plus one per solution time (shortened steps)."""
    num_times = ts.shape[0] or 1
    bound = None
    if self.num_steps is not None:
      # Segmented: `num_steps` in every segment.
      bound = self.num_steps * (num_times if segmented else 1) + num_times
    else:
      t0_v, ts_v = tf.get_static_value(t0), tf.get_static_value(ts)
      if t0_v is not None and ts_v is not None:
        span = abs(float(np.reshape(ts_v, [-1])[-1]) - float(t0_v))
        bound = int(math.ceil(span / self.step_size)) + num_times + 1
    if self.max_num_steps is not None:
      bound = (self.max_num_steps if bound is None
               else min(bound, self.max_num_steps))
    return bound

  def _chosen_times(self, t0, final_time):
    """The grid of the steps: `num_steps + 1` times, or `t0 + k * step_size`."""
    dtype = t0.dtype
    if self.num_steps is not None:
      k = tf.range(self.num_steps, dtype=dtype) / self.num_steps
      return tf.concat([t0 + (final_time - t0) * k, final_time[tf.newaxis]],
                       0)
    span = final_time - t0
    h = tf.constant(self.step_size, dtype)
    # A last step shorter than 1e-9 of a step is rounding: end on final_time.
    count = tf.cast(tf.math.ceil(tf.abs(span) / h - 1e-9), tf.int32)
    count = tf.maximum(count, 1)
    static = tf.get_static_value(count)
    if static is None and in_xla_context():
      raise ValueError(
          f'{self.name}: with `step_size` and a `ChosenBySolver.final_time` '
          'that is not a constant, the number of steps is known only at run '
          'time, which XLA (jit_compile=True) cannot compile; give '
          '`num_steps` instead, or explicit `solution_times`.')
    if static is not None:
      count = int(static)
    k = tf.cast(tf.range(count), dtype)
    grid = t0 + tf.sign(span) * h * k
    return tf.concat([grid, final_time[tf.newaxis]], 0)


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
    min_step_factor = _alias('min_step_factor', min_step_factor,
                             'min_step_size_factor', min_step_size_factor, 0.2)
    max_step_factor = _alias('max_step_factor', max_step_factor,
                             'max_step_size_factor', max_step_size_factor, 10.)
    self.rtol = _check_positive('rtol', rtol)
    self.atol = _check_positive('atol', atol)
    self.first_step_size = _check_positive('first_step_size', first_step_size,
                                           allow_none=True)
    self.safety_factor = _check_positive('safety_factor', safety_factor)
    self.min_step_factor = _check_positive('min_step_factor', min_step_factor)
    self.max_step_factor = _check_positive('max_step_factor', max_step_factor)
    if not self.min_step_factor < 1. < self.max_step_factor:
      raise ValueError(
          '`min_step_factor` must be < 1 < `max_step_factor`; got '
          f'{min_step_factor!r} and {max_step_factor!r}.')
    if not 0. < self.safety_factor <= 1.:
      raise ValueError(
          f'`safety_factor` must be in (0, 1]; got {safety_factor!r}.')
    self.pi_alpha = _check_positive('pi_alpha', pi_alpha, allow_zero=True)
    self.pi_beta = _check_positive('pi_beta', pi_beta, allow_zero=True)
    super().__init__(gradient=gradient, max_num_steps=max_num_steps,
                     error_components=error_components,
                     raise_on_failure=raise_on_failure,
                     unroll_stages=unroll_stages,
                     make_adjoint_solver_fn=make_adjoint_solver_fn,
                     validate_args=validate_args, name=name)

  # TFP's attribute names, read by code written for tfp.math.ode.
  @property
  def min_step_size_factor(self):
    return self.min_step_factor

  @property
  def max_step_size_factor(self):
    return self.max_step_factor

  def _control(self):
    return runge_kutta.StepControl(
        adaptive=True, rtol=self.rtol, atol=self.atol,
        first_step_size=self.first_step_size,
        safety_factor=self.safety_factor,
        min_step_factor=self.min_step_factor,
        max_step_factor=self.max_step_factor, pi_alpha=self.pi_alpha,
        pi_beta=self.pi_beta, unroll_stages=self.unroll_stages)

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
