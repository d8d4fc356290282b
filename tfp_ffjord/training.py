"""Fitting a stacked-FFJORD density to data: config, model, compiled training.

    config = tfp_ffjord.training.TrainConfig(dataset='moons', epochs=40)
    trainer = tfp_ffjord.training.Trainer(config, out_dir='runs/moons')
    history = trainer.fit()           # resumes if out_dir has a checkpoint
    trainer.evaluate(points)          # {'nll': ..., 'nfe': ...}

The training step is one `tf.function` (XLA-compiled by default) with a fixed
input signature, traced once for the whole run (`Trainer.num_traces`). Every
epoch ends with a held-out evaluation (exact trace, tight tolerance), a
checkpoint (`tf.train.CheckpointManager`: model, optimizer state, epoch),
`tf.summary` scalars and an updated `metrics.json`; a restart with `fit()`
continues from the last checkpoint with the same optimizer state.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import bijector as bijector_lib
from tfp_ffjord import datasets
from tfp_ffjord import dynamics
from tfp_ffjord import ode
from tfp_ffjord import trace as trace_lib

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ['TrainConfig', 'FlowModel', 'Trainer', 'TrainingError',
           'TrainingInterrupted', 'fit_adam',
           'fit_lbfgs', 'total_variation', 'load_run', 'time_train_step',
           'ot_pairing', 'export_saved_model', 'make_strategy', 'STRATEGIES',
           'is_chief',
           'SOLVERS', 'ACTIVATIONS', 'make_solver']

SOLVERS = {
    'tsit5': ode.Tsit5,
    'dopri5': ode.DormandPrince,
    'rk4': ode.RK4,
    'midpoint': ode.Midpoint,
    'euler': ode.Euler,
}
ADAPTIVE = ('tsit5', 'dopri5')
ACTIVATIONS = {
    'tanh': tf.math.tanh,
    'softplus': tf.math.softplus,
    'elu': tf.nn.elu,
    'swish': tf.nn.silu,
}
TRACES = ('exact', 'hutchinson')
LABELLED = ('moons', 'circles', '8gaussians', 'pinwheel', '2spirals', 'digits')
CONTEXT_KEY = 'context'   # the keyword conditional dynamics read
GRADIENTS = ('adjoint', 'backprop')
LR_SCHEDULES = ('cosine', 'constant')
OBJECTIVES = ('maximum-likelihood', 'flow-matching')
# Flow-matching steps run in one compiled loop per call (no Python between
# steps); SIGINT is honoured between calls.
FLOW_MATCHING_CHUNK = 250
# The cosine schedule decays the learning rate to this fraction of its start.
COSINE_FLOOR = 0.01
METRICS_FILE = 'metrics.json'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
LOG_DIR = 'logs'


class TrainingInterrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) after saving a checkpoint."""


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became non-finite)."""


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a training run. Defaults: the seed moons model.

  The defaults are TFP's FFJORD colab (`make_moons(8192, noise=.06)`, 4
  FFJORD blocks with MLP 8-8 tanh dynamics, batch 256, Adam(1e-2), base
  `MultivariateNormalDiag(0, 0.8)`, exact trace) with our Tsit5 solver
  (backprop gradients, XLA) and a cosine learning-rate decay.
  """
  dataset: str = 'moons'
  num_train: Optional[int] = None   # None: the dataset's default size
  num_test: Optional[int] = None
  epochs: int = 40
  batch_size: int = 256
  steps_per_epoch: Optional[int] = None   # None: one pass over the data
  blocks: int = 4
  hidden: Tuple[int, ...] = (8, 8)
  activation: str = 'tanh'
  solver: str = 'tsit5'
  rtol: float = 1e-3
  atol: float = 1e-5
  num_steps: int = 8                # for the fixed-step solvers
  trace: str = 'exact'
  gradient: str = 'backprop'
  learning_rate: float = 1e-2
  lr_schedule: str = 'cosine'
  clip_norm: Optional[float] = None
  objective: str = 'maximum-likelihood'   # or 'flow-matching'
  ot_pairing: bool = False          # flow matching: minibatch OT pairs
  conditional: bool = False         # condition on the class label
  kinetic_weight: float = 0.0       # RNODE's lambda_1 (kinetic energy)
  jacobian_weight: float = 0.0      # RNODE's lambda_2 (Jacobian Frobenius)
  base_scale: float = 0.8
  seed: int = 0
  jit_compile: bool = True
  eval_rtol: float = 1e-5
  eval_atol: float = 1e-5
  eval_batch_size: int = 2048
  max_to_keep: int = 3

  def __post_init__(self):
    self.hidden = tuple(self.hidden)
    self.validate()

  def validate(self) -> None:
    """Raises `ValueError` naming the first bad field."""
    def positive_int(name):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f'`{name}` must be a positive integer; got {v!r}.')

    def positive(name, allow_none=False):
      v = getattr(self, name)
      if v is None and allow_none:
        return
      if (isinstance(v, bool) or not isinstance(v, (int, float))
          or not v > 0 or not math.isfinite(v)):
        raise ValueError(f'`{name}` must be a positive number; got {v!r}.')

    def choice(name, options):
      v = getattr(self, name)
      if v not in options:
        raise ValueError(f'`{name}` must be one of {", ".join(options)}; '
                         f'got {v!r}.')

    choice('dataset', datasets.NAMES)
    for name in ('epochs', 'batch_size', 'blocks', 'num_steps',
                 'eval_batch_size', 'max_to_keep'):
      positive_int(name)
    for name in ('num_train', 'num_test', 'steps_per_epoch'):
      if getattr(self, name) is not None:
        positive_int(name)
    if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int)
                              or h < 1 for h in self.hidden):
      raise ValueError('`hidden` must be a non-empty sequence of positive '
                       f'integers; got {self.hidden!r}.')
    choice('activation', tuple(ACTIVATIONS))
    choice('solver', tuple(SOLVERS))
    choice('trace', TRACES)
    choice('gradient', GRADIENTS)
    choice('lr_schedule', LR_SCHEDULES)
    choice('objective', OBJECTIVES)
    if not isinstance(self.ot_pairing, bool):
      raise ValueError(
          f'`ot_pairing` must be True or False; got {self.ot_pairing!r}.')
    for name in ('rtol', 'atol', 'learning_rate', 'base_scale', 'eval_rtol',
                 'eval_atol'):
      positive(name)
    positive('clip_norm', allow_none=True)
    for name in ('kinetic_weight', 'jacobian_weight'):
      v = getattr(self, name)
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
          or not math.isfinite(v)):
        raise ValueError(
            f'`{name}` must be a non-negative number; got {v!r}.')
    if self.objective == 'flow-matching' and (
        self.kinetic_weight > 0 or self.jacobian_weight > 0):
      raise ValueError('`kinetic_weight` and `jacobian_weight` apply to '
                       "maximum likelihood, not to objective='flow-matching'.")
    if not isinstance(self.conditional, bool):
      raise ValueError(
          f'`conditional` must be True or False; got {self.conditional!r}.')
    if self.conditional and self.dataset not in LABELLED:
      raise ValueError(
          f'`conditional=True` needs a dataset with class labels '
          f'({", ".join(LABELLED)}); got {self.dataset!r}.')
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f'`seed` must be an integer; got {self.seed!r}.')

  @property
  def regularized(self) -> bool:
    return self.kinetic_weight > 0 or self.jacobian_weight > 0

  def to_dict(self) -> Dict:
    d = dataclasses.asdict(self)
    d['hidden'] = list(self.hidden)
    return d

  @classmethod
  def from_dict(cls, d: Dict) -> 'TrainConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'Unknown configuration keys: {", ".join(unknown)}.')
    return cls(**d)


def make_solver(config: TrainConfig, for_eval: bool = False):
  """The ODE solver of a config (or the tight exact-evaluation solver)."""
  if for_eval:
    return ode.Tsit5(rtol=config.eval_rtol, atol=config.eval_atol,
                     gradient='adjoint')
  cls = SOLVERS[config.solver]
  if config.solver in ADAPTIVE:
    return cls(rtol=config.rtol, atol=config.atol, gradient=config.gradient)
  return cls(num_steps=config.num_steps, gradient=config.gradient)


