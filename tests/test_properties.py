"""Properties of the bijector and solvers over random configurations
(Hypothesis): event sizes, batch shapes, dtypes, time spans, solver x trace
x gradient mode, conditional keyword arguments and seeds.

Profiles (tests/conftest.py): `ci` (the default: few examples per property,
derandomized, so a run is reproducible) and `long`
(`HYPOTHESIS_PROFILE=long pytest tests/test_properties.py`). Every bug a
search found is kept below as an explicit `@example`.
"""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from hypothesis import assume, example, given, note, settings
from hypothesis import strategies as st

import tfp_ffjord
from tfp_ffjord import ode
from tfp_ffjord import training

tfd = tfp.distributions

# How far apart two computations of one quantity may be, per dtype: the
# solvers run at rtol = atol = TOL[dtype] (fixed-step ones with enough
# steps for a like error on these small, smooth dynamics).
TOL = {tf.float32: 1e-5, tf.float64: 1e-9}
ROUNDTRIP_ATOL = {tf.float32: 2e-4, tf.float64: 1e-6}
# log|det J| from the augmented ODE against slogdet of the autodiff
# Jacobian of the solve: both approximate the flow's, to solver error.
SLOGDET_ATOL = {tf.float32: 2e-3, tf.float64: 1e-5}
# eager, tf.function and XLA run the same steps: rounding apart.
MODES_ATOL = {tf.float32: 1e-4, tf.float64: 1e-9}
RK4_STEPS = {tf.float32: 16, tf.float64: 128}
# The properties that cost seconds an example (every solve and its gradient
# traced or compiled anew) try fewer examples in the `ci` profile, to keep
# the suite within its budget; other profiles keep their own count.
HEAVY_EXAMPLES = 3
_heavy = (settings(max_examples=HEAVY_EXAMPLES)
          if os.environ.get('HYPOTHESIS_PROFILE', 'ci') == 'ci'
          else (lambda test: test))

SOLVERS = ('dopri5', 'tsit5', 'rk4')
GRADIENTS = ('adjoint', 'backprop')
TRACES = ('exact', 'hutchinson')
# (initial_time, final_time): TFP's, shifted, through zero, short.
# (A span with final_time <= initial_time is refused at construction:
# `test_invalid_input_raises_a_clear_error_never_nan`.)
SPANS = ((0., 1.), (0.5, 1.25), (-0.75, 0.25), (2., 2.125))


def _solver(name, gradient, dtype):
  tol = TOL[dtype]
  if name == 'rk4':
    return ode.RK4(num_steps=RK4_STEPS[dtype], gradient=gradient)
  cls = {'dopri5': ode.DormandPrince, 'tsit5': ode.Tsit5}[name]
  return cls(rtol=tol, atol=tol, gradient=gradient)


@st.composite
def configurations(draw, traces=TRACES):
  return dict(
      event=draw(st.integers(1, 4)),
      batch=draw(st.sampled_from([(), (1,), (3,), (2, 3)])),
      dtype=draw(st.sampled_from([tf.float32, tf.float64])),
      span=draw(st.sampled_from(SPANS)),
      solver=draw(st.sampled_from(SOLVERS)),
      gradient=draw(st.sampled_from(GRADIENTS)),
      trace=draw(st.sampled_from(traces)),
      conditional=draw(st.booleans()),
      seed=draw(st.integers(0, 2**16)))


def _build(c, validate_args=False):
  """The bijector, an input batch, and the keyword arguments of a call."""
  dtype, event = c['dtype'], c['event']
  tf.random.set_seed(c['seed'])
  keys = ('cond',) if c['conditional'] else ()
  dynamics = tfp_ffjord.MLPODE([8], event, context_keys=keys)
  trace = {'exact': tfp_ffjord.trace_jacobian_exact,
           'hutchinson': tfp_ffjord.trace_jacobian_hutchinson}[c['trace']]
  bijector = tfp_ffjord.FFJORD(
      dynamics, ode_solve_fn=_solver(c['solver'], c['gradient'],
                                     dtype).solve,
      trace_augmentation_fn=trace, initial_time=c['span'][0],
      final_time=c['span'][1], dtype=dtype, validate_args=validate_args)
  rng = np.random.default_rng(c['seed'])
  x = tf.constant(rng.normal(size=c['batch'] + (event,)), dtype)
  kwargs = {}
  if c['conditional']:
    kwargs['cond'] = tf.constant(rng.normal(size=c['batch'] + (1,)), dtype)
  if c['trace'] == 'hutchinson':
    kwargs['seed'] = c['seed']
  note(f'x shape {x.shape}, kwargs {sorted(kwargs)}')
  return bijector, x, kwargs


