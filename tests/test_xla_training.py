"""The full FFJORD training step compiles with `jit_compile=True`.

`tests/test_contract.py` checks every solver x trace x gradient mode under
XLA (float64 gradients against finite differences). Here, a float32 step of
a two-block chain with an optimizer, compiled, must give the loss and
gradients of the uncompiled one: a fixed-step and an adaptive solver, one
per gradient mode and trace; with the exact trace, also those of
`tfb.FFJORD` on the same blocks and solver.
"""

import re

import numpy as np
import pytest
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import ode, training
from tests.helpers import graph_op_types
from tests.helpers import tiny_config

tfb, tfd = tfp.bijectors, tfp.distributions

# XLA reorders float32 arithmetic; through 2 blocks and a backward pass the
# results agree to about this.
XLA_RTOL = 1e-3
XLA_ATOL = 1e-4

SOLVERS = {
    'RK4': lambda g: ode.RK4(num_steps=4, gradient=g),
    'Tsit5': lambda g: ode.Tsit5(atol=1e-4, gradient=g),
}


@pytest.mark.slow
@pytest.mark.parametrize('solver,trace,gradient', [
    ('RK4', 'exact', 'backprop'), ('Tsit5', 'hutchinson', 'adjoint')])
def test_training_step_compiles_and_matches(solver, trace, gradient):
  blocks = [tfp_ffjord.MLPODE([8], 2, name=f'b{i}') for i in range(2)]
  for b in blocks:
    b(0., tf.zeros([1, 2]))
  trace_fn = (tfp_ffjord.trace_jacobian_exact if trace == 'exact'
              else tfp_ffjord.trace_jacobian_hutchinson)
  chain = tfb.Chain([tfp_ffjord.FFJORD(
      b, ode_solve_fn=SOLVERS[solver](gradient).solve,
      trace_augmentation_fn=trace_fn) for b in blocks])
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)), chain)
  variables = [v for b in blocks for v in b.trainable_variables]
  x = tf.random.normal([32, 2], seed=1)

  def loss_and_grads(x):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(flow.log_prob(
          x, bijector_kwargs={'ffjord': {'seed': 3}}))
    return loss, tape.gradient(loss, variables)

  loss, grads = loss_and_grads(x)
  # One compiled step: the loss and gradients it applies, then the update.
  opt = snt.optimizers.Adam(1e-2)

  @tf.function(jit_compile=True)
  def train_step(x):
    loss, grads = loss_and_grads(x)
    opt.apply(grads, variables)
    return loss, grads

  opt._initialize(variables)  # pylint: disable=protected-access
  before = [v.numpy().copy() for v in variables]
  xla_loss, xla_grads = train_step(x)
  np.testing.assert_allclose(xla_loss.numpy(), loss.numpy(), rtol=XLA_RTOL)
  for v, g, xg in zip(variables, grads, xla_grads):
    np.testing.assert_allclose(xg.numpy(), g.numpy(), rtol=XLA_RTOL,
                               atol=XLA_ATOL, err_msg=v.name)
  # Adam's first step moves every weight with a nonzero gradient by ~lr.
  for v, b, g in zip(variables, before, grads):
    moved = np.abs(v.numpy() - b)
    nonzero = np.abs(g.numpy()) > 1e-6
    assert np.all(moved[nonzero] > 1e-3), f'{v.name} was not updated'
  if trace == 'exact':
    # An independent reference: TFP's own `tfb.FFJORD` and exact trace on
    # the same blocks (at their weights before the update) and solver.
    for v, b in zip(variables, before):
      v.assign(b)
    reference = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)),
        tfb.Chain([tfb.FFJORD(
            b, ode_solve_fn=SOLVERS[solver](gradient).solve,
            trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact)
                   for b in blocks]))
    with tf.GradientTape() as tape:
      ref_loss = -tf.reduce_mean(reference.log_prob(x))
    ref_grads = tape.gradient(ref_loss, variables)
    np.testing.assert_allclose(xla_loss.numpy(), ref_loss.numpy(),
                               rtol=XLA_RTOL)
    for v, g, xg in zip(variables, ref_grads, xla_grads):
      np.testing.assert_allclose(xg.numpy(), g.numpy(), rtol=XLA_RTOL,
                                 atol=XLA_ATOL, err_msg=v.name)


