"""RNODE benchmark: regularised vs unregularised maximum-likelihood training.

Trains the seed configuration (4 FFJORD blocks, MLP 8-8 tanh, Tsit5 at
rtol 1e-3 / atol 1e-5, exact trace, 40 epochs, Adam 1e-2 with cosine decay)
with RNODE's kinetic-energy and Jacobian-Frobenius weights
`λ₁ = λ₂ = λ` for each `λ` given, on each dataset, every run a fresh
`tfp-ffjord train` process (what a user runs). Runs of one dataset follow
each other, so machine-speed drift is shared within a dataset's rows.

For each run:
  * test NLL: held-out NLL of the final model (exact trace, rtol=atol=1e-5);
  * NFE/step: ODE-function evaluations of the training forward solves
    (summed over the 4 blocks), mean over the last 5 epochs;
  * eval NFE: the same for the final held-out evaluation (tolerance 1e-5);
  * wall: total training wall time (including the per-epoch evaluation).

Usage:
  python benchmarks/bench_rnode.py [--datasets moons 8gaussians]
      [--weights 0 0.01 0.03 0.1] [--epochs 40] [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run(dataset, weight, epochs, extra, out_root):
  out = os.path.join(out_root, f'{dataset}_{weight:g}')
  cmd = [sys.executable, '-m', 'tfp_ffjord', 'train', '--dataset', dataset,
         '--epochs', str(epochs), '--kinetic-weight', str(weight),
         '--jacobian-weight', str(weight), '--out', out, '--overwrite',
         '--no-progress'] + list(extra)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  with open(os.path.join(out, 'metrics.json')) as f:
    metrics = json.load(f)
  epochs_ = metrics['epochs']
  last = epochs_[-5:]
  return dict(dataset=dataset, weight=weight,
              nll=metrics['final_test_nll'],
              nfe=sum(e['nfe_per_step'] for e in last) / len(last),
              eval_nfe=epochs_[-1]['eval_nfe'],
              wall=metrics['total_wall_time'])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--datasets', nargs='+', default=['moons', '8gaussians'])
  parser.add_argument('--weights', type=float, nargs='+',
                      default=[0., 0.01, 0.03, 0.1])
  parser.add_argument('--epochs', type=int, default=40)
  parser.add_argument('--out', default=None,
                      help='write the table as a section of this file')
  parser.add_argument('extra', nargs='*',
                      help='further `tfp-ffjord train` options (after --)')
  args = parser.parse_args(argv)
  if 0. not in args.weights:
    args.weights = [0.] + args.weights
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for dataset in args.datasets:
      for weight in args.weights:
        rows.append(run(dataset, weight, args.epochs, args.extra, root))
        print(json.dumps(rows[-1]), flush=True)
  lines = ['| dataset | λ₁ = λ₂ | test NLL | Δ NLL | NFE/step | fewer NFE | '
           'eval NFE | wall (s) | wall ratio |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    base = next(b for b in rows
                if b['dataset'] == r['dataset'] and b['weight'] == 0.)
    lines.append(
        f"| {r['dataset']} | {r['weight']:g} | {r['nll']:.4f} | "
        f"{r['nll'] - base['nll']:+.4f} | {r['nfe']:.0f} | "
        f"{base['nfe'] / r['nfe']:.2f}x | {r['eval_nfe']:.0f} | "
        f"{r['wall']:.1f} | {r['wall'] / base['wall']:.2f} |")
  table = '\n'.join(lines)
  print(table)
  if args.out:
    sys.path.insert(0, HERE)
    from bench_training_step import write_section  # pylint: disable=g-import-not-at-top
    extra = (' -- ' + ' '.join(args.extra)) if args.extra else ''
    model = f' ({" ".join(args.extra)})' if args.extra else ''
    write_section(args.out, (
        f'## RNODE regularisation: NFE and wall time vs held-out NLL{model}'
        '\n\n'
        'Produced by `python benchmarks/bench_rnode.py --datasets '
        f'{" ".join(args.datasets)} --weights '
        f'{" ".join(format(w, "g") for w in args.weights)} --epochs '
        f'{args.epochs} --out {args.out}{extra}`: one `tfp-ffjord train` '
        'process per row (seed configuration unless options follow `--`), '
        'Tsit5 at rtol 1e-3 / atol 1e-5 for every row. "NFE/step" is the '
        'training forward solves\' evaluations summed over the blocks, mean '
        'of the last 5 epochs; "fewer NFE" its ratio to the λ = 0 row; '
        '"eval NFE" the final held-out evaluation at tolerance 1e-5; '
        '"wall" the whole training run including per-epoch evaluation.\n\n'
        + table + '\n'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