class FlowModel(snt.Module):
  """`blocks` FFJORD blocks with MLP dynamics over a Gaussian base.

  The variables live here (Sonnet dynamics modules); `flow()` wraps them into
  a `tfd.TransformedDistribution` with any solver and trace estimator, so
  the same weights serve training (fast solver, possibly Hutchinson) and
  evaluation (exact trace, tight tolerance).
  """

  def __init__(self, dim: int, blocks: int = 4,
               hidden: Sequence[int] = (8, 8), activation: str = 'tanh',
               base_scale: float = 0.8, num_classes: int = 0,
               dtype=tf.float32, name='flow_model'):
    super().__init__(name=name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
        num_classes < 0):
      raise ValueError('`num_classes` must be a non-negative int; got '
                       f'{num_classes!r}.')
    self.num_classes = num_classes
    if activation not in ACTIVATIONS:
      raise ValueError(f'`activation` must be one of '
                       f'{", ".join(ACTIVATIONS)}; got {activation!r}.')
    self.dim = int(dim)
    self.dtype = tf.as_dtype(dtype)
    self.base_scale = float(base_scale)
    context_keys = (CONTEXT_KEY,) if num_classes else ()
    self.dynamics = [
        dynamics.MLPODE(list(hidden), self.dim, ACTIVATIONS[activation],
                        context_keys=context_keys, name=f'dynamics_{i}')
        for i in range(blocks)]
    for d in self.dynamics:  # Sonnet creates variables on the first call.
      d(tf.zeros([], self.dtype), tf.zeros([1, self.dim], self.dtype),
        **self.context_kwargs(tf.zeros([1], tf.int32)))

  def context_kwargs(self, labels) -> Dict:
    """Keyword arguments that condition the dynamics on class `labels`.

    `{}` for an unconditional model; else `{'context': one_hot(labels)}`,
    to pass to the bijectors (`bijector_kwargs={'ffjord': ...}` through a
    chain).
    """
    if not self.num_classes:
      return {}
    if labels is None:
      raise ValueError('This model is conditional: give class `labels`.')
    return {CONTEXT_KEY: tf.one_hot(tf.cast(labels, tf.int32),
                                    self.num_classes, dtype=self.dtype)}

  def base_distribution(self) -> tfd.Distribution:
    return tfd.MultivariateNormalDiag(
        loc=tf.zeros([self.dim], self.dtype),
        scale_diag=tf.fill([self.dim], tf.constant(self.base_scale,
                                                   self.dtype)))

  def flow(self, solver, trace: str = 'exact'):
    """`(distribution, chain)`: base -> data through every block in order."""
    if trace not in TRACES:
      raise ValueError(f'`trace` must be one of {", ".join(TRACES)}; got '
                       f'{trace!r}.')
    trace_fn = (trace_lib.trace_jacobian_exact if trace == 'exact'
                else trace_lib.trace_jacobian_hutchinson)
    solve = solver.solve if hasattr(solver, 'solve') else solver
    # tfb.Chain applies its last bijector first: reverse, so that the
    # forward map goes through dynamics_0 first.
    # Fixed salts per block: the noise for a seed is the same in every
    # process and for every Trainer (determinism, resumes).
    chain = tfb.Chain([
        bijector_lib.FFJORD(d, ode_solve_fn=solve,
                            trace_augmentation_fn=trace_fn, dtype=self.dtype,
                            seed_salt=f'tfp_ffjord.training.block{i}')
        for i, d in enumerate(self.dynamics)][::-1], name='ffjord_chain')
    return tfd.TransformedDistribution(self.base_distribution(), chain), chain

  def bijector_kwargs(self, labels=None, seed=None) -> Dict:
    """Keyword arguments for the FFJORD blocks of a `flow()` chain.

    The label context (conditional models) and a per-call `seed`, routed to
    every block by name: pass as `log_prob(x, bijector_kwargs=...)` or
    `chain.forward(x, **...)`. `{}` when there is nothing to pass.
    """
    block = dict(self.context_kwargs(labels))
    if seed is not None:
      block['seed'] = seed
    return {'ffjord': block} if block else {}

  def log_prob_and_regularizers(self, chain, x, seed=None, labels=None):
    """`(log_prob, kinetic_energy, jacobian_frobenius)` of points `x`.

    One inverse solve per block of `chain` (from `flow()`), each carrying
    RNODE's regularisers as extra states: the kinetic energy
    `int ||f||^2 dt` and the Jacobian's squared Frobenius norm
    `int ||J||_F^2 dt` (exact or Hutchinson, as the chain's trace), summed
    over the blocks; DiffEqFlux returns the same as `logpx, λ₁, λ₂`.
    Each output has shape `[N]`.
    """
    x = tf.convert_to_tensor(x, self.dtype)
    kwargs = self.bijector_kwargs(labels, seed).get('ffjord', {})
    ildj = kinetic = frobenius = tf.zeros(tf.shape(x)[:-1], self.dtype)
    for block in chain.bijectors:   # the inverse runs the last block first
      result = block.solve_inverse(x, regularize=True, **kwargs)
      x = result.value
      ildj += tf.reduce_sum(result.log_det_jacobian, -1)
      kinetic += tf.reduce_sum(result.kinetic_energy, -1)
      frobenius += tf.reduce_sum(result.jacobian_frobenius, -1)
    return self.base_distribution().log_prob(x) + ildj, kinetic, frobenius

  def flow_matching_loss(self, data, base, tau, labels=None):
    """Conditional flow matching (Lipman et al., 2023), mean over the batch.

    The straight path `x_tau = (1 - tau) base + tau data` has velocity
    `data - base`. The blocks split the unit time: block `i` covers global
    times `[i/K, (i+1)/K]` at local time `t = K tau - i`, so its dynamics
    are trained toward `(data - base) / K`. This is the orientation of
    `FFJORD`'s forward map (base at `initial_time`, data at `final_time`),
    so the trained dynamics serve `flow()` unchanged.

    Args:
      data: `[B, D]` data points (time 1).
      base: `[B, D]` base samples (time 0), paired with `data`.
      tau: `[B, 1]` global times in [0, 1].
      labels: class labels (required by conditional models, ignored by
        others).
    """
    k = len(self.dynamics)
    data = tf.convert_to_tensor(data, self.dtype)
    base = tf.convert_to_tensor(base, self.dtype)
    tau = tf.convert_to_tensor(tau, self.dtype)
    x_tau = (1. - tau) * base + tau * data
    target = (data - base) / k
    scaled = tau * k
    block = tf.clip_by_value(tf.floor(scaled), 0., k - 1.)
    local_t = scaled - block
    context = self.context_kwargs(labels)
    which = tf.one_hot(tf.cast(block[:, 0], tf.int32), k, dtype=self.dtype)
    prediction = tf.add_n([which[:, i:i + 1] * d(local_t, x_tau, **context)
                           for i, d in enumerate(self.dynamics)])
    return tf.reduce_mean(tf.reduce_sum(tf.square(prediction - target), -1))

  def trajectories(self, base_points, num_times: int = 10, solver=None,
                   labels=None):
    """Points moving from the base through every block: `[T, N, D]`.

    Each block is solved once with `num_times` output times (its start
    included), so the path is one integration per block.
    """
    solver = solver or ode.Tsit5(rtol=1e-5, atol=1e-5)
    z = tf.convert_to_tensor(base_points, self.dtype)
    times = tf.linspace(tf.constant(0., self.dtype), 1., num_times)
    paths = [z[tf.newaxis]]
    context = self.context_kwargs(labels)
    for d in self.dynamics:
      states = solver.solve(lambda t, y, d=d: d(t, y, **context), 0., z,
                            times).states
      paths.append(states[1:])
      z = states[-1]
    return tf.concat(paths, 0)


def _apply_if_finite(optimizer, loss, grads, variables, step=None):
  """`optimizer.apply(grads, variables)` unless `loss` is not finite.

  A non-finite loss leaves the weights and the optimizer state those of the
  last good step (the caller stops training); `step`, if given, counts the
  applied updates.
  """
  def update():
    optimizer.apply(grads, variables)
    if step is not None:
      step.assign_add(1)
    return tf.constant(True)

  tf.cond(tf.math.is_finite(loss), update, lambda: tf.constant(False))


