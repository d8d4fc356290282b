"""Flow matching with and without minibatch optimal-transport pairing.

Trains a moons flow-matching model (1 block, MLP 64-64-64 swish, batch 512,
Adam 3e-2 cosine; `bench_flow_matching.py` used it until it moved to a
smaller MLP) for `--epochs` epochs of
250 steps three ways, one after the other in one process:
  * independent pairs (base samples drawn in the compiled loop);
  * `ot_solver='exact'`: SciPy's assignment on the host between steps;
  * `ot_solver='sinkhorn'`: entropic OT inside the compiled loop.
Reports the held-out NLL (exact trace, rtol = atol = 1e-5), the training
time (tracing and compilation included, held-out evaluations excluded),
the time per step after the first epoch, and the held-out NFE of the
final model (straighter paths need fewer steps of the adaptive solver).

Usage:
  python benchmarks/bench_ot_pairing.py [--epochs 8] [--batch-size 512]
      [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from tfp_ffjord import training  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_flow_matching import training_curve  # noqa: E402
from bench_training_step import write_section  # noqa: E402
STEPS_PER_EPOCH = 250
PAIRINGS = {
    'independent': {},
    'exact (SciPy, host)': dict(ot_pairing=True, ot_solver='exact'),
    'sinkhorn (in graph)': dict(ot_pairing=True, ot_solver='sinkhorn'),
}


def train(epochs, batch_size, overrides):
  """Per-epoch `(training seconds, test NLL, held-out NFE)` of one run."""
  config = training.TrainConfig(
      dataset='moons', objective='flow-matching', blocks=1,
      hidden=(64, 64, 64), activation='swish', learning_rate=3e-2,
      batch_size=batch_size, steps_per_epoch=STEPS_PER_EPOCH, epochs=epochs,
      **overrides)
  return [(t, r['test_nll'], r['eval_nfe'])
          for t, r in training_curve(config)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--batch-size', type=int, default=512)
  parser.add_argument('--out', default=None,
                      help='write the table as a section of this file')
  args = parser.parse_args(argv)
  rows = []
  for name, overrides in PAIRINGS.items():
    curve = train(args.epochs, args.batch_size, overrides)
    total, nll, nfe = curve[-1]
    step_ms = (total - curve[0][0]) / ((len(curve) - 1) * STEPS_PER_EPOCH)
    rows.append(dict(pairing=name, nll=nll, total=total,
                     step_ms=step_ms * 1e3, eval_nfe=nfe, curve=curve))
    print(json.dumps(rows[-1]), flush=True)
  lines = ['| pairing | final test NLL | training time (s) | ms per step '
           '(after epoch 1) | held-out NFE |', '|---|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['pairing']} | {r['nll']:.4f} | {r['total']:.1f} | "
                 f"{r['step_ms']:.2f} | {r['eval_nfe']:.0f} |")
  table = '\n'.join(lines)
  print(table)
  if args.out:
    write_section(args.out, (
        '## Flow matching: optimal-transport pairing on the host or in the '
        'graph\n\n'
        'Produced by `python benchmarks/bench_ot_pairing.py --epochs '
        f'{args.epochs} --batch-size {args.batch_size} --out {args.out}`: '
        'moons, 1 block MLP 64-64-64 swish, Adam 3e-2 cosine, '
        f'{args.epochs} epochs of {STEPS_PER_EPOCH} steps at batch '
        f'{args.batch_size}, one process. Training time includes tracing '
        'and compilation, not the held-out evaluations; held-out NLL and NFE '
        'with the exact trace at rtol = atol = 1e-5.\n\n' + table + '\n'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
