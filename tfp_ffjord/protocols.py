"""What our callables accept beyond TFP's contracts, declared, not guessed.

TFP's `ode_solve_fn` and `trace_augmentation_fn` contracts say nothing of
error control, per-call seeds or RNODE's regularisers. `FFJORD` uses those
extras only when the callable *declares* them with `accepts`:

* `'error_components'` (an `ode_solve_fn`): `solve(...,
  error_components=k)` keeps only the first `k` state leaves in the error
  norm. Declared by every `tfp_ffjord.ode` solver's `solve`; with it,
  `regularize=True` leaves the regulariser states out of the step-size
  control.
* `'segmented'` (an `ode_solve_fn`): `solve(..., segmented=True)` treats
  each solution time as the end of a segment with its own dynamics,
  `ode_fn(t, y, segment=k, **constants)`, restarting at each one, in one
  loop. Declared by every `tfp_ffjord.ode` solver's `solve`; with it,
  `StackedFFJORD` solves all its blocks in one loop (otherwise one solve
  per block).
* `'segment_relative'` (an `ode_solve_fn`): with `segmented=True`,
  `solve(..., segment_relative=[i, ...])` measures those state leaves'
  error from their value at each segment's start. Declared by every
  `tfp_ffjord.ode` solver; with it, FFJORD blocks fused in a `tfb.Chain`
  take the steps they would take solved one by one.
* `'seed'` (a `trace_augmentation_fn`): takes a stateless `seed` keyword,
  so that `forward(x, seed=s)` draws reproducible probes.
* `'segment_seeds'` (a `trace_augmentation_fn`): takes
  `segment_seeds=[s_0, ..., s_{K-1}]` (stateless seeds or `None`, a fresh
  draw) for a segmented solve and gives segment `k` what a solve of that
  block alone with seed `s_k` would get (its own probes, selected by the
  `segment` keyword the solver passes); deterministic estimators ignore it.
  With it, FFJORD blocks of a `tfb.Chain` can share one solve
  (`tfp_ffjord.fusion`).
* `'regularize'` (a `trace_augmentation_fn`): with `regularize=True` the
  augmented function takes and returns the 4-tuple `(state, log_det,
  kinetic, frobenius)`.

A declaration survives `functools.partial` (unless the partial fixes that
keyword itself) and bound methods; anything else (a lambda around a
solver, TFP's own functions) declares nothing and gets TFP's contract.
Declare your own callable with `tfp_ffjord.protocols.accepts('seed')(fn)`.
"""

import functools

__all__ = ['ERROR_COMPONENTS', 'SEGMENTED', 'SEGMENT_RELATIVE', 'SEED',
           'SEGMENT_SEEDS', 'REGULARIZE', 'accepts', 'declares']

ERROR_COMPONENTS = 'error_components'
SEGMENTED = 'segmented'
SEGMENT_RELATIVE = 'segment_relative'
SEED = 'seed'
SEGMENT_SEEDS = 'segment_seeds'
REGULARIZE = 'regularize'
_KNOWN = (ERROR_COMPONENTS, SEGMENTED, SEGMENT_RELATIVE, SEED, SEGMENT_SEEDS,
          REGULARIZE)
_ATTRIBUTE = '_tfp_ffjord_accepts'


def accepts(*capabilities):
  """Decorator declaring the keywords a callable accepts (see module doc)."""
  unknown = [c for c in capabilities if c not in _KNOWN]
  if unknown:
    raise ValueError(f'Unknown capabilities {unknown}; expected some of '
                     f'{", ".join(_KNOWN)}.')

  def declare(fn):
    setattr(fn, _ATTRIBUTE,
            frozenset(getattr(fn, _ATTRIBUTE, ())) | frozenset(capabilities))
    return fn
  return declare


def declares(fn, capability: str) -> bool:
  """Whether `fn` declares `capability` (seen through `functools.partial`
  and bound methods; False if a partial already fixes that keyword)."""
  while isinstance(fn, functools.partial):
    if capability in fn.keywords:
      return False
    fn = fn.func
  return capability in getattr(fn, _ATTRIBUTE, ())
