"""K FFJORD blocks as the K segments of one solve.

Segment `k` of a segmented solve runs block `k`'s dynamics on its own stretch
`[t0 + k T, t0 + (k + 1) T]` of one time axis, so one solver loop (traced and
compiled once) solves all the blocks. `StackedFFJORD` solves its blocks this
way; `solve_run` does it for a run of consecutive `FFJORD` blocks of a
`tfb.Chain` (`tfp_ffjord.fusion`).
"""

from typing import Dict

import tensorflow as tf

from tfp_ffjord import dynamics as dynamics_lib
from tfp_ffjord import flow_base
from tfp_ffjord import fusion
from tfp_ffjord import ode
from tfp_ffjord import trace as trace_lib

__all__ = ['Blocks', 'segment_diagnostics', 'segment_dynamics',
           'segment_ends', 'solve_run']


# Keyword arguments carrying `Blocks.stacked_weights` through a solve.
_WEIGHT_PREFIX = '_stacked_block_weight_'


class Blocks(tf.Module):
  """The dynamics of a `StackedFFJORD`, tracked as one module."""

  def __init__(self, fns):
    super().__init__(name='blocks')
    self.fns = list(fns)
    # Built dynamics of one architecture share one traced computation.
    self._stacked_call = dynamics_lib.stacked_call(self.fns)

  @property
  def stacked(self) -> bool:
    """Whether the blocks share one architecture (one traced copy)."""
    return self._stacked_call is not None

  def stacked_weights(self) -> Dict[str, tf.Tensor]:
    """The blocks' weights packed (`[K, P]`, one per dtype), as solver
    constants.

    Empty unless the blocks share one architecture. Passed to the solve as
    constants (and back here as keyword arguments), they make its gradient
    accumulate one `[K, P]` Tensor rather than every block's variables
    (fewer loop variables and ops: a shorter trace and compilation).
    """
    if self._stacked_call is None:
      return {}
    return {f'{_WEIGHT_PREFIX}{i:04d}': w
            for i, w in enumerate(self._stacked_call.stack())}

  def __call__(self, time, state, block, **kwargs):
    """Block `block`'s dynamics (`block` an int or an int32 Tensor)."""
    keys = sorted(k for k in kwargs if k.startswith(_WEIGHT_PREFIX))
    weights = [kwargs.pop(k) for k in keys]
    if self._stacked_call is not None:
      # Blocks of one architecture: one copy of the dynamics in the graph.
      return self._stacked_call(block, time, state,
                                stacked_weights=weights or None, **kwargs)
    # Any dynamics: every block, the chosen one's output selected (K times
    # the work of an evaluation, still one solver loop).
    out = None
    for k, fn in enumerate(self.fns):
      f = fn(time, state, **kwargs)
      f = tf.where(tf.equal(block, k), f, tf.zeros_like(f))
      out = f if out is None else out + f
    return out


def segment_dynamics(blocks, num_blocks, initial_time, final_time, inverse,
                      dtype):
  """`dynamics(t, z, segment, **kwargs)` over the stacked time axis of
  `num_blocks` blocks (`blocks(t, z, k, **kwargs)` runs block `k`, in the
  order of the forward map).

  Segment `k` covers `[t0 + k T, t0 + (k + 1) T]` (`T = t1 - t0`) and runs
  block `k` forward, or block `K - 1 - k` backwards in time for the
  inverse, at its own local time.
  """
  t0 = ode.base.as_float(initial_time, dtype)
  t1 = ode.base.as_float(final_time, dtype)
  span = t1 - t0
  last = num_blocks - 1

  def dynamics(t, z, segment, **kwargs):
    local = t - tf.cast(segment, dtype) * span
    if inverse:
      return -blocks(t0 + t1 - local, z, last - segment, **kwargs)
    return blocks(local, z, segment, **kwargs)
  return dynamics


def segment_ends(initial_time, final_time, num_blocks, dtype):
  """The ends of the segments of `num_blocks` blocks on the stacked axis."""
  t0 = ode.base.as_float(initial_time, dtype)
  span = ode.base.as_float(final_time, dtype) - t0
  return t0 + span * tf.range(1, num_blocks + 1, dtype=dtype)