def _close(a, b, atol, what):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), what
  err = float(np.max(np.abs(a - b), initial=0.))
  assert err <= atol, f'{what}: max error {err:.3g} > {atol:g}'


@given(configurations())
def test_inverse_undoes_forward_and_log_dets_agree(c):
  bijector, x, kwargs = _build(c)
  y = bijector.forward(x, **kwargs)
  assert y.shape == x.shape and y.dtype == c['dtype']
  _close(bijector.inverse(y, **kwargs), x, ROUNDTRIP_ATOL[c['dtype']],
         'inverse(forward(x))')
  fldj = bijector.forward_log_det_jacobian(x, 1, **kwargs)
  assert fldj.shape == c['batch']
  ildj = bijector.inverse_log_det_jacobian(y, 1, **kwargs)
  if c['trace'] == 'exact':
    _close(fldj, -ildj, ROUNDTRIP_ATOL[c['dtype']], 'fldj + ildj(y)')
  else:
    # A stochastic estimate, but a deterministic one for a given seed.
    _close(bijector.forward_log_det_jacobian(x, 1, **kwargs), fldj, 0.,
           'fldj, same seed')


@pytest.mark.slow
@_heavy
@given(configurations(traces=('exact',)))
def test_log_det_is_slogdet_of_the_autodiff_jacobian(c):
  bijector, x, kwargs = _build(c)
  flat = tf.reshape(x, [-1, c['event']])
  cond = kwargs.get('cond')

  def forward(points):
    shaped = tf.reshape(points, tf.shape(x))
    extra = {} if cond is None else {'cond': cond}
    return tf.reshape(bijector.forward(shaped, **extra), [-1, c['event']])

  with tf.GradientTape(persistent=True) as tape:
    tape.watch(flat)
    y = forward(flat)
  # One backward pass per output coordinate (at most 4): far cheaper here
  # than vectorising the solver loop.
  jacobian = tape.batch_jacobian(y, flat, experimental_use_pfor=False)
  _, logdet = np.linalg.slogdet(jacobian.numpy())
  fldj = bijector.forward_log_det_jacobian(x, 1, **kwargs)
  _close(tf.reshape(fldj, [-1]), logdet, SLOGDET_ATOL[c['dtype']],
         'fldj vs slogdet')


@pytest.mark.slow
@_heavy
@given(configurations())
def test_one_solve_per_log_prob_and_gradients_reach_every_variable(c):
  bijector, x, kwargs = _build(c)
  solves = []
  solve = bijector._ode_solve_fn   # pylint: disable=protected-access

  def counting(*args, **kw):
    solves.append(1)
    return solve(*args, **kw)

  bijector._ode_solve_fn = counting   # pylint: disable=protected-access
  base = tfd.MultivariateNormalDiag(tf.zeros([c['event']], c['dtype']))
  flow = tfd.TransformedDistribution(base, bijector)
  bijector.forward(x, **kwargs)   # builds the dynamics' variables
  del solves[:]
  with tf.GradientTape() as tape:
    log_prob = flow.log_prob(x, bijector_kwargs=kwargs)
    loss = -tf.reduce_mean(log_prob)
  assert len(solves) == 1, len(solves)
  assert log_prob.shape == c['batch']
  assert np.all(np.isfinite(log_prob.numpy()))
  variables = bijector.trainable_variables
  assert variables
  grads = tape.gradient(loss, variables)
  for v, g in zip(variables, grads):
    assert g is not None, v.name
    assert np.all(np.isfinite(g.numpy())), v.name
    assert np.any(g.numpy() != 0), v.name


@pytest.mark.slow
@_heavy
@given(configurations(), st.sampled_from(['function', 'xla']))
def test_eager_function_and_xla_agree(c, mode):
  # One dtype, solver and gradient per mode is enough for compiled runs
  # (each compilation costs seconds); the search picks which.
  bijector, x, kwargs = _build(c)

  def fn(points):
    return (bijector.forward(points, **kwargs),
            bijector.forward_log_det_jacobian(points, 1, **kwargs))

  want = fn(x)
  got = tf.function(fn, jit_compile=(mode == 'xla'))(x)
  for name, a, b in zip(('forward', 'fldj'), got, want):
    _close(a, b, MODES_ATOL[c['dtype']], f'{mode} {name}')


