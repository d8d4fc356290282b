"""A run's checkpoints, for one process or the workers of a cluster."""

import json
import shutil
import tempfile
from typing import Dict, List, Optional

import tensorflow as tf

from tfp_ffjord.training import run_dir as run_dir_lib

__all__ = ['Checkpoints']


class Checkpoints:
  """A run's `tf.train.Checkpoint` of `objects` and the epoch records, and
  the `tf.train.CheckpointManager`s that keep it in `directory`.

  The records (the run's history, as JSON) are saved with the weights: a
  process killed between a checkpoint and `metrics.json` loses no record.
  The chief keeps `max_to_keep` checkpoints in `directory`. Every other
  worker must save too (saving may need collectives), into a scratch
  directory that `close()` removes; every worker restores the chief's.
  """

  def __init__(self, objects: Dict, directory: str, is_chief: bool = True,
               max_to_keep: int = 3):
    self.records = tf.Variable('[]', trainable=False, dtype=tf.string,
                               name='records')
    self.checkpoint = checkpoint = tf.train.Checkpoint(records=self.records,
                                                       **objects)
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

  def restore(self) -> Optional[List[Dict]]:
    """Restores the newest readable checkpoint (see
    `run_dir.restore_latest`): its epoch records, or None if there is
    none."""
    if run_dir_lib.restore_latest(self.checkpoint, self._read) is None:
      return None
    return json.loads(self.records.numpy().decode('utf-8'))

  def save(self, number: int, history: Optional[List[Dict]] = None) -> str:
    """Writes checkpoint `number` (with `history`, the epoch records, if
    given) unless it is the latest already.

    TensorFlow writes the files under a temporary name and renames them, so
    a crash during a save leaves the previous checkpoint as the latest.
    """
    latest = self.latest
    if latest is not None and latest.endswith(f'-{number}'):
      return latest
    if history is not None:
      self.records.assign(json.dumps(history))
    return self.manager.save(checkpoint_number=number)

  def close(self):
    if self._scratch is not None:
      shutil.rmtree(self._scratch, ignore_errors=True)
