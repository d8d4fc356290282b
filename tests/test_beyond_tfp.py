"""Beyond TFP: RNODE regularisers, trajectories, swapping the trace after restore."""

import functools
import os

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode, training
from tfp_ffjord.training import flow_matching
from tests.helpers import RUN_MODES, run_in_mode
from tests.helpers import tiny_config, weights

tfb = tfp.bijectors
tfd = tfp.distributions

A = np.array([[0.3, -0.8], [0.6, -0.1]])
T = 1.3
SOLVE_TOL = 1e-10
# Tolerances: the ODE solve (1e-10) bounds the exact regularisers; the
# Hutchinson Frobenius estimate averages 20000 independent probes, each of
# relative standard deviation ~1, so 4 standard errors is ~3%.
EXACT_RTOL = 1e-7
HUTCHINSON_PROBES = 20000
HUTCHINSON_RTOL = 0.03
# A chunk of flow-matching steps and the same steps one call each run the
# same float32 arithmetic in different compiled programs (XLA may fuse
# differently): agreement to float32 rounding, a few steps deep.
CHUNK_TOLERANCE = 1e-5


def linear_bijector(trace_fn, dtype=tf.float64):
  a = tf.constant(A, dtype)
  return tfp_ffjord.FFJORD(
      lambda t, z: tf.linalg.matvec(a, z),
      ode_solve_fn=ode.Tsit5(rtol=SOLVE_TOL, atol=SOLVE_TOL).solve,
      trace_augmentation_fn=trace_fn, initial_time=0., final_time=T,
      dtype=dtype)


def kinetic_closed_form(z0):
  """int_0^T ||A expm(tA) z0||^2 dt by adaptive quadrature."""
  f = lambda t: np.sum((A @ scipy.linalg.expm(t * A) @ z0) ** 2)
  return scipy.integrate.quad(f, 0., T, epsabs=1e-13, epsrel=1e-13)[0]


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.matrix
def test_exact_regularisers_of_a_linear_field(mode):
  bij = linear_bijector(tfp_ffjord.trace_jacobian_exact)
  z0 = np.array([[1.0, -0.5], [0.2, 0.7], [-1.1, 0.3]])

  def run(z):
    r = bij.solve_forward(z, regularize=True)
    return (tf.reduce_sum(r.kinetic_energy, -1),
            tf.reduce_sum(r.jacobian_frobenius, -1),
            tf.reduce_sum(r.log_det_jacobian, -1))

  kinetic, frobenius, log_det = [
      t.numpy() for t in run_in_mode(run, mode)(tf.constant(z0))]
  expected_kinetic = [kinetic_closed_form(z) for z in z0]
  np.testing.assert_allclose(kinetic, expected_kinetic, rtol=EXACT_RTOL)
  # The Jacobian of a linear field is A at every time: ||A||_F^2 T.
  np.testing.assert_allclose(frobenius, np.sum(A ** 2) * T, rtol=EXACT_RTOL)
  np.testing.assert_allclose(log_det, np.trace(A) * T, rtol=EXACT_RTOL)


@pytest.mark.parametrize('noise', ['gaussian', 'rademacher'])
def test_hutchinson_frobenius_is_unbiased(noise):
  trace_fn = functools.partial(tfp_ffjord.trace_jacobian_hutchinson,
                               noise=noise)
  bij = linear_bijector(trace_fn)
  z = tf.zeros([HUTCHINSON_PROBES, 2], tf.float64)   # one probe per row
  r = tf.function(lambda z: bij.solve_forward(z, regularize=True, seed=1))(z)
  estimate = float(tf.reduce_mean(tf.reduce_sum(r.jacobian_frobenius, -1)))
  assert estimate == pytest.approx(np.sum(A ** 2) * T, rel=HUTCHINSON_RTOL)
  # At z = 0 the field vanishes: no kinetic energy.
  assert float(tf.reduce_max(r.kinetic_energy)) == 0.