@given(configurations(traces=('exact',)),
       st.sampled_from(['nan', 'inf', 'event', 'int', 'rank0', 'span']))
def test_invalid_input_raises_a_clear_error_never_nan(c, fault):
  if fault == 'span':   # backwards or empty: refused when built
    c = dict(c, span=(c['span'][1], c['span'][0] - c['seed'] % 2))
    with pytest.raises(ValueError, match='`final_time` must be greater'):
      _build(c)
    return
  bijector, x, kwargs = _build(c, validate_args=True)
  if fault in ('nan', 'inf'):
    assume(x.shape.num_elements() > 0)
    bad = x.numpy().copy()
    bad.reshape(-1)[0] = np.nan if fault == 'nan' else np.inf
    x, error, match = (tf.constant(bad), tf.errors.InvalidArgumentError,
                       'NaN or Inf')
  elif fault == 'event':
    x = tf.concat([x, x[..., :1]], -1)
    error, match = ValueError, r'must have shape \[\.\.\., %d\]' % c['event']
  elif fault == 'int':
    x = tf.cast(x, tf.int32)
    error, match = TypeError, '`x` must have dtype'
  else:
    x = tf.constant(1., c['dtype'])
    error, match = ValueError, 'must have shape'
  with pytest.raises(error, match=match):
    bijector.forward(x, **kwargs)


# ------------------------------------------------ the command line's options

# Values an option may be given on the command line: valid ones by kind,
# and text no option of any kind accepts.
VALID_TEXT = {
    'positive-int': st.sampled_from(['1', '2', '3']),
    'int': st.sampled_from(['0', '7', '-3']),
    'non-negative-int': st.sampled_from(['0', '7']),
    'positive': st.sampled_from(['0.5', '1e-3', '2']),
    'non-negative': st.sampled_from(['0', '0.01']),
    'sizes': st.sampled_from(['4', '4,4']),
}
INVALID_TEXT = st.sampled_from(
    ['-1', '-3', 'abc', 'nan', 'inf', '', '4,,4', '1e999', '0x10', '--',
     ' '])
# Kept to small data and models, so that an option set that is valid trains
# in a second or two: the 2-D and 1-D toy sets, not the image sets.
TOY_DATASETS = ('moons', '8gaussians', 'circles', 'gaussian1d', 'pinwheel')
# Every run is this small (a drawn option of the same name wins).
TINY_RUN = {'--num-train': '64', '--num-test': '32', '--batch-size': '32',
            '--eval-batch-size': '64', '--epochs': '1', '--blocks': '1',
            '--hidden': '4', '--num-steps': '2', '--solver': 'rk4'}


@st.composite
def command_lines(draw):
  from tfp_ffjord import cli   # pylint: disable=g-import-not-at-top
  options = {}
  # Half the command lines hold some text no option accepts; the other half
  # only values of the right kind (which may still clash with each other).
  broken = draw(st.booleans())
  for field, flags, _ in cli.config_options():
    kind = field.metadata['kind']
    if field.name == 'jit_compile' or not draw(st.booleans()):
      continue   # left out (XLA off: compiling would take most of a run)
    flag = draw(st.sampled_from(flags))
    if kind == 'flag':
      options[flag] = None
    elif broken and draw(st.integers(0, 4)) == 0:
      options[flag] = draw(INVALID_TEXT)
    elif kind == 'choice':
      choices = field.metadata['choices']
      if field.name == 'dataset':
        choices = TOY_DATASETS
      options[flag] = draw(st.sampled_from(choices))
    else:
      options[flag] = draw(VALID_TEXT[kind])
  argv = ['train', '--no-jit', '--no-progress']
  for flag, value in {**TINY_RUN, **options}.items():
    argv += [flag] if value is None else [f'{flag}={value}']
  return argv


@given(argv=command_lines())
# Found by the search: exited 1, naming the field `batch_size`.
@example(argv=['train', '--no-jit', '--no-progress', '--num-train=1',
               '--batch-size=32', '--epochs=1', '--blocks=1', '--hidden=4',
               '--num-steps=2', '--solver=rk4'])
# Found by the search: a negative seed passed the option's check and failed
# in NumPy ("expected non-negative integer", naming no option).
@example(argv=['train', '--no-jit', '--no-progress', '--num-train=64',
               '--num-test=32', '--batch-size=32', '--epochs=1', '--blocks=1',
               '--hidden=4', '--num-steps=2', '--solver=rk4', '--seed=-3'])
