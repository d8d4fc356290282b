"""Butcher tableaus of the explicit Runge-Kutta methods the solvers use.

A method is data: the stage coefficients `a`, the nodes `c`, the weights `b`
and, for adaptive methods, the weights of the embedded lower-order solution.
Adding a method means adding a `ButcherTableau` here and a small solver class
in `solvers.py`; the stepping loop in `runge_kutta.py` is shared by all.
"""

import dataclasses
from fractions import Fraction
from typing import Optional, Tuple

import numpy as np

__all__ = [
    'ButcherTableau',
    'EULER',
    'MIDPOINT',
    'RK4',
    'DORMAND_PRINCE',
    'TSITOURAS5',
]

# Row sums and weight sums are checked to this absolute tolerance when a
# tableau is built. Coefficients given as floats carry ~1e-16 relative error.
_CONSISTENCY_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
  """An explicit Runge-Kutta method, checked for consistency on construction.

  Attributes:
    name: Human-readable method name (used in error messages).
    a: Lower-triangular stage matrix as a tuple of rows; row `i` (0-based) has
      `i + 1` entries and defines stage `i + 2` (stage 1 is `f(t, y)`).
    b: Weights of the propagated solution, one per stage.
    c: Nodes (fractions of the step) of stages 2.., one per row of `a`.
    order: Order of the propagated solution.
    b_embedded: Weights of the embedded solution used for error estimation, or
      `None` for a fixed-step method.
    embedded_order: Order of the embedded solution (`None` for fixed-step).

  Raises:
    ValueError: if a row of `a` does not sum to its node, if the weights do
      not sum to one, or if the shapes are inconsistent.

  Examples:
    >>> heun = ButcherTableau(name='Heun', a=((1.,),), b=(.5, .5), c=(1.,),
    ...                       order=2)
    >>> heun.num_stages
    2
    >>> ButcherTableau(name='bad', a=((1.,),), b=(.5, .6), c=(1.,), order=2)
    Traceback (most recent call last):
    ...
    ValueError: Tableau bad: ...
  """
  name: str
  a: Tuple[Tuple[float, ...], ...]
  b: Tuple[float, ...]
  c: Tuple[float, ...]
  order: int
  b_embedded: Optional[Tuple[float, ...]] = None
  embedded_order: Optional[int] = None

  def __post_init__(self):
    num_stages = len(self.a) + 1
    if len(self.c) != len(self.a):
      raise ValueError(
          f'Tableau {self.name}: `c` must have one node per row of `a` '
          f'({len(self.a)}); got {len(self.c)}.')
    for i, row in enumerate(self.a):
      if len(row) != i + 1:
        raise ValueError(
            f'Tableau {self.name}: row {i} of `a` must have {i + 1} entries; '
            f'got {len(row)}.')
      if abs(sum(row) - self.c[i]) > _CONSISTENCY_TOLERANCE:
        raise ValueError(
            f'Tableau {self.name}: row {i} of `a` sums to {sum(row)!r}, '
            f'not to its node c={self.c[i]!r}.')
    for label, weights in (('b', self.b), ('b_embedded', self.b_embedded)):
      if weights is None:
        continue
      if len(weights) != num_stages:
        raise ValueError(
            f'Tableau {self.name}: `{label}` must have {num_stages} entries; '
            f'got {len(weights)}.')
      if abs(sum(weights) - 1.0) > _CONSISTENCY_TOLERANCE:
        raise ValueError(
            f'Tableau {self.name}: `{label}` sums to {sum(weights)!r}, not 1.')
    if (self.b_embedded is None) != (self.embedded_order is None):
      raise ValueError(
          f'Tableau {self.name}: `b_embedded` and `embedded_order` must be '
          'given together.')

  @property
  def num_stages(self) -> int:
    """The number of stages (evaluations per step, before FSAL).

    Examples:
      >>> RK4.num_stages
      4
    """
    return len(self.a) + 1

  @property
  def fsal(self) -> bool:
    """First-same-as-last: the last stage is `f(t + dt, y_new)`."""
    return (len(self.a) > 0 and self.c[-1] == 1.0
            and tuple(self.a[-1]) + (0.0,) == tuple(self.b))

  @property
  def b_error(self) -> Tuple[float, ...]:
    """Weights whose combination of stages is `y_new - y_embedded`."""
    if self.b_embedded is None:
      raise ValueError(f'Tableau {self.name} has no embedded method.')
    return tuple(b - e for b, e in zip(self.b, self.b_embedded))

  def as_numpy(self):
    """Returns `(a, b, c)` as float64 arrays (`a` zero-padded, square)."""
    n = self.num_stages
    a = np.zeros([n, n])
    for i, row in enumerate(self.a):
      a[i + 1, :i + 1] = row
    return a, np.asarray(self.b), np.concatenate([[0.0], self.c])


