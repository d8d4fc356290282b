"""`TrainConfig`: everything that defines a training run.

Imports no TensorFlow: the command line builds its `train` options from
these fields (`dataclasses.fields(TrainConfig)`, each field's `metadata`
giving its help text, its kind and its choices from `tfp_ffjord.registry`)
and checks them before TensorFlow loads.
"""

import dataclasses
import math
from typing import Dict, Optional, Tuple

from tfp_ffjord import registry

__all__ = ['TrainConfig', 'KINDS', 'check_value', 'fixed_on_resume',
           'EXACT_EVAL_MAX_DIM']

# Above this dimension the held-out evaluation uses Hutchinson's estimator
# by default: the exact trace's D vector-Jacobian products of a 784-D conv
# model took over 20 GB.
EXACT_EVAL_MAX_DIM = 64

# What a field holds. `check_value` enforces it; the command line turns it
# into an argparse type.
KINDS = {
    'positive-int': 'a positive integer',
    'int': 'an integer',
    'non-negative-int': 'a non-negative integer',
    'positive': 'a positive number',
    'non-negative': 'a non-negative number',
    'choice': 'one of the names of a registry table',
    'flag': 'True or False',
    'sizes': 'a non-empty sequence of positive integers',
}


def _field(default, kind, help_text, choices=None, flags=None, fixed=False):
  """A config field with what the checks and the command line need.

  `fixed`: the field defines the model or the data, so a resumed run must
  not change it.
  """
  metadata = {'kind': kind, 'help': help_text, 'fixed': fixed}
  if choices is not None:
    metadata['choices'] = tuple(choices)
  if flags is not None:
    metadata['flags'] = tuple(flags)
  if isinstance(default, tuple):
    return dataclasses.field(default_factory=lambda: default,
                             metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def check_value(name: str, value, kind: str, choices=None,
                optional: bool = False):
  """Raises `ValueError` naming `name` unless `value` is of `kind`."""
  if value is None and optional:
    return
  is_int = isinstance(value, int) and not isinstance(value, bool)
  is_number = (isinstance(value, (int, float))
               and not isinstance(value, bool))
  ok = {
      'positive-int': lambda: is_int and value >= 1,
      'int': lambda: is_int,
      'non-negative-int': lambda: is_int and value >= 0,
      'positive': lambda: is_number and value > 0 and math.isfinite(value),
      'non-negative': lambda: (is_number and value >= 0
                               and math.isfinite(value)),
      'choice': lambda: value in choices,
      'flag': lambda: isinstance(value, bool),
      'sizes': lambda: (isinstance(value, (tuple, list)) and len(value) > 0
                        and all(isinstance(h, int) and not isinstance(h, bool)
                                and h >= 1 for h in value)),
  }[kind]()
  if not ok:
    what = (f'one of {", ".join(choices)}' if kind == 'choice'
            else KINDS[kind])
    raise ValueError(f'`{name}` must be {what}; got {value!r}.')


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a training run. Defaults: the seed moons model.

  The defaults are TFP's FFJORD colab (`make_moons(8192, noise=.06)`, 4
  FFJORD blocks with MLP 8-8 tanh dynamics, batch 256, Adam(1e-2), base
  `MultivariateNormalDiag(0, 0.8)`, exact trace) with our Tsit5 solver
  (backprop gradients, XLA) and a cosine learning-rate decay. Every field
  is also an option of `tfp-ffjord train` (`--batch-size` for
  `batch_size`, and so on); each field's `metadata['help']` documents it,
  and `tfp-ffjord train --help` prints them all.
  """
  dataset: str = _field('moons', 'choice', 'dataset to fit',
                        registry.DATASET_NAMES, fixed=True)
  num_train: Optional[int] = _field(
      None, 'positive-int', "training points; default: the dataset's size", fixed=True)
  num_test: Optional[int] = _field(
      None, 'positive-int', "held-out points; default: the dataset's size", fixed=True)
  epochs: int = _field(40, 'positive-int', 'epochs to train')
  max_train_seconds: Optional[float] = _field(
      None, 'positive', 'also stop after the first epoch whose training '
      'steps (evaluations excluded) have taken this long in all; default: '
      'no limit')
  batch_size: int = _field(256, 'positive-int', 'global batch size', fixed=True)
  steps_per_epoch: Optional[int] = _field(
      None, 'positive-int', 'optimizer steps between held-out evaluations '
      'and checkpoints; default: one pass over the training set', fixed=True)
  model: str = _field('ffjord', 'choice', 'the model (FFJORD variants and '
                      "TFP's discrete flows as baselines)", registry.MODELS,
                      fixed=True)
  blocks: int = _field(4, 'positive-int', 'FFJORD blocks (multiscale: per '
                       'level; realnvp/maf: layers; glow: steps per level)',
                       fixed=True)
  hidden: Tuple[int, ...] = _field((8, 8), 'sizes',
                                   'hidden layer sizes, e.g. 64,64,64 (conv '
                                   'models: channels)', fixed=True)
  levels: int = _field(2, 'positive-int', 'multiscale and glow: levels '
                       '(scales)', fixed=True)
  logit_alpha: Optional[float] = _field(
      None, 'positive', 'model logit(alpha + (1 - 2 alpha) x) of data in '
      '[0, 1] (mnist), a bijector whose log-det is counted; default: no '
      'transform', fixed=True)
  activation: str = _field('tanh', 'choice', 'activation of the dynamics',
                           registry.ACTIVATIONS, fixed=True)
  solver: str = _field('tsit5', 'choice', 'ODE solver of the training solves',
                       registry.SOLVERS)
  rtol: float = _field(1e-3, 'positive', 'adaptive solvers: relative '
                       'tolerance')
  atol: float = _field(1e-5, 'positive', 'adaptive solvers: absolute '
                       'tolerance')
  num_steps: int = _field(8, 'positive-int', 'fixed-step solvers: steps per '
                          'solve')
  trace: str = _field('exact', 'choice', 'Jacobian trace of the training '
                      'solves', registry.TRACES)
  gradient: str = _field('backprop', 'choice', 'how the training solves are '
                         'differentiated', registry.GRADIENT_MODES)
  learning_rate: float = _field(1e-2, 'positive', 'Adam learning rate',
                                flags=('--lr', '--learning-rate'))
  lr_schedule: str = _field('cosine', 'choice', 'learning-rate schedule',
                            registry.LR_SCHEDULES)
  clip_norm: Optional[float] = _field(
      None, 'positive', 'clip gradients to this global norm; default: none')
  ema_decay: float = _field(
      0.0, 'non-negative', 'evaluate, sample and export with an exponential '
      'moving average of the weights of this decay (e.g. 0.999); 0: the '
      'weights themselves', fixed=True)
  objective: str = _field('maximum-likelihood', 'choice', 'training '
                          'objective', registry.OBJECTIVES)
  ot_pairing: bool = _field(False, 'flag', 'flow matching: pair base and '
                            'data by minibatch optimal transport')
  ot_solver: str = _field('exact', 'choice', 'flow matching with '
                          '--ot-pairing: how the pairs are found',
                          registry.OT_SOLVERS)
  ot_epsilon: float = _field(0.05, 'positive', "--ot-solver sinkhorn: the "
                             'entropic regularisation, relative to the '
                             "batch's mean squared distance")
  conditional: bool = _field(False, 'flag', 'condition the flow on the class '
                             'label (labelled datasets)', fixed=True)
  kinetic_weight: float = _field(0.0, 'non-negative', "RNODE's "
                                 'kinetic-energy weight (lambda_1)')
  jacobian_weight: float = _field(0.0, 'non-negative', "RNODE's Jacobian "
                                  'Frobenius weight (lambda_2)')
  base_scale: float = _field(0.8, 'positive', 'std of the Gaussian base', fixed=True)
  seed: int = _field(0, 'non-negative-int', 'seed of the data, the weights and the noise', fixed=True)
  jit_compile: bool = _field(True, 'flag', 'compile the steps with XLA',
                             flags=('--no-jit',))
  eval_rtol: float = _field(1e-5, 'positive', 'held-out evaluation: relative '
                            'tolerance')
  eval_atol: float = _field(1e-5, 'positive', 'held-out evaluation: absolute '
                            'tolerance')
  eval_trace: Optional[str] = _field(
      None, 'choice', 'held-out evaluation: Jacobian trace; default: exact '
      f'up to {EXACT_EVAL_MAX_DIM} dimensions, hutchinson above (an unbiased estimate of '
      'log p, probes seeded per batch)', registry.TRACES)
  eval_batch_size: int = _field(2048, 'positive-int', 'held-out evaluation: '
                                'points per compiled call')
  max_to_keep: int = _field(3, 'positive-int', 'checkpoints to keep')

  def __post_init__(self):
    if isinstance(self.hidden, list):
      self.hidden = tuple(self.hidden)
    self.validate()

  def validate(self) -> None:
    """Raises `ValueError` naming the first bad field."""
    for f in dataclasses.fields(self):
      optional = f.default is None
      check_value(f.name, getattr(self, f.name), f.metadata['kind'],
                  f.metadata.get('choices'), optional)
    if not self.ema_decay < 1:
      raise ValueError(f'`ema_decay` must be in [0, 1); got {self.ema_decay!r}.')
    if self.objective == 'flow-matching' and self.regularized:
      raise ValueError('`kinetic_weight` and `jacobian_weight` apply to '
                       "maximum likelihood, not to objective='flow-matching'.")
    if self.ot_pairing and self.objective != 'flow-matching':
      raise ValueError("`ot_pairing` applies to objective='flow-matching'; "
                       f'got objective={self.objective!r}.')
    info = registry.MODELS[self.model]
    if info.images_only and self.dataset not in registry.IMAGE_DATASETS:
      raise ValueError(
          f'`model={self.model!r}` needs image data '
          f'({", ".join(registry.IMAGE_DATASETS)}); got {self.dataset!r}.')
    if (self.objective == 'flow-matching'
        and self.model not in registry.FLOW_MATCHING_MODELS):
      raise ValueError(
          "objective='flow-matching' trains the models "
          f'{", ".join(registry.FLOW_MATCHING_MODELS)}; got '
          f'model={self.model!r}.')
    if info.kind != 'ffjord' and (self.regularized or self.conditional):
      raise ValueError(
          'RNODE terms and conditional flows apply to the FFJORD models '
          f'({", ".join(registry.FFJORD_MODELS)}); got model={self.model!r}.')
    if self.logit_alpha is not None:
      if not registry.DATASETS[self.dataset].unit_range:
        raise ValueError('`logit_alpha` needs data in [0, 1] (mnist); got '
                         f'dataset={self.dataset!r}.')
      if not self.logit_alpha < 0.5:
        raise ValueError('`logit_alpha` must be in (0, 0.5); got '
                         f'{self.logit_alpha!r}.')
    if self.conditional and self.dataset not in registry.LABELLED_DATASETS:
      raise ValueError(
          '`conditional=True` needs a dataset with class labels '
          f'({", ".join(registry.LABELLED_DATASETS)}); got '
          f'{self.dataset!r}.')

  @property
  def regularized(self) -> bool:
    """Whether an RNODE weight is set (the training solves then integrate
    the regularisers)."""
    return self.kinetic_weight > 0 or self.jacobian_weight > 0

  @property
  def host_ot_pairing(self) -> bool:
    """Whether flow matching pairs on the host (SciPy) between compiled
    calls; otherwise pairing, if any, runs inside them."""
    return self.ot_pairing and self.ot_solver == 'exact'

  def eval_trace_for(self, dim: int) -> str:
    """The held-out evaluation's trace for `dim`-dimensional data."""
    if self.eval_trace is not None:
      return self.eval_trace
    return 'exact' if dim <= EXACT_EVAL_MAX_DIM else 'hutchinson'

  @property
  def adaptive(self) -> bool:
    """Whether the training solver chooses its own steps."""
    return self.solver in registry.ADAPTIVE_SOLVERS

  def to_dict(self) -> Dict:
    """The fields as a JSON-ready dict (what `config.json` holds)."""
    d = dataclasses.asdict(self)
    d['hidden'] = list(self.hidden)
    return d

  @classmethod
  def from_dict(cls, d: Dict) -> 'TrainConfig':
    """The config of a dict (`config.json`).

    Args:
      d: field names to values.

    Returns:
      The `TrainConfig`.

    Raises:
      ValueError: for a key that is not a field.

    Examples:
      >>> TrainConfig.from_dict({'epochs': 3}).epochs
      3
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'Unknown configuration keys: {", ".join(unknown)}.')
    return cls(**d)


def fixed_on_resume() -> Tuple[str, ...]:
  """The fields a resumed run must keep (they define the model or data)."""
  return tuple(f.name for f in dataclasses.fields(TrainConfig)
               if f.metadata['fixed'])
