"""The training API: metrics, one trace, checkpoints, resume, failures."""

import json
import os
import shutil

import numpy as np
import pytest
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import datasets
from tfp_ffjord import training
from tfp_ffjord.training import figures
from tfp_ffjord.training import trainer as trainer_lib
from tests.helpers import tiny_config, weights

# A resumed run replays the same batches and the same arithmetic as an
# uninterrupted one; XLA on CPU is deterministic, so weights agree to
# float32 rounding.
RESUME_TOLERANCE = 1e-6
# `time_train_step` (traced) against the same Adam steps run eagerly with
# Sonnet's Adam: the same arithmetic, in another order.
TIMED_STEP_RTOL = 1e-5


def optimizer_state(trainer):
  opt = trainer.optimizer
  return ([int(opt.step)] + [v.numpy() for v in opt.m]
          + [v.numpy() for v in opt.v])


def test_fit_improves_nll_and_writes_outputs(tmp_path):
  trainer = training.Trainer(tiny_config(epochs=3), out_dir=str(tmp_path))
  before = trainer.evaluate()['nll']
  history = trainer.fit(progress=False)
  assert [h['epoch'] for h in history] == [1, 2, 3]
  assert history[-1]['test_nll'] < before - 0.1
  for h in history:
    assert np.isfinite(h['train_loss']) and h['nfe_per_step'] > 0
    assert h['eval_nfe'] > 0
  metrics = json.load(open(tmp_path / 'metrics.json'))
  assert metrics['complete'] and len(metrics['epochs']) == 3
  assert metrics['final_test_nll'] == pytest.approx(history[-1]['test_nll'])
  assert metrics['gap_to_entropy'] == pytest.approx(
      history[-1]['test_nll'] - datasets.ENTROPY['moons'])
  assert json.load(open(tmp_path / 'config.json'))['blocks'] == 1
  # Checkpoints are numbered by the global step.
  steps = 3 * (len(trainer.data.train) // trainer.config.batch_size)
  assert trainer.manager.latest_checkpoint.endswith(f'ckpt-{steps}')
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'logs'))
  # The compiled step was traced once for the whole run.
  assert trainer.num_traces == 1


@pytest.mark.slow
def test_resume_restores_optimizer_state_and_matches_an_uninterrupted_run(
    tmp_path):
  first = training.Trainer(tiny_config(epochs=1), out_dir=str(tmp_path / 'a'))
  first.fit(progress=False)
  saved_weights, saved_opt = weights(first), optimizer_state(first)
  # A process killed after the checkpoint but before `metrics.json`: the
  # records saved with the checkpoint still hold epoch 1.
  metrics_path = tmp_path / 'a' / 'metrics.json'
  metrics = json.load(open(metrics_path))
  metrics['epochs'] = []
  json.dump(metrics, open(metrics_path, 'w'))

  resumed = training.Trainer(tiny_config(epochs=2),
                             out_dir=str(tmp_path / 'a'))
  assert resumed.restore()
  assert int(resumed.epoch) == 1
  assert resumed.history == first.history
  for a, b in zip(weights(resumed), saved_weights):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(optimizer_state(resumed), saved_opt):
    np.testing.assert_array_equal(a, b)
  history = resumed.fit(progress=False)
  assert [h['epoch'] for h in history] == [1, 2]

  straight = training.Trainer(tiny_config(epochs=2),
                              out_dir=str(tmp_path / 'b'))
  straight.fit(progress=False)
  for a, b in zip(weights(resumed), weights(straight)):
    np.testing.assert_allclose(a, b, atol=RESUME_TOLERANCE)
  assert history[-1]['test_nll'] == pytest.approx(
      straight.history[-1]['test_nll'], abs=1e-5)


# A run written before 0.1.0 (3 blocks, MLP 4, 2 epochs on 512 moons
# points; one module per block, `model/dynamics/k/...`): 0.1.0 packs the
# blocks' variables and does not convert other layouts (CHANGELOG.md).
FOREIGN_RUN = os.path.join(os.path.dirname(__file__), 'data',
                           'separate_blocks_run')


