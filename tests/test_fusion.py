"""A `tfb.Chain` of `tfp_ffjord.FFJORD` blocks, fused into one segmented solve.

Every check compares the fused chain (the default, `fuse=True`) with the same
chain built with `fuse=False` (one solve per block, the reference), and
counts the solver loops in the traced graph so that a fusion that silently
stops happening fails here.
"""

import numpy as np
import pytest
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode
from tests.helpers import RUN_MODES, run_in_mode

tfb, tfd = tfp.bijectors, tfp.distributions

NUM_BLOCKS = 3
# The fused solve takes the steps of separate solves (the log-det's error
# is measured segment by segment): values equal to rounding, float64.
ROUNDING = 1e-10
# The adjoint's backward solve still sees the log-det accumulated over the
# blocks, so its steps, and the gradient to its tolerance, may differ; a
# wrong or missing block's gradient is off by O(1).
ADJOINT_GRAD_TOL = 1e-5
# Central differences in float64 with step 1e-5: truncation ~1e-10 times
# third derivatives of order 10.
FD_STEP = 1e-5
FD_TOL = 1e-6
FD_DIRECTIONS = 4

# Tolerances loose enough that a log-det carried over from block to block
# would change the steps (it did: 212 evaluations for a block instead of 218
# at 1e-10, more at these).
SOLVERS = {
    'rk4-backprop': lambda: ode.RK4(num_steps=4, gradient='backprop'),
    'tsit5-adjoint': lambda: ode.Tsit5(rtol=1e-6, atol=1e-6),
    'dopri5-backprop': lambda: ode.DormandPrince(rtol=1e-4, atol=1e-5,
                                                 gradient='backprop'),
}


def _mlps(num=NUM_BLOCKS, dtype=tf.float64, seed=0):
  tf.random.set_seed(seed)
  mods = [tfp_ffjord.MLPODE([8], 2, name=f'block_{i}') for i in range(num)]
  for m in mods:
    m(tf.zeros([], dtype), tf.zeros([1, 2], dtype))
  return mods


def _chain(mods, solver, fuse, trace=tfp_ffjord.trace_jacobian_exact,
           dtype=tf.float64, names=None):
  blocks = [tfp_ffjord.FFJORD(m, ode_solve_fn=solver.solve,
                              trace_augmentation_fn=trace, dtype=dtype,
                              fuse=fuse, seed_salt=f'salt{i}',
                              **({'name': names[i]} if names else {}))
            for i, m in enumerate(mods)]
  return blocks, tfb.Chain(blocks[::-1])


def _flow(bijector, dtype=tf.float64):
  return tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros([2], dtype),
                                 tf.fill([2], tf.constant(.8, dtype))),
      bijector)


def _loops(fn, *specs):
  """The number of `While` loops in the graph of `fn` traced on `specs`
  (nested loops, such as a solver's stage loop, included)."""
  graph = tf.function(fn, autograph=False).get_concrete_function(
      *specs).graph.as_graph_def()
  nodes = list(graph.node) + [n for f in graph.library.function
                              for n in f.node_def]
  return sum(n.op in ('While', 'StatelessWhile') for n in nodes)


def _x(n=8, dtype=tf.float64):
  return tf.random.stateless_normal([n, 2], [3, 4], dtype=dtype)


@pytest.mark.matrix
@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('name', list(SOLVERS))
def test_fused_chain_equals_separate_solves(name, mode):
  mods = _mlps()
  variables = [v for m in mods for v in m.trainable_variables]
  solver = SOLVERS[name]()
  grad_tol = ADJOINT_GRAD_TOL if name.endswith('adjoint') else ROUNDING
  x = _x()
  results = []
  for fuse in (True, False):
    blocks, chain = _chain(mods, solver, fuse)
    flow = _flow(chain)

    def run(x, flow=flow, blocks=blocks):
      with tf.GradientTape() as tape:
        log_prob = flow.log_prob(x)
        loss = tf.reduce_sum(log_prob)
      nfe = [b.last_diagnostics.num_ode_fn_evaluations for b in blocks]
      return log_prob, tape.gradient(loss, variables), nfe

    results.append(run_in_mode(run, mode)(x))
  (lp_f, g_f, nfe_f), (lp_s, g_s, nfe_s) = results
  np.testing.assert_allclose(lp_f, lp_s, rtol=0, atol=ROUNDING)
  for a, b in zip(g_f, g_s):
    np.testing.assert_allclose(a, b, rtol=grad_tol, atol=grad_tol)
  # Per-block diagnostics: each block reports its own segment's count, the
  # same as solved alone (the same steps).
  np.testing.assert_array_equal([int(n) for n in nfe_f],
                                [int(n) for n in nfe_s])


