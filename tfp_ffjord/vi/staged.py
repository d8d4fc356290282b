"""Staged surrogates: a cheap surrogate fitted first, then FFJORD blocks
trained on top of it.

An FFJORD step costs tens of times a Gaussian's or an IAF's, so fitting
the whole flow from scratch spends most of a time budget learning what a
cheap family learns in a few seconds (locations, scales, correlations).
Here the cheap family comes first: `base` maps standard normal noise to
the target's space; the FFJORD blocks act on that noise (where the base
has already whitened the target), zero-initialised, so the full surrogate
starts as exactly the fitted base and only has to learn what the base
cannot express (a funnel's neck, a banana's bend).

    noise N(0, I) -> FFJORD blocks -> base flow (affine / IAF)
      -> the target's parts -> the target's constraints
"""

import math
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord.vi import fitting
from tfp_ffjord.vi import laplace as laplace_lib
from tfp_ffjord.vi import surrogates

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ['StagedSurrogate', 'STAGED_BASES',
           'build_laplace_surrogate_posterior',
           'build_staged_ffjord_surrogate_posterior', 'fit_staged']

# The cheap families a staged surrogate can start from.
STAGED_BASES = ('full-covariance', 'mean-field', 'iaf')


class StagedSurrogate(NamedTuple):
  """A cheap surrogate and the FFJORD surrogate built on it.

  Attributes:
    base: the cheap surrogate alone (stage 1); its variables are shared.
    full: the same bijectors with the FFJORD blocks on the noise (stage 2,
      the surrogate to use once fitted).
  """
  base: tfd.TransformedDistribution
  full: tfd.TransformedDistribution


def _tril_affine(dim, dtype, name):
  """Trainable `x -> loc + L x` (L lower triangular, positive diagonal),
  the identity at the start."""
  loc = tf.Variable(tf.zeros([dim], dtype), name=f'{name}_loc')
  scale_tril = tfp.util.TransformedVariable(
      tf.eye(dim, dtype=dtype),
      tfb.FillScaleTriL(diag_shift=tf.constant(1e-5, dtype)),
      name=f'{name}_scale_tril')
  return [tfb.Shift(loc), tfb.ScaleMatvecTriL(scale_tril)]


def build_staged_ffjord_surrogate_posterior(
    event_shape, bijector=None, dtype=tf.float32, *,
    base: str = 'full-covariance', blocks: int = 2,
    hidden: Sequence[int] = (32, 32), activation: str = 'tanh',
    ode_solve_fn=None, trace: Optional[str] = None, seed=None,
    name: str = 'staged_ffjord_surrogate') -> StagedSurrogate:
  """A cheap surrogate and FFJORD blocks on its noise, to fit in stages.

  Arguments follow `tfp.experimental.vi.build_affine_surrogate_posterior`
  and `build_ffjord_surrogate_posterior`; fit the result with `fit_staged`.

  Args:
    event_shape: a shape, or a structure of shapes.
    bijector: the target's constraining bijector (a bijector, a structure
      of them like `event_shape`, or None).
    dtype: a dtype, or a structure of them.
    base: the cheap family, one of `STAGED_BASES`: 'full-covariance' (an
      affine map with a lower-triangular scale), 'mean-field' (a diagonal
      one) or 'iaf' (two inverse autoregressive blocks, then a diagonal
      affine map). Default: 'full-covariance'.
    blocks: FFJORD blocks (zero-initialised last layers). Default: 2.
    hidden: hidden sizes of the FFJORD (and IAF) networks.
    activation: the FFJORD networks' activation (`registry.ACTIVATIONS`).
    ode_solve_fn: the FFJORD solver; default `ode.DormandPrince(
      gradient='backprop')`.
    trace: 'exact' or 'hutchinson'; default: exact up to
      `EXACT_TRACE_MAX_DIM` coordinates.
    seed: an int (or stateless seed) for the FFJORD networks' initial
      weights; None uses the global random state.
    name: the surrogates' name (the base's gets '_base').

  Returns:
    A `StagedSurrogate`: `base` and `full` share the base's variables, and
    `full` equals `base` as a distribution until its FFJORD weights move.

  Raises:
    ValueError: for an unknown `base`, or a bad FFJORD argument.
  """
  if base not in STAGED_BASES:
    raise ValueError(f'`base` must be one of {", ".join(STAGED_BASES)}; got '
                     f'{base!r}.')
  constrain = surrogates._constraining(bijector)  # pylint: disable=protected-access
  flat_dtype = surrogates._flat_dtype(dtype)  # pylint: disable=protected-access
  dim = surrogates.unconstrained_size(event_shape, constrain, dtype)
  if base == 'full-covariance':
    base_flow = _tril_affine(dim, flat_dtype, name)
  else:
    base_flow = surrogates._trainable_affine(dim, flat_dtype, name)  # pylint: disable=protected-access
    if base == 'iaf':
      base_flow += surrogates._iaf_flow(dim, flat_dtype, hidden, name, seed)  # pylint: disable=protected-access
  ffjord = surrogates._ffjord_flow(dim, flat_dtype, name, dict(  # pylint: disable=protected-access
      blocks=blocks, hidden=hidden, activation=activation,
      ode_solve_fn=ode_solve_fn, trace=trace, seed=seed))
  build = surrogates._over_standard_normal  # pylint: disable=protected-access
  staged = StagedSurrogate(
      build(event_shape, constrain, dtype, dim, flat_dtype, base_flow, False,
            f'{name}_base'),
      build(event_shape, constrain, dtype, dim, flat_dtype,
            base_flow + [ffjord], False, name))
  if base == 'iaf':
    staged.base.sample(1, seed=(0, 0))   # builds the Keras layers' variables
  return staged