def _f(*values):
  """Exact rationals as floats, written as strings like '19372/6561'."""
  return tuple(float(Fraction(v)) for v in values)


EULER = ButcherTableau(name='Euler', a=(), b=(1.0,), c=(), order=1)

MIDPOINT = ButcherTableau(
    name='Midpoint', a=((0.5,),), b=(0.0, 1.0), c=(0.5,), order=2)

RK4 = ButcherTableau(
    name='RK4',
    a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=_f('1/6', '1/3', '1/3', '1/6'),
    c=(0.5, 0.5, 1.0),
    order=4)

# Dormand & Prince (1980), the 5(4) pair also used by `tfp.math.ode` and
# `scipy.integrate.RK45`; the seventh stage is FSAL.
DORMAND_PRINCE = ButcherTableau(
    name='DormandPrince',
    a=(
        _f('1/5'),
        _f('3/40', '9/40'),
        _f('44/45', '-56/15', '32/9'),
        _f('19372/6561', '-25360/2187', '64448/6561', '-212/729'),
        _f('9017/3168', '-355/33', '46732/5247', '49/176', '-5103/18656'),
        _f('35/384', '0', '500/1113', '125/192', '-2187/6784', '11/84'),
    ),
    b=_f('35/384', '0', '500/1113', '125/192', '-2187/6784', '11/84', '0'),
    c=_f('1/5', '3/10', '4/5', '8/9', '1', '1'),
    order=5,
    b_embedded=_f('5179/57600', '0', '7571/16695', '393/640',
                  '-92097/339200', '187/2100', '1/40'),
    embedded_order=4)

# Tsitouras (2011), a 5(4) pair with smaller error constants than
# Dormand-Prince; seven stages, FSAL. The coefficients are irrational and are
# given to double precision.
_TSIT5_B = (
    0.09646076681806522951816731316512876,
    0.01,
    0.47988965041449957477524953229059652,
    1.37900857410374189319227482185687277,
    -3.29006951543608067990104758571136385,
    2.32471052409977398241535591839876580,
    0.0,
)
_TSIT5_B_EMBEDDED = (
    0.09468075576583945807478876255758923,
    0.00918356554034325309677636393664531,
    0.48777052842476157078556425996312282,
    1.23429756693047898565510967388423765,
    -2.70771234998352545488110997505932167,
    1.86662841817058703575371939956621150,
    1.0 / 66.0,
)
TSITOURAS5 = ButcherTableau(
    name='Tsit5',
    a=(
        (0.161,),
        (-0.00848065549235698854442687425023077,
         0.33548065549235698854442687425023077),
        (2.89715305710549343213043259419293876,
         -6.35944848997507484314815991238382563,
         4.36229543286958141101772731819088686),
        (5.32586482843925660442887792084051132,
         -11.74888356406282787774717033978577296,
         7.49553934288983620830460478456435816,
         -0.09249506636175524925650207933207192),
        (5.86145544294642002865925148698264789,
         -12.92096931784710929170611868178335940,
         8.15936789857615864318040079453925349,
         -0.07158497328140099722453054252582974,
         -0.02826905039406838290900305721271224),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    c=(0.161, 0.327, 0.9, 0.98002554090450968572981028628702460, 1.0, 1.0),
    order=5,
    b_embedded=_TSIT5_B_EMBEDDED,
    embedded_order=4)
