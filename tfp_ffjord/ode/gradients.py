"""How a solve is differentiated: `Adjoint` or `Backprop`.

A solver holds one of these (`solver.gradient_method`; `gradient='adjoint'`
or `'backprop'` names them). The solve driver asks it whether the forward
loop must record its steps or the step proposed at each solution time, and
calls `gradients` with what the forward solve left (`Forward`).

Both return gradients with respect to the initial state, the floating
`constants`, and the trainable variables that the dynamics read; gradients
with respect to the times are not computed.
"""

from typing import Any, Callable, List, NamedTuple, Optional

import tensorflow as tf

from tfp_ffjord.ode import adjoint as adjoint_lib
from tfp_ffjord.ode import backprop as backprop_lib

__all__ = ['Adjoint', 'Backprop', 'Backward', 'Forward', 'GRADIENT_MODES',
           'gradient_method']

# How a solve is differentiated (`tfp_ffjord.registry.GRADIENT_MODES` holds
# their descriptions for the command line; a test checks the two agree).
GRADIENT_MODES = ('adjoint', 'backprop')


class Forward(NamedTuple):
  """What a forward solve leaves for its gradient.

  Attributes:
    solver: the solver that ran it.
    backward_solver: the solver of the adjoint's backward solve (None for
      backprop).
    g: the dynamics on flat lists, `g(s, y, c[, segment])`, on the
      increasing time axis `s`.
    tableau: the forward method.
    s0, ss: the start and the `[T]` solution times, on that axis.
    y0, c_flat: the initial state and the constants, flat lists.
    outputs: the `[T, ...]` states.
    steps: the recorded accepted steps (backprop, dense output), or None.
    end_steps: the step proposed on reaching each time, or None.
    max_iter: the forward loop's bound on step attempts.
    error_mask: one bool per state leaf: in the error norm or not.
    segmented: whether each solution time ended a segment.
    dense: whether the outputs are the accepted steps (`ChosenBySolver`).
  """
  solver: Any
  backward_solver: Any
  g: Callable
  tableau: Any
  s0: tf.Tensor
  ss: tf.Tensor
  y0: List[tf.Tensor]
  c_flat: List[tf.Tensor]
  outputs: List[tf.Tensor]
  steps: Optional[dict]
  end_steps: Optional[tf.Tensor]
  max_iter: Optional[int]
  error_mask: List[bool]
  segmented: bool
  dense: bool

  @property
  def unroll_stages(self) -> bool:
    return self.solver.unroll_stages


class Backward(NamedTuple):
  """The adjoint's backward solve: its method, step-size controller, bound
  on step attempts (all segments together) and stage loop setting."""
  tableau: Any
  controller: Any
  max_iter: Any
  unroll_stages: bool


class Backprop:
  """The exact derivative of the discrete solution.

  Discretise, then optimise: the forward loop records the start state, time and size of
  every accepted step (memory `max_num_steps` x state); the backward pass
  re-runs one step at a time and applies its vector-Jacobian product. Step
  sizes are treated as constants."""
  name = 'backprop'
  records_steps = True

  def __repr__(self):
    return 'Backprop()'

  def backward_solver(self, solver):
    """None: there is no backward solve."""
    del solver
    return None

  def wants_end_steps(self, controller, dense) -> bool:
    """False: no step proposals are kept for a backward solve."""
    del controller, dense
    return False

  def gradients(self, forward: Forward, variables, dys):
    """`(dy0, dc, dv)`."""
    return backprop_lib.backprop_gradients(forward, variables, dys)


