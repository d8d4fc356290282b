"""One way to pack many small Tensors into a few flat ones.

Under XLA every Tensor a compiled loop carries, reads or updates costs
kernels of its own (stage sums, selects, gathers, optimizer slots), so the
package packs Tensors of static shape into one flat vector per group:
stacked modules' variables (one `[K, P]` Tensor per dtype and
trainability), the parameters' cotangents in the adjoint's backward solve,
and the error-controlled leaves of its state.
"""

from typing import Hashable, List, Optional, Sequence

import tensorflow as tf

__all__ = ['Packing']


class Packing:
  """Packs Tensors grouped by key into one `[*lead, P]` Tensor per group.

  `Packing(shapes, keys)`: Tensor `i` has static shape `shapes[i]` and joins
  the group `keys[i]` (groups in order of first appearance; a key of `None`
  leaves the Tensor apart). `pack` returns one Tensor per group, its
  members flattened and concatenated in order, then the Tensors left apart,
  in order; `unpack` is the inverse.
  """

  def __init__(self, shapes: Sequence, keys: Sequence[Optional[Hashable]]):
    self.shapes = [tf.TensorShape(s) for s in shapes]
    # Grouped Tensors need static shapes; those left apart need none.
    self.sizes = [s.num_elements() if key is not None else None
                  for s, key in zip(self.shapes, keys)]
    groups = {}
    self.apart: List[int] = []
    for i, key in enumerate(keys):
      if key is None:
        self.apart.append(i)
      else:
        groups.setdefault(key, []).append(i)
    self.groups = list(groups.items())

  @property
  def num_packed(self) -> int:
    """How many Tensors `pack` returns."""
    return len(self.groups) + len(self.apart)

  def pack(self, values, lead: Sequence = ()) -> list:
    """One `[*lead, P]` Tensor per group, then the Tensors left apart.

    `lead` lists the leading dimensions every value has before its own
    shape (ints or scalar Tensors); `None` reads the first dimension of each
    value (`[K, ...]` values).
    """
    out = []
    for _, members in self.groups:
      parts = []
      for i in members:
        value = tf.convert_to_tensor(values[i])
        dims = _first_dim(value) if lead is None else list(lead)
        parts.append(tf.reshape(value, dims + [self.sizes[i]]))
      axis = 1 if lead is None else len(lead)
      out.append(parts[0] if len(parts) == 1 else tf.concat(parts, axis))
    return out + [values[i] for i in self.apart]

  def pack_flags(self, flags) -> list:
    """`pack` of one Python bool per Tensor: a bool Tensor per group (each
    member's flag repeated over its elements), the others' bools."""
    out = []
    for _, members in self.groups:
      out.append(tf.concat([tf.fill([self.sizes[i]], flags[i])
                            for i in members], 0))
    return out + [flags[i] for i in self.apart]

  def unpack(self, packed) -> list:
    """One `[*lead, ...]` Tensor per value from `pack`'s list (`lead` read
    from the packed Tensors: `[K]`, `[]`, ...)."""
    packed = list(packed)
    out = [None] * len(self.shapes)
    for (_, members), p in zip(self.groups, packed):
      p = tf.convert_to_tensor(p)
      parts = ([p] if len(members) == 1 else
               tf.split(p, [self.sizes[i] for i in members], axis=-1))
      lead = p.shape[:-1]
      for i, part in zip(members, parts):
        shape = (lead.as_list() + self.shapes[i].as_list()
                 if lead.is_fully_defined() else
                 tf.concat([tf.shape(p)[:-1], self.shapes[i].as_list()], 0))
        out[i] = tf.reshape(part, shape)
    for i, value in zip(self.apart, packed[len(self.groups):]):
      out[i] = value
    return out

  def zeros(self, dtypes) -> list:
    """`pack` of zeros (`dtypes[i]` the dtype of value `i`), no lead."""
    out = [tf.zeros([sum(self.sizes[i] for i in members)], dtypes[members[0]])
           for _, members in self.groups]
    return out + [tf.zeros(self.shapes[i].as_list(), dtypes[i])
                  for i in self.apart]


def _first_dim(value):
  """`[K]`: the first dimension of `value`, static if known."""
  rows = value.shape[:1]
  return [rows[0] if rows.is_fully_defined() else tf.shape(value)[0]]