_COMPILE_COUNT_SCRIPT = '''
import sys
import tensorflow as tf
import tensorflow_probability as tfp
import tfp_ffjord
from tfp_ffjord import ode, training
tfd = tfp.distributions
mlp = tfp_ffjord.MLPODE([8], 2)
mlp(0., tf.zeros([1, 2]))
solver = ode.Tsit5(rtol=1e-2, atol=1e-3, gradient=sys.argv[1])
flow = tfd.TransformedDistribution(
    tfd.MultivariateNormalDiag(tf.zeros([2])),
    tfp_ffjord.FFJORD(mlp, ode_solve_fn=solver.solve))
# A compiled Adam step (function `step`), called 4 times.
training.time_train_step(flow, mlp.trainable_variables,
                         tf.random.normal([32, 2], seed=1), steps=3,
                         jit_compile=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize('gradient', ['adjoint', 'backprop'])
def test_compiled_training_step_is_compiled_once(tmp_path, gradient):
  """Optimizer updates must not trigger XLA recompilation (counted by dumps).

  An earlier version recompiled the adjoint's step after every update (XLA
  treated the variables as compile-time constants): 4 steps, 4 compilations.
  """
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  dump = tmp_path / 'xla'
  env = dict(os.environ, XLA_FLAGS=f'--xla_dump_to={dump}',
             TF_CPP_MIN_LOG_LEVEL='3')
  res = subprocess.run([sys.executable, '-c', _COMPILE_COUNT_SCRIPT, gradient],
                       capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  compiled = [f for f in os.listdir(dump)
              if f.endswith('before_optimizations.txt') and '_step_' in f]
  assert len(compiled) == 1, compiled


# Ops that run on the host whatever the device: Python callbacks (from
# `tf.py_function` / `tf.numpy_function`, i.e. NumPy or SciPy in a step),
# assertions and prints (their kernels are CPU-only, so on an accelerator
# each one copies its inputs to the host and waits).
HOST_OPS = ('PyFunc', 'PyFuncStateless', 'EagerPyFunc', 'Assert', 'Print',
            'PrintV2')


def op_types(function):
  """Every op type in `function`'s graph and the functions it calls."""
  return graph_op_types(function.get_concrete_function())


@pytest.mark.parametrize('objective', [
    {}, dict(trace='hutchinson', gradient='adjoint', solver='tsit5',
             kinetic_weight=0.1),
    dict(objective='flow-matching'),
    dict(objective='flow-matching', ot_pairing=True, ot_solver='sinkhorn'),
    dict(conditional=True)],
    ids=['likelihood', 'hutchinson-adjoint-rnode', 'flow-matching',
         'flow-matching-sinkhorn', 'conditional'])
def test_compiled_steps_have_no_host_ops(objective):
  trainer = training.Trainer(tiny_config(jit_compile=True, **objective))
  evaluator = trainer.evaluator
  steps = {
      'train step': trainer._train_step.compiled_function,   # pylint: disable=protected-access
      'flow-matching steps': trainer._fm_steps,   # pylint: disable=protected-access
      'log_prob': evaluator._log_prob.compiled_function,   # pylint: disable=protected-access
      'forward': evaluator._forward.compiled_function,   # pylint: disable=protected-access
      'sample': evaluator._sample.compiled_function,   # pylint: disable=protected-access
  }
  for name, function in steps.items():
    types = op_types(function)
    assert 'While' in types or 'StatelessWhile' in types, name   # looked inside
    found = sorted(types.intersection(HOST_OPS))
    assert not found, (name, found)


# TensorFlow's graph passes name the nodes they create `<name>/_<n>`, `n`
# counting in an order that can change from one process to the next (it
# follows hash maps keyed by pointers). Such a name in a step's HLO can make
# the HLO, and so the persistent compilation cache's key, differ between
# runs of the same program: a second process then compiles again. (The
# backprop gradient once differentiated its stage loop with a tape, whose
# constant zero cotangents came out named `while/zeros_6/_0` in some
# processes and `while/zeros_6/_2` in others.)
RENAMED_BY_A_PASS = re.compile(r'op_name="[^"]*/_[0-9]+"')


@pytest.mark.parametrize('config', [
    dict(solver='tsit5', gradient='backprop'),
    dict(solver='tsit5', gradient='adjoint', trace='hutchinson',
         kinetic_weight=0.1)], ids=['backprop', 'adjoint-hutchinson-rnode'])
def test_compiled_steps_have_no_names_that_vary_between_processes(config):
  trainer = training.Trainer(tiny_config(jit_compile=True, blocks=2,
                                         **config))
  batch = tf.zeros([trainer.config.batch_size, 2])
  labels = tf.zeros([trainer.config.batch_size], tf.int32)
  points = tf.zeros([trainer.config.eval_batch_size, 2])
  eval_labels = tf.zeros([trainer.config.eval_batch_size], tf.int32)
  steps = {
      'train step': (trainer._train_step.compiled_function, (batch, labels)),   # pylint: disable=protected-access
      'log_prob': (trainer.evaluator._log_prob.compiled_function,   # pylint: disable=protected-access
                   (points, eval_labels, tf.constant([0, 1]))),
  }
  for name, (function, args) in steps.items():
    hlo = function.experimental_get_compiler_ir(*args)(stage='hlo')
    assert 'while' in hlo, name   # the solver loops are in it
    found = sorted(set(RENAMED_BY_A_PASS.findall(hlo)))
    assert not found, (name, found[:5])
