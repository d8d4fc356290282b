"""Flow matching vs maximum likelihood: training time to a held-out NLL.

For each dataset, trains a maximum-likelihood (ML) FFJORD and a
flow-matching (FM) one in the same process, one after the other, recording
after every epoch the held-out NLL (exact trace, rtol = atol = 1e-5) and the
training time so far. Training time excludes the held-out evaluations (they
measure, they do not train) and includes tracing and compilation. The
result is the FM training time to first reach the final NLL of the ML run,
and its ratio to the ML run's time to that NLL.

Configurations (`tfp_ffjord.training.TrainConfig` fields):
  * moons ML: the seed configuration (4 blocks of MLP 8-8 tanh, Tsit5,
    exact trace, 40 epochs, batch 256, Adam 1e-2 cosine);
  * digits ML: 2 blocks of MLP 64-64 tanh, Tsit5, Hutchinson trace,
    batch 128, 100 epochs (its NLL has levelled off);
  * FM: 1 block, MLP swish (32-32-32 on moons, 256-256 on digits),
    independent pairing, Adam with cosine decay per epoch (5e-2 over 20
    epochs on moons, 3e-3 over 40 on digits), epochs of 250 steps (an FM
    step costs no ODE solve; `fit` runs them in compiled chunks). On moons
    the FM steps run in `tf.function` without XLA: compiling the chunk
    costs ~1.2 s more than tracing it, and a step of this small MLP is
    as fast either way (about 0.5 ms).

Usage:
  python benchmarks/bench_flow_matching.py [--datasets moons digits]
      [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from tfp_ffjord import training  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    'moons': dict(
        ml=dict(),
        fm=dict(objective='flow-matching', blocks=1, hidden=(32, 32, 32),
                activation='swish', learning_rate=5e-2, batch_size=512,
                steps_per_epoch=250, epochs=20, jit_compile=False)),
    'digits': dict(
        ml=dict(blocks=2, hidden=(64, 64), trace='hutchinson', batch_size=128,
                epochs=100),
        fm=dict(objective='flow-matching', blocks=1, hidden=(256, 256),
                activation='swish', learning_rate=3e-3, batch_size=256,
                steps_per_epoch=250, epochs=40)),
}


def training_curve(config):
  """Per-epoch `(training seconds, epoch record)` of a run of `config`.

  Training seconds exclude the held-out evaluations (they measure, they do
  not train) and include tracing and compilation.
  """
  trainer = training.Trainer(config)
  evaluate = trainer.evaluate
  eval_time = [0.]

  def timed_evaluate(*args, **kwargs):
    start = time.perf_counter()
    try:
      return evaluate(*args, **kwargs)
    finally:
      eval_time[0] += time.perf_counter() - start

  trainer.evaluate = timed_evaluate
  curve = []
  trainer.fit(progress=False, callback=lambda r: curve.append(
      (r['wall_time'] - eval_time[0], r)))
  return curve


def train(dataset, overrides):
  """Per-epoch `(training seconds, test NLL)` of one run."""
  config = training.TrainConfig(dataset=dataset, **overrides)
  return [(t, r['test_nll']) for t, r in training_curve(config)]


def time_to(curve, target):
  for seconds, nll in curve:
    if nll <= target:
      return seconds
  return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--datasets', nargs='+', default=['moons', 'digits'],
                      choices=sorted(CONFIGS))
  parser.add_argument('--out', default=None,
                      help='write the table as a section of this file')
  args = parser.parse_args(argv)
  rows = []
  for dataset in args.datasets:
    ml = train(dataset, CONFIGS[dataset]['ml'])
    fm = train(dataset, CONFIGS[dataset]['fm'])
    target = ml[-1][1]
    row = dict(dataset=dataset, target=target,
               ml_time=time_to(ml, target), ml_total=ml[-1][0],
               fm_time=time_to(fm, target), fm_best=min(n for _, n in fm),
               fm_total=fm[-1][0], fm_final=fm[-1][1],
               ml_curve=ml, fm_curve=fm)
    rows.append(row)
    print(json.dumps(row), flush=True)
  lines = ['| dataset | ML final NLL | ML time to it (s) | FM time to it (s) | '
           'speed-up | FM best NLL | FM final NLL (time, s) |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    reached = r['fm_time'] is not None
    lines.append(
        f"| {r['dataset']} | {r['target']:.4f} | {r['ml_time']:.1f} | "
        f"{r['fm_time']:.1f} | {r['ml_time'] / r['fm_time']:.1f}x | "
        if reached else
        f"| {r['dataset']} | {r['target']:.4f} | {r['ml_time']:.1f} | "
        f"not reached | — | ")
    lines[-1] += (f"{r['fm_best']:.4f} | {r['fm_final']:.4f} "
                  f"({r['fm_total']:.1f}) |")
  table = '\n'.join(lines)
  print(table)
  if args.out:
    sys.path.insert(0, HERE)
    from bench_training_step import write_section  # pylint: disable=g-import-not-at-top
    configs = '; '.join(
        f'{d}: ML {CONFIGS[d]["ml"] or "seed configuration"}, FM '
        f'{CONFIGS[d]["fm"]}' for d in args.datasets)
    write_section(args.out, (
        '## Flow matching vs maximum likelihood: time to the same NLL\n\n'
        'Produced by `python benchmarks/bench_flow_matching.py --datasets '
        f'{" ".join(args.datasets)} --out {args.out}`. Training time '
        'excludes the per-epoch held-out evaluations and includes tracing '
        'and compilation; NLLs in nats, exact trace at rtol = atol = 1e-5. '
        '"FM time to it" is when flow matching first reaches the ML run\'s '
        f'final NLL. Configurations: {configs}.\n\n' + table + '\n'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
