"""The solve driver: from `Solver.solve`'s arguments to `Results`.

`prepare` checks and flattens the arguments into a `Problem` (a flat state,
times on an axis that increases, the error mask); `run` integrates it with
the solver's method, controller and gradient method inside one
`tf.custom_gradient`, checks the status and packs the results.
"""

from typing import Any, Callable, List, NamedTuple, Optional

import tensorflow as tf
from tensorflow.python.eager import record as tape_record
from tensorflow_probability.python.math.ode import base as tfp_ode

from tfp_ffjord._lowering import in_xla_context
from tfp_ffjord.ode import base
from tfp_ffjord.ode import gradients as gradients_lib
from tfp_ffjord.ode import runge_kutta
from tfp_ffjord.ode import stages as stages_lib
from tfp_ffjord.ode import vjp as vjp_lib

__all__ = ['Call', 'Problem', 'prepare', 'run']


class Call(NamedTuple):
  """The arguments of one `solve` call that shape the problem."""
  ode_fn: Callable
  initial_time: Any
  initial_state: Any
  solution_times: Any
  constants: Optional[dict] = None
  error_components: Optional[int] = None
  segmented: bool = False
  segment_relative: Any = None


class Problem(NamedTuple):
  """A solve, flattened.

  Attributes:
    structure: `initial_state`'s structure.
    y0: its leaves.
    t0, ts: the initial time and the `[T]` solution times.
    direction: +1 or -1 (`ts` after or before `t0`).
    s0, ss: `direction * t0`, `direction * ts`: an increasing axis.
    dense: the times are the accepted steps (`ChosenBySolver`).
    constants: `(keys, values)` of the `constants` dict, sorted by key.
    error_mask: one bool per leaf: in the error norm or not.
    segmented: each solution time ends a segment.
    relative: one bool per leaf: measured from its segment's start.
  """
  structure: Any
  y0: List[tf.Tensor]
  t0: tf.Tensor
  ts: tf.Tensor
  direction: tf.Tensor
  s0: tf.Tensor
  ss: tf.Tensor
  dense: bool
  constants: tuple
  error_mask: List[bool]
  segmented: bool
  relative: List[bool]


def prepare(solver, call: Call) -> Problem:
  """Checks and flattens `call` for `solver`."""
  name = solver.name
  if not callable(call.ode_fn):
    raise TypeError(f'`ode_fn` must be callable; got {call.ode_fn!r}.')
  constants = dict(call.constants or {})
  segmented = bool(call.segmented)
  segment_relative = sorted(set(call.segment_relative or ()))
  if segment_relative and not segmented:
    raise ValueError(f'{name}: `segment_relative` needs `segmented=True`.')
  if segmented and 'segment' in constants:
    raise ValueError(
        f'{name}: with `segmented=True` the solver passes `segment` to '
        '`ode_fn`; `constants` must not hold a key named \'segment\'.')
  y0 = _flat_state(call.initial_state)
  t_dtype = y0[0].dtype.real_dtype
  t0 = base.as_float(call.initial_time, t_dtype)
  if t0.shape.rank not in (0, None):
    raise ValueError('`initial_time` must be a scalar; got shape '
                     f'{t0.shape}.')
  t0 = tf.reshape(t0, [])
  ts, dense = _times(solver, t0, call.solution_times, segmented)
  # Integrate in s = direction * t, so that s always increases.
  direction = tf.where(ts[-1] >= t0, tf.ones([], t_dtype),
                       -tf.ones([], t_dtype))
  s0, ss = direction * t0, direction * ts
  _check_sorted(name, ss, s0)
  if solver.validate_args:
    y0 = _validated(name, y0, t0, ts, (s0, ss))
  limits = [k for k in (solver.error_components, call.error_components)
            if k is not None]
  error_mask = [True] * len(y0)
  if limits:
    error_mask = [i < min(limits) for i in range(len(y0))]
  keys = sorted(constants)
  return Problem(
      structure=call.initial_state, y0=y0, t0=t0, ts=ts, direction=direction,
      s0=s0, ss=ss, dense=dense,
      constants=(keys, [tf.convert_to_tensor(constants[k]) for k in keys]),
      error_mask=error_mask, segmented=segmented,
      relative=[i in segment_relative for i in range(len(y0))])


