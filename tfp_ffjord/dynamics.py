"""Sonnet modules for `state_time_derivative_fn`: `f(t, z) -> dz/dt`."""

import math
from typing import Callable, Optional, Sequence

import sonnet as snt
import tensorflow as tf

from tfp_ffjord import _autograph
from tfp_ffjord import _checks
# Several modules of one architecture computed by one: re-exported here.
from tfp_ffjord.block_stacking import stacked_call
from tfp_ffjord.block_stacking import StackedBlock
from tfp_ffjord.block_stacking import StackedBlocks
from tfp_ffjord.block_stacking import variable_paths

__all__ = ['MLPODE', 'ConcatSquashLinear', 'ConcatSquashMLPODE',
           'ConcatSquashConv2D', 'ConvODE', 'UNetODE', 'StackedBlocks',
           'StackedBlock', 'stacked_call', 'variable_paths',
           'sinusoidal_embedding']

_autograph.skip_package()


def _check_arguments(hidden_sizes, output_size, activation):
  """Validates the common constructor arguments; returns the hidden sizes."""
  sizes = list(hidden_sizes)
  for s in sizes + [output_size]:
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
      raise ValueError(
          '`hidden_sizes` and `output_size` must be positive ints; got '
          f'hidden_sizes={hidden_sizes!r}, output_size={output_size!r}.')
  if not callable(activation):
    raise TypeError(f'`activation` must be callable; got {activation!r}.')
  return sizes


def _image_shape(image_shape):
  """`image_shape` as a tuple of three positive ints, or a ValueError."""
  shape = tuple(image_shape)
  if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int)
                            or s < 1 for s in shape):
    raise ValueError('`image_shape` must be three positive ints (height, '
                     f'width, channels); got {image_shape!r}.')
  return shape


def _check_state(module, z):
  """`z` as a floating Tensor whose last axis is the module's state size.

  Checked before the first call builds the layers, so a mismatched first
  call cannot leave the module built for the wrong size.
  """
  z = tf.convert_to_tensor(z)
  if not z.dtype.is_floating:
    raise TypeError(f'{module.name}: the state `z` must be floating; got '
                    f'dtype {z.dtype.name}.')
  if z.shape.rank == 0 or (z.shape[-1] is not None
                           and z.shape[-1] != module.output_size):
    raise ValueError(
        f'{module.name}: the state `z` must have shape [..., '
        f'{module.output_size}] (`output_size`={module.output_size}); got '
        f'shape {z.shape}. Does the data dimension match the dynamics?')
  return z


def _context(module, z, kwargs):
  """The context Tensors named by `module._context_keys`, each broadcast to
  `[..., C]` over `z`'s batch axes (a missing one is an error)."""
  parts = []
  for key in module._context_keys:  # pylint: disable=protected-access
    if key not in kwargs:
      raise ValueError(f'{module.name}: missing context keyword `{key}`.')
    c = tf.cast(kwargs[key], z.dtype)
    parts.append(tf.broadcast_to(
        c, tf.concat([tf.shape(z)[:-1], tf.shape(c)[-1:]], 0)))
  return parts


def _time_column(t, x):
  """`t` (a scalar, or broadcastable to it) as a `[..., 1]` column like `x`."""
  shape = tf.concat([tf.shape(x)[:-1], [1]], 0)
  return tf.broadcast_to(tf.cast(t, x.dtype), shape)


