"""Result types, status codes and the `solve` contract shared by all solvers.

Every solver's `solve` follows the contract of `tfp.math.ode.Solver.solve`:

```python
results = solver.solve(
    ode_fn,             # ode_fn(t, y, **constants) -> dy/dt, same structure as y
    initial_time,       # scalar
    initial_state,      # Tensor or nested structure of Tensors
    solution_times,     # 1-D, sorted in the direction of integration
    constants=None)     # dict of Tensors passed to ode_fn as keyword arguments
results.times           # == solution_times, shape [T]
results.states          # structure of initial_state, each leaf [T, *leaf.shape]
results.diagnostics     # Diagnostics (below)
```
"""

import collections

import tensorflow as tf

__all__ = [
    'Diagnostics',
    'Results',
    'Status',
    'status_message',
]


# With `gradient='backprop'` the forward pass records every accepted step.
# Outside XLA the record grows as needed; XLA needs a buffer of static size,
# so there an unbounded solver (`max_num_steps=None`) records at most this
# many steps and then fails with MAX_NUM_STEPS_EXCEEDED, whose message names
# `max_num_steps` as the argument to raise. FFJORD's solves take tens of
# steps; the buffer costs this many copies of the state.
XLA_BACKPROP_MAX_NUM_STEPS = 1000


class Status:
  """Integer codes of `Diagnostics.status`."""
  SUCCEEDED = 0
  MAX_NUM_STEPS_EXCEEDED = 1
  STEP_SIZE_UNDERFLOW = 2
  NON_FINITE_STATE = 3

  MESSAGES = (
      'succeeded',
      'exceeded `max_num_steps` before reaching the last solution time',
      'step size underflow: the step size became too small to make progress',
      'non-finite state or time derivative (NaN or Inf)',
  )


def status_message(status: int) -> str:
  """Human-readable text of a `Status` code."""
  status = int(status)
  if 0 <= status < len(Status.MESSAGES):
    return Status.MESSAGES[status]
  return f'unknown status {status}'


Diagnostics = collections.namedtuple(
    'Diagnostics', [
        'num_ode_fn_evaluations',
        'num_jacobian_evaluations',
        'num_matrix_factorizations',
        'num_accepted_steps',
        'num_rejected_steps',
        'status',
        'final_time',
    ])
Diagnostics.__doc__ = """Solver diagnostics (scalar Tensors).

Field names follow `tfp.math.ode.Diagnostics` where they overlap.

Attributes:
  num_ode_fn_evaluations: int32, calls of `ode_fn` in the forward solve.
  num_jacobian_evaluations: int32, always 0 (explicit methods).
  num_matrix_factorizations: int32, always 0 (explicit methods).
  num_accepted_steps: int32.
  num_rejected_steps: int32 (always 0 for fixed-step methods).
  status: int32 `Status` code; 0 means success.
  final_time: the time the solver reached (the last solution time on success).
"""

Results = collections.namedtuple(
    'Results', ['times', 'states', 'diagnostics', 'solver_internal_state'])
Results.__doc__ = """What `solve` returns; same fields as `tfp.math.ode.Results`.

Attributes:
  times: `[T]` Tensor, the solution times.
  states: structure of `initial_state`; each leaf has shape `[T, *leaf.shape]`.
  diagnostics: `Diagnostics`.
  solver_internal_state: always `None` (no warm restarts).
"""


def as_float(value, dtype):
  """`value` as a Tensor of `dtype`, without rounding Python floats to float32.

  (`tf.cast(0.1, tf.float64)` first makes a float32 Tensor, then widens it.)
  """
  if tf.is_tensor(value):
    return tf.cast(value, dtype)
  return tf.convert_to_tensor(value, dtype=dtype)
