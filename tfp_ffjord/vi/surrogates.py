"""Surrogate posteriors: targets, their unconstrained space, and the FFJORD,
IAF and Gaussian surrogates over it."""

import math
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import _checks
from tfp_ffjord import bijector as bijector_lib
from tfp_ffjord import dynamics as dynamics_lib
from tfp_ffjord import ode
from tfp_ffjord import registry
from tfp_ffjord import stacked as stacked_lib
from tfp_ffjord import trace as trace_lib

tfb = tfp.bijectors
tfd = tfp.distributions

# Up to this unconstrained size the default trace is exact (D VJPs per
# dynamics evaluation); above, Hutchinson's estimator (one VJP).
EXACT_TRACE_MAX_DIM = 16

# The name of the FFJORD bijector inside a surrogate's chain: per-call
# keyword arguments reach it as `bijector_kwargs={FFJORD_NAME: {...}}`.
FFJORD_NAME = 'ffjord'

def load_target(name: str):
  """The `inference_gym` target registered as `name`.

  Args:
    name: a name of `registry.VI_TARGETS`, e.g. 'banana'.

  Returns:
    The inference_gym model.

  Raises:
    ValueError: naming the choices, for an unknown name.
  """
  if name not in registry.VI_TARGETS:
    raise ValueError(f'Unknown target {name!r}; expected one of '
                     f'{", ".join(registry.VI_TARGETS)}.')
  from inference_gym import using_tensorflow as gym  # pylint: disable=g-import-not-at-top
  return getattr(gym.targets, registry.VI_TARGETS[name].cls)()


def _constraining(bijector):
  if bijector is None:
    return None
  if tf.nest.is_nested(bijector):
    return tfb.JointMap(tf.nest.map_structure(
        lambda b: tfb.Identity() if b is None else b, bijector))
  return bijector


def _parts(event_shape, bijector, dtype):
  """(unconstrained part shapes, flat dtypes), flattened like `dtype`."""
  shapes = (bijector.inverse_event_shape(event_shape) if bijector is not None
            else event_shape)
  dtypes = tf.nest.flatten(dtype)
  shapes = tf.nest.flatten(tf.nest.map_structure(
      lambda _, s: tf.TensorShape(s), dtype, shapes,
      check_types=False)) if tf.nest.is_nested(dtype) else [
          tf.TensorShape(shapes)]
  for s in shapes:
    if not s.is_fully_defined():
      raise ValueError(f'`event_shape` must be fully defined; got {s}.')
  return shapes, dtypes


def unconstrained_size(event_shape, bijector=None, dtype=tf.float32) -> int:
  """The number of real coordinates of an event after `bijector.inverse`.

  Args:
    event_shape: a shape, or a structure of shapes.
    bijector: the target's constraining bijector (a bijector, a structure
      of them like `event_shape`, or None).
    dtype: a dtype, or a structure of them.

  Returns:
    D, the unconstrained dimension.

  Examples:
    >>> shapes = {'a': tf.TensorShape([2]), 'b': tf.TensorShape([3, 2])}
    >>> unconstrained_size(shapes, dtype={'a': tf.float32, 'b': tf.float32})
    8
  """
  shapes, _ = _parts(event_shape, _constraining(bijector), dtype)
  return sum(int(np.prod(s.as_list(), dtype=np.int64)) for s in shapes)


def restructuring_bijector(event_shape, bijector=None, dtype=tf.float32):
  """The map from `R^D` to the target's unconstrained parts.

  Args:
    event_shape: as for `unconstrained_size`.
    bijector: as for `unconstrained_size`.
    dtype: as for `unconstrained_size`.

  Returns:
    A bijector whose output is shaped and structured like `dtype` (for a
    single `[D]` event, the identity).
  """
  shapes, _ = _parts(event_shape, _constraining(bijector), dtype)
  sizes = [int(np.prod(s.as_list(), dtype=np.int64)) for s in shapes]
  if not tf.nest.is_nested(dtype):
    if shapes[0].rank == 1:
      return tfb.Identity()
    return tfb.Reshape(event_shape_out=shapes[0], event_shape_in=[sizes[0]])
  return tfb.Chain([
      tfb.Restructure(tf.nest.pack_sequence_as(dtype,
                                               list(range(len(sizes))))),
      tfb.JointMap([tfb.Reshape(event_shape_out=s, event_shape_in=[n])
                    for s, n in zip(shapes, sizes)]),
      tfb.Split(sizes),
  ], name='restructure')


