"""The documentation's benchmark figures, drawn from benchmarks/RESULTS.md.

Each figure is drawn from a table a benchmark script wrote into RESULTS.md
(the section named below), so the figures always show the published
numbers:
  * bench_training_step.png: `bench_training_step.py` (first step and step
    time of every configuration against `tfb.FFJORD` + TFP's DormandPrince);
  * bench_peers.png: `bench_peers.py` (steady step against log-likelihood
    error, and first step, for tfp_ffjord, JAX/diffrax, PyTorch/torchdiffeq);
  * bench_vi.png: `bench_vi.py` (standardised errors of every surrogate on
    every target, median and range over seeds).
The bits/dim-against-time curves (`images_digits.png`, `images_mnist.png`)
are drawn by `bench_images.py` itself.

  python benchmarks/figures.py [--results benchmarks/RESULTS.md]
      [--out docs/assets]
"""

import argparse
import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

TRAINING_STEP = '## Training step, seed moons configuration'
PEERS = '## Peers: JAX/diffrax and PyTorch/torchdiffeq, same model and weights'
VI = '## Variational inference: surrogates at equal wall time'


def section_table(text, heading):
  """The first Markdown table after the line `heading` (exactly): a list of
  dicts keyed by the header cells."""
  lines = text.splitlines()
  try:
    start = lines.index(heading)
  except ValueError:
    raise ValueError(f'RESULTS.md has no section {heading!r}') from None
  rows = []
  for line in lines[start + 1:]:
    if line.startswith('## '):
      break
    if line.startswith('|'):
      rows.append([c.strip() for c in line.strip().strip('|').split('|')])
    elif rows:
      break
  if len(rows) < 3:
    raise ValueError(f'no table under {heading!r}')
  header, body = rows[0], rows[2:]
  return [dict(zip(header, row)) for row in body]


def number(cell):
  """The leading number of a cell ('0.087 [0.031, 0.116]' -> 0.087)."""
  match = re.match(r'^-?[\d.]+(e[-+]?\d+)?', cell.replace('x', ''))
  return float(match.group(0)) if match else float('nan')


def spread(cell):
  """`(median, low, high)` of 'm [lo, hi]' (a lone number: no range)."""
  values = [float(v) for v in re.findall(r'-?[\d.]+(?:e[-+]?\d+)?', cell)]
  return (values[0], values[0], values[0]) if len(values) == 1 else tuple(
      values[:3])


def training_step_figure(rows, path):
  names = [r['configuration'].replace('tfp_ffjord.', '') for r in rows]
  first = [number(r['first step (s)']) for r in rows]
  step = [number(r['step (ms)']) for r in rows]
  colours = ['tab:red' if 'reference' in n else 'tab:blue' for n in names]
  fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.5),
                           sharey=True)
  for ax, values, label in ((axes[0], first, 'first step (s), log scale'),
                            (axes[1], step, 'step (ms), log scale')):
    ax.barh(range(len(rows)), values, color=colours)
    ax.set_xscale('log')
    ax.set_xlabel(label)
    for i, v in enumerate(values):
      ax.text(v, i, f' {v:g}', va='center', fontsize=8)
  axes[0].set_yticks(range(len(rows)))
  axes[0].set_yticklabels(names, fontsize=8)
  axes[0].invert_yaxis()
  fig.suptitle("TFP's colab training step (4 blocks): tfb.FFJORD + TFP "
               'DormandPrince (red) against tfp_ffjord')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def peers_figure(rows, path):
  groups = {}
  for r in rows:
    groups.setdefault(r['implementation'], []).append(r)
  markers = {'tfp_ffjord': 'o', 'diffrax': 's', 'torchdiffeq': '^'}
  fig, (ax, bar) = plt.subplots(1, 2, figsize=(14, 5),
                                gridspec_kw={'width_ratios': [3, 2]})
  for name, members in groups.items():
    marker = next((m for k, m in markers.items() if name.startswith(k)), 'x')
    errors = [number(r['max log p error']) for r in members]
    steps = [number(r['steady step (ms)']) for r in members]
    ax.plot(errors, steps, marker=marker, label=name, ls='-' if len(
        members) > 1 else '')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('max |log p(x) error| at the initial weights')
  ax.set_ylabel('steady training step (ms)')
  ax.set_title('speed against accuracy (lower left is better)')
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.legend(fontsize=7, loc='lower right')
  names = list(groups)
  firsts = [min(number(r['first step (s)']) for r in groups[n]) for n in names]
  bar.barh(range(len(names)), firsts,
           color=['tab:blue' if n.startswith('tfp_ffjord') else 'tab:gray'
                  for n in names])
  bar.set_yticks(range(len(names)))
  bar.set_yticklabels(names, fontsize=7)
  bar.invert_yaxis()
  bar.set_xlabel('first step (s): trace, compile, run')
  for i, v in enumerate(firsts):
    bar.text(v, i, f' {v:g}', va='center', fontsize=8)
  fig.suptitle('The seed moons training step, same weights, 2-core CPU')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _target_and_floor(cell):
  """'funnel (floor 0.026 / 0.313)' -> ('funnel', (0.026, 0.313)); a
  target without a floor -> (name, None)."""
  name, _, floor = cell.partition(' (floor ')
  if not floor:
    return name, None
  mean, std = floor.rstrip(')').split(' / ')
  return name, (spread(mean)[0], spread(std)[0])


