"""Figures for trained flows (matplotlib only, written to files).

Every function takes NumPy arrays (or a NumPy-returning callable) and a path,
draws one figure on a bare matplotlib `Figure` (no pyplot, no backend chosen
or changed) and writes it, so it can run in a training loop, a test, a
headless job or a notebook whose own figures keep displaying.
"""

import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

__all__ = ['grid_lines', 'plot_panels', 'plot_density', 'plot_curves',
           'plot_trajectories', 'plot_pdf_1d', 'plot_image_samples',
           'plot_posterior_2d', 'plot_marginals', 'plot_elbo', 'bounds',
           'dependent_pairs', 'plot_pairs']


def _subplots(*args, figsize=None, **kwargs):
  """`(figure, axes)` as `pyplot.subplots` gives, on a bare
  `matplotlib.figure.Figure`: no backend is chosen or changed (a notebook's
  inline backend keeps showing its own figures) and nothing is kept open."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(*args, **kwargs)


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)


def bounds(points: np.ndarray, margin: float = 0.1):
  """`[(xmin, xmax), (ymin, ymax)]` around 2-D points, with a margin.

  An axis the points do not spread along (a single point, say) gets the
  other axis' width, or 2 if neither spreads.

  Args:
    points: `[N, 2]` points.
    margin: the padding on each side, a fraction of the width.

  Returns:
    `[(xmin, xmax), (ymin, ymax)]` (from the 0.5th to the 99.5th
    percentile, padded).

  Examples:
    >>> bounds(np.array([[0., 0.], [1., 2.]]), margin=0.)
    [(0.005, 0.995), (0.01, 1.99)]
  """
  lo, hi = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5,
                                                               axis=0)
  width = hi - lo
  fallback = float(np.max(width)) if np.max(width) > 0 else 2.
  flat = ~(width > 0)
  lo = np.where(flat, lo - fallback / 2, lo)
  hi = np.where(flat, hi + fallback / 2, hi)
  pad = margin * (hi - lo)
  return [(float(lo[i] - pad[i]), float(hi[i] + pad[i])) for i in range(2)]


def grid_lines(xlim=(-3., 3.), ylim=(-3., 3.), lines: int = 4,
               points_per_line: int = 100) -> np.ndarray:
  """Points along a few horizontal and vertical lines: `[N, 2]` float32.

  Mapped through a flow, they show how it bends space (the seed colab's grid).

  Args:
    xlim: the box's x range.
    ylim: the box's y range.
    lines: the number of lines in each direction.
    points_per_line: the points along each line.

  Returns:
    `[2 * lines * points_per_line, 2]` float32 points.

  Examples:
    >>> grid_lines(lines=2, points_per_line=3).shape
    (12, 2)
  """
  xs, ys = np.linspace(*xlim, points_per_line), np.linspace(*ylim,
                                                            points_per_line)
  x_at, y_at = np.linspace(*xlim, lines), np.linspace(*ylim, lines)
  horizontal = np.stack(np.meshgrid(xs, y_at), -1).reshape(-1, 2)
  vertical = np.stack(np.meshgrid(x_at, ys), -1).reshape(-1, 2)
  return np.concatenate([horizontal, vertical]).astype(np.float32)


def plot_panels(path: str, grid: np.ndarray, base_samples: np.ndarray,
                mapped_grid: np.ndarray, samples: np.ndarray,
                data: np.ndarray, title: str = '') -> None:
  """The seed colab's 4 panels for a 2-D flow.

  1. the grid and samples of the base distribution; 2. both mapped through
  the flow; 3. a 2-D histogram of model samples; 4. the same for the data.

  Args:
    path: the PNG file to write (its directory is created).
    grid: `[N, 2]` grid points in the base space (`grid_lines`).
    base_samples: `[M, 2]` samples of the base distribution.
    mapped_grid: `grid` mapped through the flow.
    samples: `base_samples` mapped through the flow.
    data: `[K, 2]` data points.
    title: the figure's title.
  """
  fig, axes = _subplots(1, 4, figsize=(16, 4.3))
  axes[0].scatter(*grid.T, s=1, c='k', label='grid')
  axes[0].scatter(*base_samples.T, s=1, c='tab:blue', alpha=.3,
                  label='samples')
  axes[0].set_title('base: grid and samples')
  axes[1].scatter(*mapped_grid.T, s=1, c='k', label='flow(grid)')
  axes[1].scatter(*samples.T, s=1, c='tab:blue', alpha=.3,
                  label='flow(samples)')
  axes[1].set_title('mapped: flow(grid), flow(samples)')
  extent = bounds(data)
  axes[2].hist2d(*samples.T, bins=80, range=extent, density=True)
  axes[2].set_title('density of model samples')
  axes[3].hist2d(*data.T, bins=80, range=extent, density=True)
  axes[3].set_title('density of data')
  lim = bounds(np.concatenate([grid, base_samples]), margin=0.05)
  axes[0].set_xlim(*lim[0])
  axes[0].set_ylim(*lim[1])
  axes[1].set_xlim(*extent[0])
  axes[1].set_ylim(*extent[1])
  for ax in axes[:2]:
    ax.legend(loc='upper right', fontsize=7, markerscale=5)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def plot_density(path: str, log_prob_fn: Callable[[np.ndarray], np.ndarray],
                 extent: Sequence[Sequence[float]], resolution: int = 120,
                 title: str = 'learned density (exact log_prob)') -> None:
  """Heat map of `exp(log_prob_fn(points))` over a 2-D box.

  Args:
    path: the PNG file to write (its directory is created).
    log_prob_fn: maps `[N, 2]` float32 points to `[N]` log densities.
    extent: `[(xmin, xmax), (ymin, ymax)]`, e.g. from `bounds`.
    resolution: the grid's points per axis.
    title: the figure's title.
  """
  (x0, x1), (y0, y1) = extent
  xs = np.linspace(x0, x1, resolution)
  ys = np.linspace(y0, y1, max(int(resolution * (y1 - y0) / (x1 - x0)), 10))
  xx, yy = np.meshgrid(xs, ys)
  pts = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
  dens = np.exp(np.asarray(log_prob_fn(pts))).reshape(xx.shape)
  fig, ax = _subplots(figsize=(7, 7 * (y1 - y0) / (x1 - x0) + 0.8))
  mesh = ax.pcolormesh(xx, yy, dens, shading='auto')
  fig.colorbar(mesh, ax=ax, label='density')
  ax.set_title(title)
  ax.set_aspect('equal')
  fig.tight_layout()
  _save(fig, path)


def plot_curves(path: str, history: Sequence[Dict[str, float]],
                entropy: Optional[float] = None) -> None:
  """Training loss and held-out NLL per epoch, and NFE per step.

  Args:
    path: the PNG file to write (its directory is created).
    history: the per-epoch records of a run (`metrics.json`'s `epochs`).
    entropy: the data's entropy in nats, drawn as a line if given.
  """
  epochs = [h['epoch'] for h in history]
  fig, (ax, ax_nfe) = _subplots(1, 2, figsize=(11, 4))
  ax.plot(epochs, [h['train_loss'] for h in history], label='train loss')
  ax.plot(epochs, [h['test_nll'] for h in history], label='test NLL')
  if entropy is not None:
    ax.axhline(entropy, ls='--', c='gray', label=f'data entropy {entropy:.3f}')
  ax.set_xlabel('epoch')
  ax.set_ylabel('nats')
  ax.legend()
  ax_nfe.plot(epochs, [h['nfe_per_step'] for h in history])
  ax_nfe.set_xlabel('epoch')
  ax_nfe.set_ylabel('function evaluations per training step')
  fig.tight_layout()
  _save(fig, path)


def plot_trajectories(path: str, paths: np.ndarray,
                      data: Optional[np.ndarray] = None,
                      max_lines: int = 300) -> None:
  """Points moving along the flow: `paths` is `[T, N, 2]` (time first).

  Draws each point's path as a line, the start in blue and the end in red,
  over the data (grey) when given.

  Args:
    path: the PNG file to write (its directory is created).
    paths: `[T, N, 2]` positions, time first (`FFJORD.trajectory`).
    data: `[K, 2]` data points, or None.
    max_lines: draw at most this many paths.
  """
  fig, ax = _subplots(figsize=(7, 6))
  if data is not None:
    ax.scatter(*data.T, s=1, c='0.8')
  n = min(paths.shape[1], max_lines)
  for i in range(n):
    ax.plot(paths[:, i, 0], paths[:, i, 1], lw=.5, c='k', alpha=.35)
  ax.scatter(*paths[0, :n].T, s=4, c='tab:blue', label='base')
  ax.scatter(*paths[-1, :n].T, s=4, c='tab:red', label='data side')
  ax.legend(loc='upper right')
  ax.set_title(f'trajectories ({paths.shape[0]} times)')
  fig.tight_layout()
  _save(fig, path)


def plot_pdf_1d(path: str, xs: np.ndarray, learned: np.ndarray,
                true: Optional[np.ndarray] = None,
                data: Optional[np.ndarray] = None) -> None:
  """A 1-D learned pdf over the true pdf, and a histogram of the data.

  Args:
    path: the PNG file to write (its directory is created).
    xs: `[N]` points where the pdfs are evaluated.
    learned: the learned pdf at `xs`.
    true: the true pdf at `xs`.
    data: the training data, drawn as a histogram if given.
  """
  fig, ax = _subplots(figsize=(7, 4))
  if data is not None:
    ax.hist(np.ravel(data), bins=30, density=True, color='0.85',
            label='data')
  if true is not None:
    ax.plot(xs, true, c='k', ls='--', label='true pdf')
  ax.plot(xs, learned, c='tab:red', label='learned pdf')
  ax.legend()
  ax.set_xlabel('x')
  fig.tight_layout()
  _save(fig, path)


def plot_image_samples(path: str, images: np.ndarray, image_shape,
                       columns: int = 10, title: str = '') -> None:
  """A grid of flattened images, e.g. samples of a digits or MNIST flow.

  Single-channel images are drawn in grey, each on its own colour scale.

  Args:
    path: the PNG file to write (its directory is created).
    images: `[N, H * W * C]` images.
    image_shape: `(H, W)` or `(H, W, C)`; an int is a square side.
    columns: images per row.
    title: the figure's title.
  """
  shape = ((image_shape, image_shape) if isinstance(image_shape, int)
           else tuple(image_shape))
  if len(shape) == 3 and shape[-1] == 1:
    shape = shape[:2]
  n = len(images)
  rows = int(np.ceil(n / columns))
  fig, axes = _subplots(rows, columns, figsize=(columns, rows + .4),
                           squeeze=False)
  for i, ax in enumerate(axes.ravel()):
    ax.axis('off')
    if i < n:
      ax.imshow(np.asarray(images[i]).reshape(shape), cmap='gray_r')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def plot_posterior_2d(path: str, samples: np.ndarray,
                      reference: Optional[np.ndarray] = None,
                      title: str = ''):
  """Samples of a 2-D posterior, with exact target samples beside them.

  Args:
    path: the PNG file to write (its directory is created).
    samples: `[N, 2]` surrogate samples.
    reference: `[M, 2]` exact target samples, drawn on the same axes
      limits, or None.
    title: the figure's title.
  """
  panels = [('surrogate', samples)] + (
      [('target (exact samples)', reference)] if reference is not None else [])
  lim = bounds(np.concatenate([p for _, p in panels]))
  fig, axes = _subplots(1, len(panels), figsize=(4.5 * len(panels), 4),
                           squeeze=False)
  for ax, (label, points) in zip(axes[0], panels):
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.3)
    ax.set_xlim(*lim[0])
    ax.set_ylim(*lim[1])
    ax.set_title(label)
  fig.suptitle(title)
  _save(fig, path)


def dependent_pairs(points: np.ndarray, count: int = 3):
  """The `count` coordinate pairs of `points` that depend most on each other.

  Dependence is the largest absolute correlation between one coordinate
  and the other or its spread about its median: `|corr(x_i, x_j)|`,
  `|corr(x_i, |x_j - med_j|)|` or `|corr(|x_i - med_i|, x_j)|`. The
  spread terms catch a scale that depends on another coordinate (a
  funnel's neck), which correlation alone misses.

  Args:
    points: `[N, D]` samples, `D >= 2`.
    count: pairs to return.

  Returns:
    `[(i, j), ...]` with `i < j`, most dependent first.

  Examples:
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2000, 4))
    >>> x[:, 3] *= np.exp(x[:, 1])        # coordinate 3's scale follows 1
    >>> dependent_pairs(x, count=1)
    [(1, 3)]
  """
  points = np.asarray(points, np.float64)
  spread = np.abs(points - np.median(points, axis=0))

  def corr(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    norms = np.sqrt((a ** 2).sum(0))[:, None] * np.sqrt((b ** 2).sum(0))
    return np.abs(a.T @ b) / np.maximum(norms, 1e-300)
  score = np.maximum(corr(points, points),
                     np.maximum(corr(points, spread), corr(spread, points)))
  dim = points.shape[1]
  pairs = [(i, j) for i in range(dim) for j in range(i + 1, dim)]
  pairs.sort(key=lambda ij: -max(score[ij], score[ij[::-1]]))
  return pairs[:count]


def plot_pairs(path: str, samples: np.ndarray,
               reference: Optional[np.ndarray] = None,
               truth_mean: Optional[np.ndarray] = None,
               truth_std: Optional[np.ndarray] = None, count: int = 3,
               title: str = ''):
  """The most dependent coordinate pairs: surrogate samples over the
  target's.

  Each panel is one pair of `dependent_pairs(reference if given, else
  samples)`: the surrogate's samples over exact target samples where the
  target can sample (`reference`), or over the ground truth's mean ± 1 and
  2 standard deviations (a cross and boxes) where it cannot.

  Args:
    path: the PNG file to write (its directory is created).
    samples: `[N, D]` surrogate samples.
    reference: `[M, D]` exact target samples, or None.
    truth_mean: `[D]` ground-truth means, or None.
    truth_std: `[D]` ground-truth standard deviations, or None.
    count: panels (pairs).
    title: the figure's title.
  """
  samples = np.asarray(samples)
  pairs = dependent_pairs(samples if reference is None else reference, count)
  fig, axes = _subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4),
                        squeeze=False)
  for ax, (i, j) in zip(axes[0], pairs):
    if reference is not None:
      ax.scatter(reference[:, i], reference[:, j], s=2, alpha=0.25,
                 color='0.5', label='target (exact samples)')
    ax.scatter(samples[:, i], samples[:, j], s=2, alpha=0.3, color='C0',
               label='surrogate')
    if reference is None and truth_mean is not None and truth_std is not None:
      for k, style in ((1, '-'), (2, ':')):
        ax.add_patch(_box(truth_mean[[i, j]], k * truth_std[[i, j]], style))
      ax.plot(truth_mean[i], truth_mean[j], 'k+', markersize=12,
              label='ground truth: mean, ±1 and ±2 std')
    ax.set_xlabel(f'coordinate {i}')
    ax.set_ylabel(f'coordinate {j}')
  axes[0][0].legend(fontsize=7, markerscale=4, loc='best')
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def _box(center, half_width, style):
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  return Rectangle(center - half_width, *(2 * half_width), fill=False,
                   linestyle=style, edgecolor='k', linewidth=1)


def plot_marginals(path: str, mean: np.ndarray, std: np.ndarray,
                   truth_mean: Optional[np.ndarray] = None,
                   truth_std: Optional[np.ndarray] = None,
                   title: str = ''):
  """A surrogate's per-coordinate mean +- standard deviation.

  Args:
    path: the PNG file to write (its directory is created).
    mean: `[D]` surrogate means.
    std: `[D]` surrogate standard deviations.
    truth_mean: `[D]` ground-truth means, or None.
    truth_std: `[D]` ground-truth standard deviations, or None.
    title: the figure's title.
  """
  idx = np.arange(len(mean))
  fig, ax = _subplots(figsize=(min(14, 3 + 0.12 * len(mean)), 3.5))
  if truth_mean is not None and truth_std is not None:
    ax.errorbar(idx, truth_mean, yerr=truth_std, fmt='o', ms=3, color='k',
                label='ground truth', alpha=0.6)
  ax.errorbar(idx + 0.25, mean, yerr=std, fmt='s', ms=3, color='C1',
              label='surrogate', alpha=0.8)
  ax.set_xlabel('coordinate')
  ax.legend()
  ax.set_title(title)
  _save(fig, path)


def plot_elbo(path: str, curves: Dict[str, np.ndarray], window: int = 50,
              title: str = ''):
  """ELBO per optimizer step of one or more surrogates.

  Args:
    path: the PNG file to write (its directory is created).
    curves: a label per surrogate -> its per-step ELBO estimates.
    window: the moving average's width in steps.
    title: the figure's title.
  """
  fig, ax = _subplots(figsize=(6, 4))
  for label, elbo in curves.items():
    elbo = np.asarray(elbo, np.float64)
    w = max(1, min(window, len(elbo) // 5 or 1))
    smooth = np.convolve(elbo, np.ones(w) / w, mode='valid')
    ax.plot(np.arange(w, len(elbo) + 1), smooth, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel(f'ELBO (mean of {window} steps)')
  lo = min(np.percentile(np.asarray(c), 20) for c in curves.values())
  hi = max(np.max(np.asarray(c)) for c in curves.values())
  ax.set_ylim(lo, hi + 0.05 * (hi - lo + 1e-9))
  ax.legend()
  ax.set_title(title)
  _save(fig, path)
