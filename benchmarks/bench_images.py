"""Image flows at equal training time: FFJORD models against TFP's RealNVP,
MAF and Glow, all trained by the same `Trainer` on the same data.

Each model trains for `--seconds` of training steps (evaluations excluded;
`TrainConfig.max_train_seconds`), evaluated on the held-out set after every
`epoch` of its own `steps_per_epoch`. Reported: held-out bits/dim of the
discrete images at the end and over time (a figure), steps taken, and for
FFJORD models the NFE per step. FFJORD models are evaluated with
Hutchinson's estimator above 64 dimensions (unbiased for log p).

Sample quality: a classifier trained on the dataset's real training images
(`tfp_ffjord.sample_quality`) scores 1,000 samples of each model, and the
real held-out images: the mean top-class probability and the entropy of the
histogram of predicted classes (`--samples-dir` also writes each model's
sample grid).

    python benchmarks/bench_images.py --dataset digits --seconds 300 \
        --threads 1 --out benchmarks/RESULTS.md

`--threads 1` pins the process to one core (and one TensorFlow thread), so
two benchmarks, or a benchmark and other work, can share the 2-core machine
without disturbing each other's timings.
"""

import argparse
import json
import os
import sys
import time

# Model name -> TrainConfig overrides (on top of COMMON[dataset]).
# FFJORD's conv models run without XLA: on this CPU, XLA made a multiscale
# training step 7.6x slower (2.9 s against 0.38 s, digits, batch 128, one
# core); TFP's Glow and the dense models are as fast or faster with it.
FFJORD_CONV = dict(levels=2, blocks=2, hidden=(32, 32), solver='rk4',
                   num_steps=4, trace='hutchinson', jit_compile=False,
                   steps_per_epoch=100)
MODELS = {
    'ffjord-multiscale': dict(FFJORD_CONV, model='multiscale'),
    'ffjord-multiscale-rnode': dict(FFJORD_CONV, model='multiscale',
                                    kinetic_weight=0.01,
                                    jacobian_weight=0.01),
    # RNODE on images: the same multiscale model trained with an adaptive
    # solver (Tsit5 at rtol = atol = 1e-3), unregularised and regularised,
    # so the NFE per step is the model's own (the RNODE paper's comparison).
    'ffjord-multiscale-tsit5': dict(FFJORD_CONV, model='multiscale',
                                    solver='tsit5', rtol=1e-3, atol=1e-3,
                                    steps_per_epoch=50),
    'ffjord-multiscale-tsit5-rnode': dict(FFJORD_CONV, model='multiscale',
                                          solver='tsit5', rtol=1e-3,
                                          atol=1e-3, steps_per_epoch=50,
                                          kinetic_weight=0.01,
                                          jacobian_weight=0.01),
    'ffjord-conv-fm': dict(model='conv', blocks=1, hidden=(64, 64, 64),
                           objective='flow-matching', jit_compile=False,
                           steps_per_epoch=500),
    # A U-Net velocity field (GroupNorm, skips, sinusoidal time embedding).
    'ffjord-unet-fm': dict(model='unet', blocks=1, hidden=(32, 64),
                           activation='swish', objective='flow-matching',
                           jit_compile=False, steps_per_epoch=500),
    # The discrete flows overfit digits' 1,497 images within ~1,000 steps:
    # evaluated every 100 steps, so their best held-out point is seen.
    'realnvp': dict(model='realnvp', blocks=8, hidden=(256, 256),
                    steps_per_epoch=100),
    'maf': dict(model='maf', blocks=5, hidden=(256, 256),
                steps_per_epoch=100),
    'glow': dict(model='glow', levels=2, blocks=4, hidden=(64,),
                 steps_per_epoch=100),
}
COMMON = {
    'digits': dict(dataset='digits', batch_size=128, learning_rate=1e-3,
                   lr_schedule='constant', base_scale=1.0, activation='softplus',
                   eval_rtol=1e-4, eval_atol=1e-4, eval_trace='hutchinson',
                   eval_batch_size=300, epochs=100000, clip_norm=10.),
    'mnist': dict(dataset='mnist', batch_size=64, learning_rate=1e-3,
                  lr_schedule='constant', base_scale=1.0,
                  activation='softplus', logit_alpha=1e-3, eval_rtol=1e-3,
                  eval_atol=1e-3, eval_batch_size=500, epochs=100000,
                  clip_norm=10.),
}


