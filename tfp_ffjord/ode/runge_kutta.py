"""The one explicit Runge-Kutta stepping loop: `integrate`.

It works on a *flat list* of Tensors `y` and on a time axis that increases
(callers flip the sign of time to integrate backwards), inside a single
`tf.while_loop` with a static iteration bound, so that it compiles with XLA
(`jit_compile=True`). The method is a `ButcherTableau` (its stages:
`stages.py`); the step sizes are a controller's (`controllers.py`); what to
record and how segments restart are `LoopOptions`.

Solution times are hit exactly by shortening the step that would cross them,
so no interpolation error enters the outputs.
"""

import dataclasses
from typing import Callable, List, NamedTuple, Optional, Sequence

import tensorflow as tf

from tfp_ffjord._lowering import magnitude
from tfp_ffjord._lowering import row_sums
from tfp_ffjord._lowering import zeros_or_nan
from tfp_ffjord.ode import base
from tfp_ffjord.ode import controllers as controllers_lib
from tfp_ffjord.ode import stages as stages_lib
from tfp_ffjord.ode import tableaus

__all__ = ['LoopOptions', 'LoopResult', 'integrate']

Status = base.Status


class LoopOptions(NamedTuple):
  """What a loop records and how its segments restart.

  Attributes:
    error_mask: one bool per leaf of `y0`: does it enter the error norm.
    max_num_steps: bound on the number of step attempts, or `None` for no
      bound.
    unroll_stages: build every stage in the graph instead of a stage loop.
    record_steps: also return the accepted steps (start time, size, start
      state, number of outputs written after the step), for the backward
      pass of `gradient='backprop'` and for dense output.
    record_capacity: with `record_steps` and no `max_num_steps`, the steps
      a record holds under XLA (elsewhere it grows without bound).
    first_step: optional scalar Tensor, the first step of an adaptive
      method (overrides the controller's); with `segmented`, also a `[T]`
      Tensor: the first step of each segment.
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
  """
  error_mask: Sequence[bool]
  max_num_steps: Optional[int] = None
  unroll_stages: bool = False
  record_steps: bool = False
  record_capacity: int = 1000
  first_step: Optional[tf.Tensor] = None
  end_steps: bool = False
  segmented: bool = False
  restart_fn: Optional[Callable] = None
  count_segments: bool = False
  segment_relative: Optional[Sequence[bool]] = None


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


class Record(NamedTuple):
  """The accepted steps (`TensorArray`s; scalar zeros when not recorded)."""
  t: object
  h: object
  out: object
  y: list


class LoopState(NamedTuple):
  """The variables of the stepping loop.

  Attributes:
    step: attempts so far.
    t, h: the time reached and the step proposed from it.
    y, k1: the state at `t` and its derivative (FSAL methods and adaptive
      ones carry it from step to step).
    prev_err: the last accepted step's error norm (the PI controller's
      memory).
    segment: the segment under way (-1 before the first).
    y_start: relative leaves' values at the start of the segment.
    outputs, out_index: the `[T, ...]` outputs and the next one to write.
    out_h: with `end_steps`, the step proposed on reaching each time.
    nfe, n_acc, n_rej: evaluations, accepted and rejected steps.
    status: a `Status` code.
    record: the accepted steps, with `record_steps`.
    counts: with `count_segments`, the running `[nfe, n_acc, n_rej]` as
      each output was written.
  """
  step: tf.Tensor
  t: tf.Tensor
  h: tf.Tensor
  y: list
  k1: list
  prev_err: tf.Tensor
  segment: tf.Tensor
  y_start: list
  outputs: list
  out_index: tf.Tensor
  out_h: tf.Tensor
  nfe: tf.Tensor
  n_acc: tf.Tensor
  n_rej: tf.Tensor
  status: tf.Tensor
  record: Record
  counts: tf.Tensor


class _Stepped(NamedTuple):
  """What the stages of one attempt gave: the state it starts from (after
  any restart), the stages, and the step taken."""
  state: LoopState
  stages: list
  h_step: tf.Tensor
  clipped: tf.Tensor


