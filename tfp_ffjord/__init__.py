"""tfp_ffjord: FFJORD continuous normalizing flows for TensorFlow Probability.

Public names live here; import them as `tfp_ffjord.X`. They are loaded on
first use, so `import tfp_ffjord` (and the command line's argument checks)
do not wait for TensorFlow to import.
"""

import importlib

from tfp_ffjord import compilation_cache

__version__ = '0.1.0'

# TFP_FFJORD_XLA_CACHE=1 (or a directory), set before this import and before
# TensorFlow's, turns the persistent XLA cache on (see `compilation_cache`).
compilation_cache.configure(default_on=False)

# Public name -> (module, attribute or None for the module itself).
_EXPORTS = {
    'ConcatSquashConv2D': ('tfp_ffjord.dynamics', 'ConcatSquashConv2D'),
    'ConcatSquashLinear': ('tfp_ffjord.dynamics', 'ConcatSquashLinear'),
    'ConcatSquashMLPODE': ('tfp_ffjord.dynamics', 'ConcatSquashMLPODE'),
    'ConvODE': ('tfp_ffjord.dynamics', 'ConvODE'),
    'FFJORD': ('tfp_ffjord.bijector', 'FFJORD'),
    'FlowResult': ('tfp_ffjord.bijector', 'FlowResult'),
    'MLPODE': ('tfp_ffjord.dynamics', 'MLPODE'),
    'MultiscaleFFJORD': ('tfp_ffjord.multiscale', 'MultiscaleFFJORD'),
    'StackedFFJORD': ('tfp_ffjord.stacked', 'StackedFFJORD'),
    'baselines': ('tfp_ffjord.baselines', None),
    'compilation_cache': ('tfp_ffjord.compilation_cache', None),
    'datasets': ('tfp_ffjord.datasets', None),
    'ffjord': ('tfp_ffjord.ffjord', None),
    'gaussian_noise': ('tfp_ffjord.trace', 'gaussian_noise'),
    'multiscale': ('tfp_ffjord.multiscale', None),
    'ode': ('tfp_ffjord.ode', None),
    'plotting': ('tfp_ffjord.plotting', None),
    'rademacher_noise': ('tfp_ffjord.trace', 'rademacher_noise'),
    'sample_quality': ('tfp_ffjord.sample_quality', None),
    'trace_jacobian_exact': ('tfp_ffjord.trace', 'trace_jacobian_exact'),
    'trace_jacobian_hutchinson': ('tfp_ffjord.trace',
                                  'trace_jacobian_hutchinson'),
    'training': ('tfp_ffjord.training', None),
    'vi': ('tfp_ffjord.vi', None),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module_name, attr = _EXPORTS[name]
  module = importlib.import_module(module_name)
  value = module if attr is None else getattr(module, attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
