"""`Trainer`: the loop that fits a `FlowModel` and keeps a run directory.

It only orchestrates: the objectives (`likelihood`, `flow_matching`), the
compiled steps (`steps`, `distribute`), the run directory (`run_dir`),
SIGINT (`interrupt`), figures and export live in their own modules.
"""

import contextlib
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import sonnet as snt
import tensorflow as tf

from tfp_ffjord import datasets
from tfp_ffjord import ode
from tfp_ffjord.training import distribute
from tfp_ffjord.training import flow_matching
from tfp_ffjord.training import likelihood
from tfp_ffjord.training import run_dir as run_dir_lib
from tfp_ffjord.training import steps as steps_lib
from tfp_ffjord.training.config import TrainConfig
from tfp_ffjord.training.errors import TrainingError
from tfp_ffjord.training.errors import TrainingInterrupted
from tfp_ffjord.training.interrupt import sigint_flag
from tfp_ffjord.training.model import FlowModel
from tfp_ffjord.training.model import make_solver

__all__ = ['Trainer', 'load_run', 'FLOW_MATCHING_CHUNK', 'COSINE_FLOOR']

# Flow-matching steps per compiled call; SIGINT is honoured between calls.
FLOW_MATCHING_CHUNK = 250
# The cosine schedule decays the learning rate to this fraction of its start.
COSINE_FLOOR = 0.01


def _solver_failure(error: ode.SolverError, where: str, kept: str):
  return TrainingError(f'The ODE solver failed {where}: '
                       f'{error.summary.rstrip(".")}{kept}',
                       solver_error=error)


