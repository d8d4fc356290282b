"""Autograph leaves this package alone, as it leaves TensorFlow Probability.

A `tf.function` converts, by default, every Python function it calls with
autograph, recursively, unless the function's module is on autograph's
do-not-convert list (TensorFlow and TFP are). Our code writes its control
flow explicitly (`tf.while_loop`, `tf.where`), so converting it only costs
time: ~7 s on the first trace in a process (measured: a `tf.function`
calling `FFJORD.solve_inverse` traced in 7.6 s converted, 0.6 s not) and
~0.3 s on each later trace of a solve. Functions the user passes in
(dynamics, trace functions) are then called as plain Python, as TFP's
solvers call them.
"""

_PACKAGE = 'tfp_ffjord'


def skip_package():
  """Adds a do-not-convert rule for this package (once; idempotent)."""
  try:
    from tensorflow.python.autograph.core import config  # pylint: disable=g-import-not-at-top
  except ImportError:   # autograph moved: conversion is only slower
    return
  rules = tuple(config.CONVERSION_RULES)
  if any(isinstance(r, config.DoNotConvert)
         and getattr(r, '_prefix', None) == _PACKAGE for r in rules):
    return
  config.CONVERSION_RULES = (config.DoNotConvert(_PACKAGE),) + rules


def is_skipped(fn) -> bool:
  """Whether autograph calls `fn` unconverted (for the tests)."""
  from tensorflow.python.autograph.impl import conversion  # pylint: disable=g-import-not-at-top
  return conversion.is_allowlisted(fn)