def test_fused_gradient_matches_central_differences():
  mods = _mlps()
  # Tight: central differences of an adaptive solve see its step choices.
  _, chain = _chain(mods, ode.Tsit5(rtol=1e-12, atol=1e-12), fuse=True)
  flow = _flow(chain)
  x = _x(4)
  weight = mods[1].trainable_variables[0]

  @tf.function(jit_compile=True)
  def loss():
    return tf.reduce_sum(flow.log_prob(x))

  @tf.function(jit_compile=True)
  def gradient():
    with tf.GradientTape() as tape:
      value = tf.reduce_sum(flow.log_prob(x))
    return tape.gradient(value, weight)

  grad = gradient().numpy()
  original = weight.numpy()
  # Directional derivatives along a few random unit directions (each
  # coordinate's would take 2 solves per weight).
  rng = np.random.default_rng(0)
  analytic, numeric = [], []
  for _ in range(FD_DIRECTIONS):
    direction = rng.normal(size=original.shape)
    direction /= np.linalg.norm(direction)
    weight.assign(original + FD_STEP * direction)
    up = float(loss())
    weight.assign(original - FD_STEP * direction)
    down = float(loss())
    numeric.append((up - down) / (2 * FD_STEP))
    analytic.append(float(np.sum(grad * direction)))
  weight.assign(original)
  np.testing.assert_allclose(analytic, numeric, rtol=FD_TOL, atol=FD_TOL)


def test_fusion_is_one_solver_loop():
  """Fails if fusion silently stops: the fused chain's log_prob traces the
  loops of one solve, the unfused chain's K times as many."""
  mods = _mlps()
  solver = ode.DormandPrince(gradient='backprop')
  spec = tf.TensorSpec([4, 2], tf.float64)
  one = _loops(_flow(_chain(mods[:1], solver, True)[1]).log_prob, spec)
  fused = _loops(_flow(_chain(mods, solver, True)[1]).log_prob, spec)
  separate = _loops(_flow(_chain(mods, solver, False)[1]).log_prob, spec)
  assert one > 0
  assert fused == one
  assert separate == NUM_BLOCKS * one


def test_runs_break_at_other_bijectors_and_at_different_blocks():
  mods = _mlps(4)
  solver = SOLVERS['rk4-backprop']()
  spec = tf.TensorSpec([4, 2], tf.float64)
  one = _loops(_flow(_chain(mods[:1], solver, True)[1]).log_prob, spec)
  lu = tfb.ScaleMatvecLU(*tf.linalg.lu(tf.constant([[2., .5], [.3, 1.]],
                                                    tf.float64)))
  results = []
  for fuse in (True, False):
    blocks, _ = _chain(mods, solver, fuse)
    # Forward map: block 0, block 1, LU, block 2, block 3.
    mixed = tfb.Chain([blocks[3], blocks[2], lu, blocks[1], blocks[0]])
    flow = _flow(mixed)
    results.append(flow.log_prob(_x()))
    if fuse:
      assert _loops(flow.log_prob, spec) == 2 * one
  np.testing.assert_allclose(results[0], results[1], rtol=0, atol=ROUNDING)

  # A block with another solver, or wrapped in Invert, is its own run.
  blocks, _ = _chain(mods, solver, True)
  other = tfp_ffjord.FFJORD(mods[2], ode_solve_fn=ode.RK4(num_steps=3).solve,
                            trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
                            dtype=tf.float64)
  chain = tfb.Chain([blocks[3], other, blocks[1], blocks[0]])
  assert _loops(_flow(chain).log_prob, spec) == 3 * one
  chain = tfb.Chain([blocks[3], tfb.Invert(blocks[2]), blocks[1], blocks[0]])
  assert _loops(_flow(chain).log_prob, spec) == 3 * one


def test_equal_solvers_built_separately_fuse():
  """The README's pattern: a new `Tsit5(...)` per block still fuses."""
  mods = _mlps()
  blocks = [tfp_ffjord.FFJORD(m, ode_solve_fn=ode.Tsit5(atol=1e-5).solve,
                              trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
                              dtype=tf.float64) for m in mods]
  spec = tf.TensorSpec([4, 2], tf.float64)
  one = _loops(_flow(blocks[0]).log_prob, spec)
  assert _loops(_flow(tfb.Chain(blocks[::-1])).log_prob, spec) == one
  different = [tfp_ffjord.FFJORD(
      m, ode_solve_fn=ode.Tsit5(atol=10. ** -(5 + i)).solve,
      trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
      dtype=tf.float64) for i, m in enumerate(mods)]
  assert _loops(_flow(tfb.Chain(different[::-1])).log_prob,
                spec) == NUM_BLOCKS * one


