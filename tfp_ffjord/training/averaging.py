"""An exponential moving average of the trained weights.

Evaluation and sampling with averaged weights is the usual companion of
flow matching and diffusion training: the average of the last ~1/(1 -
decay) steps' weights is a smoother model than the last step's.
"""

import contextlib
from typing import Sequence

import tensorflow as tf

__all__ = ['WeightAverage']


class WeightAverage(tf.Module):
  """The exponential moving average of `variables`, updated by each step.

  After update `n` (counting applied updates only), `average = d * average
  + (1 - d) * value` with `d = min(decay, (1 + n) / (10 + n))`: the early
  averages follow the weights closely instead of remembering their random
  start (the warm-up of `tf.train.ExponentialMovingAverage`'s
  `num_updates`). The averages are variables of this module, so a
  `tf.train.Checkpoint` that holds it saves and restores them.

  Args:
    variables: the variables to average (their values now start the
      average).
    decay: the decay `d`, in (0, 1).
    name: the module's name.

  Raises:
    ValueError: if `decay` is not in (0, 1).
  """

  def __init__(self, variables: Sequence[tf.Variable], decay: float,
               name: str = 'weight_average'):
    super().__init__(name=name)
    if isinstance(decay, bool) or not 0. < float(decay) < 1.:
      raise ValueError(f'`decay` must be in (0, 1); got {decay!r}.')
    self.decay = float(decay)
    self._variables = list(variables)
    with self.name_scope:
      self.averages = [
          tf.Variable(v.read_value(), trainable=False,
                      name=v.name.split(':')[0].replace('/', '_'))
          for v in self._variables]
      self.updates = tf.Variable(0, trainable=False, dtype=tf.int64,
                                 name='updates')
    self._swapped = 0

  def update(self, where=True):
    """Moves the averages towards the variables' values; `where` (a scalar
    bool) false leaves them and the update count as they are."""
    where = tf.convert_to_tensor(where, tf.bool)
    updates = self.updates + tf.cast(where, tf.int64)
    for average, v in zip(self.averages, self._variables):
      count = tf.cast(updates, average.dtype)
      d = tf.minimum(tf.constant(self.decay, average.dtype),
                     (1. + count) / (10. + count))
      average.assign(tf.where(where, d * average + (1. - d) * v, average))
    self.updates.assign(updates)

  @contextlib.contextmanager
  def swapped(self):
    """Within the block the variables hold the averages; on leaving it,
    their own values again. Re-entrant: a nested block changes nothing."""
    if not self._swapped:
      own = [v.read_value() for v in self._variables]
      for v, average in zip(self._variables, self.averages):
        v.assign(average)
    self._swapped += 1
    try:
      yield
    finally:
      self._swapped -= 1
      if not self._swapped:
        for v, value in zip(self._variables, own):
          v.assign(value)
