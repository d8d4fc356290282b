"""The moving average of the weights (`ema_decay`): its recursion, the swap,
and the Trainer's use of it (evaluation, checkpoints, export)."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_ffjord import training
from tfp_ffjord.training import averaging
from tests.helpers import tiny_config, weights

DECAY = 0.9


def _expected_averages(snapshots, applied, decay=DECAY):
  """The recursion in NumPy: `snapshots[0]` the start, `snapshots[k]` the
  weights after update k, `applied[k-1]` whether update k counted."""
  averages = [np.array(w, np.float64) for w in snapshots[0]]
  count = 0
  for weights_now, counted in zip(snapshots[1:], applied):
    if not counted:
      continue
    count += 1
    d = min(decay, (1 + count) / (10 + count))
    averages = [d * a + (1 - d) * w for a, w in zip(averages, weights_now)]
  return averages


@pytest.mark.parametrize('mode', ['eager', 'function', 'xla'])
@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_update_follows_the_warmed_up_recursion(mode, dtype):
  v = [tf.Variable(tf.constant([1., -2.], dtype)),
       tf.Variable(tf.constant(3., dtype))]
  average = averaging.WeightAverage(v, DECAY)
  update = average.update
  if mode != 'eager':
    update = tf.function(update, jit_compile=mode == 'xla')
  rng = np.random.default_rng(0)
  snapshots, applied = [[x.numpy() for x in v]], []
  for k in range(25):
    for x in v:
      x.assign(rng.normal(size=x.shape))
    counted = k % 7 != 3   # some updates not applied
    update(tf.constant(counted))
    snapshots.append([x.numpy() for x in v])
    applied.append(counted)
  assert int(average.updates) == sum(applied)
  for got, want in zip(average.averages, _expected_averages(snapshots,
                                                            applied)):
    np.testing.assert_allclose(got.numpy(), want,
                               rtol=1e-6 if dtype == tf.float32 else 1e-12)


def test_swapped_holds_the_averages_and_restores_the_weights():
  v = tf.Variable([1., 2.])
  average = averaging.WeightAverage([v], DECAY)
  average.averages[0].assign([5., 6.])
  v.assign([7., 8.])
  with average.swapped():
    np.testing.assert_array_equal(v.numpy(), [5., 6.])
    with average.swapped():   # nested: still the averages
      np.testing.assert_array_equal(v.numpy(), [5., 6.])
    np.testing.assert_array_equal(v.numpy(), [5., 6.])
  np.testing.assert_array_equal(v.numpy(), [7., 8.])
  with pytest.raises(RuntimeError):
    with average.swapped():
      raise RuntimeError('inside')
  np.testing.assert_array_equal(v.numpy(), [7., 8.])


@pytest.mark.parametrize('decay', [0., 1., -0.5, True])
def test_decay_outside_the_open_interval_is_refused(decay):
  with pytest.raises(ValueError, match='decay'):
    averaging.WeightAverage([tf.Variable(1.)], decay)
  if decay != 0.:
    with pytest.raises(ValueError, match='ema_decay'):
      tiny_config(ema_decay=decay)


@pytest.mark.parametrize('objective', ['maximum-likelihood', 'flow-matching'])
def test_trainer_steps_update_the_average_and_evaluation_uses_it(objective):
  config = tiny_config(objective=objective, ema_decay=DECAY)
  trainer = training.Trainer(config)
  data = trainer.data.train
  snapshots = [weights(trainer)]
  for k in range(6):
    trainer.train_step(data[64 * (k % 4):64 * (k % 4 + 1)])
    snapshots.append(weights(trainer))
  expected = _expected_averages(snapshots, [True] * 6)
  for got, want in zip(trainer.average.averages, expected):
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
  # The held-out NLL is the averaged model's: the same as a trainer without
  # an average whose weights are set to the averages.
  nll = trainer.evaluate()['nll']
  np.testing.assert_array_equal(weights(trainer)[0], snapshots[-1][0])
  plain = training.Trainer(tiny_config(objective=objective))
  for v, a in zip(plain.model.trainable_variables, expected):
    v.assign(a)
  assert nll == pytest.approx(plain.evaluate()['nll'], rel=1e-5)
  assert nll != pytest.approx(trainer.evaluator.evaluate()['nll'], rel=1e-5)


@pytest.mark.slow
def test_averages_survive_a_checkpoint_and_go_into_the_saved_model(tmp_path):
  config = tiny_config(epochs=1, objective='flow-matching', ema_decay=DECAY)
  trainer = training.Trainer(config, out_dir=str(tmp_path / 'run'))
  trainer.fit(progress=False)
  averages = [a.numpy() for a in trainer.average.averages]
  assert not np.allclose(averages[0], weights(trainer)[0])
  resumed = training.Trainer(config, out_dir=str(tmp_path / 'run'))
  assert resumed.restore()
  for got, want in zip(resumed.average.averages, averages):
    np.testing.assert_array_equal(got.numpy(), want)
  np.testing.assert_array_equal(weights(resumed)[0], weights(trainer)[0])
  path = training.export_saved_model(resumed, str(tmp_path / 'saved'))
  loaded = tf.saved_model.load(path)
  points = resumed.data.test[:16]
  np.testing.assert_allclose(
      loaded.log_prob(tf.constant(points))['log_prob'].numpy(),
      resumed.log_prob(points), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(weights(resumed)[0], weights(trainer)[0])
