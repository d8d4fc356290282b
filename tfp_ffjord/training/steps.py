"""Compiled training and evaluation steps, as functions of their parts.

Each `make_*` returns a compiled callable with a fixed input signature (one
trace per run); `on_trace`, if given, is called each time one is traced
(a Python side effect, so it runs only while tracing). The steps return
their diagnostics (NFE, regularisers) as values.
"""

import collections
from typing import Any, Callable, List, NamedTuple, Optional

import tensorflow as tf

from tfp_ffjord import _lowering
from tfp_ffjord import ode
from tfp_ffjord.training import adam

__all__ = ['LossTerms', 'Update', 'adam_update', 'apply_gradients',
           'loss_step', 'make_train_step', 'make_eval_step']

LossTerms = collections.namedtuple(
    'LossTerms', ['loss', 'nfe', 'kinetic', 'frobenius'])
LossTerms.__doc__ = """A training loss and what came with it.

Attributes:
  loss: scalar float32, the objective minimised (batch mean).
  nfe: int32, dynamics evaluations of the step's forward solves (0 for
    flow matching).
  kinetic: the batch mean of RNODE's kinetic energy (0 when the config
    does not weight it).
  frobenius: the batch mean of RNODE's Jacobian Frobenius norm (likewise).
"""


def apply_gradients(optimizer, loss, grads, variables, step=None,
                    clip_norm: Optional[float] = None):
  """Clips `grads` (to `clip_norm`) and applies them unless `loss` is not
  finite; then re-applies the variables' constraints (Keras layers').

  A non-finite loss leaves the weights and the optimizer state those of the
  last good step (the caller stops training); `step`, if given, counts the
  applied updates.
  """
  if clip_norm is not None:
    grads, _ = tf.clip_by_global_norm(grads, clip_norm)
  finite = _lowering.is_finite(loss)
  if (isinstance(optimizer, adam.Adam)
      and not any(getattr(v, 'constraint', None) is not None
                  for v in variables)
      and not any(isinstance(g, tf.IndexedSlices) for g in grads)):
    # Selects instead of a conditional: the same update, less to trace.
    optimizer.apply(grads, variables, where=finite)
    if step is not None:
      step.assign_add(tf.cast(finite, step.dtype))
    return finite

  def update():
    optimizer.apply(grads, variables)
    # Keras variable constraints (e.g. MADE's masks in tfb.AutoregressiveNetwork)
    # are the layer's structure; Sonnet optimizers do not apply them.
    for v in variables:
      if getattr(v, 'constraint', None) is not None:
        v.assign(v.constraint(v))
    if step is not None:
      step.assign_add(1)
    return tf.constant(True)

  return tf.cond(finite, update, lambda: tf.constant(False))


class Update(NamedTuple):
  """An optimizer step's parts: the optimizer, the variables it updates,
  the step counter of applied updates (optional), the gradients' global
  norm clip (optional) and a `WeightAverage` of the variables that each
  applied update moves (optional)."""
  optimizer: Any
  variables: List[tf.Variable]
  step: Optional[tf.Variable] = None
  clip_norm: Optional[float] = None
  average: Optional[Any] = None

  def apply(self, loss, grads):
    """`apply_gradients` with these parts; then the average's update."""
    applied = apply_gradients(self.optimizer, loss, grads,
                              list(self.variables), self.step, self.clip_norm)
    if self.average is not None:
      self.average.update(applied)
    return applied


def adam_update(variables, learning_rate, step=None,
                clip_norm: Optional[float] = None) -> Update:
  """An `Update` by this package's Adam (Sonnet's update rule), its slots
  created now: created inside the first call of a `tf.function`, they would
  make it trace twice."""
  variables = list(variables)
  optimizer = adam.Adam(learning_rate)
  optimizer._initialize(variables)  # pylint: disable=protected-access
  return Update(optimizer, variables, step, clip_norm)


def loss_step(loss_fn: Callable, update: Update,
              before: Optional[Callable[[], None]] = None):
  """`step(*args) -> loss`: `update` applied to the gradient of
  `loss_fn(*args)` (a scalar), unless the loss is not finite
  (`apply_gradients`); `before()`, if given, runs first."""
  variables = list(update.variables)

  def step(*args):
    if before is not None:
      before()
    with tf.GradientTape() as tape:
      loss = loss_fn(*args)
    update.apply(loss, tape.gradient(loss, variables))
    return loss
  return step


def _counted(fn, on_trace):
  if on_trace is None:
    return fn

  def traced(*args):
    on_trace()
    return fn(*args)
  return traced


def make_train_step(loss_fn: Callable[..., LossTerms], update: Update,
                    input_signature, jit_compile: bool = True,
                    on_trace=None):
  """`train_step(*inputs) -> LossTerms`: one optimizer step (`update`).

  `loss_fn(*inputs)` computes the `LossTerms` (under the step's tape). The
  step is an `ode.checked_function`: a failed solve raises
  `ode.SolverError` after the call, even under XLA, and its update was not
  applied (the loss is NaN).
  """
  variables = list(update.variables)

  def train_step(*inputs):
    with tf.GradientTape() as tape:
      terms = loss_fn(*inputs)
    update.apply(terms.loss, tape.gradient(terms.loss, variables))
    return terms

  # autograph=False: the traced code uses explicit control flow; converting
  # it (Sonnet, TFP and our modules) took the first flow-matching call from
  # ~2.8 s to ~4.0 s.
  return ode.checked_function(_counted(train_step, on_trace),
                              jit_compile=jit_compile, autograph=False,
                              input_signature=input_signature)


def make_eval_step(log_prob_fn, input_signature, jit_compile: bool = True):
  """`eval_step(*inputs) -> (log_prob, nfe)`, checked like the train step."""
  return ode.checked_function(log_prob_fn, jit_compile=jit_compile,
                              autograph=False,
                              input_signature=input_signature)
