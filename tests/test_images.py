"""Image flows: the mnist loader, conv dynamics, the multiscale architecture,
TFP's discrete flows as baselines, the logit transform, and training them.

Log-dets are checked against `slogdet` of the autodiff Jacobian of the same
map, on images small enough for a dense Jacobian (4x4).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord
from tfp_ffjord import baselines
from tfp_ffjord import datasets
from tfp_ffjord import multiscale
from tfp_ffjord import ode
from tfp_ffjord import training

from tests.helpers import run_in_mode
from tests.test_cli import run_cli

tfb, tfd = tfp.bijectors, tfp.distributions

# FFJORD log-dets are checked against `slogdet` of a central-difference
# Jacobian of the same fixed-step map (RK4, FD_STEPS steps: its integrated
# exact trace and the log-det of the discrete map agree to O(dt^4)). The
# differences are one batched call. float64: step 1e-5, truncation ~1e-10;
# float32: step 3e-3, rounding ~1e-7 / 3e-3 per entry, ~1e-4 on a 16-D
# log-det of order 1.
FD_STEPS = 64
FD_STEP = {tf.float64: 1e-5, tf.float32: 3e-3}
LOG_DET_TOLERANCE = {tf.float64: 1e-7, tf.float32: 1e-3}
ROUND_TRIP_TOLERANCE = {tf.float64: 1e-9, tf.float32: 1e-4}
# A baseline's log-det is closed form: only float32 rounding differs.
BASELINE_LOG_DET_TOLERANCE = 1e-4
# A SavedModel runs the same ops as the in-memory flow (no XLA): float32
# rounding of log-densities of order 100 nats.
SAVED_MODEL_RTOL = 1e-5


def _conv_dynamics(shape, dtype, seed, name):
  """A built ConvODE with random (not zero) output weights."""
  tf.random.set_seed(seed)
  d = tfp_ffjord.ConvODE(shape, (4,), tf.math.tanh, zero_init_output=False,
                         name=name)
  d(tf.zeros([], dtype), tf.zeros([1, int(np.prod(shape))], dtype))
  return d


def _fd_log_det(fn, x, step):
  """`log |det dfn/dx|` per row of `x` from central differences (NumPy
  float64 slogdet), all points in one call of `fn`."""
  n, d = x.shape
  eye = step * tf.eye(d, dtype=x.dtype)
  points = tf.concat([tf.reshape(x[:, None] + eye, [-1, d]),
                      tf.reshape(x[:, None] - eye, [-1, d])], 0)
  values = fn(points).numpy().astype(np.float64)
  plus, minus = values[:n * d], values[n * d:]
  jac = ((plus - minus) / (2. * step)).reshape(n, d, -1)   # [n, input, out]
  return np.linalg.slogdet(np.swapaxes(jac, 1, 2))[1]


def _dense_log_det(fn, x):
  """`log |det dfn/dx|` per row of `x`, from the autodiff Jacobian (for
  the discrete baselines)."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = fn(x)
  return tf.linalg.slogdet(tape.batch_jacobian(y, x))[1]


# Run modes with the quick subset's case (the first) traced: an eager
# solve at these tolerances is a Python loop of hundreds of steps.
MODES = ('function', 'xla', 'eager')


# --------------------------------------------------------------------- data


