"""`FlowModel`: the variables of a stack of FFJORD blocks, and its flows."""

import collections
import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np
import sonnet as snt
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_ffjord import baselines
from tfp_ffjord import dynamics
from tfp_ffjord import ode
from tfp_ffjord import multiscale
from tfp_ffjord import registry
from tfp_ffjord import stacked as stacked_lib
from tfp_ffjord import trace as trace_lib
from tfp_ffjord.training import flow_matching

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ['FlowModel', 'LogProbTerms', 'ModelSpec', 'make_solver', 'make_trace',
           'solver_named',
           'CONTEXT_KEY']

CONTEXT_KEY = 'context'   # the keyword conditional dynamics read

LogProbTerms = collections.namedtuple(
    'LogProbTerms', ['log_prob', 'kinetic_energy', 'jacobian_frobenius',
                     'nfe'])
LogProbTerms.__doc__ = """What `FlowModel.log_prob_terms` returns.

Attributes:
  log_prob: `[N]` log-densities.
  kinetic_energy: `[N]` RNODE kinetic-energy integrals summed over the
    blocks (zeros unless `regularize=True`).
  jacobian_frobenius: `[N]` RNODE Jacobian Frobenius integrals, likewise.
  nfe: int32, dynamics evaluations of the solves, summed over the blocks.
"""


def solver_named(name: str, rtol: float, atol: float, num_steps: int,
                 gradient: str):
  """The solver `registry.SOLVERS[name]`: adaptive ones get `rtol` and
  `atol`, fixed-step ones `num_steps`."""
  cls = registry.resolve(registry.SOLVERS, name, ode)
  if issubclass(cls, ode.AdaptiveSolver):
    return cls(rtol=rtol, atol=atol, gradient=gradient)
  return cls(num_steps=num_steps, gradient=gradient)


def make_solver(config, for_eval: bool = False):
  """The ODE solver of a `TrainConfig`.

  Args:
    config: a `TrainConfig`.
    for_eval: the held-out evaluation's solver instead (Tsit5 at the
      config's evaluation tolerances, adjoint gradient).

  Returns:
    A `tfp_ffjord.ode` solver.

  Examples:
    >>> from tfp_ffjord.training import TrainConfig
    >>> make_solver(TrainConfig(solver='rk4', num_steps=4))
    RK4(...)
  """
  if for_eval:
    return ode.Tsit5(rtol=config.eval_rtol, atol=config.eval_atol,
                     gradient='adjoint')
  return solver_named(config.solver, config.rtol, config.atol,
                      config.num_steps, config.gradient)


def make_trace(name: str):
  """The `trace_augmentation_fn` registered as `name`.

  Args:
    name: a name of `registry.TRACES` ('exact' or 'hutchinson').

  Returns:
    The trace function.

  Raises:
    ValueError: for another name.

  Examples:
    >>> make_trace('exact').__name__
    'trace_jacobian_exact'
  """
  if name not in registry.TRACES:
    raise ValueError(f'`trace` must be one of {", ".join(registry.TRACES)}; '
                     f'got {name!r}.')
  return registry.resolve(registry.TRACES, name, trace_lib)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What `FlowModel` builds (its docstring says how).

  Attributes:
    blocks: FFJORD blocks (multiscale: per level; realnvp/maf: layers;
      glow: steps per level).
    hidden: the dynamics' hidden sizes (conv models: channels).
    activation: a name of `registry.ACTIVATIONS`.
    base_scale: the Gaussian base distribution's scale.
    architecture: a name of `registry.MODELS`.
    image_shape: `(height, width, channels)` of image models.
    levels: the levels of 'multiscale' and 'glow'.
    logit_alpha: the logit transform's `alpha`, or None for none.
    seed: the baselines' seed.
    stack_blocks: whether FFJORD blocks keep their variables packed.
  """
  blocks: int = 4
  hidden: Sequence[int] = (8, 8)
  activation: str = 'tanh'
  base_scale: float = 0.8
  architecture: str = 'ffjord'
  image_shape: Optional[Sequence[int]] = None
  levels: int = 2
  logit_alpha: Optional[float] = None
  seed: int = 0
  stack_blocks: bool = True


def _check_spec(spec, dim, num_classes):
  """`FlowModel`'s argument checks."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
      num_classes < 0):
    raise ValueError('`num_classes` must be a non-negative int; got '
                     f'{num_classes!r}.')
  if spec.activation not in registry.ACTIVATIONS:
    raise ValueError(f'`activation` must be one of '
                     f'{", ".join(registry.ACTIVATIONS)}; got '
                     f'{spec.activation!r}.')
  architecture = spec.architecture
  if architecture not in registry.MODELS:
    raise ValueError(f'`architecture` must be one of '
                     f'{", ".join(registry.MODELS)}; got {architecture!r}.')
  info = registry.MODELS[architecture]
  if info.images_only:
    image_shape = spec.image_shape
    if image_shape is None or int(np.prod(image_shape)) != int(dim):
      raise ValueError(
          f'`architecture={architecture!r}` needs `image_shape` (height, '
          f'width, channels) with {dim} elements; got {image_shape!r}.')
  if num_classes and info.kind != 'ffjord':
    raise ValueError(f'`architecture={architecture!r}` is not '
                     'conditional: `num_classes` must be 0.')