class _Conditional(snt.Module):
  """Dynamics conditioned on a `context` keyword."""

  def __init__(self, name):
    super().__init__(name=name)
    self._net = snt.nets.MLP([8, 2], activation=tf.tanh)

  def __call__(self, t, x, context):
    t = tf.broadcast_to(tf.cast(t, x.dtype), tf.shape(x[..., :1]))
    return self._net(tf.concat([t, x, context], -1))


def test_kwargs_routed_by_block_name():
  tf.random.set_seed(0)
  mods = [_Conditional(f'cond_{i}') for i in range(NUM_BLOCKS)]
  x = _x()
  context = tf.ones([8, 1], tf.float64)
  for m in mods:
    m(tf.zeros([], tf.float64), x, context=context)
  solver = SOLVERS['rk4-backprop']()
  names = [f'flow_{i}' for i in range(NUM_BLOCKS)]
  spec = tf.TensorSpec([8, 2], tf.float64)
  loop_counts = []
  for contexts in ([context] * NUM_BLOCKS,                  # one run
                   [context, 2. * context, context]):       # three runs
    kwargs = {n: {'context': c} for n, c in zip(names, contexts)}
    sample_kwargs = {n: {'context': c[:5]} for n, c in zip(names, contexts)}
    values = []
    for fuse in (True, False):
      _, chain = _chain(mods, solver, fuse, names=names)
      flow = _flow(chain)
      values.append(flow.log_prob(x, bijector_kwargs=kwargs))
      values.append(flow.sample(5, seed=(1, 2),
                                bijector_kwargs=sample_kwargs))
      if fuse:
        loop_counts.append(_loops(
            lambda x, f=flow: f.log_prob(x, bijector_kwargs=kwargs), spec))
    np.testing.assert_allclose(values[0], values[2], rtol=0, atol=ROUNDING)
    np.testing.assert_allclose(values[1], values[3], rtol=0, atol=ROUNDING)
  assert loop_counts[0] > 0
  assert loop_counts[1] == NUM_BLOCKS * loop_counts[0]


def test_hutchinson_seeds_per_block_as_separate_solves():
  """Each block keeps its own probes: equal to the unfused chain with the
  same per-block seeds, and different blocks draw different probes."""
  mods = _mlps()
  solver = SOLVERS['rk4-backprop']()
  x = _x()
  out = []
  for fuse in (True, False):
    blocks, chain = _chain(mods, solver, fuse,
                           trace=tfp_ffjord.trace_jacobian_hutchinson)
    kwargs = {b.name: {'seed': 7} for b in blocks}
    out.append(_flow(chain).log_prob(x, bijector_kwargs=kwargs))
  np.testing.assert_allclose(out[0], out[1], rtol=0, atol=ROUNDING)
  blocks, chain = _chain(mods, solver, True,
                         trace=tfp_ffjord.trace_jacobian_hutchinson)
  spec = tf.TensorSpec([8, 2], tf.float64)
  one = _loops(_flow(_chain(mods[:1], solver, True)[1]).log_prob, spec)
  assert _loops(lambda x: _flow(chain).log_prob(x, bijector_kwargs={
      b.name: {'seed': 7} for b in blocks}), spec) == one


def test_sampling_and_one_solve_per_sample_and_log_prob():
  mods = _mlps()
  solver = SOLVERS['rk4-backprop']()
  got = []
  for fuse in (True, False):
    _, chain = _chain(mods, solver, fuse)
    flow = _flow(chain)
    got.append(flow.experimental_sample_and_log_prob(6, seed=(5, 6)))
  for a, b in zip(*got):
    np.testing.assert_allclose(a, b, rtol=0, atol=ROUNDING)
  _, chain = _chain(mods, solver, True)
  flow = _flow(chain)
  one = _loops(lambda: _flow(_chain(mods[:1], solver, True)[1])
               .experimental_sample_and_log_prob(6, seed=(5, 6)))
  assert _loops(lambda: flow.experimental_sample_and_log_prob(6, seed=(5, 6))) == one


def test_tf1_graph_session():
  solver = SOLVERS['rk4-backprop']()
  x = _x().numpy()
  with tf.Graph().as_default() as graph:
    mods = _mlps()
    before = len(graph.get_operations())
    _, chain = _chain(mods, solver, True)
    fused = _flow(chain).log_prob(tf.constant(x))
    loops = sum(op.type in ('While', 'StatelessWhile')
                for op in graph.get_operations()[before:])
    _, chain = _chain(mods, solver, False)
    separate = _flow(chain).log_prob(tf.constant(x))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      got, expected = sess.run([fused, separate])
  np.testing.assert_allclose(got, expected, rtol=0, atol=ROUNDING)
  assert loops == 1


