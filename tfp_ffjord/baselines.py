"""TFP's discrete flows as baselines: `tfb.RealNVP`, `tfb.MaskedAutoregressiveFlow`
and `tfb.Glow`, packaged to train with the same `Trainer` and data.

Each `make_*` returns a `tf.Module` holding the bijector (latent -> data,
on flat `[..., D]` points, the layout of every model here) and its
networks. Variables are created by the first call: call `initialize(x)`
with a batch of data before reading `trainable_variables` (Glow's ActNorm
layers also take their data-dependent initial scale from that batch).
"""

from typing import Callable, Sequence

import numpy as np
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ['BaselineFlow', 'make_realnvp', 'make_maf', 'make_glow',
           'LOG_SCALE_BOUND']

# Affine couplings bound their log-scales to (-B, B) by B * tanh(. / B):
# unbounded scales made RealNVP's first steps on digits overflow.
LOG_SCALE_BOUND = 3.


class BaselineFlow(tf.Module):
  """A discrete flow: `bijector` (latent -> data) and the modules it uses.

  Attributes:
    bijector: the `tfb.Bijector`, forward from the latent to the data.
    kind: 'realnvp', 'maf' or 'glow'.
    static_batch: whether the bijector needs a batch of known size inside a
      graph (`tfb.Glow` in TFP 0.25: int32/int64 shapes in its `Reshape`
      fail on an unknown batch size, in both directions).
  """

  def __init__(self, bijector, kind: str, networks=(), name=None,
               static_batch: bool = False):
    """Wraps a built bijector.

    Args:
      bijector: the `tfb.Bijector`, forward from the latent to the data.
      kind: 'realnvp', 'maf' or 'glow'.
      networks: the modules holding the bijector's variables.
      name: the module's name. Default: `kind`.
      static_batch: whether the bijector needs a batch of known size.
    """
    super().__init__(name=name or kind)
    self.bijector, self.kind = bijector, kind
    self.networks = list(networks)
    self.static_batch = static_batch

  def initialize(self, x):
    """Runs the inverse on a data batch once to build the variables.

    Glow's ActNorm layers initialise themselves from that batch.

    Args:
      x: a `[N, D]` batch of data.

    Returns:
      The latent points of `x`.
    """
    return self.bijector.inverse(tf.convert_to_tensor(x))


class _CouplingNet(snt.Module):
  """`(shift, log_scale)` of an affine coupling from the masked half."""

  def __init__(self, hidden: Sequence[int], activation: Callable,
               name=None):
    super().__init__(name=name)
    self._hidden, self._activation = list(hidden), activation
    self._mlp = self._out = None

  def __call__(self, x, output_units, **kwargs):
    if self._mlp is None:
      self._mlp = snt.nets.MLP(self._hidden, activation=self._activation,
                               activate_final=True, name='mlp')
      # Zero-initialised output: each coupling starts as the identity (as
      # Glow's); random outputs compounded over 8 couplings overflowed on
      # MNIST's logit-space pixels at the first step.
      zeros = snt.initializers.Zeros()
      self._out = snt.Linear(2 * output_units, w_init=zeros, b_init=zeros,
                             name='out')
    h = self._out(self._mlp(x))
    shift, log_scale = tf.split(h, 2, axis=-1)
    return shift, LOG_SCALE_BOUND * tf.tanh(log_scale / LOG_SCALE_BOUND)


def _check(dim, layers):
  for label, v in (('dim', dim), ('layers', layers)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f'`{label}` must be a positive int; got {v!r}.')


def _with_permutations(flows, dim, seed):
  """`flows` interleaved with fixed random permutations (latent -> data)."""
  rng = np.random.default_rng(seed)
  parts = []
  for i, flow in enumerate(flows):
    if i:
      parts.append(tfb.Permute(rng.permutation(dim).astype(np.int32),
                               name=f'permute_{i}'))
    parts.append(flow)
  return tfb.Chain(list(reversed(parts)))


