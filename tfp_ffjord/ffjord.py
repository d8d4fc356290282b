"""Mirror of `tfp.bijectors.ffjord`'s names, for drop-in imports.

`from tfp_ffjord import ffjord` can replace
`from tensorflow_probability.python.bijectors import ffjord`.
"""

from tfp_ffjord.bijector import FFJORD
from tfp_ffjord.trace import trace_jacobian_exact
from tfp_ffjord.trace import trace_jacobian_hutchinson

__all__ = ['FFJORD', 'trace_jacobian_exact', 'trace_jacobian_hutchinson']