class MLPODE(snt.Module):
  """Time-conditioned MLP dynamics: `f(t, z) = MLP(concat(t, z))`.

  Generalises the `MLP_ODE` of TFP's FFJORD colab (which is
  `MLPODE(hidden_sizes=[8, 8], output_size=2)`): any hidden sizes and
  activation, and an optional zero-initialised last layer, which makes the
  flow start as the identity.

  Called as `module(t, z, **kwargs)`; `z` has shape `[..., D]` (any number
  of batch axes, including none). Keyword arguments named in
  `context_keys` are concatenated to the input (conditional flows); others
  are ignored.

  Args:
    hidden_sizes: sizes of the hidden layers.
    output_size: D, the state size.
    activation: nonlinearity between layers. Default: `tf.math.tanh`.
    zero_init_output: initialise the last layer's weights and bias to zero.
      Default: False (as the colab).
    context_keys: names of keyword arguments to use as context. Default: ().
    time_input: concatenate `t` to the input. `False` gives autonomous
      dynamics `f(z)`, like DiffEqFlux's `FFJORD(Chain(Dense(1, 3, tanh),
      Dense(3, 1, tanh)), ...)`. Default: True.
    output_activation: nonlinearity applied to the output (that example uses
      `tf.math.tanh`). Default: None (linear output).
    name: module name.
  """

  def __init__(self, hidden_sizes: Sequence[int], output_size: int,
               activation: Callable = tf.math.tanh,
               zero_init_output: bool = False,
               context_keys: Sequence[str] = (),
               time_input: bool = True,
               output_activation: Optional[Callable] = None,
               name: Optional[str] = 'mlp_ode'):
    super().__init__(name=name)
    sizes = _check_arguments(hidden_sizes, output_size, activation)
    if output_activation is not None and not callable(output_activation):
      raise TypeError('`output_activation` must be callable or None; got '
                      f'{output_activation!r}.')
    self._activation = activation
    self._time_input = bool(time_input)
    self._output_activation = output_activation
    self._context_keys = tuple(context_keys)
    self._hidden = [snt.Linear(s, name=f'linear_{i}')
                    for i, s in enumerate(sizes)]
    zeros = snt.initializers.Zeros()
    self._output = snt.Linear(
        output_size, name=f'linear_{len(sizes)}',
        w_init=zeros if zero_init_output else None,
        b_init=zeros if zero_init_output else None)
    self.output_size = output_size

  def _inputs(self, t, z, kwargs):
    parts = [_time_column(t, z), z] if self._time_input else [z]
    return tf.concat(parts + _context(self, z, kwargs), -1)

  def __call__(self, t, z, **kwargs):
    z = _check_state(self, z)
    h = self._inputs(t, z, kwargs)
    for layer in self._hidden:
      h = self._activation(_linear(layer, h))
    out = _linear(self._output, h)
    if self._output_activation is not None:
      out = self._output_activation(out)
    return out


def _linear(layer, h):
  """Applies a `snt.Linear` to a Tensor with any number of leading axes."""
  if h.shape.rank == 2:
    return layer(h)
  lead = tf.shape(h)[:-1]
  out = layer(tf.reshape(h, [-1, h.shape[-1]]))
  return tf.reshape(out, tf.concat([lead, [layer.output_size]], 0))


class ConcatSquashLinear(snt.Module):
  """FFJORD's time-conditioned layer (Grathwohl et al., 2019).

  `y = (W x + b) * sigmoid(a t + c) + d t`: the time gates and shifts the
  output of a linear map.

  Args:
    output_size: the output features.
    zero_init: zero `W`, `b` and `d`, so the layer outputs zeros until
      trained.
    name: the module's name.
  """

  def __init__(self, output_size: int, zero_init: bool = False,
               name: Optional[str] = None):
    super().__init__(name=name)
    zeros = snt.initializers.Zeros()
    self._linear = snt.Linear(output_size, name='linear',
                              w_init=zeros if zero_init else None,
                              b_init=zeros if zero_init else None)
    self._gate = snt.Linear(output_size, name='gate')
    self._shift = snt.Linear(output_size, with_bias=False, name='shift',
                             w_init=zeros if zero_init else None)
    self.output_size = output_size

  def __call__(self, t, x):
    t_col = _time_column(t, x)
    return (_linear(self._linear, x) * tf.sigmoid(_linear(self._gate, t_col))
            + _linear(self._shift, t_col))


class ConcatSquashMLPODE(snt.Module):
  """Dynamics built from `ConcatSquashLinear` layers, as in the FFJORD paper.

  Args:
    hidden_sizes: the hidden layers' sizes.
    output_size: the state's size.
    activation: the nonlinearity between layers.
    zero_init_output: zero the last layer (the flow starts as the identity).
    context_keys: keyword arguments concatenated to the state at the input
      (conditional flows); other keyword arguments are ignored.
    name: the module's name.
  """

  def __init__(self, hidden_sizes: Sequence[int], output_size: int,
               activation: Callable = tf.math.tanh,
               zero_init_output: bool = False,
               context_keys: Sequence[str] = (),
               name: Optional[str] = 'concat_squash_ode'):
    super().__init__(name=name)
    sizes = _check_arguments(hidden_sizes, output_size, activation)
    self._activation = activation
    self._context_keys = tuple(context_keys)
    self._layers = [ConcatSquashLinear(s, name=f'layer_{i}')
                    for i, s in enumerate(sizes)]
    self._layers.append(ConcatSquashLinear(
        output_size, zero_init=zero_init_output, name=f'layer_{len(sizes)}'))
    self.output_size = output_size

  def __call__(self, t, z, **kwargs):
    z = _check_state(self, z)
    h = tf.concat([z] + _context(self, z, kwargs), -1)
    for layer in self._layers[:-1]:
      h = self._activation(layer(t, h))
    return self._layers[-1](t, h)


