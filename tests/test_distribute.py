"""tf.distribute: MirroredStrategy over 2 logical CPUs, 2 local workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tfp_ffjord import training

HERE = os.path.dirname(os.path.abspath(__file__))
# Mirrored replicas sum their halves of each batch in another order than
# one device does; after 16 Adam steps the weights differ by float32
# rounding only.
MIRRORED_WEIGHT_ATOL = 1e-5
# Two workers see the same global batches as one process (split between
# them); the test NLL agrees up to the reduction order's rounding (we
# measured an exact match; float32 rounding of the summed halves could
# move it by ~1e-6).
MULTI_WORKER_NLL_ATOL = 1e-5
WORKER_TIMEOUT = 600       # seconds for a whole multi-worker run
COLLECTIVE_TIMEOUT = 20    # seconds before the chief gives up on a peer

CLI_RUN = ['--dataset', 'moons', '--num-train', '1024', '--num-test', '256',
           '--batch-size', '64', '--blocks', '1', '--hidden', '8',
           '--solver', 'rk4', '--num-steps', '4', '--no-progress']


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **extra)
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(HERE)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


@pytest.mark.slow
def test_mirrored_over_two_cpus_matches_one_device():
  res = subprocess.run([sys.executable, os.path.join(HERE,
                                                     'mirrored_check.py')],
                       capture_output=True, text=True, timeout=600,
                       env=_env())
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out['replicas'] == 2
  assert out['variable_type'] == 'MirroredVariable'
  # 512 points / global batch 64 = 8 steps an epoch, 2 epochs, both ways.
  assert out['steps'] == [16, 16] and out['adam_steps'] == [16, 16]
  assert out['max_weight_diff'] < MIRRORED_WEIGHT_ATOL, out
  assert abs(out['nll'][0] - out['nll'][1]) < MIRRORED_WEIGHT_ATOL * 10
  # The replica step is traced once per replica device, not per step.
  assert 1 <= out['mirrored_traces'] <= out['replicas'], out
  assert out['restored_epoch'] == 2 and out['restored_diff'] == 0.0
  assert out['hutchinson_reproducible']
  first, second = out['replica_seeds']
  assert first != second
  divisible, objective = out['errors']
  assert 'must be divisible by the 2 replicas' in divisible
  assert "supports `objective='maximum-likelihood'` only" in objective


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _workers(out, epochs, ports):
  cluster = {'worker': [f'127.0.0.1:{p}' for p in ports]}
  procs = []
  for i in range(len(ports)):
    tf_config = json.dumps({'cluster': cluster,
                            'task': {'type': 'worker', 'index': i}})
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'tfp_ffjord', 'train', *CLI_RUN, '--epochs',
         str(epochs), '--out', out, '--strategy', 'multi-worker',
         '--collective-timeout', str(COLLECTIVE_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(TF_CONFIG=tf_config)))
  return procs


def _finish(procs, timeout):
  outputs = []
  deadline = time.time() + timeout
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('a worker hung past the time limit')
  return outputs


@pytest.mark.slow
def test_two_workers_train_and_the_chief_checkpoint_restores(tmp_path):
  single = str(tmp_path / 'single')
  res = subprocess.run([sys.executable, '-m', 'tfp_ffjord', 'train', *CLI_RUN,
                        '--epochs', '2', '--out', single],
                       capture_output=True, text=True, timeout=600,
                       env=_env())
  assert res.returncode == 0, res.stderr[-3000:]
  out = str(tmp_path / 'multi')
  procs = _workers(out, 2, _free_ports(2))
  outputs = _finish(procs, WORKER_TIMEOUT)
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  for stdout, _ in outputs:
    assert 'MultiWorkerMirroredStrategy: 2 replicas in sync' in stdout
  assert 'final test NLL' in outputs[0][0]          # the chief reports
  assert 'the chief wrote' in outputs[1][0]
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  assert metrics['complete'] and len(metrics['epochs']) == 2
  # Only the chief's checkpoints are in OUT; they restore on one device.
  trainer = training.load_run(out)
  # 1024 points / global batch 64: 16 steps an epoch, as on one device.
  assert int(trainer.epoch.numpy()) == 2 and int(trainer.step.numpy()) == 32
  nll = trainer.evaluate()['nll']
  assert nll == pytest.approx(metrics['final_test_nll'], abs=1e-5)
  reference = json.load(open(os.path.join(single, 'metrics.json')))
  assert nll == pytest.approx(reference['final_test_nll'],
                              abs=MULTI_WORKER_NLL_ATOL)


@pytest.mark.slow
def test_a_dead_worker_makes_the_chief_fail_not_hang(tmp_path):
  out = str(tmp_path / 'multi')
  procs = _workers(out, 200, _free_ports(2))
  deadline = time.time() + WORKER_TIMEOUT
  while not os.path.exists(os.path.join(out, 'metrics.json')):
    assert all(p.poll() is None for p in procs), [
        p.communicate() for p in procs]
    assert time.time() < deadline, 'training did not start'
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  start = time.time()
  (_, stderr), _ = _finish(procs, COLLECTIVE_TIMEOUT + 120)
  assert procs[0].returncode not in (0, None)
  assert time.time() - start < COLLECTIVE_TIMEOUT + 120
  assert 'tfp-ffjord: error: a worker stopped responding' in stderr, (
      stderr[-3000:])
  # What the chief saved before the failure is intact.
  assert int(training.load_run(out).epoch) >= 1
