"""Fitting a surrogate: the ELBO, `fit` (Adam in compiled chunks of steps)
and `evaluate` (the ELBO and moment errors against the target's ground
truth)."""

import collections
import math
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfp_ffjord import _checks
from tfp_ffjord import _lowering
from tfp_ffjord import ode
from tfp_ffjord import registry
from tfp_ffjord.training import steps as steps_lib
from tfp_ffjord.training.errors import TrainingError
from tfp_ffjord.vi.surrogates import _ffjord_kwargs  # pylint: disable=protected-access
from tfp_ffjord.vi.surrogates import target_log_prob_fn

FitResult = collections.namedtuple(
    'FitResult', ['losses', 'seconds', 'steps', 'first_step_seconds',
                  'laplace', 'stage_elbos'], defaults=[None, None])
FitResult.__doc__ = """What `fit` did.

Attributes:
  losses: `[steps]` negative ELBO estimates, one per step (before its
    update).
  seconds: `[steps]` wall time since `fit` started, at the end of the call
    that ran each step.
  steps: the number of optimizer steps taken.
  first_step_seconds: wall time of the first step (tracing and compiling).
  laplace: `fit_staged`'s `laplace.LaplaceResult` for a Gaussian base
    (None otherwise).
  stage_elbos: `fit_staged`'s ELBO estimates at the end of each stage,
    `(stage 1, stage 2)`; the variables are those of the better one.
"""


def elbo_loss(surrogate, target_log_prob_fn: Callable, sample_size: int,
              seed, stopped_surrogate=None):
  """The negative ELBO, `mean(log q(x) - log p~(x))` over draws `x ~ q`.

  Without `stopped_surrogate`: one `experimental_sample_and_log_prob` (one
  forward solve for an FFJORD surrogate). With it: sticking the landing,
  `log q` evaluated by `stopped_surrogate` (same family, variables equal to
  `surrogate`'s but not differentiated), so the gradient is only the path
  term, which vanishes when `q` equals the posterior.

  Args:
    surrogate: the surrogate posterior `q` (a TFP distribution).
    target_log_prob_fn: the unnormalised target log density `log p~`.
    sample_size: the number of reparameterised draws.
    seed: a stateless seed (shape `[2]`).
    stopped_surrogate: the sticking-the-landing copy, or None.

  Returns:
    The scalar loss.
  """
  seed = tf.convert_to_tensor(seed, tf.int32)
  if stopped_surrogate is None:
    x, log_q = surrogate.experimental_sample_and_log_prob(
        sample_size, seed=seed, **_ffjord_kwargs(surrogate, seed + 1))
  else:
    x = surrogate.sample(sample_size, seed=seed,
                         **_ffjord_kwargs(surrogate, seed + 1))
    log_q = stopped_surrogate.log_prob(
        x, **_ffjord_kwargs(stopped_surrogate, seed + 2))
  return tf.reduce_mean(log_q - target_log_prob_fn(x))


def elbo_estimate(surrogate, target_log_prob_fn: Callable, num_samples: int,
                  seed) -> float:
  """`-elbo_loss(...)` as a float, `-inf` where it is not finite: the
  estimate that decides whether a start or a stage is kept."""
  value = -float(elbo_loss(surrogate, target_log_prob_fn, num_samples, seed))
  return value if math.isfinite(value) else float('-inf')


# `fit`'s Adam learning rate unless told.
DEFAULT_LEARNING_RATE = 1e-2


