"""Datasets: shapes, seeds, splits, pipelines and entropies."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tfp_ffjord import datasets

# Monte Carlo estimates of -E[log p]: their standard error at this sample
# size is ~0.004 nats; the tolerance is 4 standard errors.
ENTROPY_MC_SAMPLES = 40_000
ENTROPY_TOLERANCE = 0.016
GENERATED = [n for n in datasets.NAMES if n not in datasets.IMAGE_DATASETS]


@pytest.mark.parametrize('name', datasets.NAMES)
def test_shapes_dtypes_and_default_sizes(name):
  data = datasets.load(name, seed=0)
  dim = {'gaussian1d': 1, 'digits': 64, 'mnist': 784}.get(name, 2)
  assert data.dim == dim
  assert data.train.dtype == np.float32 and data.test.dtype == np.float32
  default = datasets.DEFAULT_SIZES.get(name, datasets.DEFAULT_SIZE)
  assert data.train.shape == (default[0], dim)
  assert data.test.shape == (default[1], dim)
  assert np.all(np.isfinite(data.train)) and np.all(np.isfinite(data.test))


@pytest.mark.parametrize('name', datasets.NAMES)
def test_seed_reproduces_and_changes_the_data(name):
  a = datasets.load(name, num_train=200, num_test=50, seed=3)
  b = datasets.load(name, num_train=200, num_test=50, seed=3)
  c = datasets.load(name, num_train=200, num_test=50, seed=4)
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.test, b.test)
  assert not np.array_equal(a.train, c.train)
  # Train and test are different draws.
  assert not np.array_equal(a.train[:50], a.test)


def test_moons_matches_the_seed_configuration():
  data = datasets.load('moons')
  assert data.train.shape == (8192, 2)
  # Two unit half-circles blurred by noise 0.06.
  assert -1.4 < data.train[:, 0].min() and data.train[:, 0].max() < 2.4
  assert set(np.unique(data.train_labels)) == {0, 1}


def test_gaussian1d_is_the_diffeqflux_target():
  x = datasets.sample('gaussian1d', 100_000, seed=1)
  assert abs(x.mean() - 6.0) < 0.01 and abs(x.std() - 0.7) < 0.01


def test_digits_are_dequantised_into_bins():
  data = datasets.load('digits')
  width = data.bin_width
  assert width == pytest.approx(4. / 17.)
  assert data.train.min() >= -2. and data.train.max() <= 2.
  # Each value sits inside the bin of an integer pixel value 0..16.
  levels = np.floor((data.train + 2.) / width)
  assert levels.min() >= 0 and levels.max() <= 16
  # bits/dim: a density of width^-D (all mass in one bin) has continuous NLL
  # D ln(width) nats and codes the discrete data in 0 bits; the uniform
  # density over [-2, 2]^64 (4^-64) costs log2(17) bits per dimension.
  assert data.bits_per_dim(64 * math.log(width)) == pytest.approx(0.)
  assert data.bits_per_dim(64 * math.log(4.)) == pytest.approx(
      math.log2(17.))


@pytest.mark.parametrize('name,log_density', [
    ('moons', datasets.moons_log_density),
    ('circles', datasets.circles_log_density),
])
@pytest.mark.matrix
def test_entropy_matches_monte_carlo_of_the_exact_density(name, log_density):
  x = datasets.sample(name, ENTROPY_MC_SAMPLES, seed=123)
  estimate = -np.mean(np.concatenate(
      [log_density(x[i:i + 4000]) for i in range(0, len(x), 4000)]))
  assert datasets.ENTROPY[name] == pytest.approx(estimate,
                                                 abs=ENTROPY_TOLERANCE)


@pytest.mark.slow
def test_moons_density_integrates_to_one():
  xs = np.linspace(-2, 3, 400)
  ys = np.linspace(-1.5, 2, 300)
  xx, yy = np.meshgrid(xs, ys)
  pts = np.stack([xx.ravel(), yy.ravel()], 1)
  dens = np.exp(datasets.moons_log_density(pts, num_nodes=500))
  cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
  assert dens.sum() * cell == pytest.approx(1., abs=2e-3)


@pytest.mark.parametrize('name', ['8gaussians', 'checkerboard',
                                  'gaussian1d'])
def test_closed_form_entropies_match_monte_carlo(name):
  x = datasets.sample(name, ENTROPY_MC_SAMPLES, seed=7).astype(np.float64)
  if name == 'gaussian1d':
    lp = (-0.5 * ((x[:, 0] - 6.) / .7) ** 2
          - math.log(.7 * math.sqrt(2 * math.pi)))
  elif name == 'checkerboard':
    # Uniform on 8 squares of side 2: check the support (black squares
    # only, inside [-4, 4]^2) and that each square gets 1/8 of the points;
    # the density there is 1/32.
    assert np.all(np.abs(x) <= 4.)
    cells = np.floor(x / 2.).astype(int)
    assert np.all(cells.sum(1) % 2 == 0)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8
    np.testing.assert_allclose(counts / len(x), 1 / 8, atol=0.01)
    lp = np.full(len(x), -math.log(32.))
  else:
    sigma = datasets.EIGHT_GAUSSIANS_STD / math.sqrt(2.)
    radius = datasets.EIGHT_GAUSSIANS_RADIUS / math.sqrt(2.)
    angles = np.arange(8) * np.pi / 4
    centers = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    sq = ((x[:, None] - centers[None]) ** 2).sum(-1)
    comp = -sq / (2 * sigma ** 2) - math.log(2 * math.pi * sigma ** 2)
    lp = np.log(np.exp(comp).mean(1))
  assert datasets.ENTROPY[name] == pytest.approx(-lp.mean(),
                                                 abs=ENTROPY_TOLERANCE)


def test_pipelines_have_fixed_batches_and_reshuffle():
  data = datasets.load('moons', num_train=1000, num_test=300)
  ds = data.train_dataset(256, seed=0)
  batches = list(ds)
  assert len(batches) == 3 and all(b.shape == (256, 2) for b in batches)
  assert ds.element_spec.shape == tf.TensorShape([256, 2])
  again = list(data.train_dataset(256, seed=0))
  np.testing.assert_array_equal(batches[0].numpy(), again[0].numpy())


@pytest.mark.parametrize('call,match', [
    (lambda: datasets.load('cifar10'), 'Unknown dataset'),
    (lambda: datasets.load('mnist', num_train=4500, num_test=1000),
     'mnist has 5000'),
    (lambda: datasets.sample('mnist', 10), 'fixed set'),
    (lambda: datasets.load('moons', num_train=0), 'num_train'),
    (lambda: datasets.load('digits', num_train=1700, num_test=200),
     'digits has 1797'),
    (lambda: datasets.sample('digits', 10), 'fixed set'),
    (lambda: datasets.load('moons', num_train=100).train_dataset(500),
     'larger than'),
    (lambda: datasets.load('moons', num_train=100).train_dataset(0),
     'batch_size'),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
