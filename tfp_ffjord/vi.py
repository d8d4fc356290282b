"""Variational inference with FFJORD surrogate posteriors.

A surrogate posterior is a `tfd.TransformedDistribution` that
`tfp.vi.fit_surrogate_posterior` (or `fit` below) can train against an
unnormalised target density:

    base N(0, I) in R^D -> FFJORD blocks -> diagonal affine map
      -> split and reshape into the target's parts -> target's constraints

`D` is the target's unconstrained size: the sum of the sizes of its parts
after its `default_event_space_bijector` has mapped them to the real line.
The constraining bijector and the restructuring (dicts, named tuples) are
TFP's, so samples come out shaped and constrained like the target's values.

`sample_and_log_prob` (the ELBO's only call) costs one forward solve: the
FFJORD bijector caches the log-det of its forward solve, so the
`TransformedDistribution` never solves backwards for its own samples.

```python
from inference_gym import using_tensorflow as gym
import tfp_ffjord

target = gym.targets.Banana()
q = tfp_ffjord.vi.surrogate_for(target)
result = tfp_ffjord.vi.fit(q, target.unnormalized_log_prob, num_steps=500)
samples = q.sample(1000)
```
"""

import collections
import math
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import _lowering
from tfp_ffjord import bijector as bijector_lib
from tfp_ffjord import dynamics as dynamics_lib
from tfp_ffjord import ode
from tfp_ffjord import registry
from tfp_ffjord import stacked as stacked_lib
from tfp_ffjord import trace as trace_lib
from tfp_ffjord.training import adam as adam_lib
from tfp_ffjord.training.errors import TrainingError
from tfp_ffjord.training.model import solver_named
from tfp_ffjord.training.steps import apply_gradients

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ['EXACT_TRACE_MAX_DIM', 'FitResult', 'build_ffjord_surrogate_posterior',
           'build_surrogate', 'elbo_loss', 'evaluate', 'fit', 'load_target',
           'restructuring_bijector', 'run', 'surrogate_for', 'target_log_prob_fn',
           'unconstrained_size']

# Up to this unconstrained size the default trace is exact (D VJPs per
# dynamics evaluation); above, Hutchinson's estimator (one VJP).
EXACT_TRACE_MAX_DIM = 16

# The name of the FFJORD bijector inside a surrogate's chain: per-call
# keyword arguments reach it as `bijector_kwargs={FFJORD_NAME: {...}}`.
FFJORD_NAME = 'ffjord'

FitResult = collections.namedtuple(
    'FitResult', ['losses', 'seconds', 'steps', 'first_step_seconds'])
FitResult.__doc__ = """What `fit` did.

losses: `[steps]` negative ELBO estimates, one per step (before its update).
seconds: `[steps]` wall time since `fit` started, at the end of the call
  that ran each step.
steps: the number of optimizer steps taken.
first_step_seconds: wall time of the first step (tracing and compiling).
"""


