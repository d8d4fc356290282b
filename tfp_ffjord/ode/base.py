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

from tfp_ffjord import _autograph

__all__ = [
    'Diagnostics',
    'Results',
    'SolverError',
    'Status',
    'status_message',
]

_autograph.skip_package()


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
  """The text of a `Status` code.

  Args:
    status: a `Status` code (an int or a scalar Tensor read eagerly).

  Returns:
    The message, or 'unknown status N'.

  Examples:
    >>> status_message(Status.SUCCEEDED)
    'succeeded'
  """
  status = int(status)
  if 0 <= status < len(Status.MESSAGES):
    return Status.MESSAGES[status]
  return f'unknown status {status}'


def max_num_steps_hint(solver_class: str, max_num_steps, recorded: bool):
  """What to do about MAX_NUM_STEPS_EXCEEDED, for error messages."""
  if max_num_steps is None and recorded:
    return (f'backprop gradients under XLA record at most '
            f'{XLA_BACKPROP_MAX_NUM_STEPS} steps; pass a larger '
            f'`max_num_steps` to {solver_class}(...)')
  return (f'pass a larger `max_num_steps` to {solver_class}(...) if the '
          'solve needs more steps')


class SolverError(tf.errors.InvalidArgumentError):
  """A solve failed: which solver, why, where.

  Raised with `raise_on_failure=True` in eager mode and by
  `checked_function` (also under XLA); a subclass of the `tf.errors.InvalidArgumentError` that plain
  `tf.function` and TF1 sessions raise for the same failure.

  Attributes:
    solver: the solver's name (e.g. 'Tsit5').
    status: the `Status` code.
    time_reached: the time the solve reached (float).
    num_steps: step attempts made (int).
    max_num_steps: the solver's bound (None: unbounded).
    stage: None for the solve itself, 'adjoint backward solve' for the
      adjoint's backward solve.
    hint: what to change, or ''.
  """

  def __init__(self, solver: str, status: int, time_reached: float,
               num_steps: int, max_num_steps=None, stage=None, hint=''):
    self.solver = solver
    self.status = int(status)
    self.time_reached = float(time_reached)
    self.num_steps = int(num_steps)
    self.max_num_steps = max_num_steps
    self.stage = stage
    self.hint = hint
    super().__init__(None, None, self.summary)

  @property
  def reason(self) -> str:
    """Why the solve stopped, in words (`status_message(status)`)."""
    return status_message(self.status)

  @property
  def summary(self) -> str:
    """One line: solver, stage, reason, time reached, steps, hint."""
    where = '' if self.stage is None else f' in the {self.stage}'
    hint = f': {self.hint}' if self.hint else ''
    return (f'{self.solver} failed{where}: {self.reason}; time reached '
            f'{self.time_reached:g} after {self.num_steps} step attempts '
            f'(max_num_steps={self.max_num_steps}{hint}).')

  def __reduce__(self):
    return (SolverError, (self.solver, self.status, self.time_reached,
                          self.num_steps, self.max_num_steps, self.stage,
                          self.hint))


Diagnostics = collections.namedtuple(
    'Diagnostics', [
        'num_ode_fn_evaluations',
        'num_jacobian_evaluations',
        'num_matrix_factorizations',
        'num_accepted_steps',
        'num_rejected_steps',
        'status',
        'final_time',
        'segment_counts',
    ], defaults=(None,))
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
  segment_counts: for a segmented solve (`solve(..., segmented=True)`), an
    int32 `[T, 3]` Tensor: each segment's evaluations, accepted and rejected
    steps (what separate solves would report); otherwise None.
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
