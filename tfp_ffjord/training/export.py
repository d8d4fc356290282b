"""A trained flow as a SavedModel that needs only TensorFlow to load."""

import json
import os

import tensorflow as tf

__all__ = ['export_saved_model', 'EXPORT_SEED']

# The seed of the exported `log_prob`'s Hutchinson probes (models evaluated
# with Hutchinson's estimator, i.e. above 64 dimensions by default): fixed,
# so the exported density is a deterministic function of `x`.
EXPORT_SEED = (0, 20190101)
# Points per call of a flow that needs a static batch size (`tfb.Glow`):
# the exported functions run it over chunks of this many.
STATIC_CHUNK = 64


def _chunked_log_prob(log_prob, x, chunk):
  """`log_prob` of `x` (`[N, D]`, N unknown) over zero-padded chunks of a
  static size (`tf.map_fn`)."""
  n, dim = tf.shape(x)[0], x.shape[-1]
  k = (n + chunk - 1) // chunk
  padded = tf.pad(x, [[0, k * chunk - n], [0, 0]])
  out = tf.map_fn(log_prob, tf.reshape(padded, [k, chunk, dim]),
                  fn_output_signature=tf.TensorSpec([chunk], x.dtype))
  return tf.reshape(out, [-1])[:n]


def _chunked_sample(sample, n, seed, chunk, dim):
  """`n` samples from chunks of `chunk` (each `sample(chunk, seed_i)` with
  `seed_i` folded from `seed` and the chunk's index)."""
  k = (n + chunk - 1) // chunk
  out = tf.map_fn(
      lambda i: sample(chunk, tf.random.experimental.stateless_fold_in(
          seed, i)), tf.range(k),
      fn_output_signature=tf.TensorSpec([chunk, dim], tf.float32))
  return tf.reshape(out, [-1, dim])[:n]


class _ExportModule(tf.Module):
  """What `export_saved_model` saves: the variables and two functions."""

  def __init__(self, model, flow, dim: int, config: dict):
    super().__init__(name='tfp_ffjord_flow')
    classes = model.num_classes
    self.model = model   # tracks the variables
    # Variables, because a SavedModel keeps trackables, not constants.
    self.dim = tf.Variable(dim, trainable=False, dtype=tf.int32)
    self.num_classes = tf.Variable(classes, trainable=False, dtype=tf.int32)
    self.config_json = tf.Variable(json.dumps(config), trainable=False)
    points = tf.TensorSpec([None, dim], tf.float32, name='x')
    # FFJORD blocks take a seed for their Hutchinson probes (the exact trace
    # ignores it, baselines get none). log_prob fixes the probes
    # (EXPORT_SEED); sampling seeds them from the sample's seed, since an
    # adaptive solve's steps follow the log-det's error too and unseeded
    # probes would make the samples vary between calls.
    kwargs = model.bijector_kwargs
    count = tf.TensorSpec([], tf.int32, name='n')
    seed = tf.TensorSpec([2], tf.int32, name='seed')
    if classes:
      label_spec = tf.TensorSpec([None], tf.int32, name='labels')

      @tf.function(input_signature=[points, label_spec])
      def log_prob(x, labels):
        return {'log_prob': flow.log_prob(
            x, bijector_kwargs=kwargs(labels, EXPORT_SEED))}

      @tf.function(input_signature=[count, seed,
                                    tf.TensorSpec([], tf.int32, name='label')])
      def sample(n, seed, label):
        return {'samples': flow.sample(n, seed=seed, bijector_kwargs=(
            kwargs(tf.fill([n], label), seed)))}
    elif not model.is_ffjord and model.baseline.static_batch:
      @tf.function(input_signature=[points])
      def log_prob(x):
        return {'log_prob': _chunked_log_prob(flow.log_prob, x,
                                              STATIC_CHUNK)}

      @tf.function(input_signature=[count, seed])
      def sample(n, seed):
        return {'samples': _chunked_sample(
            lambda m, s: flow.sample(m, seed=s), n, seed, STATIC_CHUNK,
            dim)}
    else:
      @tf.function(input_signature=[points])
      def log_prob(x):
        return {'log_prob': flow.log_prob(
            x, bijector_kwargs=kwargs(None, EXPORT_SEED))}

      @tf.function(input_signature=[count, seed])
      def sample(n, seed):
        return {'samples': flow.sample(
            n, seed=seed, bijector_kwargs=kwargs(None, seed))}
    self.log_prob = log_prob
    self.sample = sample


def export_saved_model(trainer, path: str) -> str:
  """Saves the trained flow as a SavedModel with `log_prob` and `sample`.

  The SavedModel needs only TensorFlow to load (`tf.saved_model.load(path)`,
  no tfp_ffjord or TFP import), and runs the held-out evaluation's solver
  and exact trace:

  * `log_prob(x)`: `x` float32 `[N, D]` -> `{'log_prob': [N]}` (for a
    model evaluated with Hutchinson's estimator, an unbiased estimate with
    probes fixed by `EXPORT_SEED`: the same `x` gives the same value);
  * `sample(n, seed)`: int32 scalar and int32 `[2]` -> `{'samples': [n, D]}`,
    the same points for the same seed (stateless sampling);
  * conditional models take `labels` (`[N]` int32) in `log_prob` and one
    `label` (int32 scalar) in `sample`;
  * a baseline that needs a static batch size (`tfb.Glow`) runs over
    chunks of `STATIC_CHUNK` points; its samples come chunk by chunk, with
    seeds folded from `seed`.

  Both are also `signatures` (for TF Serving and `saved_model_cli`), and
  the module has `dim`, `num_classes` and `config_json` constants. The
  directory is written under a temporary name and renamed, so a crash
  never leaves a half-written SavedModel at `path`. A trainer with a
  moving average of its weights (`ema_decay`) saves the averaged weights.

  Args:
    trainer: a `Trainer` (its model, evaluation flow, dimension, config).
    path: a new or empty directory.

  Returns:
    `path`.

  Raises:
    FileExistsError: if `path` exists and is not an empty directory.
  """
  module = _ExportModule(trainer.model, trainer.eval_flow, trainer.data.dim,
                         trainer.config.to_dict())
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    raise FileExistsError(f'{path} already exists and is not empty.')
  tmp = f'{path}.tmp-{os.getpid()}'
  with trainer.averaged_weights():
    tf.saved_model.save(module, tmp, signatures={
        'log_prob': module.log_prob, 'sample': module.sample,
        'serving_default': module.log_prob})
  if os.path.exists(path):
    os.rmdir(path)
  os.replace(tmp, path)
  return path
