"""Variational inference (`tfp_ffjord.vi`): FFJORD surrogate posteriors.

Checked against closed forms (Gaussian KL divergences), against the
inverse solve (log q of a sample by the cached forward log-det and by
solving back), by counting solves, and by the sticking-the-landing
gradient, which is exactly zero when the surrogate equals the target.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import cli
from tfp_ffjord import ode
from tfp_ffjord import protocols
from tfp_ffjord import vi

from tests.test_cli import run_cli

tfb = tfp.bijectors
tfd = tfp.distributions

# A fitted 2-D surrogate's KL to a correlated Gaussian target. N(0, I), the
# untrained surrogate, is at 5.5 nats; the affine part alone (no flow) cannot
# go below 1.0 (the target's correlation is 0.92).
FITTED_KL_MAX = 0.1
# The ELBO over 4,096 draws against the closed-form KL: 5 standard errors.
ELBO_STDERRS = 5.
# log q of a sample two ways (the forward solve's log-det, and the inverse
# solve from the sample) with a tight solver, float32.
ROUND_TRIP_ATOL = 2e-3
# Gradient norms of the sticking-the-landing loss when q equals the target
# (zero but for rounding) and of the reparameterised loss (its per-sample
# noise is of order one).
STL_GRAD_MAX = 1e-6
# Monte Carlo error of a standardised moment error over 8,192 draws of a
# Gaussian with 1.25x the true scale: ~0.014 (mean) and ~0.01 (std); five
# of those.
MOMENT_ERROR_ATOL = 0.06
# 4,096 exact draws: the banana's errors stay below this; the funnel's std
# error lies in this range (median of 8 sets; single sets spread 0.19-0.67).
FLOOR_SMALL = 0.08
FUNNEL_STD_FLOOR = (0.15, 0.55)
REPARAM_GRAD_MIN = 1e-2


def correlated_gaussian(dtype=tf.float32):
  return tfd.MultivariateNormalTriL(
      loc=tf.constant([1., -2.], dtype),
      scale_tril=tf.constant([[1.5, 0.], [1.2, 0.5]], dtype))


def tight_solver(dtype=tf.float32):
  tol = 1e-6 if dtype == tf.float32 else 1e-9
  return ode.DormandPrince(rtol=tol, atol=tol, gradient='backprop').solve


@pytest.mark.parametrize('dtype,jit_compile', [(tf.float32, True),
                                               (tf.float64, False)],
                         ids=['float32-xla', 'float64-function'])
def test_elbo_of_a_gaussian_target_approaches_its_log_normaliser(dtype,
                                                                  jit_compile):
  target = correlated_gaussian(dtype)   # normalised: log Z = 0, ELBO = -KL
  q = vi.surrogate_for(target, hidden=(16, 16))
  assert q.dtype == dtype
  # Untrained, the flow is the identity: q = N(0, I), KL in closed form.
  untrained = vi.evaluate(q, target, num_samples=4096)
  standard = tfd.MultivariateNormalDiag(tf.zeros([2], dtype))
  kl0 = float(tfd.kl_divergence(standard, target))
  assert kl0 > 5.
  assert abs(-untrained['elbo'] - kl0) < ELBO_STDERRS * untrained['elbo_stderr']
  result = vi.fit(q, target.log_prob, num_steps=400, learning_rate=3e-2,
                  sample_size=64, jit_compile=jit_compile)
  assert result.steps == 400 and np.all(np.isfinite(result.losses))
  fitted = vi.evaluate(q, target, num_samples=4096)
  kl = -fitted['elbo']
  assert kl > -ELBO_STDERRS * fitted['elbo_stderr']   # ELBO <= log Z
  assert kl < FITTED_KL_MAX, fitted


def _counting_solver(calls):
  solver = ode.DormandPrince(rtol=1e-6, atol=1e-6, gradient='backprop')

  @protocols.accepts(protocols.ERROR_COMPONENTS, protocols.SEGMENTED)
  def solve(*args, **kwargs):
    calls.append(1)
    return solver.solve(*args, **kwargs)
  return solve


@pytest.mark.parametrize('mode', ['eager', 'function'])
def test_sample_and_log_prob_costs_one_solve(mode):
  calls = []
  target = correlated_gaussian()
  q = vi.build_ffjord_surrogate_posterior(
      [2], ode_solve_fn=_counting_solver(calls), blocks=2, hidden=(8,))
  for v in q.trainable_variables:   # a flow that is not the identity
    v.assign(0.3 * tf.random.stateless_normal(v.shape, (1, 2)))

  def elbo_loss():
    return vi.elbo_loss(q, target.log_prob, 16, (3, 4))

  def tfp_loss():
    return tfp.vi.monte_carlo_variational_loss(target.log_prob, q,
                                               sample_size=16, seed=(3, 4))

  def sample_then_log_prob():
    x = q.sample(16, seed=(3, 4))
    return q.log_prob(tf.identity(x))

  for fn, solves in ((elbo_loss, 1), (tfp_loss, 1),
                     (sample_then_log_prob, 2)):
    del calls[:]
    if mode == 'function':
      fn = tf.function(fn)
    assert np.isfinite(fn().numpy()).all()
    assert len(calls) == solves, fn


def test_structured_constrained_target_round_trip():
  target = tfd.JointDistributionNamed({
      'scale': tfd.HalfNormal(1.),
      'loc': tfd.Normal(0., 1.),
      'weights': tfd.Sample(tfd.Beta(2., 3.), 3),
      'cov': tfd.WishartTriL(4., tf.eye(2)),
  })
  # 1 + 1 + 3 unconstrained, plus 3 for a 2x2 Cholesky factor.
  assert vi.unconstrained_size(
      target.event_shape, target.experimental_default_event_space_bijector(),
      target.dtype) == 8
  q = vi.surrogate_for(target, hidden=(8,), ode_solve_fn=tight_solver())
  for v in q.trainable_variables:
    v.assign(0.2 * tf.random.stateless_normal(v.shape, (5, 6)))
  x, log_q = q.experimental_sample_and_log_prob(32, seed=(7, 8))
  assert set(x) == set(target.event_shape)
  for k, s in target.event_shape.items():
    assert x[k].shape == [32] + s.as_list(), k
  assert np.all(x['scale'].numpy() > 0)
  w = x['weights'].numpy()
  assert np.all((w > 0) & (w < 1))
  assert np.all(np.linalg.eigvalsh(x['cov'].numpy()) > 0)
  assert np.all(np.isfinite(target.log_prob(x).numpy()))
  again = q.log_prob(tf.nest.map_structure(tf.identity, x))  # inverse solve
  np.testing.assert_allclose(again.numpy(), log_q.numpy(),
                             atol=ROUND_TRIP_ATOL)


def test_eight_schools_round_trip_and_ground_truth_shapes():
  target = vi.load_target('eight-schools')
  q = vi.surrogate_for(target, hidden=(8,), ode_solve_fn=tight_solver())
  x, log_q = q.experimental_sample_and_log_prob(8, seed=(1, 1))
  assert {k: v.shape.as_list() for k, v in x.items()} == {
      'avg_effect': [8], 'log_stddev': [8], 'school_effects': [8, 8]}
  again = q.log_prob(tf.nest.map_structure(tf.identity, x))
  np.testing.assert_allclose(again.numpy(), log_q.numpy(),
                             atol=ROUND_TRIP_ATOL)
  measured = vi.evaluate(q, target, num_samples=256)
  assert np.isfinite(measured['elbo'])
  assert np.isfinite(measured['mean_error'])
  assert np.isfinite(measured['std_error'])


def test_evaluate_measures_known_moment_errors():
  """A Gaussian surrogate with its mean off by half a standard deviation in
  one coordinate and every scale 1.25x the truth: errors 0.5 and 0.25."""
  target = vi.load_target('banana')
  truth = target.sample_transformations['identity']
  mean = np.asarray(truth.ground_truth_mean)
  std = np.asarray(truth.ground_truth_standard_deviation)
  q = tfp.distributions.MultivariateNormalDiag(
      loc=(mean + [0.5 * std[0], 0.]).astype(np.float32),
      scale_diag=(1.25 * std).astype(np.float32))
  measured = vi.evaluate(q, target, num_samples=8192)
  assert measured['mean_error'] == pytest.approx(0.5, abs=MOMENT_ERROR_ATOL)
  assert measured['std_error'] == pytest.approx(0.25, abs=MOMENT_ERROR_ATOL)


def test_exact_draws_give_the_monte_carlo_floor_of_the_errors():
  """Where the target can sample, `evaluate` also reports the errors of as
  many exact draws. The funnel's std (9.5 for 9 coordinates, set by rare
  draws with a large first coordinate) is so noisy that 4,096 exact draws
  miss it by ~0.3 standard deviations (a NumPy simulation of the funnel
  gives a median of 0.26-0.29); the banana's by ~0.02. A floor of zero, or
  one computed from the surrogate's draws (error ~1 here), fails."""
  floors = {}
  for name in ('banana', 'funnel'):
    target = vi.load_target(name)
    q = vi.build_surrogate('mean-field', target, seed=0)  # untrained: N(0, I)
    measured = vi.evaluate(q, target, num_samples=4096)
    assert measured['std_error'] > 0.9
    floors[name] = measured['std_error_floor'], measured['mean_error_floor']
  assert floors['banana'][0] < FLOOR_SMALL and floors['banana'][1] < FLOOR_SMALL
  assert FUNNEL_STD_FLOOR[0] < floors['funnel'][0] < FUNNEL_STD_FLOOR[1]
  schools = vi.load_target('eight-schools')   # no exact sampler
  measured = vi.evaluate(vi.build_surrogate('mean-field', schools, seed=0),
                         schools, num_samples=256)
  assert 'std_error_floor' not in measured


