"""Argument checks shared by the package: each names the argument and what
was expected, and returns the value in the type the caller uses."""

import math
import numbers

import numpy as np
import tensorflow as tf

__all__ = ['static_number', 'positive', 'positive_int', 'alias']


def static_number(name, value):
  """`value` as a Python number: numbers, NumPy scalars, constant Tensors.

  Raises:
    ValueError: for a Tensor whose value is not known when traced, or that
      is not a scalar.
  """
  if tf.is_tensor(value) or isinstance(value, np.ndarray):
    static = tf.get_static_value(value)
    if static is None or np.ndim(static) != 0:
      raise ValueError(
          f'`{name}` must be a Python number or a constant scalar; got '
          f'{value!r}.')
    value = static.item()
  elif isinstance(value, np.generic):
    value = value.item()
  return value


def positive(name, value, allow_none=False, allow_zero=False):
  """`value` as a positive (or, if allowed, zero) finite float, or None if
  allowed."""
  if value is None and allow_none:
    return None
  value = static_number(name, value)
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value < 0 or (value == 0 and
                                                   not allow_zero)):
    what = 'non-negative' if allow_zero else 'positive'
    raise ValueError(f'`{name}` must be a {what} finite number; got {value!r}.')
  return float(value)


def positive_int(name, value, allow_none=False, none_means='no bound'):
  """`value` as a positive int (bools refused), or None if allowed."""
  if value is None and allow_none:
    return None
  value = static_number(name, value)
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < 1):
    prefix = f'None ({none_means}) or ' if allow_none else ''
    raise ValueError(f'`{name}` must be {prefix}a positive int; got '
                     f'{value!r}.')
  return int(value)


def alias(ours, ours_value, tfps, tfps_value, default):
  """One setting that TFP spells `tfps` and this package `ours`: whichever
  was given (both only if equal), else `default`."""
  if ours_value is None and tfps_value is None:
    return default
  if ours_value is None:
    return tfps_value
  if tfps_value is not None and static_number(tfps, tfps_value) != (
      static_number(ours, ours_value)):
    raise ValueError(
        f'`{ours}` and `{tfps}` (TFP\'s name for it) disagree: got '
        f'{ours_value!r} and {tfps_value!r}; pass one of them.')
  return ours_value
