"""K dynamics modules of one architecture computed by one (`StackedBlocks`,
`stacked_call`): their variables packed into one `[K, P]` Tensor per dtype
and trainability, and the first module's code run on row `k`.

`tfp_ffjord.dynamics` re-exports the public names.
"""

import contextlib
from typing import Callable, Optional

import sonnet as snt
import tensorflow as tf

from tfp_ffjord._packing import Packing

__all__ = ['StackedBlock', 'StackedBlocks', 'stacked_call', 'variable_paths']


def variable_paths(module):
  """A module's variables with the attribute paths that lead to them.

  Args:
    module: a `tf.Module`.

  Returns:
    `(path, variable)` pairs in `tf.Module._flatten` order; `path` is the
    tuple of attributes and indices that leads to the variable, e.g.
    `('_hidden', 0, 'w')`.
  """
  return list(module._flatten(  # pylint: disable=protected-access
      predicate=lambda v: isinstance(v, tf.Variable), with_path=True))


def _common_layout(modules):
  """The `(path, variable)` pairs of the first of `modules`, if every one
  is a `tf.Module` of one class whose variables have the same names,
  shapes and dtypes, each held in an attribute; else None."""
  if not modules or not all(isinstance(m, tf.Module) for m in modules):
    return None
  if len({type(m) for m in modules}) != 1:
    return None
  layouts = [variable_paths(m) for m in modules]
  first = layouts[0]
  if not first or any(not isinstance(path[-1], str) for path, _ in first):
    return None
  for layout in layouts[1:]:
    if len(layout) != len(first) or any(
        p != q or v.shape != w.shape or v.dtype != w.dtype
        for (p, v), (q, w) in zip(layout, first)):
      return None
  return layouts


@contextlib.contextmanager
def _swapped(module, paths, values):
  """Within the block, the variables at `paths` read as `values`."""
  owners = []
  for path in paths:
    owner = module
    for key in path[:-1]:
      owner = owner[key] if isinstance(key, int) else getattr(owner, key)
    owners.append(owner)
  saved = [getattr(o, p[-1]) for o, p in zip(owners, paths)]
  try:
    for owner, path, value in zip(owners, paths, values):
      object.__setattr__(owner, path[-1], value)
    yield
  finally:
    for owner, path, value in zip(owners, paths, saved):
      object.__setattr__(owner, path[-1], value)


def _stacked_values(layouts):
  """One `[K, ...]` Tensor per variable of `_common_layout`'s K modules."""
  return [tf.stack([tf.convert_to_tensor(layout[j][1]) for layout in layouts])
          for j in range(len(layouts[0]))]


def _gather(weights, k):
  """Row `k` (a Python int or an int32 Tensor) of each `[K, ...]` weight."""
  if isinstance(k, int):
    return [w[k] for w in weights]
  return [tf.gather(w, k) for w in weights]


def _packing(variables) -> Packing:
  """How the variables of a module pack into a few `[..., P]` Tensors:
  variables of one dtype and trainability form a group (in order of first
  appearance), one `[K, P]` Tensor for K stacked modules rather than one
  `[K, ...]` Tensor per variable. Every Tensor a compiled step reads,
  gathers from, accumulates a gradient into and updates (with its optimizer
  slots) costs XLA kernels of its own, so fewer Tensors make a shorter
  trace and compilation."""
  return Packing([v.shape for v in variables],
                 [(tf.as_dtype(v.dtype), bool(v.trainable))
                  for v in variables])