def pin(threads, first_cpu=0):
  """Pins this process to `threads` CPUs from `first_cpu` on and
  TensorFlow's thread pools to `threads` (before TensorFlow starts)."""
  if threads:
    os.sched_setaffinity(0, set(range(first_cpu, first_cpu + threads)))
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


NUM_SCORED = 1000   # samples scored per model


def run_model(name, dataset, seconds, seed, classifier=None,
              samples_dir=None, runs_dir=None, overrides=None):
  from tfp_ffjord import plotting  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import sample_quality  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  kw = dict(COMMON[dataset])
  kw.update(MODELS[name])
  kw.update(overrides or {})
  kw.update(max_train_seconds=seconds, seed=seed)
  config = training.TrainConfig(**kw)
  if overrides:   # a tuning run is named by what it changed
    name += '[' + ','.join(f'{k}={v}' for k, v in overrides.items()) + ']'

  start = time.perf_counter()
  # With `runs_dir`, each epoch is checkpointed into a run directory with its
  # metrics.json: a run stopped early continues where it was (its
  # `max_train_seconds` counts the training time of both processes).
  # (No brackets in the directory: checkpoints are found by glob pattern.)
  out_dir = None if runs_dir is None else os.path.join(
      runs_dir, f'{dataset}_{name}'.replace('[', '_').replace(']', ''))
  trainer = training.Trainer(config, out_dir)
  untrained = trainer.evaluate()
  history = trainer.fit(progress=False)
  total = time.perf_counter() - start
  params = sum(int(v.shape.num_elements()) for v in trainer.variables)
  last = history[-1]
  scores = None
  if classifier is not None:
    samples = trainer.sample(NUM_SCORED, seed=seed)
    scores = sample_quality.score(classifier, samples)
    if samples_dir:
      plotting.plot_image_samples(
          os.path.join(samples_dir, f'{dataset}_{name}.png'), samples[:100],
          trainer.data.image_shape, title=name)
  return dict(sample_scores=scores,
      name=name, config=config.to_dict(), params=params,
      untrained_bits_per_dim=untrained['bits_per_dim'],
      bits_per_dim=last['test_bits_per_dim'], steps=len(history) *
      trainer.steps_per_epoch, train_time=last['train_time'],
      total_time=total, nfe_per_step=last['nfe_per_step'],
      eval_nfe=last['eval_nfe'],
      curve=[(h['train_time'], h['test_bits_per_dim']) for h in history],
      nfe_curve=[h['nfe_per_step'] for h in history])


def _overrides(pairs):
  """`KEY=VALUE` strings as TrainConfig fields: numbers, comma-separated
  sizes (`hidden=32,64`), booleans, else strings."""
  out = {}
  for pair in pairs:
    key, _, text = pair.partition('=')
    if key == 'hidden':
      out[key] = tuple(int(x) for x in text.split(','))
    elif text in ('true', 'false'):
      out[key] = text == 'true'
    else:
      try:
        out[key] = int(text) if text.lstrip('-').isdigit() else float(text)
      except ValueError:
        out[key] = text
  return out


