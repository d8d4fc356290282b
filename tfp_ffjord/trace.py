"""Jacobian-trace estimators: the `trace_augmentation_fn` of `FFJORD`.

A trace augmentation function has the signature of TFP's
(`tfp.bijectors.ffjord.trace_jacobian_exact` / `_hutchinson`):

```python
augmented_fn = trace_augmentation_fn(ode_fn, state_shape, dtype)
dstate, trace = augmented_fn(t, (state, log_det), **condition_kwargs)
```

`trace` has the shape of `state` and holds the *unreduced* trace: summed over
the event axes it is the trace of `d ode_fn / d state` for each batch member.
The instantaneous change of variables (Chen et al., 2018),
`d log|det dz(t)/dz(0)| / dt = Tr(df/dz)`, turns it into the log-det.

Both functions here also plug into `tfp.bijectors.FFJORD`.

Limits: the dynamics must treat batch members independently (no mixing across
the batch, e.g. no batch norm), as every per-sample trace estimator assumes.
The exact trace costs one vector-Jacobian product per event dimension D
(unrolled for D <= 16; above, one pass over D copies of the batch);
Hutchinson's estimator costs one per probe.
"""

import zlib

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import _autograph
from tfp_ffjord import _checks
from tfp_ffjord import protocols

__all__ = [
    'trace_jacobian_exact',
    'trace_jacobian_hutchinson',
    'gaussian_noise',
    'rademacher_noise',
    'stateless_seed',
]

_autograph.skip_package()

NOISE_TYPES = ('gaussian', 'rademacher')

# The exact trace unrolls its D vector-Jacobian products up to this event
# size and runs them as one pass over D copies of the state above it.
UNROLL_MAX_DIM = 16


# Stateless RNG ops pick their algorithm per device unless told; XLA picks a
# different one than the TF kernels, which would make the same seed give
# different probes with and without `jit_compile`. Pin it.
RNG_ALGORITHM = 'philox'


