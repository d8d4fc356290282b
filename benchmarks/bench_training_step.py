"""Training-step benchmark on the seed moons configuration.

4 stacked FFJORD blocks, MLP 8-8 tanh dynamics, batch 256, exact trace,
base N(0, 0.8^2 I), Adam(1e-2). Every configuration is built and compiled in
the same process, then timed in rounds that interleave the configurations (so
drift in machine speed affects all alike), and reported as ratios to the
reference (`tfb.FFJORD` + `tfp.math.ode.DormandPrince(atol=1e-5)`, as in
TFP's colab).

For each configuration:
  * first step: wall time of the first call (tracing + compilation + run);
  * step: median over rounds of the median step time within a round;
  * NFE: ODE-function evaluations per forward solve, summed over blocks;
  * log-det error: |log_prob - reference log_prob| averaged over the batch,
    the reference being our Tsit5 at rtol=atol=1e-10 in float64.

Usage:
  python benchmarks/bench_training_step.py [--steps 20] [--rounds 5]
      [--out benchmarks/RESULTS.md]
"""

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import sklearn.datasets  # noqa: E402
import sonnet as snt  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tfp_ffjord  # noqa: E402
from tfp_ffjord import dynamics  # noqa: E402
from tfp_ffjord import ode  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions

BATCH = 256
BLOCKS = 4


def make_blocks(dtype=tf.float32, seed=0):
  tf.random.set_seed(seed)
  blocks = [tfp_ffjord.MLPODE([8, 8], 2, name=f'mlp_{i}')
            for i in range(BLOCKS)]
  for b in blocks:
    b(tf.constant(0., dtype), tf.zeros([1, 2], dtype))
  return blocks


def make_flow(blocks, bijector_cls, solve_fn, trace_fn, dtype=tf.float32,
              fuse=True):
  base = tfd.MultivariateNormalDiag(tf.zeros([2], dtype),
                                    tf.constant([.8, .8], dtype))
  if bijector_cls is tfp_ffjord.StackedFFJORD:   # all blocks, one loop
    chain = tfb.Chain([bijector_cls(blocks, ode_solve_fn=solve_fn,
                                    trace_augmentation_fn=trace_fn,
                                    dtype=dtype)])
  else:
    extra = {} if bijector_cls is tfb.FFJORD else {'fuse': fuse}
    chain = tfb.Chain([bijector_cls(b, ode_solve_fn=solve_fn,
                                    trace_augmentation_fn=trace_fn,
                                    dtype=dtype, **extra)
                       for b in blocks][::-1])
  return tfd.TransformedDistribution(base, chain), chain


def reference_log_prob(block_values, x):
  """Float64 log_prob with a tight tolerance, on copies of the weights
  (`block_values[k]`: block k's `(path, value)` pairs)."""
  blocks64 = make_blocks(tf.float64, seed=123)
  for values, b64 in zip(block_values, blocks64):
    targets = dict(dynamics.variable_paths(b64))
    for path, value in values:
      targets[path].assign(tf.cast(value, tf.float64))
  flow, _ = make_flow(blocks64, tfp_ffjord.FFJORD,
                      ode.Tsit5(rtol=1e-10, atol=1e-10).solve,
                      tfp_ffjord.trace_jacobian_exact, tf.float64)
  return flow.log_prob(tf.cast(x, tf.float64)).numpy()