def test_mnist_loader_split_dtype_range_and_dequantisation():
  data = datasets.load('mnist', seed=0)
  assert data.train.shape == (4000, 784) and data.test.shape == (1000, 784)
  assert data.train.dtype == np.float32 and data.image_shape == (28, 28, 1)
  assert data.train.min() >= 0. and data.train.max() <= 1.
  assert data.bin_width == 1. / 256
  pixels, labels = datasets.mnist_pixels()
  assert pixels.shape == (5000, 784) and pixels.dtype == np.uint8
  # The fixed split: the same images for every seed, disjoint, and a smaller
  # split is a prefix of it (no held-out image is ever trained on).
  order = np.random.default_rng(0).permutation(5000)
  levels = np.floor(data.train.astype(np.float64) * 256)
  np.testing.assert_array_equal(levels, pixels[order[:4000]])
  np.testing.assert_array_equal(np.floor(data.test.astype(np.float64) * 256),
                                pixels[order[4000:]])
  np.testing.assert_array_equal(data.train_labels, labels[order[:4000]])
  other = datasets.load('mnist', num_train=100, num_test=50, seed=1)
  np.testing.assert_array_equal(np.floor(other.train.astype(np.float64)
                                         * 256), pixels[order[:100]])
  assert not np.array_equal(other.train, data.train[:100])  # new noise
  # Dequantisation noise is uniform inside each bin.
  frac = data.train.astype(np.float64) * 256 - levels
  assert abs(frac.mean() - 0.5) < 0.01 and abs(frac.std() - 12 ** -.5) < 0.01
  # bits/dim: all mass in one bin (density 256^D) codes in 0 bits; the
  # uniform density on [0, 1]^D costs 8 bits per dimension.
  assert data.bits_per_dim(784 * math.log(1. / 256)) == pytest.approx(0.)
  assert data.bits_per_dim(0.) == pytest.approx(8.)


def test_squeeze_and_factor_match_reshapes():
  image = np.arange(4 * 6 * 3).reshape(4, 6, 3)
  index, shape = multiscale.squeeze_permutation((4, 6, 3))
  squeezed = image.reshape(2, 2, 3, 2, 3).transpose(0, 2, 1, 3, 4).reshape(
      2, 3, 12)
  assert shape == (2, 3, 12)
  np.testing.assert_array_equal(image.reshape(-1)[index], squeezed.reshape(-1))
  index, kept = multiscale.factor_permutation((2, 3, 12))
  flat = squeezed.reshape(-1)[index]
  np.testing.assert_array_equal(flat[:36], squeezed[..., 6:].reshape(-1))
  np.testing.assert_array_equal(flat[36:], squeezed[..., :6].reshape(-1))
  assert kept == (2, 3, 6)
  plan = multiscale.plan_levels((28, 28, 1), 3)
  assert [lv.flow_shape for lv in plan] == [(14, 14, 4), (7, 7, 8),
                                            (7, 7, 4)]
  # (2, 2, 1) -> (1, 1, 4) -> (1, 1, 2) -> (1, 1, 1): no fourth level.
  with pytest.raises(ValueError, match='`levels`=4 is too many'):
    multiscale.plan_levels((2, 2, 1), 4)
  with pytest.raises(ValueError, match='`image_shape` must be three'):
    multiscale.plan_levels((4, 4), 2)


# ------------------------------------------------------------- conv dynamics


def test_conv_ode_layouts_context_and_errors():
  d = tfp_ffjord.ConvODE((4, 4, 2), (8,), zero_init_output=False,
                         context_keys=('context',))
  z = tf.random.normal([3, 32])
  c = tf.one_hot([0, 1, 2], 3)
  flat = d(0.3, z, context=c)
  image = d(0.3, tf.reshape(z, [3, 4, 4, 2]), context=c)
  assert flat.shape == (3, 32) and image.shape == (3, 4, 4, 2)
  np.testing.assert_allclose(tf.reshape(image, [3, 32]), flat, atol=1e-6)
  # Per-sample times `[N, 1]` (flow matching) and an unbatched state.
  np.testing.assert_allclose(d(tf.fill([3, 1], 0.3), z, context=c), flat,
                             atol=1e-6)
  np.testing.assert_allclose(d(0.3, z[0], context=c[0]), flat[0], atol=1e-6)
  # The context changes the output; the default zero-initialised output
  # layer starts the flow at the identity.
  assert np.abs(d(0.3, z, context=c[::-1]) - flat).max() > 1e-4
  zero = tfp_ffjord.ConvODE((4, 4, 2), (8,))
  assert np.all(zero(0.5, z).numpy() == 0.)
  with pytest.raises(ValueError, match=r'shape \[\.\.\., 32\]'):
    d(0., tf.zeros([3, 30]), context=c)
  with pytest.raises(ValueError, match='missing context keyword'):
    d(0., z)
  with pytest.raises(ValueError, match='`image_shape` must be three'):
    tfp_ffjord.ConvODE((4, 4), (8,))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('dtype', [tf.float64, tf.float32])
