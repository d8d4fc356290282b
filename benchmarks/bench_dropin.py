"""The drop-in user's training step: TFP's colab with only the class swapped.

TFP's FFJORD colab builds 4 `tfb.FFJORD` blocks in a `tfb.Chain` and trains
them with `tf.function` steps whose Sonnet Adam creates its slots on the
first call (so `tf.function` traces the step twice). Each row below is that
code, with the same initial weights (MLP 8-8 tanh blocks, seed 0) and batch
(256 moons points), in a fresh process, so that its first step (both
traces, compilation and one step) is what a user waits for:

  * `tfb.FFJORD` with the colab's `tfp.math.ode.DormandPrince(atol=1e-5)`
    (plain `tf.function`: TFP's solver does not compile under XLA), the
    reference;
  * `tfp_ffjord.FFJORD` swapped in, `ode_solve_fn=None` (our default
    solver), `jit_compile=True`, the blocks fused (the default) or not
    (`fuse=False`);
  * the same at looser tolerances, to compare at matched accuracy.

Accuracy: the largest |log p(x) - reference| on the batch at the initial
weights, the reference being our Tsit5 at rtol = atol = 1e-10 in float64.

  python benchmarks/bench_dropin.py [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEADY_STEPS = 20

# name -> (bijector, solver expression, jit_compile, fuse)
ROWS = {
    'tfb.FFJORD + tfp DormandPrince(atol=1e-5) [reference]':
        ('tfb', 'tfp.math.ode.DormandPrince(atol=1e-5).solve', False, None),
    'tfp_ffjord.FFJORD, default solver, XLA, fused':
        ('ours', 'None', True, True),
    'tfp_ffjord.FFJORD, default solver, XLA, fuse=False':
        ('ours', 'None', True, False),
    'tfp_ffjord.FFJORD + DormandPrince(rtol=1e-3, atol=1e-6), adjoint, '
    'XLA, fused':
        ('ours', "ode.DormandPrince(rtol=1e-3, atol=1e-6, "
         "gradient='adjoint').solve", True, True),
    'tfp_ffjord.FFJORD + Tsit5(rtol=1e-3, atol=1e-6), XLA, fused':
        ('ours', "ode.Tsit5(rtol=1e-3, atol=1e-6, gradient='backprop').solve",
         True, True),
    'tfp_ffjord.FFJORD + Tsit5(rtol=1e-3, atol=1e-5), XLA, fused':
        ('ours', "ode.Tsit5(rtol=1e-3, atol=1e-5, gradient='backprop').solve",
         True, True),
    'tfp_ffjord.FFJORD + Tsit5(rtol=1e-2, atol=1e-3), XLA, fused':
        ('ours', "ode.Tsit5(rtol=1e-2, atol=1e-3, gradient='backprop').solve",
         True, True),
}


def load_weights(blocks, path):
  """Sets MLPODE blocks to the weights `bench_peers.export_weights` wrote
  (`w{k}_{j}`, `b{k}_{j}`: block k, layer j, the output layer last); returns
  the batch stored with them."""
  from tfp_ffjord import dynamics  # pylint: disable=g-import-not-at-top
  arrays = np.load(path)
  for k, block in enumerate(blocks):
    targets = dict(dynamics.variable_paths(block))
    layers = sorted({p[:2] for p in targets if p[0] == '_hidden'})
    for j, layer in enumerate(layers + [('_output',)]):
      targets[layer + ('w',)].assign(arrays[f'w{k}_{j}'])
      targets[layer + ('b',)].assign(arrays[f'b{k}_{j}'])
  return arrays['x']


def run_row(name, weights=None):
  """Runs one row in this process; returns its measurements (and, with
  `weights`, the blocks and batch of that file, its log_prob values)."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  import sonnet as snt  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
  import tfp_ffjord  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import ode  # noqa: F401  pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  from bench_training_step import make_blocks, reference_log_prob  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import dynamics  # pylint: disable=g-import-not-at-top
  tfb, tfd = tfp.bijectors, tfp.distributions

  kind, solver, jit, fuse = ROWS[name]
  ode_solve_fn = eval(solver)  # pylint: disable=eval-used
  blocks = make_blocks()
  stored_x = None if weights is None else load_weights(blocks, weights)
  values = [dynamics.variable_paths(b) for b in blocks]
  values = [[(p, v.numpy()) for p, v in layout] for layout in values]
  extra = {} if kind == 'tfb' else {'fuse': fuse}
  cls = tfb.FFJORD if kind == 'tfb' else tfp_ffjord.FFJORD
  bijectors = [cls(state_time_derivative_fn=b, ode_solve_fn=ode_solve_fn,
                   trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact,
                   **extra) for b in blocks]
  flow = tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag([0., 0.], [.8, .8]),
      tfb.Chain(bijectors[::-1]))
  x = tf.constant(sklearn.datasets.make_moons(
      256, noise=.06, random_state=0)[0], tf.float32)
  if stored_x is not None:
    x = tf.constant(stored_x, tf.float32)
  log_prob = tf.function(flow.log_prob, jit_compile=jit)(x).numpy()
  error = float(np.max(np.abs(log_prob - reference_log_prob(values, x))))

  @tf.function(jit_compile=jit)
  def train_step(optimizer, target_sample):   # the colab's step
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(flow.log_prob(target_sample))
    variables = tape.watched_variables()
    gradients = tape.gradient(loss, variables)
    optimizer.apply(gradients, variables)
    return loss

  optimizer = snt.optimizers.Adam(tf.Variable(1e-2, trainable=False))
  start = time.perf_counter()
  train_step(optimizer, x).numpy()
  first = time.perf_counter() - start
  times = []
  for _ in range(STEADY_STEPS):
    start = time.perf_counter()
    train_step(optimizer, x).numpy()
    times.append(time.perf_counter() - start)
  result = dict(name=name, first_step_s=first,
                steady_step_ms=1000 * float(np.median(times)),
                max_error=error)
  if weights is not None:
    result['log_prob'] = log_prob.tolist()
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--row', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--weights', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.row is not None:
    print(json.dumps(run_row(args.row, args.weights)), flush=True)
    return
  rows = []
  for name in ROWS:
    result = subprocess.run([sys.executable, __file__, '--row', name],
                            capture_output=True, text=True, check=False)
    lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
    if result.returncode or not lines:
      raise RuntimeError(f'{name} failed:\n{result.stderr[-3000:]}')
    rows.append(json.loads(lines[-1]))
    print(lines[-1], flush=True)
  ref = rows[0]
  table = [
      '## Drop-in: the colab\'s chain with the class swapped', '',
      '`python benchmarks/bench_dropin.py --out benchmarks/RESULTS.md` '
      '(2-core CPU; each row in a fresh process). TFP\'s colab code (4 '
      'blocks in a `tfb.Chain`, MLP 8-8 tanh, TFP\'s exact trace, Sonnet '
      'Adam creating its slots in the first call, so the step is traced '
      'twice), same initial weights and batch. First step: both traces, '
      'compilation and one step. Steady: median of the next '
      f'{STEADY_STEPS}. Error: the largest |log p(x) - reference| at the '
      'initial weights (reference: Tsit5 at 1e-10 in float64).', '',
      '| row | max log p error | first step (s) | ÷ reference | steady step '
      '(ms) | ÷ reference |', '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    table.append(
        f"| {r['name']} | {r['max_error']:.1e} | {r['first_step_s']:.2f} | "
        f"{r['first_step_s'] / ref['first_step_s']:.3f} | "
        f"{r['steady_step_ms']:.1f} | "
        f"{r['steady_step_ms'] / ref['steady_step_ms']:.3f} |")
  sys.path.insert(0, HERE)
  from bench_training_step import publish  # pylint: disable=g-import-not-at-top
  publish(args.out, '\n'.join(table) + '\n')


if __name__ == '__main__':
  main()
