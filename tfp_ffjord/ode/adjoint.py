"""The `'adjoint'` gradient: the continuous adjoint method (Chen et al., 2018).

The backward pass solves the adjoint ODE from the last solution time back to
the initial time (its own method and step-size controller, by default the
forward solve's); memory does not grow with the number of steps.
"""

import tensorflow as tf

from tfp_ffjord._packing import Packing
from tfp_ffjord.ode import runge_kutta
from tfp_ffjord.ode import vjp as vjp_lib

__all__ = ['Layout', 'Params', 'adjoint_gradients']


class Params:
  """Packs the parameters' cotangents (float constants, then variables).

  When they share a dtype and have static shapes they travel through the
  adjoint's backward solve as one flat vector (`_packing.Packing`): the
  loop's per-leaf work (stage updates, selects: each a kernel under XLA)
  then does not grow with their number. (`StackedFFJORD` passes its blocks'
  weights as constants: 6 Tensors for an MLP with 2 hidden layers, one
  vector here; for the seed model that cut ~0.5 s of XLA compilation. The
  backprop gradient's loops only accumulate these cotangents, and packing
  them there made no measurable difference.)
  """

  def __init__(self, float_c, variables):
    self.params = list(float_c) + list(variables)
    self.num_c = len(float_c)
    flat = bool(self.params) and all(
        x.shape.is_fully_defined() and x.dtype == self.params[0].dtype
        for x in self.params)
    self.packing = (Packing([x.shape for x in self.params],
                            [0] * len(self.params)) if flat else None)

  @property
  def num_leaves(self):
    """How many Tensors `pack` returns."""
    return len(self.params) if self.packing is None else 1

  def pack(self, gc, gv):
    """A list of Tensors (one if packed) from the cotangents of `c`, `v`."""
    parts = list(gc) + list(gv)
    return parts if self.packing is None else self.packing.pack(parts)

  def zeros(self):
    """`pack` of zero cotangents."""
    if self.packing is None:
      return [tf.zeros_like(x) for x in self.params]
    return self.packing.zeros([x.dtype for x in self.params])

  def unpack(self, packed):
    """`(gc, gv)` from `pack`'s list."""
    packed = list(packed)
    if self.packing is not None:
      packed = self.packing.unpack(packed)
    return packed[:self.num_c], packed[self.num_c:]


class Layout:
  """Packs the error-controlled leaves of the adjoint's state into one vector.

  The backward solve's loop does per-leaf work (stage sums, the error norm,
  selects: each a kernel under XLA); with the state `(y, a, a_params)` as
  one flat vector (`_packing.Packing`) it does that work once. The leaves
  left out of the error norm stay apart (the norm sees only the vector).
  Only leaves of static shape and one dtype are packed; otherwise the state
  is left as it is.
  """

  def __init__(self, leaves, mask):
    self.mask = list(mask)
    inside = [x for x, use in zip(leaves, mask) if use]
    packed = len(inside) > 1 and all(
        x.shape.is_fully_defined() and x.dtype == inside[0].dtype
        for x in inside)
    self.packing = (Packing([x.shape for x in leaves],
                            [0 if use else None for use in self.mask])
                    if packed else None)

  @property
  def error_mask(self):
    """The error mask of `pack`'s list."""
    if self.packing is None:
      return self.mask
    return [True] + [False] * (len(self.mask) - sum(self.mask))

  def pack(self, xs, lead=(), flags=False):
    """One vector of the leaves in the error norm (each with leading dims
    `lead`), then the others. With `flags`, `xs` holds a Python bool per
    leaf: the packed vector becomes a bool Tensor, the others stay bools."""
    if self.packing is None:
      return list(xs)
    if flags:
      return self.packing.pack_flags(list(xs))
    return self.packing.pack(list(xs), lead=list(lead))

  def unpack(self, packed):
    if self.packing is None:
      return list(packed)
    return self.packing.unpack(packed)


