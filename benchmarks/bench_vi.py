"""Variational inference: FFJORD against TFP's surrogates at equal wall time.

For each `inference_gym` target of `tfp_ffjord.registry.VI_TARGETS` and each
surrogate family (FFJORD; TFP's mean-field and full-covariance normals; an
IAF of two `tfb.MaskedAutoregressiveFlow` blocks), one after the other in
one process: Adam (learning rate 1e-2, 64 samples per step, seed 0) for
`--seconds` of wall time (the first step's tracing and XLA compilation
included), then the ELBO over 4,096 draws and the standardised errors of
the posterior mean and standard deviation against the target's ground
truth (`max over coordinates of |estimate - truth| / truth std`).

Usage:
  python benchmarks/bench_vi.py [--seconds 60] [--targets banana funnel ...]
      [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from tfp_ffjord import registry  # noqa: E402
from tfp_ffjord import vi  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_training_step import write_section  # noqa: E402

SURROGATES = ('ffjord', 'mean-field', 'full-covariance', 'iaf')


def _fmt(value, digits=3):
  return '–' if value is None else f'{value:.{digits}f}'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seconds', type=float, default=60.,
                      help='wall time per target and surrogate')
  parser.add_argument('--targets', nargs='+', default=list(registry.VI_TARGETS),
                      choices=list(registry.VI_TARGETS))
  parser.add_argument('--surrogates', nargs='+', default=list(SURROGATES),
                      choices=list(SURROGATES))
  parser.add_argument('--json', default=None, help='also write raw results')
  parser.add_argument('--from-json', default=None,
                      help='write the table of raw results saved by --json '
                      '(no training)')
  parser.add_argument('--out', default=None, help='results file to update')
  args = parser.parse_args(argv)

  rows = []
  if args.from_json:
    with open(args.from_json) as f:
      rows = json.load(f)
    args.targets = []
  for target in args.targets:
    for surrogate in args.surrogates:
      m = vi.run(target, surrogate, num_steps=10**7, max_seconds=args.seconds,
                 verbose=True)
      print(json.dumps({k: v for k, v in m.items() if k != 'config'}),
            flush=True)
      rows.append(m)
  if args.json and not args.from_json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)

  seconds = rows[0]['config']['max_seconds'] if rows else args.seconds
  targets = list(dict.fromkeys(m['target'] for m in rows))
  lines = [
      '## Variational inference: surrogates at equal wall time',
      '',
      f'`python benchmarks/bench_vi.py --seconds {seconds:g} --targets '
      f'{" ".join(targets)}` (2-core '
      'CPU; each surrogate trained by `tfp_ffjord.vi.fit` for the same wall '
      'time, compilation included; Adam 1e-2, 64 samples per step). ELBO over '
      '4,096 draws (± its standard error); errors are the largest '
      'standardised error over coordinates, `|estimate - truth| / truth std`, '
      "against inference_gym's ground truth. FFJORD: 2 blocks, MLP 32-32 "
      'tanh, dopri5 (rtol 1e-3, atol 1e-6, backprop), exact trace up to 16 '
      'dimensions, Hutchinson above.',
      '',
      '| target | surrogate | steps | first step (s) | ELBO | mean error '
      '| std error |',
      '|---|---|---:|---:|---:|---:|---:|',
  ]
  for m in rows:
    lines.append(
        f'| {m["target"]} | {m["surrogate"]} | {m["steps"]} | '
        f'{m["first_step_seconds"]:.1f} | {m["elbo"]:.3f} ± '
        f'{m["elbo_stderr"]:.3f} | {_fmt(m["mean_error"])} | '
        f'{_fmt(m["std_error"])} |')
  section = '\n'.join(lines) + '\n'
  print(section)
  if args.out:
    write_section(args.out, section)


if __name__ == '__main__':
  main()