def configurations():
  """(name, bijector class, solve fn, trace fn, jit_compile[, fuse]) to
  compare. Our `FFJORD` rows are a `tfb.Chain` of 4 blocks, as in TFP's
  colab: consecutive blocks fuse into one solve unless `fuse` is False."""
  exact_tfp = tfb.ffjord.trace_jacobian_exact
  exact = tfp_ffjord.trace_jacobian_exact
  yield ('tfb.FFJORD + tfp DormandPrince(atol=1e-5) [reference]', tfb.FFJORD,
         tfp.math.ode.DormandPrince(atol=1e-5).solve, exact_tfp, False)
  # `ode_solve_fn=None`: the package's default (DormandPrince, TFP's
  # tolerances, adjoint), fused and not.
  yield ('tfp_ffjord.FFJORD, default solver, XLA', tfp_ffjord.FFJORD, None,
         exact, True)
  yield ('tfp_ffjord.FFJORD, default solver, XLA, fuse=False',
         tfp_ffjord.FFJORD, None, exact, True, False)
  yield ('tfp_ffjord.FFJORD + DormandPrince(atol=1e-5), adjoint',
         tfp_ffjord.FFJORD, ode.DormandPrince(atol=1e-5).solve, exact, False)
  yield ('tfp_ffjord.FFJORD + DormandPrince(atol=1e-5), adjoint, XLA',
         tfp_ffjord.FFJORD, ode.DormandPrince(atol=1e-5).solve, exact, True)
  yield ('tfp_ffjord.FFJORD + DormandPrince(atol=1e-5), backprop, XLA',
         tfp_ffjord.FFJORD,
         ode.DormandPrince(atol=1e-5, gradient='backprop').solve, exact, True)
  yield ('tfp_ffjord.FFJORD + Tsit5(atol=1e-5), backprop, XLA',
         tfp_ffjord.FFJORD, ode.Tsit5(atol=1e-5, gradient='backprop').solve,
         exact, True)
  # All four blocks in one solver loop (what the Trainer builds).
  yield ('tfp_ffjord.StackedFFJORD + DormandPrince(atol=1e-5), adjoint, XLA',
         tfp_ffjord.StackedFFJORD, ode.DormandPrince(atol=1e-5).solve, exact,
         True)
  yield ('tfp_ffjord.StackedFFJORD + DormandPrince(atol=1e-5), backprop, '
         'XLA', tfp_ffjord.StackedFFJORD,
         ode.DormandPrince(atol=1e-5, gradient='backprop').solve, exact, True)
  yield ('tfp_ffjord.StackedFFJORD + Tsit5(rtol=1e-2, atol=1e-3), backprop, '
         'XLA', tfp_ffjord.StackedFFJORD,
         ode.Tsit5(rtol=1e-2, atol=1e-3, gradient='backprop').solve, exact,
         True)
  # Looser tolerances, still more accurate than the reference (see the
  # error column): the comparison at matched accuracy.
  yield ('tfp_ffjord.FFJORD + Tsit5(rtol=1e-2, atol=1e-3), backprop, XLA',
         tfp_ffjord.FFJORD,
         ode.Tsit5(rtol=1e-2, atol=1e-3, gradient='backprop').solve, exact,
         True)
  # The same two with every Runge-Kutta stage built into the graph: slower
  # to trace and compile, no per-stage loop overhead at run time.
  yield ('tfp_ffjord.FFJORD + DormandPrince(atol=1e-5), backprop, XLA, '
         'unroll_stages', tfp_ffjord.FFJORD,
         ode.DormandPrince(atol=1e-5, gradient='backprop',
                           unroll_stages=True).solve, exact, True)
  yield ('tfp_ffjord.FFJORD + Tsit5(rtol=1e-2, atol=1e-3), backprop, XLA, '
         'unroll_stages', tfp_ffjord.FFJORD,
         ode.Tsit5(rtol=1e-2, atol=1e-3, gradient='backprop',
                   unroll_stages=True).solve, exact, True)
  yield ('tfp_ffjord.FFJORD + RK4(num_steps=8), backprop, XLA',
         tfp_ffjord.FFJORD, ode.RK4(num_steps=8).solve, exact, True)
  yield ('tfp_ffjord.FFJORD + Tsit5(atol=1e-5), backprop, XLA, Hutchinson',
         tfp_ffjord.FFJORD, ode.Tsit5(atol=1e-5, gradient='backprop').solve,
         tfp_ffjord.trace_jacobian_hutchinson, True)