def fit(surrogate, target_log_prob_fn: Callable, num_steps: int = 1000, *,
        learning_rate: float = DEFAULT_LEARNING_RATE, sample_size: int = 64, seed: int = 0,
        estimator: str = 'reparameterization', stopped_surrogate=None,
        max_seconds: Optional[float] = None, jit_compile: bool = True,
        clip_norm: Optional[float] = None,
        steps_per_call: int = 25) -> FitResult:
  """Maximises the ELBO of `surrogate` for `target_log_prob_fn` with Adam.

  The same objective as `tfp.vi.fit_surrogate_posterior` (reverse KL,
  reparameterised samples), with what an ODE flow needs on top:

  * the steps run `steps_per_call` at a time in a loop inside one
    `tfp_ffjord.ode.checked_function`, XLA-compiled by default, so a failed
    solve raises `tfp_ffjord.ode.SolverError` (TFP's loop under
    `jit_compile=True` would return NaN);
  * a step whose loss is not finite is not applied and `TrainingError` is
    raised (the variables keep the last good step's values);
  * each step's samples (and Hutchinson probes) come from the stateless
    seed `(seed, step)`: the same seed gives the same run;
  * `max_seconds` stops at a wall-time budget (for equal-time comparisons).

  Args:
    surrogate: a distribution with `experimental_sample_and_log_prob` and
      `trainable_variables` (any of `build_surrogate`'s).
    target_log_prob_fn: unnormalised log density of the target, taking a
      batch of values structured like the surrogate's samples.
    num_steps: the most optimizer steps.
    learning_rate: Adam's learning rate.
    sample_size: Monte Carlo samples per step.
    seed: int seed.
    estimator: a name of `registry.VI_ESTIMATORS`. `'stl'` (sticking the
      landing; Roeder et al., 2017) needs `stopped_surrogate`.
    stopped_surrogate: a second surrogate of the same family and
      architecture; `fit` copies `surrogate`'s variables into it before each
      step and evaluates `log q` with it, so no gradient reaches the
      parameters through `log q` except along the samples.
    max_seconds: stop after the call that exceeds this wall time (the
      first step's compilation included).
    jit_compile: compile the steps with XLA.
    clip_norm: clip the gradients' global norm to this.
    steps_per_call: steps per call of the compiled loop (the first call
      runs one). The same seed gives the same steps for any value; larger
      values save the per-call overhead (~2 ms per step for a small FFJORD
      surrogate on a CPU), smaller ones make `max_seconds` finer.

  Returns:
    A `FitResult`.

  Raises:
    ValueError: for a bad argument.
    TrainingError: if the loss becomes non-finite.
    tfp_ffjord.ode.SolverError: if a solve fails.
  """
  _check_fit(num_steps, learning_rate, sample_size, estimator, max_seconds,
             steps_per_call)
  variables = list(surrogate.trainable_variables)
  if not variables:
    raise ValueError('`surrogate` has no trainable variables.')
  if estimator == 'stl':
    _check_stopped(stopped_surrogate, variables)
  else:
    stopped_surrogate = None
  one_step = _adam_step(
      surrogate, stopped_surrogate,
      lambda step_seed, stopped: elbo_loss(
          surrogate, target_log_prob_fn, sample_size, step_seed, stopped),
      learning_rate, clip_norm)
  run_steps = _chunked(one_step, variables[0].dtype, steps_per_call,
                       jit_compile)
  losses, seconds = [], []
  start = time.perf_counter()
  first = None
  while len(losses) < num_steps:
    # The first call runs one step, so that `first_step_seconds` is the
    # first step's (tracing and compilation included).
    count = 1 if first is None else min(steps_per_call,
                                        num_steps - len(losses))
    done, chunk = run_steps(tf.constant(seed, tf.int32),
                            tf.constant(len(losses), tf.int32),
                            tf.constant(count, tf.int32))
    elapsed = time.perf_counter() - start
    if first is None:
      first = elapsed
    for loss in chunk.numpy()[:int(done)]:
      if not math.isfinite(loss):
        raise TrainingError(
            f'fit: the negative ELBO became {loss} at step {len(losses) + 1};'
            f' the variables keep step {len(losses)}\'s values.')
      losses.append(float(loss))
      seconds.append(elapsed)
    if max_seconds is not None and elapsed > max_seconds:
      break
  return FitResult(np.asarray(losses), np.asarray(seconds), len(losses),
                   first)


def _check_fit(num_steps, learning_rate, sample_size, estimator, max_seconds,
               steps_per_call):
  """`fit`'s argument checks."""
  _checks.positive_int('num_steps', num_steps)
  _checks.positive_int('sample_size', sample_size)
  _checks.positive_int('steps_per_call', steps_per_call)
  if not learning_rate > 0:
    raise ValueError(f'`learning_rate` must be positive; got '
                     f'{learning_rate!r}.')
  if estimator not in registry.VI_ESTIMATORS:
    raise ValueError(f'`estimator` must be one of '
                     f'{", ".join(registry.VI_ESTIMATORS)}; got {estimator!r}.')
  if max_seconds is not None and not max_seconds > 0:
    raise ValueError(f'`max_seconds` must be positive or None; got '
                     f'{max_seconds!r}.')