def make_realnvp(dim: int, layers: int = 4, hidden: Sequence[int] = (64, 64),
                 activation: Callable = tf.nn.relu,
                 seed: int = 0) -> BaselineFlow:
  """RealNVP (Dinh et al., 2017) from `tfb.RealNVP` couplings.

  Each affine coupling masks half the dimensions; its shift/log-scale
  network is an MLP with a zero-initialised output (the identity at the
  start) and bounded log-scales. Fixed random permutations lie between them.

  Args:
    dim: the data dimension (>= 2).
    layers: the number of couplings.
    hidden: the MLPs' hidden sizes.
    activation: the MLPs' activation.
    seed: the permutations' seed.

  Returns:
    A `BaselineFlow` of kind 'realnvp'.

  Raises:
    ValueError: if `dim` < 2 or `layers` is not a positive int.
  """
  _check(dim, layers)
  if dim < 2:
    raise ValueError(f'RealNVP needs `dim` >= 2; got {dim}.')
  nets = [_CouplingNet(hidden, activation, name=f'coupling_{i}')
          for i in range(layers)]
  flows = [tfb.RealNVP(num_masked=dim // 2, shift_and_log_scale_fn=net,
                       name=f'realnvp_{i}') for i, net in enumerate(nets)]
  return BaselineFlow(_with_permutations(flows, dim, seed), 'realnvp', nets)


def make_maf(dim: int, layers: int = 4, hidden: Sequence[int] = (64, 64),
             activation: Callable = tf.nn.relu,
             seed: int = 0) -> BaselineFlow:
  """A masked autoregressive flow (Papamakarios et al., 2017).

  `layers` `tfb.MaskedAutoregressiveFlow`s (MADE networks,
  `tfb.AutoregressiveNetwork`) with fixed random permutations between them.
  Density evaluation is one pass; sampling is `dim` passes.

  MADE keeps its masks through Keras variable constraints: an optimizer
  that ignores constraints (Sonnet's) must re-apply them after each update,
  as `training.steps.apply_gradients` does.

  Args:
    dim: the data dimension.
    layers: the number of autoregressive layers.
    hidden: the MADE networks' hidden sizes.
    activation: their activation.
    seed: the permutations' seed.

  Returns:
    A `BaselineFlow` of kind 'maf'.

  Raises:
    ValueError: if `dim` or `layers` is not a positive int.
  """
  _check(dim, layers)
  nets = [tfb.AutoregressiveNetwork(
      params=2, hidden_units=list(hidden), activation=activation,
      name=f'made_{i}') for i in range(layers)]

  def shift_and_log_scale(net):
    def fn(x):
      shift, log_scale = tf.unstack(net(x), axis=-1)
      return shift, LOG_SCALE_BOUND * tf.tanh(log_scale / LOG_SCALE_BOUND)
    return fn

  flows = [tfb.MaskedAutoregressiveFlow(
      shift_and_log_scale_fn=shift_and_log_scale(net), name=f'maf_{i}')
           for i, net in enumerate(nets)]
  return BaselineFlow(_with_permutations(flows, dim, seed), 'maf', nets)


def make_glow(image_shape: Sequence[int], levels: int = 2,
              steps_per_level: int = 4, hidden_channels: int = 64,
              seed: int = 0) -> BaselineFlow:
  """Glow (Kingma & Dhariwal, 2018) from `tfb.Glow`, flattened.

  `levels` squeeze levels of `steps_per_level` steps (ActNorm, invertible
  1x1 convolution, affine coupling), with TFP's default coupling and exit
  networks, then flattened to `[H * W * C]`.

  Args:
    image_shape: `(height, width, channels)`; height and width divisible
      by `2 ** levels`.
    levels: the number of squeeze levels.
    steps_per_level: the flow steps per level.
    hidden_channels: the coupling networks' channels.
    seed: the seed of TFP's Glow initialisation.

  Returns:
    A `BaselineFlow` of kind 'glow' (`static_batch=True`).

  Raises:
    ValueError: if the height or width is not divisible by `2 ** levels`.
  """
  h, w, c = (int(s) for s in image_shape)
  if h % 2 ** levels or w % 2 ** levels:
    raise ValueError(f'Glow with `levels`={levels} needs the height and '
                     f'width divisible by {2 ** levels}; got {image_shape}.')
  glow = tfb.Glow(
      output_shape=(h, w, c), num_glow_blocks=levels,
      num_steps_per_block=steps_per_level,
      coupling_bijector_fn=lambda shape: tfb.GlowDefaultNetwork(
          shape, num_hidden=hidden_channels),
      exit_bijector_fn=tfb.GlowDefaultExitNetwork, seed=seed)
  flat = tfb.Reshape(event_shape_out=[h * w * c], event_shape_in=[h, w, c])
  return BaselineFlow(tfb.Chain([flat, glow]), 'glow', [glow],
                      static_batch=True)