def _seeded_weights(modules, seed):
  """Redraws the hidden layers' weight matrices of `MLPODE` `modules` (the
  output layers start at zero) from a stateless seed, with Sonnet's default
  distribution for `snt.Linear`."""
  base = trace_lib.stateless_seed(seed, salt='tfp_ffjord.vi.weights')
  weights = [layer.w for m in modules for layer in m._hidden]  # pylint: disable=protected-access
  for i, v in enumerate(weights):
    stddev = 1. / math.sqrt(int(v.shape[0]))
    v.assign(tf.random.stateless_truncated_normal(
        v.shape, tf.random.experimental.stateless_fold_in(base, i),
        stddev=stddev, dtype=v.dtype))


def _trainable_affine(dim, dtype, name):
  """Trainable `x -> loc + scale * x` (scale > 0 by softplus), identity at
  the start."""
  loc = tf.Variable(tf.zeros([dim], dtype), name=f'{name}_loc')
  scale = tfp.util.TransformedVariable(tf.ones([dim], dtype), tfb.Softplus(),
                                       name=f'{name}_scale')
  return [tfb.Shift(loc), tfb.ScaleMatvecDiag(scale)]


def build_ffjord_surrogate_posterior(
    event_shape, bijector=None, dtype=tf.float32, *, blocks: int = 2,
    hidden: Sequence[int] = (32, 32), activation: str = 'tanh',
    ode_solve_fn=None, trace: Optional[str] = None, affine: bool = True,
    seed=None, name: str = 'ffjord_surrogate') -> tfd.TransformedDistribution:
  """An FFJORD surrogate posterior for events of `event_shape`.

  Arguments follow `tfp.experimental.vi.build_affine_surrogate_posterior`.

  Args:
    event_shape: a shape, or a structure of shapes.
    bijector: the target's constraining bijector (a bijector, a structure
      of them like `event_shape`, or None).
    dtype: a dtype, or a structure of them.
    blocks: FFJORD blocks, each an MLP with a zero-initialised last layer,
      so the flow starts as the identity. Default: 2.
    hidden: hidden layer sizes of each block's MLP. Default: (32, 32).
    activation: a name of `registry.ACTIVATIONS`. Default: 'tanh'.
    ode_solve_fn: the blocks' solver (ours or `tfp.math.ode`'s `solve`).
      Default: `tfp_ffjord.ode.DormandPrince(gradient='backprop')`. A
      fixed-step solver of ours draws a warning: its log-det is not exact,
      and the ELBO learns to exploit that.
    trace: 'exact' or 'hutchinson'; default: exact up to
      `EXACT_TRACE_MAX_DIM` unconstrained coordinates, Hutchinson above.
    affine: end the flow with a trainable diagonal affine map (scales and
      locations of the target's coordinates, which the flow then need not
      learn). Default: True.
    seed: an int (or stateless seed) for the initial weights, drawn as
      Sonnet's default (truncated normal, stddev 1/sqrt(fan in)); None uses
      the global random state.
    name: name of the distribution.

  Returns:
    A `tfd.TransformedDistribution` over standard normal noise; its
    `trainable_variables` are the flow's. Its `bijector` is a `tfb.Chain`
    whose FFJORD part is named `'ffjord'` (pass a Hutchinson seed as
    `bijector_kwargs={'ffjord': {'seed': s}}`).
  """
  constrain = _constraining(bijector)
  flat_dtype = _flat_dtype(dtype)
  dim = unconstrained_size(event_shape, constrain, dtype)
  ffjord = _ffjord_flow(dim, flat_dtype, name, dict(
      blocks=blocks, hidden=hidden, activation=activation,
      ode_solve_fn=ode_solve_fn, trace=trace, seed=seed))
  return _over_standard_normal(event_shape, constrain, dtype, dim,
                               flat_dtype, [ffjord], affine, name)