def integrate(fn: Callable, tableau: tableaus.ButcherTableau, controller,
              t0: tf.Tensor, y0: Sequence[tf.Tensor], ts: tf.Tensor,
              options: LoopOptions) -> LoopResult:
  """Integrates `dy/dt = fn(t, y)` from `t0` through the increasing times `ts`.

  The loop body holds no `tf.cond` (except, with `segmented` and
  `unroll_stages`, the restart of a segment): whether a step is accepted,
  and which solution times it reaches, only select values. That keeps the
  loop vectorisable by `tf.vectorized_map` / pfor (batch Jacobians through
  the adjoint, whose step sizes differ per Jacobian row).

  Args:
    fn: `fn(t, y) -> dy` on flat lists of Tensors (`fn(t, y, k)` with
      `options.segmented`).
    tableau: the Runge-Kutta method.
    controller: a `controllers.ConstantStepSize` or `PIController`.
    t0: scalar start time.
    y0: flat list of Tensors.
    ts: `[T]` non-decreasing times, each `>= t0`.
    options: `LoopOptions`.

  Returns:
    A `LoopResult`.
  """
  loop = _Loop(fn, tableau, controller, t0, ts, options, len(y0))
  (state,) = tf.while_loop(loop.cond, loop.body, (loop.initial(y0),),
                           maximum_iterations=options.max_num_steps)
  return _result(loop, state)


