"""The layout of a training run's directory, and how it is read and written.

    OUT/config.json      the TrainConfig (written when training starts)
    OUT/metrics.json     per-epoch history and summary (rewritten each epoch)
    OUT/checkpoints/     tf.train.CheckpointManager's checkpoints
    OUT/logs/            TensorBoard summaries
    OUT/.lock            the pid and host of the process writing OUT

One place for the command line (which must decide about `--resume` /
`--overwrite` before TensorFlow loads) and the `Trainer`. JSON files are
written atomically (a temporary file, then a rename), so a crash leaves
the previous version. This module knows nothing of the `Trainer`; it
imports no TensorFlow (checkpoints are restored through the objects the
caller passes).
"""

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from typing import Dict, List, Optional

from tfp_ffjord.training.errors import TrainingError

__all__ = ['RunDir', 'RunDirBusy', 'RunLock', 'summary', 'restore_latest',
           'CONFIG_FILE', 'METRICS_FILE', 'CHECKPOINT_DIR', 'LOG_DIR',
           'LOCK_FILE']

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.json'
CHECKPOINT_DIR = 'checkpoints'
LOG_DIR = 'logs'
LOCK_FILE = '.lock'


def _write_json(path, value):
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


class RunDirBusy(TrainingError):
  """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, another user's
    return True
  return True


class RunLock:
  """One writer per run directory: `OUT/.lock`, held with `flock`.

  The file names the holder (pid, host, start time) for the error a second
  writer gets. A held `flock` refuses the second writer with `RunDirBusy`.
  The kernel drops the `flock` when its holder dies, however it dies, so a
  lock file left by a dead process is taken over (with a warning); one
  naming a live process on this host that holds no `flock` (a file system
  that ignores it, or a reused pid) is refused too. Not for directories
  shared by machines whose file system does not carry `flock` between them.
  """

  def __init__(self, path: str):
    self.directory = path
    self.path = os.path.join(path, LOCK_FILE)
    self._fd = None
    self._created_directory = False

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _holder(self, fd) -> Dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      holder = json.loads(os.read(fd, 4096).decode() or '{}')
      return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
      return {}

  @staticmethod
  def describe(holder: Dict) -> str:
    if not holder:
      return 'another process'
    since = holder.get('since')
    when = (time.strftime(' since %Y-%m-%d %H:%M:%S',
                          time.localtime(since)) if since else '')
    return f"pid {holder.get('pid')} on {holder.get('host')}{when}"

  def _busy(self, holder: Dict, hint: str = '') -> RunDirBusy:
    return RunDirBusy(
        f'{self.directory} is in use by another run '
        f'({self.describe(holder)}); wait for it to finish, or use another '
        f'--out{hint}')

  def acquire(self) -> 'RunLock':
    """Takes the lock (creating the directory); raises `RunDirBusy`."""
    if self.held:
      return self
    if not os.path.isdir(self.directory):
      os.makedirs(self.directory, exist_ok=True)
      self._created_directory = True
    host = socket.gethostname()
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = self._holder(fd)
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        self._release_directory()
        raise self._busy(holder) from None
      # The file may have been removed by a holder releasing it between
      # our open and our flock: then the lock is on a dead inode; retry.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      break
    holder = self._holder(fd)
    if holder:
      pid = holder.get('pid')
      if (holder.get('host') == host and isinstance(pid, int)
          and pid != os.getpid() and _pid_alive(pid)):
        # A live process that does not hold the flock: it wrote the file
        # without locking (never ours) or the file system ignores flock.
        os.close(fd)
        self._release_directory()
        raise self._busy(holder, f' (if that process is not a run, remove '
                                 f'{self.path})')
      logging.getLogger('tfp_ffjord').warning(
          'Taking over the lock of %s left by %s, which is no longer '
          'running.', self.directory, self.describe(holder))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(dict(pid=os.getpid(), host=host,
                                 since=time.time())).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def _release_directory(self):
    # A directory this lock made goes if it is empty (a refused run, or a
    # run that wrote nothing). The lock file is never removed here: it may
    # be the holder's (two runs can both have made the directory), and then
    # the directory is not empty and stays.
    if self._created_directory:
      self._created_directory = False
      try:
        os.rmdir(self.directory)
      except OSError:
        pass

  def release(self) -> None:
    """Removes the lock file and drops the lock (no-op if not held)."""
    if self._fd is None:
      return
    try:
      os.remove(self.path)   # before unlocking: see the inode check above
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    self._release_directory()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def __del__(self):
    if self._fd is not None:
      try:
        os.close(self._fd)
      except OSError:
        pass


class RunDir:
  """A training run's directory (it need not exist yet).

  Args:
    path: the directory.
  """

  def __init__(self, path: str):
    self.path = path

  @classmethod
  def for_writing(cls, path: str, name: str = 'out_dir') -> 'RunDir':
    """A run directory that checkpoints will be written to and restored
    from. TensorFlow finds a checkpoint's files by glob pattern, so in a path
    with `[` or `]` it writes checkpoints it can never restore: such a path
    is refused here, before any training, naming the argument `name`."""
    bad = sorted(set('[]') & set(os.fspath(path)))
    if bad:
      raise ValueError(
          f'`{name}` must not contain {" or ".join(map(repr, bad))}: '
          'TensorFlow reads checkpoints by glob pattern and could not '
          f'restore the ones written to {path!r}.')
    return cls(path)

  def __repr__(self):
    return f'RunDir({self.path!r})'

  @property
  def config_path(self) -> str:
    """`config.json`: the run's `TrainConfig`."""
    return os.path.join(self.path, CONFIG_FILE)

  @property
  def metrics_path(self) -> str:
    """`metrics.json`: the per-epoch records and the summary."""
    return os.path.join(self.path, METRICS_FILE)

  @property
  def checkpoint_dir(self) -> str:
    """The `checkpoints/` directory."""
    return os.path.join(self.path, CHECKPOINT_DIR)

  @property
  def log_dir(self) -> str:
    """The TensorBoard `logs/` directory."""
    return os.path.join(self.path, LOG_DIR)

  def lock(self) -> RunLock:
    """A `RunLock` on this directory (not yet taken: use `with`)."""
    return RunLock(self.path)

  def has_run(self) -> bool:
    """Whether a run was started here (a config or checkpoints exist)."""
    return (os.path.exists(self.config_path)
            or os.path.isdir(self.checkpoint_dir))

  def clear(self) -> None:
    """Removes a previous run's files (other files in the directory stay)."""
    for path in (self.checkpoint_dir, self.log_dir):
      shutil.rmtree(path, ignore_errors=True)
    for path in (self.config_path, self.metrics_path):
      if os.path.exists(path):
        os.remove(path)

  def read_config(self) -> Dict:
    """The saved config as a dict; `FileNotFoundError` if there is none."""
    if not os.path.exists(self.config_path):
      raise FileNotFoundError(f'{self.path} is not a training directory (no '
                              f'{CONFIG_FILE}).')
    with open(self.config_path) as f:
      return json.load(f)

  def write_config(self, config: Dict) -> str:
    """Writes `config.json` atomically; returns its path."""
    os.makedirs(self.path, exist_ok=True)
    _write_json(self.config_path, config)
    return self.config_path

  def write_metrics(self, metrics: Dict) -> str:
    """Writes `metrics.json` atomically; returns its path."""
    os.makedirs(self.path, exist_ok=True)
    _write_json(self.metrics_path, metrics)
    return self.metrics_path


