"""tfp_ffjord: FFJORD continuous normalizing flows for TensorFlow Probability.

Public names live here; import them as `tfp_ffjord.X`.
"""

from tfp_ffjord import ffjord
from tfp_ffjord import ode
from tfp_ffjord.bijector import FFJORD
from tfp_ffjord.bijector import FlowResult
from tfp_ffjord.dynamics import ConcatSquashLinear
from tfp_ffjord.dynamics import ConcatSquashMLPODE
from tfp_ffjord.dynamics import MLPODE
from tfp_ffjord.trace import gaussian_noise
from tfp_ffjord.trace import rademacher_noise
from tfp_ffjord.trace import trace_jacobian_exact
from tfp_ffjord.trace import trace_jacobian_hutchinson

__version__ = '0.1.0'

__all__ = [
    'ConcatSquashLinear',
    'ConcatSquashMLPODE',
    'FFJORD',
    'FlowResult',
    'MLPODE',
    'ffjord',
    'gaussian_noise',
    'ode',
    'rademacher_noise',
    'trace_jacobian_exact',
    'trace_jacobian_hutchinson',
]