@pytest.mark.matrix
def test_conv_ffjord_exact_trace_matches_slogdet(mode, dtype):
  shape = (4, 4, 1)
  d = _conv_dynamics(shape, dtype, 1, 'conv_block')
  bij = tfp_ffjord.FFJORD(d, ode_solve_fn=ode.RK4(num_steps=FD_STEPS).solve,
                          trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
                          dtype=dtype)
  x = tf.random.stateless_normal([3, 16], (1, 2), dtype=dtype)
  fldj = run_in_mode(
      lambda x: bij.forward_log_det_jacobian(x, event_ndims=1), mode)(x)
  expected = _fd_log_det(tf.function(lambda x: bij.solve_forward(x).value),
                         x, FD_STEP[dtype])
  assert np.abs(expected).max() > 0.05   # not the identity
  np.testing.assert_allclose(fldj, expected, atol=LOG_DET_TOLERANCE[dtype],
                             rtol=LOG_DET_TOLERANCE[dtype])


def test_unet_ode_layouts_time_context_independence_and_errors():
  d = tfp_ffjord.dynamics.UNetODE((8, 8, 1), (8, 16), groups=4,
                                  zero_init_output=False,
                                  context_keys=('context',))
  z = tf.random.normal([3, 64])
  c = tf.one_hot([0, 1, 2], 3)
  flat = d(0.3, z, context=c)
  image = d(0.3, tf.reshape(z, [3, 8, 8, 1]), context=c)
  assert flat.shape == (3, 64) and image.shape == (3, 8, 8, 1)
  np.testing.assert_allclose(tf.reshape(image, [3, 64]), flat, atol=1e-6)
  # Per-sample times, the time and the context matter.
  np.testing.assert_allclose(d(tf.fill([3, 1], 0.3), z, context=c), flat,
                             atol=1e-6)
  assert np.abs(d(0.7, z, context=c) - flat).max() > 1e-4
  assert np.abs(d(0.3, z, context=c[::-1]) - flat).max() > 1e-4
  # GroupNorm normalises each image alone: batch members are independent
  # (what every trace estimator assumes).
  other = d(0.3, tf.concat([z[:1], 5. * z[1:]], 0), context=c)
  np.testing.assert_allclose(other[0], flat[0], atol=1e-6)
  # 8x8 pools once (to 4x4); 7x7 cannot pool and keeps its size.
  odd = tfp_ffjord.dynamics.UNetODE((7, 7, 1), (8, 8), groups=4)
  assert odd(0.5, tf.zeros([2, 49])).shape == (2, 49)
  assert np.all(odd(0.5, tf.random.normal([2, 49])).numpy() == 0.)
  with pytest.raises(ValueError, match='divisible by `groups`'):
    tfp_ffjord.dynamics.UNetODE((8, 8, 1), (6,), groups=4)
  with pytest.raises(ValueError, match='missing context keyword'):
    d(0., z)


# The integrated exact trace against the Jacobian of RK4's discrete map: they
# differ by the solve's O(h^4) error, 3e-7 at 64 steps for this U-Net (5e-6
# at 32, 1e-8 at 128); a wrong trace is off by the log-det itself (~0.2).
UNET_LOG_DET_TOLERANCE = 1e-6


@pytest.mark.slow
def test_unet_ffjord_exact_trace_matches_slogdet():
  shape, dtype = (4, 4, 1), tf.float64
  tf.random.set_seed(3)
  d = tfp_ffjord.dynamics.UNetODE(shape, (4, 8), groups=2,
                                  zero_init_output=False)
  d(tf.zeros([], dtype), tf.zeros([1, 16], dtype))
  bij = tfp_ffjord.FFJORD(d, ode_solve_fn=ode.RK4(num_steps=FD_STEPS).solve,
                          trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
                          dtype=dtype)
  x = tf.random.stateless_normal([3, 16], (1, 2), dtype=dtype)
  fldj = tf.function(
      lambda x: bij.forward_log_det_jacobian(x, event_ndims=1))(x)
  expected = _fd_log_det(tf.function(lambda x: bij.solve_forward(x).value),
                         x, FD_STEP[dtype])
  assert np.abs(expected).max() > 0.05   # not the identity
  np.testing.assert_allclose(fldj, expected, atol=UNET_LOG_DET_TOLERANCE)


