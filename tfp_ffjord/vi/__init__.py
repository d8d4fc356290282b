"""Variational inference with FFJORD surrogate posteriors.

A surrogate posterior is a `tfd.TransformedDistribution` that
`tfp.vi.fit_surrogate_posterior` (or `fit` below) can train against an
unnormalised target density:

    base N(0, I) in R^D -> FFJORD blocks -> diagonal affine map
      -> split and reshape into the target's parts -> target's constraints

`D` is the target's unconstrained size: the sum of the sizes of its parts
after its `default_event_space_bijector` has mapped them to the real line.
The constraining bijector and the restructuring (dicts, named tuples) are
TFP's, so samples come out shaped and constrained like the target's values.

`sample_and_log_prob` (the ELBO's only call) costs one forward solve: the
FFJORD bijector caches the log-det of its forward solve, so the
`TransformedDistribution` never solves backwards for its own samples.

```python
from inference_gym import using_tensorflow as gym
import tfp_ffjord

target = gym.targets.Banana()
q = tfp_ffjord.vi.surrogate_for(target)
result = tfp_ffjord.vi.fit(q, target.unnormalized_log_prob, num_steps=500)
samples = q.sample(1000)
```
"""

from tfp_ffjord.vi.fitting import elbo_loss
from tfp_ffjord.vi.fitting import evaluate
from tfp_ffjord.vi.fitting import fit
from tfp_ffjord.vi.fitting import FitResult
from tfp_ffjord.vi.fitting import importance_weights_summary
from tfp_ffjord.vi.job import run
from tfp_ffjord.vi.laplace import laplace_initialize
from tfp_ffjord.vi.laplace import LaplaceResult
from tfp_ffjord.vi.staged import build_laplace_surrogate_posterior
from tfp_ffjord.vi.staged import build_staged_ffjord_surrogate_posterior
from tfp_ffjord.vi.staged import fit_staged
from tfp_ffjord.vi.staged import STAGED_BASES
from tfp_ffjord.vi.staged import StagedSurrogate
from tfp_ffjord.vi.job import VIConfig
from tfp_ffjord.vi.surrogates import build_ffjord_surrogate_posterior
from tfp_ffjord.vi.surrogates import build_surrogate
from tfp_ffjord.vi.surrogates import EXACT_TRACE_MAX_DIM
from tfp_ffjord.vi.surrogates import FFJORD_NAME
from tfp_ffjord.vi.surrogates import load_target
from tfp_ffjord.vi.surrogates import restructuring_bijector
from tfp_ffjord.vi.surrogates import surrogate_for
from tfp_ffjord.vi.surrogates import target_log_prob_fn
from tfp_ffjord.vi.surrogates import unconstrained_size

__all__ = ['EXACT_TRACE_MAX_DIM', 'FFJORD_NAME', 'FitResult', 'STAGED_BASES',
           'StagedSurrogate', 'build_ffjord_surrogate_posterior',
           'build_laplace_surrogate_posterior',
           'build_staged_ffjord_surrogate_posterior', 'fit_staged',
           'build_surrogate', 'elbo_loss', 'evaluate', 'fit',
           'importance_weights_summary', 'laplace_initialize',
           'LaplaceResult', 'load_target',
           'restructuring_bijector', 'run', 'surrogate_for', 'target_log_prob_fn',
           'unconstrained_size', 'VIConfig']
