"""Sonnet's Adam, compiled faster under XLA."""

from typing import Sequence

import sonnet as snt
import tensorflow as tf
# The checks Sonnet's own optimizers run (dm-sonnet is pinned to 2.0.x).
from sonnet.src.optimizers import optimizer_utils

from tfp_ffjord import _lowering

__all__ = ['Adam']


class Adam(snt.optimizers.Adam):
  """`snt.optimizers.Adam` with the same update and the same state.

  A dense update is Sonnet's (Kingma & Ba 2014, Algorithm 1, op for op),
  except that the square root is `tfp_ffjord._lowering.sqrt`: bitwise the
  same under XLA, where TensorFlow's `Sqrt` costs ~6 ms of compilation per
  variable. Sparse (`tf.IndexedSlices`) updates go to Sonnet's `apply`.
  Checkpoints hold the same variables (`step`, `m`, `v`) under the same
  names, so they restore into either class.
  """

  def apply(self, updates: Sequence[tf.Tensor],
            parameters: Sequence[tf.Variable]):
    if any(isinstance(u, tf.IndexedSlices) for u in updates):
      return super().apply(updates, parameters)
    optimizer_utils.check_distribution_strategy()
    optimizer_utils.check_updates_parameters(updates, parameters)
    self._initialize(parameters)
    self.step.assign_add(1)
    for update, param, m_var, v_var in zip(updates, parameters, self.m,
                                           self.v):
      if update is None:
        continue
      optimizer_utils.check_same_dtype(update, param)
      dtype = update.dtype
      alpha = tf.cast(self.learning_rate, dtype)
      beta_1 = tf.cast(self.beta1, dtype)
      beta_2 = tf.cast(self.beta2, dtype)
      epsilon = tf.cast(self.epsilon, dtype)
      t = tf.cast(self.step, dtype)
      m = beta_1 * m_var + (1. - beta_1) * update
      v = beta_2 * v_var + (1. - beta_2) * update * update
      m_hat = m / (1. - tf.pow(beta_1, t))
      v_hat = v / (1. - tf.pow(beta_2, t))
      param.assign_sub(alpha * m_hat / (_lowering.sqrt(v_hat) + epsilon))
      m_var.assign(m)
      v_var.assign(v)