def test_importance_sampling_gives_log_z_and_the_closed_form_ess():
  """Target N(0, I_3), surrogate N(0, 1.25^2 I_3): log Z = 0, and
  E_q[w^2] = (s / sqrt(2 - 1/s^2))^3, so ESS / N -> 1 / E_q[w^2]."""
  s, d = 1.25, 3
  target = tfp.distributions.MultivariateNormalDiag(loc=tf.zeros([d]))
  q = tfp.distributions.MultivariateNormalDiag(
      loc=tf.zeros([d]), scale_diag=tf.fill([d], s))
  measured = vi.evaluate(q, target, num_samples=16384)
  expected_ess = (s / np.sqrt(2. - 1. / s ** 2)) ** -d
  assert measured['ess'] / 16384 == pytest.approx(expected_ess, abs=0.03)
  assert abs(measured['log_z']) < 4 * measured['log_z_stderr']
  assert measured['log_z_stderr'] == pytest.approx(
      np.sqrt((1. / expected_ess - 1.) / 16384), rel=0.2)
  # A surrogate equal to the target: every weight 1.
  exact = vi.evaluate(target, target, num_samples=1024)
  assert exact['ess'] == pytest.approx(1024.)
  assert exact['log_z'] == pytest.approx(0., abs=1e-6)
  # Degenerate weights: NaN and -inf count as zero.
  summary = vi.importance_weights_summary([np.nan, -np.inf, 0., 0.])
  assert (summary['log_z'], summary['ess']) == (pytest.approx(np.log(0.5)),
                                                2.)