class _ColabODE(snt.Module):
  """TFP's colab's `MLP_ODE`: built lazily, on its first call."""

  def __init__(self):
    super().__init__(name='mlp_ode')
    self._model = snt.Sequential([snt.Linear(8), tf.math.tanh,
                                  snt.Linear(8), tf.math.tanh,
                                  snt.Linear(2)])

  def __call__(self, t, inputs):
    inputs = tf.concat([tf.broadcast_to(t, inputs.shape), inputs], -1)
    return self._model(inputs)


def test_colab_step_with_lazily_built_modules_fuses_and_trains(tmp_path):
  """The colab's code with the class swapped: modules built inside the
  first `tf.function(jit_compile=True)` call, Adam's slots too. It fuses,
  trains, and a checkpoint of the chain restores into an unfused chain
  with the same log_prob."""
  tf.random.set_seed(0)
  blocks = [tfp_ffjord.FFJORD(
      state_time_derivative_fn=_ColabODE(),
      trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact)
            for _ in range(NUM_BLOCKS)]
  flow = _flow(tfb.Chain(blocks[::-1]), tf.float32)

  @tf.function(jit_compile=True)
  def train_step(optimizer, target_sample):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(flow.log_prob(target_sample))
    variables = tape.watched_variables()
    gradients = tape.gradient(loss, variables)
    optimizer.apply(gradients, variables)
    return loss

  optimizer = snt.optimizers.Adam(1e-2)
  x = tf.random.stateless_normal([64, 2], [1, 1]) * [1., .3]
  losses = [float(train_step(optimizer, x)) for _ in range(8)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  concrete = train_step.get_concrete_function(optimizer, x)
  loops = sum(n.op in ('While', 'StatelessWhile') for f in
              concrete.graph.as_graph_def().library.function
              for n in f.node_def)
  assert 0 < loops < NUM_BLOCKS * 2   # one forward solve and its gradient

  ckpt = tf.train.Checkpoint(blocks=[b.state_time_derivative_fn
                                     for b in blocks])
  path = ckpt.save(str(tmp_path / 'ckpt'))
  tf.random.set_seed(1)
  restored = [_ColabODE() for _ in range(NUM_BLOCKS)]
  for m in restored:
    m(tf.zeros([]), tf.zeros([1, 2]))
  tf.train.Checkpoint(blocks=restored).restore(path).assert_consumed()
  unfused = _flow(tfb.Chain([tfp_ffjord.FFJORD(
      m, trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact, fuse=False)
                             for m in restored][::-1]), tf.float32)
  np.testing.assert_allclose(flow.log_prob(x), unfused.log_prob(x),
                             rtol=1e-5, atol=1e-5)


def test_savedmodel_of_a_fused_chain(tmp_path):
  """A SavedModel of the fused chain's log_prob loads and computes what the
  unfused chain does."""
  mods = _mlps()
  solver = SOLVERS['dopri5-backprop']()
  _, chain = _chain(mods, solver, True)
  flow = _flow(chain)
  module = tf.Module()
  module.mods = mods
  module.log_prob = tf.function(
      flow.log_prob, input_signature=[tf.TensorSpec([None, 2], tf.float64)])
  spec = tf.TensorSpec([None, 2], tf.float64)
  one = _loops(_flow(_chain(mods[:1], solver, True)[1]).log_prob, spec)
  assert _loops(module.log_prob.python_function, spec) == one
  tf.saved_model.save(module, str(tmp_path / 'fused'))
  loaded = tf.saved_model.load(str(tmp_path / 'fused'))
  x = _x()
  _, separate = _chain(mods, solver, False)
  np.testing.assert_allclose(loaded.log_prob(x), _flow(separate).log_prob(x),
                             rtol=0, atol=ROUNDING)


def test_time_variables_fuse_only_when_shared():
  """The fused solve runs every block on the first block's times: blocks
  whose times are distinct Variables (equal now, free to change) stay
  apart; one shared Variable fuses."""
  mods = _mlps()
  solver = SOLVERS['rk4-backprop']()
  spec = tf.TensorSpec([4, 2], tf.float64)
  one = _loops(_flow(_chain(mods[:1], solver, True)[1]).log_prob, spec)

  def chain(times):
    return tfb.Chain([tfp_ffjord.FFJORD(
        m, ode_solve_fn=solver.solve, final_time=t,
        trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
        dtype=tf.float64) for m, t in zip(mods, times)][::-1])

  separate = [tf.Variable(1., dtype=tf.float64) for _ in mods]
  shared = [tf.Variable(1., dtype=tf.float64)] * len(mods)
  assert _loops(_flow(chain(separate)).log_prob, spec) == NUM_BLOCKS * one
  assert _loops(_flow(chain(shared)).log_prob, spec) == one