def load_target(name: str):
  """The `inference_gym` target registered as `name` (`registry.VI_TARGETS`).

  Raises `ValueError` naming the choices for an unknown name.
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
  """The number of real coordinates of an event after `bijector.inverse`."""
  shapes, _ = _parts(event_shape, _constraining(bijector), dtype)
  return sum(int(np.prod(s.as_list(), dtype=np.int64)) for s in shapes)


def restructuring_bijector(event_shape, bijector=None, dtype=tf.float32):
  """`R^D -> the target's unconstrained parts`, shaped and structured like
  `dtype` (a flat vector for a single `[D]` event: the identity)."""
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


def _check_positive_int(label, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'`{label}` must be a positive int; got {value!r}.')


def build_ffjord_surrogate_posterior(
    event_shape, bijector=None, dtype=tf.float32, *, blocks: int = 2,
    hidden: Sequence[int] = (32, 32), activation: str = 'tanh',
    ode_solve_fn=None, trace: Optional[str] = None, affine: bool = True,
    seed=None, name: str = 'ffjord_surrogate') -> tfd.TransformedDistribution:
  """An FFJORD surrogate posterior for events of `event_shape`.

  Arguments follow `tfp.experimental.vi.build_affine_surrogate_posterior`:
  `event_shape` (a shape or a structure of shapes), the target's
  constraining `bijector` (a bijector, a structure of them like
  `event_shape`, or None) and `dtype` (a dtype or a structure of them).

  Args:
    event_shape, bijector, dtype: as above.
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
  _check_positive_int('blocks', blocks)
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
        'inference.', stacklevel=2)
  constrain = _constraining(bijector)
  flat_dtypes = tf.nest.flatten(dtype)
  if len(set(flat_dtypes)) != 1:
    raise ValueError(f'All parts of `dtype` must be one dtype; got {dtype!r}.')
  flat_dtype = tf.as_dtype(flat_dtypes[0])
  dim = unconstrained_size(event_shape, constrain, dtype)
  if trace is None:
    trace = 'exact' if dim <= EXACT_TRACE_MAX_DIM else 'hutchinson'
  if trace not in registry.TRACES:
    raise ValueError(f'`trace` must be one of {", ".join(registry.TRACES)} '
                     f'or None; got {trace!r}.')
  act = registry.resolve(registry.ACTIVATIONS, activation, tf)
  with tf.name_scope(name):
    fns = [dynamics_lib.MLPODE(list(hidden), dim, act, zero_init_output=True,
                               name=f'{name}_dynamics_{i}')
           for i in range(blocks)]
    for f in fns:  # Sonnet creates variables on the first call.
      f(tf.zeros([], flat_dtype), tf.zeros([1, dim], flat_dtype))
    if seed is not None:
      _seeded_weights(fns, seed)
    ffjord = stacked_lib.StackedFFJORD(
        fns, ode_solve_fn=ode_solve_fn,
        trace_augmentation_fn=registry.resolve(registry.TRACES, trace,
                                               trace_lib),
        dtype=flat_dtype, name=FFJORD_NAME, seed_salt=f'tfp_ffjord.vi.{name}')
    return _over_standard_normal(event_shape, constrain, dtype, dim,
                                 flat_dtype, [ffjord], affine, name)


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


def _build_iaf(event_shape, bijector, dtype, hidden, name):
  constrain = _constraining(bijector)
  flat_dtype = tf.as_dtype(tf.nest.flatten(dtype)[0])
  dim = unconstrained_size(event_shape, constrain, dtype)
  flow = []
  for i in range(2):
    made = tfb.AutoregressiveNetwork(params=2, hidden_units=list(hidden),
                                     activation='tanh',
                                     kernel_initializer='zeros' if i else
                                     'glorot_uniform', dtype=flat_dtype,
                                     name=f'{name}_made_{i}')
    if i:
      flow.append(tfb.Permute(list(range(dim))[::-1]))
    flow.append(tfb.Invert(tfb.MaskedAutoregressiveFlow(made)))
  q = _over_standard_normal(event_shape, constrain, dtype, dim, flat_dtype,
                            flow, True, name)
  q.sample(1, seed=(0, 0))   # builds the Keras layers' variables
  return q


