"""`MultiscaleFFJORD`: FFJORD's multiscale architecture for images.

Images are held flat (`[..., H * W * C]`, row-major), as every FFJORD
bijector here expects (the event is the last axis). From the data side,
each level

1. squeezes the image (`[h, w, c] -> [h/2, w/2, 4c]`, each 2x2 patch into
   channels) when `h` and `w` are even,
2. runs its FFJORD blocks (conv dynamics on the squeezed shape, one
   `StackedFFJORD`, so one solve for the level's blocks), and
3. unless it is the last, factors out half of the channels: they go to the
   base distribution as they are, and the other half is the next level's
   input.

Squeezing and factoring out only reorder elements (permutations with unit
Jacobian), so the log-det is the sum of the levels' FFJORD log-dets, and
later levels work on fewer dimensions: the point of the architecture
(Dinh et al., 2017; Grathwohl et al., 2019). The latent layout is
`[level 0's factored-out half, level 1's, ..., the last level's output]`.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import _checks
from tfp_ffjord import dynamics
from tfp_ffjord import flow_base
from tfp_ffjord import stacked as stacked_lib
from tfp_ffjord import trace as trace_lib

tfb = tfp.bijectors

__all__ = ['MultiscaleFFJORD', 'Level', 'plan_levels', 'squeeze_permutation',
           'factor_permutation']


def squeeze_permutation(shape: Sequence[int]) -> Tuple[np.ndarray, Tuple]:
  """The squeeze `[h, w, c] -> [h/2, w/2, 4c]` as a permutation.

  Channel `(2 dy + dx) c + k` of pixel `(i, j)` is channel `k` of pixel
  `(2i + dy, 2j + dx)`.

  Args:
    shape: `(h, w, c)` with `h` and `w` even.

  Returns:
    Indices `p` with `squeezed_flat = image_flat[p]`, and the new shape.

  Raises:
    ValueError: if the height or width is odd.

  Examples:
    >>> p, shape = squeeze_permutation((2, 2, 1))
    >>> p.tolist(), shape
    ([0, 1, 2, 3], (1, 1, 4))
  """
  h, w, c = shape
  if h % 2 or w % 2:
    raise ValueError(f'Cannot squeeze an image of shape {tuple(shape)}: '
                     'height and width must be even.')
  grid = np.arange(h * w * c).reshape(h // 2, 2, w // 2, 2, c)
  return (grid.transpose(0, 2, 1, 3, 4).reshape(-1),
          (h // 2, w // 2, 4 * c))


def factor_permutation(shape: Sequence[int]) -> Tuple[np.ndarray, Tuple]:
  """Half the channels factored out, as a permutation.

  The last `c - c // 2` channels leave, the first `c // 2` stay.

  Args:
    shape: `(h, w, c)` with `c` >= 2.

  Returns:
    Indices `p` with `image_flat[p] = [factored-out, kept]`, and the kept
    shape.

  Raises:
    ValueError: if the image has one channel.
  """
  h, w, c = shape
  if c < 2:
    raise ValueError(f'Cannot factor out half the channels of shape '
                     f'{tuple(shape)}: it has one channel.')
  grid = np.arange(h * w * c).reshape(h, w, c)
  keep = c // 2
  return (np.concatenate([grid[..., keep:].reshape(-1),
                          grid[..., :keep].reshape(-1)]), (h, w, keep))


class Level:
  """One level's layout in a `MultiscaleFFJORD`.

  Args:
    shape: the image the level takes (data side).
    squeeze: whether it squeezes first.
    flow_shape: the shape its blocks see.
    kept_shape: the next level's input (`None` for the last level).
  """

  def __init__(self, shape, squeeze, flow_shape, kept_shape):
    self.shape, self.squeeze = tuple(shape), bool(squeeze)
    self.flow_shape = tuple(flow_shape)
    self.kept_shape = None if kept_shape is None else tuple(kept_shape)

  @property
  def size(self) -> int:
    """The number of values in `shape`."""
    return int(np.prod(self.shape))

  def __repr__(self):
    return (f'Level(shape={self.shape}, squeeze={self.squeeze}, '
            f'flow_shape={self.flow_shape}, kept_shape={self.kept_shape})')


def plan_levels(image_shape: Sequence[int], levels: int) -> List[Level]:
  """The layout of `levels` levels over an image of `image_shape`.

  Each level squeezes when its height and width are even; every level but
  the last factors out half its channels. `(28, 28, 1)` with 3 levels:
  `[14, 14, 4]`, then `[7, 7, 8]`, then `[7, 7, 4]` (7 is odd).

  Args:
    image_shape: `(height, width, channels)`.
    levels: the number of levels.

  Returns:
    One `Level` per level, data side first.

  Examples:
    >>> [level.flow_shape for level in plan_levels((28, 28, 1), 3)]
    [(14, 14, 4), (7, 7, 8), (7, 7, 4)]

  Raises:
    ValueError: if `image_shape` is not 3 positive ints, `levels` not a
      positive int, or a level would have to factor out a single channel.
  """
  shape = tuple(image_shape)
  if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int)
                            or s < 1 for s in shape):
    raise ValueError('`image_shape` must be three positive ints (height, '
                     f'width, channels); got {image_shape!r}.')
  levels = _checks.positive_int('levels', levels)
  plan = []
  for i in range(levels):
    h, w, _ = shape
    squeeze = h % 2 == 0 and w % 2 == 0
    flow_shape = squeeze_permutation(shape)[1] if squeeze else shape
    kept = None
    if i < levels - 1:
      if flow_shape[-1] < 2:
        raise ValueError(
            f'`levels`={levels} is too many for image_shape {image_shape}: '
            f'level {i} has shape {flow_shape} and cannot factor out half of '
            'one channel.')
      kept = factor_permutation(flow_shape)[1]
    plan.append(Level(shape, squeeze, flow_shape, kept))
    shape = kept
  return plan


def _gather(x, index):
  return None if x is None else tf.gather(x, index, axis=-1)


class MultiscaleFFJORD(flow_base.CachedFlow):
  """Levels of FFJORD blocks with squeezes and factoring out, as one bijector.

  Forward maps the latent (base side) to the image (data side), like
  `FFJORD`; `log_prob` of a `tfd.TransformedDistribution` over a
  `[H * W * C]` base costs one solve per level. Named 'ffjord' by default,
  so it takes the per-call keywords of the FFJORD blocks (a `seed` for
  Hutchinson's probes, conditioning such as `context=`) routed by that name
  through a `tfb.Chain`, and `solve_forward` / `solve_inverse` give the
  RNODE regularisers and the solver diagnostics (NFE summed over levels).

  Args:
    image_shape: `(H, W, C)` of the data.
    level_dynamics: one list of dynamics per level (see `plan_levels` for
      the shapes they see; e.g. `tfp_ffjord.ConvODE(level.flow_shape)`).
    ode_solve_fn: the solver, as for `FFJORD`, shared by every level.
    trace_augmentation_fn: the trace estimator, as for `FFJORD`, shared by every level.
    initial_time: the time of `x`, as for `FFJORD`, shared by every level.
    final_time: the time of `y`, as for `FFJORD`, shared by every level.
    validate_args: as for `FFJORD`, shared by every level.
    dtype: the dtype of `x` and `y`, as for `FFJORD`, shared by every level.
    name: the bijector's name. Default: 'ffjord'.
    seed_salt: as for `FFJORD`; level `i` uses `f'{seed_salt}.{i}'`.
  """

  def __init__(self, image_shape, level_dynamics, ode_solve_fn=None,
               trace_augmentation_fn=trace_lib.trace_jacobian_hutchinson,
               initial_time=0., final_time=1., validate_args=False,
               dtype=tf.float32, name='ffjord', seed_salt=None):
    parameters = dict(locals())
    level_dynamics = list(level_dynamics)
    self.plan = plan_levels(image_shape, len(level_dynamics))
    self.image_shape = tuple(image_shape)
    salt = 'tfp_ffjord.multiscale' if seed_salt is None else str(seed_salt)
    with tf.name_scope(name) as scope:
      self.levels = [
          stacked_lib.StackedFFJORD(
              fns, ode_solve_fn=ode_solve_fn,
              trace_augmentation_fn=trace_augmentation_fn,
              initial_time=initial_time, final_time=final_time,
              validate_args=validate_args, dtype=dtype,
              name=f'{name}_level{i}', seed_salt=f'{salt}.{i}')
          for i, fns in enumerate(level_dynamics)]
      # Each level's permutations and their inverses (None: no squeeze,
      # or nothing factored out).
      self._squeeze = [squeeze_permutation(level.shape)[0]
                       if level.squeeze else None for level in self.plan]
      self._factor = [None if level.kept_shape is None
                      else factor_permutation(level.flow_shape)[0]
                      for level in self.plan]
      inverse = lambda p: None if p is None else np.argsort(p)
      self._unsqueeze = [inverse(p) for p in self._squeeze]
      self._unfactor = [inverse(p) for p in self._factor]
      super().__init__(forward_min_event_ndims=1, dtype=dtype,
                       validate_args=validate_args, parameters=parameters,
                       name=scope)

  @property
  def level_dynamics(self) -> List[List]:
    """One list of dynamics per level, as given."""
    return [lv.state_time_derivative_fns for lv in self.levels]

  def _check(self, x, method):
    x = tf.convert_to_tensor(x, self.dtype)
    size = self.plan[0].size
    if x.shape.rank == 0 or (x.shape[-1] is not None and x.shape[-1] != size):
      raise ValueError(f'{self.name}.{method}: the last axis must be the '
                       f'flattened image ({size} = {self.image_shape}); got '
                       f'shape {x.shape}.')
    return x

  def _inverse_level(self, i, x, regularize, kwargs):
    """Data side -> latent of level `i` and below: `(value, ildj, kinetic,
    frobenius, diagnostics)`, unreduced in the latent layout."""
    if self._squeeze[i] is not None:
      x = _gather(x, self._squeeze[i])
    r = self.levels[i].solve_inverse(x, regularize=regularize, **kwargs)
    parts = [r.value, r.log_det_jacobian, r.kinetic_energy,
             r.jacobian_frobenius]
    if self._factor[i] is None:
      return parts + [[r.diagnostics]]
    parts = [_gather(p, self._factor[i]) for p in parts]
    out = parts[0].shape[-1] - int(np.prod(self.plan[i].kept_shape))
    below = self._inverse_level(i + 1, parts[0][..., out:], regularize,
                                kwargs)
    merged = [tf.concat([parts[0][..., :out], below[0]], -1)]
    for mine, theirs in zip(parts[1:], below[1:4]):
      merged.append(None if mine is None else tf.concat(
          [mine[..., :out], mine[..., out:] + theirs], -1))
    return merged + [[r.diagnostics] + below[4]]

  def _forward_level(self, i, z, regularize, kwargs):
    """Latent of level `i` and below -> its data side (as above)."""
    below = None
    if self._factor[i] is not None:
      out = z.shape[-1] - int(np.prod(self.plan[i].kept_shape))
      below = self._forward_level(i + 1, z[..., out:], regularize, kwargs)
      z = tf.concat([z[..., :out], below[0]], -1)
      z = _gather(z, self._unfactor[i])
    r = self.levels[i].solve_forward(z, regularize=regularize, **kwargs)
    parts = [r.value, r.log_det_jacobian, r.kinetic_energy,
             r.jacobian_frobenius]
    if below is not None:
      # The levels below added their terms to the kept elements.
      for j in range(1, 4):
        if parts[j] is not None:
          extra = tf.concat([tf.zeros_like(z[..., :out]), below[j]], -1)
          parts[j] = parts[j] + _gather(extra, self._unfactor[i])
    if self._squeeze[i] is not None:
      parts = [_gather(p, self._unsqueeze[i]) for p in parts]
    return parts + [[r.diagnostics] + ([] if below is None else below[4])]

  def _result(self, parts):
    diagnostics = flow_base.sum_diagnostics(parts[4])
    return flow_base.FlowResult(parts[0], parts[1], diagnostics,
                                   parts[2], parts[3])

  def solve_forward(self, x, regularize=False, **kwargs):
    """Latent -> image through every level; a `FlowResult` whose unreduced
    terms sum over the last axis to the log-det (and RNODE integrals)."""
    x = self._check(x, 'solve_forward')
    return self._record(self._result(
        self._forward_level(0, x, regularize, dict(kwargs))))

  def solve_inverse(self, y, regularize=False, **kwargs):
    """Image -> latent through every level (see `solve_forward`)."""
    y = self._check(y, 'solve_inverse')
    return self._record(self._result(
        self._inverse_level(0, y, regularize, dict(kwargs))))

  def _augmented_forward(self, x, **kwargs):
    r = self.solve_forward(x, **kwargs)
    fldj = tf.reduce_sum(r.log_det_jacobian, -1)
    return r.value, {'fldj': fldj, 'ildj': -fldj}

  def _augmented_inverse(self, y, **kwargs):
    r = self.solve_inverse(y, **kwargs)
    ildj = tf.reduce_sum(r.log_det_jacobian, -1)
    return r.value, {'ildj': ildj, 'fldj': -ildj}


def conv_level_dynamics(image_shape, levels: int, blocks: int,
                        hidden_channels: Sequence[int], activation,
                        context_keys: Sequence[str] = (),
                        name: Optional[str] = 'multiscale'):
  """`ConvODE` dynamics for each level of `plan_levels(image_shape,
  levels)`: `blocks` per level, zero-initialised outputs."""
  return [[dynamics.ConvODE(level.flow_shape, hidden_channels, activation,
                            context_keys=context_keys,
                            name=f'{name}_level{i}_block{k}')
           for k in range(blocks)]
          for i, level in enumerate(plan_levels(image_shape, levels))]