@pytest.mark.slow
def test_unet_flow_matching_step_compiles_under_xla_and_learns(tmp_path):
  config = training.TrainConfig(
      dataset='digits', model='unet', blocks=1, hidden=(8, 16),
      objective='flow-matching', batch_size=64, steps_per_epoch=40,
      epochs=2, learning_rate=3e-3, activation='swish', eval_rtol=1e-3,
      eval_atol=1e-3, eval_trace='hutchinson', eval_batch_size=300,
      jit_compile=True)
  trainer = training.Trainer(config, out_dir=str(tmp_path))
  history = trainer.fit(progress=False)
  assert trainer.num_traces == 1
  # Flow matching's loss starts at E|x1 - x0|^2 / D-ish for a zero
  # velocity field; 80 steps must lower it.
  assert history[-1]['train_loss'] < history[0]['train_loss']
  assert np.isfinite(history[-1]['test_nll'])


# --------------------------------------------------------------- multiscale


# Eagerly, the same solves take ~90 s at FD_STEPS steps: eager mode has a
# test of its own below, on a short solve against the traced one.
@pytest.mark.parametrize('mode,dtype', [
    ('function', tf.float64), ('xla', tf.float64),
    ('function', tf.float32), ('xla', tf.float32)])
@pytest.mark.matrix
def test_multiscale_inverts_and_log_det_matches_slogdet(mode, dtype):
  shape = (4, 4, 1)
  plan = multiscale.plan_levels(shape, 2)
  levels = [[_conv_dynamics(lv.flow_shape, dtype, 10 * i, f'level{i}')]
            for i, lv in enumerate(plan)]
  bij = multiscale.MultiscaleFFJORD(
      shape, levels, ode_solve_fn=ode.RK4(num_steps=FD_STEPS).solve,
      trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact, dtype=dtype)
  dist = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros([16], dtype)), bij)
  z = tf.random.stateless_normal([3, 16], (3, 4), dtype=dtype)

  def forward_and_back(z):
    y = bij.solve_forward(z).value
    back = bij.solve_inverse(y, regularize=True)
    return y, back, dist.log_prob(y)

  y, back, log_prob = run_in_mode(forward_and_back, mode)(z)
  z_back = back.value
  # RK4's inverse is not its exact inverse: O(dt^4) apart.
  np.testing.assert_allclose(z_back, z, atol=ROUND_TRIP_TOLERANCE[dtype])
  fldj = _fd_log_det(tf.function(lambda z: bij.solve_forward(z).value), z,
                     FD_STEP[dtype])
  assert np.abs(fldj).max() > 0.05
  np.testing.assert_allclose(
      log_prob, dist.distribution.log_prob(z) - fldj,
      atol=LOG_DET_TOLERANCE[dtype], rtol=LOG_DET_TOLERANCE[dtype])
  # The inverse's unreduced terms sum to minus the forward log-det, and the
  # diagnostics count both levels' solves (4 RK4 stages a step).
  np.testing.assert_allclose(tf.reduce_sum(back.log_det_jacobian, -1), -fldj,
                             atol=LOG_DET_TOLERANCE[dtype],
                             rtol=LOG_DET_TOLERANCE[dtype])
  assert int(back.diagnostics.num_ode_fn_evaluations) == 2 * 4 * FD_STEPS
  assert back.kinetic_energy.shape == (3, 16)
  assert np.all(np.sum(back.kinetic_energy, -1) > 0.)