def test_regularising_does_not_change_the_flow():
  """The extra states stay out of the error norm: the same steps are taken."""
  mlp = tfp_ffjord.MLPODE([8], 2)
  bij = tfp_ffjord.FFJORD(mlp, ode_solve_fn=ode.Tsit5(rtol=1e-6).solve,
                          trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  x = tf.random.normal([16, 2], seed=2)
  plain = bij.solve_inverse(x)
  plain_nfe = int(bij.last_diagnostics.num_ode_fn_evaluations)
  regular = bij.solve_inverse(x, regularize=True)
  assert int(bij.last_diagnostics.num_ode_fn_evaluations) == plain_nfe
  np.testing.assert_allclose(regular.value, plain.value, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(regular.log_det_jacobian, plain.log_det_jacobian,
                             rtol=1e-6, atol=1e-7)
  assert plain.kinetic_energy is None and regular.kinetic_energy is not None


def test_regularize_needs_our_trace_functions():
  bij = tfp_ffjord.FFJORD(
      tfp_ffjord.MLPODE([4], 2),
      trace_augmentation_fn=tfb.ffjord.trace_jacobian_hutchinson)
  with pytest.raises(ValueError, match="regularize=True.*declares 'regularize'"):
    bij.solve_forward(tf.zeros([2, 2]), regularize=True)
  # TFP's exact trace runs as ours, regularisers included.
  exact = tfp_ffjord.FFJORD(
      bij.state_time_derivative_fn,
      trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact)
  assert exact.trace_augmentation_fn is tfb.ffjord.trace_jacobian_exact
  ours = tfp_ffjord.FFJORD(
      bij.state_time_derivative_fn,
      trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  x = tf.random.stateless_normal([3, 2], [1, 2])
  for a, b in zip(exact.solve_forward(x, regularize=True),
                  ours.solve_forward(x, regularize=True)):
    if a is not None and not isinstance(a, tuple):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_model_log_prob_with_regularisers_matches_the_distribution():
  model = training.FlowModel(2, blocks=2, hidden=(8,))
  solver = ode.Tsit5(rtol=1e-6, atol=1e-6)
  flow, chain = model.flow(solver, 'exact')
  x = tf.random.normal([32, 2], seed=4)
  log_prob, kinetic, frobenius = model.log_prob_and_regularizers(chain, x)
  np.testing.assert_allclose(log_prob, flow.log_prob(x), rtol=1e-5,
                             atol=1e-5)
  assert kinetic.shape == (32,) and frobenius.shape == (32,)
  assert np.all(kinetic.numpy() > 0) and np.all(frobenius.numpy() > 0)


@pytest.mark.slow
def test_training_with_rnode_weights_reports_and_lowers_kinetic_energy():
  def run(kinetic_weight):
    config = training.TrainConfig(
        dataset='moons', num_train=256, num_test=128, batch_size=64,
        blocks=1, hidden=(16,), epochs=3, solver='rk4', num_steps=4,
        eval_batch_size=128, kinetic_weight=kinetic_weight,
        jacobian_weight=kinetic_weight, learning_rate=2e-2)
    trainer = training.Trainer(config)
    history = trainer.fit(progress=False)
    x = tf.constant(trainer.data.test)
    _, kinetic, _ = trainer.model.log_prob_and_regularizers(
        trainer.eval_chain, x)
    return history, float(tf.reduce_mean(kinetic))

  history, regularised = run(1.0)
  assert all(np.isfinite(h['kinetic_energy']) for h in history)
  assert all(np.isfinite(h['jacobian_frobenius']) for h in history)
  plain_history, plain = run(0.0)
  assert 'kinetic_energy' not in plain_history[-1]
  # Penalising the kinetic energy lowers it (same data, init and steps).
  assert regularised < plain
  with pytest.raises(ValueError, match='kinetic_weight'):
    training.TrainConfig(kinetic_weight=-1.)


# ------------------------------------------------ trajectories and swapping


@pytest.mark.parametrize('mode', ['eager', 'function'])
@pytest.mark.matrix
def test_trajectory_is_one_solve_and_ends_at_forward(mode):
  mlp = tfp_ffjord.MLPODE([8], 2)
  mlp(0., tf.zeros([1, 2]))
  bij = tfp_ffjord.FFJORD(mlp, ode_solve_fn=ode.Tsit5(rtol=1e-7,
                                                      atol=1e-7).solve,
                          trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  x = tf.random.normal([8, 2], seed=5)
  times, states, log_dets = run_in_mode(
      lambda x: bij.trajectory(x, num_times=6), mode)(x)
  assert states.shape == (6, 8, 2) and log_dets.shape == (6, 8, 2)
  np.testing.assert_allclose(times, np.linspace(0, 1, 6), atol=1e-7)
  np.testing.assert_allclose(states[0], x)
  np.testing.assert_allclose(states[-1], bij.forward(x), atol=1e-5)
  np.testing.assert_allclose(
      tf.reduce_sum(log_dets[-1], -1),
      bij.forward_log_det_jacobian(x, event_ndims=1), atol=1e-5)
  # Each intermediate point is where a shorter flow ends.
  half = tfp_ffjord.FFJORD(mlp, ode_solve_fn=ode.Tsit5(rtol=1e-7,
                                                       atol=1e-7).solve,
                           final_time=float(times[3]))
  np.testing.assert_allclose(states[3], half.forward(x), atol=1e-5)
  with pytest.raises(ValueError, match='num_times'):
    bij.trajectory(x, num_times=1)


@pytest.mark.slow
def test_hutchinson_checkpoint_restores_into_exact_trace_and_other_solver(
    tmp_path):
  base = dict(dataset='moons', num_train=256, num_test=128, batch_size=64,
              blocks=2, hidden=(8,), epochs=1, eval_batch_size=128)
  trained = training.Trainer(training.TrainConfig(
      **base, trace='hutchinson', solver='rk4', num_steps=4),
      out_dir=str(tmp_path))
  trained.fit(progress=False)
  swapped = training.Trainer(training.TrainConfig(
      **base, trace='exact', solver='dopri5', rtol=1e-6, atol=1e-6,
      gradient='adjoint'), out_dir=str(tmp_path))
  assert swapped.restore()
  for a, b in zip(trained.model.trainable_variables,
                  swapped.model.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  x = trained.data.test[:64]
  # The swapped training flow (dopri5, exact trace) must reproduce the
  # log-density of the restored weights computed independently: TFP's own
  # FFJORD and DormandPrince on the same dynamics.
  reference = tfd.TransformedDistribution(
      swapped.model.base_distribution(), tfb.Chain([
          tfb.FFJORD(d, ode_solve_fn=tfp.math.ode.DormandPrince(
              rtol=1e-7, atol=1e-7).solve,
                     trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact)
          for d in swapped.model.dynamics][::-1]))
  # (Traced: eagerly, TFP's solver at rtol 1e-7 runs op by op for ~a minute.)
  want = tf.function(reference.log_prob)(x).numpy()
  np.testing.assert_allclose(tf.function(swapped.flow.log_prob)(x).numpy(),
                             want, atol=1e-4)
  # The Hutchinson training flow of the original is an estimate of it.
  assert not np.allclose(trained.flow.log_prob(x, bijector_kwargs={
      'ffjord': {'seed': 1}}).numpy(), want, atol=1e-4)
  # And it trains on with the exact trace from the restored state.
  swapped.config.epochs = 2
  assert swapped.fit(progress=False)[-1]['epoch'] == 2


# ------------------------------------------------------- conditional flows


@pytest.mark.slow
def test_class_conditional_moons(tmp_path):
  config = training.TrainConfig(
      dataset='moons', num_train=2048, num_test=512, batch_size=256,
      blocks=2, hidden=(32, 32), epochs=6, conditional=True,
      learning_rate=2e-2, eval_batch_size=512, lr_schedule='constant')
  trainer = training.Trainer(config, out_dir=str(tmp_path))
  trainer.fit(progress=False)
  assert trainer.num_traces == 1
  test, labels = trainer.data.test, trainer.data.test_labels
  upper = test[labels == 0]     # make_moons' label 0 is the upper moon
  # log p(x | c) prefers the true class of the point.
  right = trainer.log_prob(upper, np.zeros(len(upper), np.int32))
  wrong = trainer.log_prob(upper, np.ones(len(upper), np.int32))
  assert np.mean(right > wrong) > 0.9
  # Sampling respects the class: the upper moon's points have y >= ~0 and
  # mean y ~0.64, the lower moon's mean y ~ -0.14.
  top = trainer.sample(1000, seed=1, labels=0)
  bottom = trainer.sample(1000, seed=1, labels=1)
  assert top[:, 1].mean() > 0.4 and bottom[:, 1].mean() < 0.1
  assert np.mean(top[:, 1] > -0.1) > 0.9
  # The marginal NLL (classes summed out) is a valid density: within the
  # conditional NLL plus ln 2.
  conditional_nll = trainer.evaluate()['nll']
  marginal_nll = trainer.evaluate(test)['nll']
  assert conditional_nll < marginal_nll < conditional_nll + np.log(2.) + 1e-3
  # Resume, sample from the CLI's loader, and the figures.
  restored = training.load_run(str(tmp_path))
  np.testing.assert_allclose(restored.sample(50, seed=2, labels=0),
                             trainer.sample(50, seed=2, labels=0), atol=1e-5)
  assert {'panels_last.png', 'density.png', 'trajectories.png',
          'curves.png'} <= {os.path.basename(p) for p in trainer.plot()}
  with pytest.raises(ValueError, match='labels'):
    trainer.log_prob(upper)
  with pytest.raises(ValueError, match='conditional=True'):
    training.TrainConfig(dataset='checkerboard', conditional=True)


@pytest.mark.slow
def test_class_conditional_digits():
  # 64-D, 10 classes; Hutchinson trace for training, exact for evaluation.
  config = training.TrainConfig(
      dataset='digits', conditional=True, blocks=1, hidden=(128,),
      epochs=12, solver='rk4', num_steps=4, trace='hutchinson',
      batch_size=128, eval_batch_size=256, eval_rtol=1e-3, eval_atol=1e-3)
  trainer = training.Trainer(config)
  history = trainer.fit(progress=False)
  assert history[-1]['test_nll'] < history[0]['test_nll']
  data = trainer.data
  x, y = data.test[:200], data.test_labels[:200]
  # Bayes' rule with log p(x | c): far above the 10% of chance (measured
  # 72% after 4 epochs).
  per_class = np.stack([trainer.log_prob(x, np.full(len(x), c))
                        for c in range(10)], 1)
  assert np.mean(per_class.argmax(1) == y) > 0.5
  # Sampling respects the class: the mean of 200 samples of class c is
  # nearest to the data mean of class c (10 of 10 measured).
  means = np.stack([data.train[data.train_labels == c].mean(0)
                    for c in range(10)])
  hits = 0
  for c in range(10):
    centre = trainer.sample(200, seed=c, labels=c).mean(0)
    hits += int(np.argmin(((centre[None] - means) ** 2).sum(-1)) == c)
  assert hits >= 8


# ----------------------------------------------------------- flow matching


def test_ot_pairing_is_the_cheapest_permutation():
  rng = np.random.default_rng(0)
  base, data = rng.normal(size=(6, 2)), rng.normal(size=(6, 2)) + 1.
  order = training.ot_pairing(base, data)
  assert sorted(order) == list(range(6))
  cost = lambda perm: float(((base[list(perm)] - data) ** 2).sum())
  import itertools  # pylint: disable=g-import-not-at-top
  best = min(cost(p) for p in itertools.permutations(range(6)))
  assert cost(order) == pytest.approx(best)


# Sinkhorn's plan: column sums are exact by construction, row sums converge
# (float64, 1000 iterations at 5% regularisation: ~5e-16 measured; 300
# iterations leave 6e-8).
SINKHORN_MARGINAL_ATOL = 1e-9


@pytest.mark.parametrize('mode', RUN_MODES)
def test_sinkhorn_plan_has_uniform_marginals_and_tends_to_the_assignment(
    mode):
  rng = np.random.default_rng(1)
  base, data = rng.normal(size=(7, 2)), rng.normal(size=(7, 2)) + 1.
  plan_fn = run_in_mode(flow_matching.sinkhorn_log_plan, mode)
  plan = np.exp(plan_fn(tf.constant(base), tf.constant(data), 0.05,
                        1000).numpy())
  np.testing.assert_allclose(plan.sum(0), 1. / 7, atol=SINKHORN_MARGINAL_ATOL)
  np.testing.assert_allclose(plan.sum(1), 1. / 7, atol=SINKHORN_MARGINAL_ATOL)
  # The plan is diag(u) K diag(v) with K = exp(-C / eps) by construction;
  # with both marginals right it is the unique entropic optimum. At small
  # eps its mass sits on the exact assignment (SciPy's); at 5% it does not
  # yet.
  order = training.ot_pairing(base, data)
  assert not np.array_equal(np.argmax(plan, axis=0), order)
  sharp = np.exp(plan_fn(tf.constant(base), tf.constant(data), 0.01,
                         2000).numpy())
  np.testing.assert_array_equal(np.argmax(sharp, axis=0), order)


def test_sinkhorn_pairing_is_nearly_as_cheap_as_the_assignment():
  # A moons batch against its Gaussian base samples: random pairs cost
  # 4.1x the exact assignment; Sinkhorn draws (default regularisation, in
  # XLA) 1.14x, and draws that ignore the plan 3.8x.
  data = training.Trainer(tiny_config(num_train=512)).data.train[:512]
  base = np.random.default_rng(0).normal(size=data.shape) * 0.8
  exact = ((base[training.ot_pairing(base, data)] - data) ** 2).sum(1).mean()
  random = ((base - data) ** 2).sum(1).mean()
  paired = tf.function(flow_matching.sinkhorn_pairing, jit_compile=True)(
      tf.constant(base, tf.float32), tf.constant(data, tf.float32),
      tf.constant([0, 1]))
  sinkhorn = ((paired.numpy() - data) ** 2).sum(1).mean()
  assert random > 3 * exact, (random, exact)
  assert sinkhorn < 1.5 * exact, (sinkhorn, exact)


def test_flow_matching_loss_of_the_exact_field_is_zero():
  """A field equal to the path velocity has zero loss (orientation check)."""
  class Exact(tf.Module):
    def __init__(self, velocity):
      super().__init__()
      self.velocity = velocity

    def __call__(self, t, z, **kwargs):
      del t, kwargs
      return tf.broadcast_to(self.velocity, tf.shape(z))

  model = training.FlowModel(2, blocks=2, hidden=(4,))
  shift = tf.constant([[3., -1.]])
  # Data = base + shift: the straight-path velocity is `shift` everywhere,
  # which each of the K=2 blocks covers at half speed.
  model.dynamics = [Exact(shift / 2.), Exact(shift / 2.)]
  base = tf.random.normal([64, 2], seed=1)
  tau = tf.random.uniform([64, 1], seed=2)
  assert float(model.flow_matching_loss(base + shift, base, tau)) < 1e-10
  # The opposite orientation is penalised.
  model.dynamics = [Exact(-shift / 2.), Exact(-shift / 2.)]
  assert float(model.flow_matching_loss(base + shift, base, tau)) > 1.
  # And the exact field, integrated by FFJORD's forward map, moves base to data.
  model.dynamics = [Exact(shift / 2.), Exact(shift / 2.)]
  _, chain = model.flow(ode.RK4(num_steps=2))
  np.testing.assert_allclose(chain.forward(base), base + shift, atol=1e-5)


OT_CASES = {'independent': {}, 'exact': dict(ot_pairing=True),
            'sinkhorn': dict(ot_pairing=True, ot_solver='sinkhorn')}


@pytest.mark.parametrize('ot', list(OT_CASES))
@pytest.mark.matrix
def test_flow_matching_chunks_train_as_single_steps(ot):
  # `fit` runs flow-matching steps in compiled chunks; the base samples and
  # times of each step depend only on (seed, step), so a chunk of 3 steps
  # and 3 `train_step` calls on the same batches give the same weights.
  config = tiny_config(objective='flow-matching', hidden=(16, 16),
                       steps_per_epoch=5, **OT_CASES[ot])
  chunked, stepped = training.Trainer(config), training.Trainer(config)
  data = chunked.data.train[:3 * 64].reshape(3, 64, 2).astype(np.float32)
  losses = flow_matching.run_chunk(
      chunked._fm_steps, config, 0, chunked._fm_chunk, data,  # pylint: disable=protected-access
      np.zeros((3, 64), np.int32), chunked.model.base_scale)
  single = [stepped.train_step(batch)[0] for batch in data]
  np.testing.assert_allclose(losses, single, rtol=CHUNK_TOLERANCE)
  for a, b in zip(weights(chunked), weights(stepped)):
    np.testing.assert_allclose(a, b, atol=CHUNK_TOLERANCE)
  assert int(chunked.step) == int(stepped.step) == 3


@pytest.mark.slow
def test_flow_matching_resume_matches_an_uninterrupted_run(tmp_path):
  config = dict(objective='flow-matching', hidden=(16, 16),
                steps_per_epoch=6, lr_schedule='constant')
  first = training.Trainer(tiny_config(epochs=1, **config),
                           out_dir=str(tmp_path / 'a'))
  first.fit(progress=False)
  resumed = training.Trainer(tiny_config(epochs=2, **config),
                             out_dir=str(tmp_path / 'a'))
  resumed.fit(progress=False)
  straight = training.Trainer(tiny_config(epochs=2, **config))
  straight.fit(progress=False)
  for a, b in zip(weights(resumed), weights(straight)):
    np.testing.assert_allclose(a, b, atol=CHUNK_TOLERANCE)


@pytest.mark.parametrize('ot', list(OT_CASES))
@pytest.mark.slow
def test_flow_matching_training_gives_an_exact_likelihood_flow(ot):
  config = training.TrainConfig(
      dataset='8gaussians', num_train=2048, num_test=256, batch_size=256,
      blocks=1, hidden=(64, 64), epochs=6, objective='flow-matching',
      learning_rate=1e-2, eval_batch_size=256, eval_rtol=1e-4,
      eval_atol=1e-4, **OT_CASES[ot])
  trainer = training.Trainer(config)
  before = trainer.evaluate()['nll']
  history = trainer.fit(progress=False)
  assert trainer.num_traces == 1
  assert history[-1]['train_loss'] < history[0]['train_loss']
  assert history[-1]['nfe_per_step'] == 0      # simulation-free steps
  assert history[-1]['test_nll'] < before - 0.5
  # Sampling goes base -> data: samples sit near the 8 centres (radius 2.83).
  samples = trainer.sample(500, seed=3)
  radius = np.linalg.norm(samples, axis=1)
  assert abs(np.median(radius) - 4. / np.sqrt(2.)) < 0.5
  # The wrapped bijector's log_prob is the exact change of variables.
  x = tf.constant(trainer.data.test[:8])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    z = trainer.eval_chain.inverse(x)
    rows = [z[:, i] for i in range(2)]
  # Row i of each point's Jacobian: the gradient of z_i (points are
  # independent, so the batch gradient separates).
  jacobian = tf.stack([tape.gradient(r, x) for r in rows], axis=1)
  brute_force = (trainer.model.base_distribution().log_prob(z)
                 + tf.linalg.slogdet(jacobian)[1]).numpy()
  np.testing.assert_allclose(trainer.log_prob(x.numpy()), brute_force,
                             atol=2e-3)
  with pytest.raises(ValueError, match='flow-matching'):
    training.TrainConfig(objective='flow-matching', kinetic_weight=1.)
