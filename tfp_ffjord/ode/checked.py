"""`checked_function`: solver failures that raise even under XLA.

XLA compiles assertions away, so inside `tf.function(jit_compile=True)` a
failed solve can only return NaN states and a non-zero `diagnostics.status`.
`checked_function` wraps a function like `tf.function`; while it is traced,
every tfp_ffjord solve inside it registers its status, the compiled function
returns them alongside its own outputs, and the wrapper checks them on the
host after each call, raising `tf.errors.InvalidArgumentError` with the
solver, the reason and the time reached.

```python
@tfp_ffjord.ode.checked_function(jit_compile=True)
def train_step(batch):
  ...
```
"""

import contextlib
import functools
import threading

import numpy as np
import tensorflow as tf

from tfp_ffjord.ode import base

__all__ = ['checked_function']

_local = threading.local()


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


def register(solver_name, max_num_steps, status, t_reached, num_steps):
  """Called by solvers: records a solve's status for an enclosing wrapper."""
  stack = getattr(_local, 'stack', None)
  if stack:
    stack[-1].append((solver_name, max_num_steps, status, t_reached,
                      num_steps))


def checked_function(fn=None, **function_kwargs):
  """Like `tf.function(fn, **function_kwargs)`, but raises on solver failure.

  Args:
    fn: the function to wrap (or use as a decorator with keyword arguments).
    **function_kwargs: passed to `tf.function` (e.g. `jit_compile=True`,
      `input_signature=...`, `reduce_retracing=True`).

  Returns:
    A callable with `fn`'s signature. After each call it raises
    `tf.errors.InvalidArgumentError` if any solve inside failed (its message
    names the solver, the reason and the time reached); otherwise it returns
    `fn`'s outputs.
  """
  if fn is None:
    return functools.partial(checked_function, **function_kwargs)
  meta = {}

  def with_statuses(*args, **kwargs):
    with _collecting() as records:
      outputs = fn(*args, **kwargs)
    meta['records'] = [(name, max_steps) for name, max_steps, *_ in records]
    statuses = [(tf.cast(s, tf.int32), tf.cast(t, tf.float64),
                 tf.cast(n, tf.int32)) for _, _, s, t, n in records]
    return outputs, statuses

  compiled = tf.function(with_statuses, **function_kwargs)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    outputs, statuses = compiled(*args, **kwargs)
    for (name, max_steps), (status, t, n) in zip(meta['records'], statuses):
      status = int(np.asarray(status))
      if status != base.Status.SUCCEEDED:
        hint = ''
        if status == base.Status.MAX_NUM_STEPS_EXCEEDED:
          hint = ('; pass a larger `max_num_steps` to the solver'
                  + (' (backprop gradients under XLA record at most '
                     f'{base.XLA_BACKPROP_MAX_NUM_STEPS} steps when it is None)'
                     if max_steps is None else ''))
        raise tf.errors.InvalidArgumentError(
            None, None,
            f'{name} failed: {base.status_message(status)}; time reached '
            f'{float(np.asarray(t)):g} after {int(np.asarray(n))} step '
            f'attempts (max_num_steps={max_steps}{hint}).')
    return outputs

  wrapper.python_function = fn
  wrapper.compiled_function = compiled
  return wrapper
