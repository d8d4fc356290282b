"""Sonnet dynamics modules."""

import numpy as np
import pytest
import sonnet as snt
import tensorflow as tf

import tfp_ffjord


@pytest.mark.parametrize('module_cls', [tfp_ffjord.MLPODE,
                                        tfp_ffjord.ConcatSquashMLPODE])
@pytest.mark.parametrize('shape', [[5, 3], [3], [2, 4, 3]])
def test_output_shape_matches_state_for_any_batch_rank(module_cls, shape):
  module = module_cls([16, 16], 3)
  z = tf.random.normal(shape)
  assert module(0.5, z).shape == tuple(shape)
  assert isinstance(module, snt.Module)


def test_mlp_ode_is_the_seed_colab_architecture():
  module = tfp_ffjord.MLPODE([8, 8], 2)
  module(0., tf.zeros([1, 2]))
  shapes = [tuple(v.shape) for v in module.trainable_variables]
  # Inputs are (t, x, y): 3 -> 8 -> 8 -> 2, weights and biases.
  assert sorted(shapes) == sorted([(3, 8), (8,), (8, 8), (8,), (8, 2), (2,)])


def test_time_changes_the_output():
  module = tfp_ffjord.MLPODE([8], 2)
  z = tf.random.normal([4, 2])
  assert not np.allclose(module(0., z).numpy(), module(1., z).numpy())


@pytest.mark.parametrize('module_cls', [tfp_ffjord.MLPODE,
                                        tfp_ffjord.ConcatSquashMLPODE])
def test_zero_init_output_starts_as_identity_flow(module_cls):
  module = module_cls([8], 2, zero_init_output=True)
  z = tf.random.normal([4, 2])
  np.testing.assert_array_equal(module(0.3, z).numpy(), np.zeros([4, 2]))
  bij = tfp_ffjord.FFJORD(module, ode_solve_fn=tfp_ffjord.ode.RK4(
      num_steps=2).solve, trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact)
  np.testing.assert_array_equal(bij.forward(z).numpy(), z.numpy())


@pytest.mark.parametrize('module_cls', [tfp_ffjord.MLPODE,
                                        tfp_ffjord.ConcatSquashMLPODE])
def test_context_is_concatenated_and_required(module_cls):
  module = module_cls([8], 2, context_keys=['label'])
  z = tf.random.normal([4, 2])
  a = module(0., z, label=tf.zeros([4, 1]))
  b = module(0., z, label=tf.ones([4, 1]))
  assert not np.allclose(a.numpy(), b.numpy())
  with pytest.raises(ValueError, match='missing context keyword `label`'):
    module(0., z)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(hidden_sizes=[0], output_size=2), ValueError, 'positive ints'),
    (dict(hidden_sizes=[8], output_size=-1), ValueError, 'positive ints'),
    (dict(hidden_sizes=[8], output_size=2, activation='tanh'), TypeError,
     '`activation` must be callable'),
])
def test_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    tfp_ffjord.MLPODE(**kwargs)


def test_autonomous_mlp_with_tanh_output_is_the_diffeqflux_network():
  # DiffEqFlux: Chain(Dense(1, 3, tanh), Dense(3, 1, tanh)), no time input.
  module = tfp_ffjord.MLPODE([3], 1, time_input=False,
                             output_activation=tf.math.tanh)
  z = tf.random.normal([5, 1])
  out = module(0., z)
  shapes = sorted(tuple(v.shape) for v in module.trainable_variables)
  assert shapes == sorted([(1, 3), (3,), (3, 1), (1,)])
  np.testing.assert_array_equal(out.numpy(), module(7., z).numpy())
  b0, w0, b1, w1 = [v.numpy() for v in sorted(
      module.trainable_variables, key=lambda v: v.name)]
  expected = np.tanh(np.tanh(z.numpy() @ w0 + b0) @ w1 + b1)
  np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
  with pytest.raises(TypeError, match='output_activation'):
    tfp_ffjord.MLPODE([3], 1, output_activation='tanh')
