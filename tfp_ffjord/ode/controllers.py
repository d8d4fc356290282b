"""Step-size controllers: how long each step of the stepping loop is.

A controller owns everything about step sizes that the loop
(`runge_kutta.integrate`) asks: the first step of a solve or segment, the
bound on step attempts, the solution times `ChosenBySolver` implies, whether
an attempt is accepted and the next step, and the controller the adjoint's
backward solve uses. `ConstantStepSize` takes steps of one length (fixed-step
methods); `PIController` adapts them to an error estimate (embedded pairs).
Both are frozen dataclasses of Python numbers, so two equal settings compare
equal.
"""

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import numpy as np
import tensorflow as tf

from tfp_ffjord._lowering import in_xla_context
from tfp_ffjord._lowering import is_finite
from tfp_ffjord._lowering import magnitude
from tfp_ffjord._lowering import row_sums
from tfp_ffjord._lowering import sqrt

__all__ = ['Attempt', 'ConstantStepSize', 'PIController']


class Attempt(NamedTuple):
  """One step attempt, as a controller judges it.

  Attributes:
    t: the time the attempt starts at.
    h: the step size proposed for it.
    h_step: the step taken (`h`, or shorter to end on a solution time).
    clipped: whether it was shortened to end on a solution time.
    k1_finite: whether the derivative at its start is finite.
    new_finite: whether the state it reached is finite.
  """
  t: tf.Tensor
  h: tf.Tensor
  h_step: tf.Tensor
  clipped: tf.Tensor
  k1_finite: tf.Tensor
  new_finite: tf.Tensor


class Decision(NamedTuple):
  """A controller's verdict on an `Attempt`: whether it is `accept`ed, the
  next step `h_next`, the error `prev_err` the next decision remembers, and
  whether it failed by `underflow` (step too small) or `non_finite` state."""
  accept: tf.Tensor
  h_next: tf.Tensor
  prev_err: tf.Tensor
  underflow: tf.Tensor
  non_finite: tf.Tensor


def positive_step(h, dtype):
  """`h`, or 1 where it is not positive (a zero-length span: any positive
  step ends it at once)."""
  return tf.where(h > 0, h, tf.ones([], dtype))


@dataclasses.dataclass(frozen=True)
class ConstantStepSize:
  """Steps of one length, for the fixed-step solvers.

  A step that would cross a solution time is shortened to end on it.

  Attributes:
    step_size: the step's length. It may be a scalar Tensor (the adjoint of
      a `num_steps` grid keeps the forward's step).
    num_steps: or the span cut into this many steps (set one of the two).
  """
  step_size: Union[None, float, tf.Tensor] = None
  num_steps: Optional[int] = None

  adaptive = False
  needs_probe = False
  owns_first_step = True

  def first_step(self, span, dtype):
    """The first step of a solve or segment over `span`."""
    if self.num_steps is not None:
      h = span / tf.cast(self.num_steps, dtype)
    else:
      h = tf.cast(self.step_size, dtype)
    return positive_step(h, dtype)

  def decide(self, attempt: Attempt, e=None, prev_err=None,
             order=None) -> Decision:
    """Every finite step is accepted; the step size does not change."""
    del e, order
    return Decision(
        accept=attempt.new_finite, h_next=attempt.h, prev_err=prev_err,
        underflow=tf.constant(False),
        non_finite=~(attempt.k1_finite & attempt.new_finite))

  def max_iterations(self, t0, ts, segmented, max_num_steps):
    """A static bound on step attempts through `ts`: the steps, plus one
    per solution time (shortened steps); at most `max_num_steps`."""
    num_times = ts.shape[0] or 1
    bound = None
    if self.num_steps is not None:
      # Segmented: `num_steps` in every segment.
      bound = self.num_steps * (num_times if segmented else 1) + num_times
    else:
      t0_v, ts_v = tf.get_static_value(t0), tf.get_static_value(ts)
      if t0_v is not None and ts_v is not None:
        span = abs(float(np.reshape(ts_v, [-1])[-1]) - float(t0_v))
        bound = int(math.ceil(span / self.step_size)) + num_times + 1
    if max_num_steps is not None:
      bound = max_num_steps if bound is None else min(bound, max_num_steps)
    return bound

  def chosen_times(self, t0, final_time, name):
    """The grid of the steps from `t0` to `final_time`: `num_steps + 1`
    times, or `t0 + k * step_size` and `final_time`."""
    dtype = t0.dtype
    if self.num_steps is not None:
      k = tf.range(self.num_steps, dtype=dtype) / self.num_steps
      return tf.concat([t0 + (final_time - t0) * k, final_time[tf.newaxis]],
                       0)
    span = final_time - t0
    h = tf.constant(self.step_size, dtype)
    # A last step shorter than 1e-9 of a step is rounding: end on final_time.
    count = tf.cast(tf.math.ceil(tf.abs(span) / h - 1e-9), tf.int32)
    count = tf.maximum(count, 1)
    static = tf.get_static_value(count)
    if static is None and in_xla_context():
      raise ValueError(
          f'{name}: with `step_size` and a `ChosenBySolver.final_time` '
          'that is not a constant, the number of steps is known only at run '
          'time, which XLA (jit_compile=True) cannot compile; give '
          '`num_steps` instead, or explicit `solution_times`.')
    if static is not None:
      count = int(static)
    k = tf.cast(tf.range(count), dtype)
    grid = t0 + tf.sign(span) * h * k
    return tf.concat([grid, final_time[tf.newaxis]], 0)

  def for_backward(self, span, segmented):
    """The controller of the adjoint's backward solve over `span`.

    `num_steps` spans the whole forward solve: backwards, every segment
    keeps the forward's step size (`num_steps` per segment would make T
    solution times cost T times the forward's steps). A segmented solve
    takes `num_steps` per segment both ways.
    """
    if self.num_steps is None or segmented:
      return self
    return ConstantStepSize(step_size=span / self.num_steps)


