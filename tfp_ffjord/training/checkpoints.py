"""A run's checkpoints, for one process or the workers of a cluster."""

import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from tfp_ffjord.training import run_dir as run_dir_lib

__all__ = ['Checkpoints']


class Checkpoints:
  """`tf.train.CheckpointManager`s for `checkpoint` in `directory`.

  The chief keeps `max_to_keep` checkpoints there. Every other worker must
  save too (saving may need collectives), into a scratch directory that
  `close()` removes; every worker restores the chief's.
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, directory: str,
               is_chief: bool = True, max_to_keep: int = 3):
    self.checkpoint = checkpoint
    self._scratch = None
    if is_chief:
      self.manager = self._read = tf.train.CheckpointManager(
          checkpoint, directory, max_to_keep=max_to_keep)
      return
    self._scratch = tempfile.mkdtemp(prefix='tfp_ffjord_worker_')
    self.manager = tf.train.CheckpointManager(checkpoint, self._scratch,
                                              max_to_keep=1)
    self._read = tf.train.CheckpointManager(checkpoint, directory,
                                            max_to_keep=None)

  @property
  def latest(self) -> Optional[str]:
    return self.manager.latest_checkpoint

  def restore(self) -> Optional[str]:
    """Restores the newest readable checkpoint (see
    `run_dir.restore_latest`); None if there is none."""
    return run_dir_lib.restore_latest(self.checkpoint, self._read)

  def save(self, number: int) -> str:
    """Writes checkpoint `number` unless it is the latest already.

    TensorFlow writes the files under a temporary name and renames them, so
    a crash during a save leaves the previous checkpoint as the latest.
    """
    latest = self.latest
    if latest is not None and latest.endswith(f'-{number}'):
      return latest
    return self.manager.save(checkpoint_number=number)

  def close(self):
    if self._scratch is not None:
      shutil.rmtree(self._scratch, ignore_errors=True)