class _Loop:
  """One integration: its settings, and the loop's `cond` and `body`."""

  def __init__(self, fn, tableau, controller, t0, ts, options, num_leaves):
    if options.restart_fn is not None and not options.segmented:
      raise ValueError('`restart_fn` needs `segmented=True`.')
    relative = (list(options.segment_relative)
                if options.segmented and options.segment_relative
                else [False] * num_leaves)
    if len(relative) != num_leaves:
      raise ValueError('`segment_relative` needs one bool per leaf of `y0`; '
                       f'got {len(relative)} for {num_leaves}.')
    self.fn, self.tableau, self.controller = fn, tableau, controller
    self.t0, self.ts, self.options, self.relative = t0, ts, options, relative
    self.dtype = dtype = t0.dtype
    num_outputs = ts.shape[0]
    self.num_outputs = (tf.shape(ts)[0] if num_outputs is None
                        else num_outputs)
    self.out_range = tf.range(tf.shape(ts)[0])
    self.stages_per_step = tableau.num_stages - (1 if tableau.fsal else 0)
    self.needs_k1 = tableau.fsal or controller.adaptive
    # Adaptive steps start with the step-size probe unless a first step is
    # given.
    self.probe = options.first_step is None and controller.needs_probe
    # Unless the stages are written out, the stage loop starts the solve (and
    # each segment) itself: `fn` is then traced once, not three times.
    self.fold_start = not options.unroll_stages
    self.growing = options.max_num_steps is None
    self.b_coef = tf.constant(tableau.b, dtype)
    self.b_err_coef = (tf.constant(tableau.b_error, dtype)
                       if controller.adaptive else None)
    self.k_order = float((tableau.embedded_order or tableau.order) + 1)
    self.eps = tf.constant(
        tf.experimental.numpy.finfo(dtype.as_numpy_dtype).eps, dtype)
    self.count_segments = options.count_segments and options.segmented
    self.out_index_initial = None

  def measured(self, y, y_start):
    """`y` as the error norm sees it (relative leaves from their start)."""
    return [y_i - s_i if rel else y_i
            for y_i, s_i, rel in zip(y, y_start, self.relative)]

  def call_for(self, seg):
    """`fn` as `call(t, y)` for segment `seg`."""
    if self.options.segmented:
      return lambda s, x: self.fn(s, x, seg)
    return self.fn

  def start(self, t, y, seg, span):
    """`(k1, h, nfe)` at the start of a solve or segment (stages written
    out: the loop does not start segments itself)."""
    call = self.call_for(seg)
    if self.needs_k1:
      k1 = call(t, y)
      nfe = tf.constant(1, tf.int32)
    else:  # Recomputed at the start of every step.
      k1 = [tf.zeros_like(y_i) for y_i in y]
      nfe = tf.constant(0, tf.int32)
    if self.probe:
      # Relative leaves are 0 at the start of a segment.
      y_scale = [tf.zeros_like(y_i) if rel else y_i
                 for y_i, rel in zip(y, self.relative)]
      h = self.controller.initial_step_size(
          call, t, y, k1, self.tableau.order, self.options.error_mask,
          tf.maximum(span, tf.constant(1e-12, self.dtype)), y_scale=y_scale)
      nfe += 1
      return k1, controllers_lib.positive_step(h, self.dtype), nfe
    return k1, self.start_step(span, seg), nfe

  def start_step(self, span, seg=None):
    """The first step size of a solve or segment, when no probe sets it."""
    first_step = self.options.first_step
    if self.controller.adaptive and first_step is not None:
      h = tf.cast(first_step, self.dtype)
      if h.shape.rank == 1:   # one per segment
        h = tf.gather(h, seg)
      return controllers_lib.positive_step(h, self.dtype)
    return self.controller.first_step(span, self.dtype)

  def initial(self, y0) -> LoopState:
    """The loop's state before the first step."""
    dtype, ts, options = self.dtype, self.ts, self.options
    # Solution times equal to t0 are written before the first step (with
    # `restart_fn`, by zero-length steps of the loop, which restart there).
    hit0 = ts <= self.t0
    if options.restart_fn is not None:
      hit0 = tf.zeros_like(hit0)
    outputs = []
    for y_i in y0:
      buf = tf.zeros(tf.concat([[tf.shape(ts)[0]], tf.shape(y_i)], 0),
                     y_i.dtype)
      mask = tf.reshape(hit0, [-1] + [1] * y_i.shape.rank)
      outputs.append(tf.where(mask, y_i[tf.newaxis], buf))
    out_index = tf.reduce_sum(tf.cast(hit0, tf.int32))
    self.out_index_initial = out_index
    if options.segmented or self.fold_start:
      # The loop starts every segment itself, the first one included.
      k1 = [tf.zeros_like(y_i) for y_i in y0]
      h = tf.ones([], dtype)
      nfe = tf.constant(0, tf.int32)
      segment = tf.constant(-1)
    else:
      k1, h, nfe = self.start(self.t0, list(y0), None, ts[-1] - self.t0)
      segment = tf.constant(0)
    out_h = (tf.zeros(tf.shape(ts), dtype) if options.end_steps
             else tf.zeros([], dtype))
    counts = (tf.fill(tf.stack([tf.shape(ts)[0], 3]), -1)
              if self.count_segments else tf.zeros([], tf.int32))
    # Relative leaves: their value at the start of the current segment.
    y_start = [tf.identity(y_i) if rel else tf.zeros([], y_i.dtype)
               for y_i, rel in zip(y0, self.relative)]
    return LoopState(
        step=tf.constant(0), t=self.t0, h=h, y=list(y0), k1=list(k1),
        prev_err=tf.ones([], dtype), segment=segment, y_start=y_start,
        outputs=outputs, out_index=out_index, out_h=out_h, nfe=nfe,
        n_acc=tf.constant(0), n_rej=tf.constant(0),
        status=tf.constant(Status.SUCCEEDED, tf.int32),
        record=_empty_record(self, y0), counts=counts)

  def cond(self, state):
    # tf.equal, never `==`: a Tensor's `==` is an identity test in TF1 graphs.
    return (state.out_index < self.num_outputs) & tf.equal(
        state.status, tf.constant(Status.SUCCEEDED, tf.int32))

  def step_for(self, h, target, remaining):
    """The step taken for the proposal `h`, and whether it was shortened:
    snapped to the solution time when the remainder is within rounding of a
    step, instead of leaving a sliver step of ~1e-16."""
    clipped = h >= remaining - 64. * self.eps * tf.maximum(
        magnitude(target), tf.ones([], self.dtype))
    return tf.where(clipped, remaining, h), clipped

  def body(self, state):
    target = tf.gather(self.ts, state.out_index)
    remaining = target - state.t
    if self.fold_start:
      stepped = self.folded_stages(state, target, remaining)
    else:
      stepped = self.unrolled_stages(state, target, remaining)
    return (self.judge(stepped, target),)

  def folded_stages(self, state, target, remaining) -> _Stepped:
    """The stages of one attempt from the stage loop, which also starts a
    new solve or segment (its own first derivative, step size and error
    history)."""
    options, y, h = self.options, state.y, state.h
    if options.segmented:
      seg_index, span = state.out_index, remaining
    else:   # one segment, from t0 to the last time
      seg_index, span = tf.zeros([], tf.int32), self.ts[-1] - state.t
    restart = tf.not_equal(state.segment, seg_index)
    if options.restart_fn is not None:
      y = [tf.where(restart, jumped, y_i)
           for jumped, y_i in zip(options.restart_fn(seg_index, y), y)]
    prev_err = tf.where(restart, tf.ones([], self.dtype), state.prev_err)
    y_start = [tf.where(restart, y_i, s_i) if rel else s_i
               for y_i, s_i, rel in zip(y, state.y_start, self.relative)]
    if self.probe:
      span = tf.maximum(span, tf.constant(1e-12, self.dtype))
      y_probe = self.measured(y, y_start)
      probe_fn = lambda k1, f1: self.controller.probe_step_sizes(  # pylint: disable=g-long-lambda
          y_probe, k1, f1, self.tableau.order, options.error_mask, span)
    else:
      h = tf.where(restart, self.start_step(span, seg_index), h)
      probe_fn = None
    stages, h, h_step, clipped, evaluations = (
        stages_lib.rk_stages_restarting(
            self.call_for(state.out_index), self.tableau,
            (state.t, y, state.k1), restart, h,
            lambda h: self.step_for(h, target, remaining), probe_fn))
    state = state._replace(
        y=y, k1=[st[0] for st in stages], h=h, prev_err=prev_err,
        y_start=y_start, segment=seg_index, nfe=state.nfe + evaluations)
    return _Stepped(state, stages, h_step, clipped)

  def unrolled_stages(self, state, target, remaining) -> _Stepped:
    """The stages of one attempt written out; a new segment starts in a
    `tf.cond` (its own first derivative, step size and history)."""
    y, k1, h = state.y, state.k1, state.h
    prev_err, nfe, y_start = state.prev_err, state.nfe, state.y_start
    segment = state.segment
    out_index = state.out_index
    if self.options.segmented:
      restart_fn = self.options.restart_fn

      def restart():
        y_new = list(y) if restart_fn is None else restart_fn(out_index, y)
        k1_new, h_new, nfe_new = self.start(state.t, y_new, out_index,
                                            target - state.t)
        start_new = [y_i if rel else s_i
                     for y_i, s_i, rel in zip(y_new, y_start, self.relative)]
        return (y_new, k1_new, h_new, tf.ones([], self.dtype),
                nfe + nfe_new, start_new)

      y, k1, h, prev_err, nfe, y_start = tf.cond(
          tf.not_equal(segment, out_index), restart,
          lambda: (list(y), list(k1), h, prev_err, nfe, list(y_start)))
      segment = out_index
    h_step, clipped = self.step_for(h, target, remaining)
    call = self.call_for(out_index)
    if not self.tableau.fsal:
      k1 = call(state.t, y)
    stages = stages_lib.rk_stages(call, self.tableau, state.t, y, h_step, k1,
                                  unroll=self.options.unroll_stages)
    state = state._replace(y=y, k1=k1, h=h, prev_err=prev_err,
                           y_start=y_start, segment=segment,
                           nfe=nfe + self.stages_per_step)
    return _Stepped(state, stages, h_step, clipped)

  def judge(self, stepped: _Stepped, target) -> LoopState:
    """The attempt accepted or rejected, and the next state."""
    state, stages = stepped.state, stepped.stages
    y, k1, h_step = state.y, state.k1, stepped.h_step
    y_new = stages_lib.combine(y, h_step, stages, self.b_coef)
    # The error norm and both finiteness checks are one reduction.
    rows = [zeros_or_nan(k1), zeros_or_nan(y_new)]
    adaptive = self.controller.adaptive
    if adaptive:
      err = stages_lib.combine([tf.zeros_like(x) for x in y], h_step, stages,
                               self.b_err_coef)
      squares, count = self.controller.error_squares(
          self.measured(y, state.y_start), self.measured(y_new, state.y_start),
          err, self.options.error_mask)
      rows.append(squares)
    sums = row_sums(rows, self.dtype)
    attempt = controllers_lib.Attempt(
        t=state.t, h=state.h, h_step=h_step, clipped=stepped.clipped,
        k1_finite=tf.equal(sums[0], 0.), new_finite=tf.equal(sums[1], 0.))
    e = controllers_lib.root_mean(sums[2], count) if adaptive else None
    decision = self.controller.decide(attempt, e, state.prev_err,
                                      self.k_order)
    status = tf.where(
        decision.non_finite, Status.NON_FINITE_STATE,
        tf.where(decision.underflow, Status.STEP_SIZE_UNDERFLOW,
                 Status.SUCCEEDED))
    accept = decision.accept & attempt.k1_finite
    t_new = tf.where(accept, tf.where(stepped.clipped, target,
                                      state.t + h_step), state.t)
    y_next = [tf.where(accept, a, b) for a, b in zip(y_new, y)]
    if self.tableau.fsal:
      k1 = [tf.where(accept, a[-1], b) for a, b in zip(stages, k1)]
    state = state._replace(prev_err=decision.prev_err, status=status)
    return self.written(state, accept, stepped.clipped, t_new, y_next, k1,
                        h_step, decision.h_next)

  def written(self, state, accept, clipped, t_new, y_next, k1, h_step,
              h_next) -> LoopState:
    """The state after an attempt: outputs it reached written, the step
    recorded, the counters advanced."""
    out_index = state.out_index
    if self.options.restart_fn is None:
      hit = (accept & clipped) & (self.ts <= t_new) & (
          self.out_range >= out_index)
    else:   # one segment at a time
      hit = (accept & clipped) & tf.equal(self.out_range, out_index)
    outputs = []
    for buf, y_i in zip(state.outputs, y_next):
      mask = tf.reshape(hit, [-1] + [1] * y_i.shape.rank)
      outputs.append(tf.where(mask, y_i[tf.newaxis], buf))
    new_out_index = out_index + tf.reduce_sum(tf.cast(hit, tf.int32))
    out_h = state.out_h
    if self.options.end_steps:
      out_h = tf.where(hit, h_next, out_h)
    record, status = state.record, state.status
    if self.options.record_steps:
      record, status = _recorded(self, state, h_step, new_out_index)
    n_acc = state.n_acc + tf.cast(accept, tf.int32)
    n_rej = state.n_rej + tf.cast(~accept, tf.int32)
    counts = state.counts
    if self.count_segments:
      # The running totals as each output is written (differenced below).
      counts = tf.where(hit[:, tf.newaxis],
                        tf.stack([state.nfe, n_acc, n_rej]), counts)
    step = state.step + 1
    if self.options.max_num_steps is not None:
      status = tf.where(
          tf.equal(status, Status.SUCCEEDED)
          & (step >= self.options.max_num_steps)
          & (new_out_index < self.num_outputs),
          Status.MAX_NUM_STEPS_EXCEEDED, status)
    return state._replace(
        step=step, t=t_new, h=h_next, y=y_next, k1=k1, outputs=outputs,
        out_index=new_out_index, out_h=out_h, n_acc=n_acc, n_rej=n_rej,
        status=status, record=record, counts=counts)