def _stackable_blocks(fns, time, x, kwargs, build_order):
  """`Blocks(fns)` if the dynamics share one architecture, else None.

  Sonnet modules create their variables on their first call: modules
  without any are called once (on `x`) to build them first, in
  `build_order` (the order a chain would have called them, so a global
  seed gives the same initial weights).
  """
  blocks = Blocks(fns)
  if blocks.stacked:
    return blocks
  unbuilt = [fn for fn in build_order if isinstance(fn, tf.Module)
             and not dynamics_lib.variable_paths(fn)]
  if not unbuilt:
    return None
  for fn in unbuilt:   # in the order the blocks are applied
    fn(time, x, **kwargs)
  blocks = Blocks(fns)
  return blocks if blocks.stacked else None


def solve_run(run, x):
  """Solves a `fusion.Run` as one segmented solve.

  Returns the first block's `(output, log_det, diagnostics)` and hands
  every other block its own (`fusion.hand_over`), or returns None when the
  blocks' dynamics cannot share one traced computation (then each block
  solves alone).
  """
  lead = run.blocks[0]
  inverse = run.direction == 'inverse'
  x = tf.convert_to_tensor(x, lead.dtype)
  kwargs = {k: v for k, v in run.kwargs[0].items() if k != 'seed'}
  seeds = [kw.get('seed') for kw in run.kwargs]
  if any(s is not None for s in seeds) and not lead._trace_takes_seed:  # pylint: disable=protected-access
    return None   # solved alone, each block raises the usual error
  # The blocks in the order of the forward map.
  forward_order = run.blocks[::-1] if inverse else run.blocks
  t0 = ode.base.as_float(lead.initial_time, x.dtype)
  blocks = _stackable_blocks(
      [b.state_time_derivative_fn for b in forward_order], t0, x, kwargs,
      build_order=[b.state_time_derivative_fn for b in run.blocks])
  if blocks is None:
    return None
  num = len(run.blocks)
  dynamics = segment_dynamics(blocks, num, lead.initial_time,
                               lead.final_time, inverse, x.dtype)
  ends = segment_ends(lead.initial_time, lead.final_time, num, x.dtype)
  segment_seeds = [
      None if s is None else trace_lib.stateless_seed(s, salt=b._seed_salt)  # pylint: disable=protected-access
      for s, b in zip(seeds, run.blocks)]
  solve_kwargs = dict(kwargs, **blocks.stacked_weights())
  results = flow_base.solve_augmented(
      lead, dynamics, x, solve_kwargs, ends,
      dict(segmented=True, segment_seeds=segment_seeds,
           log_det_per_segment=True))
  values, log_dets = results.states[:2]
  diagnostics = segment_diagnostics(getattr(results, 'diagnostics', None),
                                     num)
  handed = []
  previous = tf.zeros_like(log_dets[0])
  for k in range(num):
    # The log-det carries over from segment to segment: each block's own
    # is the difference.
    handed.append((values[k], log_dets[k] - previous, diagnostics[k]))
    previous = log_dets[k]
  inputs = [x] + [value for value, _, _ in handed[:-1]]
  for block, block_input, block_kwargs, result in zip(
      run.blocks[1:], inputs[1:], run.kwargs[1:], handed[1:]):
    fusion.hand_over(block, run.direction, block_input, block_kwargs, result)
  return handed[0]


def segment_diagnostics(diagnostics, num):
  """Per-segment `Diagnostics` of a segmented solve (None if it gave none).

  Counts come from `Diagnostics.segment_counts` where the solver reports
  them; status and final time are the whole solve's.
  """
  if diagnostics is None:
    return [None] * num
  counts = getattr(diagnostics, 'segment_counts', None)
  if counts is None:
    return [diagnostics] * num
  zero = tf.constant(0, tf.int32)
  return [ode.base.Diagnostics(
      num_ode_fn_evaluations=counts[k, 0], num_jacobian_evaluations=zero,
      num_matrix_factorizations=zero, num_accepted_steps=counts[k, 1],
      num_rejected_steps=counts[k, 2], status=diagnostics.status,
      final_time=diagnostics.final_time) for k in range(num)]
