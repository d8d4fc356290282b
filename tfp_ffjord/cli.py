"""The `tfp-ffjord` command line: train, sample, evaluate, plot, export.

    tfp-ffjord train --out runs/moons            # the seed moons model
    tfp-ffjord train --dataset 8gaussians --epochs 20 --out runs/8g
    tfp-ffjord train --out runs/moons --resume --epochs 60
    tfp-ffjord sample runs/moons -n 1000 --out samples.npy
    tfp-ffjord evaluate runs/moons points.csv
    tfp-ffjord plot runs/moons
    tfp-ffjord export runs/moons --out moons_model   # SavedModel
    tfp-ffjord vi --target banana --out runs/vi-banana  # variational inference

Arguments are checked before TensorFlow is imported, and every error is one
line on stderr (`tfp-ffjord: error: ...`) with a non-zero exit status:
2 for bad arguments, 1 for a failure while running.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys

from tfp_ffjord import compilation_cache
from tfp_ffjord._stderr import quiet_tensorflow_startup
from tfp_ffjord import registry
from tfp_ffjord.training import config as config_lib
from tfp_ffjord.training import run_dir as run_dir_lib

PROG = 'tfp-ffjord'
EXIT_USAGE, EXIT_FAILURE = 2, 1
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as shells report Ctrl-C


class UsageError(Exception):
  """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
  """argparse, but errors are one line and no usage dump."""

  def error(self, message):
    raise UsageError(message)


def _number_type(convert, accept, what):
  """An argparse `type`: `convert(text)`, which must satisfy `accept`."""
  def parse(text):
    try:
      value = convert(text)
    except ValueError:
      value = None
    if value is None or not accept(value):
      raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
    return value
  return parse


_positive_int = _number_type(int, lambda v: v >= 1, 'a positive integer')
_positive_float = _number_type(
    float, lambda v: v > 0 and math.isfinite(v), 'a positive number')
_non_negative_float = _number_type(
    float, lambda v: v >= 0 and math.isfinite(v), 'a non-negative number')
_int = _number_type(int, lambda v: True, 'an integer')
_non_negative_int = _number_type(int, lambda v: v >= 0,
                                 'a non-negative integer')

# `--intra-op-threads auto` gives MLP FFJORD models on data of at most this
# many dimensions one thread per op (measured on the seed moons model: a
# training step 35% faster; on 64-D digits 1.5x slower).
SMALL_DIM = 16


def _threads(text):
  return 'auto' if text == 'auto' else _non_negative_int(text)


def intra_op_threads(setting, config) -> int:
  """The intra-op thread count `--intra-op-threads` asks for (0: leave
  TensorFlow's choice)."""
  if setting != 'auto':
    return setting
  info = registry.DATASETS.get(config.dataset)
  small = info is not None and info.dim <= SMALL_DIM
  return 1 if small and config.model == 'ffjord' else 0


def _hidden(text):
  parts = [p for p in text.replace(',', ' ').split() if p]
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if not sizes or any(s < 1 for s in sizes):
    raise argparse.ArgumentTypeError(
        f'expected layer sizes like 8,8 or 64,64,64, got {text!r}')
  return sizes


_TYPES = {
    'positive-int': _positive_int,
    'int': _int,
    'non-negative-int': _non_negative_int,
    'positive': _positive_float,
    'non-negative': _non_negative_float,
    'sizes': _hidden,
}