class Configuration:
  """One row: builds the flow, compiles its step, times it on demand."""

  def __init__(self, name, bijector_cls, solve_fn, trace_fn, jit, fuse=True,
               *, x):
    self.name, self.trace_fn, self.x = name, trace_fn, x
    self.blocks = make_blocks()
    variables = [v for b in self.blocks for v in b.trainable_variables]
    self.stacked = None
    if bijector_cls is tfp_ffjord.StackedFFJORD:
      # The blocks' variables stacked, as the Trainer's model holds them.
      self.stacked = dynamics.StackedBlocks(self.blocks)
      variables = list(self.stacked.trainable_variables)
    self.flow, chain = make_flow(
        self.blocks if self.stacked is None else self.stacked.blocks,
        bijector_cls, solve_fn, trace_fn, fuse=fuse)
    opt = snt.optimizers.Adam(1e-2)
    # Adam's slots exist before the first trace (as in the Trainer), so the
    # step is traced once, not twice; the same for every row.
    opt._initialize(variables)  # pylint: disable=protected-access
    ours = bijector_cls in (tfp_ffjord.FFJORD, tfp_ffjord.StackedFFJORD)
    self.ours = ours

    def log_prob_and_nfe(batch):
      log_prob = self.flow.log_prob(batch)   # through the chain
      if not ours:
        return log_prob, tf.constant(0)
      # Each block's solve (or its segment of the fused one) left its
      # diagnostics on the block.
      return log_prob, tf.add_n([b.last_diagnostics.num_ode_fn_evaluations
                                 for b in chain.bijectors])

    def train_step(batch):
      with tf.GradientTape() as tape:
        log_prob, nfe = log_prob_and_nfe(batch)
        loss = -tf.reduce_mean(log_prob)
      grads = tape.gradient(loss, variables)
      opt.apply(grads, variables)
      return loss, nfe

    self.step = tf.function(train_step, jit_compile=jit)
    start = time.perf_counter()
    self.step(x)[0].numpy()
    self.first = time.perf_counter() - start
    self.times, self.nfe_rounds = [], []

  def time_steps(self, steps):
    """Median wall time of `steps` steps (one round)."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      loss, self.nfe = self.step(self.x)
      loss.numpy()
      times.append(time.perf_counter() - start)
    self.times.append(statistics.median(times))
    self.nfe_rounds.append(int(self.nfe))
    self.loss = float(loss)

  def block_values(self):
    """Each block's `(path, value)` pairs, as trained."""
    if self.stacked is not None:
      return [self.stacked.block_values(k)
              for k in range(self.stacked.num_blocks)]
    return [dynamics.variable_paths(b) for b in self.blocks]

  def result(self):
    # Accuracy at the trained weights, against a tight float64 solve.
    # (Hutchinson's log_prob is a stochastic estimate: no error to report.)
    err = None
    if self.trace_fn is not tfp_ffjord.trace_jacobian_hutchinson:
      log_prob = tf.function(self.flow.log_prob)(self.x).numpy()
      err = float(np.mean(np.abs(
          log_prob - reference_log_prob(self.block_values(), self.x))))
    return dict(name=self.name, first=self.first,
                step=statistics.median(self.times), rounds=self.times,
                nfe=int(self.nfe) if self.ours else None, err=err,
                loss=self.loss)


class Limit:
  """The work a training step cannot avoid, in one compiled function.

  `nfe` evaluations of the dynamics with the exact trace's vector-Jacobian
  products (chained by Euler updates so that nothing is dead code), the
  negative log-likelihood, its gradient (the backward pass through every
  evaluation) and Adam's update. No step-size control, no stages, no solver
  bookkeeping, no loop: the evaluations are written out one after the other
  (XLA sees the whole chain; compiling it takes ~20-45 s), so a step that
  costs this much has no overhead left. All evaluations use one block's
  dynamics (the 4 blocks have the same architecture, so the same cost).
  A `tf.while_loop` version of the same work (TensorFlow's own loop
  gradient) was ~15% slower than this one.
  """

  def __init__(self, nfe, x):
    self.x = x
    blocks = make_blocks()
    base = tfd.MultivariateNormalDiag(tf.zeros([2]), tf.constant([.8, .8]))
    augmented = tfp_ffjord.trace_jacobian_exact(blocks[0], None, None)
    h = 1. / nfe
    variables = list(blocks[0].trainable_variables)
    opt = snt.optimizers.Adam(1e-2)
    opt._initialize(variables)  # pylint: disable=protected-access

    def step(batch):
      with tf.GradientTape() as tape:
        y, log_det = batch, tf.zeros_like(batch)
        for i in range(nfe):
          dy, diag = augmented(1. - i * h, (y, log_det))
          y, log_det = y - h * dy, log_det + h * diag
        loss = -tf.reduce_mean(base.log_prob(y)
                               + tf.reduce_sum(log_det, -1))
      opt.apply(tape.gradient(loss, variables), variables)
      return loss

    self.nfe = nfe
    self.step = tf.function(step, jit_compile=True)
    self.step(x).numpy()
    self.times = []

  def time_steps(self, steps):
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.step(self.x).numpy()
      times.append(time.perf_counter() - start)
    self.times.append(statistics.median(times))


