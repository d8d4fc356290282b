"""The seed training step against JAX/diffrax and PyTorch/torchdiffeq.

The seed moons model (4 FFJORD blocks, MLP 8-8 tanh, base N(0, 0.8^2 I),
exact trace, 256 points, Adam 1e-2) with the same initial weights in each
framework, one after the other:
  * tfp_ffjord: `Trainer.train_step`, the step `tfp-ffjord train` runs
    (`StackedFFJORD` on packed blocks, Tsit5 at rtol 1e-3, atol 1e-5,
    backprop, XLA: the default), the same at rtol 1e-2, atol 1e-3, and the
    default with the adjoint gradient;
  * tfp_ffjord as the drop-in user runs it: TFP's colab step with
    `tfb.FFJORD` swapped for `tfp_ffjord.FFJORD` (a `tfb.Chain` of 4 blocks,
    fused; default solver; Sonnet Adam creating its slots in the first call,
    so the step is traced twice), in a fresh process (`bench_dropin.py`);
  * JAX + diffrax, Tsit5 and Dopri5 (backprop through the solve, diffrax's
    default) and Tsit5 with `BacksolveAdjoint`, `jax.jit` of the whole step
    (`peers/jax_diffrax.py`);
  * PyTorch + torchdiffeq, dopri5, eager (`peers/torch_torchdiffeq.py`);
each peer at several tolerances. Accuracy: the largest |log p(x) - reference|
at the initial weights, the reference being SciPy's DOP853 at 1e-12 on the
same model written out in NumPy (`peers/model.py`). "At equal accuracy"
takes, for each peer, the loosest tolerance whose error is at most that of
one of our configurations.

The peers run in a separate Python (`--peer-python`) that has jax, diffrax,
torch and torchdiffeq; tfp_ffjord's own environment does not need them:
  python -m venv /tmp/peers
  /tmp/peers/bin/pip install "jax[cpu]" diffrax torch torchdiffeq scipy
  python benchmarks/bench_peers.py --peer-python /tmp/peers/bin/python \
      [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfp_ffjord import datasets  # noqa: E402
from tfp_ffjord import ode  # noqa: E402
from tfp_ffjord import training  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, 'peers'))
from bench_training_step import publish  # noqa: E402
import model as numpy_model  # noqa: E402

BATCH = 256
STEADY_STEPS = 20


def seed_model():
  tf.random.set_seed(0)
  return training.FlowModel(dim=2, blocks=4, hidden=(8, 8))


def export_weights(flow_model, x, path):
  arrays = {'x': x}
  stacked = flow_model.stacked_dynamics   # MLPODE blocks, stacked
  for k in range(stacked.num_blocks):
    values = {path: v.numpy() for path, v in stacked.block_values(k)}
    layers = sorted({path[:2] for path in values if path[0] == '_hidden'})
    for j, layer in enumerate(layers + [('_output',)]):
      arrays[f'w{k}_{j}'] = values[layer + ('w',)]
      arrays[f'b{k}_{j}'] = values[layer + ('b',)]
  np.savez(path, **arrays)


# Our configurations: the `tfp-ffjord train` default, a loose one, and the
# default with the adjoint gradient (`--gradient adjoint`).
OURS = [(1e-3, 1e-5, 'backprop'), (1e-2, 1e-3, 'backprop'),
        (1e-3, 1e-5, 'adjoint')]


def ours(x, reference, rtol, atol, gradient):
  solver = ode.Tsit5(rtol=rtol, atol=atol, gradient=gradient)
  probe = seed_model()
  dist, _ = probe.flow(solver, 'exact')
  error = float(np.max(np.abs(
      tf.function(dist.log_prob, jit_compile=True)(x).numpy() - reference)))
  del probe, dist

  # The step `tfp-ffjord train` runs (`Trainer.train_step`: XLA, autograph
  # off, solver checks, the loss and NFE back on the host), on the seed
  # weights.
  trainer = training.Trainer(training.TrainConfig(
      rtol=rtol, atol=atol, batch_size=BATCH, gradient=gradient))
  for mine, seed in zip(trainer.model.trainable_variables,
                        seed_model().trainable_variables):
    mine.assign(seed)
  batch = x.numpy()
  start = time.perf_counter()
  trainer.train_step(batch)
  first = time.perf_counter() - start
  times = []
  for _ in range(STEADY_STEPS):
    start = time.perf_counter()
    trainer.train_step(batch)
    times.append(time.perf_counter() - start)
  name = 'tfp_ffjord Tsit5 (XLA)' + (
      '' if gradient == 'backprop' else f', {gradient}')
  return dict(implementation=name, rtol=rtol, atol=atol,
              max_error=error, first_step_s=first,
              steady_step_ms=1000 * float(np.median(times)),
              version=f'tensorflow {tf.__version__}')


# The drop-in user's path, as `bench_dropin.py` runs it (TFP's colab code,
# `tfb.FFJORD` swapped for `tfp_ffjord.FFJORD`, default solver, blocks fused
# in the `tfb.Chain`, `jit_compile=True`), in a fresh process on these
# weights.
COLAB_ROW = 'tfp_ffjord.FFJORD, default solver, XLA, fused'


def colab_chain(weights, reference):
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, 'bench_dropin.py'), '--row',
       COLAB_ROW, '--weights', weights], capture_output=True, text=True,
      check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    raise RuntimeError(f'bench_dropin failed:\n{result.stderr[-3000:]}')
  row = json.loads(lines[-1])
  return dict(
      implementation="tfp_ffjord: the colab's tfb.Chain, class swapped "
      '(fused, XLA)', rtol=1e-3, atol=1e-6,
      max_error=float(np.max(np.abs(np.array(row['log_prob']) - reference))),
      first_step_s=row['first_step_s'], steady_step_ms=row['steady_step_ms'],
      version=f'tensorflow {tf.__version__}')


def peer(python, script, weights):
  result = subprocess.run([python, os.path.join(HERE, 'peers', script),
                           weights], capture_output=True, text=True,
                          check=False)
  rows = [json.loads(line) for line in result.stdout.splitlines()
          if line.startswith('{')]
  if result.returncode or not rows:
    raise RuntimeError(f'{script} failed:\n{result.stderr[-3000:]}')
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peer-python', required=True)
  parser.add_argument('--out', default=None)
  parser.add_argument('--one-core', type=int, default=None, metavar='CPU',
                      help='pin this process and the peers to CPU number '
                      'CPU: every framework single-core (`tfp-ffjord train` '
                      'runs this model with one intra-op thread)')
  args = parser.parse_args(argv)
  if args.one_core is not None:
    os.sched_setaffinity(0, {args.one_core})   # inherited by the peers
  where = ('one core of a 2-core CPU' if args.one_core is not None
           else '2-core CPU')
  flag = (f' --one-core {args.one_core}' if args.one_core is not None
          else '')

  x = datasets.load('moons', seed=0).train[:BATCH].astype(np.float32)
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, 'weights.npz')
    export_weights(seed_model(), x, weights)
    params, _ = numpy_model.load(weights)
    reference = numpy_model.reference_log_prob(params, x)
    rows = [ours(tf.constant(x), reference, *config) for config in OURS]
    rows.append(colab_chain(weights, reference))
    for row in rows:
      print(json.dumps(row), flush=True)
    for script in ('jax_diffrax.py', 'torch_torchdiffeq.py'):
      for row in peer(args.peer_python, script, weights):
        print(json.dumps(row), flush=True)
        rows.append(row)

  mine = rows[0]
  lines = [
      '## Peers: JAX/diffrax and PyTorch/torchdiffeq, same model and weights'
      + (' (one core)' if args.one_core is not None else ''),
      '',
      f'`python benchmarks/bench_peers.py --peer-python PYTHON{flag}` '
      f'({where}; '
      + ', '.join(sorted({r['version'] for r in rows})) + '). The seed moons '
      'training step (4 blocks, MLP 8-8 tanh, exact trace, 256 points, Adam),'
      ' the same initial weights everywhere. Error: the largest |log p(x) - '
      "reference| at the initial weights (reference: SciPy's DOP853 at 1e-12 "
      'in float64). First step: trace, compile and run. Steady step: median '
      f'of the next {STEADY_STEPS} (10 for PyTorch). Our rows time '
      '`Trainer.train_step`, the step `tfp-ffjord train` runs (packed '
      'blocks, XLA, solver checks, loss and NFE returned to the host). '
      'Ratios against our first row (the `tfp-ffjord train` default).',
      '',
      '| implementation | rtol / atol | max log p error | first step (s) | '
      'steady step (ms) | steady step ÷ ours |',
      '|---|---|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
        f'| {r["implementation"]} | {r["rtol"]:g} / {r["atol"]:g} | '
        f'{r["max_error"]:.1e} | {r["first_step_s"]:.1f} | '
        f'{r["steady_step_ms"]:.1f} | '
        f'{r["steady_step_ms"] / mine["steady_step_ms"]:.2f} |')
  peers = [r for r in rows if not r['implementation'].startswith('tfp_ffjord')]
  for m in rows[:len(OURS) + 1]:
    lines += ['', f'At the accuracy of {m["implementation"]} at rtol '
              f'{m["rtol"]:g} / atol {m["atol"]:g} (error '
              f'{m["max_error"]:.1e}): each peer at its loosest tolerance '
              'whose error is at most that.', '',
              '| implementation | rtol / atol | first step ÷ ours | steady '
              'step ÷ ours |', '|---|---|---:|---:|']
    for name in dict.fromkeys(r['implementation'] for r in peers):
      candidates = [r for r in peers if r['implementation'] == name]
      good = [r for r in candidates if r['max_error'] <= m['max_error']]
      r = good[0] if good else candidates[-1]
      note = '' if good else ' (never as accurate: its tightest shown)'
      lines.append(
          f'| {name}{note} | {r["rtol"]:g} / {r["atol"]:g} | '
          f'{r["first_step_s"] / m["first_step_s"]:.2f} | '
          f'{r["steady_step_ms"] / m["steady_step_ms"]:.2f} |')
  publish(args.out, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