def config_options():
  """`(field, flags, argparse keywords)` of every `TrainConfig` field: the
  options of `train`, derived from the config so the two cannot drift."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  options = []
  for f in dataclasses.fields(config_lib.TrainConfig):
    meta = f.metadata
    default = (f.default_factory() if f.default is dataclasses.MISSING
               else f.default)
    name = f.name.replace('_', '-')
    shown = ','.join(map(str, default)) if isinstance(default, tuple) else (
        default)
    help_text = meta['help']
    if meta['kind'] == 'flag' and default:   # a --no-... flag
      help_text = f'turn off: {help_text} (on by default)'
    elif 'default:' not in help_text:
      help_text += f'; default: {shown}'
    kwargs = dict(dest=f.name, help=help_text)
    if meta['kind'] == 'flag':
      flags = meta.get('flags') or ((f'--no-{name}',) if default else
                                    (f'--{name}',))
      kwargs.update(action='store_const', const=not default)
    else:
      flags = meta.get('flags') or (f'--{name}',)
      if meta['kind'] == 'choice':
        kwargs['choices'] = meta['choices']
      else:
        kwargs['type'] = _TYPES[meta['kind']]
    options.append((f, flags, kwargs))
  return options


def _add_config_options(parser):
  for _, flags, kwargs in config_options():
    parser.add_argument(*flags, **kwargs)


def build_parser():
  parser = _Parser(prog=PROG, description='Fit, sample and evaluate FFJORD '
                   'continuous normalizing flows.')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND',
                              parser_class=_Parser)
  sub.required = True

  train = sub.add_parser(
      'train', help='train a flow (default: the seed moons model)',
      description='Train a stack of FFJORD blocks. Defaults are the seed '
      'moons configuration; every option left out keeps its default (or, '
      'with --resume, the value saved in OUT).')
  _add_config_options(train)
  a = train.add_argument
  a('--preset', choices=tuple(registry.PRESETS), default=None,
    help='start from a recipe: ' + '; '.join(
        f'{name}: {p.description}' for name, p in registry.PRESETS.items())
    + '. Options given besides it override its values')
  a('--out', default=None, help='output directory; default: runs/DATASET')
  a('--resume', action='store_true',
    help='continue the run in OUT from its last checkpoint')
  a('--overwrite', action='store_true',
    help='delete a previous run in OUT and start afresh')
  a('--no-progress', action='store_true', help='no progress bar')
  a('--strategy', choices=tuple(registry.STRATEGIES), default='default',
    help='tf.distribute strategy: default (one device), mirrored (all GPUs, '
    'or --cpu-devices CPU devices), multi-worker (cluster from TF_CONFIG), '
    'tpu; default: default')
  a('--cpu-devices', type=_positive_int, default=None,
    help='split the CPU into this many logical devices (for --strategy '
    'mirrored without GPUs)')
  a('--intra-op-threads', type=_threads, default='auto',
    help="threads TensorFlow gives one op: a positive number, 0 for "
    "TensorFlow's own choice, or auto: 1 for an MLP FFJORD on data of up to "
    f'{SMALL_DIM} dimensions (its tiny ops lose more to handing work '
    "between threads than they gain), else TensorFlow's; default: auto")
  a('--collective-timeout', type=_positive_float, default=300.,
    help='multi-worker: seconds before a collective waiting for a dead '
    'worker fails; default: 300')

  sample = sub.add_parser('sample', help='draw samples from a trained flow')
  sample.add_argument('run', help='a training output directory')
  sample.add_argument('-n', '--num', type=_positive_int, default=1000)
  sample.add_argument('--seed', type=_non_negative_int, default=0)
  sample.add_argument('--label', type=_int, default=None,
                      help='conditional models: sample this class only')
  sample.add_argument('--out', default=None,
                      help='.npy or .csv file; default: RUN/samples.npy')

  evaluate = sub.add_parser(
      'evaluate', help='mean negative log-likelihood of points in a file')
  evaluate.add_argument('run', help='a training output directory')
  evaluate.add_argument('file', help='.npy or .csv file of [N, D] points')

  plot = sub.add_parser('plot', help='draw the figures of a trained flow')
  plot.add_argument('run', help='a training output directory')
  plot.add_argument('--out', default=None, help='default: RUN')

  export = sub.add_parser(
      'export', help='save a trained flow as a SavedModel (log_prob, sample)')
  export.add_argument('run', help='a training output directory')
  export.add_argument('--out', default=None,
                      help='a new or empty directory; default: '
                      'RUN/saved_model')
  _add_vi_parser(sub)
  for command in sub.choices.values():
    command.add_argument(
        '--no-xla-cache', action='store_true',
        help='turn off: keep compiled XLA executables on disk for the next '
        'process (on by default, in ~/.cache/tfp_ffjord/xla; '
        'TFP_FFJORD_XLA_CACHE=DIR moves it, =0 turns it off)')
  return parser


def _add_vi_parser(sub):
  vi = sub.add_parser(
      'vi', help='fit a surrogate posterior to an inference_gym target',
      description='Variational inference: fit an FFJORD (or baseline) '
      'surrogate posterior to a target by maximising the ELBO, then compare '
      'its mean and standard deviation with the ground truth.')
  a = vi.add_argument
  a('--target', choices=tuple(registry.VI_TARGETS), default='banana',
    help='; '.join(f'{k}: {v.description}' for k, v in
                   registry.VI_TARGETS.items()) + '; default: banana')
  a('--surrogate', choices=tuple(registry.VI_SURROGATES), default='ffjord',
    help='surrogate family; default: ffjord')
  a('--steps', type=_positive_int, default=2000,
    help='optimizer steps; default: 2000')
  a('--max-seconds', type=_positive_float, default=None,
    help='stop after this wall time (compilation included)')
  a('--learning-rate', type=_positive_float, default=1e-2,
    help='Adam learning rate; default: 0.01')
  a('--sample-size', type=_positive_int, default=64,
    help='Monte Carlo samples per step; default: 64')
  a('--seed', type=_non_negative_int, default=0, help='default: 0')
  a('--blocks', type=_positive_int, default=2,
    help='ffjord: FFJORD blocks; default: 2')
  a('--hidden', type=_hidden, default=[32, 32],
    help='hidden layer sizes (ffjord, iaf); default: 32,32')
  a('--solver', choices=tuple(registry.SOLVERS), default='dopri5',
    help='ffjord: ODE solver; default: dopri5')
  a('--rtol', type=_positive_float, default=1e-3,
    help='ffjord, adaptive solvers; default: 0.001')
  a('--atol', type=_positive_float, default=1e-6,
    help='ffjord, adaptive solvers; default: 1e-06')
  a('--num-solver-steps', type=_positive_int, default=8,
    help='ffjord, fixed-step solvers; default: 8')
  a('--trace', choices=tuple(registry.TRACES), default=None,
    help='ffjord: trace estimator; default: exact up to 16 unconstrained '
    'dimensions, hutchinson above')
  a('--estimator', choices=tuple(registry.VI_ESTIMATORS),
    default='reparameterization',
    help='; '.join(f'{k}: {v}' for k, v in registry.VI_ESTIMATORS.items()))
  a('--fine-tune-learning-rate', type=_positive_float, default=None,
    help='train in two phases: a quarter of the budget at --learning-rate '
    "(a staged surrogate's base alone), the rest at this rate; default: "
    'one phase (staged surrogates: a tenth of --learning-rate)')
  a('--eval-samples', type=_positive_int, default=4096,
    help='draws for the final ELBO and moments; default: 4096')
  a('--out', default=None, help='output directory; default: runs/vi-TARGET')
  a('--overwrite', action='store_true',
    help='replace the files of a previous run in OUT')


# ------------------------------------------------------------------ helpers

def _read_points(path):
  """`[N, D]` float32 points from a .npy or .csv file (clear errors)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'cannot read {path}: no such file')
  try:
    if path.endswith('.npy'):
      points = np.load(path, allow_pickle=False)
    elif path.endswith('.csv') or path.endswith('.txt'):
      points = np.loadtxt(path, delimiter=',', ndmin=2)
    else:
      raise ValueError(f'{path}: expected a .npy or .csv file')
  except (OSError, ValueError) as e:
    if 'expected a .npy' in str(e):
      raise
    raise ValueError(f'cannot parse {path}: {e}') from None
  points = np.asarray(points)
  if points.dtype.kind not in 'fiu':
    raise ValueError(f'{path}: expected numbers, got dtype {points.dtype}')
  if points.ndim == 1:
    points = points[:, None]
  if points.ndim != 2 or len(points) == 0:
    raise ValueError(f'{path}: expected a non-empty [N, D] array, got shape '
                     f'{points.shape}')
  if not np.all(np.isfinite(points)):
    raise ValueError(f'{path}: contains NaN or infinite values')
  return points.astype(np.float32)