def write_section(path, section):
  """Replaces (or appends) the `## ...` section of `path` with `section`.

  Keeps the other benchmarks' sections of the results file intact.
  """
  title = section.splitlines()[0]
  text = open(path).read() if os.path.exists(path) else '# Benchmark results\n'
  parts = text.split('\n## ')
  head, sections = parts[0], ['## ' + p for p in parts[1:]]
  if any(p.splitlines()[0] == title for p in sections):
    sections = [section if p.splitlines()[0] == title else p
                for p in sections]
  else:
    sections.append(section)
  body = [head.rstrip('\n') + '\n'] + [p.rstrip('\n') + '\n'
                                         for p in sections]
  with open(path, 'w') as f:
    f.write('\n'.join(body))


def thread_labels(intra_op_threads):
  """`(flag, title suffix)` naming an `--intra-op-threads` setting in a
  results section (both empty for TensorFlow's own choice, 0)."""
  if not intra_op_threads:
    return '', ''
  plural = 's' if intra_op_threads > 1 else ''
  return (f' --intra-op-threads {intra_op_threads}',
          f' ({intra_op_threads} intra-op thread{plural})')


def publish(path, section):
  """Prints `section` and, if `path` is given, writes it there
  (`write_section`)."""
  print(section)
  if path:
    write_section(path, section)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=30,
                      help='steps per configuration per round')
  parser.add_argument('--rounds', type=int, default=5,
                      help='timing rounds; configurations are interleaved '
                      'so that machine-speed drift affects all alike')
  parser.add_argument('--out', default=None,
                      help='write a Markdown table here')
  parser.add_argument('--limit-only', action='store_true',
                      help='only the rows with a limit, and only the limit '
                      'section')
  parser.add_argument('--intra-op-threads', type=int, default=0,
                      help='threads per op for every row (set before the '
                      "first op; 0: TensorFlow's choice). `tfp-ffjord "
                      'train` uses 1 for this model')
  args = parser.parse_args(argv)
  if args.intra_op_threads:
    tf.config.threading.set_intra_op_parallelism_threads(
        args.intra_op_threads)
  threads, suffix = thread_labels(args.intra_op_threads)
  x = tf.constant(sklearn.datasets.make_moons(
      BATCH, noise=.06, random_state=0)[0], tf.float32)
  configs = []
  for config in configurations():
    if args.limit_only and not ('StackedFFJORD' in config[0]
                                and 'backprop' in config[0]):
      continue
    configs.append(Configuration(*config, x=x))
    print(f'{configs[-1].name}: first step {configs[-1].first:.2f}s',
          flush=True)
    gc.collect()
  # The limit of the rows that train the Trainer's way (StackedFFJORD,
  # backprop, XLA), at each row's NFE; timed in the same rounds.
  for c in configs:
    c.time_steps(1)   # the NFE at the current weights
  limits = {c.name: Limit(int(c.nfe), x) for c in configs
            if 'StackedFFJORD' in c.name and 'backprop' in c.name}
  for _ in range(args.rounds):
    for c in configs:
      c.time_steps(args.steps)
      if c.name in limits:
        limits[c.name].time_steps(args.steps)
  for c in configs:   # drop the NFE probe
    c.times, c.nfe_rounds = c.times[1:], c.nfe_rounds[1:]
  rows = [c.result() for c in configs]
  for r in rows:
    print(f"{r['name']}: step {r['step'] * 1e3:.1f}ms (rounds "
          + ', '.join(f'{t * 1e3:.1f}' for t in r['rounds'])
          + f"), NFE {r['nfe']}, log_prob error {r['err']}", flush=True)
  ref = rows[0]
  lines = [
      '| configuration | first step (s) | vs ref | step (ms) | speed-up | '
      'NFE/step (4 blocks) | mean abs log_prob error |',
      '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f"| {r['name']} | {r['first']:.2f} | {r['first'] / ref['first']:.3f} | "
        f"{r['step'] * 1e3:.1f} | {ref['step'] / r['step']:.1f}x | "
        f"{r['nfe'] if r['nfe'] is not None else 'n/a'} | "
        f"{'stochastic' if r['err'] is None else format(r['err'], '.1e')} |")
  table = '\n'.join(lines)
  # Training goes on during the rounds and the NFE of a step grows: each
  # round's limit is scaled to that round's NFE (the limit's cost is linear
  # in its evaluations: they are written out one after the other).
  limit_lines = [
      '| configuration | step (ms) | NFE in the rounds | limit at that NFE '
      '(ms) | step / limit |', '|---|---:|---:|---:|---:|']
  for c in configs:
    if c.name in limits:
      limit = limits[c.name]
      scaled = [t * n / limit.nfe for t, n in zip(limit.times, c.nfe_rounds)]
      ratio = statistics.median(a / b for a, b in zip(c.times, scaled))
      limit_lines.append(
          f"| {c.name} | {statistics.median(c.times) * 1e3:.1f} | "
          f"{min(c.nfe_rounds)}-{max(c.nfe_rounds)} | "
          f"{statistics.median(scaled) * 1e3:.1f} | {ratio:.2f} |")
  limit_table = '\n'.join(limit_lines)
  print(table)
  print(limit_table)
  if args.out:
    section = (
        f'## Training step, seed moons configuration{suffix}\n\n'
        'Produced by `python benchmarks/bench_training_step.py '
        f'--steps {args.steps} --rounds {args.rounds}{threads} '
        f'--out {args.out}` on a '
        '2-core CPU, all rows in one process. Every row is TFP\'s colab '
        'model: 4 blocks in a `tfb.Chain` (`StackedFFJORD`: one bijector '
        'holding the 4 blocks), `flow.log_prob` in the step; our `FFJORD` '
        'rows fuse the chain into one solve unless they say `fuse=False`. '
        '"first step" is the wall time '
        'of the first call (tracing, compilation, one step; Adam\'s slots '
        'are created beforehand, as the Trainer does, so each step is '
        'traced once); "vs ref" is its ratio to the reference (lower is '
        'better). "step" is the median over rounds of the median step time '
        'in each round; the rounds interleave the configurations, so drift '
        'in machine speed (large on this shared machine) hits all rows '
        'alike; "speed-up" is the reference step time over this one. NFE is '
        'per training step, summed over the 4 blocks\' forward solves. The '
        'log_prob error is against our Tsit5 at rtol=atol=1e-10 in float64 '
        'on the same batch and weights, after the timed steps.\n\n'
        + table + '\n')
    if not args.limit_only:
      write_section(args.out, section)
    section = (
        f'## Training step against the work it cannot avoid{suffix}\n\n'
        'Produced by `python benchmarks/bench_training_step.py '
        f'--steps {args.steps} --rounds {args.rounds}{threads}'
        f'{" --limit-only" if args.limit_only else ""} --out {args.out}`. '
        'For the rows that train as the Trainer does, a '
        'compiled function that does only the work such a step cannot '
        'avoid at that row\'s NFE (the dynamics evaluations with the exact '
        'trace\'s vector-Jacobian products, chained by Euler updates, the '
        'loss, the backward pass through every evaluation and Adam\'s '
        'update; no step-size control, no Runge-Kutta bookkeeping), timed '
        'in the same rounds, each round scaled to the NFE the step had in '
        'that round. "step / limit" is the median over rounds of the '
        'overhead factor of the real step (1.0 = none).\n\n'
        + limit_table + '\n')
    write_section(args.out, section)
  return rows


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
