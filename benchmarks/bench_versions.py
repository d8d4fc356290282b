"""This checkout's training steps against another checkout's, same machine.

For changes that must not cost speed (a refactor): the other version is a
git worktree (`git worktree add /tmp/before <commit>`). Fresh processes
alternate, this checkout and the other, `--pairs` times; each builds four
of `bench_training_step.py`'s configurations on the seed moons model (batch
256, exact trace, Adam's slots created first) and reports each one's first
step (tracing, compilation, one step) and its steady step (median over 3
rounds of the median of 30 steps). Alternating processes lets drift in the
machine's speed hit both versions alike.

Usage:
  git worktree add /tmp/before <commit>
  python benchmarks/bench_versions.py --other /tmp/before [--pairs 3]
      [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROUNDS, STEPS = 3, 30


def child():
  """Measures the `tfp_ffjord` first on `sys.path`; prints one JSON line."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tfp_ffjord  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import ode  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  import bench_training_step as bench  # pylint: disable=g-import-not-at-top
  x = sklearn.datasets.make_moons(256, noise=.05, random_state=0)[0]
  x = tf.constant(((x - x.mean(0)) / x.std(0)).astype('float32'))
  exact = tfp_ffjord.trace_jacobian_exact
  configurations = [
      ('colab chain, default solver (fused)', tfp_ffjord.FFJORD, None),
      ('StackedFFJORD, Tsit5 1e-3/1e-5, backprop (the main job)',
       tfp_ffjord.StackedFFJORD,
       ode.Tsit5(rtol=1e-3, atol=1e-5, gradient='backprop').solve),
      ('StackedFFJORD, DormandPrince atol 1e-5, adjoint',
       tfp_ffjord.StackedFFJORD, ode.DormandPrince(atol=1e-5).solve),
      ('colab chain, RK4(num_steps=8), backprop', tfp_ffjord.FFJORD,
       ode.RK4(num_steps=8).solve),
  ]
  rows = [bench.Configuration(name, cls, solve, exact, True, x=x)
          for name, cls, solve in configurations]
  for _ in range(ROUNDS):
    for row in rows:
      row.time_steps(STEPS)
  print(json.dumps({
      'package': os.path.dirname(tfp_ffjord.__file__),
      'rows': {row.name: [row.first, statistics.median(row.times)]
               for row in rows}}))


def run(path):
  """One child process importing the `tfp_ffjord` under `path`."""
  env = dict(os.environ, PYTHONPATH=path)
  result = subprocess.run([sys.executable, __file__, '--child'], env=env,
                          capture_output=True, text=True, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    raise RuntimeError(f'child for {path} failed:\n{result.stderr[-3000:]}')
  out = json.loads(lines[-1])
  if not out['package'].startswith(os.path.realpath(path)):
    raise RuntimeError(f'the child imported {out["package"]}, not {path}')
  return out['rows']


def commit(path):
  """The short commit checked out at `path` ('?' if not a git checkout)."""
  result = subprocess.run(['git', '-C', path, 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True, check=False)
  return result.stdout.strip() or '?'


def section(this, other, names, args):
  def span(values, scale, fmt):
    return f'{min(values) * scale:{fmt}}–{max(values) * scale:{fmt}}'
  lines = [
      '## This version against another, alternating processes',
      '',
      f'Produced by `python benchmarks/bench_versions.py --other '
      f'{args.other} --pairs {args.pairs}` on a 2-core CPU: {args.pairs} '
      'pairs of fresh processes, this checkout and the other in turn. '
      'First step: tracing, compilation and one step (Adam\'s slots made '
      'beforehand); steady: the median over 3 rounds of the median of 30 '
      f'steps. Ranges are over the pairs. Other: commit '
      f'{commit(args.other)}; this: commit {commit(ROOT)}.',
      '',
      '| configuration | first step (s), other | this | steady step (ms), '
      'other | this |',
      '|---|---:|---:|---:|---:|']
  for name in names:
    o = [r[name] for r in other]
    t = [r[name] for r in this]
    lines.append(
        f'| {name} | {span([v[0] for v in o], 1, ".2f")} | '
        f'{span([v[0] for v in t], 1, ".2f")} | '
        f'{span([v[1] for v in o], 1e3, ".1f")} | '
        f'{span([v[1] for v in t], 1e3, ".1f")} |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--other', help='the other checkout (a worktree)')
  parser.add_argument('--pairs', type=int, default=3)
  parser.add_argument('--out', default=None)
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child()
    return
  if not args.other or not os.path.isdir(os.path.join(args.other,
                                                      'tfp_ffjord')):
    parser.error('--other must be a checkout holding tfp_ffjord/')
  this, other = [], []
  for _ in range(args.pairs):
    other.append(run(args.other))
    this.append(run(ROOT))
    print(json.dumps({'other': other[-1], 'this': this[-1]}), flush=True)
  text = section(this, other, list(this[0]), args)
  print(text)
  if args.out:
    sys.path.insert(0, HERE)
    import bench_training_step  # pylint: disable=g-import-not-at-top
    bench_training_step.write_section(args.out, text)


if __name__ == '__main__':
  main()