def _write_points(path, points):
  """Writes `points` to a `.csv` file, else to `.npy` (`cmd_sample` checks)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.csv'):
    np.savetxt(path, points, delimiter=',')
  else:
    np.save(path, points)


def _train_config(args):
  """The run's config: defaults, or OUT's saved config when resuming."""
  given = {f.name: getattr(args, f.name) for f, _, _ in config_options()
           if getattr(args, f.name) is not None}
  if args.preset:
    given = {**registry.PRESETS[args.preset].settings, **given}
  chief = _chief_of_cluster(args)   # also checks TF_CONFIG
  run = run_dir_lib.RunDir(args.out)
  if args.resume and args.overwrite:
    raise UsageError('--resume and --overwrite exclude each other')
  if args.resume:
    if not os.path.exists(run.config_path):
      raise UsageError(f'--resume: {args.out} holds no run to resume (no '
                       f'{run_dir_lib.CONFIG_FILE})')
    saved = run.read_config()
    for key in config_lib.fixed_on_resume():
      if key in given and _as_saved(given[key]) != saved.get(key):
        raise UsageError(
            f'--resume: --{key.replace("_", "-")} {given[key]} differs from '
            f'the run in {args.out} ({saved.get(key)}); use another --out to '
            'train a different model')
    saved.update(given)
    return config_lib.TrainConfig.from_dict(saved)
  if run.has_run() and chief:
    if not args.overwrite:
      raise UsageError(f'{args.out} already holds a run; pass --resume to '
                       'continue it, --overwrite to replace it, or another '
                       '--out')
    run.clear()
  # A non-chief worker of a cluster: the chief owns OUT (and may just have
  # written it).
  return config_lib.TrainConfig(**given)


def _as_saved(value):
  """A given option as `config.json` holds it (tuples are lists)."""
  return list(value) if isinstance(value, (tuple, list)) else value


def _chief_of_cluster(args) -> bool:
  """False only for a non-chief task of a `--strategy multi-worker` run."""
  if args.strategy != 'multi-worker':
    return True
  try:
    tf_config = json.loads(os.environ.get('TF_CONFIG', '{}'))
  except ValueError:
    raise UsageError('--strategy multi-worker: TF_CONFIG is not valid '
                     'JSON') from None
  task = tf_config.get('task', {})
  cluster = tf_config.get('cluster', {})
  if not task or not cluster:
    raise UsageError('--strategy multi-worker needs TF_CONFIG with '
                     '"cluster" and "task" (see the tf.distribute guide)')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfp_ffjord.training import distribute  # pylint: disable=g-import-not-at-top
  return distribute.is_chief(
      tf.distribute.cluster_resolver.TFConfigClusterResolver())


def _load_run(run):
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(run):
    raise FileNotFoundError(f'{run}: no such directory')
  return training.load_run(run)


# ----------------------------------------------------------------- commands


def _locked(out, command, args):
  """Runs `command(args)` holding `out`'s lock (one writer per directory)."""
  try:
    lock = run_dir_lib.RunDir.for_writing(out, '--out').lock().acquire()
  except run_dir_lib.RunDirBusy as e:
    raise UsageError(f'--out: {e}') from None
  except ValueError as e:   # a path checkpoints cannot be restored from
    raise UsageError(str(e)) from None
  try:
    return command(args)
  finally:
    lock.release()