def test_multiscale_eagerly_equals_traced():
  """Eager mode computes what `tf.function` does (values, inverse, log-dets,
  RNODE terms), on a short float64 solve."""
  shape = (4, 4, 1)
  plan = multiscale.plan_levels(shape, 2)
  levels = [[_conv_dynamics(lv.flow_shape, tf.float64, 10 * i, f'level{i}')]
            for i, lv in enumerate(plan)]
  bij = multiscale.MultiscaleFFJORD(
      shape, levels, ode_solve_fn=ode.RK4(num_steps=4).solve,
      trace_augmentation_fn=tfp_ffjord.trace_jacobian_exact,
      dtype=tf.float64)
  z = tf.random.stateless_normal([3, 16], (3, 4), dtype=tf.float64)

  def forward_and_back(z):
    forward = bij.solve_forward(z)
    back = bij.solve_inverse(forward.value, regularize=True)
    return (forward.value, forward.log_det_jacobian, back.value,
            back.log_det_jacobian, back.kinetic_energy,
            back.jacobian_frobenius)

  eager = forward_and_back(z)
  traced = tf.function(forward_and_back)(z)
  assert np.abs(np.sum(eager[1], -1)).max() > 1e-3   # not the identity
  for a, b in zip(eager, traced):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_multiscale_checks_its_input():
  plan = multiscale.plan_levels((4, 4, 1), 2)
  levels = [[_conv_dynamics(lv.flow_shape, tf.float32, i, f'c{i}')]
            for i, lv in enumerate(plan)]
  bij = multiscale.MultiscaleFFJORD((4, 4, 1), levels)
  with pytest.raises(ValueError, match=r'flattened image \(16'):
    bij.solve_inverse(tf.zeros([2, 15]))


# ---------------------------------------------------------------- baselines


@pytest.mark.parametrize('kind', ['realnvp', 'maf', 'glow'])
def test_baseline_log_det_matches_slogdet(kind):
  tf.random.set_seed(3)
  if kind == 'glow':
    flow = baselines.make_glow((4, 4, 1), levels=2, steps_per_level=2,
                               hidden_channels=8)
  else:
    make = baselines.make_realnvp if kind == 'realnvp' else baselines.make_maf
    flow = make(16, layers=3, hidden=(16,), activation=tf.math.tanh)
  x = tf.random.stateless_uniform([8, 16], (5, 6))
  flow.initialize(x)
  assert flow.trainable_variables
  # Random (not identity-like) weights everywhere; larger steps made Glow's
  # Jacobian too ill-conditioned (condition 1e10) for a float32 reference.
  for v in flow.trainable_variables:
    v.assign(v + 0.1 * tf.random.normal(v.shape))
    if getattr(v, 'constraint', None) is not None:   # MADE's masks
      v.assign(v.constraint(v))
  bij = flow.bijector
  # New Tensors (`x + 0.`) for each call: TFP's bijector cache is keyed by
  # the Tensor object, and would return the values from before the change
  # of weights.
  ildj = bij.inverse_log_det_jacobian(x + 0., event_ndims=1)
  np.testing.assert_allclose(ildj, _dense_log_det(lambda v: bij.inverse(v + 0.),
                                                  x),
                             atol=BASELINE_LOG_DET_TOLERANCE,
                             rtol=BASELINE_LOG_DET_TOLERANCE)
  np.testing.assert_allclose(bij.forward(bij.inverse(x + 0.)), x, atol=1e-4)


