"""`tf.distribute` for training: strategies by name, the chief, the step."""

from typing import Optional

import tensorflow as tf

from tfp_ffjord import _checks
from tfp_ffjord import registry
from tfp_ffjord.training.steps import LossTerms

__all__ = ['make_strategy', 'is_chief', 'make_distributed_step',
           'distribute_batches']


def is_chief(resolver) -> bool:
  """Whether the task of a cluster resolver writes checkpoints, metrics, logs.

  The chief of a multi-worker cluster (task `chief`, or `worker` 0 when the
  cluster has no `chief`); true without a resolver or task (one process).
  Used with a strategy's `cluster_resolver`, and by the CLI with
  `TFConfigClusterResolver` before any strategy exists.

  Args:
    resolver: a cluster resolver, or None.

  Returns:
    True for the chief, or for a single process.
  """
  if resolver is None or not getattr(resolver, 'task_type', None):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return task_type == 'worker' and task_id == 0 and not has_chief


def make_strategy(name: str = 'default', cpu_devices: Optional[int] = None,
                  timeout_seconds: Optional[float] = 300.):
  """A `tf.distribute` strategy by name; `None` for 'default'.

  Args:
    name: a name of `registry.STRATEGIES`: 'default' (one device: returns
      None), 'mirrored' (all GPUs of this host, or `cpu_devices` logical
      CPU devices), 'multi-worker' (`MultiWorkerMirroredStrategy`, cluster
      from the `TF_CONFIG` environment variable) or 'tpu' (`TPUStrategy` on
      the TPU named by the usual resolver environment; not tested here).
    cpu_devices: split the host CPU into this many logical devices first
      (must run before TensorFlow initialises its devices); for 'mirrored'
      without GPUs, the strategy then mirrors over them.
    timeout_seconds: 'multi-worker': a collective that waits longer than
      this (a dead worker) fails instead of hanging.

  Returns:
    The strategy, or None for 'default'.

  Raises:
    ValueError: for an unknown name or a bad `cpu_devices`.
  """
  if name not in registry.STRATEGIES:
    raise ValueError('`strategy` must be one of '
                     f'{", ".join(registry.STRATEGIES)}; got {name!r}.')
  if cpu_devices is not None:
    cpu_devices = _checks.positive_int('cpu_devices', cpu_devices)
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


def make_distributed_step(strategy, loss_fn, update, global_batch: int,
                          jit_compile: bool = True, on_trace=None):
  """`step(batch, labels) -> LossTerms` under `strategy`: one optimizer
  step (`update`, a `steps.Update`).

  `loss_fn(batch, labels, replica_id) -> LossTerms` is one replica's loss.
  Each replica scales its loss by its share of the global batch and takes
  the gradient of that (compiled with XLA if asked); summed over the
  replicas they give the global-batch mean and its gradient. The update
  runs once, in cross-replica context, which assigns the same new values to
  every copy of each (mirrored) variable. `nfe` is the mean over replicas.
  """
  variables = list(update.variables)

  def replica_grads(batch, labels, replica_id):
    if on_trace is not None:
      on_trace()
    share = (tf.cast(tf.shape(batch)[0], tf.float32) / float(global_batch))
    with tf.GradientTape() as tape:
      terms = loss_fn(batch, labels, replica_id)
      scaled = terms.loss * share
    grads = tape.gradient(scaled, variables)
    return (scaled, grads, tf.cast(terms.nfe, tf.float32),
            terms.kinetic * share, terms.frobenius * share)

  replica_grads = tf.function(replica_grads, jit_compile=jit_compile,
                              autograph=False)

  def replica_fn(batch, labels):
    ctx = tf.distribute.get_replica_context()
    rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    loss, grads, nfe, kinetic, frobenius = replica_grads(batch, labels, rid)
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                            [loss, kinetic, frobenius] + list(grads))
    nfe = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, nfe)   # per replica
    return summed, nfe

  def distributed_step(batch, labels):
    summed, nfe = strategy.run(replica_fn, args=(batch, labels))
    first = lambda v: strategy.experimental_local_results(v)[0]
    summed = [first(v) for v in summed]
    loss, kinetic, frobenius, grads = (summed[0], summed[1], summed[2],
                                       summed[3:])
    update.apply(loss, grads)
    return LossTerms(loss, tf.cast(tf.round(first(nfe)), tf.int32), kinetic,
                     frobenius)

  return tf.function(distributed_step, autograph=False)


def distribute_batches(strategy, dataset, with_labels: bool):
  """`dataset`'s global batches as `(batch, labels)` pairs, split over the
  replicas (and sharded over the workers by data) by `strategy`."""
  if not with_labels:
    dataset = dataset.map(lambda x: (x, tf.zeros(tf.shape(x)[:1], tf.int32)))
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return strategy.experimental_distribute_dataset(
      dataset.with_options(options))