def cmd_train(args):
  preset = registry.PRESETS[args.preset].settings if args.preset else {}
  args.out = args.out or os.path.join(
      'runs', args.dataset or preset.get('dataset', 'moons'))
  if not _chief_of_cluster(args):   # workers do not write the directory
    return _train(args)
  return _locked(args.out, _train, args)


def _flag_names(error) -> str:
  """A config error's message with each field named by its option."""
  flags = {field.name: names[-1] for field, names, _ in config_options()}

  def option(match):
    name, value = match.group(1), match.group(2)
    if name not in flags:
      return match.group(0)
    return flags[name] if value is None else f'{flags[name]} {value}'
  # `batch_size` -> --batch-size; `model='conv'` -> --model 'conv'.
  return re.sub(r'`(\w+)(?:=([^`]*))?`', option, str(error))


def _train(args):
  try:
    config = _train_config(args)
  except ValueError as e:   # the config's own checks, across fields too
    raise UsageError(_flag_names(e)) from None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  threads = intra_op_threads(args.intra_op_threads, config)
  if threads:
    try:
      tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
      # TensorFlow already ran ops in this process (the command called from
      # Python): its thread pools are fixed.
      pass
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  strategy = training.make_strategy(args.strategy, args.cpu_devices,
                                    args.collective_timeout)
  try:
    trainer = training.Trainer(config, out_dir=args.out, strategy=strategy)
  except ValueError as e:   # options that do not fit the data
    raise UsageError(_flag_names(e)) from None
  if trainer.distributed:
    names = {'mirrored': 'MirroredStrategy', 'tpu': 'TPUStrategy',
             'multi-worker': 'MultiWorkerMirroredStrategy'}
    print(f'{names[args.strategy]}: {trainer.num_replicas} replicas in '
          f'sync, global batch {config.batch_size}'
          + ('' if trainer.is_chief else ' (not the chief)'), flush=True)
  resumed = trainer.restore()
  if not resumed and trainer.is_chief:
    os.makedirs(args.out, exist_ok=True)
    trainer.plot(tag='first')
  start_epoch = int(trainer.epoch.numpy())
  if start_epoch >= config.epochs:
    print(f'{args.out} has already trained {start_epoch} epochs '
          f'(--epochs {config.epochs}); nothing to do')
  try:
    trainer.fit(progress=not args.no_progress)
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.CancelledError) as e:
    reason = re.sub(r'\{\{.*?\}\}\s*', '', str(e.message)).strip()
    raise training.TrainingError(
        'a worker stopped responding (collective failed: '
        f'{reason.splitlines()[0][:200]}); the last checkpoint is the last '
        'good state, continue with --resume') from None
  finally:
    if trainer.history:
      trainer.write_metrics()
  if not trainer.is_chief:
    print(f'worker finished {len(trainer.history)} epochs; the chief wrote '
          f'{args.out}')
    return 0
  written = trainer.plot(tag='last')
  m = trainer.metrics()
  line = f'final test NLL {m["final_test_nll"]:.4f} nats'
  if m['data_entropy'] is not None:
    line += (f' (data entropy {m["data_entropy"]:.3f}, gap '
             f'{m["gap_to_entropy"]:.4f})')
  if 'final_test_bits_per_dim' in m:
    line += f', {m["final_test_bits_per_dim"]:.3f} bits/dim'
  print(f'{line}; {len(trainer.history)} epochs in '
        f'{m["total_wall_time"]:.0f} s; wrote {args.out}/metrics.json, '
        f'{len(written)} figures, checkpoints and logs')
  return 0


