"""The maximum-likelihood objective, with RNODE's regularisers."""

import tensorflow as tf

from tfp_ffjord.training.steps import LossTerms

__all__ = ['likelihood_loss', 'hutchinson_seed']


def hutchinson_seed(config, step, replica_id=None):
  """The stateless seed of a step's Hutchinson probes (None for the exact
  trace): a function of `(config.seed, step)`, folded with the replica id
  when distributed, so probes are fresh each step, reproducible on resume
  and different on each replica."""
  if config.trace != 'hutchinson':
    return None
  seed = tf.stack([tf.constant(config.seed % 2**31, tf.int32),
                   tf.cast(step % 2**31, tf.int32)])
  if replica_id is not None:
    seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
  return seed


def likelihood_loss(model, chain, config, batch, labels, seed) -> LossTerms:
  """`-mean log p(batch) + lambda_1 K + lambda_2 B` and its parts.

  One inverse solve per block of `chain` (from `model.flow()`); the RNODE
  integrals are extra states of those solves only when the config weights
  them.
  """
  terms = model.log_prob_terms(chain, batch, seed=seed, labels=labels,
                               regularize=config.regularized)
  kinetic = tf.reduce_mean(terms.kinetic_energy)
  frobenius = tf.reduce_mean(terms.jacobian_frobenius)
  loss = -tf.reduce_mean(terms.log_prob)
  if config.regularized:
    loss += (config.kinetic_weight * kinetic
             + config.jacobian_weight * frobenius)
  return LossTerms(loss, terms.nfe, kinetic, frobenius)
