"""The figures of a training run, chosen by what the data is.

2-D data: the 4-panel figure of TFP's colab (`panels_<tag>.png`), the
density heat map and trajectories; 1-D: the learned (and, where known, the
true) pdf; image data: samples; any data: loss/NLL curves.
"""

import os
from typing import List, Optional

import numpy as np
import tensorflow as tf

from tfp_ffjord import plotting

__all__ = ['write_figures', 'trajectories']


def trajectories(chain, base_points, num_times: int = 10, **kwargs):
  """Points moving from the base through every block of `chain`:
  `[1 + blocks * (num_times - 1), N, D]`.

  One `FFJORD.trajectory` solve per block (with the block's own solver), in
  the forward order; `kwargs` go to every block (e.g. the label context).
  """
  z = tf.convert_to_tensor(base_points)
  paths = [z[tf.newaxis]]
  for block in reversed(chain.bijectors):   # forward: the last block first
    _, states, _ = block.trajectory(z, num_times=num_times, **kwargs)
    paths.append(states[1:])
    z = states[-1]
  return tf.concat(paths, 0)


def write_figures(trainer, out_dir: Optional[str] = None, tag: str = 'last',
                  seed: int = 0) -> List[str]:
  """Writes the figures that apply to `trainer`'s data; their paths."""
  data = trainer.data
  out_dir = out_dir or trainer.out_dir
  last = tag == 'last'
  written = []

  def path(name):
    written.append(os.path.join(out_dir, name))
    return written[-1]

  if data.dim == 2:
    grid = plotting.grid_lines()
    n = len(data.train)
    labels = grid_labels = None
    if trainer.model.num_classes:
      labels = data.train_labels[:n]
      grid_labels = np.zeros([len(grid)], np.int32)
    base = trainer.model.base_distribution().sample(
        n, seed=(seed, 2)).numpy()
    samples = trainer.forward(base, labels)
    mapped = trainer.forward(grid, grid_labels)
    plotting.plot_panels(path(f'panels_{tag}.png'), grid, base, mapped,
                         samples, data.train,
                         title=f'{data.name}, epoch {trainer.epochs_done}')
    if last:
      plotting.plot_density(path('density.png'), trainer.marginal_log_prob,
                            plotting.bounds(data.train))
      kwargs = trainer.model.bijector_kwargs(
          None if labels is None else labels[:300]).get('ffjord', {})
      paths = trajectories(trainer.eval_chain, base[:300], num_times=8,
                           **kwargs).numpy()
      plotting.plot_trajectories(path('trajectories.png'), paths, data.train)
  elif data.dim == 1 and last:
    lo, hi = np.percentile(data.train, [0.1, 99.9])
    pad = 0.3 * (hi - lo)
    xs = np.linspace(lo - pad, hi + pad, 400).astype(np.float32)[:, None]
    learned = np.exp(trainer.log_prob(xs))
    true = (None if data.log_density is None
            else np.exp(data.log_density(xs)))
    plotting.plot_pdf_1d(path('pdf.png'), xs[:, 0], learned, true, data.train)
  elif data.image_shape is not None and last:
    images = trainer.sample(40, seed=seed)
    plotting.plot_image_samples(
        path('samples.png'), images, data.image_shape,
        title=f'{data.name}: samples of the model ({trainer.config.model})')
    plotting.plot_image_samples(path('data.png'), data.test[:40],
                                data.image_shape,
                                title=f'{data.name}: held-out data')
  if trainer.history and last:
    plotting.plot_curves(path('curves.png'), trainer.history, data.entropy)
  return written
