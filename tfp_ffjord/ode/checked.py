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

__all__ = ['checked_function']

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