def test_a_checkpoint_of_another_layout_is_refused_by_name(tmp_path):
  run = str(tmp_path / 'run')
  shutil.copytree(FOREIGN_RUN, run)
  with open(os.path.join(run, 'config.json')) as f:
    config = training.TrainConfig.from_dict(json.load(f))
  trainer = training.Trainer(config, out_dir=run)
  before = weights(trainer)
  with pytest.raises(training.TrainingError,
                     match='No checkpoint in .*checkpoints can be restored'):
    trainer.restore()
  for a, b in zip(before, weights(trainer)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  trainer = training.Trainer(tiny_config(epochs=1), out_dir=str(tmp_path))
  trainer.fit(progress=False)
  good = weights(trainer)
  saved = trainer.manager.latest_checkpoint
  trainer.config.epochs = 2
  trainer.data.train = np.full_like(trainer.data.train, np.nan)
  with pytest.raises(training.TrainingError,
                     match=f'(?i)epoch 2.*{os.path.basename(saved)}'):
    trainer.fit(progress=False)
  # The failing step did not touch the weights; the checkpoint is epoch 1.
  for a, b in zip(weights(trainer), good):
    np.testing.assert_array_equal(a, b)
  assert trainer.manager.latest_checkpoint == saved
  assert json.load(open(tmp_path / 'metrics.json'))['epochs'][-1]['epoch'] == 1


@pytest.mark.parametrize('solver,gradient', [('tsit5', 'adjoint'),
                                             ('dopri5', 'backprop')])
@pytest.mark.matrix
def test_hutchinson_training_with_adaptive_solvers(solver, gradient):
  trainer = training.Trainer(tiny_config(
      epochs=1, trace='hutchinson', solver=solver, gradient=gradient,
      rtol=1e-3, atol=1e-3, jit_compile=False))
  losses = [trainer.train_step(b)[0]
            for b in trainer.data.train_dataset(64, seed=0)]
  assert all(np.isfinite(losses))
  # A new seed every step: with the weights frozen (learning rate 0), two
  # steps on the same batch see different probes, hence different losses.
  trainer.learning_rate.assign(0.)
  batch = trainer.data.train[:64]
  assert trainer.train_step(batch)[0] != trainer.train_step(batch)[0]
  # The exact evaluation is deterministic.
  lp1, lp2 = trainer.log_prob(trainer.data.test), trainer.log_prob(
      trainer.data.test)
  np.testing.assert_array_equal(lp1, lp2)


def test_log_prob_pads_and_matches_unbatched():
  trainer = training.Trainer(tiny_config(eval_batch_size=50))
  x = trainer.data.test[:120]                # 3 batches, the last padded
  lp = trainer.log_prob(x)
  assert lp.shape == (120,)
  direct = tf.function(trainer.eval_flow.log_prob)(x).numpy()
  np.testing.assert_allclose(lp, direct, atol=1e-5)
  with pytest.raises(ValueError, match=r'shape \[N, 2\]'):
    trainer.log_prob(np.zeros([3, 5], np.float32))


def test_trajectories_end_where_forward_ends():
  trainer = training.Trainer(tiny_config(blocks=2))
  z = trainer.model.base_distribution().sample(16, seed=(1, 2))
  paths = figures.trajectories(trainer.eval_chain, z, num_times=5).numpy()
  assert paths.shape == (1 + 2 * 4, 16, 2)
  np.testing.assert_allclose(paths[0], z.numpy())
  np.testing.assert_allclose(paths[-1], trainer.eval_chain.forward(z).numpy(),
                             atol=1e-4)


@pytest.mark.parametrize('dataset,expected', [
    ('moons', {'panels_last.png', 'density.png', 'trajectories.png',
               'curves.png'}),
    ('gaussian1d', {'pdf.png', 'curves.png'}),
])
@pytest.mark.matrix
def test_plots_are_written(tmp_path, dataset, expected):
  config = tiny_config(dataset=dataset, epochs=1,
                       num_train=64 if dataset == 'gaussian1d' else 256,
                       batch_size=32)
  trainer = training.Trainer(config, out_dir=str(tmp_path))
  trainer.fit(progress=False)
  written = trainer.plot()
  assert {os.path.basename(p) for p in written} == expected
  for p in written:
    assert os.path.getsize(p) > 5000


@pytest.mark.parametrize('overrides,match', [
    (dict(dataset='cifar10'), '`dataset` must be one of'),
    (dict(model='conv'), "`model='conv'` needs image data"),
    (dict(model='glow', dataset='moons'), "`model='glow'` needs image data"),
    (dict(model='multiscale', dataset='digits', objective='flow-matching'),
     "objective='flow-matching' trains the models ffjord, conv"),
    (dict(model='maf', kinetic_weight=0.1), 'RNODE terms and conditional'),
    (dict(model='realnvp', dataset='digits', conditional=True),
     'RNODE terms and conditional'),
    (dict(logit_alpha=0.05), '`logit_alpha` needs data in'),
    (dict(dataset='mnist', logit_alpha=0.5), '`logit_alpha` must be in'),
    (dict(dataset='mnist', model='vae'), '`model` must be one of'),
    (dict(epochs=0), '`epochs` must be a positive integer'),
    (dict(epochs=-3), '`epochs`'),
    (dict(hidden=()), '`hidden`'),
    (dict(solver='rk45'), '`solver` must be one of'),
    (dict(trace='approx'), '`trace`'),
    (dict(gradient='auto'), '`gradient`'),
    (dict(rtol=-1e-3), '`rtol` must be a positive number'),
    (dict(clip_norm=0.), '`clip_norm`'),
    (dict(batch_size=1000), 'larger than the 256 training points'),
    (dict(steps_per_epoch=0), '`steps_per_epoch` must be a positive integer'),
])
def test_bad_configuration(overrides, match):
  with pytest.raises(ValueError, match=match):
    training.Trainer(tiny_config(**overrides))


def test_config_round_trips_through_json():
  config = tiny_config(hidden=(16, 16), clip_norm=1.0)
  again = training.TrainConfig.from_dict(
      json.loads(json.dumps(config.to_dict())))
  assert again == config
  with pytest.raises(ValueError, match='Unknown configuration keys: colour'):
    training.TrainConfig.from_dict({'colour': 'red'})


def test_fit_lbfgs_reaches_the_minimum_of_a_quadratic():
  target = np.array([[1.5, -2.0], [0.25, 3.0]], np.float64)
  weights = np.array([[1., 4.], [9., 0.5]])
  x = tf.Variable(tf.zeros([2, 2], tf.float64))
  b = tf.Variable(tf.constant(5., tf.float64))
  result = training.fit_lbfgs(
      lambda: tf.reduce_sum(weights * (x - target) ** 2) + (b - 1.) ** 2,
      [x, b], max_iterations=50)
  assert result.converged
  np.testing.assert_allclose(x.numpy(), target, atol=1e-6)
  assert float(b.numpy()) == pytest.approx(1., abs=1e-6)
  with pytest.raises(ValueError, match='max_iterations'):
    training.fit_lbfgs(lambda: b ** 2, [b], max_iterations=0)


def test_fit_adam_fits_a_gaussian_by_maximum_likelihood():
  data = np.random.default_rng(0).normal(2.0, 0.5, size=500).astype(
      np.float32)
  loc, log_scale = tf.Variable(0.), tf.Variable(0.)

  def nll():
    return -tf.reduce_mean(
        tfp.distributions.Normal(loc, tf.exp(log_scale)).log_prob(data))

  losses = training.fit_adam(nll, [loc, log_scale], steps=400,
                             learning_rate=0.05)
  assert len(losses) == 400 and losses[-1] < losses[0]
  # The MLE is the sample mean and (biased) standard deviation.
  assert float(loc.numpy()) == pytest.approx(data.mean(), abs=1e-2)
  assert float(np.exp(log_scale.numpy())) == pytest.approx(data.std(),
                                                           abs=1e-2)
  with pytest.raises(training.TrainingError, match='non-finite|nan'):
    training.fit_adam(lambda: tf.math.log(-tf.abs(loc) - 1.), [loc], steps=2)


def test_total_variation_is_half_the_mean_absolute_difference():
  assert training.total_variation([0.1, 0.5, 0.2], [0.2, 0.2, 0.2]) == (
      pytest.approx((0.1 + 0.3 + 0.) / 2 / 3))
  with pytest.raises(ValueError, match='equal size'):
    training.total_variation([1., 2.], [1.])


def test_time_train_step_reports_times_and_trains():
  trainer = training.Trainer(tiny_config())
  reference = training.Trainer(tiny_config())   # same seed, same weights
  for a, b in zip(weights(trainer), weights(reference)):
    np.testing.assert_array_equal(a, b)
  batch = trainer.data.train[:32]
  timing = training.time_train_step(trainer.flow, trainer.variables, batch,
                                    steps=2)
  assert set(timing) == {'first_step', 'step', 'loss'}
  assert 0 < timing['step'] and 0 < timing['first_step']
  # The same 3 steps (the first call, then `steps`), eagerly, with Sonnet's
  # own Adam: the loss before the third update and the weights after it.
  opt = snt.optimizers.Adam(1e-2)
  for _ in range(3):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(reference.flow.log_prob(batch))
    opt.apply(tape.gradient(loss, reference.variables), reference.variables)
  assert timing['loss'] == pytest.approx(float(loss), rel=TIMED_STEP_RTOL)
  for a, b in zip(weights(trainer), weights(reference)):
    np.testing.assert_allclose(a, b, rtol=TIMED_STEP_RTOL, atol=1e-6)
  with pytest.raises(ValueError, match='steps'):
    training.time_train_step(trainer.flow, trainer.variables,
                             trainer.data.train[:32], steps=0)


@pytest.mark.parametrize('objective', ['maximum-likelihood', 'flow-matching'])
@pytest.mark.slow
def test_steps_per_epoch_sets_the_steps_between_evaluations(tmp_path,
                                                            objective):
  # 256 points in batches of 64 make 4 steps a pass; 7 steps cross a pass.
  trainer = training.Trainer(
      tiny_config(epochs=2, steps_per_epoch=7, objective=objective),
      out_dir=str(tmp_path))
  history = trainer.fit(progress=False)
  assert [h['epoch'] for h in history] == [1, 2]
  assert int(trainer.step) == 14
  assert trainer.manager.latest_checkpoint.endswith('ckpt-14')
  assert all(np.isfinite(h['train_loss']) for h in history)


def test_flow_model_settings_as_a_spec_or_as_arguments():
  def built(*args, **kwargs):
    tf.random.set_seed(3)
    model = training.FlowModel(*args, **kwargs)
    return model.spec, [v.numpy() for v in model.trainable_variables]
  spec, values = built(2, 3, (4,), activation='elu')
  assert spec == training.ModelSpec(blocks=3, hidden=(4,), activation='elu')
  for other in (built(2, spec=spec),
                built(2, blocks=3, hidden=(4,), spec=training.ModelSpec(
                    activation='elu'))):
    assert other[0] == spec
    for a, b in zip(values, other[1]):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(TypeError, match="unknown setting 'bogus'.*blocks"):
    training.FlowModel(2, bogus=1)


class _Clock:
  """A `time` stand-in whose `perf_counter` advances 1 s per reading."""

  def __init__(self):
    self.now = 0.

  def perf_counter(self):
    self.now += 1.
    return self.now


def test_cosine_schedule_decays_over_the_time_budget_when_it_ends_first(
    monkeypatch):
  # Each epoch's training steps take 1 s on this clock: the 4 s budget ends
  # after 4 of the 1,000 epochs, so the decay must follow the training time
  # (progress 0, 1/4, 2/4, 3/4); over the epochs it would stay at ~1e-2.
  monkeypatch.setattr(trainer_lib, 'time', _Clock())
  config = tiny_config(epochs=1000, max_train_seconds=4., steps_per_epoch=2,
                       lr_schedule='cosine', learning_rate=1e-2)
  history = training.Trainer(config).fit(progress=False)
  assert [h['train_time'] for h in history] == [1., 2., 3., 4.]
  floor = trainer_lib.COSINE_FLOOR
  expected = [1e-2 * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * k / 4)))
              for k in range(4)]
  np.testing.assert_allclose([h['learning_rate'] for h in history],
                             expected, rtol=1e-6)