def test_iaf_baseline_stays_autoregressive_under_sonnet_updates():
  # tfb.AutoregressiveNetwork keeps its masks through Keras variable
  # constraints; an optimizer that ignores them makes the "IAF" a dense map
  # whose log-det formula is wrong (ELBO above log Z).
  target = correlated_gaussian()
  q = vi.build_surrogate('iaf', target, hidden=(16,))
  vi.fit(q, target.log_prob, num_steps=30, learning_rate=0.1,
         jit_compile=False)
  x, log_q = q.experimental_sample_and_log_prob(64, seed=(2, 3))
  again = q.log_prob(tf.identity(x))   # MAF's forward: the autoregression
  np.testing.assert_allclose(again.numpy(), log_q.numpy(), atol=1e-3)


def test_sticking_the_landing_gradient_vanishes_at_the_target():
  dtype = tf.float64
  target = tfd.MultivariateNormalDiag(tf.constant([0.5, -1.], dtype),
                                      tf.constant([2., 0.3], dtype))
  build = lambda: vi.surrogate_for(target, hidden=(8,),  # noqa: E731
                                   ode_solve_fn=tight_solver(dtype))
  q, stopped = build(), build()
  chain = q.bijector.bijectors
  shift, scale = chain[-3], chain[-2]   # ..., Shift, ScaleMatvecDiag, FFJORD
  shift.shift.assign(target.loc)
  scale.scale.diag.assign(target.stddev())   # flow: the identity at start
  for s, v in zip(stopped.trainable_variables, q.trainable_variables):
    s.assign(v)
  variables = q.trainable_variables

  def grad_norm(stopped_surrogate):
    with tf.GradientTape() as tape:
      loss = vi.elbo_loss(q, target.log_prob, 16, (4, 5), stopped_surrogate)
    return float(tf.linalg.global_norm(tape.gradient(loss, variables)))

  assert grad_norm(stopped) < STL_GRAD_MAX
  assert grad_norm(None) > REPARAM_GRAD_MIN