class Adjoint:
  """The continuous adjoint method (Chen et al., 2018).

  The backward pass solves the adjoint ODE from the last solution time back to the initial
  time, with the solver `make_solver_fn()` returns (default: the forward
  solver); memory does not grow with the number of steps. Each backward
  segment starts with the step the forward solve proposed on reaching its
  solution time (no probe), and every adjoint state, the parameters' and
  `constants`' included, is in the error norm. All segments run in one
  loop, whose state is one flat vector when the shapes are static;
  `max_num_steps` bounds each segment.

  Args:
    make_solver_fn: a callable returning the backward solve's solver, or
      None for the forward solver.

  Raises:
    TypeError: if `make_solver_fn` is neither None nor callable.
  """
  name = 'adjoint'
  records_steps = False

  def __init__(self, make_solver_fn: Optional[Callable] = None):
    if make_solver_fn is not None and not callable(make_solver_fn):
      raise TypeError('`make_adjoint_solver_fn` must be None or a callable '
                      f'that returns a solver; got {make_solver_fn!r}.')
    self.make_solver_fn = make_solver_fn

  def __repr__(self):
    return f'Adjoint(make_solver_fn={self.make_solver_fn!r})'

  def backward_solver(self, solver):
    """The solver of the backward solve: `make_solver_fn()`, or `solver`."""
    if self.make_solver_fn is None:
      return solver
    backward = self.make_solver_fn()
    if not hasattr(backward, 'controller') or not hasattr(backward,
                                                          'tableau'):
      raise TypeError(
          f'{solver.name}: `make_adjoint_solver_fn` must return a '
          'tfp_ffjord.ode solver (e.g. `lambda: tfp_ffjord.ode.Tsit5('
          f'rtol=1e-5)`); got {backward!r}.')
    return backward

  def wants_end_steps(self, controller, dense) -> bool:
    """Adaptive backward segments start from the step the forward proposed
    at each solution time."""
    return controller.adaptive and not dense

  def gradients(self, forward: Forward, variables, dys):
    """`(dy0, dc, dv)`, NaN (and raising) if the backward solve fails."""
    solver, backward = forward.solver, forward.backward_solver
    ss, s0 = forward.ss, forward.s0
    # The bound of a solve over one segment, for each segment: the loop over
    # all of them may take that many times the number of segments.
    bound = backward.step_bound(-ss[-1], -s0[tf.newaxis])
    loop_bound = bound
    if bound is not None:
      num_t = ss.shape[0]
      loop_bound = bound * (num_t if num_t is not None else tf.shape(ss)[0])
    controller = backward.controller
    first_steps = forward.steps['h'] if forward.dense else forward.end_steps
    if controller.owns_first_step and not forward.dense:
      first_steps = None   # the backward solver's own first step wins
    controller = controller.for_backward(ss[-1] - s0, forward.segmented)
    dy0, dc, dv, status, u_reached, num_steps = (
        adjoint_lib.adjoint_gradients(
            forward, Backward(backward.tableau, controller, loop_bound,
                              backward.unroll_stages),
            variables, dys, first_steps))
    grads = solver.checked(list(dy0) + list(dc) + list(dv), status,
                           -u_reached, num_steps, bound,
                           stage='adjoint backward solve')
    n, nc = len(dy0), len(dc)
    return grads[:n], grads[n:n + nc], grads[n + nc:]


def gradient_method(gradient, make_adjoint_solver_fn=None):
  """The `Adjoint` or `Backprop` that `gradient` names (or is).

  Raises:
    ValueError: for another name, or `make_adjoint_solver_fn` without the
      adjoint.
    TypeError: for a `make_adjoint_solver_fn` that is not callable.
  """
  if isinstance(gradient, (Adjoint, Backprop)):
    method = gradient
  elif isinstance(gradient, str) and gradient in GRADIENT_MODES:
    method = Adjoint() if gradient == 'adjoint' else Backprop()
  else:
    raise ValueError(
        f'`gradient` must be one of {GRADIENT_MODES}; got {gradient!r}.')
  if make_adjoint_solver_fn is not None:
    if not isinstance(method, Adjoint):
      if not callable(make_adjoint_solver_fn):
        raise TypeError('`make_adjoint_solver_fn` must be None or a callable '
                        'that returns a solver; got '
                        f'{make_adjoint_solver_fn!r}.')
      raise ValueError(
          '`make_adjoint_solver_fn` sets the solver of the adjoint\'s '
          'backward solve, so it needs gradient=\'adjoint\'; got '
          f'gradient={method.name!r}.')
    if method.make_solver_fn is not None and (
        method.make_solver_fn is not make_adjoint_solver_fn):
      raise ValueError('`make_adjoint_solver_fn` and `gradient=Adjoint(...)` '
                       'both set the backward solver; pass one of them.')
    method = Adjoint(make_adjoint_solver_fn)
  return method