def _check_stopped(stopped_surrogate, variables):
  """The sticking-the-landing estimator's second surrogate, checked."""
  if stopped_surrogate is None:
    raise ValueError("`estimator='stl'` needs `stopped_surrogate` (a second "
                     'surrogate built like `surrogate`).')
  stopped_variables = list(stopped_surrogate.trainable_variables)
  shapes = [tuple(v.shape) for v in variables]
  if [tuple(v.shape) for v in stopped_variables] != shapes:
    raise ValueError('`stopped_surrogate` must have variables of the shapes '
                     f'of `surrogate`\'s ({len(variables)} variables).')


def _adam_step(surrogate, stopped_surrogate, loss_fn, learning_rate,
               clip_norm):
  """`one_step(step_seed) -> loss`: one Adam step on `surrogate`'s
  variables (`loss_fn(step_seed, stopped)`; with a `stopped_surrogate`,
  its variables are set to `surrogate`'s first)."""
  variables = list(surrogate.trainable_variables)
  stopped_variables = ([] if stopped_surrogate is None
                       else list(stopped_surrogate.trainable_variables))

  def copy_to_stopped():
    for s, v in zip(stopped_variables, variables):
      s.assign(v)
  # `apply_gradients` re-applies Keras variable constraints (e.g. the masks
  # of `tfb.AutoregressiveNetwork`) after each update, as Keras optimizers
  # do and Sonnet's do not.
  return steps_lib.loss_step(
      lambda step_seed: loss_fn(step_seed, stopped_surrogate),
      steps_lib.adam_update(variables, learning_rate, clip_norm=clip_norm),
      before=copy_to_stopped if stopped_variables else None)


def _chunked(one_step, dtype, steps_per_call, jit_compile):
  """`run_steps(base_seed, first_step, count) -> (done, losses)`: steps
  `first_step, ..., first_step + count - 1` in one loop of one
  `checked_function`; stops after a non-finite loss (which
  `apply_gradients` did not apply)."""

  @ode.checked_function(jit_compile=jit_compile)
  def run_steps(base_seed, first_step, count):
    def body(i, losses, last):
      del last
      loss = tf.cast(one_step(tf.stack([base_seed, first_step + i])), dtype)
      return tf.tensor_scatter_nd_update(losses, [[i]], [loss]), loss
    losses = tf.fill([steps_per_call], tf.constant(np.nan, dtype))
    done, (losses, _) = ode.checked_while_loop(
        body, count, (losses, tf.constant(0, dtype)),
        stop_fn=lambda losses, last: tf.logical_not(_lowering.is_finite(last)))
    return done, losses
  return run_steps


def _flat_draws(values):
  """`[N, total size]` from a batch of structured values."""
  return np.concatenate([np.reshape(np.asarray(v), [np.shape(v)[0], -1])
                         for v in tf.nest.flatten(values)], axis=1)


def _flat_truth(values):
  return np.concatenate([np.reshape(np.asarray(v, np.float64), [-1])
                         for v in tf.nest.flatten(values)])


def importance_weights_summary(log_w) -> dict:
  """`log_z`, `log_z_stderr` and `ess` of log importance weights `log_w`.

  With `w = p~(x) / q(x)` for draws `x ~ q`, `mean(w)` estimates the
  normaliser `Z` of `p~`; its log, `log_z`, has the delta-method standard
  error `sqrt((N / ess - 1) / N)`, where `ess = (sum w)^2 / sum w^2` is the
  effective sample size of the `N` weights (`N` when `q` is the normalised
  target). Non-finite weights count as zero weights (`-inf`).

  Args:
    log_w: `[N]` log weights.

  Returns:
    A dict of floats: `log_z`, `log_z_stderr`, `ess`.

  Examples:
    >>> summary = importance_weights_summary(np.zeros(8))
    >>> summary['log_z'], summary['ess']
    (0.0, 8.0)
  """
  log_w = np.asarray(log_w, np.float64)
  log_w = np.where(np.isnan(log_w), -np.inf, log_w)
  n = len(log_w)
  top = np.max(log_w)
  if not np.isfinite(top):
    return {'log_z': float('-inf') if top == -np.inf else float('inf'),
            'log_z_stderr': float('inf'), 'ess': 0.}
  w = np.exp(log_w - top)
  ess = float(w.sum() ** 2 / np.sum(w ** 2))
  return {'log_z': float(top + np.log(w.mean())),
          'log_z_stderr': float(np.sqrt(max(n / ess - 1., 0.) / n)),
          'ess': ess}