def table(results, dataset, seconds, command, real_scores=None):
  rows = [f'## Image flows on `{dataset}` at equal training time', '',
          f'Each model: {seconds:.0f} s of training steps, one core. Command: '
          f'`{command}`', '',
          '| model | parameters | steps | held-out bits/dim at the end '
          '(untrained) | best held-out bits/dim (at s) | NFE per step | '
          'sample confidence | sample class entropy |',
          '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in results:
    when, best = min(r['curve'], key=lambda c: c[1])
    nfe = '—' if not r['nfe_per_step'] else f'{r["nfe_per_step"]:.0f}'
    rows.append(f'| {r["name"]} | {r["params"]:,} | {r["steps"]:,} | '
                f'{r["bits_per_dim"]:.4g} ({r["untrained_bits_per_dim"]:.3g})'
                f' | {best:.3f} ({when:.0f}) | {nfe} | '
                + _scores(r.get('sample_scores')) + ' |')
  if real_scores is not None:
    rows.append('| real held-out images | | | | | | '
                + _scores(real_scores) + ' |')
  return '\n'.join(rows) + '\n'


def _scores(scores):
  if not scores:
    return '— | —'
  failed = scores.get('non_finite')
  failed = f'; {failed} non-finite' if failed else ''
  return (f'{scores["confidence"]:.3f}{failed} | '
          f'{scores["class_entropy"]:.3f} '
          f'(max {scores["max_class_entropy"]:.3f})')


RNODE_PAIR = ('ffjord-multiscale-tsit5', 'ffjord-multiscale-tsit5-rnode')
# A run has reached the level at its first evaluation at most this above it.
EQUAL_BITS = 0.01


def rnode_table(results):
  """The RNODE comparison at equal held-out bits/dim, if both runs of
  `RNODE_PAIR` are in `results`: the level is the worse of the two runs'
  best bits/dim; for each run, the first evaluation at or below the level
  plus `EQUAL_BITS`, its training time, the NFE per step of the epoch that
  reached it and the mean NFE per step of the whole run up to it."""
  # A tuning run's name carries its overrides ('name[rtol=1e-05,...]').
  found = {r['name'].split('[')[0]: r for r in results}
  if not all(n in found for n in RNODE_PAIR):
    return ''
  level = max(min(b for _, b in found[n]['curve']) for n in RNODE_PAIR)
  rows = ['### RNODE at equal held-out bits/dim', '',
          f'Level: {level:.3f} bits/dim (the worse run\'s best); each run at '
          f'its first evaluation at or below {level + EQUAL_BITS:.3f}.', '',
          '| run | bits/dim there | training time to it (s) | steps | NFE '
          'per step there | mean NFE per step until then | NFE per step: '
          'first epoch, last epoch (its bits/dim) |',
          '|---|---:|---:|---:|---:|---:|---|']
  reached = {}
  for name in RNODE_PAIR:
    r = found[name]
    per_epoch = r['steps'] // len(r['curve'])
    for i, ((t, b), nfe) in enumerate(zip(r['curve'], r['nfe_curve'])):
      if b <= level + EQUAL_BITS:
        mean = sum(r['nfe_curve'][:i + 1]) / (i + 1)
        reached[name] = (t, nfe, mean)
        growth = (f'{r["nfe_curve"][0]:.1f}, {r["nfe_curve"][-1]:.1f} '
                  f'({r["curve"][-1][1]:.3f} after '
                  f'{r["curve"][-1][0]:.0f} s)')
        rows.append(f'| {name} | {b:.3f} | {t:.0f} | {(i + 1) * per_epoch} | '
                    f'{nfe:.1f} | {mean:.1f} | {growth} |')
        break
  (t0, n0, m0), (t1, n1, m1) = (reached[n] for n in RNODE_PAIR)
  rows += ['', f'RNODE: {n0 / n1:.2f}x fewer NFE per step at that point '
           f'({m0 / m1:.2f}x on average until then), {t0 / t1:.2f}x less '
           'training time to reach it.']
  return '\n'.join(rows) + '\n'


def plot(results, path, dataset):
  """Held-out bits/dim against training time; beside it, for the ODE
  models, the NFE per training step (how the dynamics stiffen)."""
  from tfp_ffjord import plotting  # pylint: disable=g-import-not-at-top
  ode_runs = [r for r in results if any(r.get('nfe_curve') or ())]
  fig, axes = plotting._subplots(  # pylint: disable=protected-access
      1, 2 if ode_runs else 1, figsize=(12 if ode_runs else 6, 4),
      squeeze=False)
  ax = axes[0, 0]
  for r in results:
    t, b = zip(*r['curve'])
    ax.plot(t, b, marker='.', label=r['name'])
  lowest = min(b for r in results for _, b in r['curve'])
  # Overfitting baselines climb to thousands of bits/dim: clip the axis.
  ax.set_ylim(lowest - 0.2, lowest + 3.)
  ax.set_xlabel('training time (s)')
  ax.set_ylabel('held-out bits/dim')
  ax.set_title(f'{dataset}: bits/dim against training time')
  ax.legend()
  if ode_runs:
    ax = axes[0, 1]
    for r in ode_runs:
      t = [c[0] for c in r['curve']]
      ax.plot(t, r['nfe_curve'], marker='.', label=r['name'])
    ax.set_xlabel('training time (s)')
    ax.set_ylabel('NFE per training step (epoch mean)')
    ax.set_title('function evaluations per step')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', choices=sorted(COMMON), default='digits')
  parser.add_argument('--seconds', type=float, default=300.)
  parser.add_argument('--models', nargs='+', default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument('--threads', type=int, default=0,
                      help='pin to this many CPUs (0: all)')
  parser.add_argument('--first-cpu', type=int, default=0,
                      help='with --threads: the first CPU to pin to')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='raw results')
  parser.add_argument('--figure', default=None, help='bits/dim curves (png)')
  parser.add_argument('--from-json', nargs='+', default=None,
                      help='only tabulate previous --json files (a later '
                      "file's model replaces an earlier one's)")
  parser.add_argument('--out', default=None, help='results file to update')
  parser.add_argument('--samples-dir', default=None,
                      help='write each model\'s sample grid here')
  parser.add_argument('--set', nargs='+', default=(), metavar='KEY=VALUE',
                      help='TrainConfig fields to override for every model '
                      '(tuning runs; e.g. learning_rate=3e-3 hidden=128)')
  parser.add_argument('--runs-dir', default=None,
                      help='checkpoint each model into a run directory here '
                      '(metrics.json per epoch; a rerun continues it)')
  parser.add_argument('--no-scores', action='store_true',
                      help='skip the classifier scores of the samples')
  args = parser.parse_args(argv)
  command = 'python benchmarks/bench_images.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  real_scores = None
  if args.from_json:
    merged = {}
    for path in args.from_json:
      for r in json.load(open(path)):
        if r.get('name') == 'real':
          real_scores = r['sample_scores']
        else:
          merged[r['name']] = r
    results = list(merged.values())
  else:
    pin(args.threads, args.first_cpu)
    classifier = None
    if not args.no_scores:
      from tfp_ffjord import datasets  # pylint: disable=g-import-not-at-top
      from tfp_ffjord import sample_quality  # pylint: disable=g-import-not-at-top
      data = datasets.load(args.dataset, seed=args.seed)
      trained = sample_quality.train_classifier(data, seed=args.seed)
      classifier = trained.classifier
      real_scores = sample_quality.score(classifier, data.test[:NUM_SCORED])
      print(f'classifier: {trained.test_accuracy:.3f} held-out accuracy; '
            f'real images {real_scores}', flush=True)
    results = []
    for name in args.models:
      results.append(run_model(name, args.dataset, args.seconds, args.seed,
                               classifier, args.samples_dir, args.runs_dir,
                               _overrides(args.set)))
      r = results[-1]
      print(f'{name}: {r["bits_per_dim"]:.3f} bits/dim after {r["steps"]} '
            f'steps ({r["train_time"]:.0f} s training, {r["total_time"]:.0f} '
            's in all)', flush=True)
      if args.json:   # after each model: a long run keeps what it has
        real = ([dict(name='real', sample_scores=real_scores)]
                if real_scores else [])
        json.dump(results + real, open(args.json, 'w'), indent=1)
  if args.figure:
    plot(results, args.figure, args.dataset)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from bench_training_step import publish  # pylint: disable=g-import-not-at-top
  publish(args.out, table(results, args.dataset, args.seconds, command,
                          real_scores) + '\n' + rnode_table(results))


if __name__ == '__main__':
  main()