def stateless_seed(seed, salt=None):
  """A stateless seed (shape `[2]` int32 Tensor) from `seed`.

  Unlike `tfp.random.sanitize_seed`, a Python int maps to the same stateless
  seed on every call (TFP treats it as the op seed of a stateful draw).
  `None` draws a fresh seed from the global random state (reproducible under
  `tf.random.set_seed`).

  Args:
    seed: None, a Python int, or a shape `[2]` integer Tensor.
    salt: a string; derives an independent seed, the same with and without
      XLA.

  Returns:
    A shape `[2]` int32 Tensor.

  Examples:
    >>> bool(tf.reduce_all(stateless_seed(3) == stateless_seed(3)))
    True
    >>> bool(tf.reduce_all(stateless_seed(3) == stateless_seed(3, 'a')))
    False
  """
  if isinstance(seed, int) and not isinstance(seed, bool):
    seed = tf.constant([seed % 2**31, (seed // 2**31) % 2**31], tf.int32)
  seed = tfp.random.sanitize_seed(seed)
  if salt is not None:
    salt_int = zlib.crc32(salt.encode('utf-8')) % 2**31
    seed = tf.random.experimental.stateless_fold_in(
        seed, salt_int, alg=RNG_ALGORITHM)
  return seed


# Gaussian probes come from integer draws: k uniform in [0, 2^30),
# u = (k + 1/2) / 2^30, z = Phi^{-1}(u). Under XLA, in a training step with an
# adaptive solver's adjoint, probes from the *float* stateless RNG ops
# (`stateless_normal`, float `stateless_uniform`) came out different in the
# forward solve than eagerly (a wrong loss); the integer op is consistent
# (tests/test_xla_training.py covers every combination). The grid of 2^30
# levels truncates the normal beyond 6.1 sigma (mass 1e-9).
_GAUSSIAN_LEVELS = 2**30


def gaussian_noise(shape, dtype, seed):
  """Standard normal probes from a stateless seed.

  Args:
    shape: the probes' shape.
    dtype: their dtype.
    seed: anything `stateless_seed` takes.

  Returns:
    A Tensor of `shape`: the same values for the same seed, with and
    without XLA.
  """
  k = tf.random.stateless_uniform(shape, seed=stateless_seed(seed), minval=0,
                                  maxval=_GAUSSIAN_LEVELS, dtype=tf.int32,
                                  alg=RNG_ALGORITHM)
  u = (tf.cast(k, tf.float64) + 0.5) / _GAUSSIAN_LEVELS
  return tf.cast(tf.math.ndtri(u), dtype)


def rademacher_noise(shape, dtype, seed):
  """Uniform +-1 probes from a stateless seed; lower variance than Gaussian.

  Args:
    shape: the probes' shape.
    dtype: their dtype.
    seed: anything `stateless_seed` takes.

  Returns:
    A Tensor of `shape` holding -1 and +1.

  Examples:
    >>> sorted(set(rademacher_noise([100], tf.float32, seed=0).numpy().tolist()))
    [-1.0, 1.0]
  """
  bits = tf.random.stateless_uniform(shape, seed=stateless_seed(seed),
                                     minval=0, maxval=2, dtype=tf.int32,
                                     alg=RNG_ALGORITHM)
  return tf.cast(2 * bits - 1, dtype)


@protocols.accepts(protocols.SEED, protocols.SEGMENT_SEEDS,
                   protocols.REGULARIZE)
def trace_jacobian_exact(ode_fn, state_shape, dtype, seed=None,
                         regularize=False, segment_seeds=None):
  """Augments `ode_fn` with the exact diagonal of its Jacobian.

  The event is the last axis of the state (size D); every other axis is a
  batch axis, including none at all (a state of shape `[D]`). It takes D
  vector-Jacobian products, one per row of the identity: written out one
  by one for D <= 16 (and eagerly); above, one pass over the state
  replicated D times (copy i pulled back with row i). Both compile under
  XLA and can be differentiated again for training.

  Args:
    ode_fn: `ode_fn(time, state, **kwargs)` -> time derivative of `state`.
    state_shape: shape of the state (unused; kept for TFP's signature).
    dtype: dtype of the state (unused; kept for TFP's signature).
    seed: ignored; accepted so that a per-call `seed` can be passed to any
      of this module's estimators.
    regularize: also integrate RNODE's regularisers (below).
    segment_seeds: ignored, as `seed`.

  Returns:
    `augmented_fn(time, (state, log_det), **kwargs) -> (dstate, diag)` where
    `diag[..., i] = d dstate[..., i] / d state[..., i]`. With
    `regularize=True` it takes and returns 4-tuples: given `(state,
    log_det, kinetic, frobenius)` it also returns `dstate**2` and the
    per-column sums of squares of the Jacobian, whose sums over the event
    are `||f||^2` and exactly `||J||_F^2` (the RNODE regularisers, from the
    same vector-Jacobian products).
  """
  del state_shape, dtype, seed, segment_seeds

  def augmented_fn(time, state_and_log_det, **kwargs):
    _check_arity(state_and_log_det, regularize)
    state = tf.convert_to_tensor(state_and_log_det[0])
    scalar = state.shape.rank == 0
    if scalar:  # A scalar event: the Jacobian is 1x1.
      state = state[tf.newaxis]
    dim = state.shape[-1]
    if dim is None:
      raise ValueError('trace_jacobian_exact needs a static event size (the '
                       f'last axis of the state); got shape {state.shape}.')
    eye = tf.eye(dim, dtype=state.dtype)
    frobenius = None
    if dim <= UNROLL_MAX_DIM or tf.executing_eagerly():
      # One VJP per dimension, each keeping only its own component. For small
      # D this traces and compiles faster than the one-pass form below (and
      # far faster than `vectorized_map`, whose pfor rewrite of the backward
      # graph dominated tracing time).
      with tf.GradientTape(persistent=True,
                           watch_accessed_variables=False) as tape:
        tape.watch(state)
        dstate = _call(ode_fn, time, state[0] if scalar else state, kwargs)
        if scalar:
          dstate = dstate[tf.newaxis]
      rows = [tape.gradient(
          dstate, state,
          output_gradients=tf.broadcast_to(eye[i], tf.shape(dstate)),
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
              for i in range(dim)]
      del tape
      diag = tf.stack([r[..., i] for i, r in enumerate(rows)], axis=-1)
      if regularize:
        frobenius = tf.add_n([tf.square(r) for r in rows])
    else:
      # Above UNROLL_MAX_DIM, one pass for all D rows: the state replicated
      # D times along a new leading axis, copy i pulled back with e_i (copy
      # 0's output is the derivative itself). The same work as D VJPs (the
      # dynamics treat batch members independently), no per-row graph, and
      # it compiles under XLA and differentiates again, which
      # `tf.vectorized_map`'s pfor rewrite did not (its second-order
      # gradient failed to compile in a training step).
      copies = tf.broadcast_to(state[tf.newaxis],
                               tf.concat([[dim], tf.shape(state)], 0))
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(copies)
        out = _call(ode_fn, time, copies, kwargs)
      cotangent = tf.broadcast_to(
          tf.reshape(eye, [dim] + [1] * (state.shape.rank - 1) + [dim]),
          tf.shape(out))
      rows = tape.gradient(out, copies, output_gradients=cotangent,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)
      dstate = out[0]
      # rows[i] = e_i^T J for every batch member: [D, ..., D].
      diag = tf.linalg.diag_part(
          tf.experimental.numpy.moveaxis(rows, 0, -2))  # [..., D]
      if regularize:
        frobenius = tf.reduce_sum(tf.square(rows), axis=0)
    outputs = (dstate, diag)
    if regularize:
      outputs += (tf.square(dstate), frobenius)
    if scalar:
      return tuple(o[0] for o in outputs)
    return outputs

  return augmented_fn


@protocols.accepts(protocols.SEED, protocols.SEGMENT_SEEDS,
                   protocols.REGULARIZE)
def trace_jacobian_hutchinson(ode_fn, state_shape, dtype, sample_fn=None,
                              num_samples=1, seed=None, noise='gaussian',
                              regularize=False, segment_seeds=None):
  """Augments `ode_fn` with Hutchinson's stochastic trace estimate.

  For probes `e` with `E[e e^T] = I`, `Tr(J) = E[e^T J e]` (Hutchinson, 1989).
  The probes are drawn once per call of this function (i.e. once per solve,
  as in FFJORD) and reused at every time of the integration; with
  `num_samples > 1` the estimate is their mean.

  Fixes over `tfp.bijectors.ffjord.trace_jacobian_hutchinson`: dynamics that
  do not depend on the state give a zero trace instead of an error, and the
  default probes come from a stateless `seed`, so the same seed gives the
  same estimate (`tfp_ffjord.FFJORD` can pass a seed per call).

  Args:
    ode_fn: `ode_fn(time, state, **kwargs)`.
    state_shape: shape of the state (Tensor or TensorShape).
    dtype: dtype of the state.
    sample_fn: optional TFP-style `sample_fn(shape, dtype=, seed=)`; when
      given it replaces `noise`. Default: None.
    num_samples: number of probes, a positive int. Default: 1.
    seed: int or stateless seed (shape `[2]` int Tensor); `None` draws a
      fresh seed from the global random state. Default: None.
    noise: `'gaussian'` (default, as TFP) or `'rademacher'`.
    regularize: also integrate RNODE's regularisers (below).
    segment_seeds: for a segmented solve (`segment` passed to the
      augmented function), one seed per segment (each as `seed`; `None`
      entries draw fresh): segment `k` uses the probes that `seed=s_k`
      gives, so K blocks solved as one segmented solve draw what K
      separate solves would. Replaces `seed`. Default: None.

  Returns:
    `augmented_fn(time, (state, log_det), **kwargs) -> (dstate, trace)`.
    With `regularize=True` it takes and returns 4-tuples: given `(state,
    log_det, kinetic, frobenius)` it also returns
    the per-element rates of the RNODE regularisers: `dstate**2` and
    `(e^T J)**2` (averaged over probes), whose sums over the event are
    `||f||^2` and an unbiased estimate of `||J||_F^2`.
  """
  num_samples = _checks.positive_int('num_samples', num_samples)
  if sample_fn is None:
    if noise not in NOISE_TYPES:
      raise ValueError(f'`noise` must be one of {NOISE_TYPES}; got {noise!r}.')
    sample_fn = gaussian_noise if noise == 'gaussian' else rademacher_noise
  elif not callable(sample_fn):
    raise TypeError(f'`sample_fn` must be callable; got {sample_fn!r}.')
  shape = tf.concat([[num_samples], tf.cast(state_shape, tf.int32)], 0) if (
      tf.is_tensor(state_shape)) else [num_samples] + list(
          tf.TensorShape(state_shape).as_list())
  if segment_seeds is None:
    call_probes = sample_fn(shape, dtype=dtype, seed=seed)
  else:   # [K, num_samples, ...]: segment k's probes in row k
    segment_probes = tf.stack([sample_fn(shape, dtype=dtype, seed=s)
                               for s in segment_seeds])

  def augmented_fn(time, state_and_log_det, **kwargs):
    _check_arity(state_and_log_det, regularize)
    state = state_and_log_det[0]
    if segment_seeds is not None:
      if 'segment' not in kwargs:
        raise ValueError(
            '`segment_seeds` needs a segmented solve (which passes '
            '`segment` to the augmented function).')
      probes = tf.gather(segment_probes, kwargs['segment'])
    else:
      probes = call_probes
    with tf.GradientTape(persistent=num_samples > 1,
                         watch_accessed_variables=False) as tape:
      tape.watch(state)
      dstate = _call(ode_fn, time, state, kwargs)
    estimates, squares = [], []
    for i in range(num_samples):
      e = probes[i]
      vjp = tape.gradient(dstate, state, output_gradients=e,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      estimates.append(e * vjp)
      squares.append(tf.square(vjp))
    del tape
    mean = lambda xs: xs[0] if num_samples == 1 else tf.add_n(xs) / float(
        num_samples)
    if regularize:
      # RNODE: the same VJPs give the Jacobian's Frobenius norm, since
      # E||e^T J||^2 = ||J||_F^2; the kinetic energy rate is ||f||^2.
      return dstate, mean(estimates), tf.square(dstate), mean(squares)
    return dstate, mean(estimates)

  return augmented_fn


def _check_arity(state, regularize):
  expected = 4 if regularize else 2
  if len(state) != expected:
    raise ValueError(
        f'The augmented state must hold {expected} parts ((state, log_det'
        + (', kinetic, frobenius' if regularize else '') + f')) with '
        f'regularize={regularize}; got {len(state)}.')


def _call(ode_fn, time, state, kwargs):
  dstate = tf.convert_to_tensor(ode_fn(time, state, **kwargs))
  if (dstate.shape.is_fully_defined() and state.shape.is_fully_defined()
      and dstate.shape != state.shape):
    raise ValueError(
        f'`state_time_derivative_fn` returned shape {dstate.shape} for a state '
        f'of shape {state.shape}; they must match.')
  return dstate
