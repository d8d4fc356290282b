"""TFP's FFJORD colab, unchanged except `tfb.FFJORD` -> `tfp_ffjord.FFJORD`.

The code below is the colab's (seeds 000/001), run for a few steps on a small
dataset with 2 of its 4 stacked blocks (the constants below); only the
bijector class is swapped.
"""

import numpy as np
import pytest
import sklearn.datasets as skd
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_ffjord

tfb = tfp.bijectors
tfd = tfp.distributions

DATASET_SIZE = 1024      # colab: 1024 * 8
BATCH_SIZE = 256
NUM_STEPS = 4            # colab: 40 epochs of 32 steps
# colab: 4. The first train_step traces TFP's DormandPrince and its adjoint
# through every block, twice (Adam creates its slots in the first call):
# ~97 s for 4 blocks on 2 cores, half that for 2.
NUM_BLOCKS = 2


class MLP_ODE(snt.Module):  # pylint: disable=invalid-name
  """Multi-layer NN ode_fn (verbatim from the colab)."""

  def __init__(self, num_hidden, num_layers, num_output, name='mlp_ode'):
    super(MLP_ODE, self).__init__(name=name)
    self._num_hidden = num_hidden
    self._num_output = num_output
    self._num_layers = num_layers
    self._modules = []
    for _ in range(self._num_layers - 1):
      self._modules.append(snt.Linear(self._num_hidden))
      self._modules.append(tf.math.tanh)
    self._modules.append(snt.Linear(self._num_output))
    self._model = snt.Sequential(self._modules)

  def __call__(self, t, inputs):
    inputs = tf.concat([tf.broadcast_to(t, inputs.shape), inputs], -1)
    return self._model(inputs)


@pytest.mark.slow
def test_seed_colab_runs_with_tfp_ffjord_swapped_in():
  moons = skd.make_moons(n_samples=DATASET_SIZE, noise=.06, random_state=0)[0]
  moons_ds = tf.data.Dataset.from_tensor_slices(moons.astype(np.float32))
  moons_ds = moons_ds.prefetch(tf.data.experimental.AUTOTUNE)
  moons_ds = moons_ds.cache()
  moons_ds = moons_ds.shuffle(DATASET_SIZE, seed=0)
  moons_ds = moons_ds.batch(BATCH_SIZE)

  base_loc = np.array([0.0, 0.0]).astype(np.float32)
  base_sigma = np.array([0.8, 0.8]).astype(np.float32)
  base_distribution = tfd.MultivariateNormalDiag(base_loc, base_sigma)

  LR = 1e-2  # pylint: disable=invalid-name
  STACKED_FFJORDS = NUM_BLOCKS  # pylint: disable=invalid-name
  NUM_HIDDEN = 8  # pylint: disable=invalid-name
  NUM_LAYERS = 3  # pylint: disable=invalid-name
  NUM_OUTPUT = 2  # pylint: disable=invalid-name

  solver = tfp.math.ode.DormandPrince(atol=1e-5)
  ode_solve_fn = solver.solve
  trace_augmentation_fn = tfb.ffjord.trace_jacobian_exact

  bijectors = []
  for _ in range(STACKED_FFJORDS):
    mlp_model = MLP_ODE(NUM_HIDDEN, NUM_LAYERS, NUM_OUTPUT)
    next_ffjord = tfp_ffjord.FFJORD(
        state_time_derivative_fn=mlp_model, ode_solve_fn=ode_solve_fn,
        trace_augmentation_fn=trace_augmentation_fn)
    bijectors.append(next_ffjord)

  stacked_ffjord = tfb.Chain(bijectors[::-1])
  transformed_distribution = tfd.TransformedDistribution(
      distribution=base_distribution, bijector=stacked_ffjord)

  @tf.function
  def train_step(optimizer, target_sample):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(transformed_distribution.log_prob(target_sample))
    variables = tape.watched_variables()
    gradients = tape.gradient(loss, variables)
    optimizer.apply(gradients, variables)
    return loss

  @tf.function
  def get_samples():
    base_distribution_samples = base_distribution.sample(DATASET_SIZE)
    transformed_samples = transformed_distribution.sample(DATASET_SIZE)
    return base_distribution_samples, transformed_samples

  learning_rate = tf.Variable(LR, trainable=False)
  optimizer = snt.optimizers.Adam(learning_rate)
  batches = list(moons_ds)
  losses = [float(train_step(optimizer, batches[i % len(batches)]))
            for i in range(NUM_STEPS)]
  base_samples, transformed_samples = get_samples()
  assert transformed_samples.shape == (DATASET_SIZE, 2)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses
  # Same model and data through tfb.FFJORD gives the same log-likelihood.
  reference = tfd.TransformedDistribution(base_distribution, tfb.Chain([
      tfb.FFJORD(b.state_time_derivative_fn, ode_solve_fn=ode_solve_fn,
                 trace_augmentation_fn=trace_augmentation_fn)
      for b in bijectors][::-1]))
  x = tf.constant(moons[:64], tf.float32)
  np.testing.assert_allclose(transformed_distribution.log_prob(x).numpy(),
                             reference.log_prob(x).numpy(), atol=1e-3)
  del base_samples