def build_laplace_surrogate_posterior(event_shape, bijector=None,
                                      dtype=tf.float32, *,
                                      name: str = 'laplace_surrogate'
                                      ) -> StagedSurrogate:
  """A full-covariance Gaussian that `fit_staged` starts at the target's
  Laplace approximation, then fits by Adam: `StagedSurrogate(q, q)` (the
  same surrogate in both phases; no FFJORD). The baseline that shows what
  the FFJORD blocks of a 'full-covariance' staged surrogate add.

  Args:
    event_shape: a shape, or a structure of shapes.
    bijector: the target's constraining bijector (or a structure of them,
      or None).
    dtype: a dtype, or a structure of them.
    name: the surrogate's name.

  Returns:
    A `StagedSurrogate` whose `base` and `full` are the same Gaussian.
  """
  constrain = surrogates._constraining(bijector)  # pylint: disable=protected-access
  flat_dtype = surrogates._flat_dtype(dtype)  # pylint: disable=protected-access
  dim = surrogates.unconstrained_size(event_shape, constrain, dtype)
  q = surrogates._over_standard_normal(  # pylint: disable=protected-access
      event_shape, constrain, dtype, dim, flat_dtype,
      _tril_affine(dim, flat_dtype, name), False, name)
  return StagedSurrogate(q, q)


