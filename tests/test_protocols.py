"""Declared protocols, solver failures as data, and the name registry."""

import functools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfp_ffjord
from tfp_ffjord import datasets
from tfp_ffjord import ode
from tfp_ffjord import protocols
from tfp_ffjord import registry
from tfp_ffjord import trace as trace_lib
from tfp_ffjord.training import model as model_lib

# Steps of a solve that cannot reach t = 1 within its budget.
TOO_FEW_STEPS = 2


def _decay_solve(solver, x):
  return solver.solve(lambda t, y: -y, 0., x, [1.]).states[-1]


# --------------------------------------------------------- checked_function


def test_checked_function_matches_statuses_to_the_trace_that_ran():
  # Two concrete functions with different solves: each call must be
  # checked against its own trace's solves.
  good, bad = ode.RK4(num_steps=4), ode.Tsit5(max_num_steps=TOO_FEW_STEPS,
                                              rtol=1e-9, atol=1e-9)

  @ode.checked_function(jit_compile=True)
  def f(x):
    if x.shape[0] == 1:
      return _decay_solve(good, x)
    return _decay_solve(good, x) + _decay_solve(bad, x)

  with pytest.raises(ode.SolverError) as first:
    f(tf.ones([2]))
  np.testing.assert_allclose(f(tf.ones([1])).numpy(), [np.exp(-1.)],
                             rtol=1e-3)
  with pytest.raises(ode.SolverError) as again:
    f(tf.ones([2]))
  for info in (first, again):
    error = info.value
    assert (error.solver, error.status, error.max_num_steps) == (
        'Tsit5', ode.Status.MAX_NUM_STEPS_EXCEEDED, TOO_FEW_STEPS)
    assert error.num_steps == TOO_FEW_STEPS and error.time_reached < 1.
    assert 'max_num_steps' in error.hint


@pytest.mark.parametrize('jit', [True, False], ids=['xla', 'function'])
def test_checked_function_raises_solver_error_with_and_without_xla(jit):
  solver = ode.Tsit5(max_num_steps=TOO_FEW_STEPS, rtol=1e-9, atol=1e-9)
  f = ode.checked_function(lambda x: _decay_solve(solver, x),
                           jit_compile=jit)
  with pytest.raises(ode.SolverError, match='Tsit5 failed: exceeded'):
    f(tf.ones([3]))


@pytest.mark.parametrize('jit', [True, False], ids=['xla', 'function'])
def test_checked_while_loop_carries_a_failure_out_and_stops_there(jit):
  # Iteration i solves dy/dt = -rate * y with rate = 4^i: Tsit5 takes 3, 7,
  # 16, 29 steps for i = 0..3, so a budget of 12 fails from i = 2 on.
  solver = ode.Tsit5(max_num_steps=12, rtol=1e-3, atol=1e-6)
  first_bad = 2
  counter = tf.Variable(0)

  def body(i, total):
    rate = tf.pow(4., tf.cast(i, tf.float32))
    y = solver.solve(lambda t, y: -rate * y, 0., tf.ones([2]), [1.])
    counter.assign_add(1)
    return (total + tf.reduce_sum(y.states[-1]),)

  @ode.checked_function(jit_compile=jit)
  def run(n):
    return ode.checked_while_loop(body, n, (tf.constant(0.),))

  done, (total,) = run(tf.constant(2))   # both iterations succeed
  assert int(done) == 2
  np.testing.assert_allclose(
      float(total), 2 * (np.exp(-1.) + np.exp(-4.)), rtol=1e-2)
  counter.assign(0)
  with pytest.raises(ode.SolverError) as info:
    run(tf.constant(6))
  assert info.value.solver == 'Tsit5'
  assert info.value.status == ode.Status.MAX_NUM_STEPS_EXCEEDED
  assert 0. < info.value.time_reached < 1.
  assert int(counter.numpy()) <= first_bad + 1   # stopped at the failure
  with pytest.raises(RuntimeError, match='checked_function'):
    tf.function(lambda: ode.checked_while_loop(body, 1, (tf.constant(0.),)))()


