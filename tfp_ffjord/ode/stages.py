"""The stages of one explicit Runge-Kutta step, driven by a `ButcherTableau`.

Everything here works on a *flat list* of Tensors `y`. The stages of a step
are one `[S, *leaf.shape]` Tensor per leaf; by default they are computed in a
`tf.while_loop`, so the dynamics appear once in the graph whatever the
number of stages.
"""

import numpy as np
import tensorflow as tf

from tfp_ffjord._lowering import row_sums
from tfp_ffjord._lowering import zeros_or_nan
from tfp_ffjord.ode import tableaus

__all__ = ['all_finite', 'combine', 'put_stage', 'rk_stages',
           'rk_stages_restarting', 'stage_coefficients']


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


def rk_stages_restarting(fn, tableau: tableaus.ButcherTableau, point, restart,
                         h, step_for, probe=None):
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
    point: `(t, y, k1)`: the scalar time, the flat list of Tensors there,
      and `fn(t, y)` carried from the last step (FSAL methods; not used on
      a restart or by other methods).
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
  t, y, k1 = point
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
