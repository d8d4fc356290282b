"""`Evaluator`: a trained flow in use — exact log-densities, samples, maps.

Everything here runs the evaluation flow (tight tolerance; the exact trace up
to `config.EXACT_EVAL_MAX_DIM` dimensions, seeded Hutchinson above) in
compiled functions built once: `log_prob` in fixed-size padded batches, so
evaluation compiles once too.
"""

from typing import Dict

import numpy as np
import tensorflow as tf

from tfp_ffjord import _checks
from tfp_ffjord import ode
from tfp_ffjord.training import steps as steps_lib

__all__ = ['Evaluator', 'EVAL_SEED']

EVAL_SEED = 20190101   # the second half of each evaluation batch's seed


class Evaluator:
  """Log-densities, NLL, samples and the forward map of a `FlowModel`.

  Args:
    model: the `FlowModel`.
    flow, chain: its evaluation flow (`model.flow(eval_solver, trace)`; the
      exact trace, or Hutchinson's for high-dimensional data).
    data: the `datasets.Dataset` (dimension, test set, labels, bits/dim).
    batch_size: points per compiled `log_prob` call.
    jit_compile: compile `log_prob` with XLA.
  """

  def __init__(self, model, flow, chain, data, batch_size: int,
               jit_compile: bool = True):
    self.model, self.flow, self.chain, self.data = model, flow, chain, data
    self.batch_size = batch_size
    self.last_nfe = []
    dim = data.dim
    labels = lambda n: tf.TensorSpec([n], tf.int32)
    points = lambda n: tf.TensorSpec([n, dim], tf.float32)
    # Labels are always an input (ignored by unconditional models), so both
    # kinds of model share one compiled signature.
    # A seed per batch: Hutchinson's probes (if the evaluation flow uses
    # them) are the same on every call; the exact trace ignores it.
    self._log_prob = steps_lib.make_eval_step(
        lambda x, lab, seed: model.log_prob_terms(chain, x, seed=seed,
                                                  labels=lab)[::3],
        [points(batch_size), labels(batch_size),
         tf.TensorSpec([2], tf.int32)], jit_compile=jit_compile)
    # Checked functions: a failed solve raises `ode.SolverError` after the
    # call instead of through assertion ops (host ops on an accelerator).
    self._forward = ode.checked_function(
        lambda x, lab: chain.forward(x, **model.bijector_kwargs(lab)),
        input_signature=[points(None), labels(None)], autograph=False)
    # FFJORD models seed their Hutchinson probes from the sample's seed (an
    # adaptive solve's steps follow the log-det's error too).
    sample = lambda n, seed, lab: flow.sample(
        n, seed=seed, bijector_kwargs=model.bijector_kwargs(lab, seed))
    signature = [tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int32),
                 labels(None)]
    if model.is_ffjord:
      self._sample = ode.checked_function(sample, input_signature=signature,
                                          autograph=False)
    elif model.baseline.static_batch:   # tfb.Glow: traced per sample count
      traced = tf.function(sample, autograph=False)
      self._sample = lambda n, seed, lab: traced(int(n), seed, lab)
    else:
      self._sample = tf.function(sample, input_signature=signature,
                                 autograph=False)

  def labels(self, labels, n) -> np.ndarray:
    """Labels for `n` points: the given ones, or zeros for unconditional
    models (which ignore them)."""
    classes = self.model.num_classes
    if labels is None:
      if classes:
        raise ValueError('This model is conditional: give class `labels`.')
      return np.zeros([n], np.int32)
    if not classes:
      raise ValueError('`labels` given, but this model is not conditional.')
    labels = np.broadcast_to(np.asarray(labels), [n]) if np.ndim(
        labels) == 0 else np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f'`labels` must have shape [{n}]; got {labels.shape}.')
    if labels.min() < 0 or labels.max() >= classes:
      raise ValueError(f'`labels` must be in [0, {classes}); got values in '
                       f'[{labels.min()}, {labels.max()}].')
    return labels.astype(np.int32)

  def log_prob(self, points, labels=None) -> np.ndarray:
    """Log-density (nats) of `[N, D]` points, in fixed-size batches (exact,
    or an unbiased Hutchinson estimate for high-dimensional data).

    Conditional models need `labels` (`[N]` ints) and return
    `log p(x | label)`.
    """
    points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] != self.data.dim:
      raise ValueError(f'points must have shape [N, {self.data.dim}]; got '
                       f'{points.shape}.')
    labels = self.labels(labels, len(points))
    out, self.last_nfe = [], []
    size = self.batch_size
    for start in range(0, len(points), size):
      chunk, chunk_labels = (points[start:start + size],
                             labels[start:start + size])
      n = len(chunk)
      if n < size:  # Pad to the traced shape; padding rows are dropped.
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - n, 0)])
        chunk_labels = np.concatenate(
            [chunk_labels, np.repeat(chunk_labels[:1], size - n)])
      lp, nfe = self._log_prob(tf.constant(chunk), tf.constant(chunk_labels),
                               tf.constant([start // size, EVAL_SEED]))
      out.append(lp.numpy()[:n])
      self.last_nfe.append(int(nfe))
    return np.concatenate(out) if out else np.zeros([0], np.float32)

  def marginal_log_prob(self, points) -> np.ndarray:
    """`log p(x)`; for conditional models the class mixture
    `log sum_c p(c) p(x | c)`, with `p(c)` the training frequencies."""
    if not self.model.num_classes:
      return self.log_prob(points)
    counts = np.bincount(self.data.train_labels,
                         minlength=self.model.num_classes)
    per_class = np.stack([
        np.log(counts[c] / counts.sum())
        + self.log_prob(points, np.full([len(points)], c))
        for c in range(len(counts)) if counts[c]])
    top = per_class.max(0)
    return top + np.log(np.exp(per_class - top).sum(0))

  def evaluate(self, points=None, labels=None) -> Dict[str, float]:
    """Mean NLL (nats; bits/dim too for D > 2 or dequantised data).

    Defaults to the test set (and, for conditional models, its labels).
    A conditional model given points without labels reports the marginal
    `-log sum_c p(c) p(x | c)`. A failed solve raises `ode.SolverError`.
    """
    if points is None:
      points = self.data.test
      labels = self.data.test_labels if self.model.num_classes else None
    lp = (self.marginal_log_prob(points) if labels is None
          else self.log_prob(points, labels))
    nll = float(-np.mean(lp))
    result = {'nll': nll, 'nfe': float(np.mean(self.last_nfe))}
    if self.data.dim > 2 or self.data.bin_width is not None:
      result['bits_per_dim'] = self.data.bits_per_dim(nll)
    return result

  def forward(self, points, labels=None) -> np.ndarray:
    """The flow's forward map (base -> data) of `[N, D]` points. A failed
    solve raises `ode.SolverError`."""
    points = np.asarray(points, np.float32)
    labels = self.labels(labels, len(points))
    return self._forward(points, labels).numpy()

  def sample(self, n: int, seed: int = 0, labels=None) -> np.ndarray:
    """`n` samples of the model (tight-tolerance solve), `[n, D]`.

    Conditional models sample `x | label`: `labels` is an int (one class for
    all) or `[n]` ints; by default the classes of the training set are drawn
    in proportion. A failed solve raises `ode.SolverError`.
    """
    n = _checks.positive_int('n', n)
    if self.model.num_classes and labels is None:
      labels = np.random.default_rng(seed).choice(self.data.train_labels, n)
    return self._sample(tf.constant(n), tf.constant([seed, 1]),
                        self.labels(labels, n)).numpy()
