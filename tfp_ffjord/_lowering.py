"""Elementwise helpers that compile quickly under XLA.

TensorFlow lowers most ops to XLA directly, but a few of them (`Abs`,
`Sqrt`, `IsFinite`, `Exp`, `Tanh`, ...) go through an MLIR legalisation
that costs ~6 ms of compilation per op in the graph, against 0.1-0.4 ms for
ops lowered directly (measured on a 2-core CPU with TensorFlow 2.21). The
solver loops use dozens of them (error norms, finiteness checks), so the
helpers below write the same values with directly lowered ops:

* `magnitude(x)`: `max(x, -x)` for real `x`, equal to `|x|` except for the
  sign of a zero and subnormals, which `max` (in TensorFlow's CPU kernels
  and in XLA) treats as zero;
* `sqrt(x)`: under XLA `x ** 0.5` (NaN at -inf), which XLA's simplifier
  turns into the same `sqrt` instruction (bitwise equal); elsewhere
  `tf.sqrt`;
* `is_finite(x)`: `-inf < x < inf` for real `x` (false for NaN).

Complex inputs fall back to the TensorFlow ops.

Reductions cost kernels: XLA's CPU compiler rewrites a sum over a dimension
longer than 32 into a windowed sum and a second sum, and fuses neither
with the elementwise ops that feed it, so each such sum is three kernels of
~10 ms of compilation each. `row_sums` computes several sums, over any
number of Tensors, as one reduction (three kernels in all), and
`zeros_or_nan` turns finiteness checks into such sums.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

__all__ = ['in_xla_context', 'magnitude', 'sqrt', 'is_finite', 'row_sums',
           'zeros_or_nan']


def in_xla_context() -> bool:
  """Whether ops built here will be compiled by XLA (`jit_compile=True`)."""
  graph = tf.compat.v1.get_default_graph()
  return control_flow_util.GraphOrParentsInXlaContext(graph)


def magnitude(x):
  """`|x|` elementwise (for complex `x`, the modulus)."""
  x = tf.convert_to_tensor(x)
  if x.dtype.is_complex:
    return tf.abs(x)
  return tf.maximum(x, -x)


def sqrt(x):
  """`sqrt(x)` elementwise, the same values in and out of XLA."""
  x = tf.convert_to_tensor(x)
  if in_xla_context() and not x.dtype.is_complex:
    # pow(-inf, 0.5) is +inf where sqrt(-inf) is NaN.
    return tf.where(x > tf.constant(-np.inf, x.dtype),
                    tf.pow(x, tf.constant(0.5, x.dtype)),
                    tf.constant(np.nan, x.dtype))
  return tf.sqrt(x)


def is_finite(x):
  """Elementwise finiteness; for complex `x`, of both parts."""
  x = tf.convert_to_tensor(x)
  if x.dtype.is_complex:
    return is_finite(tf.math.real(x)) & is_finite(tf.math.imag(x))
  inf = tf.constant(np.inf, x.dtype)
  return (x > -inf) & (x < inf)


def zeros_or_nan(tensors):
  """`x * 0` for each floating Tensor in `tensors` (complex ones give their
  real and imaginary parts), integer ones left out: 0 where `x` is finite,
  NaN where it is not, so a sum of them is 0 exactly when all are finite.
  """
  out = []
  for x in tensors:
    x = tf.convert_to_tensor(x)
    parts = ([tf.math.real(x), tf.math.imag(x)] if x.dtype.is_complex
             else [x] if x.dtype.is_floating else [])
    out += [p * tf.zeros([], p.dtype) for p in parts]
  return out


def row_sums(rows, dtype):
  """`[len(rows)]`: the sum of all elements of the Tensors of each row.

  Args:
    rows: a list of lists of real floating Tensors (a row may be empty:
      its sum is 0). Tensors of another dtype are cast to `dtype`.
    dtype: the dtype of the result.

  The rows are flattened, concatenated and padded with zeros to one length,
  and summed by one reduction; with dynamic shapes each row is summed
  apart. The order of the additions is XLA's or TensorFlow's, not that of
  summing each Tensor first.
  """
  flat = []
  for row in rows:
    parts = [tf.reshape(tf.cast(x, dtype), [-1]) for x in row]
    if not parts:
      parts = [tf.zeros([0], dtype)]
    flat.append(parts[0] if len(parts) == 1 else tf.concat(parts, 0))
  sizes = [f.shape.num_elements() for f in flat]
  if any(n is None for n in sizes):
    return tf.stack([tf.reduce_sum(f) for f in flat])
  length = max(sizes)
  flat = [f if n == length else tf.pad(f, [[0, length - n]])
          for f, n in zip(flat, sizes)]
  return tf.reduce_sum(tf.stack(flat), axis=1)
