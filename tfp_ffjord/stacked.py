"""`StackedFFJORD`: K FFJORD blocks as one bijector, solved in one loop."""

import tensorflow as tf

from tfp_ffjord import bijector as bijector_lib
from tfp_ffjord import flow_base
from tfp_ffjord import ode
from tfp_ffjord import protocols
from tfp_ffjord import segments
from tfp_ffjord import trace as trace_lib

__all__ = ['StackedFFJORD']


class StackedFFJORD(flow_base.FlowSettings, flow_base.CachedFlow):
  """K FFJORD blocks as one bijector, solved in one loop.

  `StackedFFJORD([f_0, ..., f_{K-1}], ...)` is the map of
  `tfb.Chain([FFJORD(f_{K-1}, ...), ..., FFJORD(f_0, ...)])`: the forward
  map runs `f_0` first, the inverse `f_{K-1}` first, each block from
  `initial_time` to `final_time` with the same solver and trace. Same
  values, same log-dets (up to rounding), same gradients.

  What differs is the cost of getting there. With a solver that declares
  `'segmented'` (every `tfp_ffjord.ode` solver) the K blocks are the K
  segments of one solve: one `tf.while_loop` that restarts at each block
  boundary (fresh derivative and step size). Blocks of one architecture run
  through `tfp_ffjord.dynamics.stacked_call` (their weights gathered by
  segment); other dynamics are all evaluated and the segment's selected.
  The solver, its gradient and the trace are traced and compiled once
  instead of K times, which is most of a training step's first-call
  latency. The log-det carries over from block to block (a chain restarts
  it at zero), so an adaptive solver's error scale for it grows along the
  blocks and it may take fewer steps than the chain. With any other solver
  (e.g. `tfp.math.ode.DormandPrince().solve`) the blocks are solved one
  after another, as by the chain.

  Hutchinson's estimator draws one probe per call for all the blocks (the
  chain draws one per block); each block's estimate is unbiased either way.

  Args:
    state_time_derivative_fns: a non-empty list of dynamics
      `f(time, state, **kwargs)`, in the order of the forward map (Sonnet
      modules: their variables are tracked).
    ode_solve_fn: the solver, as for `FFJORD`, shared by every block.
    trace_augmentation_fn: the trace estimator, as for `FFJORD`, shared by
      every block.
    initial_time: the time of `x`, as for `FFJORD`, shared by every block.
    final_time: the time of `y`, as for `FFJORD`, shared by every block.
    validate_args: as for `FFJORD`, shared by every block.
    dtype: the dtype of `x` and `y`, as for `FFJORD`, shared by every
      block.
    name: the bijector's name, as for `FFJORD`.
    seed_salt: the salt of per-call seeds, as for `FFJORD`.

  Attributes:
    blocks: one `FFJORD` per dynamics (same solver, trace, times and seed
      salt), for per-block work such as `trajectory`; the stacked bijector
      is composed from them and their dynamics (`segments.Blocks`).
  """

  def __init__(self,
               state_time_derivative_fns,
               ode_solve_fn=None,
               trace_augmentation_fn=trace_lib.trace_jacobian_hutchinson,
               initial_time=0.,
               final_time=1.,
               validate_args=False,
               dtype=tf.float32,
               name='stacked_ffjord',
               seed_salt=None):
    parameters = dict(locals())
    fns = list(state_time_derivative_fns) if isinstance(
        state_time_derivative_fns, (list, tuple)) else None
    if not fns:
      raise ValueError(
          '`state_time_derivative_fns` must be a non-empty list of dynamics; '
          f'got {state_time_derivative_fns!r}.')
    for i, fn in enumerate(fns):
      if not callable(fn):
        raise TypeError(
            f'`state_time_derivative_fns[{i}]` must be callable; got {fn!r}.')
    with tf.name_scope(name) as name:
      self._configure(ode_solve_fn, trace_augmentation_fn, initial_time,
                      final_time, seed_salt)
      self._fns = fns
      # The blocks' dynamics as one module: its variables are tracked, and
      # blocks of one architecture share one traced computation.
      self._dynamics = segments.Blocks(fns)
      super().__init__(forward_min_event_ndims=0, dtype=dtype,
                       validate_args=validate_args, parameters=parameters,
                       name=name)
    self.blocks = [
        bijector_lib.FFJORD(
            fn, ode_solve_fn=self._ode_solve_fn,
            trace_augmentation_fn=trace_augmentation_fn,
            initial_time=initial_time, final_time=final_time,
            validate_args=validate_args, dtype=dtype,
            name=f'{self.name}_block{i}', seed_salt=self._seed_salt)
        for i, fn in enumerate(fns)]

  @property
  def state_time_derivative_fns(self):
    """The K dynamics, in the order of the forward map."""
    return list(self._fns)

  @property
  def segmented(self) -> bool:
    """Whether the blocks are solved in one loop (the solver declares
    `'segmented'`)."""
    return protocols.declares(self._ode_solve_fn, protocols.SEGMENTED)

  def _stacked_solve(self, x, kwargs, regularize, inverse):
    if self.segmented:
      x = tf.convert_to_tensor(x, self.dtype)
      num = len(self._fns)
      ends = segments.segment_ends(self._initial_time, self._final_time, num,
                                   x.dtype)
      kwargs = dict(kwargs, **self._dynamics.stacked_weights())
      dynamics = segments.segment_dynamics(
          self._dynamics, num, self._initial_time, self._final_time, inverse,
          x.dtype)
      results = flow_base.solve_augmented(
          self, dynamics, x, kwargs, ends,
          dict(regularize=regularize, segmented=True))
      finals = tf.nest.map_structure(lambda s: s[-1], results.states)
      return flow_base.flow_result(finals,
                                   getattr(results, 'diagnostics', None))
    # One solve per block: the blocks' own solves, in the map's order.
    solves = ([b.solve_inverse for b in reversed(self.blocks)] if inverse
              else [b.solve_forward for b in self.blocks])
    value, sums, diagnostics = x, None, []
    for solve in solves:
      result = solve(value, regularize=regularize, **kwargs)
      value = result.value
      parts = [result.log_det_jacobian, result.kinetic_energy,
               result.jacobian_frobenius]
      sums = parts if sums is None else [
          None if a is None else a + b for a, b in zip(sums, parts)]
      diagnostics.append(result.diagnostics)
    return flow_base.FlowResult(value, sums[0],
                                flow_base.sum_diagnostics(diagnostics),
                                *sums[1:])

  def solve_forward(self, x, regularize=False, **kwargs):
    """As `FFJORD.solve_forward`, through every block (see the class doc)."""
    self._check_input(x, 'x', 'solve_forward')
    return self._record(self._stacked_solve(x, dict(kwargs), regularize,
                                            inverse=False))

  def solve_inverse(self, y, regularize=False, **kwargs):
    """As `FFJORD.solve_inverse`, through every block in reverse."""
    self._check_input(y, 'y', 'solve_inverse')
    return self._record(self._stacked_solve(y, dict(kwargs), regularize,
                                            inverse=True))

  def trajectory(self, x, times=None, num_times=10, **kwargs):
    """The path of `x` through every block: `FFJORD.trajectory` per block.

    `times` / `num_times` are per block (block-local times). Returns
    `(times, states, log_det_jacobians)` with `1 + K (num_times - 1)`
    entries when the block times start at `initial_time` (the shared
    boundary points once), times on the stacked axis
    `[t0, t0 + K (t1 - t0)]` and log-dets accumulated from the start.
    """
    self._check_input(x, 'x', 'trajectory')
    x = tf.convert_to_tensor(x, self.dtype)
    span = (ode.base.as_float(self._final_time, x.dtype)
            - ode.base.as_float(self._initial_time, x.dtype))
    all_times, all_states, all_log_dets = [], [], []
    log_det = tf.zeros_like(x)
    for k, block in enumerate(self.blocks):
      t, states, log_dets = block.trajectory(x, times, num_times, **kwargs)
      skip = 1 if k else 0
      all_times.append(t[skip:] + tf.cast(k, x.dtype) * span)
      all_states.append(states[skip:])
      all_log_dets.append(log_dets[skip:] + log_det)
      x, log_det = states[-1], log_dets[-1] + log_det
    return (tf.concat(all_times, 0), tf.concat(all_states, 0),
            tf.concat(all_log_dets, 0))

  def _augmented_forward(self, x, **kwargs):
    y, fldj = self.solve_forward(x, **kwargs)[:2]
    return y, {'fldj': fldj, 'ildj': -fldj}

  def _augmented_inverse(self, y, **kwargs):
    x, ildj = self.solve_inverse(y, **kwargs)[:2]
    return x, {'ildj': ildj, 'fldj': -ildj}