def build_surrogate(kind: str, target, *, hidden: Sequence[int] = (32, 32),
                    seed=0, **ffjord_kwargs) -> tfd.Distribution:
  """A surrogate of family `kind` (`registry.VI_SURROGATES`) for `target`.

  `target` has `event_shape`, `dtype` and `default_event_space_bijector`
  (an `inference_gym` model, or a `tfd.Distribution` whose
  `experimental_default_event_space_bijector()` is used). `ffjord_kwargs`
  go to `build_ffjord_surrogate_posterior`.
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
  if ffjord_kwargs:
    raise ValueError(f'{sorted(ffjord_kwargs)} apply only to the ffjord '
                     'surrogate.')
  if kind == 'iaf':
    return _build_iaf(event_shape, constrain, dtype, hidden, name)
  return tfp.experimental.vi.build_affine_surrogate_posterior(
      event_shape, operators='diag' if kind == 'mean-field' else 'tril',
      bijector=constrain, dtype=tf.nest.flatten(dtype)[0], seed=seed,
      name=name)


def _target_spec(target):
  if isinstance(target, tfd.Distribution):
    return (target.event_shape, target.experimental_default_event_space_bijector(),
            target.dtype)
  return target.event_shape, target.default_event_space_bijector, target.dtype


def target_log_prob_fn(target) -> Callable:
  """`target`'s (unnormalised) log density: an `inference_gym` model's
  `unnormalized_log_prob`, a distribution's `log_prob`."""
  fn = getattr(target, 'unnormalized_log_prob', None)
  return fn if fn is not None else target.log_prob


def surrogate_for(target, **kwargs) -> tfd.TransformedDistribution:
  """`build_ffjord_surrogate_posterior` for `target`'s event shape, dtype
  and constraining bijector (see `build_surrogate`)."""
  return build_surrogate('ffjord', target, **kwargs)


def _ffjord_kwargs(distribution, seed):
  """`bijector_kwargs` giving a surrogate's FFJORD part its Hutchinson seed
  (nothing for a surrogate without one)."""
  if not _has_ffjord(distribution):
    return {}
  return {'bijector_kwargs': {FFJORD_NAME: {'seed': seed}}}


