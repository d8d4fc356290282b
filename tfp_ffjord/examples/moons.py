"""Trains the seed moons model (TFP's FFJORD colab) and writes metrics and plots.

The model and data are the colab's: `make_moons(8192, noise=.06)`, batches of
256, 4 stacked FFJORD blocks with MLP 8-8 tanh dynamics (time concatenated),
base `MultivariateNormalDiag(0, 0.8)`, Adam(1e-2), exact trace. What differs:
our XLA-compiled solver (see `--solver`), a cosine learning-rate decay
(`--lr-schedule constant` gives the colab's), a held-out test set evaluated
every epoch with a tight tolerance, and the outputs below.

Writes to `--out`:
  metrics.json         per-epoch train loss, test NLL (nats), NFE, wall time,
                       and the final test NLL and its gap to the data entropy
  panels_first.png     the colab's 4-panel figure before training
  panels_last.png      the same after training
  density.png          the learned density (exact log_prob on a grid)

Usage:
  python -m tfp_ffjord.examples.moons --out runs/moons [--epochs 40]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import sklearn.datasets  # noqa: E402
import sonnet as snt  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tqdm  # noqa: E402

import tfp_ffjord  # noqa: E402
from tfp_ffjord import ode  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions

# Differential entropy of make_moons(noise=0.06), in nats: the best NLL any
# model can reach on this data (Monte Carlo estimate, +-0.005).
MOONS_ENTROPY = 0.477

SOLVERS = {
    'tsit5': lambda a: ode.Tsit5(rtol=a.rtol, atol=a.atol,
                                 gradient=a.gradient),
    'dopri5': lambda a: ode.DormandPrince(rtol=a.rtol, atol=a.atol,
                                          gradient=a.gradient),
    'rk4': lambda a: ode.RK4(num_steps=a.num_steps, gradient=a.gradient),
}


def build_flow(blocks, solve_fn, trace_fn):
  base = tfd.MultivariateNormalDiag(loc=[0., 0.], scale_diag=[.8, .8])
  chain = tfb.Chain([
      tfp_ffjord.FFJORD(b, ode_solve_fn=solve_fn, trace_augmentation_fn=trace_fn)
      for b in blocks][::-1])
  return tfd.TransformedDistribution(base, chain), chain


def make_grid(xmin, xmax, ymin, ymax, gridlines, pts):
  """The colab's grid of lines, as points."""
  xpts, ypts = np.linspace(xmin, xmax, pts), np.linspace(ymin, ymax, pts)
  xgrid, ygrid = np.linspace(xmin, xmax, gridlines), np.linspace(
      ymin, ymax, gridlines)
  xlines = np.stack([a.ravel() for a in np.meshgrid(xpts, ygrid)])
  ylines = np.stack([a.ravel() for a in np.meshgrid(xgrid, ypts)])
  return np.concatenate([xlines, ylines], 1).T.astype(np.float32)


