"""One writer per run directory: `OUT/.lock`, with real processes."""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from tfp_ffjord.training import run_dir

TINY = ['--dataset', 'moons', '--num-train', '256', '--num-test', '128',
        '--batch-size', '64', '--blocks', '1', '--hidden', '8',
        '--solver', 'rk4', '--num-steps', '4', '--no-progress']

# A process that takes the lock, says so, and holds it until killed or
# until its stdin closes.
HOLDER = '''
import sys
from tfp_ffjord.training import run_dir
lock = run_dir.RunLock(sys.argv[1]).acquire()
print('held', flush=True)
sys.stdin.read()
lock.release()
'''


def _cli(*args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-m', 'tfp_ffjord', *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, **kwargs)


def _holder(out):
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, out],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_writer_gets_one_line_naming_directory_and_holder(tmp_path):
  out = str(tmp_path / 'run')
  holder = _holder(out)
  try:
    for args in (['train', *TINY, '--epochs', '1'],
                 ['vi', '--target', 'banana', '--steps', '2']):
      res = _cli(*args, '--out', out)
      _, err = res.communicate(timeout=120)
      assert res.returncode == 2, err
      lines = err.strip().splitlines()
      assert len(lines) == 1, err
      assert out in lines[0] and f'pid {holder.pid}' in lines[0], err
    # Nothing was written beside the holder's lock.
    assert os.listdir(out) == [run_dir.LOCK_FILE]
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  assert not os.path.exists(os.path.join(out, run_dir.LOCK_FILE))


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  out = str(tmp_path / 'run')
  holder = _holder(out)
  holder.send_signal(signal.SIGKILL)   # no clean-up: the file stays
  holder.wait(timeout=60)
  with open(os.path.join(out, run_dir.LOCK_FILE)) as f:
    assert json.load(f)['pid'] == holder.pid
  with caplog.at_level(logging.WARNING, logger='tfp_ffjord'):
    with run_dir.RunLock(out) as lock:
      assert lock.held
      with open(lock.path) as f:
        assert json.load(f)['pid'] == os.getpid()
      # Held: a second lock in another process is refused.
      res = subprocess.run([sys.executable, '-c', HOLDER, out],
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
      assert res.returncode != 0 and 'RunDirBusy' in res.stderr
      assert f'pid {os.getpid()}' in res.stderr
  assert f'pid {holder.pid}' in caplog.text and 'no longer' in caplog.text
  assert not os.path.exists(os.path.join(out, run_dir.LOCK_FILE))


def test_a_refused_run_leaves_no_directory_behind(tmp_path):
  out = str(tmp_path / 'never')
  res = _cli('train', '--out', out, '--resume', '--epochs', '1')
  _, err = res.communicate(timeout=120)
  assert res.returncode == 2 and 'holds no run to resume' in err, err
  assert not os.path.exists(out)


@pytest.mark.slow
def test_two_trainings_started_together_one_runs_one_is_refused(tmp_path):
  out = str(tmp_path / 'same')
  procs = [_cli('train', *TINY, '--epochs', '2', '--out', out)
           for _ in range(2)]
  results = [p.communicate(timeout=600) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], results
  refused = results[[p.returncode for p in procs].index(2)][1]
  assert 'is in use by another run' in refused and out in refused
  with open(os.path.join(out, 'metrics.json')) as f:
    assert [e['epoch'] for e in json.load(f)['epochs']] == [1, 2]
  assert not os.path.exists(os.path.join(out, run_dir.LOCK_FILE))


def test_a_refused_writer_never_removes_the_holders_lock(tmp_path):
  """Two runs started on a new directory can both have made it; the one
  refused must leave the holder's lock file (and so the directory) alone."""
  out = str(tmp_path / 'new')
  holder = _holder(out)
  try:
    second = run_dir.RunLock(out)
    second._created_directory = True   # pylint: disable=protected-access
    with pytest.raises(run_dir.RunDirBusy, match=f'pid {holder.pid}'):
      second.acquire()
    assert os.path.exists(os.path.join(out, run_dir.LOCK_FILE))
    # Still held: a third writer is refused too.
    with pytest.raises(run_dir.RunDirBusy):
      run_dir.RunLock(out).acquire()
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)


def test_a_path_with_brackets_is_refused_before_training(tmp_path):
  """TensorFlow finds a checkpoint's files by glob pattern: under a
  directory named with brackets it saves checkpoints it cannot restore.
  Such an `out_dir` is refused by name before anything is written."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  # The failure the check prevents: saved, then unreadable.
  ckpt = tf.train.Checkpoint(v=tf.Variable(1.))
  saved = ckpt.save(str(tmp_path / 'tuning[lr=3]' / 'ckpt'))
  with pytest.raises((tf.errors.NotFoundError, ValueError)):
    ckpt.restore(saved).assert_consumed()
  ckpt.restore(ckpt.save(str(tmp_path / 'tuning_lr=3' / 'ckpt')))

  out = str(tmp_path / 'run[1]')
  config = training.TrainConfig(dataset='moons', num_train=64, num_test=64)
  with pytest.raises(ValueError, match=r'`out_dir` must not contain'):
    training.Trainer(config, out_dir=out)
  res = _cli('train', *TINY, '--epochs', '1', '--out', out)
  _, err = res.communicate(timeout=120)
  assert res.returncode == 2, err
  assert len(err.strip().splitlines()) == 1 and '--out' in err, err
  assert not os.path.exists(out)