class ConcatSquashConv2D(snt.Module):
  """FFJORD's time-conditioned convolution.

  `y = conv(x) * sigmoid(a t + c) + d t`, the gate and shift per output
  channel. `x` is `[N, H, W, C]`; `t` a scalar or `[N]`. 'SAME' padding and
  stride 1 keep the spatial shape.

  Args:
    output_channels: the output channels.
    kernel_shape: the kernel's size.
    zero_init: zero the convolution and the shift, so the layer outputs
      zeros until trained.
    name: the module's name.
  """

  def __init__(self, output_channels: int, kernel_shape: int = 3,
               zero_init: bool = False, name: Optional[str] = None):
    super().__init__(name=name)
    zeros = snt.initializers.Zeros()
    self._conv = snt.Conv2D(output_channels, kernel_shape, padding='SAME',
                            w_init=zeros if zero_init else None,
                            b_init=zeros if zero_init else None, name='conv')
    self._gate = snt.Linear(output_channels, name='gate')
    self._shift = snt.Linear(output_channels, with_bias=False, name='shift',
                             w_init=zeros if zero_init else None)
    self.output_channels = output_channels

  def __call__(self, t, x):
    t_col = tf.reshape(tf.broadcast_to(tf.cast(t, x.dtype),
                                       tf.shape(x)[:1]), [-1, 1])
    gate = tf.sigmoid(self._gate(t_col))[:, tf.newaxis, tf.newaxis, :]
    shift = self._shift(t_col)[:, tf.newaxis, tf.newaxis, :]
    return self._conv(x) * gate + shift


class ConvODE(snt.Module):
  """Convolutional dynamics for image states, as in the FFJORD paper.

  `ConcatSquashConv2D` layers that keep the image's height and width.

  The state is an image of `image_shape = (H, W, C)`, given either as
  `[..., H, W, C]` or flattened (row-major) as `[..., H * W * C]`; the
  output has the state's layout. The flat layout is what `FFJORD` and the
  trace estimators need (the event is the last axis): the exact trace
  costs `H * W * C` vector-Jacobian products (fine for small images),
  Hutchinson's one per probe.

  Keyword arguments named in `context_keys` (`[..., K]`, e.g. one-hot
  labels) are appended to the input as K constant channels.

  Args:
    image_shape: `(H, W, C)` of the state.
    hidden_channels: output channels of the hidden layers.
    activation: nonlinearity between layers. Default: `tf.math.softplus`.
    kernel_shape: convolution kernel size. Default: 3.
    zero_init_output: zero the last layer (the flow starts as the
      identity). Default: True.
    context_keys: keyword arguments to use as context channels.
    name: module name.
  """

  def __init__(self, image_shape: Sequence[int],
               hidden_channels: Sequence[int] = (32, 32),
               activation: Callable = tf.math.softplus,
               kernel_shape: int = 3, zero_init_output: bool = True,
               context_keys: Sequence[str] = (),
               name: Optional[str] = 'conv_ode'):
    super().__init__(name=name)
    shape = _image_shape(image_shape)
    sizes = _check_arguments(hidden_channels, shape[-1], activation)
    kernel_shape = _checks.positive_int('kernel_shape', kernel_shape)
    self.image_shape = shape
    self.output_size = shape[0] * shape[1] * shape[2]
    self._activation = activation
    self._context_keys = tuple(context_keys)
    self._layers = [ConcatSquashConv2D(c, kernel_shape, name=f'layer_{i}')
                    for i, c in enumerate(sizes)]
    self._layers.append(ConcatSquashConv2D(
        shape[-1], kernel_shape, zero_init=zero_init_output,
        name=f'layer_{len(sizes)}'))

  def __call__(self, t, z, **kwargs):
    x, restore = _as_images(self, z)
    n = tf.shape(x)[:1]   # images in the batch
    context = _context_rows(self, kwargs, n, x.dtype)
    if context is not None:   # constant channels
      x = tf.concat([x, tf.broadcast_to(
          context[:, tf.newaxis, tf.newaxis, :],
          tf.concat([tf.shape(x)[:3], tf.shape(context)[-1:]], 0))], -1)
    t = tf.convert_to_tensor(t, x.dtype)
    if t.shape.rank:   # per-sample times (e.g. `[N, 1]`): one per image
      t = tf.broadcast_to(tf.reshape(t, [-1]), n)
    h = x
    for layer in self._layers[:-1]:
      h = self._activation(layer(t, h))
    return restore(self._layers[-1](t, h))