def _flat_state(initial_state):
  """The leaves of `initial_state`: floating or complex, of one precision."""
  y0 = [tf.convert_to_tensor(x) for x in tf.nest.flatten(initial_state)]
  if not y0:
    raise ValueError('`initial_state` must contain at least one Tensor.')
  dtype = y0[0].dtype
  for x in y0:
    if not vjp_lib.is_float(x):
      raise TypeError(
          '`initial_state` must have a floating point or complex '
          'floating point dtype; got a Tensor of dtype '
          f'{x.dtype.name}.')
    if x.dtype.real_dtype != dtype.real_dtype:
      raise TypeError(
          '`initial_state` must hold Tensors of one precision; got '
          f'{dtype.name} and {x.dtype.name}.')
  return y0


def _times(solver, t0, solution_times, segmented):
  """`(ts, dense)`: the solution times as a `[T]` Tensor, and whether they
  are the accepted steps (`ChosenBySolver` with an adaptive method; `ts`
  then holds only the final time)."""
  name, t_dtype = solver.name, t0.dtype
  dense = False
  if isinstance(solution_times, tfp_ode.ChosenBySolver):
    if segmented:
      raise ValueError(
          f'{name}: `segmented=True` needs explicit `solution_times` (the '
          'ends of the segments), not `ChosenBySolver`.')
    final_time = base.as_float(solution_times.final_time, t_dtype)
    if final_time.shape.rank not in (0, None):
      raise ValueError('`ChosenBySolver.final_time` must be a scalar; got '
                       f'shape {final_time.shape}.')
    final_time = tf.reshape(final_time, [])
    solution_times = solver.controller.chosen_times(t0, final_time, name)
    if solution_times is None:
      if in_xla_context():
        raise ValueError(
            f'{name}: `tfp.math.ode.ChosenBySolver` returns one state '
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
  return ts, dense


def _check_sorted(name, ss, s0):
  static = tf.get_static_value(ss)
  static0 = tf.get_static_value(s0)
  if static is not None and static0 is not None:
    if (static[1:] < static[:-1]).any() or (static < static0).any():
      raise ValueError(
          f'{name}: `solution_times` must be sorted in the direction '
          'of integration, starting at or after `initial_time`.')


def _validated(name, y0, t0, ts, axis):
  """`validate_args=True`: run-time checks of the inputs (not under XLA);
  `axis` is `(s0, ss)`."""
  s0, ss = axis
  checks = [
      tf.debugging.Assert(tf.math.is_finite(t0), [
          f'{name}: `initial_time` must be finite; got', t0]),
      tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(ts)), [
          f'{name}: `solution_times` must be finite; got', ts]),
      tf.debugging.Assert(
          tf.reduce_all(ss[1:] >= ss[:-1]) & tf.reduce_all(ss >= s0), [
              f'{name}: `solution_times` must be sorted in the '
              'direction of integration, starting at or after '
              '`initial_time`; got', ts, 'from initial_time', t0]),
  ]
  for i, x in enumerate(y0):
    checks.append(tf.debugging.Assert(
        stages_lib.all_finite([x]), [
            f'{name}: `initial_state` (leaf {i}) must be finite; it holds '
            'NaN or Inf']))
  with tf.control_dependencies(checks):
    return [tf.identity(x) for x in y0]


def flat_dynamics(name, ode_fn, problem: Problem):
  """`g(s, y_flat, c_flat[, segment])`: `ode_fn` on flat lists, on the
  increasing axis `s` (its derivative times `direction`)."""
  keys = problem.constants[0]
  structure, segmented = problem.structure, problem.segmented

  def user_fn(t, y_flat, c_flat, seg=None):
    y = tf.nest.pack_sequence_as(structure, y_flat)
    kwargs = dict(zip(keys, c_flat))
    if segmented:
      kwargs['segment'] = seg
    dy = ode_fn(t, y, **kwargs)
    try:
      tf.nest.assert_same_structure(y, dy)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f'{name}: `ode_fn` must return the structure of the state; '
          f'state {tf.nest.map_structure(lambda _: "*", y)}, got '
          f'{tf.nest.map_structure(lambda _: "*", dy)}.') from e
    dy = [tf.convert_to_tensor(d) for d in tf.nest.flatten(dy)]
    for d, yi in zip(dy, y_flat):
      if (d.shape.is_fully_defined() and yi.shape.is_fully_defined()
          and d.shape != yi.shape):
        raise ValueError(
            f'{name}: `ode_fn` returned shape {d.shape} for a state '
            f'of shape {yi.shape}; they must match.')
    return [tf.cast(d, yi.dtype) for d, yi in zip(dy, y_flat)]

  direction = problem.direction

  def g(s, y_flat, c_flat, seg=None):
    dy = user_fn(direction * s, y_flat, c_flat, seg)
    return [tf.cast(direction, d.dtype) * d for d in dy]
  return g