def _groups(channels):
  """GroupNorm groups for U-Net channels: the largest of 8, 4, 2, 1 that
  divides every entry."""
  return next(g for g in (8, 4, 2, 1) if all(c % g == 0 for c in channels))


# Architectures of identical FFJORD blocks: name -> `make(spec, dim,
# activation, context_keys, name)`, one block's dynamics module.
_BLOCK_DYNAMICS = {
    'ffjord': lambda spec, dim, act, keys, name: dynamics.MLPODE(
        list(spec.hidden), dim, act, context_keys=keys, name=name),
    'conv': lambda spec, dim, act, keys, name: dynamics.ConvODE(
        spec.image_shape, list(spec.hidden), act, context_keys=keys,
        name=name),
    'unet': lambda spec, dim, act, keys, name: dynamics.UNetODE(
        spec.image_shape, list(spec.hidden), act,
        groups=_groups(spec.hidden), context_keys=keys, name=name),
}
# TFP's discrete flows: name -> `make(spec, dim, activation)`, the bijector.
_BASELINES = {
    'glow': lambda spec, dim, act: baselines.make_glow(
        spec.image_shape, spec.levels, spec.blocks, spec.hidden[0],
        seed=spec.seed),
    'realnvp': lambda spec, dim, act: baselines.make_realnvp(
        dim, spec.blocks, tuple(spec.hidden), act, seed=spec.seed),
    'maf': lambda spec, dim, act: baselines.make_maf(
        dim, spec.blocks, tuple(spec.hidden), act, seed=spec.seed),
}


