"""Peak memory of one gradient computation vs the number of solver steps.

The continuous adjoint should use memory that does not grow with the number
of steps; `gradient='backprop'` stores one state per step, so it grows
linearly. Each configuration runs in a fresh subprocess, which reports the
growth of its peak resident set size (`ru_maxrss`) during one loss-and-gradient
call of a traced `tf.function` (traced before measuring, and after a warm-up
call of a one-step version, so tracing and start-up allocations are not
counted).

Setup: one FFJORD block, MLP 16-64-64-16 tanh dynamics, a batch of 4096
points in 16-D (the state and its log-det are 2 x 256 KiB in float32), RK4
with a fixed number of steps, Hutchinson trace.

Usage:
  python benchmarks/bench_memory.py [--steps 16 64 256 1024] [--out FILE]
"""

import argparse
import json
import os
import resource
import subprocess
import sys

BATCH, DIM = 4096, 16


def child(gradient, num_steps):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tfp_ffjord  # pylint: disable=g-import-not-at-top
  tf.random.set_seed(0)
  mlp = tfp_ffjord.MLPODE([64, 64], DIM)
  mlp(0., tf.zeros([1, DIM]))
  x = tf.random.normal([BATCH, DIM])

  def make_step(n):
    bij = tfp_ffjord.FFJORD(mlp, ode_solve_fn=tfp_ffjord.ode.RK4(
        num_steps=n, gradient=gradient).solve)

    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        y, ldj, _ = bij.solve_forward(x, seed=1)
        loss = tf.reduce_mean(y ** 2) - tf.reduce_mean(ldj)
      return loss, tape.gradient(loss, mlp.trainable_variables)

    return step

  warm = make_step(1)
  warm(x)[0].numpy()
  step = make_step(num_steps)
  step.get_concrete_function(x)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  loss, grads = step(x)
  loss.numpy()
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps(dict(gradient=gradient, num_steps=num_steps,
                        peak_growth_mib=(after - before) / 1024.,
                        finite=bool(tf.reduce_all([tf.reduce_all(
                            tf.math.is_finite(g)) for g in grads])))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, nargs='+',
                      default=[16, 64, 256, 1024])
  parser.add_argument('--out', default=None,
                      help='write the table as a section of this file')
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args.child[0], int(args.child[1]))
    return 0
  rows = []
  for gradient in ('adjoint', 'backprop'):
    for n in args.steps:
      out = subprocess.run(
          [sys.executable, __file__, '--child', gradient, str(n)],
          check=True, capture_output=True, text=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  state_mib = 2 * BATCH * DIM * 4 / 2**20
  lines = ['| gradient | ' + ' | '.join(f'{n} steps' for n in args.steps)
           + ' |', '|---|' + '---:|' * len(args.steps)]
  for gradient in ('adjoint', 'backprop'):
    cells = [f"{r['peak_growth_mib']:.0f}" for r in rows
             if r['gradient'] == gradient]
    lines.append(f'| {gradient} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  print(table)
  if args.out:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_training_step import write_section  # pylint: disable=g-import-not-at-top
    write_section(args.out, (
        '## Peak memory of one gradient vs number of steps\n\n'
        f'Produced by `python benchmarks/bench_memory.py --steps '
        f'{" ".join(map(str, args.steps))} --out {args.out}`: growth of '
        'peak RSS (MiB) during one loss-and-gradient call, one FFJORD '
        f'block (MLP 16-64-64-16), batch {BATCH} in {DIM}-D (state + '
        f'log-det = {state_mib:.2f} MiB), RK4, Hutchinson trace, '
        '`tf.function` without XLA, each cell a fresh process. RSS includes '
        'allocator slack, so small cells vary between runs; the trend is '
        'the result.\n\n' + table + '\n'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