def _empty_record(loop, y0) -> Record:
  """A record of the accepted steps to come (scalar zeros if none is
  kept). An unbounded loop starts with `record_capacity` slots and grows
  as needed; under XLA it cannot grow (the buffer has a static size),
  which the loop notices and reports as MAX_NUM_STEPS_EXCEEDED rather
  than overwrite."""
  if not loop.options.record_steps:
    return Record(t=tf.zeros([], loop.dtype), h=tf.zeros([], loop.dtype),
                  out=tf.zeros([], loop.dtype),
                  y=[tf.zeros([], y_i.dtype) for y_i in y0])
  size = (loop.options.record_capacity if loop.growing
          else loop.options.max_num_steps)

  def new_array(element_dtype, element_shape):
    return tf.TensorArray(element_dtype, size=size,
                          dynamic_size=loop.growing,
                          element_shape=element_shape)
  return Record(t=new_array(loop.dtype, []), h=new_array(loop.dtype, []),
                out=new_array(tf.int32, []),
                y=[new_array(y_i.dtype, y_i.shape) for y_i in y0])


def _recorded(loop, state, h_step, new_out_index):
  """The record with this attempt written at the index of the next
  accepted step (a rejected attempt is overwritten by the following
  one), and the status (a record that cannot grow is full)."""
  record, n_acc, status = state.record, state.n_acc, state.status
  record = Record(t=record.t.write(n_acc, state.t),
                  h=record.h.write(n_acc, h_step),
                  out=record.out.write(n_acc, new_out_index),
                  y=[ta.write(n_acc, y_i)
                     for ta, y_i in zip(record.y, state.y)])
  if loop.growing:
    full = record.t.size() <= n_acc
    status = tf.where(full & tf.equal(status, Status.SUCCEEDED),
                      Status.MAX_NUM_STEPS_EXCEEDED, status)
  return record, status


def _result(loop, state) -> LoopResult:
  segment_counts = None
  if loop.count_segments:
    # Outputs never written (a failed solve) take the final totals: the
    # failing segment gets what was spent on it, the later ones nothing.
    totals = tf.stack([state.nfe, state.n_acc, state.n_rej])
    running = tf.where(state.counts < 0, totals[tf.newaxis], state.counts)
    segment_counts = running - tf.concat(
        [tf.zeros([1, 3], tf.int32), running[:-1]], 0)
  steps = None
  if loop.options.record_steps:
    record = state.record
    steps = dict(
        t=record.t.stack(), h=record.h.stack(), out=record.out.stack(),
        y=[ta.stack() for ta in record.y], count=state.n_acc,
        out_initial=loop.out_index_initial)
  return LoopResult(
      outputs=state.outputs, t=state.t, num_fn_evals=state.nfe,
      num_accepted=state.n_acc, num_rejected=state.n_rej,
      status=state.status, steps=steps,
      end_steps=state.out_h if loop.options.end_steps else None,
      segment_counts=segment_counts)