def cmd_sample(args):
  out = args.out or os.path.join(args.run, 'samples.npy')
  if not (out.endswith('.npy') or out.endswith('.csv')):
    raise UsageError(f'--out must end in .npy or .csv; got {out}')
  trainer = _load_run(args.run)
  if args.label is not None and not trainer.model.num_classes:
    raise UsageError(f'--label: the model in {args.run} is not conditional')
  if args.label is not None and not (
      0 <= args.label < trainer.model.num_classes):
    raise UsageError(f'--label must be in [0, {trainer.model.num_classes}); '
                     f'got {args.label}')
  points = trainer.sample(args.num, seed=args.seed, labels=args.label)
  _write_points(out, points)
  print(f'wrote {len(points)} samples of dimension {points.shape[1]} to '
        f'{out}')
  return 0


def cmd_evaluate(args):
  points = _read_points(args.file)
  trainer = _load_run(args.run)
  if points.shape[1] != trainer.data.dim:
    raise ValueError(f'{args.file}: points have dimension {points.shape[1]}, '
                     f'the model in {args.run} has {trainer.data.dim}')
  result = trainer.evaluate(points)
  result['num_points'] = int(len(points))
  print(json.dumps(result))
  return 0


def cmd_plot(args):
  trainer = _load_run(args.run)
  written = trainer.plot(out_dir=args.out or args.run, tag='last')
  print('wrote ' + ', '.join(written))
  return 0


