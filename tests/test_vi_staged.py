"""Staged surrogates (`vi.staged`), ASVI, and the new targets.

The staged surrogate's density is checked as a change of variables against
a brute-force Jacobian, its ELBO against the closed-form KL of a Gaussian
pair, its cost by counting solves, and its fitting by the budget split.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import registry
from tfp_ffjord import vi
from tests.test_vi import _counting_solver
from tests.test_vi import correlated_gaussian
from tests.test_vi import ELBO_STDERRS
from tests.test_vi import tight_solver

tfd = tfp.distributions

# log q two ways (the surrogate's, and log N(z) - log|det dx/dz| of the
# autodiff Jacobian of the same map) in float64 with a tight solver.
CHANGE_OF_VARIABLES_ATOL = 1e-6


def _perturbed(q, seed=5, scale=0.3):
  """Every trainable variable of `q` moved off its start (a flow that is
  not the identity, an affine map that is not), then its Keras constraint
  re-applied (the IAF's masks keep it autoregressive)."""
  for i, v in enumerate(q.trainable_variables):
    noise = tf.random.stateless_normal(v.shape, (seed, i), dtype=v.dtype)
    v.assign_add(scale * noise)
    if getattr(v, 'constraint', None) is not None:
      v.assign(v.constraint(v))


@pytest.mark.parametrize('base', vi.STAGED_BASES)
def test_staged_log_q_is_the_change_of_variables_of_its_map(base):
  staged = vi.build_staged_ffjord_surrogate_posterior(
      [3], dtype=tf.float64, base=base, blocks=1, hidden=(4,),
      ode_solve_fn=tight_solver(tf.float64), seed=3)
  _perturbed(staged.full)
  z = tf.random.stateless_normal([5, 3], (7, 8), dtype=tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(z)
    x = staged.full.bijector.forward(z)
  jacobian = tape.batch_jacobian(x, z)
  _, log_det = np.linalg.slogdet(jacobian.numpy())
  expected = tfd.MultivariateNormalDiag(
      tf.zeros([3], tf.float64)).log_prob(z).numpy() - log_det
  np.testing.assert_allclose(staged.full.log_prob(x).numpy(), expected,
                             atol=CHANGE_OF_VARIABLES_ATOL)
  # The FFJORD blocks moved: the full surrogate is not the base.
  assert not np.allclose(staged.base.log_prob(x).numpy(), expected,
                         atol=1e-3)


def test_staged_surrogate_starts_as_its_base_and_its_elbo_is_minus_kl():
  """Untrained, FFJORD is the identity: `full` is the base's Gaussian
  N(loc, L L^T) exactly, and against a Gaussian target the ELBO is -KL in
  closed form (written out here, not TFP's)."""
  target = correlated_gaussian()
  staged = vi.build_staged_ffjord_surrogate_posterior(
      [2], blocks=1, hidden=(8,), ode_solve_fn=tight_solver())
  loc, scale_tril = staged.base.trainable_variables   # L's free entries
  loc.assign([0.5, -1.])
  scale_tril.assign(tfp.bijectors.FillScaleTriL(diag_shift=1e-5).inverse(
      tf.constant([[0.8, 0.], [0.3, 1.2]])))
  x = staged.base.sample(64, seed=(1, 2))
  np.testing.assert_allclose(staged.full.log_prob(x).numpy(),
                             staged.base.log_prob(x).numpy(), atol=1e-5)
  m_q, l_q = np.array([0.5, -1.]), np.array([[0.8, 0.], [0.3, 1.2]])
  m_p, l_p = np.array([1., -2.]), np.array([[1.5, 0.], [1.2, 0.5]])
  s_q, s_p_inv = l_q @ l_q.T, np.linalg.inv(l_p @ l_p.T)
  d = m_p - m_q
  kl = 0.5 * (np.trace(s_p_inv @ s_q) + d @ s_p_inv @ d - 2
              + np.log(np.linalg.det(l_p @ l_p.T) / np.linalg.det(s_q)))
  measured = vi.evaluate(staged.full, target, num_samples=4096)
  assert abs(-measured['elbo'] - kl) < ELBO_STDERRS * measured['elbo_stderr']
  assert kl > 1.   # a wrong KL would stand out


@pytest.mark.parametrize('mode', ['eager', 'function'])
def test_staged_sample_and_log_prob_costs_one_solve(mode):
  calls = []
  target = correlated_gaussian()
  staged = vi.build_staged_ffjord_surrogate_posterior(
      [2], ode_solve_fn=_counting_solver(calls), blocks=2, hidden=(8,))
  _perturbed(staged.full)

  def elbo_loss():
    return vi.elbo_loss(staged.full, target.log_prob, 16, (3, 4))

  if mode == 'function':
    elbo_loss = tf.function(elbo_loss)
  assert np.isfinite(elbo_loss().numpy())
  assert len(calls) == 1
  del calls[:]
  assert np.isfinite(vi.elbo_loss(staged.base, target.log_prob, 16,
                                  (3, 4)).numpy())
  assert not calls   # the base alone solves nothing


def test_fit_staged_splits_the_budget_and_fits_the_base_first():
  target = correlated_gaussian()
  # An IAF base (a Gaussian one would start at the Laplace approximation,
  # already exact here).
  staged = vi.build_staged_ffjord_surrogate_posterior(
      [2], base='iaf', blocks=1, hidden=(8,), seed=0)
  result = vi.fit_staged(staged, target.log_prob, num_steps=60,
                         base_fraction=0.5, learning_rate=5e-2,
                         sample_size=32)
  assert result.steps == 60 and len(result.losses) == 60
  assert np.all(np.diff(result.seconds) >= 0) and result.laplace is None
  # Stage 1 alone already moved the base towards the target: its loss
  # fell from the untrained start's KL (5.5 nats for N(0, I)).
  assert np.mean(result.losses[25:30]) < np.mean(result.losses[:5]) - 1.
  with pytest.raises(ValueError, match='base_fraction'):
    vi.fit_staged(staged, target.log_prob, num_steps=10, base_fraction=1.)
  with pytest.raises(ValueError, match='base'):
    vi.build_staged_ffjord_surrogate_posterior([2], base='flow')


@pytest.mark.parametrize('kind', ['mean-field', 'full-covariance', 'iaf',
                                  'asvi', 'staged-ffjord-iaf'])
def test_a_builders_seed_fixes_its_start(kind):
  """The same `seed` gives the same initial variables in one process (TFP's
  builders and Keras take an int as a stateful seed: two calls differed);
  another seed gives others."""
  target = vi.load_target('eight-schools')

  def start(seed):
    q = vi.build_surrogate(kind, target, seed=seed)
    return [v.numpy() for v in getattr(q, 'full', q).trainable_variables]
  first, again, other = start(0), start(0), start(1)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_the_second_phase_runs_at_the_fine_tuning_rate():
  """Phase 2 takes a fresh Adam at `fine_tune_learning_rate`, by default a
  tenth of `learning_rate`; `vi.run` gives the two phases to any surrogate.
  A vanishing phase-2 rate leaves exactly phase 1's fit."""
  target = correlated_gaussian()

  def fitted(**kwargs):
    q = vi.build_surrogate('mean-field', target, seed=0)
    vi.fit_staged(vi.StagedSurrogate(q, q), target.log_prob, num_steps=20,
                  base_fraction=0.5, learning_rate=5e-2, sample_size=16,
                  **kwargs)
    return [v.numpy() for v in q.trainable_variables]

  default = fitted()
  for a, b in zip(default, fitted(fine_tune_learning_rate=5e-3)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(
      default, fitted(fine_tune_learning_rate=5e-2)))
  one_phase = vi.run(target='banana', surrogate='mean-field', num_steps=5,
                     num_eval_samples=256)
  frozen = vi.run(target='banana', surrogate='mean-field', num_steps=20,
                  fine_tune_learning_rate=1e-12, num_eval_samples=256)
  moving = vi.run(target='banana', surrogate='mean-field', num_steps=20,
                  fine_tune_learning_rate=1e-2, num_eval_samples=256)
  assert frozen['steps'] == 20
  assert frozen['elbo'] == pytest.approx(one_phase['elbo'], abs=1e-5)
  assert moving['elbo'] != pytest.approx(one_phase['elbo'], abs=1e-3)


@pytest.mark.parametrize('name', ['brownian-motion', 'lorenz-bridge',
                                  'item-response'])
def test_new_targets_load_with_ground_truth_and_a_prior(name):
  target = vi.load_target(name)
  truth = target.sample_transformations['identity']
  assert truth.ground_truth_mean is not None
  assert registry.VI_TARGETS[name].prior
  prior = target.prior_distribution()
  x = prior.sample(seed=(1, 2))
  assert np.isfinite(target.unnormalized_log_prob(x).numpy())


def test_asvi_is_built_from_the_prior_and_shaped_like_the_target():
  target = vi.load_target('eight-schools')
  asvi = vi.build_surrogate('asvi', target, seed=1)
  assert asvi.trainable_variables
  assert not asvi.distribution._use_vectorized_map  # pylint: disable=protected-access
  x = asvi.sample(4, seed=(1, 2))
  assert {k: v.shape.as_list() for k, v in x.items()} == {
      'avg_effect': [4], 'log_stddev': [4], 'school_effects': [4, 8]}
  assert np.all(np.isfinite(asvi.log_prob(x).numpy()))
  with pytest.raises(ValueError, match='prior'):
    vi.build_surrogate('asvi', vi.load_target('banana'))


@pytest.mark.slow
def test_staged_surrogate_fits_a_structured_target():
  target = vi.load_target('eight-schools')
  log_prob = vi.target_log_prob_fn(target)
  staged = vi.build_surrogate('staged-ffjord', target, hidden=(8,),
                              blocks=1, seed=1)
  untrained = vi.evaluate(staged.full, target, num_samples=512)
  result = vi.fit_staged(staged, log_prob, num_steps=60, base_fraction=0.5,
                         learning_rate=5e-2, sample_size=16)
  assert result.steps == 60
  measured = vi.evaluate(staged.full, target, num_samples=512)
  assert measured['elbo'] > untrained['elbo'] + 10.
  assert np.isfinite(measured['log_z']) and measured['ess'] > 1.


def test_pairs_figure_finds_a_funnel_neck_and_writes_both_kinds(tmp_path):
  from tfp_ffjord import plotting  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  funnel = rng.normal(size=(4000, 5))
  funnel[:, 1:] *= np.exp(funnel[:, :1] / 2)   # scales follow coordinate 0
  correlated = rng.normal(size=(4000, 5))
  correlated[:, 4] = correlated[:, 2] + 0.1 * rng.normal(size=4000)
  # Correlation alone does not see the neck (|corr| < 0.05 for every pair).
  assert np.max(np.abs(np.corrcoef(funnel.T) - np.eye(5))) < 0.05
  assert all(0 in pair for pair in plotting.dependent_pairs(funnel, 4))
  assert plotting.dependent_pairs(correlated, 1) == [(2, 4)]
  run = vi.run(target='funnel', surrogate='mean-field', num_steps=5,
               num_eval_samples=256, out_dir=str(tmp_path / 'funnel'))
  assert np.isfinite(run['elbo'])
  assert (tmp_path / 'funnel' / 'pairs.png').stat().st_size > 5000
  path = tmp_path / 'moments.png'
  plotting.plot_pairs(str(path), correlated, truth_mean=np.zeros(5),
                      truth_std=np.ones(5))
  assert path.stat().st_size > 5000