def restore_latest(checkpoint, manager) -> Optional[str]:
  """Restores `checkpoint` from the newest readable file of `manager`.

  A checkpoint that cannot be read (truncated or deleted files) is skipped
  with a warning in favour of the previous one. Returns the path restored, None if `manager` has no checkpoint; raises
  `TrainingError` if none of them can be read.
  """
  if not manager.checkpoints:
    return None
  for path in reversed(manager.checkpoints):
    try:
      checkpoint.restore(path).assert_consumed()
      return path
    except Exception as e:  # pylint: disable=broad-except
      # Truncated files surface as OpError, IndexError, ValueError...
      logging.getLogger('tfp_ffjord').warning(
          'Cannot restore %s (%s); trying the previous checkpoint.', path,
          str(e).splitlines()[0] if str(e) else type(e).__name__)
  raise TrainingError(
      f'No checkpoint in {manager.directory} can be restored.')


def summary(config: Dict, history: List[Dict],
            entropy: Optional[float]) -> Dict:
  """`metrics.json`: the config, the per-epoch `history` and the final
  held-out NLL with its gap to the data `entropy` (if known)."""
  last = history[-1] if history else {}
  final = last.get('test_nll')
  out = dict(config=config, epochs=history, final_test_nll=final,
             data_entropy=entropy,
             gap_to_entropy=(None if final is None or entropy is None
                             else final - entropy),
             total_wall_time=last.get('wall_time', 0.),
             complete=last.get('epoch') == config['epochs'])
  if 'test_bits_per_dim' in last:
    out['final_test_bits_per_dim'] = last['test_bits_per_dim']
  return out