# Found by the search: one training point, so the density plot's extent
# had no width (ZeroDivisionError after training).
@example(argv=['train', '--no-jit', '--no-progress', '--num-train=1',
               '--num-test=32', '--batch-size=1', '--epochs=1', '--blocks=1',
               '--hidden=4', '--num-steps=2', '--solver=rk4'])
# Found by the search: named the field as `model='conv'`.
@example(argv=['train', '--no-jit', '--no-progress', '--num-train=64',
               '--num-test=32', '--batch-size=32', '--epochs=1', '--blocks=1',
               '--hidden=4', '--num-steps=2', '--solver=rk4', '--model=conv'])
def test_any_train_options_run_or_exit_2_naming_one(argv, tmp_path_factory,
                                                     capfd):
  from tfp_ffjord import cli   # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp('run'))
  note(' '.join(argv))
  code = cli.main(argv + ['--out', out, '--overwrite'])
  _, err = capfd.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  if code == 0:
    with open(f'{out}/metrics.json') as f:
      import json   # pylint: disable=g-import-not-at-top
      metrics = json.load(f)
    assert len(metrics['epochs']) == 1
    assert np.isfinite(metrics['epochs'][0]['train_loss'])
    return
  assert code == 2, (code, err)
  assert len(lines) == 1 and lines[0].startswith('tfp-ffjord: error:'), err
  # It names an option the command line gave (by any of its spellings).
  given = {a.split('=')[0] for a in argv if a.startswith('--')}
  spellings = set(given)
  for _, flags, _ in cli.config_options():
    if given & set(flags):
      spellings |= set(flags)
  assert any(f in lines[0] for f in spellings), err


# A value of each kind, and values no kind accepts where it is not theirs.
PYTHON_VALUES = st.sampled_from(
    [None, True, False, 0, 1, 3, -2, 0.5, 1e-3, -0.5, float('nan'),
     float('inf'), 'moons', 'tanh', '', (4,), (4, 4), (), (0,), [8], 'x' * 3,
     2**40])


def _valid_value(field):
  kind = field.metadata['kind']
  return {
      'positive-int': st.integers(1, 5),
      'non-negative-int': st.integers(0, 5),
      'int': st.integers(-5, 5),
      'positive': st.floats(1e-3, 10.),
      'non-negative': st.floats(0., 10.),
      'choice': st.sampled_from(field.metadata.get('choices') or ('',)),
      'flag': st.booleans(),
      'sizes': st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple),
  }[kind]


@st.composite
def config_fields(draw):
  """A few fields, most given a value of their kind, some anything."""
  fields = dataclasses.fields(training.TrainConfig)
  chosen = draw(st.lists(st.sampled_from(fields), max_size=6,
                         unique_by=lambda f: f.name))
  return {f.name: draw(st.one_of(_valid_value(f), _valid_value(f),
                                 PYTHON_VALUES)) for f in chosen}


@settings(max_examples=200)   # milliseconds each: search more
@given(fields=config_fields())
def test_train_config_accepts_or_names_the_field(fields):
  """`TrainConfig(**fields)` either builds or raises `ValueError` naming a
  field it was given (never another exception)."""
  try:
    config = training.TrainConfig(**fields)
  except ValueError as e:
    assert any(f'`{name}' in str(e) for name in fields), str(e)
    return
  by_name = {f.name: f for f in dataclasses.fields(training.TrainConfig)}
  for name, value in fields.items():
    got = getattr(config, name)
    assert got == (tuple(value) if isinstance(value, list) else value), name
    assert _fits(by_name[name], value), (name, value)


def _fits(field, value):
  """Whether `value` is what `field` may hold (the test's own statement of
  the kinds, not the package's check)."""
  if value is None:
    return field.default is None
  kind = field.metadata['kind']
  is_int = isinstance(value, int) and not isinstance(value, bool)
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  finite = number and np.isfinite(value)
  return {
      'positive-int': is_int and value >= 1,
      'non-negative-int': is_int and value >= 0,
      'int': is_int,
      'positive': finite and value > 0,
      'non-negative': finite and value >= 0,
      'choice': value in field.metadata.get('choices', ()),
      'flag': isinstance(value, bool),
      'sizes': isinstance(value, (tuple, list)) and len(value) > 0 and all(
          isinstance(h, int) and not isinstance(h, bool) and h >= 1
          for h in value),
  }[kind]
