"""The one explicit Runge-Kutta stepping loop, driven by a `ButcherTableau`.

Everything here works on a *flat list* of Tensors `y` and on a time axis that
increases (callers flip the sign of time to integrate backwards), inside a
single `tf.while_loop` with a static iteration bound, so that it compiles with
XLA (`jit_compile=True`).

Solution times are hit exactly by shortening the step that would cross them,
so no interpolation error enters the outputs.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfp_ffjord._lowering import is_finite
from tfp_ffjord._lowering import magnitude
from tfp_ffjord._lowering import row_sums
from tfp_ffjord._lowering import sqrt
from tfp_ffjord._lowering import zeros_or_nan
from tfp_ffjord.ode import base
from tfp_ffjord.ode import tableaus

Status = base.Status


@dataclasses.dataclass(frozen=True)
class StepControl:
  """Step-size settings of one integration (Python scalars; `step_size` may
  be a scalar Tensor).

  For fixed-step methods only `step_size`/`num_steps` matter. For adaptive
  ones the accepted step is rescaled by
  `safety * e_n ** (-pi_alpha / k) * e_{n-1} ** (pi_beta / k)`, clipped to
  `[min_step_factor, max_step_factor]`, where `e_n` is the scaled RMS error
  norm of step `n` and `k = embedded_order + 1`.
  """
  adaptive: bool
  rtol: float = 1e-3
  atol: float = 1e-6
  first_step_size: Optional[float] = None
  safety_factor: float = 0.9
  min_step_factor: float = 0.2
  max_step_factor: float = 10.0
  pi_alpha: float = 0.7
  pi_beta: float = 0.4
  unroll_stages: bool = False
  step_size: Optional[float] = None
  num_steps: Optional[int] = None


def stage_coefficients(tableau: tableaus.ButcherTableau, dtype):
  """`(a, b, c)` of `tableau` as Tensors: `a` is `[S, S]`, `b` and `c` `[S]`."""
  a, b, c = tableau.as_numpy()
  return (tf.constant(a, dtype), tf.constant(b, dtype), tf.constant(c, dtype))


def combine(y, h, stages, weights):
  """`y + h * sum_s weights[s] * stages[s]`, leaf by leaf.

  `stages` holds one `[S, *leaf.shape]` Tensor per leaf; `weights` is `[S]`.
  """
  # A broadcast multiply and a sum (one fused loop under XLA) rather than a
  # matrix product: the stage axis is short and the leaves are small.
  out = []
  shaped = {}   # leaves of one dtype and rank share their weights and h
  for y_i, k_i in zip(y, stages):
    key = (y_i.dtype, y_i.shape.rank)
    if key not in shaped:
      shaped[key] = (tf.reshape(tf.cast(weights, y_i.dtype),
                                [-1] + [1] * y_i.shape.rank),
                     tf.cast(h, y_i.dtype))
    w, h_i = shaped[key]
    out.append(y_i + h_i * tf.reduce_sum(w * k_i, axis=0))
  return out


def put_stage(stages, s, values):
  """Writes `values` into row `s` of each `[S, ...]` Tensor of `stages`.

  The row must hold zeros. A one-hot add compiles to one fused elementwise
  loop under XLA, where a scatter would not.
  """
  out = []
  rows = {}   # one one-hot row per dtype and rank
  for st, v in zip(stages, values):
    key = (st.dtype, v.shape.rank)
    if key not in rows:
      depth = st.shape[0]
      one_hot = tf.cast(tf.one_hot(
          s, depth if depth is not None else tf.shape(st)[0],
          dtype=st.dtype.real_dtype), st.dtype)
      rows[key] = tf.reshape(one_hot, [-1] + [1] * v.shape.rank)
    out.append(st + rows[key] * tf.expand_dims(v, 0))
  return out


def rk_stages(fn, tableau: tableaus.ButcherTableau, t, y, h, k1=None,
              unroll=False, num_stages=None):
  """The stage derivatives of one explicit Runge-Kutta step.

  By default the stages are computed in a `tf.while_loop`, so `fn` appears
  once in the graph whatever the number of stages: tracing and XLA
  compilation cost one evaluation of `fn`, not `S` of them. `unroll=True`
  builds every stage in the graph instead: no per-stage loop overhead, but
  tracing and compiling take about twice as long.

  Args:
    fn: `fn(t, y) -> dy` on flat lists.
    tableau: the method.
    t: scalar time.
    y: flat list of Tensors.
    h: scalar step size.
    k1: `fn(t, y)` if already computed; `None` computes it (in the loop).
    unroll: build the stages without a loop.
    num_stages: compute only the first stages (default: all `S`); the
      others are left zero.

  Returns:
    One `[S, *leaf.shape]` Tensor per leaf: stage `s` is
    `fn(t + c[s] h, y + h sum_j a[s, j] stage[j])`. The new state is
    `combine(y, h, stages, b)`; for FSAL methods the last stage is
    `fn(t + h, y_new)`.
  """
  total = tableau.num_stages
  num_stages = total if num_stages is None else num_stages
  first = 0 if k1 is None else 1
  if unroll:
    ks = [] if k1 is None else [list(k1)]
    rows = ((),) + tuple(tableau.a)
    nodes = (0.,) + tuple(tableau.c)
    for s in range(first, num_stages):
      y_s = y
      if s:
        row = (list(rows[s]) + [0.] * s)[:s]
        y_s = combine(y, h, [tf.stack([k[i] for k in ks])
                             for i in range(len(y))], tf.constant(row, t.dtype))
      ks.append(fn(t + tf.constant(nodes[s], t.dtype) * h, y_s))
    zeros = [tf.zeros_like(y_i) for y_i in y]
    ks += [zeros] * (total - num_stages)
    return [tf.stack([k[i] for k in ks]) for i in range(len(y))]
  if k1 is None:
    stages = [tf.stack([tf.zeros_like(y_i)] * total) for y_i in y]
  else:
    stages = [tf.stack([k] + [tf.zeros_like(k)] * (total - 1)) for k in k1]
  if num_stages == first:
    return stages
  a, _, c = stage_coefficients(tableau, t.dtype)

  def body(s, stages):
    y_s = combine(y, h, stages, a[s])
    k = fn(t + c[s] * h, y_s)
    return s + 1, put_stage(stages, s, k)

  _, stages = tf.while_loop(lambda s, _: s < num_stages, body,
                            (tf.constant(first), stages),
                            maximum_iterations=num_stages - first)
  return stages


def rk_stages_restarting(fn, tableau: tableaus.ButcherTableau, t, y, k1,
                         restart, h, step_for, probe=None):
  """The stages of one step that may start (or restart) the integration.

  One `tf.while_loop`, like `rk_stages`, so `fn` is traced once per step,
  the start of a solve or segment included. When `restart` is true the loop
  first evaluates `k1 = fn(t, y)` and, with `probe`, the step-size probe of
  `initial_step_size`, `fn(t + h0, y + h0 k1)`, then the step's other
  stages with the step size that probe gave. Writing the start as separate
  calls of `fn` (before the loop or in a `tf.cond`) would trace and compile
  the dynamics two more times.

  Args:
    fn: `fn(t, y) -> dy` on flat lists.
    tableau: the method.
    t: scalar time.
    y: flat list of Tensors.
    k1: `fn(t, y)` carried from the last step (FSAL methods); not used on
      a restart or by other methods.
    restart: scalar bool Tensor.
    h: scalar, the proposed step size (not used on a restart with `probe`).
    step_for: `step_for(h) -> (h_step, clipped)`, the step taken for the
      proposal `h` (shortened to reach a solution time).
    probe: `None` or `probe(k1, f1) -> (h0, h)`, `probe_step_sizes`: the
      probe distance, and the starting step given the derivative `f1` at
      the probe (`f1 = k1` while it is not known yet).

  Returns:
    `(stages, h, h_step, clipped, num_evaluations)`, `stages` as from
    `rk_stages`.
  """
  total = tableau.num_stages
  dtype = t.dtype
  a, _, c = tableau.as_numpy()
  # Rows of the coefficients by loop index + 2: index -2 evaluates k1 at
  # (t, y), index -1 the probe at (t + h0, y + h0 k1), 0.. the stages.
  probe_row = np.eye(1, total)
  a_ext = tf.constant(np.concatenate([np.zeros([1, total]), probe_row, a]),
                      dtype)
  c_ext = tf.constant(np.concatenate([[0., 1.], c]), dtype)
  resume = 1 if tableau.fsal else 0   # the first stage a continuing step needs
  restart_at = -2 if (tableau.fsal or probe is not None) else 0
  first = tf.where(restart, restart_at, resume)
  after_k1 = -1 if probe is not None else 1
  zeros = [tf.zeros_like(y_i) for y_i in y]
  row0 = ([tf.where(restart, z, k) for z, k in zip(zeros, k1)]
          if tableau.fsal else zeros)
  stages = [tf.stack([r] + [z] * (total - 1)) for r, z in zip(row0, zeros)]
  h_step, clipped = step_for(h)
  placeholder = tf.ones([], dtype)

  def body(s, stages, h0, h, h_step, clipped, n):
    at_probe = tf.equal(s, -1)
    h_use = tf.where(at_probe, h0, h_step)
    y_s = combine(y, h_use, stages, tf.gather(a_ext, s + 2))
    k = fn(t + tf.gather(c_ext, s + 2) * h_use, y_s)
    # Index -1 (the probe) gives an all-zero one-hot: no stage is written.
    stages = put_stage(stages, tf.where(tf.equal(s, -2), 0, s), k)
    if probe is not None:
      # A constant output of the dynamics (zeros for a leaf that does not
      # change) must not enter the `tf.cond` as it is: an XLA bridge pass
      # would copy it into the branches under a name numbered in a
      # per-process order, and the compilation cache's key would change
      # between processes. A select on the loop index hides it (an Identity
      # is pruned first).
      graph = not tf.executing_eagerly()
      f1 = [tf.where(at_probe, k_i, st[0])
            if graph and tf.get_static_value(k_i) is not None else k_i
            for k_i, st in zip(k, stages)]

      def starting():
        # Index -2 sets the probe distance, index -1 the step (the same
        # distance again: `k1` and `y` have not changed).
        h0_new, h_new = probe([st[0] for st in stages], f1)
        h_step_new, clipped_new = step_for(h_new)
        return (tf.where(at_probe, h0, h0_new), tf.where(at_probe, h_new, h),
                tf.where(at_probe, h_step_new, h_step),
                tf.where(at_probe, clipped_new, clipped))

      h0, h, h_step, clipped = tf.cond(
          s < 0, starting, lambda: (h0, h, h_step, clipped))
    nxt = tf.where(tf.equal(s, -2), after_k1,
                   tf.where(at_probe, 1, s + 1))
    return nxt, stages, h0, h, h_step, clipped, n + 1

  _, stages, _, h, h_step, clipped, n = tf.while_loop(
      lambda s, *_: s < total, body,
      (first, stages, placeholder, h, h_step, clipped, tf.constant(0)),
      maximum_iterations=total + 2)
  return stages, h, h_step, clipped, n


def all_finite(tensors):
  """Whether every element of every Tensor in `tensors` is finite (a sum of
  `x * 0`: one reduction for all of them)."""
  zeros = zeros_or_nan(tensors)
  if not zeros:
    return tf.constant(True)
  return tf.equal(row_sums([zeros], zeros[0].dtype)[0], 0.)


def error_squares(y, y_new, err, rtol, atol, mask):
  """The squared scaled errors (Hairer et al.) of the leaves selected by
  `mask`, and their number: the step's error norm is the root of their
  mean (`root_mean`; nothing selected: 0, every step is accepted).

  Complex components are measured by their magnitude.
  """
  squares = [tf.square(magnitude(e_i) / (atol + rtol * tf.maximum(
      magnitude(y_i), magnitude(n_i))))
             for y_i, n_i, e_i, use in zip(y, y_new, err, mask) if use]
  return squares, sum(tf.size(x) for x in squares)


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


def probe_step_sizes(y0, f0, f1, order, rtol, atol, mask, span):
  """`(h0, h)`: the probe distance and, given `f1 = fn(t0 + h0, y0 + h0
  f0)`, the starting step of II.4 (with `f1 = f0`, `h` is meaningless)."""
  d0, d1, e = tf.unstack(
      tf.cast(start_norms(y0, f0, f1, rtol, atol, mask), span.dtype))
  h0 = first_guess(d0, d1, span)
  return h0, probed_step(h0, d1, e / h0, order, span)


def initial_step_size(fn, t0, y0, f0, order, rtol, atol, mask, span,
                      y_scale=None):
  """Hairer, Norsett & Wanner (1993), II.4: a starting step size (1 NFE).

  `y_scale` (default `y0`) is what the norms measure the state by.
  """
  y_scale = y0 if y_scale is None else y_scale
  h0, _ = probe_step_sizes(y_scale, f0, f0, order, rtol, atol, mask, span)
  f1 = fn(t0 + h0, [y + tf.cast(h0, y.dtype) * f for y, f in zip(y0, f0)])
  return probe_step_sizes(y_scale, f0, f1, order, rtol, atol, mask, span)[1]


@dataclasses.dataclass
class LoopResult:
  outputs: List[tf.Tensor]          # each [T, *leaf.shape]
  t: tf.Tensor                      # time reached
  num_fn_evals: tf.Tensor
  num_accepted: tf.Tensor
  num_rejected: tf.Tensor
  status: tf.Tensor
  steps: Optional[dict] = None      # recorded accepted steps, if asked
  end_steps: Optional[tf.Tensor] = None   # [T] step proposed at each time
  # [T, 3] int32 per segment: evaluations, accepted and rejected steps.
  segment_counts: Optional[tf.Tensor] = None


def integrate(fn: Callable,
              tableau: tableaus.ButcherTableau,
              control: StepControl,
              t0: tf.Tensor,
              y0: Sequence[tf.Tensor],
              ts: tf.Tensor,
              max_num_steps: Optional[int],
              error_mask: Sequence[bool],
              record_steps: bool = False,
              first_step: Optional[tf.Tensor] = None,
              record_capacity: int = 1000,
              segmented: bool = False,
              end_steps: bool = False,
              restart_fn: Optional[Callable] = None,
              count_segments: bool = False,
              segment_relative: Optional[Sequence[bool]] = None
              ) -> LoopResult:
  """Integrates `dy/dt = fn(t, y)` from `t0` through the increasing times `ts`.

  The loop body holds no `tf.cond` (except, with `segmented`, the restart
  of a segment): whether a step is accepted, and which solution times it
  reaches, only select values. That keeps the loop vectorisable by
  `tf.vectorized_map` / pfor (batch Jacobians through the adjoint, whose
  step sizes differ per Jacobian row).

  Args:
    fn: `fn(t, y) -> dy` on flat lists of Tensors.
    tableau: the Runge-Kutta method.
    control: step-size settings.
    t0: scalar start time.
    y0: flat list of Tensors.
    ts: `[T]` non-decreasing times, each `>= t0`.
    max_num_steps: bound on the number of step attempts, or `None` for no
      bound.
    error_mask: one bool per leaf of `y0`: does it enter the error norm.
    record_steps: also return the accepted steps (start time, size, start
      state, number of outputs written after the step), for the backward
      pass of `gradient='backprop'` and for dense output.
    first_step: optional scalar Tensor, the first step of an adaptive
      method (overrides `control.first_step_size` and the estimate); with
      `segmented`, also a `[T]` Tensor: the first step of each segment.
    record_capacity: with `record_steps` and no `max_num_steps`, the steps
      a record holds under XLA (elsewhere it grows without bound).
    end_steps: also return, per time in `ts`, the step size the controller
      proposed after the step that reached it (`LoopResult.end_steps`; 0
      for times at `t0`): where a solve backwards from that time (the
      adjoint) can start without probing.
    segmented: each time in `ts` ends a segment with dynamics of its own:
      `fn(t, y, k)` is called with `k`, the index in `ts` of the segment's
      end, and the integration restarts at each time of `ts` (a fresh first
      derivative, step size and error history), as if every segment were a
      separate solve from the previous one's end. One loop, so `fn` is
      traced once for all segments.
    restart_fn: with `segmented`, `restart_fn(k, y) -> y`, applied to the
      state as segment `k` starts (the first one included): the state may
      jump between segments (the adjoint's backward solve resets `y` to the
      forward solution and adds the next cotangent). Every segment then
      runs, a zero-length one as a step of size 0, and a step ends at most
      one segment, so each segment's end is written to the outputs once
      and each restart happens.
    count_segments: with `segmented`, also return the evaluations,
      accepted and rejected steps of each segment
      (`LoopResult.segment_counts`; a segment the loop never finished
      counts what was spent on it, those after it zero).
    segment_relative: with `segmented`, one bool per leaf of `y0`: the
      error norm and the step-size probe measure that leaf from its value
      at the start of the segment, as a separate solve that started it at
      zero would (a log-det that carries over from segment to segment is
      then controlled as each segment's own). Default: none.

  Returns:
    A `LoopResult`.
  """
  if restart_fn is not None and not segmented:
    raise ValueError('`restart_fn` needs `segmented=True`.')
  relative = (list(segment_relative) if segmented and segment_relative
              else [False] * len(y0))
  if len(relative) != len(y0):
    raise ValueError('`segment_relative` needs one bool per leaf of `y0`; '
                     f'got {len(relative)} for {len(y0)}.')

  def measured(y, y_start):
    """`y` as the error norm sees it (relative leaves from their start)."""
    return [y_i - s_i if rel else y_i
            for y_i, s_i, rel in zip(y, y_start, relative)]
  dtype = t0.dtype
  num_outputs = ts.shape[0]
  if num_outputs is None:
    num_outputs = tf.shape(ts)[0]
  out_range = tf.range(tf.shape(ts)[0])
  adaptive = control.adaptive
  stages_per_step = tableau.num_stages - (1 if tableau.fsal else 0)

  needs_k1 = tableau.fsal or adaptive
  # Adaptive steps start with the step-size probe of `initial_step_size`
  # unless a first step is given.
  probe = (adaptive and first_step is None
           and control.first_step_size is None)

  def start(t, y, seg, span):
    """`(k1, h, nfe)` at the start of a solve (or of a segment)."""
    call = (lambda s, x: fn(s, x, seg)) if segmented else fn
    if needs_k1:
      k1 = call(t, y)
      nfe = tf.constant(1, tf.int32)
    else:  # Recomputed at the start of every step.
      k1 = [tf.zeros_like(y_i) for y_i in y]
      nfe = tf.constant(0, tf.int32)
    if probe:
      # Relative leaves are 0 at the start of a segment.
      y_scale = [tf.zeros_like(y_i) if rel else y_i
                 for y_i, rel in zip(y, relative)]
      h = initial_step_size(call, t, y, k1, tableau.order, control.rtol,
                            control.atol, error_mask,
                            tf.maximum(span, tf.constant(1e-12, dtype)),
                            y_scale=y_scale)
      nfe += 1
      return k1, tf.where(h > 0, h, tf.ones([], dtype)), nfe
    return k1, start_step(span, seg), nfe

  def start_step(span, seg=None):
    """The first step size of a solve or segment, when no probe sets it."""
    if adaptive:
      if first_step is not None:
        h = tf.cast(first_step, dtype)
        if h.shape.rank == 1:   # one per segment
          h = tf.gather(h, seg)
      else:
        h = tf.constant(control.first_step_size, dtype)
    elif control.num_steps is not None:
      h = span / tf.cast(control.num_steps, dtype)
    else:   # a Python float, or a Tensor (the adjoint of a `num_steps` grid)
      h = tf.cast(control.step_size, dtype)
    # A zero-length span would give h == 0; any positive step ends at once.
    return tf.where(h > 0, h, tf.ones([], dtype))

  # Solution times equal to t0 are written before the first step (with
  # `restart_fn`, by zero-length steps of the loop, which restart there).
  hit0 = ts <= t0
  if restart_fn is not None:
    hit0 = tf.zeros_like(hit0)
  outputs = []
  for y_i in y0:
    buf = tf.zeros(tf.concat([[tf.shape(ts)[0]], tf.shape(y_i)], 0), y_i.dtype)
    mask = tf.reshape(hit0, [-1] + [1] * y_i.shape.rank)
    outputs.append(tf.where(mask, y_i[tf.newaxis], buf))
  out_index = tf.reduce_sum(tf.cast(hit0, tf.int32))
  out_index_initial = out_index
  # Unless the stages are written out, the stage loop starts the solve (and
  # each segment) itself: `fn` is then traced once, not three times.
  fold_start = not control.unroll_stages
  if segmented or fold_start:
    # The loop starts every segment itself (below), the first one included.
    k1 = [tf.zeros_like(y_i) for y_i in y0]
    h = tf.ones([], dtype)
    nfe = tf.constant(0, tf.int32)
    segment = tf.constant(-1)
  else:
    k1, h, nfe = start(t0, list(y0), None, ts[-1] - t0)
    segment = tf.constant(0)

  if record_steps:
    # A bounded loop records into a buffer of its bound. An unbounded one
    # starts with `record_capacity` slots and grows as needed; under XLA it
    # cannot grow (the buffer has a static size), which the loop notices
    # below and reports as MAX_NUM_STEPS_EXCEEDED rather than overwrite.
    growing = max_num_steps is None
    size = record_capacity if growing else max_num_steps

    def new_array(element_dtype, element_shape):
      return tf.TensorArray(element_dtype, size=size, dynamic_size=growing,
                            element_shape=element_shape)
    steps_t = new_array(dtype, [])
    steps_h = new_array(dtype, [])
    steps_out = new_array(tf.int32, [])
    steps_y = [new_array(y_i.dtype, y_i.shape) for y_i in y0]
  else:
    steps_t = steps_h = steps_out = tf.zeros([], dtype)
    steps_y = [tf.zeros([], y_i.dtype) for y_i in y0]
  b_coef = tf.constant(tableau.b, dtype)
  b_err_coef = (tf.constant(tableau.b_error, dtype) if adaptive else None)

  k_order = float((tableau.embedded_order or tableau.order) + 1)
  eps = tf.constant(tf.experimental.numpy.finfo(dtype.as_numpy_dtype).eps,
                    dtype)
  succeeded = tf.constant(Status.SUCCEEDED, tf.int32)

  def cond(step, t, h, y, k1, prev_err, segment, outputs, out_index, out_h,
           nfe, n_acc, n_rej, status, steps_t, steps_h, steps_out, steps_y,
           counts, y_start):
    del step, t, h, y, k1, prev_err, segment, outputs, nfe, n_acc, n_rej
    del out_h, steps_t, steps_h, steps_out, steps_y, counts, y_start
    # tf.equal, never `==`: a Tensor's `==` is an identity test in TF1 graphs.
    return (out_index < num_outputs) & tf.equal(status, succeeded)

  def body(step, t, h, y, k1, prev_err, segment, outputs, out_index, out_h,
           nfe, n_acc, n_rej, status, steps_t, steps_h, steps_out, steps_y,
           counts, y_start):
    target = tf.gather(ts, out_index)
    remaining = target - t

    def step_for(h):
      # Snap to the solution time when the remainder is within rounding of a
      # step, instead of leaving a sliver step of ~1e-16.
      clipped = h >= remaining - 64. * eps * tf.maximum(
          magnitude(target), tf.ones([], dtype))
      return tf.where(clipped, remaining, h), clipped

    call = fn
    if segmented:
      call = lambda s, x: fn(s, x, out_index)  # pylint: disable=g-long-lambda
    if fold_start:
      # A new solve or segment: its own first derivative, step size and
      # error history, computed by the stage loop.
      if segmented:
        seg_index, span = out_index, remaining
      else:   # one segment, from t0 to the last time
        seg_index, span = tf.zeros([], tf.int32), ts[-1] - t
      restart = tf.not_equal(segment, seg_index)
      segment = seg_index
      if restart_fn is not None:
        y = [tf.where(restart, jumped, y_i)
             for jumped, y_i in zip(restart_fn(seg_index, y), y)]
      prev_err = tf.where(restart, tf.ones([], dtype), prev_err)
      y_start = [tf.where(restart, y_i, s_i) if rel else s_i
                 for y_i, s_i, rel in zip(y, y_start, relative)]
      if probe:
        span = tf.maximum(span, tf.constant(1e-12, dtype))
        y_probe = measured(y, y_start)
        probe_fn = lambda k1, f1: probe_step_sizes(  # pylint: disable=g-long-lambda
            y_probe, k1, f1, tableau.order, control.rtol, control.atol,
            error_mask, span)
      else:
        h = tf.where(restart, start_step(span, seg_index), h)
        probe_fn = None
      stages, h, h_step, clipped, evaluations = rk_stages_restarting(
          call, tableau, t, y, k1, restart, h, step_for, probe_fn)
      k1 = [st[0] for st in stages]
      nfe = nfe + evaluations
    else:
      if segmented:
        # A new segment: its own first derivative, step size and history.
        def restart():
          y_new = list(y) if restart_fn is None else restart_fn(out_index, y)
          k1_new, h_new, nfe_new = start(t, y_new, out_index, target - t)
          start_new = [y_i if rel else s_i
                       for y_i, s_i, rel in zip(y_new, y_start, relative)]
          return (y_new, k1_new, h_new, tf.ones([], dtype), nfe + nfe_new,
                  start_new)

        y, k1, h, prev_err, nfe, y_start = tf.cond(
            tf.not_equal(segment, out_index), restart,
            lambda: (list(y), list(k1), h, prev_err, nfe, list(y_start)))
        segment = out_index
      h_step, clipped = step_for(h)
      if not tableau.fsal:
        k1 = call(t, y)
      stages = rk_stages(call, tableau, t, y, h_step, k1,
                         unroll=control.unroll_stages)
      nfe = nfe + stages_per_step
    y_new = combine(y, h_step, stages, b_coef)
    # The error norm and both finiteness checks are one reduction.
    rows = [zeros_or_nan(k1), zeros_or_nan(y_new)]
    if adaptive:
      err = combine([tf.zeros_like(x) for x in y], h_step, stages, b_err_coef)
      squares, count = error_squares(
          measured(y, y_start), measured(y_new, y_start), err, control.rtol,
          control.atol, error_mask)
      rows.append(squares)
    sums = row_sums(rows, dtype)
    k1_finite = tf.equal(sums[0], 0.)
    new_finite = tf.equal(sums[1], 0.)

    if adaptive:
      e = root_mean(sums[2], count)
      ok = new_finite & is_finite(e)
      accept = ok & (e <= 1.)
      e_safe = tf.where(ok, tf.maximum(e, tf.constant(1e-10, dtype)),
                        tf.constant(1e10, dtype))
      factor_accept = (control.safety_factor
                       * tf.pow(e_safe, -control.pi_alpha / k_order)
                       * tf.pow(prev_err, control.pi_beta / k_order))
      factor_reject = tf.minimum(
          control.safety_factor * tf.pow(e_safe, -1. / k_order), 1.)
      factor = tf.where(accept, factor_accept, factor_reject)
      factor = tf.clip_by_value(factor, control.min_step_factor,
                                control.max_step_factor)
      h_next = h_step * factor
      # A step shortened to hit a solution time says little about the size
      # of the next one: keep the longer proposal when the error allows.
      h_next = tf.where(clipped & accept & (factor >= 1.),
                        tf.maximum(h, h_next), h_next)
      prev_err = tf.where(accept, e_safe, prev_err)
      underflow = (~accept) & (h_next <= 8. * eps * tf.maximum(
          magnitude(t), tf.ones([], dtype)))
      non_finite = ~k1_finite
    else:
      accept = new_finite
      h_next = h
      underflow = tf.constant(False)
      non_finite = ~(k1_finite & new_finite)

    status = tf.where(
        non_finite, Status.NON_FINITE_STATE,
        tf.where(underflow, Status.STEP_SIZE_UNDERFLOW, Status.SUCCEEDED))
    accept = accept & k1_finite

    t_new = tf.where(accept, tf.where(clipped, target, t + h_step), t)
    y_next = [tf.where(accept, a, b) for a, b in zip(y_new, y)]
    if tableau.fsal:
      k1 = [tf.where(accept, a[-1], b) for a, b in zip(stages, k1)]

    if restart_fn is None:
      hit = (accept & clipped) & (ts <= t_new) & (out_range >= out_index)
    else:   # one segment at a time
      hit = (accept & clipped) & tf.equal(out_range, out_index)
    new_outputs = []
    for buf, y_i in zip(outputs, y_next):
      mask = tf.reshape(hit, [-1] + [1] * y_i.shape.rank)
      new_outputs.append(tf.where(mask, y_i[tf.newaxis], buf))
    new_out_index = out_index + tf.reduce_sum(tf.cast(hit, tf.int32))
    if end_steps:
      out_h = tf.where(hit, h_next, out_h)

    if record_steps:
      # Written at the index of the next accepted step: a rejected attempt is
      # overwritten by the following one.
      steps_t = steps_t.write(n_acc, t)
      steps_h = steps_h.write(n_acc, h_step)
      steps_out = steps_out.write(n_acc, new_out_index)
      steps_y = [ta.write(n_acc, y_i) for ta, y_i in zip(steps_y, y)]
      if growing:
        full = steps_t.size() <= n_acc
        status = tf.where(full & tf.equal(status, succeeded),
                          Status.MAX_NUM_STEPS_EXCEEDED, status)

    n_acc = n_acc + tf.cast(accept, tf.int32)
    n_rej = n_rej + tf.cast(~accept, tf.int32)
    if count_segments:
      # The running totals as each output is written (differenced below).
      counts = tf.where(hit[:, tf.newaxis], tf.stack([nfe, n_acc, n_rej]),
                        counts)
    step = step + 1
    if max_num_steps is not None:
      status = tf.where(
          tf.equal(status, succeeded) & (step >= max_num_steps)
          & (new_out_index < num_outputs),
          Status.MAX_NUM_STEPS_EXCEEDED, status)
    return (step, t_new, h_next, y_next, k1, prev_err, segment, new_outputs,
            new_out_index, out_h, nfe, n_acc, n_rej, status, steps_t, steps_h,
            steps_out, steps_y, counts, y_start)

  out_h = (tf.zeros(tf.shape(ts), dtype) if end_steps
           else tf.zeros([], dtype))
  count_segments = count_segments and segmented
  counts = (tf.fill(tf.stack([tf.shape(ts)[0], 3]), -1) if count_segments
            else tf.zeros([], tf.int32))
  # Relative leaves: their value at the start of the current segment.
  y_start = [tf.identity(y_i) if rel else tf.zeros([], y_i.dtype)
             for y_i, rel in zip(y0, relative)]
  loop_vars = (tf.constant(0), t0, h, list(y0), list(k1),
               tf.ones([], dtype), segment, outputs, out_index, out_h, nfe,
               tf.constant(0), tf.constant(0), succeeded,
               steps_t, steps_h, steps_out, steps_y, counts, y_start)
  (_, t, _, _, _, _, _, outputs, _, out_h, nfe, n_acc, n_rej, status, steps_t,
   steps_h, steps_out, steps_y, counts, _) = tf.while_loop(
       cond, body, loop_vars, maximum_iterations=max_num_steps)
  segment_counts = None
  if count_segments:
    # Outputs never written (a failed solve) take the final totals: the
    # failing segment gets what was spent on it, the later ones nothing.
    totals = tf.stack([nfe, n_acc, n_rej])
    running = tf.where(counts < 0, totals[tf.newaxis], counts)
    segment_counts = running - tf.concat(
        [tf.zeros([1, 3], tf.int32), running[:-1]], 0)

  steps = None
  if record_steps:
    steps = dict(
        t=steps_t.stack(), h=steps_h.stack(), out=steps_out.stack(),
        y=[ta.stack() for ta in steps_y], count=n_acc,
        out_initial=out_index_initial)
  return LoopResult(outputs=outputs, t=t, num_fn_evals=nfe,
                    num_accepted=n_acc, num_rejected=n_rej, status=status,
                    steps=steps, end_steps=out_h if end_steps else None,
                    segment_counts=segment_counts)
