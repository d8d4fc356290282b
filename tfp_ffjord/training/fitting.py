"""Optimisation helpers for small models and side-by-side timing.

For models small enough to use all their data in every step (the DiffEqFlux
tutorial, the bijector examples) and for comparing any TFP distribution's
training step with another's. Independent of `Trainer`.
"""

import math
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import _checks
from tfp_ffjord import _lowering
from tfp_ffjord.training import steps as steps_lib
from tfp_ffjord.training.errors import TrainingError

__all__ = ['fit_adam', 'fit_lbfgs', 'total_variation', 'time_train_step']


def fit_adam(loss_fn: Callable[[], tf.Tensor], variables: Sequence[tf.Variable],
             steps: int, learning_rate: float = 1e-2,
             jit_compile: bool = False) -> List[float]:
  """Minimises `loss_fn()` over `variables` with Sonnet's Adam.

  For models small enough to use all their data in every step (the
  DiffEqFlux tutorial, the bijector examples).

  Args:
    loss_fn: a function of no arguments returning the scalar loss.
    variables: the variables to train.
    steps: the number of Adam steps.
    learning_rate: Adam's learning rate.
    jit_compile: compile the step with XLA.

  Returns:
    The loss before each step.

  Examples:
    >>> v = tf.Variable(3.)
    >>> losses = fit_adam(lambda: (v - 1.) ** 2, [v], steps=200,
    ...                   learning_rate=0.1)
    >>> round(losses[0], 3), round(float(v), 2)
    (4.0, 1.0)

  Raises:
    ValueError: for a non-positive `steps` or `learning_rate`.
    TrainingError: if the loss becomes non-finite (the variables keep the
      values of the last good step).
  """
  steps = _checks.positive_int('steps', steps)
  if not learning_rate > 0:
    raise ValueError(
        f'`learning_rate` must be positive; got {learning_rate!r}.')
  step = tf.function(
      steps_lib.loss_step(loss_fn, steps_lib.adam_update(variables,
                                                         learning_rate)),
      jit_compile=jit_compile)

  losses = []
  for i in range(steps):
    loss = float(step())
    if not math.isfinite(loss):
      raise TrainingError(f'fit_adam: the loss became {loss} at step {i + 1}.')
    losses.append(loss)
  return losses


def fit_lbfgs(loss_fn: Callable[[], tf.Tensor],
              variables: Sequence[tf.Variable], max_iterations: int = 100,
              tolerance: float = 1e-8, jit_compile: bool = False):
  """Minimises `loss_fn()` with `tfp.optimizer.lbfgs_minimize`.

  The variables are packed into one vector for the optimizer and hold the
  optimum when this returns (as after `Optim.LBFGS()` in Julia).

  A non-finite loss (e.g. a solve that failed with `raise_on_failure=False`,
  whose states are NaN) or gradient (the adjoint's backward solve failed,
  its gradients NaN) is given to the optimizer as a loss of +inf: TFP's
  Hager-Zhang line search bisects back from +inf, where a NaN would end the
  search.

  Args:
    loss_fn: a function of no arguments returning the scalar loss.
    variables: the variables to optimise (of one dtype).
    max_iterations: the bound on L-BFGS iterations.
    tolerance: the gradient tolerance of convergence.
    jit_compile: compile the loss and its gradient with XLA (one
      compilation; much faster steps for small models).

  Returns:
    TFP's `LBfgsOptimizerResults` (`converged`, `num_iterations`,
    `objective_value`, ...), as NumPy values.
  """
  max_iterations = _checks.positive_int('max_iterations', max_iterations)
  variables = list(variables)
  shapes = [v.shape for v in variables]
  sizes = [int(np.prod(s)) for s in shapes]
  dtype = variables[0].dtype

  def assign(flat):
    for v, part, shape in zip(variables, tf.split(flat, sizes), shapes):
      v.assign(tf.reshape(part, shape))

  # One trace, however many times the line search calls it.
  @tf.function(jit_compile=jit_compile)
  def value_and_gradients(flat):
    assign(flat)
    with tf.GradientTape() as tape:
      loss = loss_fn()
    grads = tape.gradient(loss, variables)
    grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
             for g, v in zip(grads, variables)]
    flat_grad = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    # A failed adjoint backward solve leaves the loss finite and the
    # gradient NaN: that point is as unusable as a failed forward solve.
    finite = (_lowering.is_finite(loss)
              & tf.reduce_all(_lowering.is_finite(flat_grad)))
    loss = tf.where(finite, loss, tf.constant(np.inf, loss.dtype))
    return loss, tf.where(finite, flat_grad, tf.zeros_like(flat_grad))

  def run(start):
    # The optimizer's own loop runs eagerly around the compiled loss: tracing
    # TFP's line search costs more (~20 s) than running it.
    result = tfp.optimizer.lbfgs_minimize(
        value_and_gradients, start, max_iterations=max_iterations,
        tolerance=tolerance)
    assign(result.position)
    return result

  start = tf.concat([tf.reshape(tf.cast(v, dtype), [-1]) for v in variables],
                    0)
  return tf.nest.map_structure(
      lambda t: t.numpy() if isinstance(t, tf.Tensor) else t, run(start))


def total_variation(learned_pdf, true_pdf) -> float:
  """The DiffEqFlux tutorial's score: `sum |p - q| / 2 / n` over `n` points.

  (Distances.jl's `totalvariation` divided by the number of points, on the
  density values at the training points.)

  Args:
    learned_pdf: the learned density at the points.
    true_pdf: the true density at the same points.

  Returns:
    The score (0 for equal densities).

  Raises:
    ValueError: for empty inputs or inputs of different sizes.

  Examples:
    >>> total_variation([0.2, 0.4], [0.4, 0.4])
    0.05
  """
  p = np.asarray(learned_pdf, np.float64).ravel()
  q = np.asarray(true_pdf, np.float64).ravel()
  if p.shape != q.shape or p.size == 0:
    raise ValueError('`learned_pdf` and `true_pdf` must be non-empty and of '
                     f'equal size; got {p.shape} and {q.shape}.')
  return float(np.abs(p - q).sum() / 2. / p.size)


def time_train_step(distribution, variables: Sequence[tf.Variable], batch,
                    steps: int = 10, jit_compile: bool = False,
                    learning_rate: float = 1e-2) -> Dict[str, float]:
  """Times a maximum-likelihood Adam step of any TFP distribution.

  For side-by-side comparisons (e.g. `tfb.FFJORD` against
  `tfp_ffjord.FFJORD` on the same data). The step is compiled with
  `tf.function` (and XLA if asked).

  Args:
    distribution: a TFP distribution whose `log_prob` is trained.
    variables: the variables to train.
    batch: the data batch of every step.
    steps: the steps timed after the first.
    jit_compile: compile the step with XLA.
    learning_rate: Adam's learning rate.

  Returns:
    `{'first_step': seconds for the first call (tracing, compilation, one
    step), 'step': median seconds of the next `steps` calls, 'loss': last
    loss}`.
  """
  steps = _checks.positive_int('steps', steps)
  batch = tf.convert_to_tensor(batch)
  # Adam's slots exist before the first call, which then times one trace.
  step = tf.function(
      steps_lib.loss_step(lambda x: -tf.reduce_mean(distribution.log_prob(x)),
                          steps_lib.adam_update(variables, learning_rate)),
      jit_compile=jit_compile)

  start = time.perf_counter()
  loss = float(step(batch))
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = float(step(batch))
    times.append(time.perf_counter() - start)
  return {'first_step': first, 'step': float(np.median(times)), 'loss': loss}
