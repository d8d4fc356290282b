"""A trained flow as a SavedModel that needs only TensorFlow to load."""

import json
import os

import tensorflow as tf

__all__ = ['export_saved_model']


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


def export_saved_model(trainer, path: str) -> str:
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

  Args:
    trainer: a `Trainer` (its model, evaluation flow, dimension, config).
    path: a new or empty directory.
  """
  module = _ExportModule(trainer.model, trainer.eval_flow, trainer.data.dim,
                         trainer.config.to_dict())
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