@dataclasses.dataclass(frozen=True)
class PIController:
  """Adapts the step to the error of an embedded pair.

  The error of an attempt is the RMS over the controlled components of
  `|err| / (atol + rtol * max(|y|, |y_new|))`; it is accepted when that is
  <= 1. The next step is the current one times
  `safety_factor * e_n ** (-pi_alpha / k) * e_{n-1} ** (pi_beta / k)`
  (`k` the embedded order plus one), clipped to
  `[min_step_factor, max_step_factor]`. The first step is
  `first_step_size`, or estimated from the dynamics (Hairer, Norsett &
  Wanner, 1993, II.4; one more evaluation).

  Attributes:
    rtol: the relative tolerance.
    atol: the absolute tolerance.
    first_step_size: the first step, or None to estimate it.
    safety_factor: the factor on the proposed next step.
    min_step_factor: the smallest ratio of the next step to the current.
    max_step_factor: the largest ratio of the next step to the current.
    pi_alpha: the proportional exponent.
    pi_beta: the integral exponent (0: an I controller).
  """
  rtol: float = 1e-3
  atol: float = 1e-6
  first_step_size: Optional[float] = None
  safety_factor: float = 0.9
  min_step_factor: float = 0.2
  max_step_factor: float = 10.0
  pi_alpha: float = 0.7
  pi_beta: float = 0.4

  adaptive = True

  @property
  def needs_probe(self) -> bool:
    """Whether the first step is estimated by probing the dynamics."""
    return self.first_step_size is None

  @property
  def owns_first_step(self) -> bool:
    """Whether a first step was set (it wins over one proposed from
    elsewhere, e.g. the forward solve's for the adjoint)."""
    return self.first_step_size is not None

  def first_step(self, span, dtype):
    """`first_step_size` (only when it is set; else the loop probes)."""
    del span
    return positive_step(tf.constant(self.first_step_size, dtype), dtype)

  def error_squares(self, y, y_new, err, mask):
    """The squared scaled errors of the leaves selected by `mask`, and
    their number (complex components by their magnitude); the error norm
    is `root_mean` of their sum."""
    squares = [tf.square(magnitude(e_i) / (
        self.atol + self.rtol * tf.maximum(magnitude(y_i), magnitude(n_i))))
               for y_i, n_i, e_i, use in zip(y, y_new, err, mask) if use]
    return squares, sum(tf.size(x) for x in squares)

  def decide(self, attempt: Attempt, e=None, prev_err=None,
             order=None) -> Decision:
    """Accepts the attempt if its error norm `e` is <= 1 and finite, and
    proposes the next step (`order`: the embedded order plus one)."""
    dtype = attempt.h.dtype
    eps = tf.constant(tf.experimental.numpy.finfo(dtype.as_numpy_dtype).eps,
                      dtype)
    ok = attempt.new_finite & is_finite(e)
    accept = ok & (e <= 1.)
    e_safe = tf.where(ok, tf.maximum(e, tf.constant(1e-10, dtype)),
                      tf.constant(1e10, dtype))
    factor_accept = (self.safety_factor
                     * tf.pow(e_safe, -self.pi_alpha / order)
                     * tf.pow(prev_err, self.pi_beta / order))
    factor_reject = tf.minimum(
        self.safety_factor * tf.pow(e_safe, -1. / order), 1.)
    factor = tf.where(accept, factor_accept, factor_reject)
    factor = tf.clip_by_value(factor, self.min_step_factor,
                              self.max_step_factor)
    h_next = attempt.h_step * factor
    # A step shortened to hit a solution time says little about the size
    # of the next one: keep the longer proposal when the error allows.
    h_next = tf.where(attempt.clipped & accept & (factor >= 1.),
                      tf.maximum(attempt.h, h_next), h_next)
    underflow = (~accept) & (h_next <= 8. * eps * tf.maximum(
        magnitude(attempt.t), tf.ones([], dtype)))
    return Decision(accept=accept, h_next=h_next,
                    prev_err=tf.where(accept, e_safe, prev_err),
                    underflow=underflow, non_finite=~attempt.k1_finite)

  def max_iterations(self, t0, ts, segmented, max_num_steps):
    """`max_num_steps`: the number of steps is known only after the solve."""
    del t0, ts, segmented
    return max_num_steps

  def chosen_times(self, t0, final_time, name):
    """None: the times are the accepted steps, known only after the solve."""
    del t0, final_time, name
    return None

  def for_backward(self, span, segmented):
    """The backward solve adapts its steps with the same settings."""
    del span, segmented
    return self

  def probe_step_sizes(self, y0, f0, f1, order, mask, span):
    """`(h0, h)`: the probe distance and, given `f1 = fn(t0 + h0, y0 + h0
    f0)`, the starting step of II.4 (with `f1 = f0`, `h` is meaningless)."""
    d0, d1, e = tf.unstack(tf.cast(
        start_norms(y0, f0, f1, self.rtol, self.atol, mask), span.dtype))
    h0 = first_guess(d0, d1, span)
    return h0, probed_step(h0, d1, e / h0, order, span)

  def initial_step_size(self, fn, t0, y0, f0, order, mask, span,
                        y_scale=None):
    """The starting step of II.4 (1 evaluation of `fn`); `y_scale`
    (default `y0`) is what the norms measure the state by."""
    y_scale = y0 if y_scale is None else y_scale
    h0, _ = self.probe_step_sizes(y_scale, f0, f0, order, mask, span)
    f1 = fn(t0 + h0, [y + tf.cast(h0, y.dtype) * f for y, f in zip(y0, f0)])
    return self.probe_step_sizes(y_scale, f0, f1, order, mask, span)[1]