def cmd_export(args):
  out = args.out or os.path.join(args.run, 'saved_model')
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UsageError(f'--out: {out} already exists and is not an empty '
                     'directory')
  trainer = _load_run(args.run)
  from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
  path = training.export_saved_model(trainer, out)
  inputs = 'x [N, %d] float32' % trainer.data.dim
  if trainer.model.num_classes:
    inputs += ', labels [N] int32'
  print(f'wrote the SavedModel {path}: log_prob({inputs}), sample(n, seed'
        + (', label' if trainer.model.num_classes else '') + '); load it with '
        'tf.saved_model.load')
  return 0


def cmd_vi(args):
  args.out = args.out or os.path.join('runs', f'vi-{args.target}')
  return _locked(args.out, _vi, args)


def _vi(args):
  out = args.out
  if os.path.exists(os.path.join(out, 'metrics.json')) and not args.overwrite:
    raise UsageError(f'--out: {out} already holds a run; pass --overwrite to '
                     'replace it')
  from tfp_ffjord import vi  # pylint: disable=g-import-not-at-top
  renamed = {'num_steps': 'steps', 'num_eval_samples': 'eval_samples'}
  m = vi.run(vi.VIConfig(**{
      f.name: getattr(args, renamed.get(f.name, f.name))
      for f in dataclasses.fields(vi.VIConfig)}), out, verbose=True)
  errors = ''
  if m['mean_error'] is not None:
    errors = (f'; standardised error of the mean {m["mean_error"]:.3f}, of '
              f'the std {m["std_error"]:.3f}')
  print(f'ELBO {m["elbo"]:.4f} +- {m["elbo_stderr"]:.4f}{errors}')
  print(f'wrote {os.path.join(out, "metrics.json")}, elbo.png, posterior.png')
  return 0


COMMANDS = {'train': cmd_train, 'sample': cmd_sample,
            'evaluate': cmd_evaluate, 'plot': cmd_plot, 'export': cmd_export,
            'vi': cmd_vi}


def main(argv=None):
  try:
    args = build_parser().parse_args(argv)
  except UsageError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return EXIT_USAGE
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Before TensorFlow loads: it reads its XLA flags once, on import.
  compilation_cache.configure(default_on=not args.no_xla_cache)
  with quiet_tensorflow_startup():
    return _run(args)


def _run(args):
  try:
    return COMMANDS[args.command](args)
  except UsageError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt as e:
    # TrainingInterrupted says where it stopped and what it saved.
    print(f'{PROG}: {e}' if str(e) else f'{PROG}: interrupted',
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    from tfp_ffjord import training  # pylint: disable=g-import-not-at-top
    if isinstance(e, (ValueError, FileNotFoundError, OSError,
                      training.TrainingError)):
      print(f'{PROG}: error: {e}', file=sys.stderr)
      return EXIT_FAILURE
    raise


if __name__ == '__main__':
  sys.exit(main())
