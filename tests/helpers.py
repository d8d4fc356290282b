"""Helpers shared by the test modules (and mirrored_check): run modes, small
training set-ups."""

import tensorflow as tf

from tfp_ffjord import training

# How a function under test is run: eagerly, traced, or traced and compiled.
RUN_MODES = ('eager', 'function', 'xla')


def run_in_mode(fn, mode):
  """Wraps `fn` for `mode` in RUN_MODES."""
  if mode == 'eager':
    return fn
  return tf.function(fn, jit_compile=(mode == 'xla'), reduce_retracing=True)


# TensorFlow ops that XLA compiles through an MLIR legalisation, ~6 ms each
# (`tfp_ffjord._lowering`).
SLOW_TO_LOWER = frozenset({'Abs', 'Sqrt', 'IsFinite', 'Exp', 'Tanh', 'Rsqrt',
                           'Sign', 'Reciprocal', 'Floor', 'Ceil', 'IsNan',
                           'IsInf'})


def graph_op_types(concrete):
  """Every op type in a concrete function's graph and the functions it
  calls (loop bodies, branches)."""
  graph_def = concrete.graph.as_graph_def()
  types = {node.op for node in graph_def.node}
  for f in graph_def.library.function:
    types.update(node.op for node in f.node_def)
  return types


def tiny_config(**overrides):
  """One block, MLP 8, RK4 with 4 steps, 256 moons points: ~1 s an epoch.

  The steps run in `tf.function` without XLA: compiling a tiny trainer's
  steps costs ~4 s more per trainer, and the compiled training path has
  tests of its own (test_xla_training, the command-line runs, the
  notebooks, MirroredStrategy, reliability's `[xla]` cases); pass
  `jit_compile=True` where XLA is the subject.
  """
  kw = dict(dataset='moons', num_train=256, num_test=128, batch_size=64,
            blocks=1, hidden=(8,), epochs=2, solver='rk4', num_steps=4,
            eval_batch_size=128, eval_rtol=1e-4, eval_atol=1e-4,
            learning_rate=2e-2, jit_compile=False)
  kw.update(overrides)
  return training.TrainConfig(**kw)


def weights(trainer):
  """The trainer's trainable weights as NumPy arrays."""
  return [v.numpy() for v in trainer.model.trainable_variables]