@pytest.mark.parametrize('estimator', ['reparameterization', 'stl'])
def test_fit_is_reproducible_with_hutchinson_and_both_estimators(estimator):
  target = correlated_gaussian()

  def run():
    build = lambda: vi.surrogate_for(target, hidden=(8,),  # noqa: E731
                                     trace='hutchinson', seed=11)
    q = build()
    stopped = build() if estimator == 'stl' else None
    return vi.fit(q, target.log_prob, num_steps=5, seed=3,
                  estimator=estimator, stopped_surrogate=stopped,
                  jit_compile=False).losses

  first, second = run(), run()
  np.testing.assert_array_equal(first, second)
  assert len(set(first.tolist())) == len(first)   # fresh noise every step


def test_fit_rejects_bad_arguments_by_name():
  target = correlated_gaussian()
  q = vi.build_surrogate('mean-field', target)
  for kwargs, name in ((dict(num_steps=0), 'num_steps'),
                       (dict(sample_size=2.5), 'sample_size'),
                       (dict(learning_rate=-1.), 'learning_rate'),
                       (dict(estimator='score'), 'estimator'),
                       (dict(estimator='stl'), 'stopped_surrogate'),
                       (dict(max_seconds=0.), 'max_seconds')):
    with pytest.raises(ValueError, match=name):
      vi.fit(q, target.log_prob, **kwargs)
  with pytest.raises(ValueError, match='surrogate'):
    vi.build_surrogate('normalizing-flow', target)
  with pytest.raises(ValueError, match='trace'):
    vi.surrogate_for(target, trace='bogus')
  with pytest.raises(ValueError, match="Unknown target 'nope'"):
    vi.load_target('nope')


def test_cli_bad_target_is_one_line(capsys):
  assert cli.main(['vi', '--target', 'nope']) == cli.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "--target: invalid choice: 'nope'" in err and 'banana' in err


@pytest.mark.slow
def test_cli_vi_writes_metrics_and_figures(tmp_path):
  out = str(tmp_path / 'vi')
  res = run_cli('vi', '--target', 'banana', '--steps', '60',
                '--eval-samples', '512', '--hidden', '16', '--out', out)
  assert res.returncode == 0, res.stderr
  assert 'ELBO' in res.stdout
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  assert metrics['steps'] == 60 and len(metrics['neg_elbo_per_step']) == 60
  # Banana's density is normalised: the ELBO is at most 0. An untrained
  # surrogate (N(0, I) against scales 10 and 4.4) is below -3.
  assert -3. < metrics['elbo'] < 5 * metrics['elbo_stderr']
  # The untrained surrogate's standard deviations (1, 1) against the
  # truth's (10, 4.36) give a standardised error of 0.9: 60 steps must
  # have moved them.
  assert 0 <= metrics['std_error'] < 0.9, metrics
  assert np.isfinite(metrics['mean_error'])
  for png in ('elbo.png', 'posterior.png'):
    assert os.path.getsize(os.path.join(out, png)) > 5000, png
  assert cli.main(['vi', '--out', out]) == cli.EXIT_USAGE   # no overwrite


def test_a_fixed_step_solver_draws_a_warning():
  with pytest.warns(UserWarning, match='not exactly normalised'):
    vi.build_ffjord_surrogate_posterior(
        [2], ode_solve_fn=ode.RK4(num_steps=4).solve, hidden=(4,))


def test_steps_per_call_changes_nothing_but_speed():
  target = correlated_gaussian()

  def run(steps_per_call):
    q = vi.surrogate_for(target, hidden=(8,), trace='hutchinson', seed=2)
    return vi.fit(q, target.log_prob, num_steps=7, seed=5,
                  steps_per_call=steps_per_call).losses

  np.testing.assert_allclose(run(1), run(3), rtol=1e-5)