def test_maf_masks_survive_training_steps():
  config = training.TrainConfig(
      dataset='digits', model='maf', blocks=2, hidden=(32,), num_train=256,
      num_test=64, batch_size=64, epochs=1, steps_per_epoch=4,
      learning_rate=0.05, eval_batch_size=64, jit_compile=False)
  trainer = training.Trainer(config)
  trainer.fit(progress=False)
  masked = [v for v in trainer.variables
            if getattr(v, 'constraint', None) is not None]
  assert masked
  for v in masked:   # a masked kernel keeps its zeros
    np.testing.assert_array_equal(v.numpy(), v.constraint(v).numpy())
  # And the flow's log-density is still the change of variables.
  x = tf.constant(trainer.data.test[:4])
  bij = trainer.model.baseline.bijector
  expected = (trainer.model.base_distribution().log_prob(bij.inverse(x))
              + _dense_log_det(bij.inverse, x))
  np.testing.assert_allclose(trainer.log_prob(x.numpy()), expected,
                             atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------ logit, models


def test_logit_transform_log_det_is_counted():
  alpha = 0.05
  kw = dict(architecture='conv', image_shape=(4, 4, 1), blocks=1,
            hidden=(4,))
  with_logit = training.FlowModel(16, logit_alpha=alpha, **kw)
  plain = training.FlowModel(16, **kw)
  for a, b in zip(plain.trainable_variables, with_logit.trainable_variables):
    a.assign(b + 0.1)
    b.assign(b + 0.1)   # both the same random, non-identity weights
  solver = ode.Tsit5(rtol=1e-6, atol=1e-6)
  _, chain = with_logit.flow(solver)
  _, plain_chain = plain.flow(solver)
  x = tf.random.stateless_uniform([5, 16], (7, 8), minval=0.01, maxval=0.99)
  u = alpha + (1 - 2 * alpha) * x
  y = tf.math.log(u) - tf.math.log1p(-u)
  # log p(x) = log p_flow(y) + sum log |dy/dx|, dy/dx = (1-2a) / (u (1-u)).
  jac = tf.reduce_sum(tf.math.log((1 - 2 * alpha) / (u * (1 - u))), -1)
  expected = plain.log_prob_terms(plain_chain, y).log_prob + jac
  np.testing.assert_allclose(with_logit.log_prob_terms(chain, x).log_prob,
                             expected, rtol=1e-5, atol=1e-4)
  assert [b.name for b in chain.bijectors] == ['logit', 'ffjord']


def test_flow_model_argument_errors():
  with pytest.raises(ValueError, match='needs `image_shape`'):
    training.FlowModel(16, architecture='conv')
  with pytest.raises(ValueError, match='`architecture` must be one of'):
    training.FlowModel(16, architecture='vae')
  with pytest.raises(ValueError, match='is not conditional'):
    training.FlowModel(16, architecture='maf', num_classes=3)


def _digits_config(model, **overrides):
  kw = dict(dataset='digits', model=model, blocks=2, num_train=512,
            num_test=128, batch_size=64, epochs=1, steps_per_epoch=30,
            learning_rate=3e-3, eval_batch_size=128, eval_rtol=1e-4,
            eval_atol=1e-4, base_scale=1.0, solver='rk4', num_steps=2,
            trace='hutchinson', jit_compile=False, eval_trace='hutchinson')
  kw.update(hidden=(8,) if model in ('conv', 'multiscale', 'glow')
            else (64,))
  kw.update(overrides)
  return training.TrainConfig(**kw)


@pytest.mark.parametrize('model', ['multiscale', 'conv', 'realnvp', 'maf',
                                   'glow'])
@pytest.mark.matrix
def test_image_models_train_through_the_trainer(model):
  trainer = training.Trainer(_digits_config(model))
  before = trainer.evaluate()['nll']
  history = trainer.fit(progress=False)
  after = history[-1]['test_nll']
  # 30 steps must beat the untrained model by a margin a broken gradient
  # (or a log-det with the wrong sign) would not reach.
  assert after < before - 5., (before, after)
  # Bits per dimension of the 17-level pixels (dequantised onto [-2, 2]:
  # bins 4/17 wide), written out rather than through `bits_per_dim`.
  assert history[-1]['test_bits_per_dim'] == pytest.approx(
      (after - 64 * math.log(4. / 17.)) / (64 * math.log(2.)))
  samples = trainer.sample(3)
  assert samples.shape == (3, 64) and np.all(np.isfinite(samples))
  assert trainer.num_traces == 1


@pytest.mark.slow
def test_flow_matching_trains_conv_dynamics():
  config = _digits_config('conv', objective='flow-matching', epochs=2,
                          steps_per_epoch=100, learning_rate=1e-2)
  trainer = training.Trainer(config)
  before = trainer.evaluate()['nll']
  history = trainer.fit(progress=False)
  assert history[-1]['train_loss'] < history[0]['train_loss']
  assert history[-1]['test_nll'] < before - 5., (before, history)


@pytest.mark.slow
def test_cli_trains_mnist_multiscale_and_writes_the_grids(tmp_path):
  out = str(tmp_path / 'run')
  res = run_cli('train', '--dataset', 'mnist', '--model', 'multiscale',
                '--levels', '2', '--blocks', '1', '--hidden', '4',
                '--num-train', '64', '--num-test', '32', '--batch-size', '32',
                '--epochs', '1', '--solver', 'rk4', '--num-steps', '2',
                '--trace', 'hutchinson', '--logit-alpha', '0.05',
                '--eval-batch-size', '32', '--eval-rtol', '1e-3',
                '--eval-atol', '1e-3', '--no-progress', '--out', out)
  assert res.returncode == 0, res.stderr
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  last = metrics['epochs'][-1]
  # bits/dim of the discrete images: the NLL plus 784 ln(256) nats. (That
  # the models learn is tested on digits above; two steps barely move.)
  assert np.isfinite(last['test_nll'])
  assert last['test_bits_per_dim'] == pytest.approx(
      (last['test_nll'] + 784 * math.log(256.)) / (784 * math.log(2.)))
  assert metrics['config']['model'] == 'multiscale'
  for png in ('samples.png', 'data.png', 'curves.png'):
    assert os.path.getsize(os.path.join(out, png)) > 5000, png


@pytest.mark.slow
def test_image_models_export_saved_models_that_load_without_tfp(tmp_path):
  """Each image model's SavedModel loads with TensorFlow alone and gives the
  in-memory evaluation flow's log-densities (Hutchinson's with the export's
  fixed probes for the FFJORD model) and deterministic samples."""
  kinds = ['multiscale', 'realnvp', 'maf', 'glow']
  points = None
  expected = {}
  for kind in kinds:
    trainer = training.Trainer(_digits_config(kind, steps_per_epoch=5))
    trainer.fit(progress=False)
    training.export_saved_model(trainer, str(tmp_path / kind))
    points = trainer.data.test[:20]
    kwargs = trainer.model.bijector_kwargs(
        None, training.EXPORT_SEED if trainer.model.is_ffjord else None)
    # A static batch: tfb.Glow cannot take an unknown one in a graph.
    expected[kind] = tf.function(
        lambda x, t=trainer, kw=kwargs: t.eval_flow.log_prob(
            x, bijector_kwargs=kw))(tf.constant(points)).numpy()
  np.save(tmp_path / 'x.npy', points)
  code = f'''
import json, sys
import numpy as np
import tensorflow as tf
x = np.load({str(tmp_path / 'x.npy')!r})
out = {{}}
for kind in {kinds!r}:
  m = tf.saved_model.load({str(tmp_path)!r} + '/' + kind)
  lp = m.log_prob(x)['log_prob'].numpy()
  again = m.signatures['log_prob'](x=tf.constant(x))['log_prob'].numpy()
  s1 = m.sample(tf.constant(5), tf.constant([3, 4]))['samples'].numpy()
  s2 = m.sample(tf.constant(5), tf.constant([3, 4]))['samples'].numpy()
  s3 = m.sample(tf.constant(7), tf.constant([5, 6]))['samples'].numpy()
  out[kind] = dict(lp=lp.tolist(), same_lp=bool(np.array_equal(lp, again)),
                   same_samples=bool(np.array_equal(s1, s2)),
                   shapes=[s1.shape, s3.shape],
                   finite=bool(np.all(np.isfinite(s3))))
out['modules'] = ['tfp_ffjord' in sys.modules,
                  'tensorflow_probability' in sys.modules]
print(json.dumps(out))
'''
  res = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=600,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out.pop('modules') == [False, False]
  for kind in kinds:
    got = out[kind]
    assert got['same_lp'] and got['same_samples'], kind
    assert got['shapes'] == [[5, 64], [7, 64]] and got['finite'], kind
    np.testing.assert_allclose(got['lp'], expected[kind],
                               rtol=SAVED_MODEL_RTOL, err_msg=kind)