def _flat_dtype(dtype):
  """The one dtype of every part of `dtype`."""
  flat_dtypes = tf.nest.flatten(dtype)
  if len(set(flat_dtypes)) != 1:
    raise ValueError(f'All parts of `dtype` must be one dtype; got {dtype!r}.')
  return tf.as_dtype(flat_dtypes[0])


def _ffjord_flow(dim, flat_dtype, name, settings):
  """The surrogate's `StackedFFJORD` on `R^dim`, named `FFJORD_NAME`, from
  `settings` (`blocks`, `hidden`, `activation`, `ode_solve_fn`, `trace`,
  `seed`: `build_ffjord_surrogate_posterior`'s arguments), checked."""
  _checks.positive_int('blocks', settings['blocks'])
  activation, trace = settings['activation'], settings['trace']
  ode_solve_fn = settings['ode_solve_fn']
  if activation not in registry.ACTIVATIONS:
    raise ValueError(f'`activation` must be one of '
                     f'{", ".join(registry.ACTIVATIONS)}; got {activation!r}.')
  if ode_solve_fn is None:   # the exact gradient of the solve the ELBO sees
    ode_solve_fn = ode.DormandPrince(gradient='backprop').solve
  owner = getattr(ode_solve_fn, '__self__', None)
  if isinstance(owner, ode.FixedStepSolver):
    warnings.warn(
        f'{type(owner).__name__} integrates the log-det with a fixed step: '
        'the surrogate is then not exactly normalised, and maximising the '
        'ELBO can exploit the discretisation error (an ELBO above log Z). '
        'Prefer an adaptive solver (DormandPrince, Tsit5) for variational '
        'inference.', stacklevel=3)
  if trace is None:
    trace = 'exact' if dim <= EXACT_TRACE_MAX_DIM else 'hutchinson'
  if trace not in registry.TRACES:
    raise ValueError(f'`trace` must be one of {", ".join(registry.TRACES)} '
                     f'or None; got {trace!r}.')
  act = registry.resolve(registry.ACTIVATIONS, activation, tf)
  with tf.name_scope(name):
    fns = [dynamics_lib.MLPODE(list(settings['hidden']), dim, act,
                               zero_init_output=True,
                               name=f'{name}_dynamics_{i}')
           for i in range(settings['blocks'])]
    for f in fns:  # Sonnet creates variables on the first call.
      f(tf.zeros([], flat_dtype), tf.zeros([1, dim], flat_dtype))
    if settings['seed'] is not None:
      _seeded_weights(fns, settings['seed'])
    return stacked_lib.StackedFFJORD(
        fns, ode_solve_fn=ode_solve_fn,
        trace_augmentation_fn=registry.resolve(registry.TRACES, trace,
                                               trace_lib),
        dtype=flat_dtype, name=FFJORD_NAME, seed_salt=f'tfp_ffjord.vi.{name}')


def _over_standard_normal(event_shape, constrain, dtype, dim, flat_dtype,
                          flow, affine, name):
  """`N(0, I)` in R^dim through `flow` (bijectors in `tfb.Chain` order),
  the trainable affine map (if `affine`), the restructuring and the
  constraining bijector."""
  parts = [restructuring_bijector(event_shape, constrain, dtype)]
  if constrain is not None:
    parts.insert(0, constrain)
  if affine:
    parts += _trainable_affine(dim, flat_dtype, name)
  base = tfd.MultivariateNormalDiag(loc=tf.zeros([dim], flat_dtype),
                                    scale_diag=tf.ones([dim], flat_dtype))
  return tfd.TransformedDistribution(base, tfb.Chain(parts + list(flow)),
                                     name=name)