VI_PANELS = (('mean error', 'mean error (largest over coordinates)', 'lower'),
             ('std error', 'std error (largest over coordinates)', 'lower'),
             ('ESS / N', 'importance weights: ESS / N', 'higher'))


def vi_figure(rows, path):
  floors = {}
  for r in rows:
    r['surrogate'] = r['surrogate'].split(' (')[0]   # '... (Laplace start)'
    r['target'], floor = _target_and_floor(r['target'])
    if floor is not None:
      floors[r['target']] = floor
  targets = list(dict.fromkeys(r['target'] for r in rows))
  surrogates = list(dict.fromkeys(r['surrogate'] for r in rows))
  panels = [p for p in VI_PANELS if p[0] in rows[0]]
  fig, axes = plt.subplots(len(panels), 1,
                           figsize=(max(10, 1.6 * len(targets)),
                                    3.2 * len(panels)), squeeze=False)
  width = 0.8 / len(surrogates)
  for k, (ax, (column, title, better)) in enumerate(zip(axes[:, 0], panels)):
    # Exact draws' errors: below them, differences are Monte Carlo noise.
    for i, target in enumerate(targets):
      if target in floors and k < 2:
        ax.hlines(floors[target][k], i - 0.45, i + 0.45, colors='black',
                  linestyles='dashed', linewidth=1,
                  label='exact draws' if i == min(
                      targets.index(t) for t in floors) else None)
    for j, surrogate in enumerate(surrogates):
      xs, mids, lows, highs = [], [], [], []
      for i, target in enumerate(targets):
        row = next((r for r in rows if r['target'] == target
                    and r['surrogate'] == surrogate), None)
        if row is None or not re.search(r'\d', row[column]):
          continue
        mid, lo, hi = spread(row[column])
        xs.append(i + (j - (len(surrogates) - 1) / 2) * width)
        mids.append(mid)
        lows.append(mid - lo)
        highs.append(hi - mid)
      ax.bar(xs, mids, width, yerr=[lows, highs], capsize=2, label=surrogate,
             color=f'C{j}')
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(targets, fontsize=8)
    ax.set_title(f'{title}; {better} is better', fontsize=10)
  axes[0, 0].set_ylabel('|estimate - truth| / truth std')
  axes[0, 0].legend(fontsize=8, ncol=4)
  fig.suptitle('Variational inference at equal wall time: median and range '
               'over seeds (dashed: the same errors of exact draws)')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--results', default=os.path.join(HERE, 'RESULTS.md'))
  parser.add_argument('--out', default=os.path.join(HERE, '..', 'docs',
                                                    'assets'))
  args = parser.parse_args(argv)
  with open(args.results) as f:
    text = f.read()
  os.makedirs(args.out, exist_ok=True)
  written = []
  for name, heading, draw in (
      ('bench_training_step.png', TRAINING_STEP, training_step_figure),
      ('bench_peers.png', PEERS, peers_figure),
      ('bench_vi.png', VI, vi_figure)):
    path = os.path.join(args.out, name)
    draw(section_table(text, heading), path)
    written.append(path)
  for path in written:
    print(path)
  return written


if __name__ == '__main__':
  main()