def adjoint_gradients(forward, backward, variables, dys, first_steps=None):
  """Solves the adjoint ODE backwards through the solution times.

  With `u = -s`, the augmented state `(y, a, a_c, a_v)` obeys
  `dy/du = -g`, `da/du = a^T dg/dy`, `da_c/du = a^T dg/dc`,
  `da_v/du = a^T dg/dv`. The solve runs one segment per solution time, from
  `s_k` back to `s_{k-1}` (the last back to `s0`), all in one segmented
  loop (`runge_kutta.integrate`'s `restart_fn`): as segment `s_k` starts,
  `y` is reset to the forward solution there (no drift from integrating
  `y` backwards), the cotangent of `s_k` is added to `a`, and the
  parameters' adjoint restarts from zero. Each segment's contribution to
  the parameters' gradient is its adjoint at the segment's end (one output
  per segment); their sum is the gradient. The loop has no `tf.cond`, so
  pfor can vectorise it (batch Jacobians).

  Args:
    forward: the forward solve (`gradients.Forward`).
    backward: the backward solve's method (`gradients.Backward`).
    variables: the trainable variables the dynamics read.
    dys: the cotangents of the outputs.
    first_steps: optional first step sizes of the backward segments: with
      `ends`, `[T]`, the step the forward solve proposed when it reached
      each solution time (the backward segment from `s_k` starts where that
      step would have gone); otherwise `[T - 1]`, the sizes of segments
      `1..T-1` (dense output: the forward's accepted steps). `None`
      estimates them (Hairer's probe: one more evaluation of the augmented
      dynamics per segment, and the probe's code in the compiled loop).

  With `forward.segmented`, segment `k` runs `g` with segment index `k`;
  `first_steps` is indexed by solution time (`ends`) unless the forward
  solve gave dense output.

  Returns:
    `(dy0, dc, dv, status, u_reached, num_steps)`: the gradients, and the
    backward solve's status, the time `u` where it stopped and its step
    attempts.
  """
  g, s0, ss, outputs = forward.g, forward.s0, forward.ss, forward.outputs
  c_flat, segmented, ends = forward.c_flat, forward.segmented, not forward.dense
  n = len(outputs)
  float_c = [c for c in c_flat if vjp_lib.is_float(c)]
  float_idx = [i for i, c in enumerate(c_flat) if vjp_lib.is_float(c)]
  num_t = tf.shape(ss)[0]
  params = Params(float_c, variables)
  # The parameters' adjoint is error-controlled too (not a seminorm that
  # leaves it out): otherwise a large first step integrates the parameter
  # gradients with no control at all. Each segment integrates its own
  # contribution from zero, which is what the norm sees: a segment's steps
  # do not depend on what the later segments added, so a segmented solve
  # steps exactly as separate solves would.
  mask = list(forward.error_mask) * 2 + [True] * params.num_leaves
  state0 = ([o[-1] for o in outputs] + [tf.zeros_like(d[-1]) for d in dys]
            + params.zeros())
  layout = Layout(state0, mask)

  # Backward segment j is forward segment k = T - 1 - j: from u = -s_k to
  # -s_{k-1} (-s0 for k = 0), with the dynamics of forward segment k.
  u_ends = -tf.concat([s0[tf.newaxis], ss[:-1]], 0)[::-1]

  def fn(u, state, j):
    k = num_t - 1 - j
    parts = layout.unpack(state)
    y, a = parts[:n], parts[n:2 * n]
    seg_g = (lambda s, y, c: g(s, y, c, k)) if segmented else g
    out, gy, gc, gv = vjp_lib.vjp(seg_g, -u, y, c_flat, variables, a)
    gc = [gc[i] for i in float_idx]
    return layout.pack([-o for o in out] + list(gy) + params.pack(gc, gv))

  # Restarting segment j sets the state to jumps[j] + (a's part of it):
  # `y` from the forward solution, the cotangent added to `a`, the
  # parameters' adjoint zero. Packed before the loop, so a step does one
  # gather and one select for it.
  ks = tf.range(num_t - 1, -1, -1)
  jumps = layout.pack(
      [tf.gather(o, ks) for o in outputs] + [tf.gather(d, ks) for d in dys]
      + [tf.zeros(tf.concat([[num_t], tf.shape(p)], 0), p.dtype)
         for p in params.zeros()], lead=[num_t])
  # Which entries keep their value (plus the jump): `a`'s. A leaf kept
  # apart is all or nothing (a Python bool: a constant Tensor captured by
  # the loop would get a per-process name from a graph pass, and the
  # compilation cache's key would change between processes).
  keeps = layout.pack([False] * n + [True] * n + [False] * params.num_leaves,
                      flags=True)

  def restart(j, state):
    out = []
    for x, jump, keep in zip(state, jumps, keeps):
      jump = tf.gather(jump, j)
      if isinstance(keep, bool):
        out.append(x + jump if keep else jump)
      else:
        out.append(tf.where(keep, x + jump, jump))
    return out

  first = None
  if first_steps is not None:
    first = tf.gather(first_steps, ks if ends else tf.maximum(ks - 1, 0))
  res = runge_kutta.integrate(
      fn, backward.tableau, backward.controller, -ss[-1],
      layout.pack(state0), u_ends, runge_kutta.LoopOptions(
          error_mask=layout.error_mask, max_num_steps=backward.max_iter,
          unroll_stages=backward.unroll_stages, first_step=first,
          segmented=True, restart_fn=restart))
  # Every segment's end is written once: the last holds dL/dy0, their sum
  # the parameters' gradient.
  last = layout.unpack([o[-1] for o in res.outputs])
  summed = layout.unpack([tf.reduce_sum(o, 0) for o in res.outputs])
  dy0 = last[n:2 * n]
  dc_float, dv = params.unpack(summed[2 * n:])
  dc = [None] * len(c_flat)
  for i, grad in zip(float_idx, dc_float):
    dc[i] = grad
  return (dy0, dc, dv, res.status, res.t,
          res.num_accepted + res.num_rejected)
