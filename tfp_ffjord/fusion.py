"""Consecutive `FFJORD` blocks of a `tfb.Chain`, solved as one segmented solve.

TFP's `tfb.Chain` applies its bijectors one by one: a chain of K FFJORD
blocks is K solves, each traced and compiled on its own, and that is most of
a training step's first call. When a chain walk reaches the first of a *run*
of fusible blocks (below), that block solves the whole run as the K segments
of one solve (what `StackedFFJORD` does) and hands each following block the
result of its own segment; the chain then goes on as usual and every later
block of the run returns what it was handed, without solving. Nothing about
the chain changes: `tfb.Chain`, its caching and its kwargs routing are TFP's
own, and the user's code only swaps `tfb.FFJORD` for `tfp_ffjord.FFJORD`.

How a block learns that it is in a chain: TFP's `Chain` walks its bijectors
in `_walk_forward` / `_walk_inverse`, a loop whose frame holds the chain
(`self`), the bijector being applied (`bij`) and the per-name kwargs
(`kwargs`). A block that has to solve looks up the call stack for that
frame, read-only, and takes the run that starts with itself. If the frame
is not found (another caller, another TFP version) or anything about the
run is not as expected, the block solves alone, as before: fusion changes
the cost, never what is computed.

A run is a maximal sequence, in the walk's order, of blocks that can share
one loop: `FFJORD` instances (exactly that class) built with `fuse=True`,
of one dtype, `validate_args`, initial and final time, with equal solvers
(the same `solve` callable, or `tfp_ffjord.ode` solvers of equal settings)
that declare `'segmented'`, one trace function that declares
`'segment_seeds'` (both of ours; TFP's `tfb.ffjord.trace_jacobian_exact`
runs as ours), the same keyword arguments but
`seed` (each block keeps its own seed), and dynamics that
`tfp_ffjord.dynamics.stacked_call` can stack (one architecture). Any other
bijector (`ScaleMatvecLU`, `BatchNormalization`, `Invert(...)`, ...) or a
block that differs ends a run; a run of one block is solved alone.
"""

import numbers
import sys
import threading
from typing import List, NamedTuple, Optional

from tensorflow_probability.python.bijectors import chain as _tfp_chain

from tfp_ffjord import protocols

__all__ = ['Run', 'find_run', 'hand_over', 'take']

# The loops of TFP's `tfb.Chain` that apply its bijectors one by one.
_WALKS = {
    _tfp_chain._Chain._walk_forward.__code__: 'forward',   # pylint: disable=protected-access
    _tfp_chain._Chain._walk_inverse.__code__: 'inverse',   # pylint: disable=protected-access
}
# How far up the stack a chain's walk may be from the block's solve (the
# bijector methods, the cache and the walk's step function lie between).
_MAX_DEPTH = 40


class Run(NamedTuple):
  """Blocks to solve as one segmented solve, in the order they are applied.

  Attributes:
    blocks: the `FFJORD` blocks, first applied first (for an inverse walk,
      the last block of the forward map first).
    kwargs: each block's keyword arguments as the chain routes them.
    direction: `'forward'` or `'inverse'`.
  """
  blocks: List
  kwargs: List[dict]
  direction: str


def _walk_frame(block, direction):
  """The frame of the `tfb.Chain` walk that is applying `block`, or None."""
  frame = sys._getframe(2)   # pylint: disable=protected-access
  for _ in range(_MAX_DEPTH):
    if frame is None:
      return None
    walk = _WALKS.get(frame.f_code)
    if walk is not None:
      # The innermost walk: it must be applying this block, this way.
      local = frame.f_locals
      if walk != direction or local.get('bij') is not block:
        return None
      return local
    frame = frame.f_back
  return None