def test_eager_failures_raise_solver_error_for_forward_and_adjoint():
  solver = ode.Tsit5(max_num_steps=TOO_FEW_STEPS, rtol=1e-9, atol=1e-9)
  with pytest.raises(ode.SolverError) as info:
    _decay_solve(solver, tf.ones([3]))
  assert info.value.stage is None
  assert isinstance(info.value, tf.errors.InvalidArgumentError)
  # The forward solve succeeds; the adjoint's backward solve cannot.
  backward = ode.Tsit5(max_num_steps=TOO_FEW_STEPS, rtol=1e-9, atol=1e-9)
  adjoint = ode.RK4(num_steps=4, gradient='adjoint',
                    make_adjoint_solver_fn=lambda: backward)
  x = tf.ones([3])
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = adjoint.solve(lambda t, y: -y, 0., x, [0.5, 1.]).states[-1]
  with pytest.raises(ode.SolverError) as info:
    tape.gradient(y, x)
  assert info.value.stage == 'adjoint backward solve'
  assert 'in the adjoint backward solve' in str(info.value)
  # The bound named is the backward solver's, per segment (its one loop
  # over both segments may take twice that).
  assert info.value.max_num_steps == TOO_FEW_STEPS


# ------------------------------------------------------------- protocols


def _nfe(bijector, x, **kwargs):
  return int(bijector.solve_inverse(x, **kwargs).diagnostics
             .num_ode_fn_evaluations)


