"""The layout of a training run's directory, and how it is read and written.

    OUT/config.json      the TrainConfig (written when training starts)
    OUT/metrics.json     per-epoch history and summary (rewritten each epoch)
    OUT/checkpoints/     tf.train.CheckpointManager's checkpoints
    OUT/logs/            TensorBoard summaries

One place for the command line (which must decide about `--resume` /
`--overwrite` before TensorFlow loads) and the `Trainer`. JSON files are
written atomically (a temporary file, then a rename), so a crash leaves
the previous version. This module knows nothing of the `Trainer`; it
imports no TensorFlow (checkpoints are restored through the objects the
caller passes).
"""

import json
import logging
import os
import shutil
from typing import Dict, List, Optional

from tfp_ffjord.training.errors import TrainingError

__all__ = ['RunDir', 'summary', 'restore_latest', 'CONFIG_FILE', 'METRICS_FILE', 'CHECKPOINT_DIR',
           'LOG_DIR']

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.json'
CHECKPOINT_DIR = 'checkpoints'
LOG_DIR = 'logs'


def _write_json(path, value):
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


class RunDir:
  """A training run's directory (it need not exist yet)."""

  def __init__(self, path: str):
    self.path = path

  def __repr__(self):
    return f'RunDir({self.path!r})'

  @property
  def config_path(self) -> str:
    return os.path.join(self.path, CONFIG_FILE)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.path, METRICS_FILE)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, CHECKPOINT_DIR)

  @property
  def log_dir(self) -> str:
    return os.path.join(self.path, LOG_DIR)

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
    os.makedirs(self.path, exist_ok=True)
    _write_json(self.config_path, config)
    return self.config_path

  def write_metrics(self, metrics: Dict) -> str:
    os.makedirs(self.path, exist_ok=True)
    _write_json(self.metrics_path, metrics)
    return self.metrics_path

  def read_history(self, last_epoch: int) -> List[Dict]:
    """The saved per-epoch records up to `last_epoch` (those a checkpoint
    covers); `[]` without a metrics file."""
    if not os.path.exists(self.metrics_path):
      return []
    with open(self.metrics_path) as f:
      saved = json.load(f).get('epochs', [])
    return [h for h in saved if h['epoch'] <= last_epoch]


def restore_latest(checkpoint, manager, convert=None) -> Optional[str]:
  """Restores `checkpoint` from the newest readable file of `manager`.

  A checkpoint that cannot be read (truncated or deleted files) is skipped
  with a warning in favour of the previous one. `convert(path) -> bool`, if
  given, is tried on a checkpoint that does not match `checkpoint` (e.g.
  written with another variable layout): True means it restored it. Returns
  the path restored, None if `manager` has no checkpoint; raises
  `TrainingError` if none of them can be read.
  """
  if not manager.checkpoints:
    return None
  for path in reversed(manager.checkpoints):
    try:
      checkpoint.restore(path).assert_consumed()
      return path
    except Exception as e:  # pylint: disable=broad-except
      if convert is not None and convert(path):
        return path
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