def _iaf_flow(dim, flat_dtype, hidden, name, seed=None):
  """Two inverted `tfb.MaskedAutoregressiveFlow` blocks on `R^dim` (the
  second's network zero-initialised, a reversal between them), in
  `tfb.Chain` order; the first's weights drawn with the int `seed`."""
  flow = []
  import tf_keras  # pylint: disable=g-import-not-at-top  (TFP's Keras)
  glorot = tf_keras.initializers.GlorotUniform(
      seed=seed if isinstance(seed, int) else None)
  for i in range(2):
    made = tfb.AutoregressiveNetwork(params=2, hidden_units=list(hidden),
                                     activation='tanh',
                                     kernel_initializer='zeros' if i else
                                     glorot, dtype=flat_dtype,
                                     name=f'{name}_made_{i}')
    if i:
      flow.append(tfb.Permute(list(range(dim))[::-1]))
    flow.append(tfb.Invert(tfb.MaskedAutoregressiveFlow(made)))
  return flow


def _build_iaf(event_shape, bijector, dtype, hidden, name, seed):
  constrain = _constraining(bijector)
  flat_dtype = tf.as_dtype(tf.nest.flatten(dtype)[0])
  dim = unconstrained_size(event_shape, constrain, dtype)
  q = _over_standard_normal(event_shape, constrain, dtype, dim, flat_dtype,
                            _iaf_flow(dim, flat_dtype, hidden, name, seed),
                            True, name)
  q.sample(1, seed=(0, 0))   # builds the Keras layers' variables
  return q


def build_surrogate(kind: str, target, *, hidden: Sequence[int] = (32, 32),
                    seed=0, **ffjord_kwargs) -> tfd.Distribution:
  """A surrogate of family `kind` (`registry.VI_SURROGATES`) for `target`.

  Args:
    kind: 'ffjord', 'staged-ffjord', 'staged-ffjord-iaf', 'mean-field',
      'full-covariance', 'laplace', 'iaf' or 'asvi'.
    target: an `inference_gym` model, or a `tfd.Distribution` (whose
      `experimental_default_event_space_bijector()` constrains); 'asvi'
      needs a Bayesian model (its `prior_distribution()`).
    hidden: the hidden sizes of the FFJORD or IAF networks.
    seed: the initial weights' seed.
    **ffjord_kwargs: more arguments of `build_ffjord_surrogate_posterior`
      (or of `build_staged_ffjord_surrogate_posterior`).

  Returns:
    The surrogate posterior; for the staged kinds and 'laplace' a
    `staged.StagedSurrogate` (fit it with `staged.fit_staged`, use its
    `full`).

  Raises:
    ValueError: for an unknown kind, FFJORD arguments given to another, or
      'asvi' for a target without a prior.
  """
  if kind not in registry.VI_SURROGATES:
    raise ValueError(f'Unknown surrogate {kind!r}; expected one of '
                     f'{", ".join(registry.VI_SURROGATES)}.')
  event_shape, constrain, dtype = _target_spec(target)
  name = kind.replace('-', '_')
  if kind == 'ffjord':
    return build_ffjord_surrogate_posterior(
        event_shape, constrain, dtype, hidden=hidden, seed=seed,
        **ffjord_kwargs)
  if kind.startswith('staged-ffjord'):
    from tfp_ffjord.vi import staged  # pylint: disable=g-import-not-at-top
    return staged.build_staged_ffjord_surrogate_posterior(
        event_shape, constrain, dtype, hidden=hidden, seed=seed, name=name,
        base='iaf' if kind.endswith('-iaf') else 'full-covariance',
        **ffjord_kwargs)
  if ffjord_kwargs:
    raise ValueError(f'{sorted(ffjord_kwargs)} apply only to the ffjord '
                     'surrogate.')
  if kind == 'laplace':
    from tfp_ffjord.vi import staged  # pylint: disable=g-import-not-at-top
    return staged.build_laplace_surrogate_posterior(
        event_shape, constrain, dtype, name=name)
  if kind == 'iaf':
    return _build_iaf(event_shape, constrain, dtype, hidden, name, seed)
  # TFP's builders take a Python int as a stateful op seed (a different
  # start at every call): a stateless seed makes `seed` mean one start.
  seed = trace_lib.stateless_seed(seed, salt='tfp_ffjord.vi.' + kind)
  if kind == 'asvi':
    prior = getattr(target, 'prior_distribution', None)
    if prior is None:
      raise ValueError(
          "surrogate 'asvi' is built from a Bayesian model's prior; "
          f'{type(target).__name__} has no `prior_distribution`.')
    return _asvi(prior(), seed, name)
  return tfp.experimental.vi.build_affine_surrogate_posterior(
      event_shape, operators='diag' if kind == 'mean-field' else 'tril',
      bijector=constrain, dtype=tf.nest.flatten(dtype)[0], seed=seed,
      name=name)