@pytest.mark.parametrize('wrap', ['method', 'partial', 'lambda'])
@pytest.mark.matrix
def test_regularizers_stay_out_of_error_control_through_a_partial(wrap):
  # sin(4z + 3t) makes the regulariser rates (f**2) harder to integrate
  # than the flow: in the error norm they cost 338 instead of 284 NFE.
  solver = ode.Tsit5(rtol=1e-5, atol=1e-8)
  solve = {'method': solver.solve,
           'partial': functools.partial(solver.solve, constants=None),
           'lambda': lambda **kwargs: solver.solve(**kwargs)}[wrap]
  bij = tfp_ffjord.FFJORD(
      lambda t, z: tf.sin(4. * z + 3. * t), ode_solve_fn=solve,
      trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  x = tf.random.stateless_normal([16, 2], seed=[2, 3]) * 2.
  declared = wrap != 'lambda'   # a lambda hides the solver: TFP's contract
  assert protocols.declares(solve, protocols.ERROR_COMPONENTS) == declared
  assert (_nfe(bij, x, regularize=True) == _nfe(bij, x)) == declared


def test_undeclared_solvers_and_traces_get_tfps_contract():
  solver = ode.Tsit5()
  assert not protocols.declares(lambda **kw: solver.solve(**kw),
                                protocols.ERROR_COMPONENTS)
  fixed = functools.partial(solver.solve, error_components=1)
  assert not protocols.declares(fixed, protocols.ERROR_COMPONENTS)
  hutchinson = functools.partial(trace_lib.trace_jacobian_hutchinson,
                                 num_samples=2)
  assert protocols.declares(hutchinson, protocols.SEED)
  assert protocols.declares(hutchinson, protocols.REGULARIZE)

  def plain_trace(ode_fn, state_shape, dtype, seed=None):
    return trace_lib.trace_jacobian_exact(ode_fn, state_shape, dtype)

  bij = tfp_ffjord.FFJORD(lambda t, z: -z, trace_augmentation_fn=plain_trace)
  with pytest.raises(ValueError, match="does not declare a `seed`"):
    bij.forward(tf.ones([2, 2]), seed=1)
  with pytest.raises(ValueError, match="declares 'regularize'"):
    bij.solve_forward(tf.ones([2, 2]), regularize=True)
  declared = protocols.accepts(protocols.SEED)(plain_trace)
  bij = tfp_ffjord.FFJORD(lambda t, z: -z, trace_augmentation_fn=declared)
  np.testing.assert_allclose(bij.forward(tf.ones([2, 2]), seed=1).numpy(),
                             np.full([2, 2], np.exp(-1.)), rtol=1e-5)
  with pytest.raises(ValueError, match='Unknown capabilities'):
    protocols.accepts('sed')


def test_trace_functions_check_the_state_they_are_given():
  augmented = trace_lib.trace_jacobian_exact(lambda t, z: -z, [2, 2],
                                             tf.float32, regularize=True)
  with pytest.raises(ValueError, match='must hold 4 parts'):
    augmented(0., (tf.ones([2, 2]), tf.zeros([2, 2])))


# --------------------------------------------------------------- registry


def test_registry_names_resolve_to_what_they_say():
  for name in registry.SOLVERS:
    cls = registry.resolve(registry.SOLVERS, name, ode)
    assert issubclass(cls, ode.Solver)
    assert issubclass(cls, ode.AdaptiveSolver) == (
        name in registry.ADAPTIVE_SOLVERS)
  for name in registry.TRACES:
    assert callable(model_lib.make_trace(name))
  for name in registry.ACTIVATIONS:
    fn = registry.resolve(registry.ACTIVATIONS, name, tf)
    assert fn(tf.constant(0.5)).shape == ()
  assert tuple(registry.GRADIENT_MODES) == ode.solvers.GRADIENT_MODES
  assert datasets.NAMES == registry.DATASET_NAMES
  for name, info in registry.DATASETS.items():
    data = datasets.load(name, num_train=20, num_test=10)
    assert data.dim == info.dim, name
    assert (data.train_labels is not None) == info.labelled, name
  with pytest.raises(ValueError, match='expected one of tsit5'):
    registry.resolve(registry.SOLVERS, 'rk45', ode)


def test_config_and_cli_parse_without_tensorflow():
  code = ('import sys\n'
          'from tfp_ffjord import cli\n'
          'from tfp_ffjord.training import config\n'
          'config.TrainConfig(dataset="rings", solver="rk4")\n'
          'cli.build_parser().parse_args(["train", "--epochs", "3"])\n'
          'assert "tensorflow" not in sys.modules, "TensorFlow was imported"\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  subprocess.run([sys.executable, '-c', code], check=True, env=env,
                 timeout=120)


# ------------------------------------------------------------- autograph


def test_autograph_leaves_the_package_alone():
  """Like TFP, our code is never converted by a `tf.function`'s autograph
  (its control flow is explicit; converting it cost ~7 s a process)."""
  from tfp_ffjord import _autograph  # pylint: disable=g-import-not-at-top
  bijector = tfp_ffjord.FFJORD(tfp_ffjord.MLPODE([4], 2))
  for fn in (ode.RK4(num_steps=2).solve, ode.Tsit5().solve,
             bijector.solve_forward,
             bijector.solve_inverse, tfp_ffjord.trace_jacobian_exact,
             tfp_ffjord.trace_jacobian_hutchinson, model_lib.FlowModel):
    assert _autograph.is_skipped(fn), fn
  assert not _autograph.is_skipped(_decay_solve)   # user code still is

  # Traced with autograph on, the solve still works and is not converted:
  # a Python `if` on a Tensor inside our code would need conversion; the
  # user's dynamics are called as plain Python, as TFP's solvers call them.
  @tf.function
  def solve(x):
    return _decay_solve(ode.RK4(num_steps=8), x)

  np.testing.assert_allclose(solve(tf.ones([2])).numpy(), np.exp(-1.),
                             rtol=1e-4)


def test_the_ode_package_imports_nothing_above_it():
  """`tfp_ffjord.ode` stands alone: of the package it imports only itself
  and the leaf modules below everything (protocols, the XLA lowerings,
  the autograph switch, the argument checks, the packing of small
  Tensors), never the bijectors, the training code or the
  registry of command-line names."""
  import ast  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  allowed = {'tfp_ffjord.ode', 'tfp_ffjord.protocols', 'tfp_ffjord._lowering',
             'tfp_ffjord._autograph', 'tfp_ffjord._checks',
             'tfp_ffjord._packing'}
  found = set()
  for path in pathlib.Path(ode.__file__).parent.glob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module.startswith('tfp_ffjord')):
        names = ([node.module] if node.module != 'tfp_ffjord' else
                 [f'tfp_ffjord.{a.name}' for a in node.names])
        found.update((path.name, n) for n in names)
      elif isinstance(node, ast.Import):
        found.update((path.name, a.name) for a in node.names
                     if a.name.startswith('tfp_ffjord'))
  assert found   # the walk saw the package's own imports
  above = sorted((f, n) for f, n in found
                 if not any(n == a or n.startswith(a + '.') for a in allowed))
  assert not above, above