def ot_pairing(base, data) -> np.ndarray:
  """The permutation of `base` rows minimising `sum ||base - data||^2`."""
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  cost = ((base[:, None, :] - data[None, :, :]) ** 2).sum(-1)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  order = np.empty(len(data), np.int64)
  order[cols] = rows
  return order


def _solver_failure(error) -> Optional[str]:
  """The solver's own line of a failed-solve error, or None if not one."""
  for line in str(error.message).splitlines():
    line = line.strip()
    if ' failed: ' in line and 'time reached' in line:
      if line.startswith('assertion failed:'):   # tf.debugging.Assert's form
        line = ' '.join(re.findall(r'\[([^\]]*)\]', line))
      return line.rstrip('.')
  return None


@contextlib.contextmanager
def _solver_failures_raise(message: Callable[[str], str]):
  """Turns a failed-solve error into `TrainingError(message(failure))`."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    failure = _solver_failure(e)
    if failure is None:
      raise
    raise TrainingError(message(failure)) from None


@contextlib.contextmanager
def _sigint_flag():
  """Turns the first SIGINT into a flag (`flag[0]`), the second into ^C.

  Only in the main thread (Python delivers signals there) and unless SIGINT
  is ignored; otherwise the flag never rises and SIGINT keeps its effect.
  """
  flag = [False]
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
    # Not the main thread, or SIGINT deliberately ignored (a background
    # job): leave SIGINT alone.
    yield flag
    return

  def handler(signum, frame):
    del signum, frame
    if flag[0]:
      raise KeyboardInterrupt
    flag[0] = True

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGINT, previous)


def is_chief(resolver) -> bool:
  """Whether the task of a cluster resolver writes checkpoints, metrics, logs.

  The chief of a multi-worker cluster (task `chief`, or `worker` 0 when the
  cluster has no `chief`); true without a resolver or task (one process).
  Used with a strategy's `cluster_resolver`, and by the CLI with
  `TFConfigClusterResolver` before any strategy exists.
  """
  if resolver is None or not getattr(resolver, 'task_type', None):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return task_type == 'worker' and task_id == 0 and not has_chief


STRATEGIES = ('default', 'mirrored', 'multi-worker', 'tpu')


def make_strategy(name: str = 'default', cpu_devices: Optional[int] = None,
                  timeout_seconds: Optional[float] = 300.):
  """A `tf.distribute` strategy by name; `None` for 'default'.

  Args:
    name: 'default' (one device: returns None), 'mirrored' (all GPUs of this
      host, or `cpu_devices` logical CPU devices), 'multi-worker'
      (`MultiWorkerMirroredStrategy`, cluster from the `TF_CONFIG`
      environment variable) or 'tpu' (`TPUStrategy` on the TPU named by
      the usual resolver environment; not tested here).
    cpu_devices: split the host CPU into this many logical devices first
      (must run before TensorFlow initialises its devices); for 'mirrored'
      without GPUs, the strategy then mirrors over them.
    timeout_seconds: 'multi-worker': a collective that waits longer than
      this (a dead worker) fails instead of hanging.
  """
  if name not in STRATEGIES:
    raise ValueError(f'`strategy` must be one of {", ".join(STRATEGIES)}; '
                     f'got {name!r}.')
  if cpu_devices is not None:
    if isinstance(cpu_devices, bool) or not isinstance(
        cpu_devices, int) or cpu_devices < 1:
      raise ValueError('`cpu_devices` must be a positive int; got '
                       f'{cpu_devices!r}.')
    cpu = tf.config.list_physical_devices('CPU')[0]
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    except RuntimeError as e:
      raise RuntimeError('`cpu_devices` must be set before TensorFlow '
                         f'initialises its devices: {e}') from None
  if name == 'default':
    return None
  if name == 'mirrored':
    devices = None
    if not tf.config.list_physical_devices('GPU'):
      devices = [d.name for d in tf.config.list_logical_devices('CPU')]
    return tf.distribute.MirroredStrategy(devices)
  if name == 'multi-worker':
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=timeout_seconds)
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=options)
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def _cosine(config, epoch):
  progress = epoch / max(config.epochs - 1, 1)
  return config.learning_rate * (
      COSINE_FLOOR + (1. - COSINE_FLOOR) * 0.5 * (1. + math.cos(
          math.pi * min(progress, 1.))))


class Trainer:
  """Trains a `FlowModel` on a dataset; checkpoints into `out_dir`.

  Args:
    config: a `TrainConfig`.
    out_dir: where checkpoints, TensorBoard logs, `config.json` and
      `metrics.json` go; `None` keeps everything in memory.
    data: a `datasets.Dataset` to use instead of loading `config.dataset`.
  """

  def __init__(self, config: TrainConfig, out_dir: Optional[str] = None,
               data: Optional[datasets.Dataset] = None,
               strategy: Optional[tf.distribute.Strategy] = None):
    config.validate()
    self.config = config
    self.out_dir = out_dir
    # `strategy=None` is TensorFlow's default (one device) strategy.
    self.strategy = strategy or tf.distribute.get_strategy()
    self.distributed = strategy is not None
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.is_chief = is_chief(getattr(self.strategy, 'cluster_resolver', None))
    if self.distributed:
      if config.objective != 'maximum-likelihood':
        raise ValueError('Training under a tf.distribute strategy supports '
                         "`objective='maximum-likelihood'` only; got "
                         f'{config.objective!r}.')
      if config.batch_size % self.num_replicas:
        raise ValueError(
            f'`batch_size` ({config.batch_size}) is the global batch: it must '
            f'be divisible by the {self.num_replicas} replicas.')
    self.data = data or datasets.load(config.dataset, config.num_train,
                                      config.num_test, seed=config.seed)
    if config.batch_size > len(self.data.train):
      raise ValueError(
          f'`batch_size` ({config.batch_size}) is larger than the '
          f'{len(self.data.train)} training points.')
    # Optimizer steps per epoch (an epoch ends with the held-out evaluation
    # and a checkpoint); by default one pass over the training set.
    self.steps_per_epoch = (config.steps_per_epoch
                            or len(self.data.train) // config.batch_size)
    tf.random.set_seed(config.seed)
    num_classes = 0
    if config.conditional:
      if not self.data.num_classes:
        raise ValueError(f'`conditional=True` but dataset {self.data.name!r} '
                         'has no class labels.')
      num_classes = self.data.num_classes
    # Every variable (weights, Adam's moments, counters) is created under
    # the strategy's scope: mirrored on each replica when distributed.
    with self.strategy.scope():
      self.model = FlowModel(self.data.dim, config.blocks, config.hidden,
                             config.activation, config.base_scale,
                             num_classes=num_classes)
      self.flow, self.chain = self.model.flow(make_solver(config),
                                              config.trace)
      self.eval_flow, self.eval_chain = self.model.flow(
          make_solver(config, for_eval=True), 'exact')
      self.variables = list(self.model.trainable_variables)
      self.learning_rate = tf.Variable(config.learning_rate, trainable=False,
                                       dtype=tf.float32, name='learning_rate')
      self.optimizer = snt.optimizers.Adam(self.learning_rate)
      # Create Adam's moments now: a first call of the step that creates
      # variables would make tf.function trace it twice.
      self.optimizer._initialize(self.variables)  # pylint: disable=protected-access
      self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64,
                               name='epoch')
      self.step = tf.Variable(0, trainable=False, dtype=tf.int64, name='step')
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, optimizer=self.optimizer, epoch=self.epoch,
        step=self.step, learning_rate=self.learning_rate)
    self.manager = None
    self._read_manager = None   # where `restore` reads (the chief's dir)
    self.writer = None
    self.history: List[Dict] = []
    self._worker_dir = None
    if out_dir is not None:
      ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
      keep = config.max_to_keep
      if not self.is_chief:
        # Every worker must save (saving may need collectives); only the
        # chief's checkpoints are kept, the others' go to a scratch dir
        # (one checkpoint, removed when `fit` ends).
        self._worker_dir = tempfile.mkdtemp(prefix='tfp_ffjord_worker_')
        ckpt_dir, keep = self._worker_dir, 1
      self.manager = tf.train.CheckpointManager(
          self.checkpoint, ckpt_dir, max_to_keep=keep)
      # Every worker restores the chief's checkpoints.
      self._read_manager = self.manager if self.is_chief else (
          tf.train.CheckpointManager(
              self.checkpoint, os.path.join(out_dir, CHECKPOINT_DIR),
              max_to_keep=None))
    self._restored = False
    self.num_traces = 0
    # Labels are always an input (ignored by unconditional models), so both
    # kinds of model share one compiled signature.
    # checked_function: a failed solve raises after the call even under XLA
    # (which compiles assertions away); the update was then not applied.
    # autograph=False: the traced code uses explicit control flow;
    # converting it (Sonnet, TFP and our modules) took the first
    # flow-matching call from ~2.8 s to ~4.0 s.
    self._train_step = ode.checked_function(
        self._train_step_fn, jit_compile=config.jit_compile, autograph=False,
        input_signature=[
            tf.TensorSpec([config.batch_size, self.data.dim], tf.float32),
            tf.TensorSpec([config.batch_size], tf.int32)])
    if self.distributed:
      self._replica_grads = tf.function(self._replica_grads_fn,
                                        jit_compile=config.jit_compile,
                                        autograph=False)
      self._distributed_step = tf.function(self._distributed_step_fn,
                                           autograph=False)
    # Flow matching runs in chunks of steps, one compiled loop each. The
    # base samples and times come from a stateless RNG keyed by the step,
    # inside the loop; OT pairing (SciPy) makes them inputs instead.
    self._fm_chunk = min(FLOW_MATCHING_CHUNK, self.steps_per_epoch)
    chunk_shape = [self._fm_chunk, config.batch_size]
    signature = [tf.TensorSpec(chunk_shape + [self.data.dim], tf.float32),
                 tf.TensorSpec(chunk_shape, tf.int32),
                 tf.TensorSpec([], tf.int32)]
    if config.ot_pairing:
      signature += [tf.TensorSpec(chunk_shape + [self.data.dim], tf.float32),
                    tf.TensorSpec(chunk_shape + [1], tf.float32)]
    self._flow_matching_steps = tf.function(
        self._flow_matching_steps_fn, jit_compile=config.jit_compile,
        autograph=False, input_signature=signature)
    self._eval_step = ode.checked_function(
        self._eval_step_fn, jit_compile=config.jit_compile, autograph=False,
        input_signature=[
            tf.TensorSpec([config.eval_batch_size, self.data.dim],
                          tf.float32),
            tf.TensorSpec([config.eval_batch_size], tf.int32)])

  # ------------------------------------------------------------- compiled

  def _nfe(self, chain):
    return tf.add_n([b.last_diagnostics.num_ode_fn_evaluations
                     for b in chain.bijectors])

  def _labels(self, labels, n):
    """Labels for a batch: the given ones, or zeros for unconditional use."""
    if labels is None:
      if self.model.num_classes:
        raise ValueError('This model is conditional: give class `labels`.')
      return np.zeros([n], np.int32)
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f'`labels` must have shape [{n}]; got {labels.shape}.')
    if self.model.num_classes and (labels.min() < 0 or
                                   labels.max() >= self.model.num_classes):
      raise ValueError(f'`labels` must be in [0, {self.model.num_classes}); '
                       f'got values in [{labels.min()}, {labels.max()}].')
    return labels.astype(np.int32)

  def _hutchinson_seed(self, replica_id=None):
    """Fresh, reproducible probes each step (salted per block), and, when
    distributed, different on each replica."""
    if self.config.trace != 'hutchinson':
      return None
    seed = tf.stack([tf.constant(self.config.seed % 2**31, tf.int32),
                     tf.cast(self.step % 2**31, tf.int32)])
    if replica_id is not None:
      seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
    return seed

  def _ml_loss(self, batch, labels, seed):
    """`(loss, kinetic, frobenius)`, batch means; call under a tape."""
    config = self.config
    if not config.regularized:
      loss = -tf.reduce_mean(self.flow.log_prob(
          batch, bijector_kwargs=self.model.bijector_kwargs(labels, seed)))
      return loss, tf.zeros([]), tf.zeros([])
    log_prob, kinetic, frobenius = self.model.log_prob_and_regularizers(
        self.chain, batch, seed, labels)
    kinetic, frobenius = tf.reduce_mean(kinetic), tf.reduce_mean(frobenius)
    loss = (-tf.reduce_mean(log_prob) + config.kinetic_weight * kinetic
            + config.jacobian_weight * frobenius)
    return loss, kinetic, frobenius

  def _train_step_fn(self, batch, labels):
    self.num_traces += 1   # Python side effect: runs only when tracing.
    with tf.GradientTape() as tape:
      loss, kinetic, frobenius = self._ml_loss(batch, labels,
                                               self._hutchinson_seed())
    self._update(loss, tape)
    return loss, self._nfe(self.chain), kinetic, frobenius

  def _replica_grads_fn(self, batch, labels, replica_id):
    """One replica's share of the step: its loss scaled by its share of the
    global batch, and the gradient of that (summed over replicas, they
    give the global-batch mean and its gradient)."""
    self.num_traces += 1   # Python side effect: runs only when tracing.
    share = (tf.cast(tf.shape(batch)[0], tf.float32)
             / float(self.config.batch_size))
    with tf.GradientTape() as tape:
      loss, kinetic, frobenius = self._ml_loss(
          batch, labels, self._hutchinson_seed(replica_id))
      scaled = loss * share
    grads = tape.gradient(scaled, self.variables)
    return (scaled, grads, tf.cast(self._nfe(self.chain), tf.float32),
            kinetic * share, frobenius * share)

  def _distributed_step_fn(self, batch, labels):
    """The step under a strategy: replicas compute, all-reduce, one update.

    The update runs in cross-replica context, which assigns the same new
    values to every copy of each (mirrored) variable.
    """
    def replica_fn(batch, labels):
      ctx = tf.distribute.get_replica_context()
      rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
      loss, grads, nfe, kinetic, frobenius = self._replica_grads(
          batch, labels, rid)
      summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                              [loss, kinetic, frobenius] + list(grads))
      nfe = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, nfe)   # per replica
      return summed, nfe

    summed, nfe = self.strategy.run(replica_fn, args=(batch, labels))
    first = lambda v: self.strategy.experimental_local_results(v)[0]
    summed = [first(v) for v in summed]
    loss, kinetic, frobenius, grads = (summed[0], summed[1], summed[2],
                                       summed[3:])
    if self.config.clip_norm is not None:
      grads, _ = tf.clip_by_global_norm(grads, self.config.clip_norm)
    _apply_if_finite(self.optimizer, loss, grads, self.variables, self.step)
    return loss, tf.cast(tf.round(first(nfe)), tf.int32), kinetic, frobenius

  def _flow_matching_noise(self, step):
    """`(base, tau)` of a flow-matching step: a stateless function of
    `(config.seed, step)`, so resumed and repeated runs draw the same."""
    shape = [self.config.batch_size, self.data.dim]
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(self.config.seed, tf.int64), step]), 2)
    base = self.model.base_scale * tf.random.stateless_normal(shape, seeds[0])
    tau = tf.random.stateless_uniform(shape[:1] + [1], seeds[1])
    return base, tau

  def _flow_matching_steps_fn(self, data, labels, count, base=None,
                              tau=None):
    """The first `count` steps of a chunk (`[chunk, B, ...]` inputs) in
    one loop: `(losses [chunk], steps run)`. Stops after the first
    non-finite loss (whose update is not applied)."""
    self.num_traces += 1   # Python side effect: runs only when tracing.
    losses = tf.zeros([self._fm_chunk])

    def body(i, losses, _):
      if base is None:
        base_i, tau_i = self._flow_matching_noise(self.step.read_value())
      else:
        base_i, tau_i = base[i], tau[i]
      with tf.GradientTape() as tape:
        loss = self.model.flow_matching_loss(data[i], base_i, tau_i,
                                             labels[i])
      self._update(loss, tape)
      losses = tf.tensor_scatter_nd_update(losses, [[i]], [loss])
      return i + 1, losses, tf.math.is_finite(loss)

    i, losses, _ = tf.while_loop(
        lambda i, _, finite: (i < count) & finite, body,
        (tf.constant(0), losses, tf.constant(True)),
        maximum_iterations=self._fm_chunk)
    return losses, i

  def _distributed_batches(self, epoch, skip):
    """The epoch's global batches, split over the replicas (and sharded
    over the workers) by the strategy."""
    ds = self._epoch_dataset(epoch, bool(self.model.num_classes))
    if not self.model.num_classes:
      ds = ds.map(lambda x: (x, tf.zeros(tf.shape(x)[:1], tf.int32)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    ds = ds.skip(skip).with_options(options)
    return self.strategy.experimental_distribute_dataset(ds)

  def _update(self, loss, tape):
    grads = tape.gradient(loss, self.variables)
    if self.config.clip_norm is not None:
      grads, _ = tf.clip_by_global_norm(grads, self.config.clip_norm)
    _apply_if_finite(self.optimizer, loss, grads, self.variables, self.step)

  def flow_matching_batch(self, data, step: int):
    """`(base, tau)` for an OT-paired flow-matching step on `data`.

    The base samples (NumPy, seeded by the step) are matched to the data
    points by an exact minibatch optimal-transport assignment (squared
    distances; Tong et al., 2023), which straightens the learned paths.
    """
    rng = np.random.default_rng([self.config.seed % 2**32, step])
    n, dim = data.shape
    base = (self.model.base_scale
            * rng.standard_normal((n, dim))).astype(np.float32)
    if self.config.ot_pairing:
      base = base[ot_pairing(base, data)]
    tau = rng.uniform(size=(n, 1)).astype(np.float32)
    return base, tau

  def _eval_step_fn(self, batch, labels):
    return (self.eval_flow.log_prob(
        batch, bijector_kwargs=self.model.bijector_kwargs(labels)),
            self._nfe(self.eval_chain))

  # ---------------------------------------------------------------- API

  def train_step(self, batch, labels=None) -> Tuple[float, int]:
    """One optimizer step on a `[batch_size, D]` batch: `(loss, NFE)`.

    With `objective='flow-matching'` the step is simulation-free (NFE 0) and
    the loss is the flow-matching regression loss, not an NLL.
    `labels` (`[batch_size]` ints) are required by conditional models. The
    loss includes the RNODE terms when the config weights them; their batch
    means are in `last_regularizers` (`(kinetic, frobenius)`).
    """
    batch = tf.convert_to_tensor(batch, tf.float32)
    labels = self._labels(labels, int(batch.shape[0]))
    if self.distributed:
      # Split the global batch over the replicas as `fit` does.
      (batch, labels), = self.strategy.experimental_distribute_dataset(
          tf.data.Dataset.from_tensors((batch, tf.constant(labels))))
      return self._distributed_train_step(batch, labels)
    if self.config.objective == 'flow-matching':
      losses = self._flow_matching_chunk(batch.numpy()[np.newaxis],
                                         np.asarray(labels)[np.newaxis])
      loss, nfe, kinetic, frobenius = losses[0], 0, 0., 0.
    else:
      step = int(self.step.numpy()) + 1
      with _solver_failures_raise(
          lambda failure: f'The ODE solver failed in training step {step}: '
          f'{failure}; the step was not applied.'):
        loss, nfe, kinetic, frobenius = self._train_step(batch,
                                                         tf.constant(labels))
    self.last_regularizers = (float(kinetic), float(frobenius))
    return float(loss), int(nfe)

  def _distributed_train_step(self, batch, labels):
    loss, nfe, kinetic, frobenius = self._distributed_step(batch, labels)
    self.last_regularizers = (float(kinetic), float(frobenius))
    return float(loss), int(nfe)

  def log_prob(self, points, labels=None) -> np.ndarray:
    """Exact log-density (nats) of `[N, D]` points, in fixed-size batches.

    Conditional models need `labels` (`[N]` ints) and return
    `log p(x | label)`.
    """
    points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] != self.data.dim:
      raise ValueError(f'points must have shape [N, {self.data.dim}]; got '
                       f'{points.shape}.')
    labels = self._labels(labels, len(points))
    out, self._last_eval_nfe = [], []
    size = self.config.eval_batch_size
    for start in range(0, len(points), size):
      chunk = points[start:start + size]
      chunk_labels = labels[start:start + size]
      n = len(chunk)
      if n < size:  # Pad to the traced shape; padding rows are dropped.
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - n, 0)])
        chunk_labels = np.concatenate(
            [chunk_labels, np.repeat(chunk_labels[:1], size - n)])
      lp, nfe = self._eval_step(tf.constant(chunk), tf.constant(chunk_labels))
      out.append(lp.numpy()[:n])
      self._last_eval_nfe.append(int(nfe))
    return np.concatenate(out) if out else np.zeros([0], np.float32)

  def evaluate(self, points=None, labels=None) -> Dict[str, float]:
    """Mean NLL (nats; bits/dim too for D > 2 or dequantised data).

    Defaults to the test set (and, for conditional models, its labels).
    A conditional model given points without labels reports the marginal
    `-log sum_c p(c) p(x | c)`.
    """
    if points is None:
      points = self.data.test
      if self.model.num_classes:
        labels = self.data.test_labels
    if self.model.num_classes and labels is None:
      lp = self._marginal_log_prob(points)   # log p(x), classes summed out
    else:
      lp = self.log_prob(points, labels)
    nll = float(-np.mean(lp))
    result = {'nll': nll, 'nfe': float(np.mean(self._last_eval_nfe))}
    if self.data.dim > 2 or self.data.bin_width is not None:
      result['bits_per_dim'] = self.data.bits_per_dim(nll)
    return result

  def sample(self, n: int, seed: int = 0, labels=None) -> np.ndarray:
    """`n` samples of the model (tight-tolerance solve), `[n, D]`.

    Conditional models sample `x | label`: `labels` is an int (one class for
    all) or `[n]` ints; by default the classes of the training set are drawn
    in proportion.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f'`n` must be a positive integer; got {n!r}.')
    if self.model.num_classes:
      if labels is None:
        labels = np.random.default_rng(seed).choice(self.data.train_labels, n)
      elif np.ndim(labels) == 0:
        labels = np.full([n], int(labels))
      labels = tf.constant(self._labels(labels, n))
    elif labels is not None:
      raise ValueError('`labels` given, but this model is not conditional.')
    kwargs = self.model.bijector_kwargs(labels)
    return tf.function(lambda: self.eval_flow.sample(
        n, seed=(seed, 1), bijector_kwargs=kwargs))().numpy()

  def restore(self) -> bool:
    """Restores the latest checkpoint of `out_dir`; False if there is none.

    A checkpoint that cannot be read (truncated or deleted files) is
    skipped with a warning in favour of the previous one.
    """
    manager = self._read_manager
    if manager is None or not manager.checkpoints:
      return False
    for path in reversed(manager.checkpoints):
      try:
        self.checkpoint.restore(path).assert_consumed()
        break
      except Exception as e:  # pylint: disable=broad-except
        # Truncated files surface as OpError, IndexError, ValueError...
        logging.getLogger('tfp_ffjord').warning(
            'Cannot restore %s (%s); trying the previous checkpoint.', path,
            str(e).splitlines()[0] if str(e) else type(e).__name__)
    else:
      raise TrainingError(
          f'No checkpoint in {manager.directory} can be restored.')
    self._restored = True
    path = os.path.join(self.out_dir, METRICS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f).get('epochs', [])
      done = int(self.epoch.numpy())
      self.history = [h for h in saved if h['epoch'] <= done]
    return True

  def fit(self, progress: bool = True,
          callback: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
    """Trains until `config.epochs`, resuming from `out_dir` if possible.

    Returns the per-epoch history (also in `metrics.json`). Raises
    `TrainingError` if the loss becomes non-finite or a solve fails; the
    weights are then those of the last good step and the last checkpoint is
    the last good epoch. The first SIGINT (Ctrl-C) stops after the current
    step, saves a checkpoint there and raises `TrainingInterrupted`; a
    resumed `fit()` skips the batches of that epoch already trained on, so
    it continues exactly where the interrupted run was (a second SIGINT
    interrupts at once, without saving).
    """
    import tqdm  # pylint: disable=g-import-not-at-top
    config = self.config
    if self.out_dir is not None:
      if self.is_chief:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, CONFIG_FILE), 'w') as f:
          json.dump(config.to_dict(), f, indent=2)
      if not self._restored:
        self.restore()
      self._restored = True   # from here on the weights are this run's
      if self.is_chief:
        self.writer = tf.summary.create_file_writer(
            os.path.join(self.out_dir, LOG_DIR))
    first_epoch = int(self.epoch.numpy())
    # Batches of `first_epoch` applied before an interruption.
    skip = int(self.step.numpy()) - first_epoch * self.steps_per_epoch
    if not 0 <= skip < self.steps_per_epoch:
      skip = 0
    elapsed = self.history[-1]['wall_time'] if self.history else 0.
    start = time.perf_counter() - elapsed
    bar = tqdm.trange(first_epoch, config.epochs, initial=first_epoch,
                      total=config.epochs, desc=config.dataset,
                      disable=not progress)
    try:
      with _sigint_flag() as interrupted, contextlib.closing(bar):
        for epoch in bar:
          self._fit_epoch(epoch, skip, interrupted, bar, start, callback)
          skip = 0
    finally:
      if self._worker_dir is not None:
        shutil.rmtree(self._worker_dir, ignore_errors=True)
    return self.history

  def _fit_epoch(self, epoch, skip, interrupted, bar, start, callback):
    config = self.config
    if config.lr_schedule == 'cosine':
      self.learning_rate.assign(_cosine(config, epoch))
    losses, nfes, regs = [], [], []
    # Each epoch's order depends only on (seed, epoch), so a resumed run
    # sees the batches an uninterrupted one would have.
    conditional = bool(self.model.num_classes)
    if self.distributed:
      batches = self._distributed_batches(epoch, skip)
      step_fn = self._distributed_train_step
    elif config.objective == 'flow-matching':
      losses = self._flow_matching_epoch(epoch, skip, interrupted)
      nfes = [0] * len(losses)
      regs = [(0., 0.)] * len(losses)
      batches = ()   # all trained
    else:
      batches = self._epoch_dataset(epoch, with_labels=conditional).skip(skip)
      step_fn = self.train_step
    for item in batches:
      if interrupted[0]:
        self._stop_interrupted(epoch)
      batch, labels = item if (conditional or self.distributed) else (item,
                                                                      None)
      try:
        loss, nfe = step_fn(batch, labels)
      except TrainingError as e:
        raise TrainingError(
            f'Epoch {epoch + 1}: {str(e).rstrip(".")}{self._kept()}') from None
      if not math.isfinite(loss):
        raise self._non_finite(loss, epoch)
      losses.append(loss)
      nfes.append(nfe)
      regs.append(self.last_regularizers)
      bar.set_postfix(loss=f'{loss:.3f}', nfe=nfe, refresh=False)
    if interrupted[0]:
      self._stop_interrupted(epoch)
    with _solver_failures_raise(
        lambda failure: 'The ODE solver failed in the held-out evaluation '
        f'after epoch {epoch + 1}: {failure}{self._kept()} Evaluate with a '
        'looser tolerance or more `max_num_steps`.'):
      evaluation = self.evaluate()
    record = dict(epoch=epoch + 1,
                  learning_rate=float(self.learning_rate.numpy()),
                  train_loss=float(np.mean(losses)) if losses else None,
                  test_nll=evaluation['nll'],
                  nfe_per_step=float(np.mean(nfes)) if nfes else None,
                  eval_nfe=evaluation['nfe'],
                  wall_time=time.perf_counter() - start)
    if 'bits_per_dim' in evaluation:
      record['test_bits_per_dim'] = evaluation['bits_per_dim']
    if config.regularized and regs:
      record['kinetic_energy'] = float(np.mean([r[0] for r in regs]))
      record['jacobian_frobenius'] = float(np.mean([r[1] for r in regs]))
    self.history.append(record)
    self.epoch.assign(epoch + 1)
    bar.set_postfix(loss=f'{record["train_loss"] or float("nan"):.3f}',
                    test_nll=f'{record["test_nll"]:.3f}',
                    nfe=f'{record["nfe_per_step"] or 0:.0f}')
    self._log(record)
    if callback is not None:
      callback(record)

  def _epoch_dataset(self, epoch, with_labels):
    """The epoch's `steps_per_epoch` batches; the order depends only on
    `(seed, epoch)`, so a resumed run sees what an uninterrupted one would.
    """
    ds = self.data.train_dataset(self.config.batch_size,
                                 seed=self.config.seed + epoch,
                                 with_labels=with_labels)
    if self.config.steps_per_epoch is not None:
      # Each pass over the data is reshuffled (deterministically).
      ds = ds.repeat().take(self.steps_per_epoch)
    return ds

  def _flow_matching_epoch(self, epoch, skip, interrupted):
    """The epoch's flow-matching steps after the first `skip`,
    `FLOW_MATCHING_CHUNK` per compiled call; their losses.

    Batches are drawn by NumPy permutations seeded by `(seed, epoch)` (a
    tf.data pipeline per epoch would cost more than the steps); each step's
    base samples and times depend only on `(seed, step)`, so `fit` and
    repeated `train_step` calls train the same weights.
    """
    size, n = self.config.batch_size, len(self.data.train)
    rng = np.random.default_rng([self.config.seed % 2**32, epoch])
    per_pass = n // size * size   # whole batches of each pass
    passes = -(-self.steps_per_epoch * size // per_pass)
    order = np.concatenate([rng.permutation(n)[:per_pass]
                            for _ in range(passes)])
    order = order[:self.steps_per_epoch * size].reshape(-1, size)[skip:]
    labels = (self.data.train_labels if self.model.num_classes
              else np.zeros(n, np.int32))
    losses = []
    for start in range(0, len(order), self._fm_chunk):
      if interrupted[0]:
        self._stop_interrupted(epoch)
      index = order[start:start + self._fm_chunk]
      chunk_losses = self._flow_matching_chunk(
          self.data.train[index].astype(np.float32),
          labels[index].astype(np.int32))
      if chunk_losses and not np.isfinite(chunk_losses[-1]):
        raise self._non_finite(chunk_losses[-1], epoch)
      losses.extend(chunk_losses)
    return losses

  def _flow_matching_chunk(self, data, labels) -> List[float]:
    """Flow-matching steps on `data` (`[n <= chunk, B, D]`) in one call;
    the losses of the steps run (a non-finite one last, if any)."""
    chunk, count = self._fm_chunk, len(data)
    extra = []
    if self.config.ot_pairing:
      first = int(self.step.numpy())
      base = np.zeros((chunk,) + data.shape[1:], np.float32)
      tau = np.zeros((chunk, data.shape[1], 1), np.float32)
      for i in range(count):
        base[i], tau[i] = self.flow_matching_batch(data[i], first + i)
      extra = [base, tau]
    if count < chunk:   # the compiled loop has a fixed chunk shape
      pad = ((0, chunk - count),)
      data = np.pad(data, pad + ((0, 0), (0, 0)))
      labels = np.pad(labels, pad + ((0, 0),))
    losses, done = self._flow_matching_steps(data, labels, tf.constant(count),
                                             *extra)
    return [float(v) for v in losses.numpy()[:int(done)]]

  def _non_finite(self, loss, epoch) -> 'TrainingError':
    return TrainingError(
        f'The training loss became {loss} at epoch {epoch + 1}, step '
        f'{int(self.step.numpy()) + 1}; the weights of the last good step '
        f'are kept{self._kept()} Try a lower learning rate, --clip-norm or '
        'a tighter tolerance.')

  def _kept(self) -> str:
    """How the last checkpoint stands, for error messages."""
    if self.manager is None or self.manager.latest_checkpoint is None:
      return '.'
    return (f'; the last checkpoint ({self.manager.latest_checkpoint}) is '
            'the last good state.')

  def _stop_interrupted(self, epoch):
    """Saves a mid-epoch checkpoint and raises `TrainingInterrupted`."""
    where = f'epoch {epoch + 1}, step {int(self.step.numpy())}'
    if self.manager is None:
      raise TrainingInterrupted(f'Interrupted at {where} (no out_dir: '
                                'nothing saved).')
    path = self.save()
    raise TrainingInterrupted(
        f'Interrupted at {where}; saved {path}. Continue with --resume '
        '(`Trainer.fit()` on the same out_dir).')

  def save(self) -> Optional[str]:
    """Writes a checkpoint numbered by the global step (if not written yet).

    Checkpoints are atomic: TensorFlow writes the files under a temporary
    name and renames them, then rewrites the `checkpoint` index file
    atomically, so a crash during a save leaves the previous checkpoint as
    the latest one.
    """
    if self.manager is None:
      return None
    number = int(self.step.numpy())
    latest = self.manager.latest_checkpoint
    if latest is not None and latest.endswith(f'-{number}'):
      return latest
    return self.manager.save(checkpoint_number=number)

  def _log(self, record):
    if self.out_dir is None:
      return
    self.save()   # every worker: saving may need collectives
    if not self.is_chief:
      return
    with self.writer.as_default(step=record['epoch']):
      for key, value in record.items():
        if key != 'epoch' and value is not None:
          tf.summary.scalar(key, value)
    self.writer.flush()
    self.write_metrics()

  def metrics(self) -> Dict:
    """The content of `metrics.json`."""
    final = self.history[-1]['test_nll'] if self.history else None
    entropy = self.data.entropy
    out = dict(config=self.config.to_dict(), epochs=self.history,
               final_test_nll=final, data_entropy=entropy,
               gap_to_entropy=(None if final is None or entropy is None
                               else final - entropy),
               total_wall_time=(self.history[-1]['wall_time']
                                if self.history else 0.),
               complete=bool(self.history)
               and self.history[-1]['epoch'] == self.config.epochs)
    if self.history and 'test_bits_per_dim' in self.history[-1]:
      out['final_test_bits_per_dim'] = self.history[-1]['test_bits_per_dim']
    return out

  def write_metrics(self) -> Optional[str]:
    """Writes `metrics.json` atomically (write a temporary file, rename).

    Only the chief writes (returns None on other workers).
    """
    if not self.is_chief:
      return None
    path = os.path.join(self.out_dir, METRICS_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.metrics(), f, indent=2)
    os.replace(tmp, path)
    return path

  # -------------------------------------------------------------- figures

  def plot(self, out_dir: Optional[str] = None, tag: str = 'last',
           num_samples: int = 4096) -> List[str]:
    """Writes the figures that apply to this dataset's dimension.

    2-D: the 4-panel figure (`panels_<tag>.png`), the density heat map,
    trajectories; 1-D: the learned over the true pdf; 64-D digits: sample
    images; any D: loss/NLL curves (when there is a history).
    """
    from tfp_ffjord import plotting  # pylint: disable=g-import-not-at-top
    out_dir = out_dir or self.out_dir
    written = []
    data = self.data.train
    if self.data.dim == 2:
      grid = plotting.grid_lines()
      base, samples, mapped = self._panel_points(grid, len(data))
      path = os.path.join(out_dir, f'panels_{tag}.png')
      plotting.plot_panels(path, grid, base, mapped, samples, data,
                           title=f'{self.config.dataset}, epoch '
                           f'{int(self.epoch.numpy())}')
      written.append(path)
      if tag == 'last':
        path = os.path.join(out_dir, 'density.png')
        plotting.plot_density(path, self._marginal_log_prob,
                              plotting.bounds(data))
        written.append(path)
        paths = self.model.trajectories(
            base[:300], num_times=8,
            labels=(self.data.train_labels[:300] if self.model.num_classes
                    else None)).numpy()
        path = os.path.join(out_dir, 'trajectories.png')
        plotting.plot_trajectories(path, paths, data)
        written.append(path)
    elif self.data.dim == 1 and tag == 'last':
      lo, hi = np.percentile(data, [0.1, 99.9])
      pad = 0.3 * (hi - lo)
      xs = np.linspace(lo - pad, hi + pad, 400).astype(np.float32)[:, None]
      learned = np.exp(self.log_prob(xs))
      true = None
      if self.config.dataset == 'gaussian1d':
        true = np.exp(tfd.Normal(datasets.GAUSSIAN1D_MEAN,
                                 datasets.GAUSSIAN1D_STD).log_prob(
                                     xs[:, 0]).numpy())
      path = os.path.join(out_dir, 'pdf.png')
      plotting.plot_pdf_1d(path, xs[:, 0], learned, true, data)
      written.append(path)
    elif self.config.dataset == 'digits' and tag == 'last':
      images = self.sample(40, seed=self.config.seed)
      path = os.path.join(out_dir, 'samples.png')
      plotting.plot_image_samples(path, images, side=8)
      written.append(path)
    if self.history and tag == 'last':
      path = os.path.join(out_dir, 'curves.png')
      plotting.plot_curves(path, self.history, self.data.entropy)
      written.append(path)
    return written

  def _panel_points(self, grid, n):
    """Base samples, their image, and the grid's image (conditional models:
    the training labels for the samples, the first class for the grid)."""
    labels = grid_labels = None
    if self.model.num_classes:
      labels = tf.constant(self.data.train_labels[:n].astype(np.int32))
      grid_labels = tf.zeros([len(grid)], tf.int32)

    def forward(x, lab):
      return self.eval_chain.forward(x, **self.model.bijector_kwargs(lab))

    @tf.function
    def points(grid):
      base = self.flow.distribution.sample(n, seed=(self.config.seed, 2))
      return base, forward(base, labels), forward(grid, grid_labels)
    return [t.numpy() for t in points(tf.constant(grid))]

  def _marginal_log_prob(self, points):
    """`log p(x)`; for conditional models the class mixture
    `log sum_c p(c) p(x | c)`, with `p(c)` the training frequencies."""
    if not self.model.num_classes:
      return self.log_prob(points)
    counts = np.bincount(self.data.train_labels,
                         minlength=self.model.num_classes)
    per_class = [np.log(counts[c] / counts.sum()) + self.log_prob(
        points, np.full([len(points)], c)) for c in range(len(counts))
                 if counts[c]]
    per_class = np.stack(per_class)
    top = per_class.max(0)
    return top + np.log(np.exp(per_class - top).sum(0))


def load_run(run_dir: str) -> Trainer:
  """A `Trainer` for a finished (or interrupted) run, weights restored.

  Raises:
    FileNotFoundError: if `run_dir` has no `config.json` or no checkpoint.
  """
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{run_dir} is not a training directory (no '
                            f'{CONFIG_FILE}).')
  with open(path) as f:
    config = TrainConfig.from_dict(json.load(f))
  trainer = Trainer(config, out_dir=run_dir)
  if not trainer.restore():
    raise FileNotFoundError(f'{run_dir} has no checkpoint yet.')
  return trainer


class _ExportModule(tf.Module):
  """What `export_saved_model` saves: the variables and two functions."""

  def __init__(self, trainer: 'Trainer'):
    super().__init__(name='tfp_ffjord_flow')
    model, flow = trainer.model, trainer.eval_flow
    dim, classes = trainer.data.dim, model.num_classes
    self.model = model   # tracks the variables
    # Variables, because a SavedModel keeps trackables, not constants.
    self.dim = tf.Variable(dim, trainable=False, dtype=tf.int32)
    self.num_classes = tf.Variable(classes, trainable=False, dtype=tf.int32)
    self.config_json = tf.Variable(json.dumps(trainer.config.to_dict()),
                                   trainable=False)
    points = tf.TensorSpec([None, dim], tf.float32, name='x')
    count = tf.TensorSpec([], tf.int32, name='n')
    seed = tf.TensorSpec([2], tf.int32, name='seed')
    if classes:
      label_spec = tf.TensorSpec([None], tf.int32, name='labels')

      @tf.function(input_signature=[points, label_spec])
      def log_prob(x, labels):
        return {'log_prob': flow.log_prob(
            x, bijector_kwargs=model.bijector_kwargs(labels))}

      @tf.function(input_signature=[count, seed,
                                    tf.TensorSpec([], tf.int32, name='label')])
      def sample(n, seed, label):
        kwargs = model.bijector_kwargs(tf.fill([n], label))
        return {'samples': flow.sample(n, seed=seed, bijector_kwargs=kwargs)}
    else:
      @tf.function(input_signature=[points])
      def log_prob(x):
        return {'log_prob': flow.log_prob(x)}

      @tf.function(input_signature=[count, seed])
      def sample(n, seed):
        return {'samples': flow.sample(n, seed=seed)}
    self.log_prob = log_prob
    self.sample = sample


def export_saved_model(trainer: 'Trainer', path: str) -> str:
  """Saves the trained flow as a SavedModel with `log_prob` and `sample`.

  The SavedModel needs only TensorFlow to load (`tf.saved_model.load(path)`,
  no tfp_ffjord or TFP import), and runs the held-out evaluation's solver
  and exact trace:

  * `log_prob(x)`: `x` float32 `[N, D]` -> `{'log_prob': [N]}`;
  * `sample(n, seed)`: int32 scalar and int32 `[2]` -> `{'samples': [n, D]}`,
    the same points for the same seed (stateless sampling);
  * conditional models take `labels` (`[N]` int32) in `log_prob` and one
    `label` (int32 scalar) in `sample`.

  Both are also `signatures` (for TF Serving and `saved_model_cli`), and
  the module has `dim`, `num_classes` and `config_json` constants. The
  directory is written under a temporary name and renamed, so a crash
  never leaves a half-written SavedModel at `path`.
  """
  module = _ExportModule(trainer)
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    raise FileExistsError(f'{path} already exists and is not empty.')
  tmp = f'{path}.tmp-{os.getpid()}'
  tf.saved_model.save(module, tmp, signatures={
      'log_prob': module.log_prob, 'sample': module.sample,
      'serving_default': module.log_prob})
  if os.path.exists(path):
    os.rmdir(path)
  os.replace(tmp, path)
  return path


# ------------------------------------------------- small-model optimisation


def fit_adam(loss_fn: Callable[[], tf.Tensor], variables: Sequence[tf.Variable],
             steps: int, learning_rate: float = 1e-2,
             jit_compile: bool = False) -> List[float]:
  """Minimises `loss_fn()` over `variables` with Sonnet's Adam.

  For models small enough to use all their data in every step (the
  DiffEqFlux tutorial, the bijector examples). Returns the loss before each
  step.

  Raises:
    ValueError: for a non-positive `steps` or `learning_rate`.
    TrainingError: if the loss becomes non-finite (the variables keep the
      values of the last good step).
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f'`steps` must be a positive integer; got {steps!r}.')
  if not learning_rate > 0:
    raise ValueError(
        f'`learning_rate` must be positive; got {learning_rate!r}.')
  variables = list(variables)
  optimizer = snt.optimizers.Adam(learning_rate)
  optimizer._initialize(variables)  # pylint: disable=protected-access

  @tf.function(jit_compile=jit_compile)
  def step():
    with tf.GradientTape() as tape:
      loss = loss_fn()
    _apply_if_finite(optimizer, loss, tape.gradient(loss, variables),
                     variables)
    return loss

  losses = []
  for i in range(steps):
    loss = float(step())
    if not math.isfinite(loss):
      raise TrainingError(f'fit_adam: the loss became {loss} at step {i + 1}.')
    losses.append(loss)
  return losses


def fit_lbfgs(loss_fn: Callable[[], tf.Tensor],
              variables: Sequence[tf.Variable], max_iterations: int = 100,
              tolerance: float = 1e-8, jit_compile: bool = False):
  """Minimises `loss_fn()` with `tfp.optimizer.lbfgs_minimize`.

  The variables are packed into one vector for the optimizer and hold the
  optimum when this returns (as after `Optim.LBFGS()` in Julia).

  A non-finite loss (e.g. a solve that failed with `raise_on_failure=False`,
  whose states are NaN) is given to the optimizer as +inf: TFP's Hager-Zhang
  line search bisects back from +inf, where a NaN would end the search.

  `jit_compile=True` compiles the loss and its gradient with XLA (one
  compilation; much faster steps for small models).

  Returns:
    TFP's `LBfgsOptimizerResults` (`converged`, `num_iterations`,
    `objective_value`, ...), as NumPy values.
  """
  if (isinstance(max_iterations, bool) or not isinstance(max_iterations, int)
      or max_iterations < 1):
    raise ValueError('`max_iterations` must be a positive integer; got '
                     f'{max_iterations!r}.')
  variables = list(variables)
  shapes = [v.shape for v in variables]
  sizes = [int(np.prod(s)) for s in shapes]
  dtype = variables[0].dtype

  def assign(flat):
    for v, part, shape in zip(variables, tf.split(flat, sizes), shapes):
      v.assign(tf.reshape(part, shape))

  # One trace, however many times the line search calls it.
  @tf.function(jit_compile=jit_compile)
  def value_and_gradients(flat):
    assign(flat)
    with tf.GradientTape() as tape:
      loss = loss_fn()
    grads = tape.gradient(loss, variables)
    grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
             for g, v in zip(grads, variables)]
    flat_grad = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    finite = tf.math.is_finite(loss)
    loss = tf.where(finite, loss, tf.constant(np.inf, loss.dtype))
    return loss, tf.where(finite, flat_grad, tf.zeros_like(flat_grad))

  def run(start):
    # The optimizer's own loop runs eagerly around the compiled loss: tracing
    # TFP's line search costs more (~20 s) than running it.
    result = tfp.optimizer.lbfgs_minimize(
        value_and_gradients, start, max_iterations=max_iterations,
        tolerance=tolerance)
    assign(result.position)
    return result

  start = tf.concat([tf.reshape(tf.cast(v, dtype), [-1]) for v in variables],
                    0)
  return tf.nest.map_structure(
      lambda t: t.numpy() if isinstance(t, tf.Tensor) else t, run(start))


def total_variation(learned_pdf, true_pdf) -> float:
  """`sum |p - q| / 2 / n` over `n` points: the DiffEqFlux tutorial's score.

  (Distances.jl's `totalvariation` divided by the number of points, on the
  density values at the training points.)
  """
  p = np.asarray(learned_pdf, np.float64).ravel()
  q = np.asarray(true_pdf, np.float64).ravel()
  if p.shape != q.shape or p.size == 0:
    raise ValueError('`learned_pdf` and `true_pdf` must be non-empty and of '
                     f'equal size; got {p.shape} and {q.shape}.')
  return float(np.abs(p - q).sum() / 2. / p.size)


def time_train_step(distribution, variables: Sequence[tf.Variable], batch,
                    steps: int = 10, jit_compile: bool = False,
                    learning_rate: float = 1e-2) -> Dict[str, float]:
  """Times a maximum-likelihood Adam step of any TFP distribution.

  For side-by-side comparisons (e.g. `tfb.FFJORD` against
  `tfp_ffjord.FFJORD` on the same data). The step is compiled with
  `tf.function` (and XLA if asked).

  Returns:
    `{'first_step': seconds for the first call (tracing, compilation, one
    step), 'step': median seconds of the next `steps` calls, 'loss': last
    loss}`.
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f'`steps` must be a positive integer; got {steps!r}.')
  variables = list(variables)
  optimizer = snt.optimizers.Adam(learning_rate)
  batch = tf.convert_to_tensor(batch)

  @tf.function(jit_compile=jit_compile)
  def step(x):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(distribution.log_prob(x))
    optimizer.apply(tape.gradient(loss, variables), variables)
    return loss

  start = time.perf_counter()
  loss = float(step(batch))
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = float(step(batch))
    times.append(time.perf_counter() - start)
  return {'first_step': first, 'step': float(np.median(times)), 'loss': loss}