class StackedBlocks(snt.Module):
  """K dynamics modules of one architecture, their variables packed.

  `StackedBlocks(modules)` takes K built modules of one class whose
  variables have the same names and shapes (call each once first, as for
  any Sonnet module) and holds their values, initially the K modules',
  as one `[K, P]` variable (`weights`): row k is module k's variables,
  each flattened, concatenated in the order of `block_values` (one such
  variable per dtype and trainability, if the modules mix them).
  `blocks[k]` is block `k`'s dynamics, a `StackedBlock`: it computes what
  `modules[k]` computed, reading row `k`, and goes wherever dynamics go
  (`tfp_ffjord.FFJORD`, `tfb.FFJORD`, `StackedFFJORD`). Gradients reach the
  packed variable.

  Why: an optimizer step updates each variable (and each of its slots)
  with its own kernels, and each variable is one more input of a compiled
  step, read, gathered from and given a gradient in its solver loops.
  `StackedFFJORD(stacked.blocks)` solves the K blocks in one loop reading
  the packed variable as it is: the seed model's 4 blocks of 6 variables
  are 1 variable, which makes its first training step (tracing and XLA
  compilation) shorter than separate modules' (benchmarks/RESULTS.md).

  The first module computes every block (its own variables are set aside
  during the call); keep the modules' code free of Python state that
  depends on which block runs. Train `trainable_variables` (or those of a
  bijector built on `blocks`): the modules passed in keep variables of
  their own, which the blocks no longer read. `unpack()` gives the values
  per variable of a module (`[K, ...]` each), `pack` the inverse.

  ```python
  mlps = [tfp_ffjord.dynamics.MLPODE([8, 8], 2) for _ in range(4)]
  for m in mlps:
    m(0., tf.zeros([1, 2]))                  # builds the variables
  stacked = tfp_ffjord.dynamics.StackedBlocks(mlps)
  bijector = tfp_ffjord.StackedFFJORD(stacked.blocks)
  ```

  Args:
    modules: K built modules of one class (call each once first).
    name: the module's name.

  Raises:
    ValueError: if `modules` is empty, not all of one class, or their
      variables differ in names, shapes or dtypes (or are not built yet).
  """

  def __init__(self, modules, name: Optional[str] = 'stacked_blocks'):
    super().__init__(name=name)
    modules = list(modules) if isinstance(modules, (list, tuple)) else None
    layouts = _common_layout(modules)
    if layouts is None:
      raise ValueError(
          '`modules` must be a non-empty list of built modules of one class '
          'whose variables have the same names, shapes and dtypes (call '
          f'each once to build it); got {modules!r}.')
    self._paths = tuple(path for path, _ in layouts[0])
    self._packing = _packing([v for _, v in layouts[0]])
    values = self.pack(_stacked_values(layouts))
    groups = self._packing.groups
    with self.name_scope:
      self.packed = [
          tf.Variable(value, trainable=trainable,
                      name='packed' if len(groups) == 1 else f'packed_{j}')
          for j, (((_, trainable), _), value) in enumerate(
              zip(groups, values))]
    # The first module runs every block; it and the views are not children
    # (no duplicate variables, no cycle in the checkpoint graph).
    self._template = _NotTracked(modules[0])
    self._blocks = _NotTracked(
        [StackedBlock(self, k, name=f'{self.name}_block{k}')
         for k in range(len(modules))])

  @property
  def weights(self):
    """The packed `[K, P]` variables (one unless the modules' variables
    mix dtypes or trainability)."""
    return list(self.packed)

  @property
  def num_blocks(self) -> int:
    """K, the number of blocks."""
    return len(self._blocks.value)

  @property
  def blocks(self):
    """The K `StackedBlock`s, in order."""
    return list(self._blocks.value)

  @property
  def template(self) -> tf.Module:
    """The module whose code computes every block (`modules[0]`)."""
    return self._template.value

  @property
  def paths(self):
    """The paths of a module's variables (as in
    `module._flatten(with_path=True)`, e.g. `('_hidden', 0, 'w')`), in the
    order they are packed."""
    return self._paths

  def pack(self, values):
    """`weights`-like Tensors from one `[K, ...]` Tensor per path."""
    return self._packing.pack(list(values), lead=None)

  def unpack(self, packed=None):
    """One `[K, ...]` Tensor per path from `weights`-like Tensors (default:
    the variables' values), e.g. to read a gradient per variable."""
    return self._packing.unpack(
        self.packed if packed is None else list(packed))

  def block_values(self, k: int):
    """Block `k`'s variables as `(path, value)` pairs, in `paths` order."""
    return list(zip(self._paths,
                    self._packing.unpack([w[k] for w in self.packed])))

  def assign_blocks(self, modules) -> None:
    """Sets the packed variables from K modules laid out like the ones it
    was built from (e.g. restored from a checkpoint of separate modules)."""
    layouts = _common_layout(list(modules))
    if (layouts is None or len(layouts) != self.num_blocks
        or tuple(p for p, _ in layouts[0]) != self._paths):
      raise ValueError(f'`modules` must be {self.num_blocks} modules laid out '
                       f'like {self.template.name}; got {modules!r}.')
    for w, value in zip(self.packed, self.pack(_stacked_values(layouts))):
      w.assign(value)

  def call_block(self, k, t, z, weights=None, **kwargs):
    """Block `k`'s dynamics (`k` an int or an int32 Tensor); `weights`
    stands in for `self.weights` (same shapes), e.g. already read."""
    rows = _gather(self.packed if weights is None else list(weights), k)
    with _swapped(self.template, self._paths,
                  self._packing.unpack(rows)):
      return self.template(t, z, **kwargs)


