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
            parameters: Sequence[tf.Variable], where=None):
    """Applies `updates` to `parameters` (Sonnet's `apply`).

    Args:
      updates: gradients, one per parameter (`None`: left alone).
      parameters: the variables.
      where: optional scalar bool Tensor. Where it is false the parameters
        and the optimizer's state keep their values and the step is not
        counted: a conditional update without a `tf.cond` (which XLA would
        turn into the same selects, after tracing and lowering both
        branches).
    """
    if any(isinstance(u, tf.IndexedSlices) for u in updates):
      if where is not None:
        raise ValueError('`where` needs dense updates; got tf.IndexedSlices.')
      return super().apply(updates, parameters)
    optimizer_utils.check_distribution_strategy()
    optimizer_utils.check_updates_parameters(updates, parameters)
    self._initialize(parameters)
    if where is None:
      self.step.assign_add(1)
    else:
      self.step.assign_add(tf.cast(where, self.step.dtype))
    # The scalars are Sonnet's, computed once per dtype instead of once per
    # parameter (the same values, fewer ops to trace).
    scalars = {}
    for update, param, m_var, v_var in zip(updates, parameters, self.m,
                                           self.v):
      if update is None:
        continue
      optimizer_utils.check_same_dtype(update, param)
      dtype = update.dtype
      if dtype not in scalars:
        beta_1 = tf.cast(self.beta1, dtype)
        beta_2 = tf.cast(self.beta2, dtype)
        t = tf.cast(self.step, dtype)
        scalars[dtype] = (tf.cast(self.learning_rate, dtype), beta_1, beta_2,
                          tf.cast(self.epsilon, dtype), 1. - beta_1,
                          1. - beta_2, 1. - tf.pow(beta_1, t),
                          1. - tf.pow(beta_2, t))
      (alpha, beta_1, beta_2, epsilon, one_minus_beta_1, one_minus_beta_2,
       correction_1, correction_2) = scalars[dtype]
      m = beta_1 * m_var + one_minus_beta_1 * update
      v = beta_2 * v_var + one_minus_beta_2 * update * update
      m_hat = m / correction_1
      v_hat = v / correction_2
      delta = alpha * m_hat / (_lowering.sqrt(v_hat) + epsilon)
      if where is None:
        param.assign_sub(delta)
        m_var.assign(m)
        v_var.assign(v)
      else:
        param.assign(tf.where(where, param - delta, param))
        m_var.assign(tf.where(where, m, m_var))
        v_var.assign(tf.where(where, v, v_var))
