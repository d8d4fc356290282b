"""Reliability: bad input, solver faults, crash-safe training, SavedModel."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode
from tfp_ffjord import training
from tests.helpers import tiny_config, weights
from tests.helpers import RUN_MODES, run_in_mode

tfd = tfp.distributions

# A resumed run replays the same batches and arithmetic (XLA on CPU is
# deterministic): weights agree to float32 rounding.
RESUME_TOLERANCE = 1e-6
# The exported graph runs the same ops as the in-memory one without XLA.
SAVED_MODEL_ATOL = 1e-6
# Peak-RSS growth allowed between epoch 5 and epoch 20 of a small model: a
# leak of one batch-sized buffer per step (64 steps an epoch) would exceed it.
RSS_GROWTH_MIB = 40


# ------------------------------------------------------------- bad input


def _mlp_bijector():
  return tfp_ffjord.FFJORD(tfp_ffjord.MLPODE([8], 2))


@pytest.mark.parametrize('mode', ['eager', 'function'])
@pytest.mark.parametrize('make,x,error,match', [
    (_mlp_bijector, lambda: tf.ones([4, 3]), ValueError,
     r'mlp_ode: the state `z` must have shape \[\.\.\., 2\].*got shape '
     r'\(4, 3\)'),
    (lambda: tfp_ffjord.FFJORD(lambda t, z: tf.concat([z, z], -1)),
     lambda: tf.ones([4, 3]), ValueError,
     r'`state_time_derivative_fn` returned shape \(4, 6\) for a state of '
     r'shape \(4, 3\)'),
    (lambda: tfp_ffjord.FFJORD(lambda t, z: -z), lambda: tf.ones([4, 2],
                                                                 tf.int32),
     TypeError, r'ffjord\.forward: `x` must have dtype float32.*got int32'),
    (lambda: tfp_ffjord.FFJORD(lambda t, z: -z), lambda: tf.ones([4, 2],
                                                                 tf.float64),
     TypeError, r'`x` must have dtype float32.*got float64.*dtype=tf\.float64'),
    (lambda: tfp_ffjord.FFJORD(lambda t, z: -z), lambda: tf.constant([['a']]),
     TypeError, r'`x` must be a floating tensor of dtype float32; got dtype '
     'string'),
    (lambda: tfp_ffjord.FFJORD(
        lambda t, z: -z, trace_augmentation_fn=functools.partial(
            tfp_ffjord.trace_jacobian_hutchinson, num_samples=0)),
     lambda: tf.ones([4, 2]), ValueError,
     r'`num_samples` must be a positive int; got 0'),
])
@pytest.mark.matrix
def test_bad_input_names_the_argument(mode, make, x, error, match):
  bijector = make()
  fn = run_in_mode(bijector.forward, mode)
  with pytest.raises(error, match=match):
    fn(x())


def test_wrong_dtype_through_every_method():
  bijector = tfp_ffjord.FFJORD(lambda t, z: -z)
  y = tf.ones([3, 2], tf.float64)
  for method, arg in (('inverse', 'y'), ('inverse_log_det_jacobian', 'y'),
                      ('forward_log_det_jacobian', 'x'),
                      ('solve_forward', 'x'), ('solve_inverse', 'y'),
                      ('trajectory', 'x')):
    call = getattr(bijector, method)
    args = (y, 1) if method.endswith('log_det_jacobian') else (y,)
    with pytest.raises(TypeError,
                       match=f'ffjord.{method}: `{arg}` must have dtype'):
      call(*args)


def test_a_mismatched_first_call_does_not_build_the_module_wrongly():
  mlp = tfp_ffjord.MLPODE([8], 2)
  bijector = tfp_ffjord.FFJORD(mlp)
  with pytest.raises(ValueError, match='must have shape'):
    bijector.forward(tf.ones([4, 3]))
  assert bijector.forward(tf.ones([4, 2])).shape == (4, 2)


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_validate_args_rejects_non_finite_input(value):
  bijector = tfp_ffjord.FFJORD(lambda t, z: -z, validate_args=True)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='input contains NaN or Inf'):
    bijector.inverse(tf.constant([[value, 1.0]]))


@pytest.mark.parametrize('mode', RUN_MODES)
@pytest.mark.parametrize('solver', [
    ode.Tsit5(), ode.DormandPrince(gradient='adjoint'), ode.RK4(num_steps=3)],
                         ids=['tsit5', 'dopri5-adjoint', 'rk4'])
@pytest.mark.matrix
def test_empty_batch_returns_empty_results(mode, solver):
  bijector = tfp_ffjord.FFJORD(
      tfp_ffjord.MLPODE([8], 2), ode_solve_fn=solver.solve,
      trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2)), bijector)

  def fn(x):
    with tf.GradientTape() as tape:
      log_prob = flow.log_prob(x)
      loss = tf.reduce_sum(log_prob)
    grads = tape.gradient(loss, bijector.trainable_variables)
    return bijector.forward(x), log_prob, grads

  fn = run_in_mode(fn, mode)
  bijector.forward(tf.ones([1, 2]))   # build the module's variables
  y, log_prob, grads = fn(tf.zeros([0, 2]))
  assert y.shape == (0, 2) and log_prob.shape == (0,)
  for g in grads:   # no data, no gradient: zeros, not NaN
    np.testing.assert_array_equal(g.numpy(), np.zeros(g.shape))


# ---------------------------------------------------------- solver faults


@pytest.mark.parametrize('jit', [True, False], ids=['xla', 'function'])
@pytest.mark.slow
def test_solver_failure_in_training_stops_clearly_and_keeps_the_checkpoint(
    tmp_path, jit):
  trainer = training.Trainer(
      tiny_config(solver='tsit5', activation='softplus', epochs=1,
                  jit_compile=jit), out_dir=str(tmp_path))
  trainer.fit(progress=False)
  saved = trainer.manager.latest_checkpoint
  # Weights 1000x larger make softplus dynamics explode: the adaptive
  # solver's step size underflows.
  for v in trainer.model.trainable_variables:
    v.assign(v * 1000.)
  bad = weights(trainer)
  trainer.config.epochs = 2
  with pytest.raises(
      training.TrainingError,
      match=r'Epoch 2: The ODE solver failed in training step \d+: Tsit5 '
      r'failed: step size underflow.*time reached.*the step was not '
      r'applied; the last checkpoint \(.*' + os.path.basename(saved)) as info:
    trainer.fit(progress=False)
  error = info.value.solver_error   # the failure as data, not a message
  assert isinstance(error, ode.SolverError)
  assert (error.solver, error.status, error.stage) == (
      'Tsit5', ode.Status.STEP_SIZE_UNDERFLOW, None)
  assert 0. <= error.time_reached < 1. and error.num_steps > 0
  for a, b in zip(weights(trainer), bad):   # the failed step changed nothing
    np.testing.assert_array_equal(a, b)
  assert trainer.manager.latest_checkpoint == saved


# ----------------------------------------------------- crash-safe training


@pytest.mark.slow
def test_sigint_saves_mid_epoch_and_resume_matches_an_uninterrupted_run(
    tmp_path):
  config = tiny_config(epochs=2)
  straight = training.Trainer(config)
  straight.fit(progress=False)

  trainer = training.Trainer(tiny_config(epochs=2), out_dir=str(tmp_path))
  step = trainer.train_step
  calls = []

  def interrupting_step(batch, labels=None):
    calls.append(1)
    if len(calls) == 6:   # epoch 2 (4 steps an epoch), second step
      os.kill(os.getpid(), signal.SIGINT)
    return step(batch, labels)

  trainer.train_step = interrupting_step
  # Test runners may ignore SIGINT (pytest-xdist workers do): give this
  # test Python's usual handler, as an interactive run has.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(training.TrainingInterrupted,
                       match=r'Interrupted at epoch 2, step 6; saved .*'
                       'ckpt-6'):
      trainer.fit(progress=False)
    # The handler is removed again: SIGINT has its usual effect.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
  assert json.load(open(tmp_path / 'metrics.json'))['epochs'][-1][
      'epoch'] == 1

  resumed = training.Trainer(tiny_config(epochs=2), out_dir=str(tmp_path))
  assert resumed.restore() and int(resumed.step) == 6
  assert int(resumed.optimizer.step) == 6
  history = resumed.fit(progress=False)
  assert [h['epoch'] for h in history] == [1, 2]
  for a, b in zip(weights(resumed), weights(straight)):
    np.testing.assert_allclose(a, b, atol=RESUME_TOLERANCE)


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, caplog):
  trainer = training.Trainer(tiny_config(epochs=2), out_dir=str(tmp_path))
  after_epoch = []
  trainer.fit(progress=False,
              callback=lambda record: after_epoch.append(weights(trainer)))
  _, last = trainer.manager.checkpoints
  with open(last + '.data-00000-of-00001', 'wb') as f:
    f.write(b'truncated')
  restored = training.Trainer(tiny_config(epochs=2), out_dir=str(tmp_path))
  assert restored.restore()
  assert int(restored.epoch) == 1 and 'Cannot restore' in caplog.text
  for a, b in zip(weights(restored), after_epoch[0]):
    np.testing.assert_array_equal(a, b)
  # The history is cut back to the restored epoch, and training goes on.
  assert [h['epoch'] for h in restored.history] == [1]
  assert [h['epoch'] for h in restored.fit(progress=False)] == [1, 2]


@pytest.mark.slow
def test_same_seed_same_run():
  a = training.Trainer(tiny_config(epochs=2, trace='hutchinson'))
  b = training.Trainer(tiny_config(epochs=2, trace='hutchinson'))
  ha, hb = a.fit(progress=False), b.fit(progress=False)
  for x, y in zip(weights(a), weights(b)):
    np.testing.assert_array_equal(x, y)
  for ra, rb in zip(ha, hb):
    assert ra['train_loss'] == rb['train_loss']
    assert ra['test_nll'] == rb['test_nll']
  c = training.Trainer(tiny_config(epochs=2, trace='hutchinson', seed=1))
  c.fit(progress=False)
  assert not np.array_equal(weights(a)[0], weights(c)[0])


def _rss_mib():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024.
  raise RuntimeError('no VmRSS')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists('/proc/self/status'),
                    reason='needs /proc')
def test_twenty_epochs_no_retracing_and_flat_memory():
  trainer = training.Trainer(tiny_config(
      epochs=20, num_train=4096, solver='tsit5', trace='hutchinson',
      jit_compile=True))
  rss = []
  trainer.fit(progress=False, callback=lambda record: rss.append(_rss_mib()))
  assert trainer.num_traces == 1
  assert trainer._train_step.compiled_function.experimental_get_tracing_count(  # pylint: disable=protected-access
  ) == 1
  growth = max(rss[4:]) - rss[4]
  assert growth < RSS_GROWTH_MIB, rss


# -------------------------------------------- subprocesses: kill, resume

CLI_RUN = ['--dataset', 'moons', '--num-train', '8192', '--num-test', '256',
           '--batch-size', '64', '--blocks', '1', '--hidden', '16,16',
           '--solver', 'rk4', '--num-steps', '6', '--no-progress']


def _default_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  # The child gets SIGINT's default disposition even when this process
  # ignores it (pytest-xdist workers do), as a shell would give it.
  return subprocess.Popen([sys.executable, '-m', 'tfp_ffjord', *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, preexec_fn=_default_sigint,
                          **kwargs)


def _epochs_written(out):
  try:
    with open(os.path.join(out, 'metrics.json')) as f:
      return len(json.load(f)['epochs'])
  except (OSError, ValueError):
    return 0


def _wait_for_epochs(proc, out, n, timeout=300):
  deadline = time.time() + timeout
  while _epochs_written(out) < n:
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, 'training did not progress'
    time.sleep(0.05)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('straight') / 'run')
  proc = _cli('train', *CLI_RUN, '--epochs', '4', '--out', out)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  with open(os.path.join(out, 'metrics.json')) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize('how', ['SIGKILL', 'SIGINT'])
def test_killed_training_resumes_where_it_stopped(tmp_path, uninterrupted,
                                                  how):
  out = str(tmp_path / 'run')
  proc = _cli('train', *CLI_RUN, '--epochs', '4', '--out', out)
  _wait_for_epochs(proc, out, 2)
  time.sleep(0.3)   # into epoch 3 (an epoch is 128 steps)
  proc.send_signal(getattr(signal, how))
  _, err = proc.communicate(timeout=120)
  before = json.load(open(os.path.join(out, 'metrics.json')))
  done = len(before['epochs'])
  assert done >= 2 and not before['complete']
  if how == 'SIGKILL':
    assert proc.returncode == -signal.SIGKILL
  else:
    assert proc.returncode == 130, err
    assert 'Interrupted at epoch' in err and 'saved' in err, err
  proc = _cli('train', '--out', out, '--resume', '--no-progress')
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  after = json.load(open(os.path.join(out, 'metrics.json')))
  assert after['complete'] and [e['epoch'] for e in after['epochs']] == [
      1, 2, 3, 4]
  # The epochs finished before the kill are kept as they were, and the run
  # continued from the right epoch with the right optimizer state: test
  # NLLs equal the uninterrupted run's.
  assert after['epochs'][:done] == before['epochs']
  for a, b in zip(after['epochs'], uninterrupted['epochs']):
    assert a['test_nll'] == pytest.approx(b['test_nll'], abs=1e-5)


# -------------------------------------------------------------- SavedModel


@pytest.mark.slow
@pytest.mark.parametrize('conditional', [False, True],
                         ids=['unconditional', 'conditional'])
def test_saved_model_loads_without_tfp_ffjord(tmp_path, conditional):
  run = str(tmp_path / 'run')
  trainer = training.Trainer(tiny_config(epochs=1, blocks=2,
                                         conditional=conditional),
                             out_dir=run)
  trainer.fit(progress=False)
  from tfp_ffjord import cli  # pylint: disable=g-import-not-at-top
  export = str(tmp_path / 'exported')
  assert cli.main(['export', run, '--out', export]) == 0
  assert cli.main(['export', run, '--out', export]) == cli.EXIT_USAGE
  points = trainer.data.test[:50]
  labels = trainer.data.test_labels[:50].astype(np.int32)
  np.save(tmp_path / 'x.npy', points)
  np.save(tmp_path / 'labels.npy', labels)
  extra = ', labels' if conditional else ''
  label = ', tf.constant(1)' if conditional else ''
  code = f'''
import sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load({export!r})
x = np.load({str(tmp_path / 'x.npy')!r})
labels = np.load({str(tmp_path / 'labels.npy')!r})
lp = m.log_prob(x{extra})['log_prob'].numpy()
lp_signature = m.signatures['log_prob'](x=tf.constant(x){
    ', labels=tf.constant(labels)' if conditional else ''})['log_prob'].numpy()
s1 = m.sample(tf.constant(64), tf.constant([3, 4]){label})['samples'].numpy()
s2 = m.sample(tf.constant(64), tf.constant([3, 4]){label})['samples'].numpy()
s3 = m.sample(tf.constant(64), tf.constant([5, 6]){label})['samples'].numpy()
np.save({str(tmp_path / 'lp.npy')!r}, lp)
np.save({str(tmp_path / 's.npy')!r}, s1)
print(int(m.dim), int(m.num_classes), bool(np.array_equal(lp, lp_signature)),
      bool(np.array_equal(s1, s2)), bool(np.array_equal(s1, s3)),
      'tfp_ffjord' in sys.modules, 'tensorflow_probability' in sys.modules)
'''
  res = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == ['2', '2' if conditional else '0', 'True',
                                'True', 'False', 'False', 'False']
  kwargs = trainer.model.bijector_kwargs(labels if conditional else None)
  # Same graph as the exported one: a dynamic batch size.
  expected = tf.function(
      lambda x: trainer.eval_flow.log_prob(x, bijector_kwargs=kwargs),
      input_signature=[tf.TensorSpec([None, 2], tf.float32)])(
          tf.constant(points)).numpy()
  np.testing.assert_allclose(np.load(tmp_path / 'lp.npy'), expected,
                             atol=SAVED_MODEL_ATOL, rtol=0)
  samples = np.load(tmp_path / 's.npy')
  assert samples.shape == (64, 2) and np.all(np.isfinite(samples))
  if conditional:   # label 1 is the lower moon
    assert samples[:, 1].mean() < 0.5