def fit_staged(staged: StagedSurrogate, target_log_prob_fn,
               num_steps: int = 1000, *, base_fraction: float = 0.25,
               max_seconds: Optional[float] = None,
               stopped_surrogate: Optional[StagedSurrogate] = None,
               seed: int = 0, fine_tune_learning_rate: Optional[float] = None,
               **fit_kwargs) -> fitting.FitResult:
  """Fits `staged.base`, then `staged.full`, within one budget.

  Stage 1 runs `fit` on the base alone for `base_fraction` of the budget
  (of `num_steps` and of `max_seconds`); stage 2 runs `fit` on the full
  surrogate (all its variables, the base's included) for the rest of it.
  Stage 1's steps cost no ODE solve. A Gaussian base ('full-covariance' or
  'mean-field') first tries the target's Laplace approximation
  (`laplace_initialize`: L-BFGS to the mode, the inverse Hessian as the
  covariance), kept if it raises the ELBO; its time counts in stage 1's.
  If stage 2 ends with a lower ELBO estimate than stage 1 did (1,024 draws,
  the same at both ends: `FitResult.stage_elbos`), the variables go back to
  stage 1's end, so the FFJORD stage never leaves the fitted base worse.

  Args:
    staged: a `StagedSurrogate`.
    target_log_prob_fn: the target's unnormalised log density.
    num_steps: the most optimizer steps of both stages together.
    base_fraction: the share of the budget for stage 1, in (0, 1).
    max_seconds: the wall-time budget of both stages (compilation
      included), or None.
    stopped_surrogate: for `estimator='stl'`, a second `StagedSurrogate`
      built alike.
    seed: int seed; stage 2 draws from `seed + 1`.
    fine_tune_learning_rate: stage 2's Adam learning rate; default: a tenth
      of `learning_rate` (stage 2 starts a fresh Adam, whose first steps
      move every variable, the fitted base's too, by about this much: at
      the full rate they undo much of stage 1).
    **fit_kwargs: more arguments of `fit` (learning rate, sample size,
      estimator, ...).

  Returns:
    A `FitResult` of both stages: the losses and times of stage 1, then
    those of stage 2 (its times offset by stage 1's), the total steps, and
    as `first_step_seconds` the first steps of both stages (each traces
    and compiles its own loop); its times include the Laplace
    approximation's, which `laplace` reports.

  Raises:
    ValueError: for a bad argument.
  """
  if not 0. < base_fraction < 1.:
    raise ValueError('`base_fraction` must be in (0, 1); got '
                     f'{base_fraction!r}.')
  if max_seconds is not None and not max_seconds > 0:
    raise ValueError(f'`max_seconds` must be positive or None; got '
                     f'{max_seconds!r}.')
  base_steps = max(1, min(num_steps - 1, math.ceil(base_fraction * num_steps)))
  stopped = stopped_surrogate or StagedSurrogate(None, None)
  laplace = None
  if laplace_lib.is_gaussian(staged.base):
    laplace = laplace_lib.laplace_initialize(staged.base, target_log_prob_fn,
                                             seed=seed)
  before = 0. if laplace is None else laplace.seconds
  first = fitting.fit(
      staged.base, target_log_prob_fn, base_steps, seed=seed,
      max_seconds=None if max_seconds is None else max(
          base_fraction * max_seconds - before, 1e-3),
      stopped_surrogate=stopped.base, **fit_kwargs)
  spent = before + float(first.seconds[-1])
  if fine_tune_learning_rate is None:
    fine_tune_learning_rate = fit_kwargs.get(
        'learning_rate', fitting.DEFAULT_LEARNING_RATE) / 10
  fit_kwargs = dict(fit_kwargs, learning_rate=fine_tune_learning_rate)
  # The end of stage 1 is kept, and restored if stage 2 ends worse: the
  # FFJORD stage cannot make the fitted base worse (beyond the checks'
  # noise; both use the same draws).
  check_start = time.perf_counter()
  kept = [tf.identity(v) for v in staged.full.trainable_variables]
  elbo_one = _elbo_estimate(staged.base, target_log_prob_fn, seed)
  spent += time.perf_counter() - check_start
  remaining = None if max_seconds is None else max(max_seconds - spent, 1e-3)
  second = fitting.fit(
      staged.full, target_log_prob_fn, max(num_steps - first.steps, 1),
      seed=seed + 1, max_seconds=remaining, stopped_surrogate=stopped.full,
      **fit_kwargs)
  check_start = time.perf_counter()
  elbo_two = _elbo_estimate(staged.full, target_log_prob_fn, seed)
  if not elbo_two >= elbo_one:   # NaN too
    for variable, value in zip(staged.full.trainable_variables, kept):
      variable.assign(value)
  seconds = spent + second.seconds
  seconds[-1] += time.perf_counter() - check_start
  return fitting.FitResult(
      np.concatenate([first.losses, second.losses]),
      np.concatenate([before + first.seconds, seconds]),
      first.steps + second.steps,
      first.first_step_seconds + second.first_step_seconds, laplace,
      (elbo_one, elbo_two))


# Draws of the ELBO estimates that decide between the two stages' ends.
STAGE_CHECK_SAMPLES = 1024


def _elbo_estimate(surrogate, target_log_prob_fn, seed):
  """`fitting.elbo_estimate` over `STAGE_CHECK_SAMPLES` draws of the
  stateless seed `(seed, 2**20)`: the same draws at both stages' ends."""
  return fitting.elbo_estimate(surrogate, target_log_prob_fn,
                               STAGE_CHECK_SAMPLES, (seed, 2 ** 20))
