"""Variational inference: FFJORD against TFP's surrogates at equal wall time.

For each `inference_gym` target of `tfp_ffjord.registry.VI_TARGETS` and each
surrogate family (FFJORD; TFP's mean-field and full-covariance normals; an
IAF of two `tfb.MaskedAutoregressiveFlow` blocks), one after the other in
one process: Adam (learning rate 1e-2, 64 samples per step, seed 0) for
`--seconds` of wall time (the first step's tracing and XLA compilation
included), then the ELBO over 4,096 draws and the standardised errors of
the posterior mean and standard deviation against the target's ground
truth (`max over coordinates of |estimate - truth| / truth std`).

With `--loops`: instead, the FFJORD surrogate of Banana trained by
`tfp.vi.fit_surrogate_posterior` (TFP's `tf.while_loop` over steps, with
and without `jit_compile=True`) and by `tfp_ffjord.vi.fit` (one
XLA-compiled, checked step per call): the wall time of a first run
(tracing and compilation included) and the steady time per step, from runs
of `--short` and `--long` steps.

Usage:
  python benchmarks/bench_vi.py [--seconds 60] [--targets banana funnel ...]
      [--out benchmarks/RESULTS.md]
  python benchmarks/bench_vi.py --loops [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from tfp_ffjord import registry  # noqa: E402
from tfp_ffjord import vi  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_training_step import publish  # noqa: E402

SURROGATES = tuple(registry.VI_SURROGATES)


def applies(surrogate, target):
  """Whether `surrogate` can be built for `target` (ASVI needs a prior)."""
  return surrogate != 'asvi' or registry.VI_TARGETS[target].prior


def _timed_fit(loop, steps):
  """Seconds to build a fresh Banana FFJORD surrogate's loop and run it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
  target = vi.load_target('banana')
  q = vi.surrogate_for(target, seed=0)
  start = time.perf_counter()
  if loop == 'vi.fit':
    losses = vi.fit(q, target.unnormalized_log_prob, steps, seed=0).losses
  else:
    losses = tfp.vi.fit_surrogate_posterior(
        target.unnormalized_log_prob, q,
        optimizer=tf.keras.optimizers.Adam(1e-2), num_steps=steps,
        sample_size=64, seed=(0, 0),
        jit_compile=True if loop.endswith('XLA') else None).numpy()
  seconds = time.perf_counter() - start
  return seconds, float(losses[-50:].mean())


