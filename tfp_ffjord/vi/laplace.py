"""The Laplace approximation as the start of a Gaussian surrogate.

A Gaussian fitted by Adam on the ELBO needs tens of thousands of steps on
an ill-conditioned target (its scales span orders of magnitude). The
Laplace approximation gets there in one optimisation: the target's mode in
the surrogate's unconstrained space (`tfp.optimizer.lbfgs_minimize`), and
the inverse Hessian of `-log p` there as the covariance. For a Gaussian
target it is the exact posterior. Where the target has no mode (Neal's
funnel: its density grows without bound down the neck) or the Hessian is
not positive definite, the result is not used.
"""

import time
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import _checks
from tfp_ffjord.vi import fitting

tfb = tfp.bijectors

__all__ = ['LaplaceResult', 'is_gaussian', 'laplace_initialize']


class LaplaceResult(NamedTuple):
  """What `laplace_initialize` did.

  Attributes:
    accepted: whether the surrogate now holds the Laplace approximation
      (its ELBO estimate beat the surrogate's own).
    elbo_before: the surrogate's ELBO estimate before.
    elbo_after: the Laplace approximation's (-inf if none was found).
    iterations: L-BFGS iterations.
    seconds: the wall time it took.
  """
  accepted: bool
  elbo_before: float
  elbo_after: float
  iterations: int
  seconds: float


def _gaussian_parts(surrogate):
  """`(post, loc, scale, tril)` of a surrogate whose bijector chain ends in
  `Shift(loc)` and `ScaleMatvecTriL` / `ScaleMatvecDiag` on its noise (a
  staged surrogate's Gaussian base): the bijectors after the affine map, its
  two trainable variables, and whether the scale is lower triangular."""
  # (An ASVI surrogate, a joint distribution, has no `bijector` at all.)
  bijectors = getattr(getattr(surrogate, 'bijector', None), 'bijectors', ())
  if (len(bijectors) < 2 or not isinstance(bijectors[-2], tfb.Shift)
      or not isinstance(bijectors[-1], (tfb.ScaleMatvecTriL,
                                        tfb.ScaleMatvecDiag))):
    raise ValueError(
        '`surrogate` must be a Gaussian base (a chain ending in Shift and '
        'ScaleMatvecTriL or ScaleMatvecDiag on N(0, I) noise), e.g. the '
        "`base` of a 'full-covariance' or 'mean-field' staged surrogate.")
  tril = isinstance(bijectors[-1], tfb.ScaleMatvecTriL)
  scale = bijectors[-1].parameters['scale_tril' if tril else 'scale_diag']
  return (tfb.Chain(list(bijectors[:-2])), bijectors[-2].parameters['shift'],
          scale, tril)


def is_gaussian(surrogate) -> bool:
  """Whether `laplace_initialize` can move `surrogate`."""
  try:
    _gaussian_parts(surrogate)
  except ValueError:
    return False
  return True


def laplace_initialize(surrogate, target_log_prob_fn, *,
                       max_iterations: int = 200, num_check_samples: int = 512,
                       seed: int = 0) -> LaplaceResult:
  """Moves a Gaussian surrogate to the target's Laplace approximation, if
  that raises its ELBO.

  In the surrogate's unconstrained space `u` (before its restructuring and
  constraining bijectors `post`), the target's log density is `log p~(
  post(u)) + log |det d post / du|`. L-BFGS finds its mode `m`; the
  Hessian `H` of `-log p` at `m` (autodiff) gives the covariance `H^-1`.
  The surrogate's `loc` becomes `m`, its scale the Cholesky factor of
  `H^-1` (for a diagonal scale, `1 / sqrt(H_ii)`: on a Gaussian target the
  mean-field Gaussian of highest ELBO). An
  ELBO estimate over `num_check_samples` draws decides: if the Laplace
  approximation's is not higher (or anything is not finite, or `H` is not
  positive definite) the variables keep their values.

  Args:
    surrogate: a Gaussian base: a `StagedSurrogate`'s `base` built with
      `base='full-covariance'` or `'mean-field'` (its `full` shares the
      variables, so it starts from the result too).
    target_log_prob_fn: the target's unnormalised log density (a batch of
      values structured like the surrogate's samples).
    max_iterations: L-BFGS's most iterations.
    num_check_samples: draws of the two ELBO estimates.
    seed: their int seed.

  Returns:
    A `LaplaceResult`.

  Raises:
    ValueError: if `surrogate` is not such a Gaussian, or for a bad argument.
  """
  _checks.positive_int('max_iterations', max_iterations)
  _checks.positive_int('num_check_samples', num_check_samples)
  start = time.perf_counter()
  post, loc, scale, tril = _gaussian_parts(surrogate)
  dim = int(loc.shape[0])
  check_seed = tf.constant([seed, 0], tf.int32)
  before = fitting.elbo_estimate(surrogate, target_log_prob_fn,
                                 num_check_samples, check_seed)

  def neg_log_p(u):
    u = u[tf.newaxis]   # a batch of one (an identity `post`: a scalar 0)
    return -tf.reduce_sum(target_log_prob_fn(post.forward(u))
                          + post.forward_log_det_jacobian(u, event_ndims=1))

  # L-BFGS runs eagerly around one traced objective: tracing the whole
  # minimisation (its line search traces the target many times over) took
  # 121 s on brownian-motion, against 9 s this way (3 s once traced).
  value_and_gradient = tf.function(
      lambda u: tfp.math.value_and_gradient(neg_log_p, u), autograph=False)
  found = tfp.optimizer.lbfgs_minimize(
      value_and_gradient, initial_position=tf.convert_to_tensor(loc),
      max_iterations=max_iterations)
  mode, iterations = found.position, found.num_iterations

  @tf.function(autograph=False)
  def hessian_at(u):
    with tf.GradientTape() as outer:
      outer.watch(u)
      with tf.GradientTape() as inner:
        inner.watch(u)
        value = neg_log_p(u)
      grad = inner.gradient(value, u)
    # Row by row: traces in 7.6 s on brownian-motion against 12.9 s
    # vectorised (pfor), and runs in milliseconds either way.
    return outer.jacobian(grad, u, experimental_use_pfor=False)

  hessian = hessian_at(mode)
  hessian = 0.5 * (hessian + tf.transpose(hessian))
  chol = tf.linalg.cholesky(hessian)   # NaN where not positive definite
  # A diagonal scale takes 1 / sqrt(H_ii): for a Gaussian target, the
  # mean-field Gaussian of highest ELBO (the conditional, not the marginal,
  # variances).
  new_scale = (tf.linalg.cholesky(tf.linalg.cholesky_solve(
      chol, tf.eye(dim, dtype=loc.dtype))) if tril
               else tf.math.rsqrt(tf.linalg.diag_part(hessian)))
  old = [tf.identity(loc), tf.convert_to_tensor(scale)]
  after = float('-inf')
  if all(bool(tf.reduce_all(tf.math.is_finite(t)))
         for t in (mode, chol, new_scale)):
    loc.assign(mode)
    scale.assign(new_scale)
    after = fitting.elbo_estimate(surrogate, target_log_prob_fn,
                                  num_check_samples, check_seed)
  accepted = after > before
  if not accepted:
    loc.assign(old[0])
    scale.assign(old[1])
  return LaplaceResult(accepted, before, after, int(iterations),
                       time.perf_counter() - start)