def elbo_loss(surrogate, target_log_prob_fn: Callable, sample_size: int,
              seed, stopped_surrogate=None):
  """The negative ELBO, `mean(log q(x) - log p~(x))` over `sample_size`
  reparameterised draws `x ~ q` from the stateless `seed` (shape `[2]`).

  Without `stopped_surrogate`: one `experimental_sample_and_log_prob` (one
  forward solve for an FFJORD surrogate). With it: sticking the landing,
  `log q` evaluated by `stopped_surrogate` (same family, variables equal to
  `surrogate`'s but not differentiated), so the gradient is only the path
  term, which vanishes when `q` equals the posterior.
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


def fit(surrogate, target_log_prob_fn: Callable, num_steps: int = 1000, *,
        learning_rate: float = 1e-2, sample_size: int = 64, seed: int = 0,
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
  _check_positive_int('num_steps', num_steps)
  _check_positive_int('sample_size', sample_size)
  _check_positive_int('steps_per_call', steps_per_call)
  if not learning_rate > 0:
    raise ValueError(f'`learning_rate` must be positive; got '
                     f'{learning_rate!r}.')
  if estimator not in registry.VI_ESTIMATORS:
    raise ValueError(f'`estimator` must be one of '
                     f'{", ".join(registry.VI_ESTIMATORS)}; got {estimator!r}.')
  if max_seconds is not None and not max_seconds > 0:
    raise ValueError(f'`max_seconds` must be positive or None; got '
                     f'{max_seconds!r}.')
  variables = list(surrogate.trainable_variables)
  if not variables:
    raise ValueError('`surrogate` has no trainable variables.')
  if estimator == 'stl':
    if stopped_surrogate is None:
      raise ValueError("`estimator='stl'` needs `stopped_surrogate` (a second "
                       'surrogate built like `surrogate`).')
    stopped_variables = list(stopped_surrogate.trainable_variables)
    shapes = [tuple(v.shape) for v in variables]
    if [tuple(v.shape) for v in stopped_variables] != shapes:
      raise ValueError('`stopped_surrogate` must have variables of the shapes '
                       f'of `surrogate`\'s ({len(variables)} variables).')
  optimizer = adam_lib.Adam(learning_rate)
  optimizer._initialize(variables)  # pylint: disable=protected-access
  constrained = [v for v in variables
                 if getattr(v, 'constraint', None) is not None]

  def one_step(step_seed):
    if estimator == 'stl':
      for s, v in zip(stopped_variables, variables):
        s.assign(v)
    with tf.GradientTape() as tape:
      loss = elbo_loss(surrogate, target_log_prob_fn, sample_size, step_seed,
                       stopped_surrogate if estimator == 'stl' else None)
    apply_gradients(optimizer, loss, tape.gradient(loss, variables),
                    variables, clip_norm=clip_norm)
    # Keras layers (e.g. the masks of `tfb.AutoregressiveNetwork`) keep
    # their structure through variable constraints, which Keras optimizers
    # apply after each update and Sonnet's do not.
    for v in constrained:
      v.assign(v.constraint(v))
    return loss

  dtype = variables[0].dtype

  @ode.checked_function(jit_compile=jit_compile)
  def run_steps(base_seed, first_step, count):
    """Steps `first_step, ..., first_step + count - 1` in one loop; stops
    after a non-finite loss (which `apply_gradients` did not apply)."""
    def body(i, losses, last):
      del last
      loss = tf.cast(one_step(tf.stack([base_seed, first_step + i])), dtype)
      return tf.tensor_scatter_nd_update(losses, [[i]], [loss]), loss
    losses = tf.fill([steps_per_call], tf.constant(np.nan, dtype))
    done, (losses, _) = ode.checked_while_loop(
        body, count, (losses, tf.constant(0, dtype)),
        stop_fn=lambda losses, last: tf.logical_not(_lowering.is_finite(last)))
    return done, losses

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


def _has_ffjord(distribution) -> bool:
  chain = getattr(distribution, 'bijector', None)
  parts = getattr(chain, 'bijectors', [chain])
  return any(isinstance(b, (bijector_lib.FFJORD, stacked_lib.StackedFFJORD))
             and b.name == FFJORD_NAME
             for b in parts)


def _flat_draws(values):
  """`[N, total size]` from a batch of structured values."""
  return np.concatenate([np.reshape(np.asarray(v), [np.shape(v)[0], -1])
                         for v in tf.nest.flatten(values)], axis=1)


def _flat_truth(values):
  return np.concatenate([np.reshape(np.asarray(v, np.float64), [-1])
                         for v in tf.nest.flatten(values)])


def evaluate(surrogate, target, num_samples: int = 4096, seed: int = 1,
             batch_size: int = 1024) -> dict:
  """The fitted surrogate against `target`'s ground truth.

  Returns a dict of plain floats:
    elbo, elbo_stderr: the ELBO (`E_q[log p~ - log q]`, p~ unnormalised)
      and its Monte Carlo standard error over `num_samples` draws.
    mean_error, std_error: the largest standardised error of the posterior
      mean and standard deviation over the target's coordinates (those of
      its 'identity' sample transformation): `max |estimate - truth| /
      truth_std`; None where the target has no ground truth.
  """
  _check_positive_int('num_samples', num_samples)
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
  if transform is not None and transform.ground_truth_mean is not None and (
      transform.ground_truth_standard_deviation is not None):
    truth_mean = _flat_truth(transform.ground_truth_mean)
    truth_std = _flat_truth(transform.ground_truth_standard_deviation)
    result['mean_error'] = float(np.max(
        np.abs(values.mean(0) - truth_mean) / truth_std))
    result['std_error'] = float(np.max(
        np.abs(values.std(0) - truth_std) / truth_std))
  return result


def run(target: str = 'banana', surrogate: str = 'ffjord',
        out_dir: Optional[str] = None, *, num_steps: int = 2000,
        max_seconds: Optional[float] = None, learning_rate: float = 1e-2,
        sample_size: int = 64, seed: int = 0, blocks: int = 2,
        hidden: Sequence[int] = (32, 32), solver: str = 'dopri5',
        rtol: float = 1e-3, atol: float = 1e-6, num_solver_steps: int = 8,
        trace: Optional[str] = None, estimator: str = 'reparameterization',
        num_eval_samples: int = 4096, verbose: bool = False) -> dict:
  """Fits one surrogate to one registered target and measures it.

  The job behind `tfp-ffjord vi`: `load_target`, `build_surrogate`, `fit`,
  `evaluate`; with `out_dir`, writes `metrics.json`, `elbo.png` and
  `posterior.png` (surrogate and exact samples for a 2-D target with a
  sampler; per-coordinate means and standard deviations against the ground
  truth otherwise). Returns the metrics.
  """
  tf.random.set_seed(seed)
  model = load_target(target)
  ffjord_kwargs = {}
  if surrogate == 'ffjord':
    ffjord_kwargs = dict(blocks=blocks, trace=trace, ode_solve_fn=solver_named(
        solver, rtol=rtol, atol=atol, num_steps=num_solver_steps,
        gradient='backprop').solve)

  def build():
    return build_surrogate(surrogate, model, hidden=hidden, seed=seed,
                           **ffjord_kwargs)
  q = build()
  stopped = build() if estimator == 'stl' else None
  log_p = target_log_prob_fn(model)
  result = fit(q, log_p, num_steps, learning_rate=learning_rate,
               sample_size=sample_size, seed=seed, estimator=estimator,
               stopped_surrogate=stopped, max_seconds=max_seconds)
  if verbose:
    print(f'{target} / {surrogate}: {result.steps} steps in '
          f'{result.seconds[-1]:.1f} s (first {result.first_step_seconds:.1f}'
          ' s)', flush=True)
  measured = evaluate(q, model, num_samples=num_eval_samples, seed=seed + 1)
  tail = result.losses[-max(1, result.steps // 10):]
  metrics = dict(
      target=target, surrogate=surrogate, estimator=estimator,
      steps=int(result.steps), wall_seconds=float(result.seconds[-1]),
      first_step_seconds=float(result.first_step_seconds),
      final_train_elbo=float(-np.mean(tail)),
      num_parameters=int(sum(np.prod(v.shape) for v in q.trainable_variables)),
      config=dict(num_steps=num_steps, max_seconds=max_seconds,
                  learning_rate=learning_rate, sample_size=sample_size,
                  seed=seed, blocks=blocks, hidden=list(hidden), solver=solver,
                  rtol=rtol, atol=atol, num_solver_steps=num_solver_steps,
                  trace=trace),
      **measured)
  if out_dir is not None:
    _write_outputs(out_dir, metrics, result, q, model)
  return metrics


def _write_outputs(out_dir, metrics, result, q, model):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import plotting  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  title = f'{metrics["target"]}: {metrics["surrogate"]} surrogate'
  plotting.plot_elbo(os.path.join(out_dir, 'elbo.png'),
                     {metrics['surrogate']: -result.losses}, title=title)
  samples = q.sample(2000, seed=(metrics['config']['seed'], 99))
  transform = model.sample_transformations['identity']
  flat = _flat_draws(transform(samples)).astype(np.float64)
  path = os.path.join(out_dir, 'posterior.png')
  if flat.shape[1] == 2 and hasattr(model, 'sample'):
    reference = _flat_draws(model.sample(2000, seed=(0, 1)))
    plotting.plot_posterior_2d(path, flat, reference, title=title)
  else:
    truth_mean = transform.ground_truth_mean
    truth_std = transform.ground_truth_standard_deviation
    plotting.plot_marginals(
        path, flat.mean(0), flat.std(0),
        None if truth_mean is None else _flat_truth(truth_mean),
        None if truth_std is None else _flat_truth(truth_std), title=title)
  tmp = os.path.join(out_dir, 'metrics.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(dict(metrics, neg_elbo_per_step=[float(v) for v in
                                               result.losses]), f, indent=1)
  os.replace(tmp, os.path.join(out_dir, 'metrics.json'))
