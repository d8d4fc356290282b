"""`Trainer`: the loop that fits a `FlowModel` and keeps a run directory.

It only orchestrates: the objectives (`likelihood`, `flow_matching`), the
compiled steps (`steps`, `distribute`), the run directory (`run_dir`),
SIGINT (`interrupt`), figures and export live in their own modules.
"""

import contextlib
import functools
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfp_ffjord import datasets
from tfp_ffjord import ode
from tfp_ffjord.training import adam as adam_lib
from tfp_ffjord.training import averaging
from tfp_ffjord.training import distribute
from tfp_ffjord.training import flow_matching
from tfp_ffjord.training import likelihood
from tfp_ffjord.training import run_dir as run_dir_lib
from tfp_ffjord.training import steps as steps_lib
from tfp_ffjord.training.checkpoints import Checkpoints
from tfp_ffjord.training.config import TrainConfig
from tfp_ffjord.training.errors import TrainingError
from tfp_ffjord.training.errors import solver_failure
from tfp_ffjord.training.errors import TrainingInterrupted
from tfp_ffjord.training.evaluation import Evaluator
from tfp_ffjord.training.interrupt import sigint_flag
from tfp_ffjord.training.model import FlowModel
from tfp_ffjord.training.model import make_solver

__all__ = ['Trainer', 'load_run', 'FLOW_MATCHING_CHUNK', 'COSINE_FLOOR']

# Flow-matching steps per compiled call; SIGINT is honoured between calls.
FLOW_MATCHING_CHUNK = 250
# The cosine schedule decays the learning rate to this fraction of its start.
COSINE_FLOOR = 0.01


def _averaged(method):
  """`method` run within `self.averaged_weights()`."""
  @functools.wraps(method)
  def with_averaged_weights(self, *args, **kwargs):
    with self.averaged_weights():
      return method(self, *args, **kwargs)
  return with_averaged_weights


