"""First training step in fresh processes, with and without the XLA cache.

Each process imports tfp_ffjord (which sets up the persistent XLA cache
from `TFP_FFJORD_XLA_CACHE`, as `tfp-ffjord train` does by default), builds
the `tfp-ffjord train` default `Trainer` (the seed moons model: 4 blocks,
MLP 8-8 tanh, exact trace, `StackedFFJORD`, Tsit5 rtol 1e-3 / atol 1e-5 with
backprop) and times the first call of its XLA-compiled training step on 256
points (tracing, compilation or loading, one step), then the median of the
next steps. The processes run one after another: first with the cache off, then
with one fresh cache directory shared by all of them, so the first of those
compiles and writes, and the later ones load what an earlier one wrote
(when their HLO matches; see `tfp_ffjord.compilation_cache`).

  python benchmarks/bench_second_process.py [--processes 6] \
      [--out benchmarks/RESULTS.md]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CHILD = r'''
import json, statistics, time
start = time.perf_counter()
import tfp_ffjord   # first: it sets up the cache before TensorFlow loads
import tensorflow
import tensorflow_probability
from tfp_ffjord import training
imported = time.perf_counter() - start
# The step `tfp-ffjord train` runs with its defaults (the seed model).
trainer = training.Trainer(training.TrainConfig())
batch = trainer.data.train[:trainer.config.batch_size]
start = time.perf_counter()
trainer.train_step(batch)
first = time.perf_counter() - start
times = []
for _ in range(10):
  start = time.perf_counter()
  trainer.train_step(batch)
  times.append(time.perf_counter() - start)
print('RESULT', json.dumps(dict(import_s=imported, first_step=first,
                                step=statistics.median(times))))
'''


def run_child(cache, threads=0):
  env = dict(os.environ, TFP_FFJORD_XLA_CACHE=cache, TF_CPP_MIN_LOG_LEVEL='0',
             TF_CPP_VMODULE='device_executable_persistor=1')
  if threads:
    env['TF_NUM_INTRAOP_THREADS'] = str(threads)
  env.pop('TF_XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', CHILD], env=env,
                          capture_output=True, text=True, check=False)
  lines = [line for line in result.stdout.splitlines()
           if line.startswith('RESULT ')]
  if result.returncode or not lines:
    raise RuntimeError(result.stderr[-3000:])
  out = json.loads(lines[0][len('RESULT '):])
  out['loaded'] = 'Loading cached entry' in result.stderr
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--processes', type=int, default=6,
                      help='processes with the cache on (and 2 without)')
  parser.add_argument('--intra-op-threads', type=int, default=0,
                      help="threads per op in the processes (0: TensorFlow's "
                      'choice; `tfp-ffjord train` uses 1 for this model)')
  parser.add_argument('--out', default=None,
                      help='append the table to this Markdown file')
  args = parser.parse_args(argv)
  rows = []
  for i in range(2):
    rows.append(('off', i + 1, run_child('0', args.intra_op_threads)))
    print(rows[-1], flush=True)
  with tempfile.TemporaryDirectory() as cache:
    for i in range(args.processes):
      rows.append(('on', i + 1, run_child(cache, args.intra_op_threads)))
      print(rows[-1], flush=True)
    entries = len([n for n in os.listdir(cache) if n.endswith('.pb')])
  # Imported here: it loads TensorFlow, which the timed children need, not
  # this process.
  from bench_training_step import publish, thread_labels  # pylint: disable=g-import-not-at-top
  threads, suffix = thread_labels(args.intra_op_threads)
  lines = [
      '## First training step in a fresh process: the persistent XLA cache'
      + suffix,
      '',
      f'`python benchmarks/bench_second_process.py --processes '
      f'{args.processes}{threads}` (2-core CPU, processes one after another). The '
      'training step of `tfp-ffjord train` with its defaults (the seed moons '
      'model: `StackedFFJORD`, Tsit5 1e-3 / 1e-5, backprop, XLA; '
      '`training.Trainer(TrainConfig()).train_step`), first call: tracing, then XLA compilation or loading '
      'the cached executable, one step. "import" is `import tfp_ffjord` plus '
      'TensorFlow and TFP. With the cache on, all processes share one '
      f'fresh directory; it held {entries} '
      f'entr{"y" if entries == 1 else "ies"} at the end (one per distinct '
      'HLO of the step).',
      '',
      '| cache | process | loaded from the cache | import (s) | first step '
      '(s) | steady step (ms) |',
      '|---|---:|---|---:|---:|---:|']
  for cache, i, r in rows:
    lines.append(f'| {cache} | {i} | {"yes" if r["loaded"] else "no"} | '
                 f'{r["import_s"]:.1f} | {r["first_step"]:.2f} | '
                 f'{1000 * r["step"]:.1f} |')
  publish(args.out, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
