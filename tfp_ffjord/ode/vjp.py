"""Vector-Jacobian products of the dynamics and of one Runge-Kutta step,
for the gradients' backward loops (`adjoint.py`, `backprop.py`)."""

import contextlib

import tensorflow as tf
from tensorflow.python import pywrap_tfe

from tfp_ffjord.ode import stages as stages_lib

__all__ = ['gradient', 'is_float', 'rk_step_vjp', 'tapes_resumed', 'vjp']


@contextlib.contextmanager
def tapes_resumed():
  """Undoes an enclosing `tape_record.stop_recording()` inside a block."""
  stopped = pywrap_tfe.TFE_Py_TapeSetIsStopped()
  if stopped:
    pywrap_tfe.TFE_Py_TapeSetRestartOnThread()
  try:
    yield
  finally:
    if stopped:
      pywrap_tfe.TFE_Py_TapeSetStopOnThread()


def is_float(x):
  """Whether `x` is floating or complex (a differentiable Tensor)."""
  return x.dtype.is_floating or x.dtype.is_complex


def gradient(tape, target, sources, output_gradients):
  """`tape.gradient` as dense Tensors, with zeros for unconnected sources.

  The backward loops carry these as `tf.while_loop` variables, which must be
  dense Tensors of a fixed shape (no `None`, no `tf.IndexedSlices`).
  """
  grads = tape.gradient(target, sources, output_gradients=output_gradients)
  out = []
  for g, src in zip(grads, sources):
    if g is None:
      shape = src.shape if src.shape.is_fully_defined() else tf.shape(src)
      g = tf.zeros(shape, src.dtype)
    elif isinstance(g, tf.IndexedSlices):
      g = tf.convert_to_tensor(g)
    out.append(g)
  return out


def vjp(fn, s, y, c_flat, variables, cotangent):
  """`fn(s, y, c)` and the VJP of `cotangent` w.r.t. `(y, c, variables)`."""
  float_c = [c for c in c_flat if is_float(c)]
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(y)
    tape.watch(float_c)
    tape.watch(variables)
    out = fn(s, y, c_flat)
  grads = gradient(tape, out, list(y) + float_c + list(variables),
                    cotangent)
  n = len(y)
  gy, gc_float, gv = grads[:n], grads[n:n + len(float_c)], grads[n + len(float_c):]
  it = iter(gc_float)
  gc = [next(it) if is_float(c) else None for c in c_flat]
  return out, gy, gc, gv


def rk_step_vjp(fn, tableau, step, c_flat, variables, cotangent, num_stages,
                accumulated=None):
  """The exact VJP of one explicit Runge-Kutta step, by a reverse stage loop.

  The step is `y' = y + h sum_s b_s k_s`, `k_s = fn(t + c_s h, Y_s, c)`,
  `Y_s = y + h sum_{j<s} a_sj k_j`. With `K_s` the cotangent of `k_s`
  (initially `h b_s a'`), stage `s = S-1, ..., 0` takes the VJP of `fn` at
  `Y_s` with `K_s`, giving `Y'_s`; then `K_j += h a_sj Y'_s` for `j < s`,
  and `Y'_s` adds to the cotangent of `y`, the VJP's parameter parts to
  those of `c` and `variables`.

  The stage loop runs forward once (no tape) and the VJPs run in a second
  loop, each re-evaluating `fn` under its own tape. Differentiating the
  stage loop with `tf.GradientTape` instead builds TensorFlow's loop
  gradient, which stores every intermediate of `fn` and feeds constant zero
  cotangents to the loop's unused outputs; XLA names those constants in an
  order that varies between processes, so the compiled step's cache key
  did too.

  `step` is `(t, y, h)`. `accumulated`, if given, is `(dc0, dv0)`, the
  cotangents of the float entries of
  `c_flat` and of `variables` accumulated so far (by the caller's loop over
  steps): the stage loop adds this step's to them, which saves the caller
  a zero-initialised sum and an addition per Tensor (each a kernel under
  XLA).

  Returns:
    `(dy, dc_float, dv)`: cotangents of `y`, of the float entries of
    `c_flat`, and of `variables` (dense, zeros where unconnected), with
    `dc0` and `dv0` added.
  """
  t, y, h = step
  dc0, dv0 = accumulated if accumulated is not None else (None, None)
  stages = stages_lib.rk_stages(lambda s, z: fn(s, z, c_flat), tableau, t,
                                y, h, num_stages=num_stages)
  a_coef, b_coef, c_coef = stages_lib.stage_coefficients(tableau, t.dtype)
  float_c = [c for c in c_flat if is_float(c)]

  def expand(w, x):
    return tf.reshape(tf.cast(w, x.dtype), [-1] + [1] * x.shape.rank)

  def cast_h(x):
    return tf.cast(h, x.dtype)

  k_bar = [expand(b_coef, a_i) * (cast_h(a_i) * a_i)[tf.newaxis]
           for a_i in cotangent]

  def body(s, k_bar, dy, dc, dv):
    y_s = stages_lib.combine(y, h, stages, a_coef[s])
    k_bar_s = [tf.gather(k, s) for k in k_bar]
    _, gy, gc, gv = vjp(fn, t + c_coef[s] * h, y_s, c_flat, variables,
                        k_bar_s)
    gc = [x for x, c in zip(gc, c_flat) if is_float(c)]
    k_bar = [k + expand(a_coef[s], g_i) * (cast_h(g_i) * g_i)[tf.newaxis]
             for k, g_i in zip(k_bar, gy)]
    return (s - 1, k_bar, [x + d for x, d in zip(dy, gy)],
            [x + d for x, d in zip(dc, gc)], [x + d for x, d in zip(dv, gv)])

  dy0 = list(cotangent)
  if dc0 is None:
    dc0 = [tf.zeros_like(c) for c in float_c]
  if dv0 is None:
    dv0 = [tf.zeros_like(v) for v in variables]
  _, _, dy, dc, dv = tf.while_loop(
      lambda s, *_: s >= 0, body,
      (tf.constant(num_stages - 1), k_bar, dy0, dc0, dv0),
      maximum_iterations=num_stages)
  return dy, dc, dv