class Trainer:
  """Trains a `FlowModel` on a dataset; checkpoints into `out_dir`.

  Every epoch ends with a held-out evaluation (`config.eval_trace`, tight
  tolerance), a checkpoint (model, optimizer state, epoch, step),
  `tf.summary` scalars and an updated `metrics.json`; `fit()` on the same
  `out_dir` continues from the last checkpoint. The training step is one
  compiled function with a fixed signature, traced once (`num_traces`).

  Args:
    config: a `TrainConfig`.
    out_dir: the run directory; `None` keeps everything in memory.
    data: a `datasets.Dataset` to use instead of loading `config.dataset`.
    strategy: a `tf.distribute` strategy (maximum likelihood only).
  """

  def __init__(self, config: TrainConfig, out_dir: Optional[str] = None,
               data: Optional[datasets.Dataset] = None,
               strategy: Optional[tf.distribute.Strategy] = None):
    config.validate()
    self.config, self.out_dir = config, out_dir
    self.run_dir = (None if out_dir is None
                    else run_dir_lib.RunDir.for_writing(out_dir))
    self.strategy = strategy or tf.distribute.get_strategy()
    self.distributed = strategy is not None
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.is_chief = distribute.is_chief(
        getattr(self.strategy, 'cluster_resolver', None))
    self.data = _checked_data(config, data, self.num_replicas
                              if self.distributed else None)
    self.steps_per_epoch = (config.steps_per_epoch
                            or len(self.data.train) // config.batch_size)
    tf.random.set_seed(config.seed)
    # Every variable is created under the strategy's scope: mirrored on each
    # replica when distributed.
    with self.strategy.scope():
      self.model = FlowModel.from_config(config, self.data)
      # Baselines create their variables (Glow its ActNorm scales) from a
      # first batch; a resumed run's checkpoint then overwrites them.
      self.model.initialize(self.data.train[:config.batch_size])
      self.flow, self.chain = self.model.flow(make_solver(config),
                                              config.trace)
      self.eval_flow, self.eval_chain = self.model.flow(
          make_solver(config, for_eval=True),
          config.eval_trace_for(self.data.dim))
      self.variables = list(self.model.trainable_variables)
      self.learning_rate = tf.Variable(config.learning_rate, trainable=False,
                                       dtype=tf.float32, name='learning_rate')
      self.optimizer = adam_lib.Adam(self.learning_rate)
      # Adam's moments now: a first step that creates variables would be
      # traced twice.
      self.optimizer._initialize(self.variables)  # pylint: disable=protected-access
      self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64,
                               name='epoch')
      self.step = tf.Variable(0, trainable=False, dtype=tf.int64, name='step')
      self.average = (averaging.WeightAverage(self.variables,
                                              config.ema_decay)
                      if config.ema_decay else None)
    self.checkpoints = self.writer = None
    if out_dir is not None:
      self.checkpoints = Checkpoints(
          dict(model=self.model, optimizer=self.optimizer, epoch=self.epoch,
               step=self.step, learning_rate=self.learning_rate,
               **({} if self.average is None else {'average': self.average})),
          self.run_dir.checkpoint_dir, self.is_chief, config.max_to_keep)
    self.history: List[Dict] = []
    self.last_regularizers = (0., 0.)
    self._restored = False
    self.num_traces = 0
    (self._train_step, self._fm_chunk, self._fm_steps,
     self.evaluator) = _compiled_steps(self)

  @property
  def manager(self) -> Optional[tf.train.CheckpointManager]:
    """The `tf.train.CheckpointManager` this process saves with."""
    return None if self.checkpoints is None else self.checkpoints.manager

  def _count_trace(self):
    self.num_traces += 1

  # ---------------------------------------------------------------- steps

  def train_step(self, batch, labels=None) -> Tuple[float, int]:
    """One optimizer step on a `[batch_size, D]` batch: `(loss, NFE)`.

    With `objective='flow-matching'` the step is simulation-free (NFE 0) and
    the loss is the flow-matching regression loss, not an NLL. `labels`
    (`[batch_size]` ints) are required by conditional models. The loss
    includes the RNODE terms when the config weights them; their batch
    means are in `last_regularizers` (`(kinetic, frobenius)`).
    """
    batch = np.asarray(batch, np.float32)
    labels = self.evaluator.labels(labels, len(batch))
    if self.config.objective == 'flow-matching':
      losses = flow_matching.run_chunk(
          self._fm_steps, self.config, int(self.step.numpy()), self._fm_chunk,
          batch[np.newaxis], labels[np.newaxis], self.model.base_scale)
      self.last_regularizers = (0., 0.)
      return losses[0], 0
    if self.distributed:   # split the global batch over the replicas
      (batch, labels), = distribute.distribute_batches(
          self.strategy, tf.data.Dataset.from_tensors((batch, labels)), True)
    return self._run_step(batch, labels)

  def _run_step(self, batch, labels) -> Tuple[float, int]:
    try:
      terms = self._train_step(batch, labels)
    except ode.SolverError as e:
      raise solver_failure(
          e, f'in training step {int(self.step.numpy()) + 1}',
          '; the step was not applied.') from None
    self.last_regularizers = (float(terms.kinetic), float(terms.frobenius))
    return float(terms.loss), int(terms.nfe)

  # ----------------------------------------------------------- evaluation
  # With `config.ema_decay`, these use the averaged weights.

  def averaged_weights(self):
    """A context in which the model holds the weights' moving average
    (`config.ema_decay`; without one, the weights themselves)."""
    return (contextlib.nullcontext() if self.average is None
            else self.average.swapped())

  @_averaged
  def log_prob(self, points, labels=None) -> np.ndarray:
    """Log-density (nats) of `[N, D]` points (see `Evaluator`)."""
    return self.evaluator.log_prob(points, labels)

  @_averaged
  def marginal_log_prob(self, points) -> np.ndarray:
    """`log p(x)`; for conditional models the mixture over the classes.

    Args:
      points: `[N, D]` points.

    Returns:
      `[N]` log densities: `log sum_c p(c) p(x | c)` for a conditional
      model, with `p(c)` the training frequencies.
    """
    return self.evaluator.marginal_log_prob(points)

  @_averaged
  def evaluate(self, points=None, labels=None) -> Dict[str, float]:
    """Mean NLL of `points` (default: the test set; see `Evaluator`)."""
    return self.evaluator.evaluate(points, labels)

  @_averaged
  def forward(self, points, labels=None) -> np.ndarray:
    """Data points mapped to the base space (see `Evaluator.forward`)."""
    return self.evaluator.forward(points, labels)

  @_averaged
  def sample(self, n: int, seed: int = 0, labels=None) -> np.ndarray:
    """`n` samples of the model, `[n, D]` (see `Evaluator.sample`)."""
    return self.evaluator.sample(n, seed, labels)

  @property
  def epochs_done(self) -> int:
    """The epochs trained so far (restored with a checkpoint)."""
    return int(self.epoch.numpy())

  # ------------------------------------------------------ checkpoints, fit

  def restore(self) -> bool:
    """Restores the latest readable checkpoint of `out_dir`; False if there
    is none (a truncated one is skipped, with a warning, for the previous)."""
    saved = None if self.checkpoints is None else self.checkpoints.restore()
    if saved is None:
      return False
    self._restored = True
    self.history = [h for h in saved if h['epoch'] <= self.epochs_done]
    return True

  def save(self) -> Optional[str]:
    """Writes a checkpoint numbered by the global step (if not written yet)."""
    if self.checkpoints is None:
      return None
    return self.checkpoints.save(int(self.step.numpy()), self.history)

  def fit(self, progress: bool = True,
          callback: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
    """Trains until `config.epochs` (or `config.max_train_seconds` of
    training steps), resuming from `out_dir` if possible.

    Returns the per-epoch history (also in `metrics.json`). Raises
    `TrainingError` if the loss becomes non-finite or a solve fails; the
    weights are then those of the last good step and the last checkpoint is
    the last good epoch. The first SIGINT (Ctrl-C) stops after the current
    step, saves a checkpoint there and raises `TrainingInterrupted`; a
    resumed `fit()` skips the batches of that epoch already trained on (a
    second SIGINT interrupts at once, without saving).
    """
    import tqdm  # pylint: disable=g-import-not-at-top
    config = self.config
    if self.run_dir is not None:
      if self.is_chief:
        self.run_dir.write_config(config.to_dict())
      if not self._restored:
        self.restore()
      self._restored = True   # from here on the weights are this run's
      if self.is_chief:
        self.writer = tf.summary.create_file_writer(self.run_dir.log_dir)
    first = self.epochs_done
    skip, start, train_time = _resume_point(
        self.history, first, int(self.step.numpy()), self.steps_per_epoch)
    bar = tqdm.trange(first, config.epochs, initial=first,
                      total=config.epochs, desc=config.dataset,
                      disable=not progress)
    try:
      with sigint_flag() as interrupted, contextlib.closing(bar):
        for epoch in bar:
          if config.lr_schedule == 'cosine':
            self.learning_rate.assign(_cosine_rate(config, epoch, train_time))
          began = time.perf_counter()
          losses, nfes, regs = self._train_epoch(epoch, skip, interrupted)
          train_time += time.perf_counter() - began
          skip = 0
          self._end_epoch(epoch, losses, nfes, regs, start, bar, callback,
                          train_time)
          if (config.max_train_seconds is not None
              and train_time >= config.max_train_seconds):
            break   # the time budget; `fit()` again continues
    finally:
      if self.checkpoints is not None:
        self.checkpoints.close()
    return self.history

  def _train_epoch(self, epoch, skip, interrupted):
    """The epoch's steps after the first `skip`: their losses, NFEs and
    regularisers. Each epoch's batches depend only on `(seed, epoch)`, so a
    resumed run sees those an uninterrupted one would."""
    config, conditional = self.config, bool(self.model.num_classes)
    if interrupted[0]:
      raise _interrupted(self, epoch)
    epoch_fn = (_flow_matching_epoch if config.objective == 'flow-matching'
                else _likelihood_epoch)
    results = epoch_fn(self, epoch, skip, conditional)
    losses, nfes, regs = [], [], []
    for chunk in results:
      for loss, nfe, reg in chunk:
        losses.append(loss)
        nfes.append(nfe)
        regs.append(reg)
      if chunk and not math.isfinite(losses[-1]):
        raise _non_finite(losses[-1], epoch, int(self.step.numpy()),
                          self.checkpoints)
      if interrupted[0]:
        raise _interrupted(self, epoch)
    return losses, nfes, regs

  def _end_epoch(self, epoch, losses, nfes, regs, start, bar, callback,
                 train_time):
    """Held-out evaluation, the epoch's record, checkpoint, logs, metrics."""
    try:
      evaluation = self.evaluate()
    except ode.SolverError as e:
      raise solver_failure(
          e, f'in the held-out evaluation after epoch {epoch + 1}',
          f'{_kept(self.checkpoints)} Evaluate with a looser tolerance or more '
          '`max_num_steps`.') from None
    record = _epoch_record(epoch, float(self.learning_rate.numpy()),
                           (losses, nfes, regs), evaluation,
                           (time.perf_counter() - start, train_time),
                           self.config.regularized)
    self.history.append(record)
    self.epoch.assign(epoch + 1)
    bar.set_postfix(loss=f'{record["train_loss"] or float("nan"):.3f}',
                    test_nll=f'{record["test_nll"]:.3f}',
                    nfe=f'{record["nfe_per_step"] or 0:.0f}')
    if self.run_dir is not None:
      self.save()   # every worker: saving may need collectives
      if self.is_chief:
        _log_scalars(self.writer, record)
        self.write_metrics()
    if callback is not None:
      callback(record)

  # -------------------------------------------------------------- outputs

  def metrics(self) -> Dict:
    """The content of `metrics.json`."""
    return run_dir_lib.summary(self.config.to_dict(), self.history,
                               self.data.entropy)

  def write_metrics(self) -> Optional[str]:
    """Writes `metrics.json` atomically; only the chief (else None)."""
    if not self.is_chief or self.run_dir is None:
      return None
    return self.run_dir.write_metrics(self.metrics())

  @_averaged
  def plot(self, out_dir: Optional[str] = None, tag: str = 'last'
           ) -> List[str]:
    """Writes the figures that apply to the data (see `figures`)."""
    from tfp_ffjord.training import figures  # pylint: disable=g-import-not-at-top
    return figures.write_figures(self, out_dir, tag, seed=self.config.seed)


def _interrupted(trainer, epoch) -> TrainingInterrupted:
  """Saves a mid-epoch checkpoint; the `TrainingInterrupted` to raise."""
  where = f'epoch {epoch + 1}, step {int(trainer.step.numpy())}'
  if trainer.checkpoints is None:
    return TrainingInterrupted(f'Interrupted at {where} (no out_dir: '
                               'nothing saved).')
  return TrainingInterrupted(
      f'Interrupted at {where}; saved {trainer.save()}. Continue with '
      '--resume (`Trainer.fit()` on the same out_dir).')


def _kept(checkpoints) -> str:
  """How the last checkpoint stands, for error messages."""
  if checkpoints is None or checkpoints.latest is None:
    return '.'
  return f'; the last checkpoint ({checkpoints.latest}) is the last good state.'


def _non_finite(loss, epoch, step, checkpoints) -> TrainingError:
  return TrainingError(
      f'The training loss became {loss} at epoch {epoch + 1}, step '
      f'{step + 1}; the weights of the last good step are kept'
      f'{_kept(checkpoints)} Try a lower learning rate, --clip-norm or a '
      'tighter tolerance.')


def _compiled_steps(trainer):
  """`trainer`'s compiled functions: `(train_step, flow-matching chunk,
  flow-matching steps, Evaluator)`."""
  config, dim = trainer.config, trainer.data.dim
  # Labels are always an input (ignored by unconditional models), so both
  # kinds of model share one compiled signature.
  labels = lambda n: tf.TensorSpec([n], tf.int32)
  points = lambda n: tf.TensorSpec([n, dim], tf.float32)
  loss = lambda batch, labels, replica_id=None: likelihood.likelihood_loss(
      trainer.model, trainer.chain, config, batch, labels,
      likelihood.hutchinson_seed(config, trainer.step, replica_id))
  common = dict(jit_compile=config.jit_compile,
                on_trace=trainer._count_trace)  # pylint: disable=protected-access
  update = steps_lib.Update(trainer.optimizer, trainer.variables,
                            trainer.step, config.clip_norm, trainer.average)
  if trainer.distributed:
    train_step = distribute.make_distributed_step(
        trainer.strategy, loss, update, config.batch_size, **common)
  else:
    train_step = steps_lib.make_train_step(
        loss, update, [points(config.batch_size), labels(config.batch_size)],
        **common)
  fm_chunk = min(FLOW_MATCHING_CHUNK, trainer.steps_per_epoch)
  fm_steps = flow_matching.make_steps(
      trainer.model, update, config, fm_chunk, dim,
      on_trace=trainer._count_trace)  # pylint: disable=protected-access
  evaluator = Evaluator(trainer.model, trainer.eval_flow, trainer.eval_chain,
                        trainer.data, config.eval_batch_size,
                        config.jit_compile)
  return train_step, fm_chunk, fm_steps, evaluator


def _checked_data(config, data, num_replicas):
  """`data` (default: `config.dataset` loaded) after the checks that need
  it and the replicas (`num_replicas`, None when not distributed)."""
  if num_replicas is not None and config.objective != 'maximum-likelihood':
    raise ValueError('Training under a tf.distribute strategy supports '
                     "`objective='maximum-likelihood'` only; got "
                     f'{config.objective!r}.')
  if num_replicas is not None and config.batch_size % num_replicas:
    raise ValueError(
        f'`batch_size` ({config.batch_size}) is the global batch: it must '
        f'be divisible by the {num_replicas} replicas.')
  data = data or datasets.load(config.dataset, config.num_train,
                               config.num_test, seed=config.seed)
  if config.batch_size > len(data.train):
    raise ValueError(
        f'`batch_size` ({config.batch_size}) is larger than the '
        f'{len(data.train)} training points.')
  if config.conditional and not data.num_classes:
    raise ValueError(f'`conditional=True` but dataset {data.name!r} '
                     'has no class labels.')
  return data


def _resume_point(history, first, step, steps_per_epoch):
  """`(skip, start, train_time)` for a `fit()` from epoch `first` at global
  step `step`: the batches of `first` applied before an interruption, the
  `perf_counter` origin of the run's wall time, and the seconds spent in
  training steps only (no evaluations, checkpoints, logs)."""
  skip = step - first * steps_per_epoch
  skip = skip if 0 <= skip < steps_per_epoch else 0
  start = time.perf_counter() - (history[-1]['wall_time'] if history else 0.)
  train_time = history[-1].get('train_time', 0.) if history else 0.
  return skip, start, train_time


def _cosine_rate(config, epoch, train_time=0.):
  """The cosine schedule's learning rate for `epoch`, after `train_time`
  seconds of training steps: its progress is through the epochs, or through
  `max_train_seconds` if that budget is the nearer to its end."""
  progress = epoch / max(config.epochs - 1, 1)
  if config.max_train_seconds is not None:
    progress = max(progress, train_time / config.max_train_seconds)
  return config.learning_rate * (COSINE_FLOOR + (1. - COSINE_FLOOR) * 0.5 * (
      1. + math.cos(math.pi * min(progress, 1.))))


def _flow_matching_epoch(trainer, epoch, skip, conditional):
  """Runs `trainer`'s flow-matching steps of `epoch` after the first
  `skip`; yields `[(loss, 0, (0, 0))]` per compiled chunk of steps."""
  epoch_steps = flow_matching.EpochSteps(
      trainer._fm_steps, trainer._fm_chunk, trainer.step,  # pylint: disable=protected-access
      trainer.model.base_scale)
  for losses in flow_matching.run_epoch(
      epoch_steps, trainer.config, trainer.data, conditional,
      trainer.steps_per_epoch, epoch, skip):
    yield [(loss, 0, (0., 0.)) for loss in losses]


def _likelihood_epoch(trainer, epoch, skip, conditional):
  """Runs the epoch's maximum-likelihood steps; yields `[(loss, nfe,
  regularisers)]` after each."""
  config = trainer.config
  ds = trainer.data.train_dataset(config.batch_size, seed=config.seed + epoch,
                               with_labels=conditional)
  if config.steps_per_epoch is not None:
    # Each pass over the data is reshuffled (deterministically).
    ds = ds.repeat().take(trainer.steps_per_epoch)
  ds = ds.skip(skip)
  if trainer.distributed:
    ds = distribute.distribute_batches(trainer.strategy, ds, conditional)
  # Single-device steps go through the public `train_step`.
  step = trainer._run_step if trainer.distributed else trainer.train_step
  for item in ds:
    batch, labels = item if (conditional or trainer.distributed) else (item,
                                                                    None)
    try:
      loss, nfe = step(batch, labels)
    except TrainingError as e:
      raise TrainingError(f'Epoch {epoch + 1}: {str(e).rstrip(".")}'
                          f'{_kept(trainer.checkpoints)}', e.solver_error) from None
    yield [(loss, nfe, trainer.last_regularizers)]


def _epoch_record(epoch, learning_rate, steps, evaluation, times,
                  regularized):
  """An epoch's line of the history: `steps` is its steps' `(losses, nfes,
  regularisers)`, `times` the `(wall, training)` seconds so far."""
  losses, nfes, regs = steps
  mean = lambda xs: float(np.mean(xs)) if xs else None
  record = dict(epoch=epoch + 1, learning_rate=learning_rate,
                train_loss=mean(losses), test_nll=evaluation['nll'],
                nfe_per_step=mean(nfes), eval_nfe=evaluation['nfe'],
                wall_time=times[0], train_time=times[1])
  if 'bits_per_dim' in evaluation:
    record['test_bits_per_dim'] = evaluation['bits_per_dim']
  if regularized and regs:
    record['kinetic_energy'] = mean([r[0] for r in regs])
    record['jacobian_frobenius'] = mean([r[1] for r in regs])
  return record


def _log_scalars(writer, record):
  """The record's values as TensorBoard scalars at its epoch."""
  with writer.as_default(step=record['epoch']):
    for key, value in record.items():
      if key != 'epoch' and value is not None:
        tf.summary.scalar(key, value)
  writer.flush()


def load_run(run_dir: str) -> Trainer:
  """A `Trainer` for a finished (or interrupted) run, weights restored.

  Args:
    run_dir: the run's directory.

  Returns:
    The `Trainer`, its history read from the checkpoint.

  Raises:
    FileNotFoundError: if `run_dir` has no `config.json` or no checkpoint.
  """
  config = TrainConfig.from_dict(run_dir_lib.RunDir(run_dir).read_config())
  trainer = Trainer(config, out_dir=run_dir)
  if not trainer.restore():
    raise FileNotFoundError(f'{run_dir} has no checkpoint yet.')
  return trainer
