"""StackedFFJORD and segmented solves: K blocks in one loop, same numbers as
a chain of K FFJORDs (or K separate solves)."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import dynamics
from tfp_ffjord import ode
from tests.helpers import run_in_mode

tfb, tfd = tfp.bijectors, tfp.distributions

# Segmented solve vs separate solves, float64: the same steps in the same
# order; only XLA's reassociation differs (measured <= 2e-12).
SEGMENTED_ATOL = 1e-10
# StackedFFJORD vs a chain, float64, solver tolerance 1e-6: block-local times
# differ by rounding (t - k vs t), which moves adaptive steps by ~1e-16;
# measured <= 1e-7 on log_prob and gradients. A wrong block order, time map
# or missing log-det gives O(1).
STACK_ATOL = 1e-6
NUM_BLOCKS = 3


# ------------------------------------------------------------ segmented solve

RATES = (0.5, -1.0, 2.0, 0.3)


def _closed_form(y0, w):
  """`dy/dt = w r_k (1 + 0.1 t) y` on segment k = [k, k + 1]."""
  log_y, out = np.log(y0), []
  for k, r in enumerate(RATES):
    log_y = log_y + w * r * ((k + 1 + .05 * (k + 1) ** 2) - (k + .05 * k * k))
    out.append(np.exp(log_y))
  return np.stack(out)


SOLVERS = ('dopri5-backprop', 'tsit5-adjoint', 'rk4-backprop', 'rk4-adjoint')


def make_solver(name, rk4_steps=4):
  """`'method-gradient'` as a solver: adaptive at rtol 1e-6 / atol 1e-8,
  RK4 with `rk4_steps` steps (per segment)."""
  method, gradient = name.split('-')
  if method == 'rk4':
    return ode.RK4(num_steps=rk4_steps, gradient=gradient)
  cls = {'dopri5': ode.DormandPrince, 'tsit5': ode.Tsit5}[method]
  return cls(rtol=1e-6, atol=1e-8, gradient=gradient)


# Every solver and gradient under XLA; tf.function and eager for two.
SEGMENT_CASES = ([(name, 'xla') for name in SOLVERS]
                 + [('dopri5-backprop', 'function'), ('rk4-adjoint', 'eager')])


@pytest.mark.matrix
@pytest.mark.parametrize('name, mode', SEGMENT_CASES)
def test_segmented_solve_equals_separate_solves(name, mode):
  solver = make_solver(name, rk4_steps=20)
  rates = tf.constant(RATES, tf.float64)
  w = tf.Variable(1.5, dtype=tf.float64)
  seen = []

  def f(t, y, segment):
    seen.append(segment)
    return w * tf.gather(rates, segment) * y * (1. + 0.1 * t)

  ts = tf.constant([1., 2., 3., 4.], tf.float64)
  y0 = tf.constant([1.0, 2.0], tf.float64)

  def loss(states):
    return tf.reduce_sum(states[-1]) + tf.reduce_sum(states[1])

  def segmented(y0):
    with tf.GradientTape() as tape:
      tape.watch(y0)
      res = solver.solve(f, 0., y0, ts, segmented=True)
      value = loss(res.states)
    return (res.states, tape.gradient(value, [y0, w]),
            res.diagnostics.num_ode_fn_evaluations)

  def separate(y0):
    with tf.GradientTape() as tape:
      tape.watch(y0)
      y, outs, nfe = y0, [], 0
      for k in range(len(RATES)):
        res = solver.solve(lambda t, y, k=k: f(t, y, k), float(k), y,
                           ts[k:k + 1])
        y = res.states[-1]
        outs.append(y)
        nfe += res.diagnostics.num_ode_fn_evaluations
      states = tf.stack(outs)
      value = loss(states)
    return states, tape.gradient(value, [y0, w]), nfe

  states, grads, nfe = run_in_mode(segmented, mode)(y0)
  ref_states, ref_grads, ref_nfe = separate(y0)
  # The segment index reaches the dynamics as an int32 Tensor.
  assert all(tf.is_tensor(s) and s.dtype == tf.int32 for s in seen[:1])
  np.testing.assert_allclose(states, ref_states, rtol=0, atol=SEGMENTED_ATOL)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=0, atol=SEGMENTED_ATOL)
  assert int(nfe) == int(ref_nfe)
  # And both solve the ODE (closed form): RK4 with 20 steps a segment to
  # ~6e-5 relative, the adaptive pairs to ~1e-6.
  exact = _closed_form(y0.numpy(), 1.5)
  np.testing.assert_allclose(states, exact, rtol=2e-4)


def test_segmented_rejects_what_it_cannot_do():
  solver = ode.Tsit5()
  f = lambda t, y, segment: -y
  with pytest.raises(ValueError, match='ChosenBySolver'):
    solver.solve(f, 0., tf.ones([2]), tfp.math.ode.ChosenBySolver(1.),
                 segmented=True)
  with pytest.raises(ValueError, match="named 'segment'"):
    solver.solve(f, 0., tf.ones([2]), [1.], segmented=True,
                 constants={'segment': tf.ones([])})


# ------------------------------------------------------------ stacked_call

def _mlps(sizes=((8, 8),) * NUM_BLOCKS, dtype=tf.float64, dim=2, seed=0):
  tf.random.set_seed(seed)
  mods = [tfp_ffjord.MLPODE(list(h), dim, name=f'block_{i}')
          for i, h in enumerate(sizes)]
  for m in mods:
    m(tf.zeros([], dtype), tf.zeros([1, dim], dtype))
  return mods


def test_stacked_call_is_each_module_and_feeds_its_gradients():
  mods = _mlps()
  call = dynamics.stacked_call(mods)
  assert call is not None
  z = tf.random.normal([5, 2], dtype=tf.float64)
  t = tf.constant(0.3, tf.float64)
  variables = [v for mod in mods for v in mod.trainable_variables]
  for k, m in enumerate(mods):
    with tf.GradientTape(persistent=True) as tape:
      out = call(tf.constant(k), t, z)
      ref = m(t, z)
      loss, loss_ref = tf.reduce_sum(out ** 2), tf.reduce_sum(ref ** 2)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)
    g = tape.gradient(loss, variables)
    g_ref = tape.gradient(loss_ref, variables)
    assert sum(b is not None for b in g_ref) == len(m.trainable_variables)
    for a, b in zip(g, g_ref):
      if b is None:   # another block's weights: zero through the gather
        assert a is None or not np.any(tf.convert_to_tensor(a))
      else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)
  # The module reads its own variables again afterwards.
  assert all(isinstance(v, tf.Variable) for v in mods[0].variables)
  # Weights stacked once and passed in: the same values, and the gradient
  # reaches the variables through the stack.
  with tf.GradientTape(persistent=True) as tape:
    weights = call.stack()
    out = call(tf.constant(2), t, z, stacked_weights=weights)
    loss = tf.reduce_sum(out ** 2)
    loss_ref = tf.reduce_sum(mods[2](t, z) ** 2)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-14)
  g = tape.gradient(loss, variables)
  g_ref = tape.gradient(loss_ref, variables)
  for a, b in zip(g, g_ref):
    if b is None:
      assert a is None or not np.any(tf.convert_to_tensor(a))
    else:
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_stacked_call_declines_mixed_architectures():
  assert dynamics.stacked_call(_mlps(((8,), (4,)))) is None
  assert dynamics.stacked_call([lambda t, z: z]) is None


# ------------------------------------------------------------ StackedFFJORD

def _pair(mods, solve, trace, dtype=tf.float64):
  kw = dict(ode_solve_fn=solve, trace_augmentation_fn=trace, dtype=dtype,
            seed_salt='salt')
  stacked = tfp_ffjord.StackedFFJORD(mods, **kw)
  # The reference: one solve per block (a fused chain is one solve too).
  chain = tfb.Chain([tfp_ffjord.FFJORD(m, fuse=False, **kw)
                     for m in mods][::-1])
  return stacked, chain


def _flow(bijector, dtype=tf.float64):
  return tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros([2], dtype), tf.fill([2], tf.constant(.8, dtype))),
      bijector)


@pytest.mark.matrix
@pytest.mark.parametrize('name, mode',
                         [(name, 'xla') for name in SOLVERS
                          if name != 'rk4-adjoint']
                         + [('tsit5-adjoint', 'function')])
def test_stacked_equals_chain(name, mode):
  mods = _mlps()
  variables = [v for m in mods for v in m.trainable_variables]
  stacked, chain = _pair(mods, make_solver(name).solve,
                         tfp_ffjord.trace_jacobian_exact)
  assert stacked.segmented
  x = tf.random.stateless_normal([16, 2], [1, 2], dtype=tf.float64)

  def run(bijector):
    with tf.GradientTape() as tape:
      lp = _flow(bijector).log_prob(x)
      loss = tf.reduce_mean(lp)
    return bijector.forward(x), lp, tape.gradient(loss, variables)

  y, lp, grads = run_in_mode(lambda: run(stacked), mode)()
  y_ref, lp_ref, grads_ref = run_in_mode(lambda: run(chain), mode)()
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=STACK_ATOL)
  np.testing.assert_allclose(lp, lp_ref, rtol=0, atol=STACK_ATOL)
  for g, ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, ref, rtol=0, atol=STACK_ATOL)


@pytest.mark.slow
def test_stacked_round_trip_and_log_dets():
  mods = _mlps()
  stacked, _ = _pair(mods, make_solver('dopri5-backprop').solve,
                     tfp_ffjord.trace_jacobian_exact)
  x = tf.random.stateless_normal([8, 2], [3, 4], dtype=tf.float64)

  @tf.function(autograph=False)
  def run(x):
    y = stacked.forward(x)
    fldj = stacked.forward_log_det_jacobian(x, event_ndims=1)
    x_back = stacked.inverse(tf.identity(y))
    ildj = stacked.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    # The Jacobian of the forward map by autodiff, for slogdet: one
    # gradient per output coordinate (the rows of the batch are independent).
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      y = stacked.solve_forward(x).value
      columns = [y[:, i] for i in range(2)]
    jac = tf.stack([tape.gradient(c, x) for c in columns], 1)
    return x_back, fldj, ildj, jac

  x_back, fldj, ildj, jac = run(x)
  np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-5)
  np.testing.assert_allclose(fldj, -ildj, rtol=0, atol=1e-5)
  _, logdet = np.linalg.slogdet(jac.numpy())
  np.testing.assert_allclose(fldj, logdet, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_stacked_with_any_dynamics_and_any_solver():
  # Blocks of different architectures (no shared computation: every block
  # is evaluated and the segment's selected) ...
  mods = _mlps(((8,), (4, 4), (6,)))
  assert dynamics.stacked_call(mods) is None
  x = tf.random.stateless_normal([8, 2], [5, 6], dtype=tf.float64)
  stacked, chain = _pair(mods, make_solver('dopri5-backprop').solve,
                         tfp_ffjord.trace_jacobian_exact)
  np.testing.assert_allclose(_flow(stacked).log_prob(x),
                             _flow(chain).log_prob(x), rtol=0, atol=STACK_ATOL)
  # ... and a solver that does not declare 'segmented' (TFP's): one solve
  # per block, like the chain.
  tfp_solver = tfp.math.ode.DormandPrince(rtol=1e-6, atol=1e-8)
  stacked, chain = _pair(_mlps(), tfp_solver.solve,
                         tfp_ffjord.trace_jacobian_exact)
  assert not stacked.segmented
  np.testing.assert_allclose(_flow(stacked).log_prob(x),
                             _flow(chain).log_prob(x), rtol=0, atol=STACK_ATOL)
  nfe = stacked.last_diagnostics.num_ode_fn_evaluations
  assert int(nfe) > 0


@pytest.mark.slow
def test_stacked_hutchinson_and_regularisers_match_one_solve_per_block():
  """With a seed, the loop draws the probes the per-block path draws; the
  RNODE integrals are the sums over the blocks."""
  mods = _mlps()
  solver = make_solver('dopri5-backprop')
  kw = dict(trace_augmentation_fn=tfp_ffjord.trace_jacobian_hutchinson,
            dtype=tf.float64, seed_salt='salt')
  looped = tfp_ffjord.StackedFFJORD(mods, ode_solve_fn=solver.solve, **kw)
  # A lambda declares nothing: one solve per block.
  per_block = tfp_ffjord.StackedFFJORD(
      mods, ode_solve_fn=lambda **a: solver.solve(**a), **kw)
  assert looped.segmented and not per_block.segmented
  x = tf.random.stateless_normal([8, 2], [7, 8], dtype=tf.float64)
  a = looped.solve_inverse(x, regularize=True, seed=[1, 2])
  b = per_block.solve_inverse(x, regularize=True, seed=[1, 2])
  for u, v in zip(a[:2] + a[3:], b[:2] + b[3:]):
    np.testing.assert_allclose(u, v, rtol=0, atol=STACK_ATOL)
  # Another seed, other probes: the estimate moves.
  c = looped.solve_inverse(x, seed=[3, 4])
  assert np.max(np.abs(c.log_det_jacobian - a.log_det_jacobian)) > 1e-3
  # The kinetic energy is the sum of the per-block integrals.
  z, total = x, 0.
  for block in reversed(looped.blocks):
    r = block.solve_inverse(z, regularize=True, seed=[1, 2])
    z, total = r.value, total + r.kinetic_energy
  np.testing.assert_allclose(a.kinetic_energy, total, rtol=0, atol=STACK_ATOL)


def _gradient_graph_nodes(bijector, variables):
  """Every node (functions included) of a traced log_prob gradient."""
  @tf.function(autograph=False)
  def grad(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(_flow(bijector).log_prob(x))
    return tape.gradient(loss, variables)
  graph = grad.get_concrete_function(
      tf.TensorSpec([4, 2], tf.float64)).graph.as_graph_def()
  return list(graph.node) + [n for f in graph.library.function
                             for n in f.node_def]


def test_stacked_traces_the_dynamics_once():
  """The point of the loop: the graph of a 3-block log_prob gradient holds
  as many matrix products as a 1-block one (a chain holds 3 times as many)."""

  def matmuls(bijector, variables):
    nodes = _gradient_graph_nodes(bijector, variables)
    return collections.Counter(n.op for n in nodes)['MatMul']

  solve = make_solver('dopri5-backprop').solve
  trace = tfp_ffjord.trace_jacobian_exact
  mods = _mlps()
  one, _ = _pair(mods[:1], solve, trace)
  stacked, chain = _pair(mods, solve, trace)
  variables = [v for m in mods for v in m.trainable_variables]
  n_one = matmuls(one, variables)
  assert n_one > 0
  assert matmuls(stacked, variables) == n_one
  assert matmuls(chain, variables) == NUM_BLOCKS * n_one
  # The same chain with fusion on (the default): one copy, like stacked.
  fused = tfb.Chain([tfp_ffjord.FFJORD(m, ode_solve_fn=solve,
                                       trace_augmentation_fn=trace,
                                       dtype=tf.float64) for m in mods][::-1])
  assert matmuls(fused, variables) == n_one


def test_stacked_gradient_loops_carry_stacked_weights_not_each_block():
  """The blocks' weights enter the solve stacked: the backward loop of a
  3-block gradient carries as many loop variables as a 1-block one (the
  weights' gradients accumulate as `[K, ...]` stacks), not 3 times the
  variables."""

  def widest_loop(bijector, variables):
    nodes = _gradient_graph_nodes(bijector, variables)
    return max(len(n.attr['T'].list.type) for n in nodes
               if n.op in ('While', 'StatelessWhile'))

  for name in ('dopri5-backprop', 'tsit5-adjoint'):
    solve = make_solver(name).solve
    mods = _mlps()
    one, _ = _pair(mods[:1], solve, tfp_ffjord.trace_jacobian_exact)
    stacked, _ = _pair(mods, solve, tfp_ffjord.trace_jacobian_exact)
    variables = [v for m in mods for v in m.trainable_variables]
    assert widest_loop(stacked, variables) == widest_loop(one, variables), name


def test_adjoint_loops_do_not_carry_each_weight_tensors_adjoint():
  """The adjoint carries the parameters' adjoints (the stacked weights,
  passed into the solve as constants) as one flat vector. From MLPs with 1
  hidden layer (4 weight tensors) to 3 (8 tensors), the widest loop of the
  gradient grows by the 4 added tensors (each a loop invariant the
  dynamics read), not by their adjoints in every stage and step as well
  (it grew by 20 when each adjoint was a loop variable of its own: ~0.5 s
  more compilation for the seed model)."""

  def widest_loop(sizes):
    mods = _mlps(sizes=(sizes,) * NUM_BLOCKS)
    stacked, _ = _pair(mods, make_solver('tsit5-adjoint').solve,
                       tfp_ffjord.trace_jacobian_exact)
    variables = [v for m in mods for v in m.trainable_variables]
    nodes = _gradient_graph_nodes(stacked, variables)
    return max(len(n.attr['T'].list.type) for n in nodes
               if n.op in ('While', 'StatelessWhile'))

  added_tensors = 4
  assert widest_loop((8, 8, 8)) - widest_loop((8,)) <= added_tensors


def test_stacked_trajectory_runs_through_every_block():
  mods = _mlps()
  stacked, _ = _pair(mods, make_solver('tsit5-adjoint').solve,
                     tfp_ffjord.trace_jacobian_exact)
  x = tf.random.stateless_normal([6, 2], [9, 9], dtype=tf.float64)
  times, states, log_dets = stacked.trajectory(x, num_times=4)
  assert states.shape[0] == times.shape[0] == 1 + NUM_BLOCKS * 3
  np.testing.assert_allclose(times.numpy()[[0, -1]], [0., NUM_BLOCKS])
  np.testing.assert_allclose(states[0], x)
  np.testing.assert_allclose(states[-1], stacked.forward(x), atol=1e-5)
  np.testing.assert_allclose(
      tf.reduce_sum(log_dets[-1], -1),
      stacked.forward_log_det_jacobian(x, event_ndims=1), atol=1e-5)


def test_stacked_in_a_tf1_session():
  graph = tf.Graph()
  with graph.as_default():
    mods = _mlps(dtype=tf.float32)
    stacked = tfp_ffjord.StackedFFJORD(
        mods, ode_solve_fn=ode.Tsit5(rtol=1e-5, atol=1e-5).solve,
        trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
    chain = tfb.Chain([tfp_ffjord.FFJORD(
        m, ode_solve_fn=ode.Tsit5(rtol=1e-5, atol=1e-5).solve,
        trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
                       for m in mods][::-1])
    x = tf.constant(np.random.RandomState(0).randn(8, 2), tf.float32)
    lp = _flow(stacked, tf.float32).log_prob(x)
    lp_ref = _flow(chain, tf.float32).log_prob(x)
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      a, b = sess.run([lp, lp_ref])
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_stacked_rejects_bad_blocks():
  with pytest.raises(ValueError, match='state_time_derivative_fns'):
    tfp_ffjord.StackedFFJORD([])
  with pytest.raises(TypeError, match=r'state_time_derivative_fns\[1\]'):
    tfp_ffjord.StackedFFJORD([lambda t, z: z, 3])


# ------------------------------------------------------------ StackedBlocks

# Block k of a StackedBlocks vs module k: the same operations on the same
# values (a gathered row instead of the variable), so equal to rounding.
BLOCKS_TOL = {tf.float32: 1e-6, tf.float64: 1e-14}


@pytest.mark.parametrize('mode', ['eager', 'function', 'xla'])
@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_stacked_blocks_are_the_modules_they_were_built_from(mode, dtype):
  mods = _mlps(dtype=dtype)
  stacked = dynamics.StackedBlocks(mods)
  assert stacked.num_blocks == NUM_BLOCKS
  # One [K, P] variable: every variable of a module, flattened.
  (packed,) = stacked.trainable_variables
  assert packed.shape == [NUM_BLOCKS, sum(
      int(np.prod(v.shape)) for v in mods[0].trainable_variables)]
  assert stacked.weights == [packed]
  z = tf.random.stateless_normal([5, 2], [3, 4], dtype=dtype)
  t = tf.constant(0.3, dtype)
  atol = BLOCKS_TOL[dtype]

  def run(k):
    with tf.GradientTape(persistent=True) as tape:
      out, ref = stacked.blocks[k](t, z), mods[k](t, z)
      loss, loss_ref = tf.reduce_sum(out ** 2), tf.reduce_sum(ref ** 2)
    return (out, ref, stacked.unpack(tape.gradient(loss, stacked.weights)),
            tape.gradient(loss_ref, mods[k].trainable_variables))

  for k in range(NUM_BLOCKS):
    out, ref, grads, grads_ref = run_in_mode(lambda k=k: run(k), mode)()
    np.testing.assert_allclose(out, ref, rtol=0, atol=atol)
    # Row k of each stacked gradient is module k's; the other rows are 0.
    for (path, _), g, g_ref in zip(stacked.block_values(k), grads,
                                   tape_order(mods[k], grads_ref)):
      g = np.asarray(tf.convert_to_tensor(g))
      np.testing.assert_allclose(g[k], g_ref, rtol=0, atol=atol)
      assert not np.any(np.delete(g, k, axis=0)), path


def tape_order(module, grads):
  """`grads` (in `module.trainable_variables` order) in `variable_paths`
  order."""
  index = {v.ref(): i for i, v in enumerate(module.trainable_variables)}
  return [grads[index[v.ref()]] for _, v in dynamics.variable_paths(module)]


@pytest.mark.parametrize('name', ['tsit5-backprop', 'tsit5-adjoint'])
def test_stacked_ffjord_on_stacked_blocks_equals_separate_modules(name):
  """The solve reads the stacked variables as they are: same log_prob and
  gradients (row k of a stacked gradient = block k's) as the same blocks
  held as separate modules, under XLA."""
  mods = _mlps()
  stacked = dynamics.StackedBlocks(mods)
  solve = make_solver(name).solve
  kw = dict(ode_solve_fn=solve, dtype=tf.float64, seed_salt='salt',
            trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  x = tf.random.stateless_normal([16, 2], [1, 2], dtype=tf.float64)

  def run(blocks, variables):
    with tf.GradientTape() as tape:
      lp = _flow(tfp_ffjord.StackedFFJORD(blocks, **kw)).log_prob(x)
      loss = tf.reduce_mean(lp)
    return lp, tape.gradient(loss, variables)

  lp, grads = run_in_mode(
      lambda: run(stacked.blocks, stacked.weights), 'xla')()
  grads = stacked.unpack(grads)
  separate = [[v for _, v in dynamics.variable_paths(m)] for m in mods]
  lp_ref, grads_ref = run_in_mode(lambda: run(mods, separate), 'xla')()
  np.testing.assert_allclose(lp, lp_ref, rtol=0, atol=SEGMENTED_ATOL)
  for j, g in enumerate(grads):
    np.testing.assert_allclose(
        g, np.stack([row[j] for row in grads_ref]), rtol=0,
        atol=SEGMENTED_ATOL)


def test_stacked_blocks_are_read_not_stacked():
  """What makes them cheaper than separate modules: the solve's weights are
  the stacked variables read as they are (no Pack, no gather) when the
  blocks come in order; out of order, one gather per variable."""

  def ops(modules):
    call = dynamics.stacked_call(modules)
    graph = tf.function(call.stack).get_concrete_function().graph
    return collections.Counter(op.type for op in graph.get_operations())

  mods = _mlps()
  stacked = dynamics.StackedBlocks(mods)
  assert len(stacked.weights) == 1                # packed
  in_order = ops(stacked.blocks)
  assert in_order['ReadVariableOp'] == 1
  assert in_order['Pack'] == 0 and in_order['GatherV2'] == 0
  assert in_order['ConcatV2'] == 0
  separate = ops(mods)                            # stacked, then packed
  assert separate['Pack'] == len(stacked.paths)
  assert separate['ConcatV2'] == 1
  assert ops(stacked.blocks[::-1])['GatherV2'] == 1
  # Out of order, the blocks still compute what they stand for.
  call = dynamics.stacked_call(stacked.blocks[::-1])
  z = tf.ones([2, 2], tf.float64)
  np.testing.assert_allclose(call(tf.constant(0), 0.5, z),
                             mods[-1](0.5, z), rtol=0, atol=1e-14)


class _Mixed(tf.Module):
  """Variables of two dtypes, one of them not trainable."""

  def __init__(self, seed):
    super().__init__(name=f'mixed_{seed}')
    rng = np.random.RandomState(seed)
    self.a = tf.Variable(rng.randn(2, 3).astype(np.float32), name='a')
    self.b = tf.Variable(rng.randn(4), name='b')                  # float64
    self.c = tf.Variable(np.float32(rng.randn()), trainable=False,
                         name='c')
    self.d = tf.Variable(rng.randn(3).astype(np.float32), name='d')

  def __call__(self, t, z):
    del t
    y = tf.reduce_sum(tf.matmul(z, self.a) * self.c, -1) + tf.reduce_sum(
        self.d)
    return y + tf.cast(tf.reduce_sum(self.b), tf.float32)


def test_stacked_blocks_pack_each_dtype_and_trainability_apart():
  mods = [_Mixed(seed) for seed in range(3)]
  stacked = dynamics.StackedBlocks(mods)
  paths = [p for p, _ in dynamics.variable_paths(mods[0])]
  assert list(stacked.paths) == paths == [('a',), ('b',), ('c',), ('d',)]
  # Groups in order of first appearance: float32 trainable (a, d),
  # float64 (b), float32 not trainable (c).
  assert [(w.dtype, w.trainable, w.shape) for w in stacked.weights] == [
      (tf.float32, True, [3, 9]), (tf.float64, True, [3, 4]),
      (tf.float32, False, [3, 1])]
  assert len(stacked.trainable_variables) == 2
  for k, m in enumerate(mods):
    for (path, value), (_, v) in zip(stacked.block_values(k),
                                     dynamics.variable_paths(m)):
      assert value.dtype == v.dtype, path
      np.testing.assert_array_equal(value, v)
  unpacked = stacked.unpack()
  for (_, v), u in zip(dynamics.variable_paths(mods[0]), unpacked):
    np.testing.assert_array_equal(u[0], v)
  for w, p in zip(stacked.weights, stacked.pack(unpacked)):
    np.testing.assert_array_equal(w, p)
  z = tf.ones([2, 2])
  for k, m in enumerate(mods):
    with tf.GradientTape() as tape:
      out = tf.reduce_sum(stacked.blocks[k](0., z))
    np.testing.assert_allclose(out, tf.reduce_sum(m(0., z)), rtol=1e-6)
    grads = stacked.unpack(
        [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(w)
         for g, w in zip(tape.gradient(out, stacked.weights),
                         stacked.weights)])
    # d out / d d = 2 per element, in row k only.
    expected = np.zeros([3, 3], np.float32)
    expected[k] = 2.
    np.testing.assert_allclose(grads[3], expected)


def test_stacked_blocks_reject_what_they_cannot_stack():
  with pytest.raises(ValueError, match='`modules`'):
    dynamics.StackedBlocks(_mlps(((8,), (4,))))
  with pytest.raises(ValueError, match='`modules`'):
    dynamics.StackedBlocks([])
  with pytest.raises(ValueError, match='`modules`'):   # not built yet
    dynamics.StackedBlocks([tfp_ffjord.MLPODE([4], 2) for _ in range(2)])
  stacked = dynamics.StackedBlocks(_mlps())
  with pytest.raises(ValueError, match='`modules`'):
    stacked.assign_blocks(_mlps()[:2])


def test_flow_model_stacks_its_blocks_with_the_same_initial_values():
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  tf.random.set_seed(0)
  model = training.FlowModel(dim=2, blocks=4, hidden=(8, 8))
  tf.random.set_seed(0)
  separate = training.FlowModel(dim=2, blocks=4, hidden=(8, 8),
                                stack_blocks=False)
  assert len(model.trainable_variables) == 1       # packed
  assert len(separate.trainable_variables) == 24
  for k, module in enumerate(separate.dynamics):
    for (path, value), (path_ref, v) in zip(
        model.stacked_dynamics.block_values(k),
        dynamics.variable_paths(module)):
      assert path == path_ref
      np.testing.assert_array_equal(value, v)
  x = tf.random.stateless_normal([8, 2], [5, 6])
  solver = ode.Tsit5(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      tf.function(model.flow(solver)[0].log_prob)(x),
      tf.function(separate.flow(solver)[0].log_prob)(x),
      rtol=0, atol=BLOCKS_TOL[tf.float32])