class Trainer:
  """Trains a `FlowModel` on a dataset; checkpoints into `out_dir`.

  Every epoch ends with a held-out evaluation (exact trace, tight
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
    self.run_dir = None if out_dir is None else run_dir_lib.RunDir(out_dir)
    self.strategy = strategy or tf.distribute.get_strategy()
    self.distributed = strategy is not None
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.is_chief = distribute.is_chief(
        getattr(self.strategy, 'cluster_resolver', None))
    if self.distributed and config.objective != 'maximum-likelihood':
      raise ValueError('Training under a tf.distribute strategy supports '
                       "`objective='maximum-likelihood'` only; got "
                       f'{config.objective!r}.')
    if self.distributed and config.batch_size % self.num_replicas:
      raise ValueError(
          f'`batch_size` ({config.batch_size}) is the global batch: it must '
          f'be divisible by the {self.num_replicas} replicas.')
    self.data = data or datasets.load(config.dataset, config.num_train,
                                      config.num_test, seed=config.seed)
    if config.batch_size > len(self.data.train):
      raise ValueError(
          f'`batch_size` ({config.batch_size}) is larger than the '
          f'{len(self.data.train)} training points.')
    if config.conditional and not self.data.num_classes:
      raise ValueError(f'`conditional=True` but dataset {self.data.name!r} '
                       'has no class labels.')
    self.steps_per_epoch = (config.steps_per_epoch
                            or len(self.data.train) // config.batch_size)
    tf.random.set_seed(config.seed)
    # Every variable is created under the strategy's scope: mirrored on each
    # replica when distributed.
    with self.strategy.scope():
      self.model = FlowModel(
          self.data.dim, config.blocks, config.hidden, config.activation,
          config.base_scale,
          num_classes=self.data.num_classes if config.conditional else 0)
      self.flow, self.chain = self.model.flow(make_solver(config),
                                              config.trace)
      self.eval_flow, self.eval_chain = self.model.flow(
          make_solver(config, for_eval=True), 'exact')
      self.variables = list(self.model.trainable_variables)
      self.learning_rate = tf.Variable(config.learning_rate, trainable=False,
                                       dtype=tf.float32, name='learning_rate')
      self.optimizer = snt.optimizers.Adam(self.learning_rate)
      # Adam's moments now: a first step that creates variables would be
      # traced twice.
      self.optimizer._initialize(self.variables)  # pylint: disable=protected-access
      self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64,
                               name='epoch')
      self.step = tf.Variable(0, trainable=False, dtype=tf.int64, name='step')
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, optimizer=self.optimizer, epoch=self.epoch,
        step=self.step, learning_rate=self.learning_rate)
    self.manager = self._read_manager = self.writer = self._worker_dir = None
    if out_dir is not None:
      self._make_managers()
    self.history: List[Dict] = []
    self.last_regularizers = (0., 0.)
    self._restored = False
    self.num_traces = 0
    self._compile()

  def _make_managers(self):
    chief_dir = self.run_dir.checkpoint_dir
    if self.is_chief:
      self.manager = self._read_manager = tf.train.CheckpointManager(
          self.checkpoint, chief_dir, max_to_keep=self.config.max_to_keep)
      return
    # Every worker must save (saving may need collectives); only the chief's
    # checkpoints are kept, the others' go to a scratch directory (removed
    # when `fit` ends). Every worker restores the chief's.
    self._worker_dir = tempfile.mkdtemp(prefix='tfp_ffjord_worker_')
    self.manager = tf.train.CheckpointManager(self.checkpoint,
                                              self._worker_dir, max_to_keep=1)
    self._read_manager = tf.train.CheckpointManager(
        self.checkpoint, chief_dir, max_to_keep=None)

  def _count_trace(self):
    self.num_traces += 1

  def _compile(self):
    config, dim = self.config, self.data.dim
    # Labels are always an input (ignored by unconditional models), so both
    # kinds of model share one compiled signature.
    labels = lambda n: tf.TensorSpec([n], tf.int32)
    points = lambda n: tf.TensorSpec([n, dim], tf.float32)
    loss = lambda batch, labels, replica_id=None: likelihood.likelihood_loss(
        self.model, self.chain, config, batch, labels,
        likelihood.hutchinson_seed(config, self.step, replica_id))
    common = dict(clip_norm=config.clip_norm, jit_compile=config.jit_compile,
                  on_trace=self._count_trace)
    if self.distributed:
      self._train_step = distribute.make_distributed_step(
          self.strategy, loss, self.optimizer, self.variables, self.step,
          config.batch_size, **common)
    else:
      self._train_step = steps_lib.make_train_step(
          loss, self.optimizer, self.variables, self.step,
          [points(config.batch_size), labels(config.batch_size)], **common)
    self._fm_chunk = min(FLOW_MATCHING_CHUNK, self.steps_per_epoch)
    self._fm_steps = flow_matching.make_steps(
        self.model, self.optimizer, self.variables, self.step, config,
        self._fm_chunk, dim, on_trace=self._count_trace)
    size = config.eval_batch_size
    self._eval_step = steps_lib.make_eval_step(
        lambda x, lab: self.model.log_prob_terms(self.eval_chain, x,
                                                 labels=lab)[::3],
        [points(size), labels(size)], jit_compile=config.jit_compile)
    self._forward = tf.function(
        lambda x, lab: self.eval_chain.forward(
            x, **self.model.bijector_kwargs(lab)),
        input_signature=[points(None), labels(None)], autograph=False)
    self._sample = tf.function(
        lambda n, seed, lab: self.eval_flow.sample(
            n, seed=seed, bijector_kwargs=self.model.bijector_kwargs(lab)),
        input_signature=[tf.TensorSpec([], tf.int32),
                         tf.TensorSpec([2], tf.int32), labels(None)],
        autograph=False)

  # ---------------------------------------------------------------- steps

  def _labels(self, labels, n) -> np.ndarray:
    """Labels for `n` points: the given ones, or zeros for unconditional
    models (which ignore them)."""
    classes = self.model.num_classes
    if labels is None:
      if classes:
        raise ValueError('This model is conditional: give class `labels`.')
      return np.zeros([n], np.int32)
    if not classes:
      raise ValueError('`labels` given, but this model is not conditional.')
    labels = np.broadcast_to(np.asarray(labels), [n]) if np.ndim(
        labels) == 0 else np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f'`labels` must have shape [{n}]; got {labels.shape}.')
    if labels.min() < 0 or labels.max() >= classes:
      raise ValueError(f'`labels` must be in [0, {classes}); got values in '
                       f'[{labels.min()}, {labels.max()}].')
    return labels.astype(np.int32)

  def train_step(self, batch, labels=None) -> Tuple[float, int]:
    """One optimizer step on a `[batch_size, D]` batch: `(loss, NFE)`.

    With `objective='flow-matching'` the step is simulation-free (NFE 0) and
    the loss is the flow-matching regression loss, not an NLL. `labels`
    (`[batch_size]` ints) are required by conditional models. The loss
    includes the RNODE terms when the config weights them; their batch
    means are in `last_regularizers` (`(kinetic, frobenius)`).
    """
    batch = np.asarray(batch, np.float32)
    labels = self._labels(labels, len(batch))
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
      raise _solver_failure(
          e, f'in training step {int(self.step.numpy()) + 1}',
          '; the step was not applied.') from None
    self.last_regularizers = (float(terms.kinetic), float(terms.frobenius))
    return float(terms.loss), int(terms.nfe)

  # ----------------------------------------------------------- evaluation

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
      chunk, chunk_labels = (points[start:start + size],
                             labels[start:start + size])
      n = len(chunk)
      if n < size:  # Pad to the traced shape; padding rows are dropped.
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - n, 0)])
        chunk_labels = np.concatenate(
            [chunk_labels, np.repeat(chunk_labels[:1], size - n)])
      lp, nfe = self._eval_step(tf.constant(chunk), tf.constant(chunk_labels))
      out.append(lp.numpy()[:n])
      self._last_eval_nfe.append(int(nfe))
    return np.concatenate(out) if out else np.zeros([0], np.float32)

  def marginal_log_prob(self, points) -> np.ndarray:
    """`log p(x)`; for conditional models the class mixture
    `log sum_c p(c) p(x | c)`, with `p(c)` the training frequencies."""
    if not self.model.num_classes:
      return self.log_prob(points)
    counts = np.bincount(self.data.train_labels,
                         minlength=self.model.num_classes)
    per_class = np.stack([
        np.log(counts[c] / counts.sum())
        + self.log_prob(points, np.full([len(points)], c))
        for c in range(len(counts)) if counts[c]])
    top = per_class.max(0)
    return top + np.log(np.exp(per_class - top).sum(0))

  def evaluate(self, points=None, labels=None) -> Dict[str, float]:
    """Mean NLL (nats; bits/dim too for D > 2 or dequantised data).

    Defaults to the test set (and, for conditional models, its labels).
    A conditional model given points without labels reports the marginal
    `-log sum_c p(c) p(x | c)`.
    """
    if points is None:
      points = self.data.test
      labels = self.data.test_labels if self.model.num_classes else None
    try:
      lp = (self.marginal_log_prob(points) if labels is None
            else self.log_prob(points, labels))
    except ode.SolverError as e:
      raise _solver_failure(
          e, 'in the evaluation', ' Evaluate with a looser tolerance or more '
          '`max_num_steps`.') from None
    nll = float(-np.mean(lp))
    result = {'nll': nll, 'nfe': float(np.mean(self._last_eval_nfe))}
    if self.data.dim > 2 or self.data.bin_width is not None:
      result['bits_per_dim'] = self.data.bits_per_dim(nll)
    return result

  def forward(self, points, labels=None) -> np.ndarray:
    """The flow's forward map (base -> data) of `[N, D]` points."""
    points = np.asarray(points, np.float32)
    labels = self._labels(labels, len(points))
    return self._forward(points, labels).numpy()

  def sample(self, n: int, seed: int = 0, labels=None) -> np.ndarray:
    """`n` samples of the model (tight-tolerance solve), `[n, D]`.

    Conditional models sample `x | label`: `labels` is an int (one class for
    all) or `[n]` ints; by default the classes of the training set are drawn
    in proportion.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f'`n` must be a positive integer; got {n!r}.')
    if self.model.num_classes and labels is None:
      labels = np.random.default_rng(seed).choice(self.data.train_labels, n)
    return self._sample(tf.constant(n), tf.constant([seed, 1]),
                        self._labels(labels, n)).numpy()

  @property
  def epochs_done(self) -> int:
    return int(self.epoch.numpy())

  # ------------------------------------------------------ checkpoints, fit

  def restore(self) -> bool:
    """Restores the latest readable checkpoint of `out_dir`; False if there
    is none (a truncated one is skipped, with a warning, for the previous)."""
    if self._read_manager is None or run_dir_lib.restore_latest(
        self.checkpoint, self._read_manager) is None:
      return False
    self._restored = True
    self.history = self.run_dir.read_history(self.epochs_done)
    return True

  def save(self) -> Optional[str]:
    """Writes a checkpoint numbered by the global step (if not written yet).

    TensorFlow writes the files under a temporary name and renames them, so
    a crash during a save leaves the previous checkpoint as the latest.
    """
    if self.manager is None:
      return None
    number, latest = int(self.step.numpy()), self.manager.latest_checkpoint
    if latest is not None and latest.endswith(f'-{number}'):
      return latest
    return self.manager.save(checkpoint_number=number)

  def fit(self, progress: bool = True,
          callback: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
    """Trains until `config.epochs`, resuming from `out_dir` if possible.

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
    # Batches of `first` applied before an interruption.
    skip = int(self.step.numpy()) - first * self.steps_per_epoch
    skip = skip if 0 <= skip < self.steps_per_epoch else 0
    start = time.perf_counter() - (self.history[-1]['wall_time']
                                   if self.history else 0.)
    bar = tqdm.trange(first, config.epochs, initial=first,
                      total=config.epochs, desc=config.dataset,
                      disable=not progress)
    try:
      with sigint_flag() as interrupted, contextlib.closing(bar):
        for epoch in bar:
          if config.lr_schedule == 'cosine':
            progress_ = epoch / max(config.epochs - 1, 1)
            self.learning_rate.assign(config.learning_rate * (
                COSINE_FLOOR + (1. - COSINE_FLOOR) * 0.5 * (
                    1. + math.cos(math.pi * min(progress_, 1.)))))
          losses, nfes, regs = self._train_epoch(epoch, skip, interrupted)
          skip = 0
          self._end_epoch(epoch, losses, nfes, regs, start, bar, callback)
    finally:
      if self._worker_dir is not None:
        shutil.rmtree(self._worker_dir, ignore_errors=True)
    return self.history

  def _train_epoch(self, epoch, skip, interrupted):
    """The epoch's steps after the first `skip`: their losses, NFEs and
    regularisers. Each epoch's batches depend only on `(seed, epoch)`, so a
    resumed run sees those an uninterrupted one would."""
    config, data = self.config, self.data
    conditional = bool(self.model.num_classes)
    losses, nfes, regs = [], [], []
    if config.objective == 'flow-matching':
      labels = (data.train_labels if conditional
                else np.zeros(len(data.train), np.int32)).astype(np.int32)
      order = flow_matching.epoch_order(len(data.train), config.batch_size,
                                        self.steps_per_epoch, config.seed,
                                        epoch)[skip:]
      for start in range(0, len(order), self._fm_chunk):
        if interrupted[0]:
          self._stop_interrupted(epoch)
        index = order[start:start + self._fm_chunk]
        new = flow_matching.run_chunk(
            self._fm_steps, config, int(self.step.numpy()), self._fm_chunk,
            data.train[index], labels[index], self.model.base_scale)
        losses += new
        if new and not math.isfinite(new[-1]):
          raise self._non_finite(new[-1], epoch)
      return losses, [0] * len(losses), [(0., 0.)] * len(losses)
    ds = data.train_dataset(config.batch_size, seed=config.seed + epoch,
                            with_labels=conditional)
    if config.steps_per_epoch is not None:
      # Each pass over the data is reshuffled (deterministically).
      ds = ds.repeat().take(self.steps_per_epoch)
    ds = ds.skip(skip)
    if self.distributed:
      ds = distribute.distribute_batches(self.strategy, ds, conditional)
    for item in ds:
      if interrupted[0]:
        self._stop_interrupted(epoch)
      batch, labels = item if (conditional or self.distributed) else (
          item, tf.zeros([config.batch_size], tf.int32))
      try:
        loss, nfe = self._run_step(batch, labels)
      except TrainingError as e:
        raise TrainingError(f'Epoch {epoch + 1}: {str(e).rstrip(".")}'
                            f'{self._kept()}', e.solver_error) from None
      if not math.isfinite(loss):
        raise self._non_finite(loss, epoch)
      losses.append(loss)
      nfes.append(nfe)
      regs.append(self.last_regularizers)
    if interrupted[0]:
      self._stop_interrupted(epoch)
    return losses, nfes, regs

  def _end_epoch(self, epoch, losses, nfes, regs, start, bar, callback):
    """Held-out evaluation, the epoch's record, checkpoint, logs, metrics."""
    try:
      evaluation = self.evaluate()
    except TrainingError as e:
      raise TrainingError(
          f'{str(e).rstrip(".")} after epoch {epoch + 1}{self._kept()}',
          e.solver_error) from None
    mean = lambda xs: float(np.mean(xs)) if xs else None
    record = dict(epoch=epoch + 1,
                  learning_rate=float(self.learning_rate.numpy()),
                  train_loss=mean(losses), test_nll=evaluation['nll'],
                  nfe_per_step=mean(nfes), eval_nfe=evaluation['nfe'],
                  wall_time=time.perf_counter() - start)
    if 'bits_per_dim' in evaluation:
      record['test_bits_per_dim'] = evaluation['bits_per_dim']
    if self.config.regularized and regs:
      record['kinetic_energy'] = mean([r[0] for r in regs])
      record['jacobian_frobenius'] = mean([r[1] for r in regs])
    self.history.append(record)
    self.epoch.assign(epoch + 1)
    bar.set_postfix(loss=f'{record["train_loss"] or float("nan"):.3f}',
                    test_nll=f'{record["test_nll"]:.3f}',
                    nfe=f'{record["nfe_per_step"] or 0:.0f}')
    if self.run_dir is not None:
      self.save()   # every worker: saving may need collectives
      if self.is_chief:
        with self.writer.as_default(step=record['epoch']):
          for key, value in record.items():
            if key != 'epoch' and value is not None:
              tf.summary.scalar(key, value)
        self.writer.flush()
        self.write_metrics()
    if callback is not None:
      callback(record)

  def _non_finite(self, loss, epoch) -> TrainingError:
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
    raise TrainingInterrupted(
        f'Interrupted at {where}; saved {self.save()}. Continue with --resume '
        '(`Trainer.fit()` on the same out_dir).')

  # -------------------------------------------------------------- outputs

  def metrics(self) -> Dict:
    """The content of `metrics.json`."""
    last = self.history[-1] if self.history else {}
    final, entropy = last.get('test_nll'), self.data.entropy
    out = dict(config=self.config.to_dict(), epochs=self.history,
               final_test_nll=final, data_entropy=entropy,
               gap_to_entropy=(None if final is None or entropy is None
                               else final - entropy),
               total_wall_time=last.get('wall_time', 0.),
               complete=last.get('epoch') == self.config.epochs)
    if 'test_bits_per_dim' in last:
      out['final_test_bits_per_dim'] = last['test_bits_per_dim']
    return out

  def write_metrics(self) -> Optional[str]:
    """Writes `metrics.json` atomically; only the chief (else None)."""
    if not self.is_chief or self.run_dir is None:
      return None
    return self.run_dir.write_metrics(self.metrics())

  def plot(self, out_dir: Optional[str] = None, tag: str = 'last'
           ) -> List[str]:
    """Writes the figures that apply to the data (see `figures`)."""
    from tfp_ffjord.training import figures  # pylint: disable=g-import-not-at-top
    return figures.write_figures(self, out_dir, tag, seed=self.config.seed)


def load_run(run_dir: str) -> Trainer:
  """A `Trainer` for a finished (or interrupted) run, weights restored.

  Raises:
    FileNotFoundError: if `run_dir` has no `config.json` or no checkpoint.
  """
  config = TrainConfig.from_dict(run_dir_lib.RunDir(run_dir).read_config())
  trainer = Trainer(config, out_dir=run_dir)
  if not trainer.restore():
    raise FileNotFoundError(f'{run_dir} has no checkpoint yet.')
  return trainer