# The package's layers, bottom up (docs/architecture.md): a module imports
# from its own layer or those below, never above.
LAYERS = (
    ('leaves', ('protocols', 'registry', '_lowering', '_checks', '_packing',
                '_autograph')),
    ('ode', ('ode',)),
    ('dynamics and trace', ('trace', 'dynamics', 'block_stacking')),
    ('bijectors', ('bijector', 'stacked', 'multiscale', 'segments', 'fusion',
                   'flow_base', 'ffjord')),
    ('training', ('training', 'vi', 'datasets', 'plotting', 'baselines',
                  'sample_quality')),
    ('command line', ('cli', 'compilation_cache', '_stderr', '__main__')),
)


def test_every_module_imports_only_its_layer_and_those_below():
  import ast  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  layer_of = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
  root = pathlib.Path(ode.__file__).parent.parent
  upward, unplaced, checked = [], set(), 0
  for path in root.rglob('*.py'):
    top = path.relative_to(root).parts[0].removesuffix('.py')
    if top == '__init__':   # the package's lazy facade
      continue
    if top not in layer_of:
      unplaced.add(top)
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module.startswith('tfp_ffjord')):
        names = ([node.module] if node.module != 'tfp_ffjord' else
                 [f'tfp_ffjord.{a.name}' for a in node.names])
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.startswith('tfp_ffjord')]
      for name in names:
        checked += 1
        parts = name.split('.')
        theirs = layer_of.get(parts[1]) if len(parts) > 1 else None
        if theirs is None or theirs > layer_of[top]:
          upward.append((str(path.relative_to(root)), name))
  assert checked > 100, checked   # the walk saw the package's imports
  assert not unplaced, f'modules in no layer: {sorted(unplaced)}'
  assert not upward, upward


# Size limits (docs/contributing.md): a module over 600 lines, a class over
# 300 or a function over 120 is split; a function takes at most 8
# parameters, except the facades whose signatures mirror TFP's (their
# leading parameters are TFP's, in TFP's order; our extras follow).
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 600, 300, 120
MAX_PARAMETERS = 8
TFP_FACADES = {
    'bijector.py': {'FFJORD.__init__'},   # tfb.FFJORD
    'multiscale.py': {'MultiscaleFFJORD.__init__'},   # tfb.FFJORD's
    'stacked.py': {'StackedFFJORD.__init__'},   # tfb.FFJORD's
    'ode/solvers.py': {'Solver.solve',   # tfp.math.ode.Solver.solve
                       'FixedStepSolver.__init__',   # and the step size
                       'AdaptiveSolver.__init__'},   # DormandPrince's
    'trace.py': {'trace_jacobian_hutchinson'},
    'vi/fitting.py': {'fit'},   # tfp.vi.fit_surrogate_posterior
    'vi/surrogates.py': {'build_ffjord_surrogate_posterior'},  # the builders'
    'vi/staged.py': {'build_staged_ffjord_surrogate_posterior'},  # likewise
}


def _sizes_over_the_limits(root):
  import ast  # pylint: disable=g-import-not-at-top
  over, seen = [], 0
  for path in sorted(root.rglob('*.py')):
    rel = str(path.relative_to(root))
    text = path.read_text()
    seen += 1
    if text.count('\n') > MAX_MODULE_LINES:
      over.append((rel, 'module', text.count('\n')))

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef,
                              ast.AsyncFunctionDef)):
          name = prefix + child.name
          lines = child.end_lineno - child.lineno + 1
          if isinstance(child, ast.ClassDef):
            if lines > MAX_CLASS_LINES:
              over.append((rel, name, lines))
          else:
            args = child.args
            count = (len(args.posonlyargs) + len(args.args)
                     + len(args.kwonlyargs))
            if args.args and args.args[0].arg in ('self', 'cls'):
              count -= 1
            if lines > MAX_FUNCTION_LINES:
              over.append((rel, name, lines))
            if (count > MAX_PARAMETERS
                and name not in TFP_FACADES.get(rel, ())):
              over.append((rel, name, f'{count} parameters'))
          visit(child, name + '.')
    visit(ast.parse(text), '')
  return over, seen


def test_modules_classes_and_functions_stay_within_the_size_limits():
  root = pathlib.Path(ode.__file__).parent.parent
  over, seen = _sizes_over_the_limits(root)
  assert seen > 50, seen
  assert not over, over