def root_mean(total, count):
  """`sqrt(total / count)`, 0 when nothing was counted."""
  return sqrt(total / tf.cast(tf.maximum(count, 1), total.dtype))


def start_norms(y0, f0, f1, rtol, atol, mask):
  """The norms of Hairer, Norsett & Wanner (1993), II.4, from one reduction:
  `[d0, d1, e]`, the RMS norms of `y0`, `f0` and `f1 - f0`, scaled by
  `atol + rtol |y0|`, over the leaves selected by `mask`."""
  scale = [atol + rtol * magnitude(y) for y in y0]

  def squares(xs):
    return [tf.square(magnitude(x) / s)
            for x, s, use in zip(xs, scale, mask) if use]

  rows = [squares(y0), squares(f0),
          squares([b - a for a, b in zip(f0, f1)])]
  dtype = y0[0].dtype.real_dtype
  return root_mean(row_sums(rows, dtype), sum(tf.size(x) for x in rows[0]))


def first_guess(d0, d1, span):
  """The probe distance `h0` of II.4 from the norms `d0`, `d1`."""
  dtype = span.dtype
  small = tf.constant(1e-5, dtype)
  h0 = tf.where((d0 < small) | (d1 < small), tf.constant(1e-6, dtype),
                0.01 * d0 / tf.maximum(d1, small))
  return tf.minimum(h0, span)


def probed_step(h0, d1, d2, order, span):
  """The starting step of II.4, from `h0` and the norms `d1` and
  `d2 = ||f1 - f0|| / h0`, with `f1` the derivative at the probe."""
  dtype = span.dtype
  dmax = tf.maximum(d1, d2)
  h1 = tf.where(dmax <= 1e-15, tf.maximum(tf.constant(1e-6, dtype), h0 * 1e-3),
                tf.pow(0.01 / tf.maximum(dmax, 1e-15), 1. / (order + 1.)))
  h = tf.minimum(100. * h0, h1)
  h = tf.minimum(h, span)
  # A non-finite estimate (dynamics returning NaN) is caught by the loop.
  return tf.where(is_finite(h) & (h > 0), h, span)