def _asvi(prior, seed, name):
  """TFP's ASVI surrogate of `prior`, drawing batches without
  `vectorized_map`.

  TFP builds an auto-batched joint distribution, which draws a batch
  through `vectorized_map`; with stateless seeds (every step of `fit`) that
  falls back to a Python loop over the draws (a first step of minutes on a
  30-part model). The surrogate's parts broadcast over a sample shape, so
  it is rebuilt, at each use as TFP's stateful builder does, with
  vectorization off.
  """
  init_fn, apply_fn = (
      tfp.experimental.vi.build_asvi_surrogate_posterior_stateless(
          prior, name=name))
  params = init_fn(seed=seed)
  variables = [tf.nest.map_structure(
      lambda t, n=n: t if t is None else tf.Variable(t, name=n), value,
      expand_composites=True) for n, value in params._asdict().items()]

  def build(*values):
    q = apply_fn(*values)
    joint = getattr(q, 'distribution', q)   # inside a Restructure, or not
    if getattr(joint, '_use_vectorized_map', False):
      joint._use_vectorized_map = False  # pylint: disable=protected-access
    return q
  return tfp.experimental.util.DeferredModule(build, *variables)


def _target_spec(target):
  if isinstance(target, tfd.Distribution):
    return (target.event_shape, target.experimental_default_event_space_bijector(),
            target.dtype)
  return target.event_shape, target.default_event_space_bijector, target.dtype


def target_log_prob_fn(target) -> Callable:
  """A target's (unnormalised) log density.

  Args:
    target: an `inference_gym` model or a TFP distribution.

  Returns:
    The model's `unnormalized_log_prob`, or the distribution's `log_prob`.
  """
  fn = getattr(target, 'unnormalized_log_prob', None)
  return fn if fn is not None else target.log_prob


def surrogate_for(target, **kwargs) -> tfd.TransformedDistribution:
  """An FFJORD surrogate for a target: `build_surrogate('ffjord', target)`.

  Args:
    target: as for `build_surrogate`.
    **kwargs: more arguments of `build_surrogate`.

  Returns:
    The surrogate posterior.
  """
  return build_surrogate('ffjord', target, **kwargs)


def _ffjord_kwargs(distribution, seed):
  """`bijector_kwargs` giving a surrogate's FFJORD part its Hutchinson seed
  (nothing for a surrogate without one)."""
  if not _has_ffjord(distribution):
    return {}
  return {'bijector_kwargs': {FFJORD_NAME: {'seed': seed}}}


def _has_ffjord(distribution) -> bool:
  chain = getattr(distribution, 'bijector', None)
  parts = getattr(chain, 'bijectors', [chain])
  return any(isinstance(b, (bijector_lib.FFJORD, stacked_lib.StackedFFJORD))
             and b.name == FFJORD_NAME
             for b in parts)