class FlowModel(snt.Module):
  """A flow's variables, and its flows with any solver.

  FFJORD blocks over a Gaussian base (or one of TFP's discrete flows, as a
  baseline).

  The variables live here (Sonnet dynamics modules); `flow()` wraps them into
  a `tfd.TransformedDistribution` with any solver and trace estimator, so
  the same weights serve training (fast solver, possibly Hutchinson) and
  evaluation (exact trace, tight tolerance).

  `architecture` (a name of `registry.MODELS`):

  * 'ffjord' (default): `blocks` FFJORD blocks with `MLPODE(hidden)`
    dynamics on the flat `[dim]` points (the seed colab's model).
  * 'conv': `blocks` FFJORD blocks with `ConvODE(image_shape, hidden)`
    dynamics (the points are flattened images).
  * 'unet': `blocks` FFJORD blocks with `UNetODE(image_shape, hidden)`
    dynamics (channels per resolution), for flow matching on images.
  * 'multiscale': `MultiscaleFFJORD` of `levels` levels of `blocks` conv
    blocks each.
  * 'realnvp', 'maf', 'glow': TFP's `tfb.RealNVP`, `tfb.MaskedAutoregressive
    Flow` (`blocks` layers, MLPs of `hidden` units) and `tfb.Glow`
    (`levels` levels of `blocks` steps, `hidden[0]` channels), built by
    `tfp_ffjord.baselines`. Call `initialize(batch)` before reading their
    variables; solvers and traces do not apply to them.

  `logit_alpha` (data in [0, 1]) puts `x = (sigmoid(y) - alpha) / (1 - 2
  alpha)` on the data side of the chain (a bijector named 'logit', its
  log-det counted), so the flow models `y = logit(alpha + (1 - 2 alpha) x)`.

  With `stack_blocks=True` (default) the 'ffjord' and 'conv' blocks keep
  their variables packed into one `[blocks, P]` variable (row k: block k's
  variables, flattened) in `stacked_dynamics` (a `dynamics.StackedBlocks`);
  `dynamics` are then its per-block views. Same initial values and the
  same flow as separate modules (`stack_blocks=False`), with one variable
  instead of 24 for the seed model: a first training step ~35% faster.
  The settings are a `ModelSpec` (`spec`), or its fields as arguments
  (`FlowModel(2, 4, (8, 8))`, `FlowModel(2, blocks=2, activation='elu')`),
  which override those of `spec`.

  Args:
    dim: the data dimension.
    blocks: `ModelSpec.blocks`, positionally.
    hidden: `ModelSpec.hidden`, positionally.
    spec: a `ModelSpec`.
    num_classes: classes of a conditional model (0: unconditional).
    dtype: the flow's dtype.
    name: the module's name.
    **settings: other `ModelSpec` fields.

  Raises:
    TypeError: for a setting that is not a `ModelSpec` field.
    ValueError: for an unknown architecture or activation, or an image
      model without a matching `image_shape`.
  """

  def __init__(self, dim: int, blocks: Optional[int] = None,
               hidden: Optional[Sequence[int]] = None,
               spec: Optional['ModelSpec'] = None, num_classes: int = 0,
               dtype=tf.float32, name='flow_model', **settings):
    super().__init__(name=name)
    names = [f.name for f in dataclasses.fields(ModelSpec)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
      raise TypeError(f'FlowModel: unknown setting {unknown[0]!r}; the '
                      f'settings are the fields of `ModelSpec`: '
                      f'{", ".join(names)}.')
    for key, value in (('blocks', blocks), ('hidden', hidden)):
      if value is not None:
        settings[key] = value
    spec = dataclasses.replace(spec or ModelSpec(), **settings)
    _check_spec(spec, dim, num_classes)
    self.spec = spec
    self.num_classes = num_classes
    self.dim = int(dim)
    self.dtype = tf.as_dtype(dtype)
    self.base_scale = float(spec.base_scale)
    self.architecture = spec.architecture
    self.image_shape = (None if spec.image_shape is None
                        else tuple(spec.image_shape))
    self.logit_alpha = spec.logit_alpha
    self.level_dynamics = None
    self.baseline = None
    self.stacked_dynamics = None
    self._build(spec)

  def _build(self, spec):
    """The dynamics modules (built) or the baseline flow of `spec`."""
    context_keys = (CONTEXT_KEY,) if self.num_classes else ()
    act = registry.resolve(registry.ACTIVATIONS, spec.activation, tf)
    if spec.architecture in _BASELINES:
      self.dynamics = []
      self.baseline = _BASELINES[spec.architecture](spec, self.dim, act)
      return
    if spec.architecture == 'multiscale':
      self.level_dynamics = multiscale.conv_level_dynamics(
          self.image_shape, spec.levels, spec.blocks, list(spec.hidden), act,
          context_keys)
      self.dynamics = [d for level in self.level_dynamics for d in level]
    else:
      make = _BLOCK_DYNAMICS[spec.architecture]
      self.dynamics = [make(spec, self.dim, act, context_keys,
                            f'dynamics_{i}') for i in range(spec.blocks)]
    for d in self.dynamics:  # Sonnet creates variables on the first call.
      d(tf.zeros([], self.dtype), tf.zeros([1, d.output_size], self.dtype),
        **self.context_kwargs(tf.zeros([1], tf.int32)))
    if spec.stack_blocks and spec.architecture in _BLOCK_DYNAMICS:
      # The blocks' variables packed into one [blocks, P] variable
      # (initialised with the blocks' values): one parameter tensor for
      # the optimizer and the compiled step (see `dynamics.StackedBlocks`).
      self.stacked_dynamics = dynamics.StackedBlocks(
          self.dynamics, name='stacked_dynamics')
      self.dynamics = self.stacked_dynamics.blocks

  @classmethod
  def from_config(cls, config, data, **kwargs) -> 'FlowModel':
    """The model a `TrainConfig` describes, for a `datasets.Dataset`
    (`kwargs`, e.g. `stack_blocks`, go to the constructor)."""
    spec = ModelSpec(
        blocks=config.blocks, hidden=config.hidden,
        activation=config.activation, base_scale=config.base_scale,
        architecture=config.model, image_shape=data.image_shape,
        levels=config.levels, logit_alpha=config.logit_alpha,
        seed=config.seed)
    return cls(data.dim, spec=spec,
               num_classes=data.num_classes if config.conditional else 0,
               **kwargs)

  @property
  def is_ffjord(self) -> bool:
    """Whether the model is made of FFJORD blocks (not a baseline)."""
    return self.baseline is None

  def initialize(self, batch) -> None:
    """Creates a baseline's variables from a `[N, dim]` data batch (Glow's
    ActNorm also initialises from it); nothing for FFJORD models. Call it
    before reading `trainable_variables` or restoring a checkpoint."""
    if self.baseline is not None:
      self.baseline.initialize(self.to_flow_space(
          tf.convert_to_tensor(batch, self.dtype)))

  def preprocessing(self) -> Optional[tfb.Bijector]:
    """The data-side bijector (flow space -> data), or None."""
    if self.logit_alpha is None:
      return None
    alpha = tf.constant(self.logit_alpha, self.dtype)
    return tfb.Chain([tfb.Scale(1. / (1. - 2. * alpha)), tfb.Shift(-alpha),
                      tfb.Sigmoid()], name='logit')

  def to_flow_space(self, x):
    """Data points as the flow sees them (through the logit transform)."""
    pre = self.preprocessing()
    return x if pre is None else pre.inverse(x)

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
    """The Gaussian base: `MultivariateNormalDiag(0, base_scale)`."""
    return tfd.MultivariateNormalDiag(
        loc=tf.zeros([self.dim], self.dtype),
        scale_diag=tf.fill([self.dim], tf.constant(self.base_scale,
                                                   self.dtype)))

  def base_log_prob(self, z):
    """`base_distribution().log_prob(z)`, written out.

    The isotropic Gaussian's density in a few ops, where TFP's
    `MultivariateNormalDiag` builds ~120 (with their gradients) into every
    compiled training step.
    """
    z = tf.convert_to_tensor(z, self.dtype)
    scale = tf.constant(self.base_scale, self.dtype)
    normaliser = self.dim * (np.log(self.base_scale) + 0.5 * np.log(2 * np.pi))
    return (-0.5 * tf.reduce_sum(tf.square(z / scale), -1)
            - tf.constant(normaliser, self.dtype))

  def flow(self, solver, trace: str = 'exact'):
    """`(distribution, chain)`: base -> data through every block in order.

    `chain` is a `tfb.Chain` holding the FFJORD part named 'ffjord' (a
    `StackedFFJORD`, whose `blocks` are the per-block `FFJORD`s, or a
    `MultiscaleFFJORD`; a baseline's bijector instead), after the 'logit'
    bijector on the data side when the model has one.

    `solver` is a solver object (ours or `tfp.math.ode`'s: its `solve` is
    used) or any `ode_solve_fn`; `trace` a name of `registry.TRACES`.
    """
    trace_fn = make_trace(trace)
    solve = solver.solve if hasattr(solver, 'solve') else solver
    if self.baseline is not None:
      core = self.baseline.bijector
    elif self.level_dynamics is not None:
      core = multiscale.MultiscaleFFJORD(
          self.image_shape, self.level_dynamics, ode_solve_fn=solve,
          trace_augmentation_fn=trace_fn, dtype=self.dtype, name='ffjord',
          seed_salt='tfp_ffjord.training')
    else:
      # One StackedFFJORD for all the blocks: with our solvers they are the
      # segments of one solve, traced and compiled once (a chain of K
      # FFJORDs would trace and compile K solves). Forward runs dynamics_0
      # first. It sits in a chain named for the kwargs routing
      # (`bijector_kwargs={'ffjord': ...}`) and a fixed salt keeps a seed's
      # noise the same in every process (determinism, resumes).
      core = stacked_lib.StackedFFJORD(
          self.dynamics, ode_solve_fn=solve, trace_augmentation_fn=trace_fn,
          dtype=self.dtype, name='ffjord', seed_salt='tfp_ffjord.training')
    pre = self.preprocessing()
    chain = tfb.Chain(([pre] if pre is not None else []) + [core],
                      name='ffjord_chain')
    return tfd.TransformedDistribution(self.base_distribution(), chain), chain

  def bijector_kwargs(self, labels=None, seed=None) -> Dict:
    """Keyword arguments for the FFJORD blocks of a `flow()` chain.

    The label context (conditional models) and a per-call `seed` (of the
    Hutchinson probes; ignored for a baseline, whose bijector takes no
    keyword arguments), routed to every block by name: pass as
    `log_prob(x, bijector_kwargs=...)` or `chain.forward(x, **...)`. `{}`
    when there is nothing to pass.
    """
    block = dict(self.context_kwargs(labels))
    if seed is not None and self.is_ffjord:
      block['seed'] = seed
    return {'ffjord': block} if block else {}

  def log_prob_terms(self, chain, x, seed=None, labels=None,
                     regularize: bool = False) -> LogProbTerms:
    """`log p(x)` by the inverse solve of `chain` (one loop for all the
    blocks with our solvers), with its NFE.

    With `regularize=True` each solve also carries RNODE's regularisers as
    extra states: the kinetic energy `int ||f||^2 dt` and the Jacobian's
    squared Frobenius norm `int ||J||_F^2 dt` (exact or Hutchinson, as the
    chain's trace), summed over the blocks; DiffEqFlux returns the same as
    `logpx, λ₁, λ₂`.
    """
    x = tf.convert_to_tensor(x, self.dtype)
    kwargs = self.bijector_kwargs(labels, seed).get('ffjord', {})
    ildj = kinetic = frobenius = tf.zeros(tf.shape(x)[:-1], self.dtype)
    nfe = []
    for block in chain.bijectors:   # the inverse runs the last block first
      if not hasattr(block, 'solve_inverse'):   # logit, baselines
        ildj += block.inverse_log_det_jacobian(x, event_ndims=1)
        x = block.inverse(x)
        continue
      result = block.solve_inverse(x, regularize=regularize, **kwargs)
      x = result.value
      ildj += tf.reduce_sum(result.log_det_jacobian, -1)
      if regularize:
        kinetic += tf.reduce_sum(result.kinetic_energy, -1)
        frobenius += tf.reduce_sum(result.jacobian_frobenius, -1)
      if result.diagnostics is not None:
        nfe.append(result.diagnostics.num_ode_fn_evaluations)
    nfe = tf.add_n(nfe) if nfe else tf.constant(0, tf.int32)
    return LogProbTerms(self.base_log_prob(x) + ildj, kinetic,
                        frobenius, nfe)

  def log_prob_and_regularizers(self, chain, x, seed=None, labels=None):
    """`(log_prob, kinetic_energy, jacobian_frobenius)`, each `[N]`: the
    first three of `log_prob_terms(..., regularize=True)`."""
    return tuple(self.log_prob_terms(chain, x, seed, labels, True)[:3])

  def flow_matching_loss(self, data, base, tau, labels=None):
    """Conditional flow matching loss (see `training.flow_matching`); data
    are taken to the flow space first (`to_flow_space`)."""
    if self.architecture not in registry.FLOW_MATCHING_MODELS:
      raise ValueError(
          'Flow matching trains the models '
          f'{", ".join(registry.FLOW_MATCHING_MODELS)}; this one is '
          f'{self.architecture!r}.')
    data = self.to_flow_space(tf.convert_to_tensor(data, self.dtype))
    return flow_matching.flow_matching_loss(
        self.dynamics, data,
        tf.convert_to_tensor(base, self.dtype),
        tf.convert_to_tensor(tau, self.dtype), self.context_kwargs(labels))
