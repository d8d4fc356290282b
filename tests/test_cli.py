"""The `tfp-ffjord` command line: a real run in a subprocess, and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfp_ffjord import cli

TINY = ['--dataset', 'moons', '--num-train', '256', '--num-test', '128',
        '--batch-size', '64', '--blocks', '1', '--hidden', '8',
        '--solver', 'rk4', '--num-steps', '4', '--no-progress']


def run_cli(*args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', 'tfp_ffjord', *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=env)


@pytest.mark.slow
def test_train_sample_evaluate_plot_resume(tmp_path, capsys):
  # Training in a real subprocess; the commands on its output in this
  # process (`cli.main`, as the entry point calls it), which saves a
  # TensorFlow start-up each.
  out = str(tmp_path / 'run')
  res = run_cli('train', *TINY, '--epochs', '2', '--out', out)
  assert res.returncode == 0, res.stderr
  assert 'final test NLL' in res.stdout
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  epochs = metrics['epochs']
  assert [e['epoch'] for e in epochs] == [1, 2] and metrics['complete']
  for key in ('train_loss', 'test_nll', 'nfe_per_step', 'wall_time'):
    assert all(np.isfinite(e[key]) for e in epochs)
  assert epochs[-1]['test_nll'] < epochs[0]['train_loss']
  for png in ('panels_first.png', 'panels_last.png', 'density.png',
              'trajectories.png', 'curves.png'):
    assert os.path.getsize(os.path.join(out, png)) > 5000, png

  samples = str(tmp_path / 'samples.csv')
  assert cli.main(['sample', out, '-n', '300', '--out', samples]) == 0
  points = np.loadtxt(samples, delimiter=',')
  assert points.shape == (300, 2) and np.all(np.isfinite(points))

  capsys.readouterr()
  assert cli.main(['evaluate', out, samples]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result['num_points'] == 300 and np.isfinite(result['nll'])

  assert cli.main(['plot', out, '--out', str(tmp_path / 'figs')]) == 0
  assert os.path.getsize(tmp_path / 'figs' / 'density.png') > 5000

  res = run_cli('train', '--out', out, '--resume', '--epochs', '3',
                '--no-progress')
  assert res.returncode == 0, res.stderr
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  assert [e['epoch'] for e in metrics['epochs']] == [1, 2, 3]
  # The first two epochs are the saved ones, untouched.
  assert metrics['epochs'][:2] == epochs


@pytest.mark.slow
def test_argument_error_is_one_line_without_traceback():
  res = run_cli('train', '--epochs', '-2')
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert lines == ["tfp-ffjord: error: argument --epochs: expected a "
                   "positive integer, got '-2'"]


@pytest.mark.parametrize('argv,match', [
    (['train', '--dataset', 'cifar10'], "argument --dataset: invalid choice: "
     "'cifar10'"),
    (['train', '--solver', 'rk45'], "argument --solver: invalid choice"),
    (['train', '--epochs', '0'], 'argument --epochs: expected a positive'),
    (['train', '--rtol', 'abc'], 'argument --rtol: expected a positive'),
    (['train', '--hidden', '8,x'], 'argument --hidden: expected layer sizes'),
    (['train', '--colour', 'red'], 'unrecognized arguments: --colour red'),
    (['fly'], "invalid choice: 'fly'"),
    (['train', '--strategy', 'multi-worker'], 'needs TF_CONFIG'),
    (['train', '--strategy', 'gpus'], "argument --strategy: invalid choice"),
    (['train', '--cpu-devices', '0'], 'argument --cpu-devices: expected a '
     'positive'),
    (['train', '--intra-op-threads', '-1'], 'argument --intra-op-threads: '
     'expected a non-negative integer'),
    ([], 'the following arguments are required: COMMAND'),
])
def test_bad_arguments_give_one_line(capsys, argv, match):
  assert cli.main(argv) == cli.EXIT_USAGE
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('tfp-ffjord: error: ')
  assert match in err[0]


def test_intra_op_threads_auto_is_one_for_small_mlp_flows_only(tmp_path):
  from tfp_ffjord.training import config as config_lib  # pylint: disable=g-import-not-at-top

  def threads(argv):
    args = cli.build_parser().parse_args(['train'] + argv)
    args.out = str(tmp_path / 'run')
    return cli.intra_op_threads(args.intra_op_threads, cli._train_config(args))  # pylint: disable=protected-access

  assert threads([]) == 1                                   # seed moons
  assert threads(['--dataset', 'circles']) == 1
  assert threads(['--dataset', 'digits']) == 0              # 64-D
  assert threads(['--dataset', 'mnist', '--model', 'multiscale']) == 0
  assert threads(['--model', 'realnvp']) == 0
  assert threads(['--intra-op-threads', '3']) == 3
  assert threads(['--dataset', 'digits', '--intra-op-threads', '1']) == 1
  assert threads(['--intra-op-threads', '0']) == 0
  assert config_lib.TrainConfig().dataset == 'moons'


def test_train_options_are_the_config_fields():
  # Every TrainConfig field is an option of `train`, with the registry's
  # choices, and parsing it gives the field's value.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from tfp_ffjord.training import config as config_lib  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  options = cli.config_options()
  assert {f.name for f, _, _ in options} == fields
  for f, flags, kwargs in options:
    if 'choices' in f.metadata:
      assert tuple(kwargs['choices']) == f.metadata['choices']
      value = f.metadata['choices'][-1]
      args = cli.build_parser().parse_args(['train', flags[0], value])
      assert getattr(args, f.name) == value
  args = cli.build_parser().parse_args(
      ['train', '--lr', '0.5', '--no-jit', '--hidden', '4,5',
       '--ot-pairing', '--objective', 'flow-matching'])
  config = config_lib.TrainConfig(**{
      k: v for k, v in vars(args).items() if k in fields and v is not None})
  assert (config.learning_rate, config.jit_compile, config.hidden,
          config.ot_pairing) == (0.5, False, (4, 5), True)


def test_run_directory_errors(tmp_path, capsys):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps({'dataset': 'moons',
                                               'blocks': 1}))
  cases = [
      (['train', '--out', str(run)], 'already holds a run; pass --resume',
       cli.EXIT_USAGE),
      (['train', '--out', str(run), '--resume', '--blocks', '2'],
       '--blocks 2 differs from the run', cli.EXIT_USAGE),
      (['train', '--out', str(tmp_path / 'none'), '--resume'],
       'holds no run to resume', cli.EXIT_USAGE),
      (['train', '--out', str(run), '--resume', '--overwrite'],
       'exclude each other', cli.EXIT_USAGE),
      (['sample', str(tmp_path / 'missing')], 'no such directory',
       cli.EXIT_FAILURE),
      (['evaluate', str(run), str(tmp_path / 'missing.npy')],
       'cannot read', cli.EXIT_FAILURE),
      (['sample', str(run), '--out', 'x.txt'], 'must end in .npy or .csv',
       cli.EXIT_USAGE),
  ]
  for argv, match, code in cases:
    assert cli.main(argv) == code, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], (argv, err)


@pytest.mark.slow
def test_evaluate_rejects_malformed_and_wrong_dimension_files(tmp_path,
                                                              capsys):
  bad_csv = tmp_path / 'bad.csv'
  bad_csv.write_text('1,2\n3,oops\n')
  nan_npy = tmp_path / 'nan.npy'
  np.save(nan_npy, np.array([[0., np.nan]]))
  for path, match in ((bad_csv, 'cannot parse'), (nan_npy, 'NaN')):
    with pytest.raises(ValueError, match=match):
      cli._read_points(str(path))  # pylint: disable=protected-access
  # Wrong dimension against a trained run (in-process, tiny run).
  run = str(tmp_path / 'run')
  assert cli.main(['train', *TINY, '--epochs', '1', '--out', run]) == 0
  three = tmp_path / 'three.npy'
  np.save(three, np.zeros([4, 3]))
  capsys.readouterr()
  assert cli.main(['evaluate', run, str(three)]) == cli.EXIT_FAILURE
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'tfp-ffjord: error: {three}: points have dimension 3, the '
                 f'model in {run} has 2']


def test_presets_set_their_fields_and_given_options_override_them(
    tmp_path, monkeypatch):
  from tfp_ffjord import registry  # pylint: disable=g-import-not-at-top
  from tfp_ffjord.training import config as config_lib  # pylint: disable=g-import-not-at-top

  def config(argv):
    args = cli.build_parser().parse_args(['train'] + argv)
    args.out = str(tmp_path / 'run')
    return cli._train_config(args)  # pylint: disable=protected-access

  assert config(['--preset', 'moons']) == config_lib.TrainConfig()
  mnist = registry.PRESETS['mnist'].settings
  got = config(['--preset', 'mnist'])
  for key, value in mnist.items():
    assert getattr(got, key) == value, key
  assert got != config_lib.TrainConfig(dataset='mnist', model='unet',
                                       objective='flow-matching')
  got = config(['--preset', 'mnist', '--epochs', '1', '--hidden', '8,16'])
  assert (got.epochs, got.hidden, got.model) == (1, (8, 16), 'unet')
  # The default --out is named by the preset's dataset.
  args = cli.build_parser().parse_args(['train', '--preset', 'mnist'])
  monkeypatch.setattr(cli, '_locked', lambda out, command, args: out)
  assert cli.cmd_train(args) == os.path.join('runs', 'mnist')


@pytest.mark.slow
def test_mnist_preset_trains_and_writes_metrics_curves_and_both_grids(
    tmp_path):
  # The preset's recipe at a tiny size (the options given override it).
  out = str(tmp_path / 'run')
  res = run_cli('train', '--preset', 'mnist', '--num-train', '64',
                '--num-test', '32', '--batch-size', '16', '--hidden', '8,16',
                '--epochs', '2', '--steps-per-epoch', '3',
                '--eval-batch-size', '32', '--no-progress', '--out', out)
  assert res.returncode == 0, res.stderr
  assert 'bits/dim' in res.stdout
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  saved = json.load(open(os.path.join(out, 'config.json')))
  assert (saved['model'], saved['objective'], saved['ema_decay']) == (
      'unet', 'flow-matching', 0.999)
  assert [e['epoch'] for e in metrics['epochs']] == [1, 2]
  assert all(np.isfinite(e['test_bits_per_dim']) for e in metrics['epochs'])
  for png in ('samples.png', 'data.png', 'curves.png'):
    assert os.path.getsize(os.path.join(out, png)) > 5000, png
  # Another preset's model on --resume is refused by the option it changes.
  res = run_cli('train', '--preset', 'moons', '--resume', '--out', out)
  assert res.returncode == 2
  assert '--resume: --dataset' in res.stderr