def plot_panels(path, grid, base_samples, mapped_grid, samples, data, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
  axes[0].scatter(*grid.T, s=2, c='k', label='grid')
  axes[0].scatter(*base_samples.T, s=2, c='b', alpha=.3, label='samples')
  axes[0].set_title('base: grid and samples')
  axes[1].scatter(*mapped_grid.T, s=2, c='k', label='ode(grid)')
  axes[1].scatter(*samples.T, s=2, c='b', alpha=.3, label='ode(samples)')
  axes[1].set_title('mapped: ode(grid), ode(samples)')
  extent = [[-1.5, 2.5], [-0.75, 1.25]]
  axes[2].hist2d(*samples.T, bins=80, range=extent, density=True)
  axes[2].set_title('density of model samples')
  axes[3].hist2d(*data.T, bins=80, range=extent, density=True)
  axes[3].set_title('density of data')
  for ax in axes[:2]:
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_density(path, log_prob_fn):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  xs, ys = np.linspace(-1.5, 2.5, 120), np.linspace(-0.9, 1.4, 80)
  xx, yy = np.meshgrid(xs, ys)
  pts = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
  dens = np.exp(log_prob_fn(pts)).reshape(xx.shape)
  fig, ax = plt.subplots(figsize=(7, 4))
  mesh = ax.pcolormesh(xx, yy, dens, shading='auto')
  fig.colorbar(mesh, ax=ax, label='density')
  ax.set_title('learned density (exact log_prob)')
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description='Train the seed moons FFJORD model; write metrics and plots.')
  p.add_argument('--out', default='runs/moons', help='output directory')
  p.add_argument('--epochs', type=int, default=40)
  p.add_argument('--batch-size', type=int, default=256)
  p.add_argument('--dataset-size', type=int, default=8192)
  p.add_argument('--test-size', type=int, default=2048)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--lr-schedule', choices=['cosine', 'constant'],
                 default='cosine',
                 help='cosine: decay the learning rate to 1%% of --lr over '
                 'the epochs (default); constant: the colab\'s schedule')
  p.add_argument('--solver', choices=sorted(SOLVERS), default='tsit5')
  p.add_argument('--rtol', type=float, default=1e-3)
  p.add_argument('--atol', type=float, default=1e-5)
  p.add_argument('--num-steps', type=int, default=8, help='for --solver rk4')
  p.add_argument('--gradient', choices=['adjoint', 'backprop'],
                 default='backprop')
  p.add_argument('--no-jit', action='store_true', help='disable XLA')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  for name in ('epochs', 'batch_size', 'dataset_size', 'test_size',
               'num_steps'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be a positive integer')
  return args


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  tf.random.set_seed(args.seed)
  train = sklearn.datasets.make_moons(args.dataset_size, noise=.06,
                                      random_state=args.seed)[0]
  test = sklearn.datasets.make_moons(args.test_size, noise=.06,
                                     random_state=args.seed + 1)[0]
  train, test = train.astype(np.float32), test.astype(np.float32)
  ds = (tf.data.Dataset.from_tensor_slices(train).cache()
        .shuffle(len(train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True).prefetch(2))

  blocks = [tfp_ffjord.MLPODE([8, 8], 2, name=f'mlp_ode_{i}')
            for i in range(4)]
  for block in blocks:  # Sonnet creates variables on the first call.
    block(0., tf.zeros([1, 2]))
  flow, chain = build_flow(blocks, SOLVERS[args.solver](args).solve,
                           tfp_ffjord.trace_jacobian_exact)
  eval_flow, _ = build_flow(
      blocks, ode.Tsit5(rtol=1e-5, atol=1e-5).solve,
      tfp_ffjord.trace_jacobian_exact)
  learning_rate = tf.Variable(args.lr, trainable=False, dtype=tf.float32)
  optimizer = snt.optimizers.Adam(learning_rate)
  variables = [v for b in blocks for v in b.trainable_variables]

  @tf.function(jit_compile=not args.no_jit)
  def train_step(batch):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(flow.log_prob(batch))
    grads = tape.gradient(loss, variables)
    optimizer.apply(grads, variables)
    nfe = tf.add_n([b.last_diagnostics.num_ode_fn_evaluations
                    for b in chain.bijectors])
    return loss, nfe

  @tf.function(jit_compile=not args.no_jit)
  def test_nll(x):
    return -tf.reduce_mean(eval_flow.log_prob(x))

  @tf.function(jit_compile=not args.no_jit)
  def samples_and_grid(n, grid):
    base = flow.distribution.sample(n, seed=(args.seed, 1))
    return base, chain.forward(base), chain.forward(grid)

  grid = make_grid(-3, 3, -3, 3, 4, 100)

  def panels(name, title):
    base, samples, mapped = samples_and_grid(len(train), grid)
    plot_panels(os.path.join(args.out, name), grid, base.numpy(),
                mapped.numpy(), samples.numpy(), train, title)

  panels('panels_first.png', 'before training')
  history = []
  start = time.perf_counter()
  bar = tqdm.trange(args.epochs, desc='moons', disable=None)
  for epoch in bar:
    if args.lr_schedule == 'cosine':
      progress = epoch / max(args.epochs - 1, 1)
      learning_rate.assign(args.lr * (0.01 + 0.99 * 0.5 * (
          1 + np.cos(np.pi * progress))))
    losses, nfes = [], []
    for batch in ds:
      loss, nfe = train_step(batch)
      losses.append(float(loss))
      nfes.append(int(nfe))
    if not np.isfinite(losses[-1]):
      print(f'error: the training loss became {losses[-1]} at epoch '
            f'{epoch + 1}', file=sys.stderr)
      return 1
    nll = float(test_nll(test))
    history.append(dict(epoch=epoch + 1, learning_rate=float(learning_rate),
                        train_loss=float(np.mean(losses)),
                        test_nll=nll, nfe_per_step=float(np.mean(nfes)),
                        wall_time=time.perf_counter() - start))
    bar.set_postfix(loss=f'{np.mean(losses):.3f}', test_nll=f'{nll:.3f}',
                    nfe=f'{np.mean(nfes):.0f}')
  panels('panels_last.png', f'after {args.epochs} epochs')
  plot_density(os.path.join(args.out, 'density.png'),
               lambda p: tf.function(eval_flow.log_prob)(p).numpy())
  final = history[-1]['test_nll']
  metrics = dict(
      config=vars(args), epochs=history, final_test_nll=final,
      data_entropy=MOONS_ENTROPY, gap_to_entropy=final - MOONS_ENTROPY,
      total_wall_time=time.perf_counter() - start)
  with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  print(f'final test NLL {final:.4f} nats (data entropy {MOONS_ENTROPY}, gap '
        f'{final - MOONS_ENTROPY:.4f}); wrote {args.out}/metrics.json and '
        'PNGs')
  return 0


if __name__ == '__main__':
  sys.exit(main())