def find_run(block, direction: str, kwargs: dict) -> Optional[Run]:
  """The run of fusible blocks that starts with `block` in the chain walk
  that is applying it, or None (no walk, or no block to fuse with).

  Args:
    block: the `FFJORD` about to solve.
    direction: `'forward'` or `'inverse'`, the solve it is about to run.
    kwargs: the keyword arguments it was called with.
  """
  local = _walk_frame(block, direction)
  if local is None:
    return None
  chain, routed = local.get('self'), local.get('kwargs')
  bijectors = getattr(chain, '_bijectors', None)
  if not isinstance(bijectors, (list, tuple)) or not isinstance(routed, dict):
    return None
  order = list(bijectors) if direction == 'inverse' else list(
      reversed(bijectors))
  positions = [i for i, b in enumerate(order) if b is block]
  if len(positions) != 1:   # the same block twice: leave it alone
    return None
  start = positions[0]
  if not _same_kwargs(routed.get(block.name, {}), kwargs):
    return None
  blocks, run_kwargs = [block], [kwargs]
  for other in order[start + 1:]:
    other_kwargs = routed.get(getattr(other, 'name', None), {})
    if (any(other is b for b in blocks) or not compatible(block, other)
        or not _same_kwargs(kwargs, other_kwargs, ignore=('seed',))):
      break
    blocks.append(other)
    run_kwargs.append(other_kwargs)
  if len(blocks) < 2:
    return None
  return Run(blocks, run_kwargs, direction)


def _same_kwargs(a, b, ignore=()):
  """Whether two kwargs dicts hold the same keys and the same objects."""
  keys_a = set(a) - set(ignore)
  keys_b = set(b) - set(ignore)
  return keys_a == keys_b and all(a[k] is b[k] for k in keys_a)


def _solver_key(fn):
  """What makes two `ode_solve_fn`s equal: the callable itself, or for a
  `tfp_ffjord.ode` solver's bound `solve`, its class and settings."""
  owner = getattr(fn, '__self__', None)
  config = getattr(owner, 'settings_key', None)
  if callable(config) and getattr(fn, '__func__', None) is getattr(
      type(owner), 'solve', None):
    return (type(owner), config())
  return ('callable', id(fn))


def compatible(a, b) -> bool:
  """Whether two blocks may share one segmented solve (see module doc)."""
  if type(a) is not type(b) or not (a.fuse and b.fuse):
    return False
  # The trace functions the blocks run (TFP's exact trace runs as ours); one
  # declaring 'segment_seeds' gives each segment what its block would get
  # solved alone.
  trace_a = a._trace_augmentation_fn   # pylint: disable=protected-access
  trace_b = b._trace_augmentation_fn   # pylint: disable=protected-access
  same = (a.dtype == b.dtype and a.validate_args == b.validate_args
          and _same_time(a.initial_time, b.initial_time)
          and _same_time(a.final_time, b.final_time)
          and trace_a is trace_b
          and protocols.declares(trace_a, protocols.SEGMENT_SEEDS)
          and protocols.declares(a.ode_solve_fn, protocols.SEGMENTED)
          and _solver_key(a.ode_solve_fn) == _solver_key(b.ode_solve_fn))
  if not same:
    return False
  fa, fb = a.state_time_derivative_fn, b.state_time_derivative_fn
  return type(fa) is type(fb)


def _same_time(a, b):
  """The same time: one object, or equal Python or NumPy numbers (a
  Tensor or Variable only as itself: the fused solve uses the first
  block's, and a Variable's value may change)."""
  if a is b:
    return True
  return (isinstance(a, numbers.Real) and isinstance(b, numbers.Real)
          and float(a) == float(b))


# Results a fused solve handed to the later blocks of its run, waiting for
# the chain to apply them: per thread (tracing may run in several), keyed by
# the block and direction, holding the input they are for (compared by
# identity, as TFP's bijector cache does).
_pending = threading.local()


def _table():
  table = getattr(_pending, 'table', None)
  if table is None:
    table = _pending.table = {}
  return table


def hand_over(block, direction, x, kwargs, result):
  """Leaves `result` for `block`'s next solve of `x` with `kwargs`."""
  _table()[(id(block), direction)] = (block, x, dict(kwargs), result)


def take(block, direction, x, kwargs):
  """The result left for `block`'s solve of `x` with `kwargs`, or None.

  A result is taken once; one left for another input is dropped.
  """
  entry = _table().pop((id(block), direction), None)
  if entry is None:
    return None
  owner, expected_x, expected_kwargs, result = entry
  if owner is not block or expected_x is not x or not _same_kwargs(
      expected_kwargs, kwargs):
    return None
  return result