def evaluate(surrogate, target, num_samples: int = 4096, seed: int = 1,
             batch_size: int = 1024) -> dict:
  """The fitted surrogate against `target`'s ground truth.

  Args:
    surrogate: the fitted surrogate posterior.
    target: an inference_gym target.
    num_samples: the draws of the estimates.
    seed: their seed.
    batch_size: draws per batch.

  Returns:
    A dict of plain floats: `elbo` and `elbo_stderr` (the ELBO,
    `E_q[log p~ - log q]` with p~ unnormalised, and its Monte Carlo
    standard error); `mean_error` and `std_error` (the largest standardised
    error of the posterior mean and standard deviation over the target's
    coordinates, those of its 'identity' sample transformation:
    `max |estimate - truth| / truth_std`; None where the target has no
    ground truth); `log_z` and `log_z_stderr` (the importance-sampling
    estimate `log mean(w)` of the target's log normaliser, weights `w = p~ /
    q`, and its delta-method standard error; 0 is the truth for a
    normalised target); `ess` (the weights' effective sample size
    `(sum w)^2 / sum w^2`, out of `num_samples`). For a target that can
    draw exact samples, also `mean_error_floor` and `std_error_floor`: the
    same errors of `num_samples` exact draws (median of
    `EXACT_DRAW_REPEATS` sets), the level below which differences are
    Monte Carlo noise.
  """
  _checks.positive_int('num_samples', num_samples)
  transform = getattr(target, 'sample_transformations', {}).get('identity')
  target_log_prob = target_log_prob_fn(target)

  @ode.checked_function
  def draw(step_seed, n):
    x, log_q = surrogate.experimental_sample_and_log_prob(
        n, seed=step_seed, **_ffjord_kwargs(surrogate, step_seed + 1))
    return (x if transform is None else transform(x),
            target_log_prob(x) - log_q)

  values, log_w = [], []
  for i, start in enumerate(range(0, num_samples, batch_size)):
    n = min(batch_size, num_samples - start)
    v, w = draw(tf.constant([seed, i], tf.int32), n)
    values.append(_flat_draws(v))
    log_w.append(np.asarray(w, np.float64))
  values = np.concatenate(values).astype(np.float64)
  log_w = np.concatenate(log_w)
  result = {'elbo': float(np.mean(log_w)),
            'elbo_stderr': float(np.std(log_w) / np.sqrt(len(log_w))),
            'mean_error': None, 'std_error': None,
            'num_samples': int(num_samples)}
  result.update(importance_weights_summary(log_w))
  if transform is not None and transform.ground_truth_mean is not None and (
      transform.ground_truth_standard_deviation is not None):
    truth_mean = _flat_truth(transform.ground_truth_mean)
    truth_std = _flat_truth(transform.ground_truth_standard_deviation)
    result['mean_error'], result['std_error'] = _errors(
        values, truth_mean, truth_std)
    if hasattr(target, 'sample'):
      result.update(_exact_draws_errors(target, transform, truth_mean,
                                        truth_std, num_samples, seed))
  return result


def _errors(values, truth_mean, truth_std):
  """The largest standardised errors of the mean and std of `values`."""
  return (float(np.max(np.abs(values.mean(0) - truth_mean) / truth_std)),
          float(np.max(np.abs(values.std(0) - truth_std) / truth_std)))


EXACT_DRAW_REPEATS = 8


def _exact_draws_errors(target, transform, truth_mean, truth_std, num_samples,
                        seed):
  """The same errors for `num_samples` exact draws of `target`, the median
  over `EXACT_DRAW_REPEATS` sets: the Monte Carlo floor below which a
  surrogate's errors are noise (on the funnel, whose std is dominated by
  rare draws, it is far from 0)."""
  draws = target.sample(EXACT_DRAW_REPEATS * num_samples, seed=(seed, 7))
  draws = _flat_draws(transform(draws)).astype(np.float64)
  errors = [_errors(chunk, truth_mean, truth_std)
            for chunk in np.split(draws, EXACT_DRAW_REPEATS)]
  return {'mean_error_floor': float(np.median([e[0] for e in errors])),
          'std_error_floor': float(np.median([e[1] for e in errors]))}
