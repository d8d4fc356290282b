"""Run by tests/test_distribute.py in a fresh process (2 logical CPUs).

Splitting the CPU into logical devices must happen before TensorFlow
initialises them, which a pytest process has long done; so this script
trains the same tiny model on one device and under `MirroredStrategy` over
2 logical CPU devices, from the same initial weights and batches, and
prints one JSON line with what the test checks.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfp_ffjord import training  # noqa: E402
from tfp_ffjord.training import likelihood  # noqa: E402
from tests.helpers import tiny_config, weights  # noqa: E402


def config(**overrides):
  overrides.setdefault('num_train', 512)
  overrides.setdefault('jit_compile', True)   # replica steps under XLA
  return tiny_config(**overrides)


def main():
  strategy = training.make_strategy('mirrored', cpu_devices=2)
  out = {'replicas': strategy.num_replicas_in_sync}

  # Same initial weights, same global batches: parameters must agree.
  single = training.Trainer(config())
  out_dir = tempfile.mkdtemp()
  mirrored = training.Trainer(config(), out_dir=out_dir, strategy=strategy)
  for target, source in zip(mirrored.model.trainable_variables,
                            single.model.trainable_variables):
    target.assign(source)
  single.fit(progress=False)
  mirrored.fit(progress=False)
  diffs = [float(np.abs(a - b).max())
           for a, b in zip(weights(single), weights(mirrored))]
  out['max_weight_diff'] = max(diffs)
  out['steps'] = [int(single.step.numpy()), int(mirrored.step.numpy())]
  out['adam_steps'] = [int(single.optimizer.step.numpy()),
                       int(mirrored.optimizer.step.numpy())]
  out['nll'] = [single.history[-1]['test_nll'],
                mirrored.history[-1]['test_nll']]
  out['mirrored_traces'] = mirrored.num_traces
  out['variable_type'] = type(mirrored.model.trainable_variables[0]).__name__

  # The chief's checkpoint restores into a single-device model.
  restored = training.load_run(out_dir)
  out['restored_diff'] = max(
      float(np.abs(a - b).max())
      for a, b in zip(weights(restored), weights(mirrored)))
  out['restored_epoch'] = int(restored.epoch.numpy())

  # Hutchinson probes: different per replica, reproducible per run.
  runs = []
  for _ in range(2):
    t = training.Trainer(config(trace='hutchinson', epochs=1),
                         strategy=strategy)
    for target, source in zip(t.model.trainable_variables,
                              single.model.trainable_variables):
      target.assign(source)
    t.fit(progress=False)
    runs.append(weights(t))
  out['hutchinson_reproducible'] = all(
      np.array_equal(a, b) for a, b in zip(*runs))
  seeds = strategy.run(
      lambda: likelihood.hutchinson_seed(
          t.config, t.step,
          tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                  tf.int32)))
  seeds = [s.numpy().tolist()
           for s in strategy.experimental_local_results(seeds)]
  out['replica_seeds'] = seeds
  errors = []
  for bad in (dict(batch_size=63), dict(objective='flow-matching')):
    try:
      training.Trainer(config(**bad), strategy=strategy)
    except ValueError as e:
      errors.append(str(e))
  out['errors'] = errors
  print(json.dumps(out))
  return 0


if __name__ == '__main__':
  sys.exit(main())