class StackedBlock(tf.Module):
  """Block `index` of a `StackedBlocks`, usable as FFJORD dynamics.

  Calling it, `f(t, z, **kwargs)`, runs the stacked module on row `index`
  of the packed variables. Other attributes (e.g. `output_size`) are those
  of the module that computes it.

  Args:
    stacked: the `StackedBlocks` it reads.
    index: the block's row.
    name: the module's name.
  """

  def __init__(self, stacked: StackedBlocks, index: int,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.stacked = stacked
    self.index = int(index)

  def __call__(self, t, z, **kwargs):
    return self.stacked.call_block(self.index, t, z, **kwargs)

  def __getattr__(self, name):
    # Only reached for attributes the view lacks; never for private ones
    # (tf.Module looks some up before __init__ has run).
    if name.startswith('_') or 'stacked' not in self.__dict__:
      raise AttributeError(name)
    return getattr(self.stacked.template, name)


class _NotTracked:
  """Holds a value out of sight of tf.Module and checkpoint tracking."""

  def __init__(self, value):
    self.value = value


def stacked_call(modules) -> Optional[Callable]:
  """One call for K modules of the same architecture.

  `call(k, *args, **kw)` equals `modules[k](*args, **kw)` for an int32
  Tensor `k`.

  The first module's code runs once, with its variables read from row `k`
  of the K modules' variables packed into one `[K, P]` Tensor (each module's
  variables flattened and concatenated, one such Tensor per dtype), so the
  graph holds one copy of the computation whatever K (gradients reach every
  module's variables). This is what lets `StackedFFJORD` trace and compile
  K blocks for the price of one. Blocks of one `StackedBlocks` (its
  `blocks`, in any order) read its packed variable instead, with nothing to
  pack.

  `call.stack()` returns those packed weights; `call(k, ...,
  stacked_weights=w)` gathers from `w` instead of packing the variables
  again. Packed once outside a solve and passed in as constants, the weights
  reach the solver's gradient as one Tensor rather than K times as many
  variables.

  Args:
    modules: K modules (or `StackedBlock`s of one `StackedBlocks`).

  Returns:
    The call, or `None` unless every module is a `tf.Module` of one class
    whose variables (built: call each module once first) have the same
    names and shapes, each held in an attribute, or every module is a
    `StackedBlock` of one `StackedBlocks`.
  """
  modules = list(modules)
  if modules and all(isinstance(m, StackedBlock) for m in modules) and len(
      {id(m.stacked) for m in modules}) == 1:
    stacked = modules[0].stacked
    index = [m.index for m in modules]
    in_order = index == list(range(stacked.num_blocks))

    def read():
      weights = [tf.convert_to_tensor(w) for w in stacked.weights]
      return weights if in_order else [tf.gather(w, index) for w in weights]

    def call_stacked(k, *args, stacked_weights=None, **kwargs):
      weights = read() if stacked_weights is None else list(stacked_weights)
      return stacked.call_block(k, *args, weights=weights, **kwargs)
    call_stacked.stack = read
    return call_stacked
  layouts = _common_layout(modules)
  if layouts is None:
    return None
  paths = [path for path, _ in layouts[0]]
  packing = _packing([v for _, v in layouts[0]])

  def stack():
    return packing.pack(_stacked_values(layouts), lead=None)

  def call(k, *args, stacked_weights=None, **kwargs):
    weights = stack() if stacked_weights is None else list(stacked_weights)
    with _swapped(modules[0], paths, packing.unpack(_gather(weights, k))):
      return modules[0](*args, **kwargs)
  call.stack = stack
  return call