def loop_comparison(short, long):
  loops = ('tfp.vi.fit_surrogate_posterior',
           'tfp.vi.fit_surrogate_posterior, XLA', 'vi.fit')
  rows = []
  for loop in loops:
    first, _ = _timed_fit(loop, short)
    total, loss = _timed_fit(loop, long)
    per_step = (total - first) / (long - short)
    rows.append((loop, first, per_step, loss))
    print(loop, first, per_step, loss, flush=True)
  lines = [
      "## Variational inference: TFP's loop against `vi.fit`",
      '',
      f'`python benchmarks/bench_vi.py --loops --short {short} --long {long}`'
      ' (2-core CPU): the Banana FFJORD surrogate (defaults, seed 0), Adam '
      '1e-2, 64 samples per step. First run: a fresh surrogate trained for '
      f'{short} steps, tracing and compilation included; steady step: the '
      f'difference between {long}- and {short}-step runs over '
      f'{long - short} steps.',
      '',
      f'| loop | first run ({short} steps, s) | steady step (ms) | '
      f'-ELBO, last 50 of {long} |',
      '|---|---:|---:|---:|',
  ]
  for loop, first, per_step, loss in rows:
    lines.append(f'| {loop} | {first:.1f} | {1000 * per_step:.2f} | '
                 f'{loss:.3f} |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seconds', type=float, default=60.,
                      help='wall time per target and surrogate')
  parser.add_argument('--targets', nargs='+', default=list(registry.VI_TARGETS),
                      choices=list(registry.VI_TARGETS))
  parser.add_argument('--surrogates', nargs='+', default=list(SURROGATES),
                      choices=list(SURROGATES))
  parser.add_argument('--json', default=None, help='also write raw results')
  parser.add_argument('--eval-samples', type=int, default=4096,
                      help='draws of the final evaluation')
  parser.add_argument('--threads', type=int, default=0,
                      help='pin to this many CPUs and TensorFlow threads '
                      '(0: all)')
  parser.add_argument('--first-cpu', type=int, default=0,
                      help='the first of the pinned CPUs')
  parser.add_argument('--fine-tune-learning-rate', type=float, default=None,
                      help='every surrogate in two phases: a quarter of the '
                      'time at 1e-2, the rest at this rate')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0],
                      help='one run per seed; the table shows the mean ELBO '
                      'and the median [min, max] of the errors')
  parser.add_argument('--from-json', nargs='+', default=None,
                      help='write the table of raw results saved by --json '
                      '(no training)')
  parser.add_argument('--out', default=None, help='results file to update')
  parser.add_argument('--loops', action='store_true',
                      help="compare TFP's loop with vi.fit instead")
  parser.add_argument('--short', type=int, default=100)
  parser.add_argument('--long', type=int, default=600)
  args = parser.parse_args(argv)

  if args.loops:
    publish(args.out, loop_comparison(args.short, args.long))
    return

  rows = []
  if args.from_json:
    for path in args.from_json:
      with open(path) as f:
        rows += json.load(f)
    args.targets = []
  elif args.json and os.path.exists(args.json):
    with open(args.json) as f:   # a rerun continues where this one stopped
      rows = json.load(f)
  done = {(m['target'], m['surrogate'], m['config']['seed']) for m in rows}
  if args.targets:
    from bench_images import pin  # noqa: E402  pylint: disable=g-import-not-at-top
    pin(args.threads, args.first_cpu)
  for target in args.targets:
    for surrogate in args.surrogates:
      for seed in args.seeds:
        if (target, surrogate, seed) in done or not applies(surrogate,
                                                            target):
          continue
        m = vi.run(target=target, surrogate=surrogate, num_steps=10**7,
                   seed=seed, max_seconds=args.seconds, verbose=True,
                   num_eval_samples=args.eval_samples,
                   fine_tune_learning_rate=args.fine_tune_learning_rate)
        m['threads'] = args.threads
        print(json.dumps({k: v for k, v in m.items() if k != 'config'}),
              flush=True)
        rows.append(m)
        if args.json:   # after each run: a long benchmark keeps its results
          with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)

  seconds = rows[0]['config']['max_seconds'] if rows else args.seconds
  targets = list(dict.fromkeys(m['target'] for m in rows))
  by_seeds = {}
  for t in targets:
    seeds = tuple(sorted({m['config']['seed'] for m in rows
                          if m['target'] == t}))
    by_seeds.setdefault(seeds, []).append(t)
  draws = rows[0]['num_samples'] if rows else args.eval_samples
  pinned = ' --threads 1' if rows and rows[0].get('threads') == 1 else ''
  extra = '' if draws == 4096 else f' --eval-samples {draws}'
  fine = rows[0]['config'].get('fine_tune_learning_rate') if rows else None
  if fine is not None:
    extra += f' --fine-tune-learning-rate {fine:g}'
  commands = ' and '.join(
      f'`python benchmarks/bench_vi.py --seconds {seconds:g}{pinned} --targets '
      f'{" ".join(ts)} --seeds {" ".join(map(str, ss))}{extra}`'
      for ss, ts in by_seeds.items())
  lines = [
      '## Variational inference: surrogates at equal wall time',
      '',
      f'{commands} ('
      + ('one core per process, two processes side by side'
         if rows and rows[0].get('threads') == 1 else '2-core CPU')
      + '; each surrogate trained by `tfp_ffjord.vi.fit` for the same wall '
      'time, compilation included; Adam 1e-2'
      + ('' if fine is None else f' for a quarter of the time, then {fine:g} '
         '(a staged surrogate: its base, then the whole)')
      + ', 64 samples per step; seeds '
      'set the initial weights, the training draws and the evaluation draws).'
      f' ELBO over {draws:,} draws, mean '
      'over seeds; errors are the largest '
      'standardised error over coordinates, `|estimate - truth| / truth '
      "std`, against inference_gym's ground truth, median [min, max] over "
      'seeds; "floor" after a target that can sample: the same errors of as '
      'many exact draws (mean / std), below which differences are Monte '
      'Carlo noise. "Laplace start": the runs whose Gaussian base kept the '
      "target's Laplace approximation (`vi.laplace_initialize`, inside the "
      'budget). FFJORD: 2 blocks, MLP 32-32 tanh, dopri5 (rtol 1e-3, atol '
      '1e-6, backprop), exact trace up to 16 dimensions, Hutchinson above.',
      '',
      '| target | surrogate | seeds | steps (mean) | first step (s) | ELBO '
      '| mean error | std error | log Z (IS) | ESS / N |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  groups = {}
  for m in rows:
    groups.setdefault((m['target'], m['surrogate']), []).append(m)

  def spread(ms, key):
    values = [m.get(key) for m in ms if m.get(key) is not None]
    if not values:
      return '–'
    if len(values) == 1:
      return f'{values[0]:.3f}'
    return (f'{statistics.median(values):.3f} [{min(values):.3f}, '
            f'{max(values):.3f}]')

  for (target, surrogate), ms in groups.items():
    floor = ''
    if ms[0].get('std_error_floor') is not None:
      floor = (f' (floor {spread(ms, "mean_error_floor")} / '
               f'{spread(ms, "std_error_floor")})')
    started = sum(bool((m.get('laplace') or {}).get('accepted')) for m in ms)
    mark = f' (Laplace start: {started}/{len(ms)})' if any(
        m.get('laplace') for m in ms) else ''
    lines.append(
        f'| {target}{floor} | {surrogate}{mark} | {len(ms)} | '
        f'{statistics.mean(m["steps"] for m in ms):.0f} | '
        f'{statistics.mean(m["first_step_seconds"] for m in ms):.1f} | '
        f'{statistics.mean(m["elbo"] for m in ms):.3f} | '
        f'{spread(ms, "mean_error")} | {spread(ms, "std_error")} | '
        f'{spread(ms, "log_z")} | '
        f'{spread([dict(r=m.get("ess", 0) / m["num_samples"]) for m in ms], "r")}'
        ' |')
  publish(args.out, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