def run(solver, problem: Problem, g) -> base.Results:
  """Integrates `problem` (dynamics `g` from `flat_dynamics`) with
  `solver`, differentiably, and packs `Results`."""
  n_y = len(problem.y0)
  controller = solver.controller
  method = solver.gradient_method
  max_iter = solver.step_bound(problem.t0, problem.ts, problem.segmented)
  record = method.records_steps or problem.dense
  backward_solver = method.backward_solver(solver)
  options = runge_kutta.LoopOptions(
      error_mask=problem.error_mask, max_num_steps=max_iter,
      unroll_stages=solver.unroll_stages, record_steps=record,
      record_capacity=base.XLA_BACKPROP_MAX_NUM_STEPS,
      end_steps=method.wants_end_steps(controller, problem.dense),
      segmented=problem.segmented, count_segments=problem.segmented,
      segment_relative=problem.relative)

  @tf.custom_gradient
  def solve_flat(*args):
    y_init, c_flat = list(args[:n_y]), list(args[n_y:])

    def g_recorded(s, y, *seg):
      with vjp_lib.tapes_resumed():
        return g(s, y, c_flat, *seg)

    # The gradient is `grad_fn`: no enclosing tape needs the loop's own
    # ops. Left recorded, a persistent or nested tape makes TensorFlow
    # build the while loop's gradient at once (seconds of tracing; under
    # XLA, ops without a gradient). `ode_fn` itself runs with the tapes
    # on, for the tapes it opens (the exact trace) and variable reads.
    with tape_record.stop_recording():
      res = runge_kutta.integrate(g_recorded, solver.tableau, controller,
                                  problem.s0, y_init, problem.ss, options)
    outputs, steps, out_s = _dense(res, problem)
    forward = gradients_lib.Forward(
        solver=solver, backward_solver=backward_solver, g=g,
        tableau=solver.tableau, s0=problem.s0, ss=out_s, y0=y_init,
        c_flat=c_flat, outputs=outputs, steps=steps,
        end_steps=res.end_steps, max_iter=max_iter,
        error_mask=problem.error_mask, segmented=problem.segmented,
        dense=problem.dense)

    def grad_fn(*dys, variables=None):
      dys = [tf.zeros_like(o) if d is None else d
             for d, o in zip(dys[:n_y], outputs)]
      variables = list(variables or [])
      dy0, dc, dv = method.gradients(forward, variables, dys)
      input_grads = list(dy0) + list(dc)
      if variables:
        return input_grads, list(dv)
      return input_grads

    diag = [res.t, res.num_fn_evals, res.num_accepted, res.num_rejected,
            res.status, out_s]
    if problem.segmented:
      diag.append(res.segment_counts)
    return tuple(outputs + diag), grad_fn

  flat = solve_flat(*(problem.y0 + problem.constants[1]))
  return _results(solver, problem, flat, (max_iter, record))


def _dense(res, problem):
  """`(outputs, steps, out_s)`: with dense output, the start of every
  accepted step, then the final time (and the record indexed for it)."""
  outputs, steps, out_s = list(res.outputs), res.steps, problem.ss
  if problem.dense:
    count = res.num_accepted
    outputs = [tf.concat([y_steps[:count], o[-1:]], 0)
               for y_steps, o in zip(steps['y'], outputs)]
    out_s = tf.concat([steps['t'][:count], problem.ss[-1:]], 0)
    steps = dict(steps, out=tf.range(count) + 2,
                 out_initial=tf.constant(1))
  return outputs, steps, out_s


def _results(solver, problem, flat, bound):
  """`Results` from `solve_flat`'s outputs, checked; `bound` is the
  forward loop's `(max_iter, recorded)`."""
  n_y = len(problem.y0)
  outputs = list(flat[:n_y])
  t_reached, nfe, n_acc, n_rej, status, out_s = flat[n_y:n_y + 6]
  segment_counts = flat[n_y + 6] if problem.segmented else None
  t_reached = problem.direction * t_reached
  max_iter, recorded = bound
  outputs = solver.checked(outputs, status, t_reached, n_acc + n_rej,
                           max_iter, recorded)
  zero = tf.constant(0, tf.int32)
  diagnostics = base.Diagnostics(
      num_ode_fn_evaluations=nfe, num_jacobian_evaluations=zero,
      num_matrix_factorizations=zero, num_accepted_steps=n_acc,
      num_rejected_steps=n_rej, status=status, final_time=t_reached,
      segment_counts=segment_counts)
  states = tf.nest.pack_sequence_as(problem.structure, outputs)
  times = (problem.direction * tf.stop_gradient(out_s) if problem.dense
           else problem.ts)
  return base.Results(times=times, states=states, diagnostics=diagnostics,
                      solver_internal_state=None)
