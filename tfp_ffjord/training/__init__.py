"""Fitting stacked-FFJORD densities: config, model, objectives, the loop.

    config = tfp_ffjord.training.TrainConfig(dataset='moons', epochs=40)
    trainer = tfp_ffjord.training.Trainer(config, out_dir='runs/moons')
    history = trainer.fit()           # resumes if out_dir has a checkpoint
    trainer.evaluate(points)          # {'nll': ..., 'nfe': ...}

Modules: `config` (TrainConfig; no TensorFlow), `model` (FlowModel and the
solver/trace of a config), `likelihood` and `flow_matching` (the
objectives), `steps` and `distribute` (compiled steps), `run_dir` (the run
directory's files), `interrupt` (SIGINT), `figures`, `export`
(SavedModel), `averaging` (the weights' moving average), `fitting` (fit_adam, fit_lbfgs, total_variation,
time_train_step) and `trainer` (the loop). Names are loaded on first use,
so `tfp_ffjord.training.config` imports without TensorFlow.
"""

import importlib

# Public name -> submodule of tfp_ffjord.training.
_EXPORTS = {
    'TrainConfig': 'config',
    'FlowModel': 'model',
    'LogProbTerms': 'model',
    'ModelSpec': 'model',
    'make_solver': 'model',
    'make_trace': 'model',
    'CONTEXT_KEY': 'model',
    'Trainer': 'trainer',
    'WeightAverage': 'averaging',
    'load_run': 'trainer',
    'TrainingError': 'errors',
    'TrainingInterrupted': 'errors',
    'RunDir': 'run_dir',
    'LossTerms': 'steps',
    'make_strategy': 'distribute',
    'is_chief': 'distribute',
    'ot_pairing': 'flow_matching',
    'export_saved_model': 'export',
    'EXPORT_SEED': 'export',
    'fit_adam': 'fitting',
    'fit_lbfgs': 'fitting',
    'total_variation': 'fitting',
    'time_train_step': 'fitting',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(f'{__name__}.{_EXPORTS[name]}')
  value = getattr(module, name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
