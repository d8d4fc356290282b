"""`checked_function`: solver failures that raise even under XLA.

XLA compiles assertions away, so inside `tf.function(jit_compile=True)` a
failed solve can only return NaN states and a non-zero `diagnostics.status`.
`checked_function` wraps a function like `tf.function`; while it is traced,
every tfp_ffjord solve inside it registers its status (instead of building
an assertion), the compiled function returns them alongside its own
outputs, and the wrapper checks them on the host after each call, raising
`tfp_ffjord.ode.SolverError` with the solver, the reason, the time reached
and the step count, in the same way with and without XLA.

```python
@tfp_ffjord.ode.checked_function(jit_compile=True)
def train_step(batch):
  ...
```
"""

import collections
import contextlib
import functools
import itertools
import threading

import numpy as np
import tensorflow as tf

from tfp_ffjord.ode import base

__all__ = ['checked_function', 'checked_while_loop']

_local = threading.local()

# What a solve registers besides its run-time values.
Solve = collections.namedtuple(
    'Solve', ['solver', 'solver_class', 'max_num_steps', 'recorded', 'stage'])


@contextlib.contextmanager
def _collecting():
  stack = getattr(_local, 'stack', None)
  if stack is None:
    stack = _local.stack = []
  records = []
  stack.append(records)
  try:
    yield records
  finally:
    stack.pop()


def register(solve: Solve, status, t_reached, num_steps) -> bool:
  """Called by solvers while tracing: records a solve's status for the
  enclosing `checked_function`. True if there is one (then it checks the
  status; the solver builds no assertion of its own)."""
  stack = getattr(_local, 'stack', None)
  if not stack:
    return False
  stack[-1].append((solve, status, t_reached, num_steps))
  return True


def error_for(solve: Solve, status, t_reached, num_steps):
  """The `SolverError` of a failed solve (None if `status` is success)."""
  status = int(status)
  if status == base.Status.SUCCEEDED:
    return None
  hint = ''
  if status == base.Status.MAX_NUM_STEPS_EXCEEDED:
    hint = base.max_num_steps_hint(solve.solver_class, solve.max_num_steps,
                                   solve.recorded)
  return base.SolverError(solve.solver, status, float(t_reached),
                          int(num_steps), solve.max_num_steps, solve.stage,
                          hint)


def checked_function(fn=None, **function_kwargs):
  """Like `tf.function(fn, **function_kwargs)`, but raises on solver failure.

  Args:
    fn: the function to wrap (or use as a decorator with keyword arguments).
    **function_kwargs: passed to `tf.function` (e.g. `jit_compile=True`,
      `input_signature=...`, `reduce_retracing=True`).

  Returns:
    A callable with `fn`'s signature. After each call it raises
    `tfp_ffjord.ode.SolverError` for the first solve inside that failed;
    otherwise it returns `fn`'s outputs. Each trace (concrete function)
    keeps its own list of solves, so a function traced for several input
    shapes matches statuses to the right solves.
  """
  if fn is None:
    return functools.partial(checked_function, **function_kwargs)
  traces = {}
  counter = itertools.count()

  def with_statuses(*args, **kwargs):
    with _collecting() as records:
      outputs = fn(*args, **kwargs)
    trace_id = next(counter)
    traces[trace_id] = [solve for solve, *_ in records]
    statuses = [(tf.cast(s, tf.int32), tf.cast(t, tf.float64),
                 tf.cast(n, tf.int32)) for _, s, t, n in records]
    return outputs, tf.constant(trace_id, tf.int32), statuses

  compiled = tf.function(with_statuses, **function_kwargs)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    outputs, trace_id, statuses = compiled(*args, **kwargs)
    solves = traces[int(trace_id)]
    if len(solves) != len(statuses):
      raise AssertionError(
          f'checked_function: {len(statuses)} statuses for {len(solves)} '
          'registered solves.')
    for solve, (status, t, n) in zip(solves, statuses):
      error = error_for(solve, np.asarray(status), np.asarray(t),
                        np.asarray(n))
      if error is not None:
        raise error
    return outputs

  wrapper.python_function = fn
  wrapper.compiled_function = compiled
  return wrapper


def checked_while_loop(body, num_iterations, loop_vars, stop_fn=None):
  """`tf.while_loop` running `body` up to `num_iterations` times, with the
  solver checks of `checked_function` carried out of the loop.

  A solve inside a loop body cannot hand its status to the enclosing
  `checked_function` (it lives in the body's graph). Here the loop carries
  the first failure (which solve, status, time reached, step count) as loop
  variables, stops at it, and registers every solve of the body with the
  enclosing `checked_function`, which raises after the call as usual.

  Args:
    body: `body(i, *loop_vars) -> loop_vars` (same structure, dtypes and
      shapes), `i` the int32 iteration index.
    num_iterations: int32 scalar, the most iterations.
    loop_vars: a tuple of Tensors.
    stop_fn: optional `stop_fn(*loop_vars) -> bool Tensor`, checked after
      each iteration: True ends the loop early.

  Returns:
    `(iterations, loop_vars)`: the number of iterations run and the final
    values.
  """
  if not getattr(_local, 'stack', None):
    raise RuntimeError('checked_while_loop must run inside a function '
                       'wrapped by tfp_ffjord.ode.checked_function (which '
                       'raises the failures it carries out).')
  solves = []
  loop_vars = tuple(loop_vars)

  def step(i, failed_at, status, t, n, *values):
    with _collecting() as records:
      values = tuple(body(i, *values))
    if not solves:
      solves.extend(solve for solve, *_ in records)
    if records:
      statuses = tf.stack([tf.cast(r[1], tf.int32) for r in records])
      first = tf.cast(tf.argmax(tf.cast(tf.not_equal(statuses, 0),
                                        tf.int32)), tf.int32)
      new_status = tf.gather(statuses, first)
      new_t = tf.gather(tf.stack([tf.cast(r[2], tf.float64)
                                  for r in records]), first)
      new_n = tf.gather(tf.stack([tf.cast(r[3], tf.int32)
                                  for r in records]), first)
      fresh = tf.logical_and(tf.equal(status, 0), tf.not_equal(new_status, 0))
      failed_at = tf.where(fresh, first, failed_at)
      status = tf.where(fresh, new_status, status)
      t = tf.where(fresh, new_t, t)
      n = tf.where(fresh, new_n, n)
    return (i + 1, failed_at, status, t, n) + values

  def cond(i, failed_at, status, t, n, *values):
    del failed_at, t, n
    go = tf.logical_and(i < num_iterations, tf.equal(status, 0))
    if stop_fn is not None:
      go = tf.logical_and(go, tf.logical_or(
          tf.equal(i, 0), tf.logical_not(stop_fn(*values))))
    return go

  start = (tf.constant(0, tf.int32), tf.constant(-1, tf.int32),
           tf.constant(0, tf.int32), tf.constant(0., tf.float64),
           tf.constant(0, tf.int32))
  i, failed_at, status, t, n, *values = tf.while_loop(
      cond, step, start + loop_vars)
  for k, solve in enumerate(solves):
    mine = tf.equal(failed_at, k)
    register(solve, tf.where(mine, status, 0), t, n)
  return i, tuple(values)