def _as_images(module, z):
  """`z` (`[..., H, W, C]` or flat `[..., H * W * C]`) as `[N, H, W, C]`
  images, and the function that gives an output of that shape `z`'s
  layout back."""
  z = tf.convert_to_tensor(z)
  image = (z.shape.rank is not None and z.shape.rank >= 3
           and tuple(z.shape[-3:]) == module.image_shape)
  if not image:
    z = _check_state(module, z)
  lead = tf.shape(z)[:-3] if image else tf.shape(z)[:-1]
  out_shape = module.image_shape if image else [module.output_size]

  def restore(h):
    return tf.reshape(h, tf.concat([lead, out_shape], 0))
  return tf.reshape(z, (-1,) + module.image_shape), restore


def _context_rows(module, kwargs, n, dtype):
  """The context keywords of `module` concatenated, one `[K]` row per image
  of the `n` (`[1]` Tensor) in the batch, or None without context keys."""
  rows = []
  for key in module._context_keys:  # pylint: disable=protected-access
    if key not in kwargs:
      raise ValueError(f'{module.name}: missing context keyword `{key}`.')
    c = tf.cast(kwargs[key], dtype)
    c = tf.reshape(c, [-1, c.shape[-1]])
    # One row per image, or rows repeated over extra leading state axes
    # (e.g. the exact trace's copies of the batch).
    rows.append(tf.tile(c, [n[0] // tf.shape(c)[0], 1]))
  return tf.concat(rows, -1) if rows else None


def sinusoidal_embedding(t, dim: int, max_frequency: float = 30.):
  """Sinusoidal features of times, as in diffusion and flow-matching U-Nets.

  Diffusion models use frequencies up to 1000 for times in [0, 1000]; a
  flow's times span [0, 1], where frequencies that high would make the
  dynamics oscillate faster than a solver's steps (an RK4 solve's error
  then shrinks far slower than its order).

  Args:
    t: `[N]` times (in [0, 1] for a flow's span).
    dim: the number of features (even).
    max_frequency: the highest angular frequency (the lowest is 1).

  Returns:
    `[N, dim]`: `sin(t f_k)` then `cos(t f_k)` for `dim / 2` frequencies
    `f_k` spaced geometrically from 1 to `max_frequency`.

  Examples:
    >>> sinusoidal_embedding(tf.constant([0.]), 4).numpy().tolist()
    [[0.0, 0.0, 1.0, 1.0]]
  """
  half = dim // 2
  freqs = tf.exp(tf.linspace(0., math.log(max_frequency), half))
  args = tf.cast(tf.reshape(t, [-1, 1]), tf.float32) * freqs[tf.newaxis]
  return tf.concat([tf.sin(args), tf.cos(args)], -1)


class _ResBlock(snt.Module):
  """GroupNorm, activation, 3x3 convolution twice, with the time embedding
  added as a per-channel shift in between, and a skip connection."""

  def __init__(self, channels, groups, activation, name=None):
    super().__init__(name=name)
    self._norm1 = snt.GroupNorm(groups, name='norm1')
    self._conv1 = snt.Conv2D(channels, 3, name='conv1')
    self._time = snt.Linear(channels, name='time')
    self._norm2 = snt.GroupNorm(groups, name='norm2')
    self._conv2 = snt.Conv2D(channels, 3, name='conv2')
    self._skip = None
    self._channels, self._activation = channels, activation

  def __call__(self, x, emb):
    if self._skip is None and x.shape[-1] != self._channels:
      self._skip = snt.Conv2D(self._channels, 1, name='skip')
    h = self._conv1(self._activation(self._norm1(x)))
    h += self._time(emb)[:, tf.newaxis, tf.newaxis, :]
    h = self._conv2(self._activation(self._norm2(h)))
    return (x if self._skip is None else self._skip(x)) + h


class UNetODE(snt.Module):
  """U-Net dynamics for image states, for flow matching on images.

  A convolution lifts the image to `channels[0]` channels; each resolution
  has a residual block (GroupNorm, activation, 3x3 convolutions, the time
  embedding added in between) and halves the height and width while they
  are even (average pooling); a middle block; then the mirror path up
  (nearest-neighbour upsampling, the skip of the same resolution
  concatenated, a residual block); a zero-initialised convolution gives the
  velocity (the flow starts as the identity). Time enters through
  `sinusoidal_embedding` and a 2-layer MLP; context keywords (e.g. one-hot
  labels) are appended to that embedding.

  The state is an image of `image_shape`, given as `[..., H, W, C]` or
  flattened as `[..., H * W * C]` (what `FFJORD` and the trace estimators
  need); the output has the state's layout. GroupNorm normalises each image
  on its own, so batch members stay independent (as trace estimators need).

  Args:
    image_shape: `(H, W, C)` of the state.
    channels: channels per resolution, finest first.
    activation: the nonlinearity. Default: `tf.nn.silu`.
    groups: GroupNorm groups (each entry of `channels` divisible by it).
    time_features: the sinusoidal embedding's size.
    zero_init_output: zero the last convolution.
    context_keys: keyword arguments appended to the time embedding.
    name: the module's name.

  Raises:
    ValueError: for a bad `image_shape`, or `channels` not divisible by
      `groups`.
  """

  def __init__(self, image_shape: Sequence[int],
               channels: Sequence[int] = (32, 64),
               activation: Callable = tf.nn.silu, groups: int = 8,
               time_features: int = 32, zero_init_output: bool = True,
               context_keys: Sequence[str] = (),
               name: Optional[str] = 'unet_ode'):
    super().__init__(name=name)
    shape = _image_shape(image_shape)
    channels = _check_arguments(channels, shape[-1], activation)
    groups = _checks.positive_int('groups', groups)
    if not channels or any(c % groups for c in channels):
      raise ValueError(f'`channels` ({channels}) must be non-empty and '
                       f'divisible by `groups` ({groups}).')
    self.image_shape = shape
    self.output_size = shape[0] * shape[1] * shape[2]
    self._activation = activation
    self._context_keys = tuple(context_keys)
    self._time_features = _checks.positive_int('time_features',
                                               time_features)
    width = 4 * channels[0]
    self._time_mlp = [snt.Linear(width, name='time_in'),
                      snt.Linear(width, name='time_out')]
    self._lift = snt.Conv2D(channels[0], 3, name='lift')
    self._down = [_ResBlock(c, groups, activation, name=f'down_{i}')
                  for i, c in enumerate(channels)]
    self._middle = _ResBlock(channels[-1], groups, activation, name='middle')
    self._up = [_ResBlock(c, groups, activation, name=f'up_{i}')
                for i, c in reversed(list(enumerate(channels)))]
    zeros = snt.initializers.Zeros() if zero_init_output else None
    self._norm = snt.GroupNorm(groups, name='norm_out')
    self._out = snt.Conv2D(shape[-1], 3, w_init=zeros, b_init=zeros,
                           name='out')
    # Resolutions halve while even: which levels pool, from the shape.
    pools, (h, w) = [], shape[:2]
    for _ in channels[:-1]:
      pools.append(h % 2 == 0 and w % 2 == 0)
      if pools[-1]:
        h, w = h // 2, w // 2
    self._pools = tuple(pools) + (False,)

  def __call__(self, t, z, **kwargs):
    x, restore = _as_images(self, z)
    n = tf.shape(x)[:1]
    t = tf.broadcast_to(tf.reshape(tf.convert_to_tensor(t, x.dtype), [-1]),
                        n)
    emb = tf.cast(sinusoidal_embedding(t, self._time_features), x.dtype)
    context = _context_rows(self, kwargs, n, x.dtype)
    if context is not None:
      emb = tf.concat([emb, context], -1)
    emb = self._time_mlp[1](self._activation(self._time_mlp[0](emb)))
    h = self._lift(x)
    skips = []
    for block, pool in zip(self._down, self._pools):
      h = block(h, emb)
      skips.append(h)
      if pool:
        h = tf.nn.avg_pool2d(h, 2, 2, 'VALID')
    h = self._middle(h, emb)
    for block, pool, skip in zip(self._up, reversed(self._pools),
                                 reversed(skips)):
      if pool:
        h = tf.repeat(tf.repeat(h, 2, axis=1), 2, axis=2)
      h = block(tf.concat([h, skip], -1), emb)
    return restore(self._out(self._activation(self._norm(h))))
